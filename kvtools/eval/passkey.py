"""Passkey retrieval, the classic long-context test (Mohtashami & Jaggi, 2023).

The prompt is a task description, filler, the passkey line ``The pass key is N.
Remember it. N is the pass key.`` at a depth fraction of the filler, more filler, and
``What is the pass key? The pass key is``. With a chat template the question ends the
user turn and ``The pass key is`` is pre-filled in the assistant turn (as in
:mod:`kvtools.eval.haystack`); without one the prompt ends exactly like the original.

The filler is the varied, seeded sentence generator of :mod:`kvtools.eval.haystack`
by default (a repeated line makes retrieval artificially easy); ``filler="classic"``
cycles the original "The grass is green. The sky is blue. ..." sentences. The number of
filler sentences is fitted with the tokenizer so that
``n_tokens + max_new_tokens <= length``.

Score: 1 if the first integer in the output equals the passkey, else 0.

>>> sample = make_passkey(tokenizer, 4096, depth=0.5, seed=1)  # doctest: +SKIP
>>> score(sample, " 48213. Remember it.")  # doctest: +SKIP
1.0
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from kvtools.errors import ConfigError

from .haystack import LazyStream, iter_filler
from .prompting import Rendered, check_length, fit_units, has_chat_template, question_split, render_prompt

__all__ = [
    "ANSWER_PREFIX",
    "CLASSIC_FILLER",
    "PASSKEY_LINE",
    "QUESTION",
    "TASK_DESCRIPTION",
    "PasskeySample",
    "first_integer",
    "make_passkey",
    "score",
    "score_passkey",
]

TASK_DESCRIPTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_LINE = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"
#: The original filler, cycled sentence by sentence with ``filler="classic"``.
CLASSIC_FILLER: tuple[str, ...] = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)


@dataclass(frozen=True)
class PasskeySample:
    """One passkey prompt, already tokenized.

    ``text`` is the whole model input (chat template and pre-filled answer prefix included)
    and ``input_ids`` its tokens; ``n_tokens + max_new_tokens <= length``. ``depth`` is the
    requested fraction of the filler before the passkey line, ``depth_actual`` the achieved one
    (whole sentences); ``references == [str(passkey)]``. ``context_tokens``: how many tokens come
    before the question (:func:`~kvtools.eval.prompting.question_split`), ``None`` if they cannot be split.
    """

    length: int
    depth: float
    seed: int | str
    input_ids: list[int]
    text: str
    passkey: int
    references: list[str]
    answer_prefix: str
    n_tokens: int
    max_new_tokens: int
    depth_actual: float
    n_sentences: int
    task: str = "passkey"
    metric: str = "first_integer"
    meta: dict[str, Any] = field(default_factory=dict)
    context_tokens: int | None = None


def first_integer(text: str) -> int | None:
    """The first run of digits in ``text`` as an int, or ``None``.

    >>> first_integer(" 48213. Remember it."), first_integer("no digits")
    (48213, None)
    """
    match = re.search(r"\d+", text)
    return int(match.group()) if match else None


def score_passkey(output: str, passkey: int | str) -> float:
    """1.0 if the first integer in ``output`` equals ``passkey``, else 0.0.

    >>> score_passkey(" 48213.", 48213), score_passkey(" 4821 or 48213", 48213)
    (1.0, 0.0)
    """
    return 1.0 if first_integer(output) == int(passkey) else 0.0


def score(sample: PasskeySample, output: str) -> float:
    """Score one generated ``output`` (the text after the answer prefix) against ``sample``."""
    return score_passkey(output, sample.passkey)


def make_passkey(
    tokenizer: Any,
    length: int,
    depth: float,
    seed: int | str = 0,
    max_new_tokens: int = 8,
    *,
    filler: Literal["varied", "classic"] = "varied",
) -> PasskeySample:
    """Build a passkey prompt whose tokens plus ``max_new_tokens`` fit in ``length``.

    Args:
        tokenizer: an HF tokenizer (needs ``encode``; ``apply_chat_template`` is used
            when ``tokenizer.chat_template`` is set).
        length: target total length in tokens (prompt + generated tokens).
        depth: fraction of the filler sentences before the passkey line, in [0, 1]
            (0 = right after the task description, 1 = right before the question).
        seed: picks the 5-digit passkey and the filler; same seed, same prompt.
        max_new_tokens: room left for the answer.
        filler: ``"varied"`` (seeded generated sentences) or ``"classic"`` (the original
            repeated sentences).

    Raises :class:`~kvtools.errors.ConfigError` for a bad depth, filler or length and
    :class:`~kvtools.errors.InputTooLongError` when ``length`` cannot hold the description,
    passkey line, question and ``max_new_tokens``.

    >>> s = make_passkey(tokenizer, 2048, 0.25, seed=7)  # doctest: +SKIP
    >>> s.n_tokens + 8 <= 2048 and f"The pass key is {s.passkey}." in s.text  # doctest: +SKIP
    True
    """
    check_length(length, max_new_tokens)
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ConfigError(f"depth: must be a fraction in [0, 1], got {depth!r}")
    if filler not in ("varied", "classic"):
        raise ConfigError(f"filler: unknown filler {filler!r}; allowed: varied, classic")

    rng = random.Random(f"kvtools-passkey:{seed}")
    passkey = rng.randint(10_000, 99_999)
    line = PASSKEY_LINE.format(passkey=passkey)
    source = iter_filler(f"passkey:{seed}") if filler == "varied" else itertools.cycle(CLASSIC_FILLER)
    sentences = LazyStream(source)

    def cut_at(n: int) -> int:
        return min(n, max(0, round(depth * n)))

    def render(n: int) -> Rendered:
        units = sentences.take(n)
        cut = cut_at(n)
        parts = [TASK_DESCRIPTION, " ".join(units[:cut]), line, " ".join(units[cut:]), QUESTION]
        user = "\n".join(p for p in parts if p)
        return render_prompt(tokenizer, user, ANSWER_PREFIX, sep=" ")

    n, (text, ids) = fit_units(render, length, max_new_tokens, what="passkey")
    return PasskeySample(
        length=length,
        depth=float(depth),
        seed=seed,
        input_ids=ids,
        text=text,
        passkey=passkey,
        references=[str(passkey)],
        answer_prefix=ANSWER_PREFIX,
        n_tokens=len(ids),
        max_new_tokens=max_new_tokens,
        depth_actual=cut_at(n) / n if n else float(depth),
        n_sentences=n,
        meta={"filler": filler},
        context_tokens=question_split(tokenizer, text, ids, QUESTION, chat=has_chat_template(tokenizer)),
    )
