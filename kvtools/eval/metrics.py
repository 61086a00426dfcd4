"""Answer metrics of LongBench v1 (and friends), written for kvtools.

Each metric takes ``(prediction, ground_truth, **kwargs)`` and returns a float in
``[0, 1]``; :func:`best_score` takes the max over a list of reference answers and
:func:`task_score` averages that over a task and scales it by 100, the way LongBench
reports its numbers.

Behaviour follows the LongBench v1 evaluation, with these documented differences:

- Chinese QA F1 and Chinese ROUGE use **one token per character** (no jieba word
  segmentation), as InfiniteBench does for its Chinese QA. Numbers are therefore close to,
  but not identical with, jieba-based LongBench numbers.
- ROUGE-L is the plain F1 of the longest common subsequence over tokens (English tokens:
  lowercase ``\\w+`` runs; Chinese: characters), computed over the whole text as one
  sequence. The ``rouge`` package used upstream splits texts on ``.`` and takes a
  summary-level union LCS, with a slightly different F formula.
- :func:`classification_score` drops matched class names that are strict substrings of
  the true class (the intended upstream rule, without its remove-while-iterating skip);
  a prediction naming no class scores 0.
- :func:`code_sim_score` returns an unrounded similarity (rapidfuzz's normalised Indel
  similarity when rapidfuzz is installed, :class:`difflib.SequenceMatcher` otherwise).
"""

from __future__ import annotations

import difflib
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

__all__ = [
    "METRICS",
    "Metric",
    "best_score",
    "classification_score",
    "code_sim_score",
    "count_score",
    "f1_tokens",
    "lcs_length",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_l",
    "rouge_score",
    "rouge_zh_score",
    "task_score",
    "zh_tokens",
]


class Metric(Protocol):
    """A per-answer metric: ``metric(prediction, ground_truth, **kwargs) -> float`` in [0, 1]."""

    def __call__(self, prediction: str, ground_truth: str, **kwargs: Any) -> float: ...


# ---------------------------------------------------------------- normalisation
_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower, in Paris!")
    'eiffeltower in paris'
    """
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_punct(ch: str) -> bool:
    """ASCII or Unicode punctuation, including full-width forms of ASCII symbols (＋, ～, …)."""
    if ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P"):
        return True
    folded = unicodedata.normalize("NFKC", ch)
    return folded != ch and bool(folded) and all(c in _ASCII_PUNCT for c in folded)


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lowercase, drop ASCII/CJK punctuation, remove all whitespace.

    >>> normalize_zh_answer("北京， 中国。 OK!")
    '北京中国ok'
    """
    return "".join(ch for ch in text.lower() if not ch.isspace() and not _is_punct(ch))


def zh_tokens(text: str) -> list[str]:
    """Character-level tokens of a Chinese text after :func:`normalize_zh_answer`.

    >>> zh_tokens("你好, 世界")
    ['你', '好', '世', '界']
    """
    return list(normalize_zh_answer(text))


def _en_rouge_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


# ---------------------------------------------------------------- token F1
def f1_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when either is empty or nothing overlaps).

    >>> round(f1_tokens(["a", "b", "c"], ["b", "c", "d", "e"]), 4)
    0.5714
    """
    common = Counter(prediction) & Counter(reference)
    return _f1(sum(common.values()), len(prediction), len(reference))


def _f1(matched: int, n_prediction: int, n_reference: int) -> float:
    """Harmonic mean of precision ``matched / n_prediction`` and recall ``matched / n_reference`` (0 if none match)."""
    if matched == 0:
        return 0.0
    precision = matched / n_prediction
    recall = matched / n_reference
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 after :func:`normalize_answer` (whitespace tokens).

    >>> qa_f1_score("The cat sat", "a cat sat down")
    0.8
    """
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Character-level F1 after :func:`normalize_zh_answer`.

    >>> qa_f1_zh_score("北京市", "北京")
    0.8
    """
    return f1_tokens(zh_tokens(prediction), zh_tokens(ground_truth))


# ---------------------------------------------------------------- ROUGE-L
def lcs_length(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel algorithm (Hyyrö 2004) on Python integers: one bit per token of ``a``,
    ``O(len(b) * len(a) / wordsize)`` time, exact.

    >>> lcs_length("ABCBDAB", "BDCABA")
    4
    """
    if not a or not b:
        return 0
    masks: dict[Any, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(prediction: Sequence[Any], reference: Sequence[Any]) -> float:
    """ROUGE-L F1 over two token lists: LCS precision and recall, harmonic mean.

    >>> round(rouge_l("the cat sat on the mat".split(), "the cat lay on a mat".split()), 4)
    0.6667
    """
    return _f1(lcs_length(prediction, reference), len(prediction), len(reference))


def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F1 on lowercase word tokens (``\\w+`` runs)."""
    return rouge_l(_en_rouge_tokens(prediction), _en_rouge_tokens(ground_truth))


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F1 on character tokens (:func:`zh_tokens`)."""
    return rouge_l(zh_tokens(prediction), zh_tokens(ground_truth))


# ---------------------------------------------------------------- classification / retrieval / count
def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """LongBench classification (trec, lsht) against ``all_classes``.

    Every class name found as a substring of the prediction counts as predicted; names
    that are strict substrings of the true class are ignored (a correct ``"Animal product"``
    is not diluted by the ``"Animal"`` it contains). The score is ``1 / #predicted`` if the
    true class is among them, else 0.

    >>> classification_score("Type: Human being", "Human being", all_classes=["Human being", "Animal", "City"])
    1.0
    """
    all_classes: Iterable[str] = kwargs.get("all_classes") or ()
    matched = [c for c in all_classes if c and c in prediction]
    matched = [c for c in matched if not (c in ground_truth and c != ground_truth)]
    if ground_truth in matched:
        return 1.0 / len(matched)
    return 0.0


def _id_share(prediction: str, target: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == target for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the paragraph id of ``"Paragraph N"``.

    >>> retrieval_score("Paragraph 12", "Paragraph 12"), retrieval_score("12 or 3", "Paragraph 12")
    (1.0, 0.5)
    """
    found = re.search(r"Paragraph (\d+)", ground_truth)
    return _id_share(prediction, found.group(1)) if found else 0.0


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Chinese variant of :func:`retrieval_score` for ``"段落N"`` answers."""
    found = re.search(r"段落(\d+)", ground_truth)
    return _id_share(prediction, found.group(1)) if found else 0.0


def count_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Share of the numbers in the prediction equal to the true count.

    >>> count_score("There are 7 unique paragraphs.", "7")
    1.0
    """
    return _id_share(prediction, str(ground_truth).strip())


# ---------------------------------------------------------------- code
def _first_code_line(prediction: str) -> str:
    """First line of a completion that is not a fence or a comment (``` ` ``, ``#``, ``//``)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def _similarity(a: str, b: str) -> float:
    try:
        from rapidfuzz import fuzz
    except ImportError:
        return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()
    return fuzz.ratio(a, b) / 100.0


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Edit similarity in [0, 1] between the first code line of the prediction and the reference.

    >>> code_sim_score("x = 1\\n", "x = 1")
    1.0
    """
    return _similarity(_first_code_line(prediction), ground_truth)


# ---------------------------------------------------------------- aggregation
METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def _metric(metric: str | Callable[..., float]) -> Callable[..., float]:
    if callable(metric):
        return metric
    try:
        return METRICS[metric]
    except KeyError:
        raise ValueError(f"metric: unknown {metric!r}; known: {', '.join(sorted(METRICS))}") from None


def best_score(
    metric: str | Callable[..., float],
    prediction: str,
    answers: str | Iterable[str],
    all_classes: Sequence[str] | None = None,
) -> float:
    """Max of ``metric`` over the reference ``answers`` (a string counts as one answer), in [0, 1].

    >>> best_score("qa_f1", "Paris", ["London", "paris"])
    1.0
    """
    fn = _metric(metric)
    refs = [answers] if isinstance(answers, str) else list(answers)
    return max((float(fn(prediction, ref, all_classes=all_classes)) for ref in refs), default=0.0)


def task_score(
    metric: str | Callable[..., float],
    predictions: Sequence[str],
    answers: Sequence[str | Sequence[str]],
    all_classes: Sequence[Sequence[str] | None] | Sequence[str] | None = None,
) -> float:
    """LongBench task score: mean of :func:`best_score` over examples, x100, rounded to 2 decimals.

    ``all_classes`` is either one class list shared by every example or one per example.
    An empty task scores 0.

    >>> task_score("qa_f1", ["Paris", "Rome"], [["Paris"], ["Madrid"]])
    50.0
    """
    if len(predictions) != len(answers):
        raise ValueError(f"task_score: {len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        return 0.0
    if all_classes is None or (all_classes and isinstance(all_classes[0], str)):
        per_example: list[Any] = [all_classes] * len(predictions)
    else:
        per_example = list(all_classes)
    total = sum(best_score(metric, p, a, c) for p, a, c in zip(predictions, answers, per_example))
    return round(100.0 * total / len(predictions), 2)
