"""Prompt rendering shared by the suites: chat template (when the tokenizer has one) + pre-filled answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can apply a chat template."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def render_prompt(tokenizer: Any, user: str, answer_prefix: str, sep: str = "\n") -> tuple[str, list[int]]:
    """Prompt text and tokens: the chat template around ``user`` with ``answer_prefix`` pre-filled
    in the assistant turn, or plain ``user + sep + answer_prefix`` when there is no template."""
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = f"{text}{answer_prefix}"
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        text = f"{user}{sep}{answer_prefix}"
        ids = tokenizer.encode(text, add_special_tokens=True)
    return text, list(ids)


def largest_fitting(fits: Callable[[int], bool], estimate: int, floor: int = 0) -> int:
    """The largest ``n >= floor`` with ``fits(n)`` (``fits`` monotone, ``fits(floor)`` true):
    gallop from ``estimate`` to bracket the answer, then bisect."""
    step = 1
    if fits(estimate):
        lo = estimate
        while fits(lo + step):
            lo, step = lo + step, step * 2
        hi = lo + step
    else:
        hi = estimate
        while hi - step > floor and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(hi - step, floor)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
