"""InfiniteBench: synthetic tasks (fit, determinism, needle placement), real-data loading and scoring.

Offline: the byte-level tokenizer of test_longbench (with and without a chat template),
fixtures written to tmp_path and read through the real loader.
"""

from __future__ import annotations

import json
import re

import pytest

from kvtools.errors import ConfigError, InputTooLongError
from kvtools.eval.infinitebench import (
    REAL_TASKS,
    SYNTHETIC_TASKS,
    TASK_MAX_NEW_TOKENS,
    TASKS,
    choice_letter,
    generate_synthetic,
    load_infinitebench,
    make_synthetic,
    prepare_prompt,
    score_example,
)

from .helpers import needs_datasets, write_jsonl

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# ---------------------------------------------------------------- synthetic tasks
#: tokens one filler unit takes with the byte tokenizer (noise line / JSON pair), plus margin
UNIT = {"passkey": 110, "number_string": 110, "kv_retrieval": 90}


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
@pytest.mark.parametrize("length", [700, 3000])
@pytest.mark.parametrize("chat", [True, False])
def test_synthetic_fits_length(task, length, chat, tok, plain_tok):
    tokenizer = tok if chat else plain_tok
    s = make_synthetic(task, tokenizer, length, seed=3, depth=40)
    p = s.prompt
    assert p.max_new_tokens == TASK_MAX_NEW_TOKENS[task] and p.chat == chat and not p.truncated
    assert p.n_tokens + p.max_new_tokens <= length
    assert p.n_tokens + p.max_new_tokens > length - UNIT[task]  # the largest filler that fits
    assert tokenizer.encode(p.text, add_special_tokens=not chat) == p.input_ids
    assert s.length == length and s.n_units >= 1
    assert p.text.startswith("<s>user\n") == chat


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_synthetic_deterministic(task, tok):
    a = make_synthetic(task, tok, 1500, seed=7, depth=30)
    b = make_synthetic(task, tok, 1500, seed=7, depth=30)
    c = make_synthetic(task, tok, 1500, seed=8, depth=30)
    assert a == b
    assert a.answer != c.answer
    d = make_synthetic(task, tok, 1500, seed=7)  # seeded random depth
    assert d == make_synthetic(task, tok, 1500, seed=7) and 0 <= d.depth <= 100


def test_passkey_and_number_string_needle(tok):
    for task, digits in (("passkey", 5), ("number_string", 10)):
        for depth in (0, 50, 100):
            s = make_synthetic(task, tok, 2500, seed=1, depth=depth)
            key = s.answer
            assert re.fullmatch(rf"[1-9]\d{{{digits - 1}}}", key)
            context = s.example["context"]
            assert context.count(key) == 2 and s.prompt.text.count(key) == 2  # "... is KEY. ... KEY is ..."
            assert key not in s.example["input"]
            # the needle sits at the requested depth of the noise lines
            lines = context.splitlines()
            at = next(i for i, line in enumerate(lines) if key in line)
            assert at == round(depth / 100 * s.n_units)
            assert s.depth_actual == pytest.approx(depth, abs=100 / s.n_units)
        assert s.prompt.text.endswith("The pass key is" if task == "passkey" else "The sequence of digits is")


def test_kv_retrieval_format(tok):
    for depth in (0, 50, 100):
        s = make_synthetic("kv_retrieval", tok, 3000, seed=2, depth=depth)
        assert s.example["context"].startswith("JSON data:\n{")
        data = json.loads(s.example["context"].split("\n", 1)[1])
        assert len(data) == s.n_units >= 10
        assert all(UUID.fullmatch(k) and UUID.fullmatch(v) for k, v in data.items())
        key = re.search(r'Key: "([^"]+)"', s.example["input"]).group(1)
        assert data[key] == s.answer and s.answer not in s.example["input"]
        assert list(data).index(key) == round(depth / 100 * (s.n_units - 1))
        assert f'"{key}": "{s.answer}"' in s.prompt.text


def test_generate_synthetic_spreads_depths(tok):
    samples = generate_synthetic("passkey", tok, 1200, 5, seed=4)
    assert [s.depth for s in samples] == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert len({s.answer for s in samples}) == 5
    assert all(s.prompt.n_tokens + s.prompt.max_new_tokens <= 1200 for s in samples)
    assert [s.depth for s in generate_synthetic("kv_retrieval", tok, 1200, 2, depths=[10, 90])] == [10.0, 90.0]
    with pytest.raises(ConfigError, match="depths"):
        generate_synthetic("passkey", tok, 1200, 2, depths=[10])


def test_synthetic_errors(tok):
    with pytest.raises(InputTooLongError, match="smallest passkey prompt"):
        make_synthetic("passkey", tok, 100)
    with pytest.raises(InputTooLongError, match="context"):
        make_synthetic("passkey", tok, 5000, max_context=4096)
    with pytest.raises(ConfigError, match="not synthetic"):
        make_synthetic("longbook_qa_eng", tok, 1000)
    with pytest.raises(ConfigError, match="depth"):
        make_synthetic("passkey", tok, 1000, depth=120)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_synthetic_answer_scores(task, tok):
    s = make_synthetic(task, tok, 1000, seed=5, depth=50)
    assert score_example(task, f" {s.answer}.", s.example) == 1.0
    assert score_example(task, "I don't know", s.example) == 0.0
    # the prompt rebuilt from the example (as for hub data) is the same prompt
    assert prepare_prompt(task, s.example, tok, 10_000).text == s.prompt.text


# ---------------------------------------------------------------- scoring rules
def test_retrieval_scoring():
    assert score_example("passkey", " 12345. Remember it.", {"answer": ["12345"]}) == 1.0
    assert score_example("passkey", " 54321, not 12345", {"answer": ["12345"]}) == 0.0  # first integer only
    assert score_example("number_string", "is 1234567890", {"answer": ["1234567890"]}) == 1.0
    assert score_example("number_string", "is 123456789", {"answer": ["1234567890"]}) == 0.0
    uid = "0b9a1e2c-1111-4222-8333-444455556666"
    assert score_example("kv_retrieval", f'The value is "{uid}".', {"answer": [uid]}) == 1.0
    assert score_example("kv_retrieval", uid[:-1], {"answer": [uid]}) == 0.0


def test_choice_scoring():
    ex = {"options": ["Alice", "Bob", "Carol", "Dave"], "answer": ["Carol"]}
    assert choice_letter(ex) == "C" and choice_letter({"answer": ["B"]}) == "B"
    for pred, want in [
        ("C", 1.0), ("C. Carol", 1.0), ("(C)", 1.0), ("The answer is: C", 1.0), ("Option C is right", 1.0),
        ("B", 0.0), ("I think it is Carol.", 1.0), ("Carol or Bob", 0.0), ("no idea", 0.0),
    ]:  # fmt: skip
        assert score_example("longbook_choice_eng", pred, ex) == want, pred
    debug = {"options": ["func_a", "func_b", "func_c", "func_d"], "answer": ["func_b"]}
    assert score_example("code_debug", "B", debug) == 1.0
    assert score_example("code_debug", "The buggy one is func_b", debug) == 1.0
    assert score_example("code_debug", "A", debug) == 0.0


def test_other_real_task_scoring():
    assert score_example("longbook_qa_eng", "The old lighthouse", {"answer": ["old lighthouse"]}) == 1.0
    assert score_example("longbook_qa_chn", "北京", {"answer": ["北京市"]}) == pytest.approx(0.8)
    summary = {"answer": ["the cat lay on a mat"]}
    assert score_example("longbook_sum_eng", "the cat sat on the mat", summary) == pytest.approx(2 / 3)
    assert score_example("longdialogue_qa_eng", "It is probably hamlet.", {"answer": ["HAMLET"]}) == 1.0
    assert score_example("longdialogue_qa_eng", "Ophelia", {"answer": ["HAMLET"]}) == 0.0
    assert score_example("math_find", "The largest is 97.", {"answer": ["97"]}) == 1.0
    assert score_example("math_find", "2.5", {"answer": ["2.50"]}) == 1.0
    assert score_example("math_find", "12 then 97", {"answer": ["97"]}) == 0.0
    assert score_example("math_calc", "[1, 4, 8, 3]", {"answer": ["1", "4", "9", "3"]}) == 0.5  # stops at a mistake
    assert score_example("math_calc", "1, 4, 9, 3", {"answer": [1, 4, 9, 3]}) == 1.0
    assert score_example("code_run", "After tracing: 5, then -12", {"answer": ["-12"]}) == 1.0
    assert score_example("code_run", "-12 and finally 5", {"answer": ["-12"]}) == 0.0
    with pytest.raises(ConfigError, match="unknown InfiniteBench task"):
        score_example("nope", "", {})


# ---------------------------------------------------------------- real-data loading and prompts
@needs_datasets
def test_load_local_and_prompt(tmp_path, tok):
    rows = [
        {"id": i, "context": f"Chapter {i}. " + "Words of the book. " * 200, "input": f"Who wrote letter {i}?",
         "answer": ["Carol"], "options": ["Alice", "Bob", "Carol", "Dave"]}
        for i in range(3)
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "longbook_choice_eng.jsonl", rows)
    data = load_infinitebench("longbook_choice_eng", path, cache_dir=tmp_path / "cache")
    assert len(data) == 3 and data[1]["options"][2] == "Carol"
    assert len(load_infinitebench("longbook_choice_eng", tmp_path, limit=2, cache_dir=tmp_path / "cache")) == 2
    ex = data[0]
    p = prepare_prompt("longbook_choice_eng", ex, tok, 600)
    assert p.truncated and p.n_tokens <= 600 and p.max_new_tokens == 40
    for needle in ("Chapter 0.", "Question: Who wrote letter 0?", "A. Alice", "D. Dave"):
        assert needle in p.text
    whole = prepare_prompt("longbook_choice_eng", ex, tok, 100_000)
    assert ex["context"] in whole.text and whole.max_new_tokens == 40 and not whole.truncated
    assert score_example("longbook_choice_eng", "C", ex) == 1.0


@needs_datasets
def test_load_from_hub_id(monkeypatch):
    """The hub is not reached here: check that only the task's file is asked for, with the common schema."""
    import datasets

    import kvtools.models

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([{"id": 0, "context": "c", "input": "i", "answer": ["1"], "options": []}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(kvtools.models, "hub_unreachable", lambda *a, **k: None)  # as if online
    assert len(load_infinitebench("passkey")) == 1
    path, kwargs = calls[-1]
    assert path == "xinrongzhang2022/InfiniteBench" and kwargs["split"] == "passkey"
    assert kwargs["data_files"] == {"passkey": "passkey.jsonl"}
    assert set(kwargs["features"]) == {"id", "context", "input", "answer", "options"}


@needs_datasets
def test_load_errors(tmp_path):
    bad = write_jsonl(tmp_path / "passkey.jsonl", [{"context": "x", "input": "y"}])
    with pytest.raises(ConfigError, match="answer"):
        load_infinitebench("passkey", bad, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="unknown InfiniteBench task"):
        load_infinitebench("nope", bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_infinitebench("passkey", tmp_path / "missing.jsonl")


@pytest.mark.parametrize("task", REAL_TASKS)
def test_every_real_task_prompts(task, tok):
    ex = {"id": 0, "context": "Some long context.", "input": "A question?", "answer": ["x"],
          "options": ["o1", "o2", "o3", "o4"]}  # fmt: skip
    p = prepare_prompt(task, ex, tok, 10_000)
    assert "Some long context." in p.text and p.max_new_tokens == TASK_MAX_NEW_TOKENS[task]
    assert ("A question?" in p.text) == (task not in {"longbook_sum_eng", "math_calc"})
    assert ("o4" in p.text) == (task in {"longbook_choice_eng", "code_debug"})
    assert set(TASKS) == set(TASK_MAX_NEW_TOKENS)
