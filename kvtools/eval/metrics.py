"""Answer metrics of LongBench v1 (and friends), on the libraries the official scorer uses.

Each metric takes ``(prediction, ground_truth, **kwargs)`` and returns a float in
``[0, 1]``; :func:`best_score` takes the max over a list of reference answers and
:func:`task_score` averages that over a task and scales it by 100, the way LongBench
reports its numbers.

The scores equal those of LongBench's own ``metrics.py`` (THUDM/LongBench; pinned on
examples in ``tests/test_longbench.py``):

- ROUGE-L is the ``rouge`` package's (``Rouge().get_scores(...)["rouge-l"]["f"]``: texts
  split into sentences on ``.``, summary-level LCS), 0 when it cannot score (an empty text).
- Chinese QA F1 and Chinese ROUGE segment words with ``jieba``.
- :func:`code_sim_score` is fuzzywuzzy's ``fuzz.ratio / 100`` as LongBench installs it
  (without python-Levenshtein): :class:`difflib.SequenceMatcher` with its default
  ``autojunk``, rounded to a whole percent. It is computed here with the standard library,
  since fuzzywuzzy is a GPL package and adds nothing to it.
- :func:`classification_score` keeps the official rule exactly, including its
  remove-while-iterating behaviour (a matched class right after a removed one is not
  checked).

InfiniteBench's own scorer differs: its Chinese QA scores characters, not words
(:func:`qa_f1_zh_char_score`), and its summaries use ``rouge-score``'s ROUGE-Lsum
(:func:`rouge_lsum_score`). ``rouge``, ``rouge-score`` and ``jieba`` come with the ``eval``
extra (``pip install kvtools[eval]``).
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from typing import Any, Protocol

__all__ = [
    "METRICS",
    "Metric",
    "best_score",
    "classification_score",
    "code_sim_score",
    "count_score",
    "f1_tokens",
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_char_score",
    "qa_f1_zh_score",
    "retrieval_score",
    "retrieval_zh_score",
    "rouge_lsum_score",
    "rouge_score",
    "rouge_zh_score",
    "task_score",
    "zh_tokens",
]


class Metric(Protocol):
    """A per-answer metric: ``metric(prediction, ground_truth, **kwargs) -> float`` in [0, 1]."""

    def __call__(self, prediction: str, ground_truth: str, **kwargs: Any) -> float: ...


# ---------------------------------------------------------------- libraries
def _missing(package: str) -> ImportError:
    return ImportError(f"LongBench metrics need the {package!r} package: pip install 'kvtools[eval]'")


@cache
def _rouge() -> Any:
    try:
        from rouge import Rouge
    except ImportError:
        raise _missing("rouge") from None
    return Rouge()


@cache
def _rouge_lsum() -> Any:
    try:
        from rouge_score.rouge_scorer import RougeScorer
    except ImportError:
        raise _missing("rouge-score") from None
    return RougeScorer(["rougeLsum"], use_stemmer=False)


@cache
def _jieba() -> Any:
    try:
        import jieba
    except ImportError:
        raise _missing("jieba") from None
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict" banner on every run
    return jieba


def _words_zh(text: str) -> list[str]:
    """jieba's accurate-mode word segmentation (as LongBench's scorer calls it)."""
    return list(_jieba().cut(text, cut_all=False))


# ---------------------------------------------------------------- normalisation
_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# The CJK and typographic punctuation LongBench's normalize_zh_answer removes, besides ASCII's.
_ZH_PUNCT = _ASCII_PUNCT | frozenset(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏"
)


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation and the articles a/an/the, collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower, in Paris!")
    'eiffeltower in paris'
    """
    text = "".join(ch for ch in text.lower() if ch not in _ASCII_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lowercase, drop ASCII and CJK punctuation, remove all whitespace.

    >>> normalize_zh_answer("北京， 中国。 OK!")
    '北京中国ok'
    """
    return "".join(ch for ch in text.lower() if not ch.isspace() and ch not in _ZH_PUNCT)


def zh_tokens(text: str) -> list[str]:
    """Normalised jieba words of a Chinese text, empty ones dropped (LongBench's QA F1 tokens)."""
    return [w for w in map(normalize_zh_answer, _words_zh(text)) if w]


# ---------------------------------------------------------------- token F1
def f1_tokens(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """Bag-of-tokens F1 between two token lists (0 when either is empty or nothing overlaps).

    >>> round(f1_tokens(["a", "b", "c"], ["b", "c", "d", "e"]), 4)
    0.5714
    """
    common = Counter(prediction) & Counter(reference)
    matched = sum(common.values())
    if matched == 0:
        return 0.0
    precision = matched / len(prediction)
    recall = matched / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Token F1 after :func:`normalize_answer` (whitespace tokens).

    >>> qa_f1_score("The cat sat", "a cat sat down")
    0.8
    """
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Word F1 over :func:`zh_tokens` (jieba words), LongBench's Chinese QA metric."""
    return f1_tokens(zh_tokens(prediction), zh_tokens(ground_truth))


def qa_f1_zh_char_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Character F1 after :func:`normalize_zh_answer` (InfiniteBench's Chinese QA).

    >>> qa_f1_zh_char_score("北京市", "北京")
    0.8
    """
    return f1_tokens(list(normalize_zh_answer(prediction)), list(normalize_zh_answer(ground_truth)))


# ---------------------------------------------------------------- ROUGE-L
def rouge_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-L F of the ``rouge`` package; 0 where it cannot score (an empty or period-only text).

    >>> round(rouge_score("The cat sat. It slept.", "The cat sat. It slept."), 4), rouge_score("", "a cat")
    (1.0, 0.0)
    """
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except (ValueError, RecursionError):  # "Hypothesis is empty" etc.; LongBench scores these 0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_lsum_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """ROUGE-Lsum F of Google's ``rouge-score`` package (InfiniteBench's summary metric, which it
    calls through ``evaluate.load("rouge")`` with the package's defaults: no stemming, lines as
    sentences).

    >>> round(rouge_lsum_score("the cat sat on the mat", "the cat lay on a mat"), 4)
    0.6667
    """
    return float(_rouge_lsum().score(ground_truth, prediction)["rougeLsum"].fmeasure)


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """:func:`rouge_score` over jieba words joined by spaces."""
    return rouge_score(" ".join(_words_zh(prediction)), " ".join(_words_zh(ground_truth)))


# ---------------------------------------------------------------- classification / retrieval / count
def classification_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """LongBench classification (trec, lsht) against ``all_classes``.

    Every class name found as a substring of the prediction counts as predicted; names
    that are strict substrings of the true class are then removed, as LongBench does it:
    one pass that removes while it iterates, so a match right after a removed one stays.
    The score is ``1 / #predicted`` if the true class is among them, else 0.

    >>> classification_score("Type: Human being", "Human being", all_classes=["Human being", "Animal", "City"])
    1.0
    """
    all_classes: Iterable[str] = kwargs.get("all_classes") or ()
    matched = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matched):
        if matched[i] in ground_truth and matched[i] != ground_truth:
            del matched[i]  # the official loop's iterator then skips the element sliding into i
        i += 1
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


def _fuzz_ratio(a: str, b: str) -> float:
    """fuzzywuzzy's ``fuzz.ratio / 100`` on its pure-Python path: equal -> 1, empty -> 0, else
    difflib's ratio (default ``autojunk``) rounded to a whole percent."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio()) / 100


def code_sim_score(prediction: str, ground_truth: str, **kwargs: Any) -> float:
    """Edit similarity in [0, 1] between the first code line of the prediction and the reference.

    >>> code_sim_score("x = 1\\n", "x = 1")
    1.0
    """
    return _fuzz_ratio(_first_code_line(prediction), ground_truth)


# ---------------------------------------------------------------- aggregation
METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "qa_f1_zh_char": qa_f1_zh_char_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "rouge_lsum": rouge_lsum_score,
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
