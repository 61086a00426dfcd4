"""One timed greedy generation through a patched model: what every generated eval sample runs, in one call
(question-aware: the cache policy compresses the prompt having seen the question) or two (question-agnostic:
the context first, compressed at the end of its own call, then the question).

A sweep runs many cache methods on one prompt, and most of them prefill exactly as ``full`` does (dense
attention over the whole prompt; they only choose what to keep afterwards). :func:`dense_prefill` runs that
prefill once and keeps every layer's rotated q, k, v and attention output; ``generate_greedy(...,
prefill=shared)`` then replays them into a method's cache through its own ``attend`` (so its selection, its
deferred cross-layer work and its storage are its own) and decodes from there. Each replayed layer's dense
attention call, when its inputs equal the kept one's bit for bit, gets the kept output back
(:class:`~kvtools.attention.dense.AttendMemo`) instead of attending again. Methods that store keys and values
quantised replay a prefill made with the same storage (``dense_prefill(..., quant=)``), since the prefill
attends the codes. A method whose prefill output differs from the dense one at any layer, bit for bit, is
refused (:class:`PrefillMismatch`): equal outputs at
every layer, given equal inputs, mean the method's own prefill would have computed the same hidden states, the
same cache and the same first token."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

from ..attention.dense import AttendMemo, attend_memo
from ..bench.timing import sync

__all__ = ["DensePrefill", "GenerateFn", "Generation", "PatchFn", "PrefillMismatch", "dense_prefill",
           "generate_greedy", "replay_prefill", "replayable"]


@dataclass(frozen=True)
class Generation:
    """What one greedy generation produced and cost."""

    text: str  # decoded new tokens
    kv_bytes: int  # bytes held by the KV cache after generation
    prefill_s: float
    decode_s: float
    new_tokens: int = 0
    #: "own": the method prefilled the prompt itself; "shared": a :func:`dense_prefill` was replayed into its
    #: cache (``prefill_s`` is then that prefill's time + the replay's)
    prefill: str = "own"


class PrefillMismatch(Exception):
    """A method's prefill does not attend exactly as the dense one: it cannot reuse a :class:`DensePrefill`."""


@dataclass
class DensePrefill:
    """One dense (``full``) prefill of a prompt: each layer's (info, q, k, v, output), the call's step, the last
    position's logits and the seconds it took."""

    ids: Any  # [1, n] the prompt
    step: Any  # kvtools.cache.Step of the call
    layers: list[tuple[Any, Any, Any, Any, Any]]
    logits: Any  # [vocab] at the prompt's last position
    seconds: float
    #: each layer's dense attention call: a replayed layer whose table and queries are equal to it gets its
    #: output back instead of attending again
    memo: AttendMemo


def replayable(config: Any) -> bool:
    """Whether a method may reuse a :class:`DensePrefill` at all: a one-shot dense prefill stage (replay the one
    made with its ``quant`` storage: quantised tables change what the prefill attends). Whether its attention
    really is that prefill's is checked layer by layer on replay."""
    prefill = config.prefill
    return prefill.method == "dense" and not getattr(prefill, "chunk", None)


#: generation settings ``generate`` takes from the model's own ``generation_config`` when the eval's config leaves
#: them unset, and the values under which its first greedy token is the argmax of the prefill's logits: no
#: penalties, bans, forced or minimum lengths, beams, guidance, watermarks, contrastive search, chunked prefill
_ARGMAX_SETTINGS: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "forced_decoder_ids": (None,), "min_length": (None, 0),
    "min_new_tokens": (None, 0), "exponential_decay_length_penalty": (None,), "num_beams": (None, 1),
    "num_beam_groups": (None, 1), "penalty_alpha": (None, 0, 0.0), "guidance_scale": (None, 1, 1.0),
    "watermarking_config": (None,), "prefill_chunk_size": (None,), "remove_invalid_values": (None, False),
    "dola_layers": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,),
}


def greedy_is_argmax(model: Any) -> bool:
    """The model's own generation defaults (which ``generate`` fills unset settings from) leave greedy
    decoding an argmax of the logits, so the first new token of a shared prefill is its logits' argmax, as
    ``generate`` picks it (see ``_ARGMAX_SETTINGS``)."""
    gc = getattr(model, "generation_config", None)
    return gc is None or all(getattr(gc, k, None) in ok for k, ok in _ARGMAX_SETTINGS.items())


def dense_prefill(model: Any, prompt: Any, quant: Any = None) -> DensePrefill:
    """Prefill ``prompt.input_ids`` once under ``full`` (with keys and values stored as ``quant`` says, a
    :class:`~kvtools.quant.QuantParams` or None), keeping what :func:`generate_greedy` replays."""
    import torch

    from ..patching import patch

    device = model.device
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    layers: list[tuple[Any, ...]] = []
    steps: list[Any] = []
    memo = AttendMemo(record=True)
    base = "full" if quant is None else {"name": "full", "quant": quant.model_dump()}
    with patch(model, base) as p:
        orig = p.policy.attend

        def attend(layer, q, k, v, step, info):
            with memo.at(info.layer_idx):
                out = orig(layer, q, k, v, step, info)
            layers.append((info, q, k, v, out))
            steps.append(step)
            return out

        p.policy.attend = attend
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), attend_memo(memo):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
                        **p.cache_kwargs(p.make_cache()))
        sync(device)
        seconds = time.perf_counter() - start
    if len({id(s) for s in steps}) != 1:  # one call, one step: a model split over devices has a copy per device
        raise PrefillMismatch("the dense prefill ran in more than one step (a model over several devices)")
    memo.record = False
    return DensePrefill(ids, steps[0], layers, out.logits[0, -1].float(), seconds, memo)


def replay_prefill(patch: Any, cache: Any, shared: DensePrefill) -> None:
    """Feed ``shared``'s layers to ``patch``'s policy on ``cache`` as the patched model forward would (the
    step, every layer in order, the deferred cross-layer work); :class:`PrefillMismatch` at the first layer whose
    output differs from the dense one."""
    import torch

    cache = patch._ensure_cache(cache)  # as the model forward takes it: this patch's storage and owner
    step = replace(shared.step, deferred=[])
    cache.step = step
    memo = shared.memo
    try:
        with attend_memo(memo):
            for info, q, k, v, out in shared.layers:  # copies: a policy may keep or write its inputs in place
                with memo.at(info.layer_idx):
                    got = patch.policy.attend(cache.layer(info.layer_idx), q.clone(), k.clone(), v.clone(), step,
                                              info)
                if not torch.equal(got, out):
                    raise PrefillMismatch(f"layer {info.layer_idx}: '{patch.config.name}' does not prefill densely")
        for task in step.deferred:
            task()
        cache.seen += int(shared.ids.shape[1])
    finally:
        cache.step = None


#: ``generate_fn(model, tokenizer, patch, prompt, max_new_tokens) -> Generation``; ``prompt`` is the suite's
#: prompt object (``NiahPrompt``, ``RulerSample``, ...), which has ``input_ids``. A question-agnostic run also
#: passes ``split=n`` (the prompt's ``context_tokens``), as :func:`generate_greedy` takes it
GenerateFn = Callable[[Any, Any, Any, Any, int], Generation]
#: ``patch_fn(model, config)`` -> context manager yielding a handle with ``make_cache()`` (:func:`kvtools.patch`)
PatchFn = Callable[[Any, Any], AbstractContextManager[Any]]


class _FirstTokenTimer:
    """Logits processor that records when the first logits (end of prefill) arrive."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            sync(self.device)
            self.first = time.perf_counter()
        return scores


def generate_greedy(model: Any, tokenizer: Any, patch: Any, prompt: Any, max_new_tokens: int, *,
                    split: int | None = None, prefill: DensePrefill | None = None) -> Generation:
    """Greedy ``model.generate`` on ``prompt.input_ids`` with a fresh ``patch.make_cache()``; times prefill
    (up to the first new token's logits) and decode.

    ``split=n`` (question-agnostic): ``input_ids[:n]`` (the context) is fed first as its own call on the
    cache, so the policy compresses it at the end of that call without seeing the rest; ``generate`` then
    feeds the rest (the question and the generation prompt) as a second call on the same cache and decodes.
    The model sees the same tokens at the same positions as in one call.

    ``prefill=`` a :func:`dense_prefill` of the same prompt: replayed into the cache instead of prefilling
    (see the module docstring); :class:`PrefillMismatch` when the method does not prefill densely.

    >>> with kvtools.patch(model, "snapkv") as p:  # doctest: +SKIP
    ...     gen = generate_greedy(model, tok, p, build_niah_prompt(tok, 1024, 50), 16)
    """
    import torch
    from transformers import LogitsProcessorList

    device = model.device
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    if split is not None and not 0 < split < ids.shape[1]:
        raise ValueError(f"split: must leave tokens on both sides of the {ids.shape[1]}-token prompt, got {split}")
    cache = patch.make_cache()
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    if prefill is not None:
        if split is not None:
            raise ValueError("split: a question-agnostic prompt is fed in two calls; a shared prefill is one")
        if prefill.ids.shape != ids.shape or not bool((prefill.ids == ids).all()):
            raise ValueError("prefill: a dense prefill of another prompt")
        return _generate_shared(model, tokenizer, patch, prefill, cache, max_new_tokens, eos, pad)
    config = _greedy_config(max_new_tokens, eos, pad)
    timer = _FirstTokenTimer(device)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        if split is not None:  # the context alone: compressed at the end of this call
            context = ids[:, :split]
            model(input_ids=context, attention_mask=torch.ones_like(context), use_cache=True, logits_to_keep=1,
                  **patch.cache_kwargs(cache))
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            logits_processor=LogitsProcessorList([timer]),
            **patch.cache_kwargs(cache),
        )
    sync(device)
    end = time.perf_counter()
    new = out[0, ids.shape[1] :]
    first = timer.first if timer.first is not None else end
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        kv_bytes=int(cache.nbytes()),
        prefill_s=first - start,
        decode_s=end - first,
        new_tokens=int(new.numel()),
    )


def _greedy_config(max_new_tokens: int, eos: Any, pad: Any) -> Any:
    """The GenerationConfig of an eval's greedy decoding."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)


def _generate_shared(model: Any, tokenizer: Any, patch: Any, shared: DensePrefill, cache: Any, max_new_tokens: int,
                     eos: Any, pad: Any) -> Generation:
    """:func:`generate_greedy` from a replayed :class:`DensePrefill`: its logits give the first token, then
    ``generate`` decodes the rest on the method's cache (its first call feeds that token alone)."""
    import torch

    if not greedy_is_argmax(model):
        raise PrefillMismatch("the model's generation defaults change greedy decoding; prefill each method")
    device = model.device
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        replay_prefill(patch, cache, shared)
    sync(device)
    first = time.perf_counter()
    n = int(shared.ids.shape[1])
    new = [int(shared.logits.argmax())]
    stops = set(eos if isinstance(eos, list | tuple) else [eos]) - {None}
    if max_new_tokens > 1 and new[0] not in stops:
        ids = torch.cat([shared.ids, shared.ids.new_tensor([[new[0]]])], dim=1)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 generation_config=_greedy_config(max_new_tokens - 1, eos, pad),
                                 **patch.cache_kwargs(cache))
        new += out[0, n + 1:].tolist()
    sync(device)
    end = time.perf_counter()
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        kv_bytes=int(cache.nbytes()),
        prefill_s=shared.seconds + first - start,
        decode_s=end - first,
        new_tokens=len(new),
        prefill="shared",
    )
