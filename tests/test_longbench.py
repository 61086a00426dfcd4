"""LongBench v1/v2: metrics on hand-computed cases, loaders on local fixtures, prompts, truncation, summaries.

Offline: fixtures are written to tmp_path and read through the real loaders (``datasets``
json/parquet builders); the tokenizer is a byte-level one built in memory (one token per
UTF-8 byte, exact round trip), with and without a chat template.
"""

from __future__ import annotations

import json
import random
import sys
import zipfile

import pytest

from kvtools.errors import ConfigError, InputTooLongError
from kvtools.eval import metrics as M
from kvtools.eval.longbench import (
    NO_CHAT_TASKS,
    TASK_MAX_NEW_TOKENS,
    TASK_METRIC,
    TASKS,
    V2_MAX_NEW_TOKENS,
    V2_TASK,
    base_task,
    extract_choice,
    format_prompt,
    load_longbench,
    load_longbench_v2,
    prepare_prompt,
    score_example,
)
from kvtools.eval.prompting import truncate_middle

from .helpers import needs_datasets, write_jsonl


# ---------------------------------------------------------------- fixtures on disk
def v1_example(task: str, i: int = 0) -> dict:
    """A small, well-formed example of any v1 task."""
    zh = task in {"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"}
    answers = {
        "trec": ["Human being"], "lsht": ["体育"], "passage_count": ["3"],
        "passage_retrieval_en": ["Paragraph 2"], "passage_retrieval_zh": ["段落2"], "lcc": ["return x + 1"],
        "repobench-p": ["return x + 1"],
    }.get(task, ["北京" if zh else f"answer {i}"])  # fmt: skip
    classes = {"trec": ["Human being", "City", "Animal"], "lsht": ["体育", "财经"]}.get(task)
    return {
        "input": "这是问题？" if zh else f"Question number {i}?",
        "context": ("上下文" * 5) if zh else f"Context paragraph {i}. " * 5,
        "answers": answers,
        "length": 1000 * (i + 1),
        "all_classes": classes,
        "dataset": task,
        "language": "zh" if zh else "en",
        "_id": f"id{i}",
    }


def v2_example(i: int, difficulty: str, length: str) -> dict:
    return {
        "_id": f"v2-{i}", "domain": "Single-Document QA", "sub_domain": "Legal", "difficulty": difficulty,
        "length": length, "question": f"Which clause applies in case {i}?", "choice_A": "Clause one",
        "choice_B": "Clause two", "choice_C": "Clause three", "choice_D": "Clause four",
        "answer": "ABCD"[i % 4], "context": f"The contract text {i}. " * 10,
    }  # fmt: skip


# ---------------------------------------------------------------- metrics
# Scores of LongBench's own scorer (THUDM/LongBench, LongBench/metrics.py, run with rouge 1.0.1,
# jieba 0.42.1 and fuzzywuzzy 0.18.0 as its requirements.txt installs them) on these inputs.
OFFICIAL = [
    ("qa_f1_score", "The Eiffel Tower, in Paris.", "Eiffel Tower", None, 0.6666666666666666),
    ("qa_f1_score", "It was built in 1889 by Gustave Eiffel's company", "1889", None, 0.19999999999999998),
    ("qa_f1_zh_score", "北京是中华人民共和国的首都。", "首都北京", None, 0.0),
    ("qa_f1_zh_score", "他在二零一九年去了上海和杭州", "上海", None, 0.19999999999999998),
    ("qa_f1_zh_score", "。", "北京", None, 0.0),
    ("rouge_score", "The committee met on Monday. It discussed the budget and the new hires.",
     "On Monday the committee discussed the budget. New hires were approved.", None, 0.4545454495867769),
    ("rouge_score", "A short summary", "A short summary of a long meeting about budgets", None, 0.4999999962500001),
    ("rouge_score", "", "anything", None, 0.0),
    ("rouge_score", "the cat sat on the mat", "", None, 0.0),
    ("rouge_zh_score", "会议讨论了预算和新员工的招聘问题。", "会议主要讨论了明年的预算。", None, 0.5263157845983379),
    ("code_sim_score", "```python\n# comment\n    return self.value + 1\n", "    return self.value + 2", None, 0.96),
    ("code_sim_score", "x = compute(a, b)", "y = compute(b, a)", None, 0.82),
    ("code_sim_score", "    " + "result = transform(data[index], options=opts, verbose=False) + offset; " * 4,
     "    " + "result = transform(data[idx], options=options, verbose=True) + offset; " * 4, None, 0.1),
    ("classification_score", "Type: Human being", "Human being", ["Human being", "Animal", "City"], 1.0),
    ("classification_score", "Animal product or Animal or Food", "Animal product",
     ["Animal", "Animal product", "Food", "Product"], 0.5),
    ("classification_score", "Animal, product, Animal product", "Animal product",
     ["Animal", "product", "Animal product"], 0.5),
    ("retrieval_score", "Paragraph 12 and paragraph 3", "Paragraph 12", None, 0.5),
    ("retrieval_zh_score", "答案是段落5", "段落5", None, 1.0),
    ("count_score", "There are 7 unique paragraphs out of 9.", "7", None, 0.5),
]  # fmt: skip


@pytest.mark.parametrize("name,prediction,truth,classes,official", OFFICIAL)
def test_metrics_equal_the_official_scorer(name, prediction, truth, classes, official):
    assert getattr(M, name)(prediction, truth, all_classes=classes) == pytest.approx(official, abs=1e-12)


def test_normalize():
    assert M.normalize_answer("  The Quick, brown FOX!  ") == "quick brown fox"
    assert M.normalize_answer("An apple a day") == "apple day"
    assert M.normalize_zh_answer("北京，中国。 Hello！") == "北京中国hello"
    assert M.zh_tokens("北京是首都。") == ["北京", "是", "首都"]


def test_qa_f1_hand_computed():
    # [quick, brown, fox] vs [quick, brown, dog]: 2 common, P = R = 2/3
    assert M.qa_f1_score("The quick brown fox", "quick brown dog") == pytest.approx(2 / 3)
    # [cat, sat] vs [cat, sat, down]: P = 1, R = 2/3 -> F1 = 0.8
    assert M.qa_f1_score("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    assert M.qa_f1_score("Paris", "paris") == 1.0
    assert M.qa_f1_score("London", "Paris") == 0.0
    assert M.qa_f1_score("", "Paris") == 0.0
    assert M.qa_f1_score("the", "a") == 0.0  # both normalise to nothing
    # characters (InfiniteBench): 5 chars vs 4 chars, all 4 shared: P = 4/5, R = 1 -> 8/9
    assert M.qa_f1_zh_char_score("北京是首都", "首都北京") == pytest.approx(8 / 9)
    assert M.qa_f1_zh_char_score("上海。", "北京") == 0.0


def test_rouge_edges():
    assert M.rouge_score("", "something") == 0.0
    assert M.rouge_score("...", "something") == 0.0
    assert M.rouge_score("identical text here", "identical text here") == pytest.approx(1.0, abs=1e-6)
    assert M.rouge_zh_score("今天天气很好", "今天天气很好") == pytest.approx(1.0, abs=1e-6)
    assert M.rouge_score("alpha beta", "gamma delta") == 0.0


def test_metrics_name_the_missing_library(monkeypatch):
    M._rouge.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge", None)
    with pytest.raises(ImportError, match=r"kvtools\[eval\]"):
        M.rouge_score("a b", "a b")
    monkeypatch.undo()
    M._rouge.cache_clear()


def test_classification():
    classes = ["Animal", "Animal product", "City"]
    assert M.classification_score("Type: Animal product", "Animal product", all_classes=classes) == 1.0
    assert M.classification_score("Animal or City", "Animal", all_classes=classes) == 0.5
    assert M.classification_score("City", "Animal", all_classes=classes) == 0.0
    assert M.classification_score("no idea", "City", all_classes=classes) == 0.0
    assert M.classification_score("City", "City", all_classes=None) == 0.0


def test_retrieval_count():
    assert M.retrieval_score("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval_score("Paragraph 3 or Paragraph 5", "Paragraph 3") == 0.5
    assert M.retrieval_score("I do not know", "Paragraph 3") == 0.0
    assert M.retrieval_zh_score("答案是段落7", "段落7") == 1.0
    assert M.retrieval_zh_score("段落1", "段落7") == 0.0
    assert M.count_score("There are 7 unique paragraphs.", "7") == 1.0
    assert M.count_score("5 or 7", "7") == 0.5
    assert M.count_score("none", "7") == 0.0


def test_code_sim():
    assert M.code_sim_score("x = foo(1)\nmore code", "x = foo(1)") == 1.0
    assert M.code_sim_score("```python\n# comment\n// other\nx = foo(1)", "x = foo(1)") == 1.0
    assert M.code_sim_score("", "x = foo(1)") == 0.0
    assert M.code_sim_score("abc", "xyz") == 0.0
    rng = random.Random(1)
    for _ in range(50):
        a = "".join(rng.choice("ab(=) x1") for _ in range(rng.randint(1, 30)))
        b = "".join(rng.choice("ab(=) y2") for _ in range(rng.randint(1, 30)))
        assert 0.0 <= M.code_sim_score(a, b) <= 1.0
    near = M.code_sim_score("return x + 2", "return x + 1")
    assert 0.8 < near < 1.0


def test_best_and_task_score():
    assert M.best_score("qa_f1", "Paris", ["London", "paris"]) == 1.0
    assert M.best_score("qa_f1", "Paris", "Paris") == 1.0
    assert M.best_score("qa_f1", "Paris", []) == 0.0
    assert M.task_score("qa_f1", ["Paris", "Rome"], [["Paris"], ["Madrid"]]) == 50.0
    assert M.task_score("classification", ["City", "Animal"], [["City"], ["City"]], ["City", "Animal"]) == 50.0
    assert M.task_score("count", [], []) == 0.0
    with pytest.raises(ValueError, match="unknown"):
        M.best_score("bleu", "a", ["a"])
    with pytest.raises(ValueError, match="answer lists"):
        M.task_score("qa_f1", ["a"], [])


# ---------------------------------------------------------------- v2 answer extraction
@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("The correct answer is (A)", "A"),
        ("Reasoning first... The correct answer is (B).", "B"),
        ("**The correct answer is (C)**", "C"),
        ("The correct answer is D", "D"),
        ("the correct answer is: (b)", None),  # letters must be capitals
        ("So my choice is (C).", "C"),
        ("B", "B"),
        ("Answer: D.", "D"),
        ("(A) Clause one, because ...", "A"),
        ("The correct answer is a bit unclear", None),
        ("I cannot tell.", None),
        ("", None),
    ],
)
def test_extract_choice(response, letter):
    assert extract_choice(response) == letter


# ---------------------------------------------------------------- tables
def test_task_tables():
    assert len(TASKS) == 21 and set(TASKS) == set(TASK_METRIC) == set(TASK_MAX_NEW_TOKENS)
    assert set(TASK_METRIC.values()) <= set(M.METRICS)
    assert TASK_METRIC["multifieldqa_zh"] == "qa_f1_zh" and TASK_METRIC["lcc"] == "code_sim"
    assert base_task("hotpotqa_e") == "hotpotqa"
    with pytest.raises(ConfigError, match="unknown LongBench task"):
        base_task("nope")


# ---------------------------------------------------------------- loading
@needs_datasets
def test_load_jsonl_parquet_folder_zip(tmp_path):
    cache = tmp_path / "cache"
    rows = [v1_example("hotpotqa", i) for i in range(4)]
    jsonl = write_jsonl(tmp_path / "hotpotqa.jsonl", rows)
    data = load_longbench("hotpotqa", jsonl, cache_dir=cache)
    assert len(data) == 4 and data[2]["answers"] == ["answer 2"] and data[0]["all_classes"] is None
    assert len(load_longbench("hotpotqa", jsonl, limit=2, cache_dir=cache)) == 2

    from datasets import Dataset

    trec = [v1_example("trec", i) for i in range(3)]
    Dataset.from_list(trec).to_parquet(str(tmp_path / "trec.parquet"))
    data = load_longbench("trec", tmp_path / "trec.parquet", cache_dir=cache)
    assert len(data) == 3 and list(data[1]["all_classes"]) == ["Human being", "City", "Animal"]

    folder = tmp_path / "LongBench" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "qasper.jsonl", [v1_example("qasper", i) for i in range(2)])
    assert len(load_longbench("qasper", tmp_path / "LongBench", cache_dir=cache)) == 2
    write_jsonl(folder / "qasper_e.jsonl", [v1_example("qasper", i) for i in range(3)])
    assert len(load_longbench("qasper_e", folder, cache_dir=cache)) == 3

    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.write(folder / "qasper.jsonl", "data/qasper.jsonl")
    assert len(load_longbench("qasper", tmp_path / "data.zip", cache_dir=cache)) == 2


@needs_datasets
def test_load_from_hub_ids(tmp_path, monkeypatch):
    """Hub ids are not fetched here: check the calls made for them."""
    import datasets
    import huggingface_hub

    import kvtools.models

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([v1_example("hotpotqa", i) for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, repo_type: f"/hub/{repo}/{filename}")
    monkeypatch.setattr(kvtools.models, "hub_unreachable", lambda *a, **k: None)  # as if online
    assert len(load_longbench("hotpotqa", limit=3)) == 3
    zipped = "zip://data/hotpotqa.jsonl::/hub/THUDM/LongBench/data.zip"
    assert calls[-1] == ("json", None, {"cache_dir": None, "data_files": zipped, "split": "train"})
    load_longbench("hotpotqa", "someone/LongBench-parquet")
    assert calls[-1] == ("someone/LongBench-parquet", "hotpotqa", {"cache_dir": None, "split": "test"})
    v2_rows = [v2_example(0, "easy", "short")]
    monkeypatch.setattr(
        datasets, "load_dataset", lambda path, **kw: calls.append((path, kw)) or datasets.Dataset.from_list(v2_rows)
    )
    assert len(load_longbench_v2()) == 1
    assert calls[-1] == ("THUDM/LongBench-v2", {"split": "train", "cache_dir": None})


@needs_datasets
def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_longbench("hotpotqa", tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match="no hotpotqa"):
        load_longbench("hotpotqa", tmp_path)
    bad = write_jsonl(tmp_path / "hotpotqa.jsonl", [{"input": "q", "context": "c"}])
    with pytest.raises(ConfigError, match="answers"):
        load_longbench("hotpotqa", bad, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="unknown LongBench task"):
        load_longbench("nope", bad)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a .jsonl"):
        load_longbench("hotpotqa", tmp_path / "x.txt")


@needs_datasets
def test_load_v2(tmp_path):
    kinds = [("easy", "short"), ("hard", "short"), ("hard", "long"), ("easy", "medium")]
    rows = [v2_example(i, difficulty, length) for i, (difficulty, length) in enumerate(kinds)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows), encoding="utf-8")  # upstream ships one JSON array
    cache = tmp_path / "cache"
    data = load_longbench_v2(path, cache_dir=cache)
    assert len(data) == 4 and data[0]["choice_B"] == "Clause two"
    assert [ex["_id"] for ex in load_longbench_v2(path, difficulty="hard", cache_dir=cache)] == ["v2-1", "v2-2"]
    assert len(load_longbench_v2(path, difficulty="hard", length="long", cache_dir=cache)) == 1
    assert len(load_longbench_v2(tmp_path, limit=3, cache_dir=cache)) == 3  # folder with data.json
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"question": "q"}])
    with pytest.raises(ConfigError, match="choice_A"):
        load_longbench_v2(bad, cache_dir=cache)


# ---------------------------------------------------------------- prompts and truncation
@pytest.mark.parametrize("task", TASKS)
def test_prompt_every_task(task, tok):
    ex = v1_example(task)
    p = prepare_prompt(task, ex, tok, 10_000)
    assert p.max_new_tokens == TASK_MAX_NEW_TOKENS[task]
    assert ex["context"] in p.text
    no_query = {"gov_report", "multi_news", "vcsum", "lcc", "passage_count"}  # their input field is empty upstream
    assert (ex["input"] in p.text) == (task not in no_query)
    chat = task not in NO_CHAT_TASKS
    assert p.text.startswith("<s>user\n") == chat
    assert p.chat == chat and not p.truncated
    assert p.input_ids == tok.encode(p.text, add_special_tokens=not chat)


def test_prompt_without_chat_template(plain_tok, tok):
    ex = v1_example("hotpotqa")
    p = prepare_prompt("hotpotqa", ex, plain_tok, 10_000)
    assert not p.chat and p.text == format_prompt("hotpotqa", ex)
    assert p.input_ids[0] == plain_tok.bos_token_id  # special tokens added for plain text
    assert not prepare_prompt("hotpotqa", ex, tok, 10_000, chat=False).chat
    with pytest.raises(ConfigError, match="no chat template"):
        prepare_prompt("hotpotqa", ex, plain_tok, 10_000, chat=True)


def test_truncate_middle_keeps_head_and_tail(tok):
    text = "".join(f"<{i:04d}>" for i in range(400))  # 2400 single-byte tokens
    out = truncate_middle(text, tok, 300)
    assert out == text[:150] + text[-150:]
    assert len(tok.encode(out, add_special_tokens=False)) == 300
    assert truncate_middle(text, tok, 301) == text[:151] + text[-150:]
    assert truncate_middle("short", tok, 100) == "short"
    # ASCII words are not fused at the cut
    assert truncate_middle("aaaa bbbb cccc dddd", tok, 6) == "aaa ddd"


@pytest.mark.parametrize("chat", [True, False])
def test_prompt_truncation_fits_budget(chat, tok, plain_tok):
    tokenizer = tok if chat else plain_tok
    words = [f"w{i:04d}" for i in range(1500)]
    ex = {**v1_example("hotpotqa"), "context": " ".join(words), "input": "Which word comes first?"}
    for budget in (400, 1000, 2500):
        p = prepare_prompt("hotpotqa", ex, tokenizer, budget)
        assert p.truncated and p.n_tokens <= budget and p.n_tokens >= budget - 4
        assert len(tokenizer.encode(p.text, add_special_tokens=not chat)) == p.n_tokens
        assert p.n_original > budget
        # the instruction head and the question tail survive, the middle of the context does not
        assert p.text.startswith("<s>user\nUse the passages below" if chat else "Use the passages below")
        assert "\n\nQuestion: Which word comes first?\nReply with the answer only.\nAnswer:" in p.text
        assert "Passages:\nw0000 w0001" in p.text and "w1498 w1499\n\nQuestion" in p.text
        assert words[len(words) // 2] not in p.text
    with pytest.raises(InputTooLongError, match="without its context"):
        prepare_prompt("hotpotqa", ex, tokenizer, 150)


def test_v2_prompt_and_scoring(tok):
    ex = v2_example(1, "hard", "short")  # answer B
    p = prepare_prompt(V2_TASK, ex, tok, 5000)
    assert p.max_new_tokens == V2_MAX_NEW_TOKENS and p.chat
    needles = ("Which clause applies in case 1?", "(A) Clause one", "(D) Clause four", "The correct answer is (X)")
    for needle in needles:
        assert needle in p.text
    assert score_example(V2_TASK, "The correct answer is (B)", ex) == 1.0
    assert score_example(V2_TASK, "The correct answer is (A)", ex) == 0.0
    assert score_example(V2_TASK, "no idea", ex) == 0.0
    long_ex = {**ex, "context": "lorem ipsum " * 2000}
    p = prepare_prompt(V2_TASK, long_ex, tok, 1500)
    assert p.truncated and p.n_tokens <= 1500 and "(D) Clause four" in p.text


# ---------------------------------------------------------------- scoring and summary
def test_score_example_rules():
    ex = v1_example("hotpotqa", 3)  # answer "answer 3"
    assert score_example("hotpotqa", "Answer 3.", ex) == 1.0
    assert score_example("hotpotqa_e", "answer", ex) == pytest.approx(2 / 3)
    trec = v1_example("trec")
    assert score_example("trec", "\nHuman being\nQuestion: who? Type: City", trec) == 1.0  # first line only
    assert score_example("trec", "City", trec) == 0.0
    assert score_example("passage_retrieval_en", "Paragraph 2", v1_example("passage_retrieval_en")) == 1.0
    assert score_example("passage_count", "3", v1_example("passage_count")) == 1.0
    assert score_example("lcc", "return x + 1\n", v1_example("lcc")) == 1.0
    assert score_example("lsht", "体育", v1_example("lsht")) == 1.0
    assert score_example("multifieldqa_zh", "北京", v1_example("multifieldqa_zh")) == 1.0
    assert score_example("gov_report", "answer 0", v1_example("gov_report")) == pytest.approx(1.0, abs=1e-6)


@needs_datasets
def test_end_to_end_on_fixture(tmp_path, tok):
    path = write_jsonl(tmp_path / "hotpotqa.jsonl", [v1_example("hotpotqa", i) for i in range(3)])
    scores = []
    for i, ex in enumerate(load_longbench("hotpotqa", path, cache_dir=tmp_path / "cache")):
        p = prepare_prompt("hotpotqa", ex, tok, 200)
        assert len(tok.encode(p.text, add_special_tokens=False)) <= 200 and p.max_new_tokens == 32
        prediction = ex["answers"][0] if i < 2 else "wrong"
        scores.append(score_example("hotpotqa", prediction, ex))
    assert scores == [1.0, 1.0, 0.0]
