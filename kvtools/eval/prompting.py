"""Prompt building shared by the suites.

- :func:`render_prompt`: the chat template (when the tokenizer has one) around a user message,
  with the start of the answer pre-filled, or plain text; returns the text and its tokens.
- :func:`check_length`: the target length, generation budget and model context of a sample.
- :func:`fit_units`: the largest haystack (sentences, lines, words...) whose prompt fits a
  token budget, searched on the real token count; the synthetic tasks (NIAH, RULER,
  passkey, InfiniteBench) all size their haystack with it.
- :func:`fit_context`: a document prompt (LongBench, InfiniteBench) whose context loses its
  middle until the prompt fits.
- :func:`question_split`: where a prompt's context part ends and its question begins, in tokens, for a
  question-agnostic run (the context fed and compressed as its own call before the question is seen).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kvtools.errors import ConfigError, InputTooLongError

__all__ = [
    "LongPrompt",
    "Rendered",
    "after_context",
    "check_length",
    "fit_context",
    "fit_units",
    "has_chat_template",
    "question_split",
    "render_prompt",
    "truncate_middle",
]

#: what a haystack renderer returns: ``(text, input_ids, *details)``
Rendered = tuple


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer can apply a chat template."""
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def render_prompt(
    tokenizer: Any, user: str, answer_prefix: str = "", sep: str = "\n", *, chat: bool | None = None
) -> tuple[str, list[int]]:
    """Prompt text and tokens for one user message.

    With ``chat`` (default: when the tokenizer has a template) the chat template wraps ``user``
    and ``answer_prefix`` is pre-filled in the assistant turn; the text already holds its special
    tokens. Otherwise the text is ``user + sep + answer_prefix`` (``user`` alone without a
    prefix), tokenized with the tokenizer's special tokens (BOS).
    """
    if chat is None:
        chat = has_chat_template(tokenizer)
    if chat:
        messages = [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = f"{text}{answer_prefix}"
    else:
        text = f"{user}{sep}{answer_prefix}" if answer_prefix else user
    return text, list(tokenizer.encode(text, add_special_tokens=not chat))


def question_split(tokenizer: Any, text: str, ids: list[int], question: str, *, chat: bool) -> int | None:
    """How many leading tokens of ``ids`` (the tokens of ``text``, from :func:`render_prompt`) form the context
    part of the prompt: everything before the last occurrence of ``question`` in ``text``, less the whitespace
    before it (the chat template's beginning included). The rest (the question, the template's end and the
    answer prefix) is the second call of a question-agnostic run.

    The context text is tokenized alone (BOS as ``render_prompt`` adds it). When its tokens are a prefix of
    ``ids`` (the usual case: the cut falls between a word or punctuation mark and the whitespace before the
    question) that is the split, so each part holds exactly the tokens of its own text; otherwise (a tokenizer that
    merges across the cut) the split is their common prefix, the last context token going with the question.
    Either way ``ids[:n] + ids[n:] == ids``. ``None`` when ``question`` is not in ``text``, either part would be
    empty, or the context's own tokens differ from the prompt's by more than two at the cut: that prompt cannot
    run question-agnostic (the runner refuses it), a question-aware run does not need the split.

    >>> text, ids = render_prompt(tok, "Some document.\n\nWhat is it?", "It is")  # doctest: +SKIP
    >>> n = question_split(tok, text, ids, "What is it?", chat=True)  # doctest: +SKIP
    >>> tok.decode(ids[n:])  # doctest: +SKIP
    '\n\nWhat is it?<|im_end|>\n<|im_start|>assistant\nIt is'
    """
    question = question.strip()
    at = text.rfind(question) if question else -1
    if at < 0:
        return None
    head = list(tokenizer.encode(text[: len(text[:at].rstrip())], add_special_tokens=not chat))
    n = 0
    for a, b in zip(head, ids):
        if a != b:
            break
        n += 1
    if not 0 < n < len(ids) or n < len(head) - 2:  # a tokenizer may merge a token or two across the cut, no more
        return None
    return n


def after_context(user: Callable[[str], str], context: str) -> str:
    """What the user message ``user(context)`` holds after ``context`` (the question, for a template that puts
    it after the document): its text from where it first differs from ``user(context + "\\x00")``."""
    whole, longer = user(context), user(context + "\x00")
    end = next((i for i, (a, b) in enumerate(zip(whole, longer)) if a != b), len(whole))
    return whole[end:]


def check_length(length: Any, max_new_tokens: Any, max_context: int | None = None) -> None:
    """A sample's target ``length`` (prompt + generated tokens) and ``max_new_tokens`` are whole
    numbers >= 1 (:class:`ConfigError` otherwise), and ``length`` is within the model's
    ``max_context`` when given (:class:`InputTooLongError` otherwise)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"length: must be a positive number of tokens, got {length!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be a whole number >= 1, got {max_new_tokens!r}")
    if max_context is not None and length > max_context:
        raise InputTooLongError(
            f"length {length} exceeds the model's context of {max_context} tokens; use lengths <= {max_context}"
        )


def fit_units(
    render: Callable[[int], Rendered],
    length: int,
    max_new_tokens: int,
    *,
    what: str,
    smallest: str = "the smallest sample takes",
    n_min: int = 0,
    estimate: Callable[[int], int] | None = None,
) -> tuple[int, Rendered]:
    """The largest haystack size ``n >= n_min`` whose prompt ``render(n)`` (``(text, ids, ...)``)
    has at most ``length - max_new_tokens`` tokens, and that rendering.

    The token count must not decrease with ``n``. The search starts from ``estimate(tokens at
    n_min)`` when given (a caller that can count its units cheaply), else from secant steps on
    the real token count (it grows almost linearly in ``n``), then gallops to bracket the answer
    and bisects. Each size is rendered once. When even ``n_min`` does not fit, raises
    :class:`InputTooLongError`: ``"{what}: length L is too short: {smallest} T prompt tokens ..."``.
    """
    limit = length - max_new_tokens
    tried: dict[int, Rendered] = {}

    def size(n: int) -> int:
        if n not in tried:
            tried[n] = render(n)
        return len(tried[n][1])

    least = size(n_min)
    if least > limit:
        raise InputTooLongError(
            f"{what}: length {length} is too short: {smallest} {least} prompt tokens plus {max_new_tokens} "
            f"new tokens; use a length of at least {least + max_new_tokens}"
        )
    cap = n_min + 4 * max(limit, 1) + 16  # every unit adds at least a token or so
    guess = estimate(least) if estimate is not None else _secant_guess(size, limit, n_min, cap)
    n = _largest_fitting(lambda k: size(k) <= limit, min(max(guess, n_min), cap), n_min, cap)
    return n, tried[n]


def _secant_guess(size: Callable[[int], int], limit: int, n_min: int, cap: int) -> int:
    """Where ``size`` reaches ``limit``: a few secant steps from ``n_min`` and a first probe above it."""
    a, b = n_min, min(n_min + max(16, n_min), cap)
    for _ in range(6):
        fa, fb = size(a), size(b)
        if fb == fa:
            break
        guess = min(max(b + math.floor((limit - fb) * (b - a) / (fb - fa)), n_min), cap)
        if guess == b:
            break
        a, b = b, guess
    return b


def _largest_fitting(fits: Callable[[int], bool], estimate: int, floor: int, cap: int) -> int:
    """The largest ``n`` in ``[floor, cap)`` with ``fits(n)`` (``fits`` monotone, ``fits(floor)`` true):
    gallop from ``estimate`` to bracket the answer, then bisect."""
    step = 1
    if fits(estimate):
        lo = estimate
        while lo + step < cap and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(lo + step, cap)
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


# ---------------------------------------------------------------- document prompts
def _join(head: str, tail: str) -> str:
    # keep two ASCII words from fusing into one at the cut (decoders may drop the boundary space)
    if head and tail and head[-1].isascii() and head[-1].isalnum() and tail[0].isascii() and tail[0].isalnum():
        return f"{head} {tail}"
    return head + tail


def truncate_middle(text: str, tokenizer: Any, max_tokens: int) -> str:
    """Cut the middle out of ``text`` so that it holds at most about ``max_tokens`` tokens.

    The text is tokenized without special tokens; when it is longer than ``max_tokens``
    the first ``ceil(max_tokens / 2)`` and the last ``floor(max_tokens / 2)`` tokens are
    decoded and joined. Re-tokenizing the result can differ by a token or two at the cut;
    :func:`fit_context` corrects for that.

    >>> truncate_middle(long_text, tok, 1000)  # doctest: +SKIP
    """
    if max_tokens < 0:
        raise ConfigError(f"max_tokens: must be >= 0, got {max_tokens}")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) <= max_tokens:
        return text
    n_tail = max_tokens // 2
    n_head = max_tokens - n_tail
    head = tokenizer.decode(ids[:n_head], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - n_tail :], skip_special_tokens=True) if n_tail else ""
    return _join(head, tail)


@dataclass(frozen=True)
class LongPrompt:
    """A prompt ready for generation.

    ``text`` is the whole model input (chat template applied when ``chat``) and
    ``input_ids`` its tokens (:func:`render_prompt`); ``len(input_ids) <= max_input_tokens``
    of the call that built it.
    """

    task: str
    text: str
    input_ids: list[int]
    max_new_tokens: int
    chat: bool
    truncated: bool  # the middle of the context was cut
    n_original: int  # tokens the prompt would have had without truncation
    context_tokens: int | None = None  # tokens before the question (:func:`question_split`)

    @property
    def n_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.input_ids)


def fit_context(
    tokenizer: Any,
    task: str,
    example: Mapping[str, Any],
    format_prompt: Callable[[str, Mapping[str, Any]], str],
    max_input_tokens: int,
    max_new_tokens: int,
    *,
    chat: bool,
    answer_prefix: str = "",
) -> LongPrompt:
    """The prompt ``format_prompt(task, example)``, cutting the middle of ``example["context"]`` until
    it has at most ``max_input_tokens`` tokens.

    Everything but the context (instructions, question, options, chat template) is kept
    whole; the context keeps its head and tail halves (:func:`truncate_middle`), with the
    budget corrected until the whole prompt fits. ``context_tokens`` ends the prompt's tokens at
    the end of the context (:func:`question_split`; the template puts the question after it).
    Raises :class:`InputTooLongError` when the prompt does not fit even with an empty context.
    """
    if max_input_tokens < 1:
        raise ConfigError(f"max_input_tokens: must be >= 1, got {max_input_tokens}")
    context = str(example.get("context") or "")

    def user(ctx: str) -> str:
        return format_prompt(task, {**example, "context": ctx})

    def render(ctx: str) -> tuple[str, list[int]]:
        return render_prompt(tokenizer, user(ctx), answer_prefix, chat=chat)

    def prompt(ctx: str, text: str, ids: list[int], truncated: bool) -> LongPrompt:
        split = question_split(tokenizer, text, ids, after_context(user, ctx), chat=chat)
        return LongPrompt(task, text, ids, max_new_tokens, chat, truncated, n_original, split)

    text, ids = render(context)
    n_original = len(ids)
    if n_original <= max_input_tokens:
        return prompt(context, text, ids, False)
    overhead = len(render("")[1])
    budget = max_input_tokens - overhead
    for _ in range(16):
        if budget < 0:
            break
        cut = truncate_middle(context, tokenizer, budget)
        text, ids = render(cut)
        if len(ids) <= max_input_tokens:
            return prompt(cut, text, ids, True)
        budget -= len(ids) - max_input_tokens
    raise InputTooLongError(
        f"max_input_tokens {max_input_tokens}: the prompt without its context already takes {overhead} tokens "
        f"(instructions, question, template); use a larger budget"
    )
