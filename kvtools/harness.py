"""lm-evaluation-harness on a kvtools-patched model (``pip install 'kvtools[lm-eval]'``).

:class:`KVToolsLM` is an lm-eval model (registered as ``"kvtools"`` when this module is
imported) that loads a model, patches it with a kvtools config and answers the harness's
three request kinds through the patched forward:

- ``loglikelihood``: the context except its last token is fed as one call, so the cache
  policy compresses it (SnapKV, StreamingLLM, Duo, quantisation ... exactly as at
  generation); the context's last token and the continuation are then fed as a second call
  on that cache, so every scored token attends the compressed context. Continuations that
  share a context share its prefill (the cache is copied; a method whose state cannot be
  copied, RetrievalAttention's CPU index, prefills again).
- ``loglikelihood_rolling``: lm-eval's disjoint windows, each scored the same way.
  A window is one call, so a cache method changes its score only through a chunked
  prefill (``prefill: {chunk: N}``: later chunks attend the compressed earlier ones);
  a sparse prefill (FlexPrefill, HiP) changes it directly.
- ``generate_until``: ``model.generate`` on a fresh :class:`~kvtools.KVCache`, greedy unless
  the task asks to sample, stopped at the task's ``until`` strings.

From the command line, ``kvtools lm-eval --config full,snapkv --tasks TASKS`` runs the
harness once per config and writes one table. The harness's own ``lm_eval`` command cannot
reach this class: lm-eval 0.4 finds models only in its own registry, which an installed
package cannot extend. From Python, import this module first:

>>> import kvtools.harness, lm_eval                                   # doctest: +SKIP
>>> lm_eval.simple_evaluate(model="kvtools", model_args="config=snapkv", tasks=["arc_easy"])
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kvtools.errors import ConfigError, KVToolsError

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError(
        "kvtools.harness needs lm-evaluation-harness: pip install 'kvtools[lm-eval]'"
    ) from exc

from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

__all__ = ["KVToolsLM"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register_model("kvtools")
class KVToolsLM(TemplateLM):
    """An lm-eval model: ``pretrained`` loaded by :func:`kvtools.load_model`, patched with ``config``.

    ``pretrained``: a kvtools model name (``smollm2-135m``, the default, ``gemma3-270m``), a hub id,
    a local folder or a GGUF file; or pass a loaded ``model`` and ``tokenizer`` instead (the model is
    patched in place until :meth:`close`). ``config``: a preset name, YAML path, dict or
    :class:`~kvtools.KVConfig`. ``max_length``: tokens per request (default: the model's context);
    longer contexts lose their start, as in the harness's own HF model. ``max_gen_toks``: default new
    tokens for generation tasks that do not set it. ``batch_size``: generation requests with the same settings
    run in left-padded batches of this size (``"auto"``: 1); log-likelihood requests run one context at a time.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        config: Any = "full",
        dtype: str | torch.dtype = "float32",
        device: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str | None = 1,
        model: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from kvtools.config import load_config
        from kvtools.models import load_model

        if str(batch_size) in ("auto", "None") or str(batch_size).startswith("auto:"):
            batch_size = 1
        try:
            self.batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}") from None
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
        unknown = set(kwargs) - {"trust_remote_code", "parallelize", "max_batch_size"}  # harness-wide keys it may pass along
        if unknown:
            raise ConfigError(f"kvtools lm-eval model: unknown argument(s) {', '.join(sorted(unknown))}; known: "
                              "pretrained, config, dtype, device, max_length, max_gen_toks, batch_size")
        self.config = load_config(config)  # a bad config fails before any model load
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if model is None:
            model, tokenizer = load_model(pretrained, dtype=dtype, device=device)
        elif tokenizer is None:
            raise ConfigError("KVToolsLM(model=...): pass its tokenizer too")
        self.model, self.tokenizer = model, tokenizer
        import kvtools

        self.patch = kvtools.patch(model, self.config)
        self._max_length = int(max_length or _context_length(model, tokenizer))
        self.max_gen_toks = int(max_gen_toks)
        self._copyable = all(m.supports_reorder for m in self.patch.policy.methods())

    # ------------------------------------------------------------ lm-eval's model interface
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos[0] if isinstance(eos, list) else eos)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def tok_decode(self, tokens: Iterable[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(tokens), **kwargs)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template over lm-eval's messages (``--apply-chat-template``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise KVToolsError("--apply-chat-template: this model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def close(self) -> None:
        """Unpatch the model (it behaves exactly as before)."""
        self.patch.unpatch()

    # ------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(logprob, is_greedy)`` of each continuation; requests sharing a context share its prefill."""
        groups: dict[tuple[int, ...], list[int]] = {}
        parts = []
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise KVToolsError("lm-eval request with an empty continuation: nothing to score")
            # the model sees at most max_length tokens (context minus its start, the continuation minus its last)
            cont = list(continuation)[-self.max_length:]
            room = self.max_length + 1 - len(cont)
            ctx = tuple(list(context)[-room:]) if room > 0 and context else ()
            ctx = ctx or (self.prefix_token_id,)
            parts.append(cont)
            groups.setdefault(ctx, []).append(i)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), desc="kvtools loglikelihood", disable=disable_tqdm)
        for ctx, members in groups.items():
            share = self._copyable and len(members) > 1
            base = self._prefill(list(ctx[:-1])) if share else None
            for i in members:
                cache = copy.deepcopy(base) if share else self._prefill(list(ctx[:-1]))
                out[i] = self._score(cache, ctx[-1], parts[i])
                bar.update(1)
        bar.close()
        return out

    @torch.inference_mode()
    def _prefill(self, tokens: list[int]):
        """A fresh cache holding ``tokens``, fed as one call (so compressed as a prompt)."""
        cache = self.patch.make_cache()
        if tokens:
            ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
            self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                       **self.patch.cache_kwargs(cache))
        return cache

    @torch.inference_mode()
    def _score(self, cache: Any, last: int, continuation: list[int]) -> tuple[float, bool]:
        seen = cache.get_seq_length()
        ids = torch.tensor([[last, *continuation[:-1]]], dtype=torch.long, device=self.device)
        mask = torch.ones(1, seen + ids.shape[1], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=True,
                            **self.patch.cache_kwargs(cache)).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(continuation, device=logp.device)
        total = float(logp.gather(-1, target[:, None]).sum())
        return total, bool((logp.argmax(-1) == target).all())

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts over lm-eval's disjoint windows of ``max_length`` tokens."""
        out = []
        for req in tqdm(requests, desc="kvtools loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = [
                (None, *make_disjoint_window(w))
                for w in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                   self.max_length, context_len=1)
            ]
            out.append(sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
        return out

    # ------------------------------------------------------------ generation
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, generated on a fresh cache and cut at its first stop string; requests
        with the same generation settings run in left-padded batches of ``batch_size``, longest first."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[tuple[int, list[int], list[str], int, dict[str, Any]]]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = handle_stop_sequences(kw.pop("until", None), eos_text)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            key = json.dumps([until, max_new, sorted(kw.items())], default=str)
            groups.setdefault(key, []).append((i, self.tok_encode(context), until, max_new, kw))
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="kvtools generate_until", disable=disable_tqdm)
        for group in groups.values():
            group.sort(key=lambda job: -len(job[1]))
            for s in range(0, len(group), self.batch_size):
                batch = group[s: s + self.batch_size]
                _, _, until, max_new, kw = batch[0]
                for (i, *_), text in zip(batch, self._generate([job[1] for job in batch], until, max_new, dict(kw))):
                    out[i] = text
                bar.update(len(batch))
        bar.close()
        return out

    @torch.inference_mode()
    def _generate(self, contexts: list[list[int]], until: list[str], max_new: int, kw: dict[str, Any]) -> list[str]:
        keep = self.max_length - max_new
        if keep < 1:
            raise KVToolsError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
        rows = [c[-keep:] for c in contexts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        pad = self.eot_token_id if pad is None else pad
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long,
                            device=self.device)
        sample = bool(kw.pop("do_sample", False)) or float(kw.get("temperature", 0.0) or 0.0) > 0.0
        if not sample:
            for key in ("temperature", "top_p", "top_k"):
                kw.pop(key, None)
        stops = [s for s in until if s]
        new = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=sample,
            stopping_criteria=StoppingCriteriaList([_StopStrings(self.tokenizer, stops, width)]),
            pad_token_id=pad, **kw, **self.patch.cache_kwargs(self.patch.make_cache()),
        )[:, width:]
        texts = []
        for row in new:
            text = self.tok_decode(row, skip_special_tokens=True)
            for stop in stops:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


class _StopStrings(StoppingCriteria):
    """Stop once the decoded new text holds a stop string. (transformers' ``stop_strings`` preprocesses
    the whole vocabulary on every ``generate`` call: seconds per request on a 49k-token vocabulary.)"""

    def __init__(self, tokenizer: Any, stops: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        done = [any(s in self.tokenizer.decode(row[self.prompt_len:]) for s in self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _context_length(model: Any, tokenizer: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(getattr(model, "config", None), name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:
        return value
    return 2048
