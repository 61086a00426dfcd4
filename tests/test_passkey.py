"""Passkey retrieval: prompt shape, depth, length fit, determinism, scoring, errors (no real model)."""

from __future__ import annotations

import re

import pytest

from kvtools.errors import ConfigError, InputTooLongError
from kvtools.eval.haystack import filler_sentences
from kvtools.eval.passkey import (
    ANSWER_PREFIX,
    PASSKEY_LINE,
    TASK_DESCRIPTION,
    first_integer,
    make_passkey,
    score,
    score_passkey,
)

from .helpers import word_tokenizer

def hf_tokenizer(chat: bool = True):
    words = {w for s in filler_sentences(2000, seed=0) for w in re.findall(r"\w+|[^\w\s]+", s)}
    words |= set(re.findall(r"\w+|[^\w\s]+", TASK_DESCRIPTION + PASSKEY_LINE + " What is the pass key?"))
    return word_tokenizer(words, chat)


@pytest.fixture(scope="module")
def tok():
    return hf_tokenizer()


def user_lines(sample) -> list[str]:
    return sample.text.split("<s>user\n", 1)[1].split("</s>", 1)[0].split("\n")


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_prompt_shape_depth_and_length(tok, depth):
    for length in (256, 1000, 4096):
        s = make_passkey(tok, length, depth, seed=length)
        assert s.n_tokens == len(s.input_ids) and s.input_ids == tok.encode(s.text, add_special_tokens=False)
        assert s.n_tokens + 8 <= length and s.max_new_tokens == 8
        if length >= 512:
            assert s.n_tokens + 8 >= 0.95 * length
        line = PASSKEY_LINE.format(passkey=s.passkey)
        assert s.references == [str(s.passkey)] and re.fullmatch(r"\d{5}", str(s.passkey))
        assert s.text.count(str(s.passkey)) == 2 and line in s.text
        assert s.text.endswith(f"<s>assistant\n{ANSWER_PREFIX}")
        lines = user_lines(s)
        assert lines[0] == TASK_DESCRIPTION and lines[-1] == "What is the pass key?"
        assert line in lines
        before = lines[1] if lines[1] != line else ""
        n_before = len(re.findall(r"[.!?](?= |$)", before))
        assert n_before == round(depth * s.n_sentences)
        assert s.depth_actual == pytest.approx(n_before / s.n_sentences)
        assert abs(s.depth_actual - depth) <= 1 / s.n_sentences
        if depth == 0.0:
            assert lines[1] == line
        if depth == 1.0:
            assert lines[-2] == line


def test_deterministic_and_varied(tok):
    a, b = make_passkey(tok, 1024, 0.5, seed=3), make_passkey(tok, 1024, 0.5, seed=3)
    assert (a.text, a.input_ids, a.passkey) == (b.text, b.input_ids, b.passkey)
    others = [make_passkey(tok, 1024, 0.5, seed=s) for s in range(4, 8)]
    assert len({o.passkey for o in [a, *others]}) == 5
    assert all(o.text != a.text for o in others)


def test_classic_filler_and_plain_tokenizer():
    plain = hf_tokenizer(chat=False)
    s = make_passkey(plain, 600, 0.5, seed=1, filler="classic")
    assert "The grass is green. The sky is blue." in s.text and "fisherman" not in s.text
    assert s.text.endswith("What is the pass key? The pass key is") and "<s>" not in s.text
    assert s.n_tokens + 8 <= 600 and s.n_tokens + 8 >= 0.95 * 600
    assert s.input_ids == plain.encode(s.text)


def test_scoring(tok):
    assert first_integer(" 48213. Remember it.") == 48213 and first_integer("none") is None
    assert score_passkey(" 48213.", 48213) == 1.0
    assert score_passkey("48213", "48213") == 1.0
    assert score_passkey(" 4821 or 48213", 48213) == 0.0
    assert score_passkey(" 482130", 48213) == 0.0
    assert score_passkey(" I do not know", 48213) == 0.0
    s = make_passkey(tok, 512, 0.3, seed=9)
    assert score(s, f" {s.passkey}. Remember it.") == 1.0
    assert score(s, f" {s.passkey + 1}") == 0.0


def test_errors(tok):
    with pytest.raises(InputTooLongError, match="use a length of at least"):
        make_passkey(tok, 40, 0.5)
    with pytest.raises(ConfigError, match="depth"):
        make_passkey(tok, 1024, 50)
    with pytest.raises(ConfigError, match="filler"):
        make_passkey(tok, 1024, 0.5, filler="essays")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_new_tokens"):
        make_passkey(tok, 1024, 0.5, max_new_tokens=0)
