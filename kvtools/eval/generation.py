"""One timed greedy generation through a patched model: what every generated eval sample runs, in one call
(question-aware: the cache policy compresses the prompt having seen the question) or two (question-agnostic:
the context first, compressed at the end of its own call, then the question)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from ..bench.timing import sync

__all__ = ["GenerateFn", "Generation", "PatchFn", "generate_greedy"]


@dataclass(frozen=True)
class Generation:
    """What one greedy generation produced and cost."""

    text: str  # decoded new tokens
    kv_bytes: int  # bytes held by the KV cache after generation
    prefill_s: float
    decode_s: float
    new_tokens: int = 0


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
                    split: int | None = None) -> Generation:
    """Greedy ``model.generate`` on ``prompt.input_ids`` with a fresh ``patch.make_cache()``; times prefill
    (up to the first new token's logits) and decode.

    ``split=n`` (question-agnostic): ``input_ids[:n]`` (the context) is fed first as its own call on the
    cache, so the policy compresses it at the end of that call without seeing the rest; ``generate`` then
    feeds the rest (the question and the generation prompt) as a second call on the same cache and decodes.
    The model sees the same tokens at the same positions as in one call.

    >>> with kvtools.patch(model, "snapkv") as p:  # doctest: +SKIP
    ...     gen = generate_greedy(model, tok, p, build_niah_prompt(tok, 1024, 50), 16)
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    device = model.device
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    if split is not None and not 0 < split < ids.shape[1]:
        raise ValueError(f"split: must leave tokens on both sides of the {ids.shape[1]}-token prompt, got {split}")
    cache = patch.make_cache()
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
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
