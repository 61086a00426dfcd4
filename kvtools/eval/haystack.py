"""Haystacks and needle-in-a-haystack prompts.

Two haystack sources:

- a built-in, seeded filler generator of varied English sentences (combinatorial
  templates over many subjects, verbs, objects, places and times; no digits at all,
  so the filler never contains anything that looks like the 7-digit needle value);
- a user folder of ``.txt`` files, split into sentences (:func:`load_haystack_dir`).

:func:`build_niah_prompt` turns a haystack into one prompt of a target token length
for a given tokenizer: the needle ``The special magic number for {key} is: {value}.``
sits at ``depth`` percent of the haystack tokens (snapped back to a sentence end),
the question follows the haystack, the chat template is applied when the tokenizer
has one, and the assistant answer is pre-filled with ``The special magic number for
{key} is:`` so that a small model only has to complete the value; :func:`score_output`
scores 1 when the value appears in the output. :class:`LazyStream` is the lazily drawn
unit stream that the RULER and passkey haystacks use too.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtools.errors import ConfigError

from .prompting import Rendered, check_length, fit_units, has_chat_template, question_split, render_prompt

__all__ = [
    "MAX_NEW_TOKENS",
    "NEEDLE_KEYS",
    "LazyStream",
    "NiahPrompt",
    "build_niah_prompt",
    "filler_sentences",
    "iter_filler",
    "load_haystack_dir",
    "score_output",
]

# ---------------------------------------------------------------- filler vocabulary
# Keep these lists free of digits and of the needle keys below (a test checks both).
_SUBJECTS = (
    "the old fisherman", "a young teacher", "my neighbour", "the baker", "a tired traveller",
    "the librarian", "her grandfather", "the gardener", "a curious child", "the mayor",
    "the carpenter", "an elderly painter", "the night nurse", "a street musician", "the shepherd",
    "our landlord", "the ship's cook", "a quiet student", "the postman", "the blacksmith",
    "a retired sailor", "the weaver", "the village doctor", "a wandering poet", "the potter",
    "his sister", "the innkeeper", "the lighthouse keeper", "the choir director", "the farmer's wife",
    "the young apprentice", "the museum guard", "a famous chef", "the old monk", "the bookseller",
    "a nervous actor", "the tailor", "the river guide", "the station master", "a travelling merchant",
)
# (past, base, present third person, gerund)
_VERBS = (
    ("repaired", "repair", "repairs", "repairing"), ("painted", "paint", "paints", "painting"),
    ("carried", "carry", "carries", "carrying"), ("found", "find", "finds", "finding"),
    ("sold", "sell", "sells", "selling"), ("borrowed", "borrow", "borrows", "borrowing"),
    ("polished", "polish", "polishes", "polishing"), ("hid", "hide", "hides", "hiding"),
    ("washed", "wash", "washes", "washing"), ("wrapped", "wrap", "wraps", "wrapping"),
    ("examined", "examine", "examines", "examining"), ("described", "describe", "describes", "describing"),
    ("sketched", "sketch", "sketches", "sketching"), ("measured", "measure", "measures", "measuring"),
    ("returned", "return", "returns", "returning"), ("decorated", "decorate", "decorates", "decorating"),
    ("cleaned", "clean", "cleans", "cleaning"), ("admired", "admire", "admires", "admiring"),
    ("packed", "pack", "packs", "packing"), ("opened", "open", "opens", "opening"),
    ("moved", "move", "moves", "moving"), ("guarded", "guard", "guards", "guarding"),
    ("bought", "buy", "buys", "buying"), ("mended", "mend", "mends", "mending"),
    ("delivered", "deliver", "delivers", "delivering"), ("stacked", "stack", "stacks", "stacking"),
    ("inspected", "inspect", "inspects", "inspecting"), ("dusted", "dust", "dusts", "dusting"),
)
_OBJECTS = (
    "a wooden ladder", "the copper kettle", "an old map", "a basket of apples", "the silver spoons",
    "a blue umbrella", "the broken clock", "a pile of letters", "the heavy trunk", "a woollen blanket",
    "the little boat", "a jar of honey", "the garden gate", "a painted chair", "the brass lantern",
    "a bundle of firewood", "the leather saddle", "a ring of keys", "the faded curtains", "a loaf of bread",
    "the stone bench", "a crate of lemons", "the violin case", "a stack of plates", "the iron pot",
    "a box of candles", "the wicker basket", "a roll of canvas", "the oak table", "a sack of flour",
    "the fishing nets", "a bottle of ink", "the rusty bicycle", "a bag of seeds", "the green shutters",
    "a handful of buttons", "the kitchen scales", "a pair of boots", "the family portrait", "a tin of biscuits",
)
_PLACES = (
    "near the harbour", "in the market square", "behind the old mill", "at the edge of the forest",
    "on the hill above the village", "by the river", "in the back of the shop", "under the bridge",
    "beside the chapel", "in the upstairs room", "along the canal", "at the crossroads",
    "in the walled garden", "outside the bakery", "on the narrow pier", "inside the barn",
    "next to the well", "at the top of the stairs", "in the shade of the chestnut tree", "by the town hall",
    "on the station platform", "in the cellar", "across from the school", "beside the duck pond",
)
_TIMES = (
    "early in the morning", "late last autumn", "on a rainy afternoon", "just before sunset",
    "during the long winter", "after the harvest festival", "one quiet evening", "at the end of the summer",
    "before the first snow", "in the middle of the night", "on the day of the fair", "shortly after breakfast",
    "at dawn", "on a windy spring day", "the week before the wedding", "after the storm",
)
_ADVERBS = (
    "carefully", "quietly", "slowly", "proudly", "reluctantly", "cheerfully", "patiently",
    "hastily", "secretly", "gently", "clumsily", "happily", "silently", "eagerly",
)
_REASONS = (
    "because the roads were flooded", "since the shop was closed", "as the wind had changed",
    "because nobody else had the time", "since the guests were arriving soon", "because it had been a promise",
    "as the light was fading", "since the old one had been lost", "because the season was ending",
    "as everyone in the street expected", "because the weather had turned", "since it seemed the right thing to do",
)
_WEATHER = (
    ("the rain", "stopped"), ("the fog", "lifted"), ("the wind", "died down"), ("the snow", "began to melt"),
    ("the storm", "passed"), ("the sun", "came out"), ("the bells", "rang"), ("the clouds", "cleared"),
    ("the tide", "went out"), ("the frost", "settled"),
)
_ADJECTIVES = (
    "quiet", "crowded", "cold", "bright", "dusty", "peaceful", "noisy", "warm", "damp", "beautiful",
    "empty", "narrow", "cheerful", "gloomy", "fragrant", "chilly",
)
_SCENES = (
    "the street", "the kitchen", "the workshop", "the market", "the valley", "the harbour", "the library",
    "the courtyard", "the station", "the orchard", "the meadow", "the square",
)
_DURATIONS = (
    "the whole afternoon", "several hours", "most of the morning", "two long days", "an entire week",
    "the evening", "half the night", "a few minutes",
)
_FREQUENCIES = (
    "every Sunday", "once a month", "almost every evening", "twice a year", "whenever it rains",
    "each spring", "on market days", "every other week",
)
_TEMPLATES = (
    "{S} {vp} {O} {P}.",
    "{T}, {s} {vp} {O} {P}.",
    "{S} {adv} {vp} {O} while {s2} {vp2} {O2}.",
    "Nobody expected {s} to {vb} {O} {P}.",
    "{S} {vs} {O} {F}, {R}.",
    "When {W}, {s} {vp} {O} {P}.",
    "{S} wondered whether {s2} would {vb} {O} {T}.",
    "{C} was {A} and {A2}, so {s} {adv} {vp} {O}.",
    "{S} and {s2} spent {D} {vg} {O} {P}.",
    "It is said that {s} once {vp} {O} {P}.",
    "{S} {vp} {O}, and {s2} {vp2} {O2} soon after.",
    "{T}, {C} felt {A}, and {s} {vp} {O} {R}.",
    "Everyone agreed that {s} should {vb} {O} {F}.",
    "{S} remembered {vg} {O} {P} {T}.",
)

#: Needle keys: cities and object nouns, disjoint from the filler vocabulary.
NEEDLE_KEYS: tuple[str, ...] = (
    "Lisbon", "Nairobi", "Kyoto", "Reykjavik", "Montevideo", "Tbilisi", "Marrakesh", "Helsinki",
    "Cartagena", "Hanoi", "Valparaiso", "Zanzibar", "Ljubljana", "Anchorage", "Samarkand", "Quito",
    "Adelaide", "Bergen", "Cusco", "Dubrovnik", "Tallinn", "Kathmandu", "Havana", "Porto",
    "telescope", "harmonica", "kaleidoscope", "trombone", "hourglass", "compass", "accordion", "typewriter",
    "metronome", "saxophone", "periscope", "gramophone", "microscope", "abacus", "barometer", "sextant",
    "xylophone", "tambourine", "stethoscope", "chandelier", "sundial", "thermostat", "pinwheel", "harpsichord",
)


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _filler_sentence(rng: random.Random) -> str:
    s, s2 = rng.sample(_SUBJECTS, 2)
    (vp, vb, vs, vg), (vp2, *_rest) = rng.sample(_VERBS, 2)
    o, o2 = rng.sample(_OBJECTS, 2)
    a, a2 = rng.sample(_ADJECTIVES, 2)
    noun, verb = rng.choice(_WEATHER)
    fields = {
        "s": s, "S": _capitalize(s), "s2": s2,
        "vp": vp, "vb": vb, "vs": vs, "vg": vg, "vp2": vp2,
        "O": o, "O2": o2, "P": rng.choice(_PLACES), "T": rng.choice(_TIMES), "adv": rng.choice(_ADVERBS),
        "R": rng.choice(_REASONS), "W": f"{noun} {verb}", "A": a, "A2": a2, "C": rng.choice(_SCENES),
        "D": rng.choice(_DURATIONS), "F": rng.choice(_FREQUENCIES),
    }
    return _capitalize(rng.choice(_TEMPLATES).format(**fields))


def iter_filler(seed: int | str = 0) -> Iterator[str]:
    """Endless stream of varied filler sentences, deterministic for a given seed.

    >>> next(iter_filler(0)) == next(iter_filler(0))
    True
    """
    rng = random.Random(f"kvtools-filler:{seed}")
    while True:
        yield _filler_sentence(rng)


def filler_sentences(n: int, seed: int | str = 0) -> list[str]:
    """The first ``n`` sentences of :func:`iter_filler` for ``seed``.

    >>> len(filler_sentences(5, seed=1))
    5
    """
    return list(itertools.islice(iter_filler(seed), n))


# ---------------------------------------------------------------- user haystack
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_MAX_SENTENCE_WORDS = 80


def load_haystack_dir(path: str | Path) -> list[str]:
    """Read every ``.txt`` file under ``path`` (sorted, recursive) and split it into sentences.

    Whitespace is collapsed; sentences longer than 80 words are cut into 80-word pieces
    so that a needle can always be placed near the requested depth.
    Raises :class:`~kvtools.errors.ConfigError` if the folder is missing or holds no text.

    >>> sentences = load_haystack_dir("essays/")  # doctest: +SKIP
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"haystack: folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"haystack: no .txt files in {folder}")
    sentences: list[str] = []
    for file in files:
        text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
        for sentence in _SENTENCE_END.split(text):
            words = sentence.split()
            for i in range(0, len(words), _MAX_SENTENCE_WORDS):
                sentences.append(" ".join(words[i : i + _MAX_SENTENCE_WORDS]))
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ConfigError(f"haystack: the .txt files in {folder} are empty")
    return sentences


# ---------------------------------------------------------------- prompt
NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key}?"
ANSWER_PREFIX = "The special magic number for {key} is:"
#: tokens generated per NIAH sample unless told otherwise
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class NiahPrompt:
    """One needle-in-a-haystack prompt, already tokenized.

    ``text`` is the whole model input (chat template and pre-filled answer prefix
    included) and ``input_ids`` its tokens; ``len(input_ids) + max_new_tokens <= length``.
    ``context_tokens``: how many of them come before the question (the template's beginning and the
    haystack; :func:`~kvtools.eval.prompting.question_split`), ``None`` if the tokenizer cannot split there.
    """

    text: str
    input_ids: list[int]
    key: str
    value: str
    needle: str
    question: str
    answer_prefix: str
    length: int  # target length in tokens (prompt + new tokens)
    depth: float  # requested depth, % of the haystack tokens
    depth_actual: float  # where the needle landed, % of the haystack tokens before it
    n_sentences: int  # haystack sentences used
    context_tokens: int | None = None  # tokens before the question

    @property
    def n_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.input_ids)


def score_output(output: str, value: str) -> float:
    """1.0 if the needle's value appears verbatim in the output, else 0.0.

    >>> score_output(" 4614727.", "4614727"), score_output(" 461472", "4614727")
    (1.0, 0.0)
    """
    return 1.0 if str(value) in output else 0.0


class LazyStream:
    """A prefix-materialised stream of haystack units: ``take(n)`` returns its first ``n`` items,
    drawing from the iterator only as far as ever asked."""

    def __init__(self, items: Iterator[str]) -> None:
        self._it = items
        self.items: list[str] = []

    def take(self, n: int) -> list[str]:
        while len(self.items) < n:
            self.items.append(next(self._it))
        return self.items[:n]


class _TokenCounts:
    """Running token counts of a sentence stream: ``total(n)`` estimates the tokens of its first ``n``
    sentences from per-sentence counts (each encoded with a leading space, as inside running text)."""

    def __init__(self, tokenizer: Any, sentences: LazyStream) -> None:
        self._tokenizer = tokenizer
        self._sentences = sentences
        self._counts = [0]  # _counts[i]: tokens of the first i sentences

    def total(self, n: int) -> int:
        for sentence in self._sentences.take(n)[len(self._counts) - 1 :]:
            tokens = len(self._tokenizer.encode(" " + sentence, add_special_tokens=False))
            self._counts.append(self._counts[-1] + tokens)
        return self._counts[n]

    def cut(self, n: int, depth: float) -> int:
        """How many of the first ``n`` sentences end at or before ``depth`` percent of their tokens."""
        return bisect.bisect_right(self._counts, depth / 100 * self.total(n), 0, n + 1) - 1

    def most_within(self, budget: int) -> int:
        """The number of sentences (at least 1) whose estimated tokens fit ``budget``."""
        while self._counts[-1] <= budget:
            self.total(len(self._counts) + 63)
        return max(bisect.bisect_right(self._counts, budget) - 1, 1)


def build_niah_prompt(
    tokenizer: Any,
    length: int,
    depth: float,
    seed: int | str = 0,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    max_context: int | None = None,
    haystack: Sequence[str] | None = None,
) -> NiahPrompt:
    """Build a NIAH prompt whose tokens plus ``max_new_tokens`` fit in ``length``.

    Args:
        tokenizer: an HF tokenizer (needs ``encode``; ``apply_chat_template`` is used
            when ``tokenizer.chat_template`` is set).
        length: target total length in tokens (prompt + generated tokens).
        depth: where the needle goes, in percent of the haystack tokens (0 = first
            sentence, 100 = after the last one); snapped back to a sentence end.
        seed: picks the key, the 7-digit value and the haystack (filler or corpus offset).
        max_new_tokens: room left for the answer.
        max_context: the model's context (``model.config.max_position_embeddings``);
            a ``length`` beyond it raises :class:`~kvtools.errors.InputTooLongError`.
        haystack: sentences to use (e.g. from :func:`load_haystack_dir`), cycled from a
            seeded offset; ``None`` uses the built-in filler generator.

    The haystack size is fitted by counting tokens with the tokenizer (an estimate from
    per-sentence counts, then a search on the real token count), so the prompt never
    exceeds ``length - max_new_tokens`` tokens.

    >>> p = build_niah_prompt(tok, 2048, 50, seed=1, max_context=8192)  # doctest: +SKIP
    >>> p.n_tokens + 16 <= 2048 and p.value in p.text
    True
    """
    check_length(length, max_new_tokens, max_context)
    if not 0 <= depth <= 100:
        raise ConfigError(f"depth: must be a percent in [0, 100], got {depth!r}")
    rng = random.Random(f"kvtools-niah:{seed}")
    key = rng.choice(NEEDLE_KEYS)
    value = str(rng.randint(1_000_000, 9_999_999))
    needle = NEEDLE.format(key=key, value=value)
    question = QUESTION.format(key=key)
    answer_prefix = ANSWER_PREFIX.format(key=key)
    if haystack:
        start = rng.randrange(len(haystack))
        sentences = LazyStream(itertools.islice(itertools.cycle(haystack), start, None))
    else:
        sentences = LazyStream(iter_filler(f"{seed}"))
    counts = _TokenCounts(tokenizer, sentences)

    def render(n: int) -> Rendered:
        units, cut = sentences.take(n), counts.cut(n, depth)
        text = " ".join([*units[:cut], needle, *units[cut:]])
        return (*render_prompt(tokenizer, f"{text}\n\n{question}", answer_prefix, sep="\n\n"), cut)

    limit = length - max_new_tokens
    n, (text, ids, cut) = fit_units(
        render, length, max_new_tokens, what="niah", smallest="the needle, question and template alone take",
        estimate=lambda overhead: counts.most_within(limit - overhead),
    )
    total = counts.total(n)
    return NiahPrompt(
        text=text, input_ids=ids, key=key, value=value, needle=needle, question=question,
        answer_prefix=answer_prefix, length=length, depth=float(depth),
        depth_actual=100.0 * counts.total(cut) / total if total else float(depth), n_sentences=n,
        context_tokens=question_split(tokenizer, text, ids, question, chat=has_chat_template(tokenizer)),
    )
