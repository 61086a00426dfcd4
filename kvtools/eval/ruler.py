"""RULER-style synthetic long-context tasks, generated locally (no downloads).

Each task builds one prompt whose tokens, counted with the model's tokenizer, plus the
tokens to generate fit the target length: the haystack size is found by a search on
the real token count, so ``n_tokens + max_new_tokens <= length`` and the prompt is as
long as a whole haystack unit (sentence, line, list entry or word) allows.

Tasks (see :data:`TASKS`; the names follow RULER's synthetic suite):

- ``niah_single_number`` / ``niah_single_word`` / ``niah_single_uuid``: one needle
  ``One of the special magic {numbers|words|uuids} for {key} is: {value}.`` hidden in
  varied filler (:func:`kvtools.eval.haystack.iter_filler`); ask for its value.
- ``niah_multikey_number``: four needles with different keys in the filler, one asked.
- ``niah_multikey_distractor``: the haystack is made only of needle-like lines for other
  keys (RULER's ``niah_multikey_2``); one key asked.
- ``niah_multikey_uuid``: the same, with uuid keys and uuid values (RULER's ``niah_multikey_3``).
- ``niah_multivalue``: one key with four needles (four values), all to be returned.
- ``niah_multiquery``: four keys, all asked at once.
- ``vt``: variable tracking: ``VAR ABCDE = 12345.`` then hops ``VAR FGHIJ = VAR ABCDE.``
  (four hops) hidden in filler; return every name bound to the value.
- ``cwe``: a numbered word list where ten words occur often (30x) and the rest rarely
  (3x); return the ten common ones. When 30x cannot fit, the common count is lowered
  (see :class:`CommonWordsTask`).
- ``fwe``: coded six-letter words with Zipf counts (``....`` is the top-ranked noise
  word); return the three most frequent real words.

Values are 7-digit numbers, ``adjective-noun`` words or uuids (from the seeded RNG, not
``uuid4()``); keys are ``adjective-noun`` words or uuids. Every sample is deterministic
for a given ``(task, length, seed)`` and tokenizer.

Differences from RULER, on purpose: varied generated filler instead of Paul Graham
essays or the repeated "The grass is green" noise; no in-context example for ``vt`` and
``cwe`` (more room for the haystack at short lengths); shorter default generation budgets
for the NIAH tasks (32 to 96 tokens instead of 128: the answers are short and small
models decode slowly on CPU; pass ``max_new_tokens=128`` for RULER parity).

Scoring follows RULER: :func:`string_match_all` (fraction of references found in the
output, case-insensitive) for every task here, :func:`string_match_part` (1 if any is
found) for QA-style tasks; reports multiply by 100.

>>> sample = make_sample("niah_multikey_number", tokenizer, 4096, seed=0)  # doctest: +SKIP
>>> sample.n_tokens + sample.max_new_tokens <= 4096  # doctest: +SKIP
True
>>> score(sample, " 1234567.")  # doctest: +SKIP
0.0
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
import string
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from kvtools.errors import ConfigError

from .haystack import LazyStream, iter_filler
from .prompting import Rendered, check_length, fit_units, has_chat_template, question_split, render_prompt

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "METRICS",
    "TASKS",
    "CommonWordsTask",
    "FrequentWordsTask",
    "NiahTask",
    "RulerSample",
    "RulerTask",
    "VariableTrackingTask",
    "make_sample",
    "score",
    "string_match_all",
    "string_match_part",
]

Metric = Literal["string_match_all", "string_match_part"]

# ---------------------------------------------------------------- vocabulary
# Lower-case words of 4+ letters; no word is a substring of another one (a test checks),
# so an ``adjective-noun`` key never hides inside another key, and none occurs in the
# task templates.
_ADJECTIVES: tuple[str, ...] = tuple(
    """
    absent acidic active adorable afraid alert alive ancient angry anxious arctic ashamed awkward
    bashful bitter bland blazing blissful blunt boiling bouncy brave breezy brilliant brisk broad
    bumpy busy calm candid careful caring cautious cheap chubby civil classic clever cloudy clumsy
    coarse cosmic cozy crimson crisp crooked cruel curly curvy daring dazzling decent deep defiant
    dense devoted dizzy dreamy drowsy dusky eager earnest eastern elastic electric elegant eminent
    endless enormous epic equal exotic faint faithful famous fancy fearless feeble festive fierce
    filthy flaky flimsy floral fluffy foggy formal fragile frantic frozen frugal funny fuzzy gentle
    giant giddy gifted glad gleaming global glossy golden graceful grand grateful greasy greedy
    grumpy guilty hairy handsome hasty hazy healthy hearty heavy helpful hollow honest hopeful
    humble hungry idle immense imperial innocent intense jagged jealous jolly joyful juicy jumbo
    keen kind lanky large lavish lazy legal lively lonely loose loyal lucky lunar magenta majestic
    mellow merry mighty minor misty modern modest moist moody muddy murky mushy mystic naive narrow
    nasty naughty neat nervous nimble noble normal nutty obedient obscure ocean ornate outer pale
    patient peculiar perfect perky petite plain playful pleasant plump polite precious prickly
    proper proud puffy punctual purple quaint quick quirky radiant rapid rare rebel regal remote
    rigid ripe robust rocky rosy rotten rough royal sacred salty sandy savage scarce scarlet secret
    serene shabby shaggy shallow sharp shiny short silent silky simple sleek sleepy slim slippery
    sloppy smooth snobby snowy soft solar solid somber sour sparkling speedy spicy splendid spotty
    square stable stale steady steep sticky stormy strange strict sturdy subtle sudden sunny super
    swift tame tangy tasty tender thirsty thorny tidy tiny tired tough tragic tranquil tricky trusty
    twin ugly unique upbeat urban useful vacant vague valiant vast velvet vibrant vivid vocal wacky
    wary watery wealthy weary whole wicked wide wild windy wise witty wooden woolly worthy young
    zany zealous
    """.split()
)
_NOUNS: tuple[str, ...] = tuple(
    """
    acorn admiral airport album almond anchor angle animal ankle antelope anthem apple apricot apron
    archer arena armchair artist asteroid atlas attic avenue avocado badger bagel balcony ballet
    balloon bamboo banana bandit banjo banner barrel basin basket beacon beaver bedroom beetle bell
    bench berry bicycle biscuit blanket blossom boulder bracelet branch breeze brick bridge broom
    bubble bucket buffalo bugle bunny butter button cabbage cabin cactus camel camera canal canoe
    canyon captain caravan carpet carrot castle cellar cello cereal chalk chapel cheetah cherry
    chimney chisel cider cinema circus citadel clarinet cliff closet clover cobra coconut coffee
    comet compass cookie copper coral cottage cotton cougar courtyard coyote cradle crayon cricket
    crocodile crown crystal cucumber cupboard curtain cushion cyclone dagger daisy dancer desert
    diamond dinosaur doctor dolphin donkey dragon drawer drummer eagle easel eclipse elbow elephant
    elevator emerald engine envelope falcon feather fence ferry fiddle flamingo flute forest fossil
    fountain frog galaxy garage garlic gazelle geyser giraffe glacier goblet goose gorilla granite
    grape guitar hammer hamster harbor hawk hedgehog helmet heron hippo honey horizon hornet hotel
    hurricane iceberg igloo island ivory jacket jaguar jasmine jelly jewel journal judge jungle
    kangaroo kayak kettle kitten koala ladder lagoon lantern lemon leopard lettuce library
    lighthouse lizard lobster locket lotus magnet mango mansion maple marble meadow melon mermaid
    meteor mirror mitten monkey moose mosaic mountain muffin museum mushroom napkin necklace nectar
    needle noodle nugget oasis octopus olive onion orange orchard orchid ostrich otter oven oyster
    paddle pagoda palace panda panther parade parrot peach peanut pearl pebble pelican pencil
    penguin pepper piano pickle pigeon pillow pilot planet pocket poem pony poodle potato prairie
    pretzel prism pudding puffin pumpkin puppet puzzle pyramid quartz quilt rabbit raccoon radish
    rainbow raven razor reef rhino ribbon river robot rocket rooster saddle salmon sandal satchel
    scarf scooter sculpture seagull shadow shark shelf shovel shrimp signal skate sled snail spider
    spinach sponge squirrel stadium stallion statue stirrup stool stove submarine sugar suitcase
    summit sunflower swamp swan sweater tablet tadpole tambourine teapot temple tent thimble thunder
    tiger toaster tomato tornado tortoise tower tractor trumpet tulip tunnel turkey turtle umbrella
    unicorn valley vase village violin volcano waffle wagon walnut walrus wardrobe waterfall whale
    whistle willow window wizard wolf yacht zebra zipper
    """.split()
)


# ---------------------------------------------------------------- samples and scoring
@dataclass(frozen=True)
class RulerSample:
    """One RULER-style prompt, already tokenized.

    ``text`` is the whole model input (chat template and pre-filled ``answer_prefix``
    included) and ``input_ids`` its tokens; ``n_tokens + max_new_tokens <= length``.
    ``references`` are the strings the output must contain (scored with ``metric``);
    ``meta`` holds task details (keys asked, haystack size, word counts...). ``context_tokens``:
    how many tokens come before the question (the template's beginning, the task description and
    the haystack; :func:`~kvtools.eval.prompting.question_split`), ``None`` if they cannot be split.
    """

    task: str
    length: int
    seed: int | str
    input_ids: list[int]
    text: str
    references: list[str]
    metric: Metric
    answer_prefix: str
    n_tokens: int
    max_new_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    context_tokens: int | None = None


def string_match_all(output: str, references: Sequence[str]) -> float:
    """Fraction of ``references`` found in ``output`` (case-insensitive substring), in 0..1.

    >>> string_match_all("Answer: apple, PEAR", ["apple", "pear", "plum"])
    0.6666666666666666
    """
    if not references:
        raise ValueError("string_match_all: no references to look for")
    text = output.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def string_match_part(output: str, references: Sequence[str]) -> float:
    """1.0 if any of ``references`` is found in ``output`` (case-insensitive substring), else 0.0.

    >>> string_match_part("it is Paris", ["paris", "Lyon"]), string_match_part("Rome", ["Paris"])
    (1.0, 0.0)
    """
    if not references:
        raise ValueError("string_match_part: no references to look for")
    text = output.lower()
    return 1.0 if any(ref.lower() in text for ref in references) else 0.0


#: Scoring functions by metric name.
METRICS: Mapping[str, Callable[[str, Sequence[str]], float]] = MappingProxyType(
    {"string_match_all": string_match_all, "string_match_part": string_match_part}
)


def score(sample: RulerSample, output: str) -> float:
    """Score one generated ``output`` (the text after the answer prefix) against ``sample``, in 0..1.

    >>> score(sample, " brave-otter and calm-tiger")  # doctest: +SKIP
    1.0
    """
    return METRICS[sample.metric](output, sample.references)


# ---------------------------------------------------------------- haystack layout
def _interleave(units: Sequence[str], inserts: Sequence[tuple[float, str]]) -> list[str]:
    """``units`` with each ``(fraction, text)`` inserted before unit ``round(fraction * len(units))``.

    Inserts that land on the same place keep their given order.
    """
    n = len(units)
    at: dict[int, list[str]] = {}
    for frac, text in inserts:
        at.setdefault(min(n, max(0, round(frac * n))), []).append(text)
    out: list[str] = []
    for i in range(n + 1):
        out.extend(at.get(i, ()))
        if i < n:
            out.append(units[i])
    return out


# ---------------------------------------------------------------- keys and values
_KINDS = ("number", "word", "uuid")
_PLURAL: Mapping[str, str] = MappingProxyType({"number": "numbers", "word": "words", "uuid": "uuids"})


def _random_item(rng: random.Random, kind: str) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "word":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(_KINDS)}")


def _iter_unique(rng: random.Random, kind: str, used: set[str]) -> Iterator[str]:
    """Endless stream of items of ``kind`` never seen in ``used`` (which it extends)."""
    while True:
        item = _random_item(rng, kind)
        if item not in used:
            used.add(item)
            yield item


def _take_unique(rng: random.Random, kind: str, n: int, used: set[str]) -> list[str]:
    stream = _iter_unique(rng, kind, used)
    return [next(stream) for _ in range(n)]


def _join_names(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b, and c`` (RULER's query wording)."""
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + ", and " + names[-1]


def _rng(task: str, seed: int | str, part: str = "") -> random.Random:
    return random.Random(f"kvtools-ruler:{task}:{seed}:{part}")


# ---------------------------------------------------------------- tasks
@dataclass(frozen=True, kw_only=True)
class RulerTask:
    """A task builder: call it with ``(tokenizer, length, seed=0, max_new_tokens=None)`` for a :class:`RulerSample`.

    ``max_new_tokens`` here is the task's default generation budget.
    """

    name: str
    max_new_tokens: int

    def __call__(
        self, tokenizer: Any, length: int, seed: int | str = 0, max_new_tokens: int | None = None
    ) -> RulerSample:
        new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        check_length(length, new)
        return self._build(tokenizer, length, seed, new)

    def _build(self, tokenizer: Any, length: int, seed: int | str, max_new_tokens: int) -> RulerSample:
        raise NotImplementedError

    def _sample(
        self, tokenizer: Any, length: int, seed: int | str, max_new_tokens: int, rendered: Rendered,
        references: list[str], answer_prefix: str, meta: dict[str, Any], question: str,
    ) -> RulerSample:
        """The sample of the fitted ``rendered`` prompt, whose user message ends with ``question``."""
        text, ids = rendered
        return RulerSample(
            task=self.name, length=length, seed=seed, input_ids=ids, text=text, references=references,
            metric="string_match_all", answer_prefix=answer_prefix, n_tokens=len(ids),
            max_new_tokens=max_new_tokens, meta=meta,
            context_tokens=question_split(tokenizer, text, ids, question, chat=has_chat_template(tokenizer)),
        )


_NIAH_QUESTION = "What are all the special magic {kind} for {query} mentioned in the provided text?"
_NIAH_TEMPLATE = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\n" + _NIAH_QUESTION
)
_NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
_NIAH_PREFIX = "The special magic {kind} for {query} mentioned in the provided text are"


@dataclass(frozen=True, kw_only=True)
class NiahTask(RulerTask):
    """Needle-in-a-haystack variant.

    ``num_keys`` keys (each with ``num_values`` values, one needle per value) are hidden at seeded random
    depths; ``num_queries`` of the keys are asked and all their values are the references.
    ``haystack="filler"`` hides them in varied sentences, ``"needles"`` in needle-like lines
    for other keys (distractors of the same key and value kinds). The haystack size is
    fitted to the length.
    """

    key_kind: Literal["word", "uuid"] = "word"
    value_kind: Literal["number", "word", "uuid"] = "number"
    num_keys: int = 1
    num_values: int = 1
    num_queries: int = 1
    haystack: Literal["filler", "needles"] = "filler"

    def __post_init__(self) -> None:
        if self.key_kind not in ("word", "uuid") or self.value_kind not in _KINDS:
            raise ConfigError(f"{self.name}: keys are word or uuid, values number, word or uuid")
        if not 1 <= self.num_queries <= self.num_keys or self.num_values < 1:
            raise ConfigError(f"{self.name}: need 1 <= num_queries <= num_keys and num_values >= 1")
        if self.haystack not in ("filler", "needles"):
            raise ConfigError(f"{self.name}: haystack is 'filler' or 'needles', got {self.haystack!r}")

    def _build(self, tokenizer: Any, length: int, seed: int | str, max_new_tokens: int) -> RulerSample:
        rng = _rng(self.name, seed)
        kind = _PLURAL[self.value_kind]
        used: set[str] = set()
        keys = _take_unique(rng, self.key_kind, self.num_keys, used)
        values = [_take_unique(rng, self.value_kind, self.num_values, used) for _ in keys]
        needles = [
            (rng.random(), _NIAH_NEEDLE.format(kind=kind, key=key, value=value))
            for key, vals in zip(keys, values)
            for value in vals
        ]
        asked = sorted(rng.sample(range(self.num_keys), self.num_queries))
        queries = [keys[i] for i in asked]
        references = [v for i in asked for v in values[i]]
        query = _join_names(queries)
        answer_prefix = _NIAH_PREFIX.format(kind=kind, query=query)

        if self.haystack == "filler":
            units = LazyStream(iter_filler(f"ruler:{self.name}:{seed}"))
            sep = " "
        else:
            hay_rng = _rng(self.name, seed, "haystack")
            hay_keys = _iter_unique(hay_rng, self.key_kind, set(used))
            hay_values = _iter_unique(hay_rng, self.value_kind, set(used))
            units = LazyStream(
                _NIAH_NEEDLE.format(kind=kind, key=k, value=v) for k, v in zip(hay_keys, hay_values)
            )
            sep = "\n"

        def render(n: int) -> Rendered:
            context = sep.join(_interleave(units.take(n), needles))
            user = _NIAH_TEMPLATE.format(kind=kind, context=context, query=query)
            return render_prompt(tokenizer, user, answer_prefix)

        n, rendered = fit_units(render, length, max_new_tokens, what=self.name)
        meta = {"keys": keys, "values": values, "queries": queries, "needles": [t for _, t in needles],
                "haystack_units": n}
        return self._sample(tokenizer, length, seed, max_new_tokens, rendered, references, answer_prefix, meta,
                            _NIAH_QUESTION.format(kind=kind, query=query))


_VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    + _VT_QUESTION
)
_VT_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, "
    "{num} variables are assigned the value {query}, they are:"
)


@dataclass(frozen=True, kw_only=True)
class VariableTrackingTask(RulerTask):
    """Variable tracking: ``num_chains`` chains of ``num_hops`` hops hidden in filler.

    A chain is ``VAR ABCDE = 12345.`` then ``VAR FGHIJ = VAR ABCDE.`` and so on (names: five
    upper-case letters; values: five digits); its statements keep their order and sit at
    seeded random places. The first chain's value is asked; its ``num_hops + 1`` names are
    the references. Extra chains (if any) are distractors, interleaved at random.
    """

    num_chains: int = 1
    num_hops: int = 4
    name_length: int = 5

    def _build(self, tokenizer: Any, length: int, seed: int | str, max_new_tokens: int) -> RulerSample:
        rng = _rng(self.name, seed)
        names_used: set[str] = set()
        values_used: set[str] = set()
        chains: list[list[str]] = []
        statements: list[list[str]] = []
        for _ in range(self.num_chains):
            names: list[str] = []
            while len(names) < self.num_hops + 1:
                name = "".join(rng.choices(string.ascii_uppercase, k=self.name_length))
                if name not in names_used and name != "VAR":
                    names_used.add(name)
                    names.append(name)
            value = str(rng.randint(10_000, 99_999))
            while value in values_used:
                value = str(rng.randint(10_000, 99_999))
            values_used.add(value)
            chains.append(names)
            statements.append(
                [f"VAR {names[0]} = {value}."] + [f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(self.num_hops)]
            )
        query = statements[0][0].split(" = ")[1].rstrip(".")
        # random interleaving of the chains, each chain in order
        pending = [list(s) for s in statements]
        ordered: list[str] = []
        while any(pending):
            chain = rng.choice([p for p in pending if p])
            ordered.append(chain.pop(0))
        fractions = sorted(rng.random() for _ in ordered)
        inserts = list(zip(fractions, ordered))
        units = LazyStream(iter_filler(f"ruler:{self.name}:{seed}"))
        answer_prefix = _VT_PREFIX.format(num=self.num_hops + 1, query=query)

        def render(n: int) -> Rendered:
            context = " ".join(_interleave(units.take(n), inserts))
            return render_prompt(tokenizer, _VT_TEMPLATE.format(context=context, query=query), answer_prefix)

        n, rendered = fit_units(render, length, max_new_tokens, what=self.name)
        meta = {"value": query, "chains": chains, "statements": ordered, "haystack_units": n}
        return self._sample(tokenizer, length, seed, max_new_tokens, rendered, list(chains[0]), answer_prefix, meta,
                            _VT_QUESTION.format(query=query))


_CWE_QUESTION = "Question: What are the {num} most common words in the above list?"
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n" + _CWE_QUESTION
)
_CWE_PREFIX = "Answer: The top {num} words that appear most often in the list are:"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _iter_made_up_words(rng: random.Random, avoid: Sequence[str]) -> Iterator[str]:
    """Pronounceable six-letter words (``bakotu``) that never contain, nor hide in, a word of ``avoid``."""
    seen: set[str] = set(avoid)
    while True:
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))
        if word in seen or any(w in word or word in w for w in avoid):
            continue
        seen.add(word)
        yield word


@dataclass(frozen=True, kw_only=True)
class CommonWordsTask(RulerTask):
    """Common words extraction: a numbered list ``1. word 2. word ...``.

    ``num_common`` words occur ``common_repeats`` times each and the others ``uncommon_repeats``
    times each, shuffled; the common words are the references. The number of rare words is
    fitted to the length. ``common_repeats`` is used as given when the list can also hold at
    least as many rare entries as common ones; otherwise it is lowered step by step (down to
    ``3 * uncommon_repeats``), then, like RULER for short contexts, rare words occur once and
    common ones down to three times. Words: 671 built-in English words in seeded order, then
    made-up pronounceable words when more are needed (beyond about 30k tokens).
    """

    num_common: int = 10
    common_repeats: int = 30
    uncommon_repeats: int = 3

    def _plans(self) -> list[tuple[int, int]]:
        """(common, uncommon) repeat counts, most to least demanding."""
        floor = 3 * self.uncommon_repeats
        plans = [(c, self.uncommon_repeats) for c in range(self.common_repeats, floor - 1, -1)]
        if self.uncommon_repeats > 1:
            plans += [(c, 1) for c in range(min(self.common_repeats, floor - 1), 2, -1)]
        return plans or [(self.common_repeats, self.uncommon_repeats)]

    def _build(self, tokenizer: Any, length: int, seed: int | str, max_new_tokens: int) -> RulerSample:
        rng = _rng(self.name, seed)
        builtin = list(_ADJECTIVES + _NOUNS)
        rng.shuffle(builtin)
        extra = _iter_made_up_words(_rng(self.name, seed, "extra"), builtin)
        pool = LazyStream(itertools.chain(builtin, extra))
        num = self.num_common
        answer_prefix = _CWE_PREFIX.format(num=num)

        def words_for(plan: tuple[int, int], n_rare: int) -> tuple[list[str], list[str]]:
            chosen = pool.take(num + n_rare)
            pick = _rng(self.name, seed, f"pick:{n_rare}")
            common_idx = set(pick.sample(range(len(chosen)), num))
            common = [w for i, w in enumerate(chosen) if i in common_idx]
            rare = [w for i, w in enumerate(chosen) if i not in common_idx]
            entries = common * plan[0] + rare * plan[1]
            pick.shuffle(entries)
            return common, entries

        def render_with(plan: tuple[int, int]) -> Callable[[int], Rendered]:
            def render(n_rare: int) -> Rendered:
                _, entries = words_for(plan, n_rare)
                context = " ".join(f"{i}. {w}" for i, w in enumerate(entries, 1))
                return render_prompt(tokenizer, _CWE_TEMPLATE.format(context=context, num=num), answer_prefix)

            return render

        def min_rare(plan: tuple[int, int]) -> int:
            return max(1, math.ceil(num * plan[0] / plan[1]))

        plans = self._plans()

        def plan_fits(i: int) -> bool:
            plan = plans[i]
            return len(render_with(plan)(min_rare(plan))[1]) <= length - max_new_tokens

        # first (most demanding) plan that fits: the minimal size shrinks along the list
        lo, hi = 0, len(plans) - 1
        if not plan_fits(hi):
            lo = hi  # let fit_units raise with the smallest plan's size
        while lo < hi:
            mid = (lo + hi) // 2
            if plan_fits(mid):
                hi = mid
            else:
                lo = mid + 1
        plan = plans[lo]
        n_rare, rendered = fit_units(render_with(plan), length, max_new_tokens, what=self.name, n_min=min_rare(plan))
        common, _ = words_for(plan, n_rare)
        meta = {"common_repeats": plan[0], "uncommon_repeats": plan[1], "num_uncommon": n_rare}
        return self._sample(tokenizer, length, seed, max_new_tokens, rendered, common, answer_prefix, meta,
                            _CWE_QUESTION.format(num=num))


_FWE_QUESTION = (
    "Question: Do not provide any explanation. Please ignore the dots '{noise}'. "
    "What are the {num} most frequently appeared words in the above coded text?"
)
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the {num} most frequently appeared coded words. {context}\n" + _FWE_QUESTION
)
_FWE_PREFIX = "Answer: According to the coded text above, the {num} most frequently appeared words are:"
_NUMBER_WORDS: Mapping[int, str] = MappingProxyType(
    {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
)


def _zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for ``s > 1`` (partial sum plus Euler-Maclaurin tail)."""
    return sum(k**-s for k in range(1, terms)) + terms ** (1 - s) / (s - 1) + terms**-s / 2


@dataclass(frozen=True, kw_only=True)
class FrequentWordsTask(RulerTask):
    """Frequent words extraction: coded words with Zipf counts.

    A seeded vocabulary of ``length // 50`` random ``word_length``-letter words is ranked;
    with ``N`` words in all, rank ``k`` occurs ``floor(N * k**-alpha / zeta(alpha))`` times
    (rank 1 is the noise word ``....``, which the question says to ignore); the words are
    shuffled and joined by spaces. The references are ranks 2 to ``num_answers + 1``; ``N``
    is fitted to the length, and is at least large enough for those ranks' counts to be
    strictly decreasing down to the next rank.
    """

    num_answers: int = 3
    alpha: float = 2.0
    word_length: int = 6
    noise: str = "...."

    def _counts(self, total: int, vocab_size: int, zeta: float) -> list[int]:
        return [math.floor(total * k**-self.alpha / zeta) for k in range(1, vocab_size + 1)]

    def _build(self, tokenizer: Any, length: int, seed: int | str, max_new_tokens: int) -> RulerSample:
        rng = _rng(self.name, seed)
        vocab_size = max(length // 50, self.num_answers + 3)
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < vocab_size - 1:
            word = "".join(rng.choices(string.ascii_lowercase, k=self.word_length))
            if word not in seen:
                seen.add(word)
                vocab.append(word)
        vocab.insert(0, self.noise)
        zeta = _zeta(self.alpha)
        top = self.num_answers + 2  # ranks 1..top must have distinct counts

        n_min = 2 * top
        while True:
            counts = self._counts(n_min, top, zeta)
            if all(counts[k] > counts[k + 1] for k in range(1, top - 1)):
                break
            n_min += 1

        num = _NUMBER_WORDS.get(self.num_answers, str(self.num_answers))
        answer_prefix = _FWE_PREFIX.format(num=num)

        def words_for(total: int) -> list[str]:
            counts = self._counts(total, vocab_size, zeta)
            words = [w for w, c in zip(vocab, counts) for _ in range(c)]
            _rng(self.name, seed, f"shuffle:{total}").shuffle(words)
            return words

        def render(total: int) -> Rendered:
            context = " ".join(words_for(total))
            user = _FWE_TEMPLATE.format(num=num, context=context, noise=self.noise)
            return render_prompt(tokenizer, user, answer_prefix)

        total, rendered = fit_units(render, length, max_new_tokens, what=self.name, n_min=n_min)
        references = vocab[1 : 1 + self.num_answers]
        meta = {"num_words": total, "vocab_size": vocab_size, "noise": self.noise}
        return self._sample(tokenizer, length, seed, max_new_tokens, rendered, references, answer_prefix, meta,
                            _FWE_QUESTION.format(num=num, noise=self.noise))


# ---------------------------------------------------------------- registry
def _registry() -> dict[str, RulerTask]:
    niah = [
        NiahTask(name="niah_single_number", max_new_tokens=32, value_kind="number"),
        NiahTask(name="niah_single_word", max_new_tokens=32, value_kind="word"),
        NiahTask(name="niah_single_uuid", max_new_tokens=64, value_kind="uuid"),
        NiahTask(name="niah_multikey_number", max_new_tokens=32, num_keys=4),
        NiahTask(name="niah_multikey_distractor", max_new_tokens=32, haystack="needles"),
        NiahTask(name="niah_multikey_uuid", max_new_tokens=64, key_kind="uuid", value_kind="uuid", haystack="needles"),
        NiahTask(name="niah_multivalue", max_new_tokens=96, num_values=4),
        NiahTask(name="niah_multiquery", max_new_tokens=96, num_keys=4, num_queries=4),
    ]
    others: list[RulerTask] = [
        VariableTrackingTask(name="vt", max_new_tokens=30),
        CommonWordsTask(name="cwe", max_new_tokens=120),
        FrequentWordsTask(name="fwe", max_new_tokens=50),
    ]
    return {task.name: task for task in [*niah, *others]}


#: Task builders by name (read-only): ``TASKS[name](tokenizer, length, seed, max_new_tokens=None)``.
TASKS: Mapping[str, RulerTask] = MappingProxyType(_registry())

#: Default ``max_new_tokens`` per task (RULER: 128 for NIAH, 30 vt, 120 cwe, 50 fwe).
DEFAULT_MAX_NEW_TOKENS: Mapping[str, int] = MappingProxyType(
    {name: task.max_new_tokens for name, task in TASKS.items()}
)


def make_sample(
    task: str, tokenizer: Any, length: int, seed: int | str = 0, max_new_tokens: int | None = None
) -> RulerSample:
    """Build one sample of ``task`` whose tokens plus ``max_new_tokens`` fit in ``length``.

    Args:
        task: a name of :data:`TASKS`.
        tokenizer: an HF tokenizer (needs ``encode``; ``apply_chat_template`` is used when
            ``tokenizer.chat_template`` is set: the user turn holds the context and the
            question, the assistant turn starts with the pre-filled answer prefix).
        length: target total length in tokens (prompt + generated tokens).
        seed: picks keys, values, positions and haystack; same seed, same sample.
        max_new_tokens: room left for the answer; ``None`` = the task's default
            (:data:`DEFAULT_MAX_NEW_TOKENS`).

    Raises :class:`~kvtools.errors.ConfigError` for an unknown task or a bad length, and
    :class:`~kvtools.errors.InputTooLongError` when ``length`` cannot hold the task's
    smallest sample plus ``max_new_tokens``.

    >>> s = make_sample("vt", tokenizer, 2048, seed=3)  # doctest: +SKIP
    >>> s.n_tokens + s.max_new_tokens <= 2048, len(s.references)  # doctest: +SKIP
    (True, 5)
    """
    if task not in TASKS:
        close = difflib.get_close_matches(str(task), list(TASKS), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"task: unknown RULER task {task!r}; allowed: {', '.join(TASKS)}{hint}")
    return TASKS[task](tokenizer, length, seed, max_new_tokens)
