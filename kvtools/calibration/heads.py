"""Retrieval-head scores without gradients (Wu et al., 2024, "Retrieval Head Mechanistically Explains
Long-Context Factuality"), written as a DuoAttention pattern.

A head copies at a decode step when its most attended visible token (the argmax of its attention)
lies in the needle and is the very token being generated. A head's score on one prompt is the number
of generated needle tokens it copied divided by the number of needle tokens to generate; its score is
the mean over the prompts, a value in [0, 1].

The prompts are the NIAH prompts of :func:`~kvtools.eval.haystack.build_niah_prompt` (built-in
filler, the needle ``The special magic number for {key} is: {value}.`` at evenly spaced depths,
``samples`` per length, seeds of their own, so no prompt of ``kvtools niah`` is among them). The
answer prefix ``The special magic number for {key} is:`` is pre-filled, so the needle tokens to
generate are the rest of the needle, `` {value}.``, taken as the prompt's own tokens of the needle.

Teacher forcing (the default): the answer fed is those needle tokens, whatever the model would have
generated. Where the model answers right (greedy), this is exactly the paper's procedure, since the
generated tokens are the fed ones; where it answers wrong, the paper's score gets little or no signal
from the prompt (its generated tokens are not the needle's), while teacher forcing still measures which
heads point at the right needle token given the right prefix. ``greedy=True`` runs the paper's
procedure as published: the model's own greedy tokens, counted only where they match a needle token
at the head's argmax. :attr:`HeadScores.matched` is the share of prompts whose greedy answer is the
needle's, where the two agree.

Each head's attention comes from one forward pass (no gradients) through the ``full`` patch, with a
hook on the attention that reads the rotated queries of the answer steps and every key: the argmax of
``q . k`` over the causally visible keys (the sliding window of the layer too) is the argmax of the
softmax. A KV head's score is the max over its query heads (``reduce="max"``, the default): the KV
head's cache serves all of them, so it must keep the whole context if any one of them retrieves;
``reduce="mean"`` is the alternative.

    kvtools calibrate heads --model smollm2-135m --out configs/duo/smollm2-135m-heads.tsv --lengths 1k,2k --samples 8

The TSV (rows = layers, columns = KV heads) is what ``cache: {method: duo, pattern: ...}`` loads;
binarise it with ``sparsity`` (the scores are not gate values: the paper calls a head a retrieval head
above 0.1, not 0.5, and many heads score 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import ConfigError

__all__ = ["HeadScores", "NeedleSample", "copy_hits", "kv_head_scores", "needle_sample", "retrieval_head_scores"]

Reduce = Literal["max", "mean"]


@dataclass(frozen=True)
class NeedleSample:
    """One NIAH prompt with the token positions the score needs."""

    prompt: list[int]  # the prompt's tokens (answer prefix pre-filled)
    answer: list[int]  # the needle tokens to generate: the prompt's own tokens of the needle after the prefix
    needle: tuple[int, int]  # [start, end) token positions of the whole needle sentence in the prompt
    length: int
    depth: float


def needle_sample(tokenizer: Any, length: int, depth: float, seed: int | str, max_context: int | None = None
                  ) -> NeedleSample:
    """The NIAH prompt of ``build_niah_prompt(tokenizer, length, depth, seed)`` and its needle's tokens,
    located by the tokenizer's character offsets (a fast tokenizer is needed)."""
    from ..eval.haystack import build_niah_prompt

    p = build_niah_prompt(tokenizer, length, depth, seed, max_context=max_context)
    try:
        enc = tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    except (NotImplementedError, KeyError, TypeError, ValueError):
        ids, offsets = [], []
    shift = len(p.input_ids) - len(ids)  # special tokens the prompt adds in front (BOS)
    if not ids or shift < 0 or p.input_ids[shift:] != ids:
        raise ConfigError(
            f"calibrate heads: the tokenizer ({type(tokenizer).__name__}) gives no character offsets that "
            "match its tokens; a fast tokenizer is needed to locate the needle"
        )
    n0 = p.text.index(p.needle)
    n1 = n0 + len(p.needle)
    a0 = n0 + len(p.answer_prefix) if p.needle.startswith(p.answer_prefix) else n0 + p.needle.index(p.value)
    v0 = n0 + p.needle.index(p.value)
    v1 = v0 + len(p.value)
    needle = [i for i, (s, e) in enumerate(offsets) if e > s and s < n1 and e > n0]
    answer = [i for i, (s, e) in enumerate(offsets)
              if e > s and ((s >= a0 and e <= n1) or (s < v1 and e > v0))]
    if not answer or answer != list(range(answer[0], answer[-1] + 1)):
        raise ConfigError(f"calibrate heads: cannot locate the needle's value tokens in the prompt (seed {seed})")
    return NeedleSample(
        prompt=list(p.input_ids), answer=[ids[i] for i in answer], needle=(needle[0] + shift, needle[-1] + 1 + shift),
        length=length, depth=float(depth),
    )


def copy_hits(
    q: torch.Tensor,
    k: torch.Tensor,
    ids: torch.Tensor,
    steps: torch.Tensor,
    tokens: torch.Tensor,
    needle: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Which query head copies at which step: [H, T] bool.

    Args:
        q: the rotated queries of the steps, [H, T, D] (H a multiple of the KV heads).
        k: the rotated keys of the whole sequence, [Hk, L, D].
        ids: the sequence's tokens, [L].
        steps: the position of each step's query (the token before the generated one), [T].
        tokens: the token generated at each step, [T].
        needle: [L] bool, the needle's positions.
        sliding_window: key j is visible to the query at i only if ``i - j < sliding_window``.

    Head h copies at step t when the visible key it attends to most (the first one on a tie) is
    in the needle and holds ``tokens[t]``.
    """
    h, t, d = q.shape
    hk, n = k.shape[0], k.shape[1]
    g = h // hk
    logits = torch.einsum("kgtd,kld->kgtl", q.reshape(hk, g, t, d).float(), k.float()).reshape(h, t, n)
    j = torch.arange(n, device=k.device)
    visible = j[None, :] <= steps[:, None]
    if sliding_window is not None:
        visible &= steps[:, None] - j[None, :] < sliding_window
    top = logits.masked_fill(~visible, float("-inf")).argmax(-1)  # [H, T]
    return needle[top] & (ids[top] == tokens[None, :])


def kv_head_scores(query: torch.Tensor, num_kv_heads: int, reduce: Reduce = "max") -> torch.Tensor:
    """Per-query-head scores [layers, H] -> per-KV-head scores [layers, Hk]: ``max`` or ``mean`` over each
    KV head's query heads (query head h belongs to KV head ``h // (H / Hk)``)."""
    if reduce not in ("max", "mean"):
        raise ConfigError(f"reduce: must be 'max' or 'mean', got {reduce!r}")
    layers, h = query.shape
    grouped = query.reshape(layers, num_kv_heads, h // num_kv_heads)
    return grouped.amax(-1) if reduce == "max" else grouped.mean(-1)


@torch.no_grad()
def _layer_hits(model: Any, ids: list[int], steps: list[int], tokens: list[int], needle: tuple[int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense pass over ``ids``: (copy hits [layers, H, T], the model's greedy token at each step [T])."""
    from ..patching import patch

    dev = model.device
    x = torch.tensor([ids], device=dev)
    st = torch.tensor(steps, device=dev)
    tok = torch.tensor(tokens, device=dev)
    in_needle = torch.zeros(len(ids), dtype=torch.bool, device=dev)
    in_needle[needle[0]:needle[1]] = True
    hits: dict[int, torch.Tensor] = {}
    with patch(model, "full") as p:
        orig = p.policy.attend

        def attend(layer, q, k, v, step, info):
            if q.shape[2] != len(ids) or k.shape[2] != len(ids):
                raise RuntimeError("calibrate heads: expected one dense pass over the whole sequence")
            hits[info.layer_idx] = copy_hits(q[0][:, st], k[0], x[0], st, tok, in_needle, info.sliding_window).cpu()
            return orig(layer, q, k, v, step, info)

        p.policy.attend = attend
        logits = model(input_ids=x, logits_to_keep=len(steps), **p.cache_kwargs(p.make_cache())).logits
    return torch.stack([hits[i] for i in sorted(hits)]), logits[0].argmax(-1).cpu()


@torch.no_grad()
def _greedy(model: Any, tokenizer: Any, prompt: list[int], n: int) -> list[int]:
    """The model's (unpatched) greedy continuation of ``prompt``, exactly ``n`` tokens."""
    from transformers import GenerationConfig

    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    x = torch.tensor([prompt], device=model.device)
    cfg = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg)
    return out[0, len(prompt):].tolist()


@dataclass
class HeadScores:
    """What :func:`retrieval_head_scores` measured."""

    query: torch.Tensor  # [layers, H] retrieval score of every query head, in [0, 1]
    kv: torch.Tensor  # [layers, Hk] per KV head (``reduce`` over its query heads): the pattern
    prompts: int
    matched: float  # share of prompts whose greedy answer is the needle's (teacher forcing = greedy there)
    greedy: bool
    reduce: str


def retrieval_head_scores(
    model: Any,
    tokenizer: Any,
    lengths: tuple[int, ...] = (1024, 2048),
    samples: int = 8,
    seed: int = 0,
    greedy: bool = False,
    reduce: Reduce = "max",
    quiet: bool = False,
) -> HeadScores:
    """Score every head on ``samples`` NIAH prompts per length (depths evenly spaced over 0..100%).

    Every prompt is built (and a too short or too long length refused) before the first forward pass.
    ``greedy``: count the model's own greedy tokens instead of teacher-forcing the needle's.
    """
    from tqdm.auto import tqdm

    from ..families import adapter_for

    if samples < 1:
        raise ConfigError(f"samples: must be >= 1, got {samples}")
    if reduce not in ("max", "mean"):
        raise ConfigError(f"reduce: must be 'max' or 'mean', got {reduce!r}")
    kv_heads = int(model.config.num_key_value_heads)
    adapter_for(model)  # an unsupported family fails before any prompt is built
    context = getattr(model.config, "max_position_embeddings", None)
    depths = [100.0 * i / (samples - 1) if samples > 1 else 50.0 for i in range(samples)]
    prompts = [needle_sample(tokenizer, n, d, f"retrieval-heads:{seed}:{n}:{i}", context)
               for n in lengths for i, d in enumerate(depths)]
    total: torch.Tensor | None = None
    matched = 0
    for smp in tqdm(prompts, disable=quiet, desc="calibrate heads", unit="prompt"):
        t = len(smp.answer)
        tokens = _greedy(model, tokenizer, smp.prompt, t) if greedy else smp.answer
        steps = list(range(len(smp.prompt) - 1, len(smp.prompt) - 1 + t))
        hits, predicted = _layer_hits(model, smp.prompt + tokens[:-1], steps, tokens, smp.needle)
        score = hits.sum(-1).float() / t  # [layers, H]
        total = score if total is None else total + score
        matched += int(predicted.tolist() == smp.answer) if not greedy else int(tokens == smp.answer)
    assert total is not None
    query = total / len(prompts)
    return HeadScores(query=query, kv=kv_head_scores(query, kv_heads, reduce), prompts=len(prompts),
                      matched=matched / len(prompts), greedy=greedy, reduce=reduce)
