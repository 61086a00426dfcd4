"""RULER-style synthetic tasks: length fit, determinism, ground truth in the context, scoring, errors.

No real model: an HF tokenizer built in memory (word level over whitespace/punctuation,
with a jinja chat template), and the same without a template.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from kvtools.errors import ConfigError, InputTooLongError
from kvtools.eval import ruler
from kvtools.eval.haystack import filler_sentences
from kvtools.eval.ruler import (
    DEFAULT_MAX_NEW_TOKENS,
    TASKS,
    make_sample,
    score,
    string_match_all,
    string_match_part,
)

from .helpers import word_tokenizer

ALL_TASKS = [
    "niah_single_number", "niah_single_word", "niah_single_uuid", "niah_multikey_number",
    "niah_multikey_distractor", "niah_multikey_uuid", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
]
NIAH_TASKS = [t for t in ALL_TASKS if t.startswith("niah")]
VALUE_PATTERNS = {
    "number": r"\d{7}",
    "word": r"[a-z]+-[a-z]+",
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
}


def hf_tokenizer(chat: bool = True):
    words = {w for s in filler_sentences(2000, seed=0) for w in re.findall(r"\w+|[^\w\s]+", s)}
    words |= set(ruler._ADJECTIVES) | set(ruler._NOUNS) | {"VAR", "=", "-", "....", ":", "?", "'"}
    return word_tokenizer(words, chat)


@pytest.fixture(scope="module")
def tok():
    return hf_tokenizer()


def user_content(sample) -> str:
    return sample.text.split("<s>user\n", 1)[1].split("</s>", 1)[0]


def context_of(sample) -> str:
    """The haystack part of the user turn (between the instructions and the question)."""
    content = user_content(sample)
    if sample.task == "fwe":
        return content.split("coded words. ", 1)[1].rsplit("\nQuestion:", 1)[0]
    if sample.task == "vt":
        return content.split("\n\n", 1)[1].rsplit("\nQuestion:", 1)[0]
    body = content.split("\n", 1)[1]
    return body.rsplit("\n", 1)[0]


# ---------------------------------------------------------------- registry
def test_registry_names_and_defaults():
    assert list(TASKS) == ALL_TASKS
    assert set(DEFAULT_MAX_NEW_TOKENS) == set(ALL_TASKS)
    assert (DEFAULT_MAX_NEW_TOKENS["vt"], DEFAULT_MAX_NEW_TOKENS["cwe"], DEFAULT_MAX_NEW_TOKENS["fwe"]) == (30, 120, 50)
    assert all(16 <= DEFAULT_MAX_NEW_TOKENS[t] <= 128 for t in NIAH_TASKS)
    with pytest.raises(TypeError):
        TASKS["mine"] = TASKS["vt"]  # type: ignore[index]


def test_word_lists_are_clean():
    words = ruler._ADJECTIVES + ruler._NOUNS
    assert len(set(words)) == len(words) > 600
    assert all(re.fullmatch(r"[a-z]{4,}", w) for w in words)
    assert not [(a, b) for a in words for b in words if a != b and a in b], "no word may hide inside another"
    fields = dict(kind="numbers words uuids", context="", query="", num=10)
    templates = " ".join(
        t.format(**fields) for t in (ruler._NIAH_TEMPLATE, ruler._NIAH_PREFIX, ruler._CWE_TEMPLATE, ruler._CWE_PREFIX)
    ).lower()
    assert not [w for w in words if w in templates]
    assert not any("-" in s for s in filler_sentences(2000, seed=3)), "word keys (adj-noun) can't occur in filler"


# ---------------------------------------------------------------- length fit and determinism
@pytest.mark.parametrize("task", ALL_TASKS)
def test_fits_length_closely(tok, task):
    for length in (512, 1500, 4096):
        s = make_sample(task, tok, length, seed=length)
        assert s.task == task and s.length == length and s.max_new_tokens == DEFAULT_MAX_NEW_TOKENS[task]
        assert s.n_tokens == len(s.input_ids) == len(tok.encode(s.text, add_special_tokens=False))
        assert s.input_ids == tok.encode(s.text, add_special_tokens=False)
        assert s.n_tokens + s.max_new_tokens <= length
        assert s.n_tokens + s.max_new_tokens >= 0.95 * length, "the haystack should fill the length"
        assert s.text.startswith("<s>user\n") and s.text.endswith(f"</s>\n<s>assistant\n{s.answer_prefix}")
        assert s.metric == "string_match_all" and s.references


@pytest.mark.parametrize("task", ALL_TASKS)
def test_deterministic_per_seed_and_varied_across_seeds(tok, task):
    a, b = make_sample(task, tok, 1024, seed=5), make_sample(task, tok, 1024, seed=5)
    assert (a.text, a.input_ids, a.references) == (b.text, b.input_ids, b.references)
    others = [make_sample(task, tok, 1024, seed=s) for s in (6, 7)]
    assert all(o.text != a.text for o in others)
    assert len({tuple(x.references) for x in [a, *others]}) == 3


def test_max_new_tokens_override_and_plain_tokenizer():
    plain = hf_tokenizer(chat=False)
    s = make_sample("niah_multivalue", plain, 700, seed=1, max_new_tokens=128)
    assert s.max_new_tokens == 128 and s.n_tokens + 128 <= 700 and s.n_tokens + 128 >= 0.95 * 700
    assert "<s>" not in s.text and s.text.endswith(f"mentioned in the provided text?\n{s.answer_prefix}")
    assert s.input_ids == plain.encode(s.text)


# ---------------------------------------------------------------- ground truth
@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_needles_and_asked_keys_present(tok, task):
    spec = TASKS[task]
    for seed in (0, 1):
        s = make_sample(task, tok, 1024, seed=seed)
        content, context = user_content(s), context_of(s)
        keys, values, queries = s.meta["keys"], s.meta["values"], s.meta["queries"]
        assert len(keys) == spec.num_keys and len(queries) == spec.num_queries and set(queries) <= set(keys)
        assert all(len(v) == spec.num_values for v in values)
        assert len(s.references) == spec.num_queries * spec.num_values
        question = content.rsplit("\n", 1)[1]
        assert all(q in question for q in queries) and all(q in s.answer_prefix for q in queries)
        kind = {"numbers": "number", "words": "word", "uuids": "uuid"}[question.split("special magic ")[1].split()[0]]
        for key, vals in zip(keys, values):
            for v in vals:
                assert re.fullmatch(VALUE_PATTERNS[kind], v)
                needle = f"One of the special magic {kind}s for {key} is: {v}."
                assert context.count(needle) == 1
        for ref in s.references:
            assert context.count(ref) == 1, "each answer occurs exactly once"
        if spec.haystack == "needles":
            lines = context.split("\n")
            assert len(lines) > 20
            key_re, value_re = VALUE_PATTERNS[spec.key_kind], VALUE_PATTERNS[kind]
            pattern = rf"One of the special magic {kind}s for {key_re} is: {value_re}\."
            assert all(re.fullmatch(pattern, line) for line in lines), "only needle-like lines, no filler"
            asked_lines = [line for line in lines if f" for {queries[0]} is:" in line]
            assert len(asked_lines) == spec.num_values
        else:
            assert context.count("One of the special magic") == spec.num_keys * spec.num_values
            if kind == "number":
                assert set(re.findall(r"\d+", context)) == {v for vals in values for v in vals}


def test_niah_needles_land_at_varied_depths(tok):
    positions = []
    for seed in range(12):
        s = make_sample("niah_single_number", tok, 2048, seed=seed)
        context = context_of(s)
        positions.append(context.index(s.meta["needles"][0]) / len(context))
    assert min(positions) < 0.3 and max(positions) > 0.7


def test_vt_chain_reaches_every_reference(tok):
    for length, seed in ((512, 0), (2048, 1), (4096, 2)):
        s = make_sample("vt", tok, length, seed=seed)
        context = context_of(s)
        value = s.meta["value"]
        assert f"assigned the value {value} in the text above" in user_content(s)
        statements = re.findall(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d{5}))\.", context)
        assert len(statements) == 5 and context.count("VAR ") == 5 + 4
        bound: dict[str, str] = {}
        for name, source, number in statements:  # in text order: a hop follows its source
            assert number or source in bound
            bound[name] = number or bound[source]
        assert sorted(n for n, v in bound.items() if v == value) == sorted(s.references)
        assert len(set(s.references)) == 5
        assert f"5 variables are assigned the value {value}" in s.answer_prefix
        assert len(context) > 10 * len(" ".join(statements[0])), "the chain is hidden in filler"


@pytest.mark.parametrize("length", [512, 1024, 4096, 12000])
def test_cwe_common_words_are_the_ten_most_frequent(tok, length):
    s = make_sample("cwe", tok, length, seed=length)
    entries = re.findall(r"(\d+)\. (\S+)", context_of(s))
    assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
    counts = Counter(w for _, w in entries)
    assert len(s.references) == 10 and len(set(s.references)) == 10
    assert {w for w, _ in counts.most_common(10)} == set(s.references)
    rare = [c for w, c in counts.items() if w not in s.references]
    assert rare and min(counts[w] for w in s.references) > max(rare)
    assert all(counts[w] == s.meta["common_repeats"] for w in s.references)
    assert set(rare) == {s.meta["uncommon_repeats"]} and len(rare) == s.meta["num_uncommon"]
    if length >= 4096:
        assert (s.meta["common_repeats"], s.meta["uncommon_repeats"]) == (30, 3)
    if length == 512:
        assert s.meta["common_repeats"] < 30
    if length == 12000:  # more words than the built-in list: made-up ones join
        assert s.meta["num_uncommon"] + 10 > len(ruler._ADJECTIVES + ruler._NOUNS)
        words = list(counts)
        assert not [(a, b) for a in words for b in words if a != b and a in b]


@pytest.mark.parametrize("length", [300, 1024, 4096])
def test_fwe_references_are_the_three_most_frequent(tok, length):
    s = make_sample("fwe", tok, length, seed=length)
    words = context_of(s).split()
    counts = Counter(words)
    assert counts.most_common(1)[0][0] == "...."
    del counts["...."]
    ranked = counts.most_common()
    assert [w for w, _ in ranked[:3]] == s.references
    assert ranked[0][1] > ranked[1][1] > ranked[2][1] > ranked[3][1]
    assert all(re.fullmatch(r"[a-z]{6}", w) for w in counts)


# ---------------------------------------------------------------- scoring
def test_string_match_all_and_part():
    refs = ["apple", "Pear", "1234567"]
    assert string_match_all("APPLE, pear and 1234567", refs) == 1.0
    assert string_match_all("apple and a plum", refs) == pytest.approx(1 / 3)
    assert string_match_all("", refs) == 0.0
    assert string_match_part("only pear here", refs) == 1.0
    assert string_match_part("123456", refs) == 0.0
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_score_sample(tok):
    s = make_sample("niah_multiquery", tok, 600, seed=2)
    assert score(s, " " + ", ".join(s.references) + ".") == 1.0
    assert score(s, f" {s.references[0]} and {s.references[2]}") == 0.5
    assert score(s, " I do not know.") == 0.0
    c = make_sample("cwe", tok, 1024, seed=2)
    assert score(c, " " + " ".join(w.upper() for w in c.references[:7])) == pytest.approx(0.7)


# ---------------------------------------------------------------- errors
def test_errors(tok):
    with pytest.raises(InputTooLongError, match="use a length of at least"):
        make_sample("cwe", tok, 250)
    with pytest.raises(InputTooLongError, match="too short"):
        make_sample("niah_single_number", tok, 60)
    with pytest.raises(InputTooLongError):
        make_sample("fwe", tok, 100)
    with pytest.raises(ConfigError, match=r"allowed: niah_single_number.*did you mean 'niah_single_number'"):
        make_sample("niah_single_numbr", tok, 1024)
    with pytest.raises(ConfigError, match="unknown RULER task"):
        make_sample("qa_1", tok, 1024)
    with pytest.raises(ConfigError, match="length"):
        make_sample("vt", tok, 0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        make_sample("vt", tok, 1024, max_new_tokens=0)
