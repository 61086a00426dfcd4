"""Question-agnostic eval: each prompt split before its question, the context compressed in its own call.

The split (``context_tokens``) of every prompt builder is where the question starts, and the two parts' own
tokens are the one-call prompt's; fed in two calls, ``full`` and covering budgets give what one call gives;
with a compressing budget the context keeps what it keeps alone, and the question (``calls: first``) is kept
whole. The runner records the mode, keeps one mode per folder and resumes folders written before the option.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvtools
from kvtools.errors import ConfigError
from kvtools.eval.generation import generate_greedy
from kvtools.eval.haystack import build_niah_prompt
from kvtools.eval.infinitebench import SYNTHETIC_TASKS, make_synthetic
from kvtools.eval.longbench import prepare_prompt
from kvtools.eval.niah import niah_grid
from kvtools.eval.passkey import make_passkey
from kvtools.eval.report import RESULTS_FILE, read_results
from kvtools.eval.ruler import TASKS, make_sample
from kvtools.eval.run import load_run, question_config, run_eval

from .conftest import random_ids, tiny_config
from .helpers import byte_tokenizer
from .test_eval_run import run_dict as eval_run_dict
from .test_longbench import v1_example

# where each builder's question starts, with the whitespace before it (the templates' wording)
QUESTION_STARTS = {"niah": "\n\nWhat is the special magic number for ", "passkey": "\nWhat is the pass key?",
                   "vt": "\nQuestion: Find all variables", "cwe": "\nQuestion: What are the ",
                   "fwe": "\nQuestion: Do not provide any explanation"}
RULER_QUESTION = "\nWhat are all the special magic "


def assert_split_at(tok, text: str, ids: list[int], n: int, at: int, chat: bool) -> None:
    """``ids[:n]`` are the tokens of ``text[:at]`` alone (BOS included when not chatting), ``ids[n:]`` those of
    the rest, and together the one-call prompt's tokens."""
    first = list(tok.encode(text[:at], add_special_tokens=not chat))
    second = list(tok.encode(text[at:], add_special_tokens=False))
    assert ids[:n] == first and ids[n:] == second
    assert first + second == list(ids)


@pytest.fixture(scope="module", params=[True, False], ids=["chat", "plain"])
def any_tok(request):
    return byte_tokenizer(chat=request.param), request.param


# ---------------------------------------------------------------- the split
@pytest.mark.parametrize("depth", [0, 50, 100])
def test_niah_split_is_the_context_then_the_question(any_tok, depth):
    tok, chat = any_tok
    p = build_niah_prompt(tok, 700, depth, seed=4)
    assert_split_at(tok, p.text, p.input_ids, p.context_tokens, p.text.rindex(QUESTION_STARTS["niah"]), chat)
    context = tok.decode(p.input_ids[: p.context_tokens])
    assert p.needle in context and p.question not in context
    assert p.question in tok.decode(p.input_ids[p.context_tokens:])


@pytest.mark.parametrize("task", list(TASKS))
def test_ruler_split_is_the_context_then_the_question(any_tok, task):
    tok, chat = any_tok
    s = make_sample(task, tok, 1500, seed=2)
    at = s.text.rindex(QUESTION_STARTS.get(task, RULER_QUESTION))
    assert_split_at(tok, s.text, s.input_ids, s.context_tokens, at, chat)
    if task.startswith("niah"):  # every needle in the first call, the question in the second
        context = tok.decode(s.input_ids[: s.context_tokens])
        assert all(needle in context for needle in s.meta["needles"])
        assert RULER_QUESTION.strip() not in context


def test_passkey_and_document_prompts_split_at_the_question(any_tok):
    tok, chat = any_tok
    s = make_passkey(tok, 800, 0.5, seed=1)
    assert_split_at(tok, s.text, s.input_ids, s.context_tokens, s.text.rindex(QUESTION_STARTS["passkey"]), chat)
    for task in ("qasper", "hotpotqa", "trec", "lcc", "passage_retrieval_en"):  # after the document's last word
        ex = v1_example(task)
        p = prepare_prompt(task, ex, tok, 2000, chat=chat)
        context = ex["context"].rstrip()
        assert_split_at(tok, p.text, p.input_ids, p.context_tokens, p.text.rindex(context) + len(context), chat)
    for task in SYNTHETIC_TASKS:  # before the whitespace that precedes the question
        smp = make_synthetic(task, tok, 1200, seed=3, chat=chat)
        text = smp.prompt.text
        at = len(text[: text.rindex(smp.example["input"])].rstrip())
        assert_split_at(tok, text, smp.prompt.input_ids, smp.prompt.context_tokens, at, chat)


@pytest.mark.slow
def test_real_tokenizer_splits_exactly():
    """SmolLM2's byte-level BPE (tokenizer only): every builder's cut falls on a token boundary."""
    from transformers import AutoTokenizer

    from kvtools.models import resolve_model

    try:
        where, gguf = resolve_model(None)
    except kvtools.ModelNotAvailableError as exc:  # pragma: no cover
        pytest.skip(str(exc))
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    p = build_niah_prompt(tok, 2048, 50, seed=0)
    assert_split_at(tok, p.text, p.input_ids, p.context_tokens, p.text.rindex(QUESTION_STARTS["niah"]), True)
    for task in TASKS:
        s = make_sample(task, tok, 1024, seed=1)
        at = s.text.rindex(QUESTION_STARTS.get(task, RULER_QUESTION))
        assert_split_at(tok, s.text, s.input_ids, s.context_tokens, at, True)


# ---------------------------------------------------------------- two calls vs one
def tiny_lm(family: str = "llama"):
    """A tiny random model whose vocabulary covers the byte tokenizer's 259 ids."""
    cfg = tiny_config(family)
    cfg.vocab_size, cfg.max_position_embeddings = 260, 2048
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


class Keeping:
    """A patch handle that keeps the cache it makes."""

    def __init__(self, patch) -> None:
        self.patch, self.cache = patch, None

    def make_cache(self):
        self.cache = self.patch.make_cache()
        return self.cache

    def cache_kwargs(self, cache):
        return self.patch.cache_kwargs(cache)


def generate_with_logits(model, tok, config, prompt, split=None, new_tokens=6):
    """``generate_greedy`` (one call, or two with ``split``) under ``config``; returns the generation, the
    lm_head's last-position logits of every forward ([calls + steps, V]) and the cache it filled."""
    logits = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: logits.append(out[0, -1].float().clone()))
    try:
        with kvtools.patch(model, config) as p:
            handle = Keeping(p)
            gen = generate_greedy(model, tok, handle, prompt, new_tokens, split=split)
    finally:
        hook.remove()
    return gen, torch.stack(logits), handle.cache


CONFIGS = {
    "full": "full",
    "snapkv-covering": {"cache": {"method": "snapkv", "budget": 1.0, "window": 8, "kernel": 3}},
    "knorm-covering": {"cache": {"method": "knorm", "budget": 4096, "window": 8}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_two_calls_equal_one_call_without_compression(family, name):
    model, tok = tiny_lm(family), byte_tokenizer()
    prompt = build_niah_prompt(tok, 500, 50, seed=1)
    config = question_config(kvtools.load_config(CONFIGS[name]), "agnostic")
    one, ref, one_cache = generate_with_logits(model, tok, config, prompt)
    two, got, two_cache = generate_with_logits(model, tok, config, prompt, split=prompt.context_tokens)
    assert two.text == one.text and two.new_tokens == one.new_tokens
    assert got.shape[0] == ref.shape[0] + 1  # the context call's logits come first
    torch.testing.assert_close(got[1:], ref, atol=1e-4, rtol=0)
    assert two_cache.slots() == one_cache.slots() and two.kv_bytes == one.kv_bytes


def plain_knorm(keys: torch.Tensor, budget: int, window: int) -> list[list[int]]:
    """Plain loop: per KV head, the last ``window`` slots + the lowest-norm others (ties: the earlier slot)."""
    n = keys.shape[1]
    out = []
    for h in range(keys.shape[0]):
        norms = keys[h].float().norm(dim=-1)
        ranked = sorted(range(n - window), key=lambda j: (norms[j].item(), j))
        out.append(sorted(ranked[: budget - window] + list(range(n - window, n))))
    return out


def kept(layer, b: int = 0) -> list[list[int]]:
    return [sorted(layer.idx[b, h][layer.valid[b, h]].tolist()) for h in range(layer.idx.shape[1])]


def test_compressed_context_keeps_what_a_plain_reference_keeps_from_it_alone():
    """KNorm at a compressing budget, question-agnostic: the context's kept slots are the plain reference's
    on the context alone (keys from a full cache of it), and every question and generated token stays."""
    model, tok = tiny_lm(), byte_tokenizer()
    prompt = build_niah_prompt(tok, 500, 50, seed=2)
    n, split, budget, window = prompt.n_tokens, prompt.context_tokens, 64, 8
    config = question_config(kvtools.load_config({"cache": {"method": "knorm", "budget": budget, "window": window}}),
                             "agnostic")
    gen, _, cache = generate_with_logits(model, tok, config, prompt, split=split)
    with kvtools.patch(model, "full") as p:
        full = p.make_cache()
        model(torch.tensor([prompt.input_ids[:split]]), **p.cache_kwargs(full))
    later = list(range(split, n + gen.new_tokens - 1))  # the question, then the fed generated tokens
    for layer, ref in zip(cache.layers, full.layers):
        want = plain_knorm(ref.keys[0], budget, window)
        assert [[i for i in heads if i < split] for heads in kept(layer)] == want
        assert all([i for i in heads if i >= split] == later for heads in kept(layer))


def test_snapkv_context_selection_ignores_the_question():
    """SnapKV, question-agnostic: the context keeps what a cache fed the context alone keeps, whatever the
    question; fed in one call (question-aware) its selection of the context differs."""
    model, tok = tiny_lm(), byte_tokenizer()
    prompt = build_niah_prompt(tok, 500, 50, seed=3)
    split = prompt.context_tokens
    config = question_config(kvtools.load_config(
        {"cache": {"method": "snapkv", "budget": 0.25, "window": 8, "kernel": 3}}), "agnostic")
    _, _, two = generate_with_logits(model, tok, config, prompt, split=split)
    _, _, one = generate_with_logits(model, tok, config, prompt)
    with kvtools.patch(model, config) as p:
        alone = p.make_cache()
        model(torch.tensor([prompt.input_ids[:split]]), **p.cache_kwargs(alone))
    context = [[[i for i in heads if i < split] for heads in kept(layer)] for layer in two.layers]
    assert context == [kept(layer) for layer in alone.layers]
    assert context != [[[i for i in heads if i < split] for heads in kept(layer)] for layer in one.layers]
    later = list(range(split, prompt.n_tokens))
    assert all(later == [i for i in heads if split <= i < prompt.n_tokens] for layer in two.layers
               for heads in kept(layer))


# ---------------------------------------------------------------- ScoredParams.calls
@pytest.mark.parametrize("method", ["knorm", "snapkv"])
def test_calls_first_keeps_later_calls_whole(llama, method):
    """A document then a question (two multi-token calls): the document keeps the same slots either way;
    ``calls: all`` compresses the question to its own budget, ``calls: first`` keeps all of it."""
    doc, question = random_ids(2, 60, seed=5), random_ids(2, 30, seed=6)
    base = {"method": method, "budget": 0.25, "window": 5}
    caches = {}
    for calls in ("all", "first"):
        with kvtools.patch(llama, {"cache": {**base, "calls": calls}}) as p:
            cache = caches[calls] = p.make_cache()
            llama(doc, past_key_values=cache)
            llama(question, past_key_values=cache)
    with kvtools.patch(llama, {"cache": base}) as p:
        alone = p.make_cache()
        llama(doc, past_key_values=alone)
    for b in range(2):
        for a, f, ref in zip(caches["all"].layers, caches["first"].layers, alone.layers):
            for heads_a, heads_f, heads_ref in zip(kept(a, b), kept(f, b), kept(ref, b)):
                assert [i for i in heads_a if i < 60] == [i for i in heads_f if i < 60] == heads_ref
                assert [i for i in heads_f if i >= 60] == list(range(60, 90))
                assert len([i for i in heads_a if i >= 60]) == max(round(0.25 * 30), 5) < 30
    if method == "knorm":  # the document's kept slots against the plain loop too
        with kvtools.patch(llama, "full") as p:
            full = p.make_cache()
            llama(doc, past_key_values=full)
        for ref, layer in zip(full.layers, alone.layers):
            assert kept(layer, 1) == plain_knorm(ref.keys[1], round(0.25 * 60), 5)


def test_calls_is_validated_and_question_config_sets_it():
    with pytest.raises(ConfigError, match="cache.calls"):
        kvtools.load_config({"cache": {"method": "snapkv", "calls": "second"}})
    snap = kvtools.load_config("snapkv")
    assert snap.cache.calls == "all" and question_config(snap, "aware") is snap
    agnostic = question_config(snap, "agnostic")
    assert agnostic.cache.calls == "first" and agnostic.name == snap.name
    assert agnostic.cache.model_dump(exclude={"calls"}) == snap.cache.model_dump(exclude={"calls"})
    streaming = kvtools.load_config("streamingllm")
    assert question_config(streaming, "agnostic") is streaming  # not a scored method: nothing to set


# ---------------------------------------------------------------- the runner
def run_dict(out: Path, question: str | None) -> dict:
    """test_eval_run's run (model, methods, seed) on suites that have a question, short."""
    raw = {**eval_run_dict(out), "suites": [
        {"suite": "niah", "lengths": [600], "depths": [0, 100], "max_new_tokens": 4},
        {"suite": "ruler", "tasks": ["vt"], "lengths": [900], "max_new_tokens": 4},
    ]}
    if question is not None:
        raw["question"] = question
    return raw


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(), byte_tokenizer()


def counting(calls):
    def generate(model, tok, patch, prompt, n, **kw):
        calls.append(kw.get("split"))
        return generate_greedy(model, tok, patch, prompt, n, **kw)

    return generate


def test_agnostic_run_records_its_mode_and_matches_aware_for_full(tmp_path, tiny):
    model, tok = tiny
    aware = run_eval(run_dict(tmp_path / "aware", None), quiet=True, model=model, tokenizer=tok)
    calls: list = []
    agn = run_eval(run_dict(tmp_path / "agnostic", "agnostic"), quiet=True, model=model, tokenizer=tok,
                   generate_fn=counting(calls))
    assert len(agn.records) == len(aware.records) == 6 and len(calls) == 6
    assert {r["question"] for r in aware.records} == {"aware"}
    assert all("context_tokens" not in r for r in aware.records)
    assert {r["question"] for r in agn.records} == {"agnostic"}
    by_key = {(r["method"], r["task"], r["depth"]): r for r in aware.records}
    for r in agn.records:
        same = by_key[(r["method"], r["task"], r["depth"])]
        assert r["prompt_sha1"] == same["prompt_sha1"]  # the same prompts, split
        assert 0 < r["context_tokens"] < r["n_tokens"] and r["context_tokens"] in calls
        if r["method"] == "full":  # nothing compressed: two calls generate what one call does
            assert r["output"] == same["output"] and r["kv_bytes"] == same["kv_bytes"]
    snap = [r for r in agn.records if r["method"] == "snap"]
    assert all(r["config"]["cache"]["calls"] == "first" for r in snap)
    run_json = json.loads((tmp_path / "agnostic" / "run.json").read_text())
    assert run_json["question"] == "agnostic" and run_json["methods"]["snap"]["cache"]["calls"] == "first"
    assert "question-agnostic" in (tmp_path / "agnostic" / "summary.md").read_text()
    assert "question-agnostic" not in (tmp_path / "aware" / "summary.md").read_text()

    calls.clear()  # resumes without redoing; a question-aware run is refused there
    run_eval(run_dict(tmp_path / "agnostic", "agnostic"), quiet=True, model=model, tokenizer=tok,
             generate_fn=counting(calls))
    assert calls == []
    with pytest.raises(ConfigError, match="different run.*question"):
        run_eval(run_dict(tmp_path / "agnostic", "aware"), quiet=True, model=model, tokenizer=tok)


def test_folder_written_before_the_option_resumes_as_question_aware(tmp_path, tiny):
    model, tok = tiny
    out = tmp_path / "old"
    raw = run_dict(out, None)
    raw["suites"] = raw["suites"][:1]
    run_eval(raw, quiet=True, model=model, tokenizer=tok, report=False)
    run_json = json.loads((out / "run.json").read_text())
    del run_json["question"]  # as an earlier kvtools wrote them
    for cfg in run_json["methods"].values():
        cfg["cache"].pop("calls", None)
    (out / "run.json").write_text(json.dumps(run_json))
    records = [json.loads(line) for line in (out / RESULTS_FILE).read_text().splitlines()]
    (out / RESULTS_FILE).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "question"}) + "\n"
                                            for r in records))
    calls: list = []
    res = run_eval(raw, quiet=True, model=model, tokenizer=tok, generate_fn=counting(calls))
    assert calls == [] and len(res.records) == 4
    assert json.loads((out / "run.json").read_text())["question"] == "aware"
    with pytest.raises(ConfigError, match="different run.*question"):
        run_eval({**raw, "question": "agnostic"}, quiet=True, model=model, tokenizer=tok)
    (out / "run.json").unlink()  # the records alone still say what they are
    with pytest.raises(ConfigError, match="holds question-aware results, this run is question-agnostic"):
        run_eval({**raw, "question": "agnostic"}, quiet=True, model=model, tokenizer=tok)
    assert calls == [] and len(read_results(out / RESULTS_FILE)) == 4


@pytest.mark.parametrize("change, pattern", [
    ({"question": "sometimes"}, "run.question"),
    ({"suites": [{"suite": "ppl", "lengths": [600]}]}, r"suites\[0\] \(ppl\) streams a text with no question"),
])
def test_bad_question_runs_fail_before_any_work(tmp_path, change, pattern):
    raw = {**run_dict(tmp_path / "out", "agnostic"), **change}
    with pytest.raises(ConfigError, match=pattern):
        load_run(raw)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="question: unknown value 'sometimes'"):
        niah_grid(None, ["full"], [600], [0], 1, out_dir=tmp_path / "niah", question="sometimes")


def test_niah_command_question_agnostic(tmp_path, monkeypatch, capsys, tiny):
    """``kvtools niah --question-agnostic``: the grid's config.json and records say so, each prompt is fed split."""
    import kvtools.eval.run as runner
    from kvtools.cli import main

    model, tok = tiny
    calls: list = []
    real = runner.run_eval
    monkeypatch.setattr(runner, "run_eval", lambda *a, **k: real(*a, **k, model=model, tokenizer=tok,
                                                                  generate_fn=counting(calls)))
    out = tmp_path / "niah"
    argv = ["niah", "--config", "full,snapkv-0.25", "--lengths", "600", "--depths", "0,100", "--max-new-tokens", "4",
            "--out", str(out), "--quiet", "--question-agnostic"]
    assert main(argv) == 0
    assert "question-agnostic" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["question"] == "agnostic" and cfg["configs"]["snapkv-0.25"]["cache"]["calls"] == "first"
    records = read_results(out / RESULTS_FILE)
    assert len(records) == len(calls) == 4 and all(isinstance(c, int) for c in calls)
    assert {r["question"] for r in records} == {"agnostic"}
    assert main(argv[:-1]) == 2  # the same folder, question-aware: refused
    assert "question" in capsys.readouterr().err
