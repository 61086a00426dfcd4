"""lm-evaluation-harness integration: kvtools.harness.KVToolsLM and ``kvtools lm-eval``.

The model's scores are checked against plain computations on the unpatched model (full, and a
budget that covers everything) and against a token-by-token run on the compressed cache; the
command runs two local tasks (tests/data/lm_eval) through the harness, full vs SnapKV.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from .conftest import tiny_config
from .helpers import byte_tokenizer, prefill_then_decode

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'kvtools[lm-eval]')")

from kvtools.cli import main  # noqa: E402
from kvtools.harness import KVToolsLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
CONTEXT = "Records: key A7 is blue; key B2 is red; key C9 is green; key D4 is white. " * 3 + \
    "Question: what colour is key B2? Answer: key B2 is"
CHOICES = [" blue", " red", " green", " white"]
SMALL_SNAPKV = {"name": "snapkv-small", "cache": {"method": "snapkv", "budget": 48, "window": 8}}


def byte_model(seed: int = 0):
    cfg = tiny_config("llama")
    cfg.vocab_size = 260  # the byte tokenizer's 259 ids
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def model_tok():
    return byte_model(), byte_tokenizer(chat=False)


def requests(lm):
    return [(None, *lm._encode_pair(CONTEXT, c)) for c in CHOICES]


@torch.no_grad()
def reference(model, reqs):
    """Sum of the continuation's log-probabilities from one plain forward of context + continuation."""
    out = []
    for _, ctx, cont in reqs:
        ids = torch.tensor([ctx + cont])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def harness(model, tok, config, **kw):
    return KVToolsLM(model=model, tokenizer=tok, config=config, **kw)


@pytest.mark.parametrize("config", ["full", {"cache": {"method": "snapkv", "budget": 4096, "window": 8}},
                                    "streamingllm", "retrieval"])
def test_loglikelihood_equals_the_unpatched_model_when_nothing_is_dropped(model_tok, config):
    model, tok = model_tok
    lm = harness(model, tok, config)
    try:
        reqs = requests(lm)
        got = [lp for lp, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    finally:
        lm.close()
    assert got == pytest.approx(reference(model, reqs), abs=1e-4)


def test_a_context_longer_than_max_length_loses_its_start(model_tok):
    model, tok = model_tok
    lm = harness(model, tok, "full", max_length=40)
    try:
        reqs = requests(lm)
        got = [lp for lp, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
    finally:
        lm.close()
    cut = [(None, ctx[-(41 - len(cont)):], cont) for _, ctx, cont in reqs]  # 40 tokens reach the model
    assert all(len(c) + len(t) - 1 == 40 for _, c, t in cut)
    assert got == pytest.approx(reference(model, cut), abs=1e-4)


def test_scored_tokens_attend_the_compressed_context(model_tok):
    """The context but its last token is prefilled (and compressed); the rest is scored on that cache,
    exactly as feeding it one token at a time after the compression would."""
    model, tok = model_tok
    lm = harness(model, tok, SMALL_SNAPKV)
    try:
        reqs = requests(lm)
        got = [lp for lp, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
        lm._copyable = False  # every continuation prefills its own context: same scores as the shared prefill
        alone = [lp for lp, _ in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]
        want = []
        for _, ctx, cont in reqs:
            ids = torch.tensor([ctx + cont])
            logits, _ = prefill_then_decode(model, ids, len(ctx) - 1)  # patched: compressed at prefill
            logp = torch.log_softmax(logits[0, 1:].float(), -1)  # logits of ctx[-1], cont[0], ...
            want.append(sum(float(logp[j, t]) for j, t in enumerate(cont)))
    finally:
        lm.close()
    assert got == pytest.approx(want, abs=1e-4)
    assert alone == pytest.approx(got, abs=1e-5)
    assert got != pytest.approx(reference(model, reqs), abs=1e-3)  # the budget (48 of ~230) did drop tokens


def test_loglikelihood_rolling_equals_the_unpatched_windows(model_tok):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, tok = model_tok
    text = "The slot table keeps a different number of slots per head. " * 4
    lm = harness(model, tok, "full", max_length=64)
    try:
        req = Instance("loglikelihood_rolling", {}, (text,), 0)
        (got,) = lm.loglikelihood_rolling([req], disable_tqdm=True)
        windows = [make_disjoint_window(w) for w in
                   get_rolling_token_windows(lm.tok_encode(text), lm.prefix_token_id, 64, context_len=1)]
    finally:
        lm.close()
    assert len(windows) > 2
    assert got == pytest.approx(sum(reference(model, [(None, c, t) for c, t in windows])), abs=1e-3)


def test_generate_until_equals_greedy_generation_cut_at_the_stop(model_tok):
    from lm_eval.api.instance import Instance

    model, tok = model_tok
    ids = tok(CONTEXT, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=1)[0, ids.shape[1]:]
    text = tok.decode(plain, skip_special_tokens=True)
    stop = text[5:7]  # a stop string the greedy text reaches
    lm = harness(model, tok, "full")
    try:
        req = Instance("generate_until", {}, (CONTEXT, {"until": [stop], "max_gen_toks": 12}), 0)
        (got,) = lm.generate_until([req], disable_tqdm=True)
    finally:
        lm.close()
    assert got == text.split(stop)[0]


@pytest.mark.parametrize("config", ["full", SMALL_SNAPKV])
def test_batched_generation_equals_one_request_at_a_time(model_tok, config):
    """Left-padded batches (different context lengths, one batch of 3 and one of 1) give each request the
    text it gets alone."""
    from lm_eval.api.instance import Instance

    model, tok = model_tok
    contexts = [CONTEXT, CONTEXT[40:], CONTEXT[:150], CONTEXT[7:120]]
    reqs = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 10}), i)
            for i, c in enumerate(contexts)]
    outs = {}
    for bs in (1, 3):
        lm = harness(model, tok, config, batch_size=bs)
        try:
            outs[bs] = lm.generate_until(reqs, disable_tqdm=True)
        finally:
            lm.close()
    assert outs[3] == outs[1] and len(set(outs[1])) > 1


def test_chat_template_comes_from_the_tokenizer(model_tok):
    model, _ = model_tok
    lm = harness(model, byte_tokenizer(chat=True), "full")
    try:
        text = lm.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        lm.close()
    assert text == "<s>user\nhi</s>\n<s>assistant\n"


def test_bad_arguments_fail_before_the_model_is_touched(model_tok):
    from kvtools.errors import ConfigError

    model, tok = model_tok
    for bad in (0, "many"):
        with pytest.raises(ConfigError, match="batch_size"):
            harness(model, tok, "full", batch_size=bad)
    with pytest.raises(ConfigError, match="unknown argument"):
        harness(model, tok, "full", temperature=0.5)
    with pytest.raises(ConfigError):
        harness(model, tok, {"cache": {"method": "snapkv", "budget": -1}})
    assert not hasattr(model, "_kvtools_patch") or model._kvtools_patch is None


# ---------------------------------------------------------------- the command, end to end
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model_tok):
    path = tmp_path_factory.mktemp("byte-llama")
    model, tok = model_tok
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def lm_eval_cmd(model_dir, out, config="full,snapkv-0.25", tasks="kv_lookup,kv_lookup_gen", *extra):
    return main(["lm-eval", "--model", str(model_dir), "--config", config, "--tasks", tasks,
                 "--include-path", str(TASKS), "--limit", "2", "--out", str(out), "--quiet", *extra])


def test_lm_eval_command_runs_local_tasks_full_vs_snapkv(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the task YAMLs name their jsonl relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "run"
    assert lm_eval_cmd(model_dir, out) == 0
    full = json.loads((out / "results_full.json").read_text())
    snap = json.loads((out / "results_snapkv-0.25.json").read_text())
    assert full["tasks"] == ["kv_lookup", "kv_lookup_gen"] and full["limit"] == 2
    # the scores are the harness's: accuracy from its own per-sample log-likelihoods
    for name, res in (("full", full), ("snapkv-0.25", snap)):
        rows = [json.loads(l) for l in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        mc = [r for r in rows if r["task"] == "kv_lookup"]
        assert len(mc) == 2 and len([r for r in rows if r["task"] == "kv_lookup_gen"]) == 2
        acc = sum(max(range(len(r["resps"])), key=lambda i: r["resps"][i][0][0]) == r["target"] for r in mc) / 2
        assert res["results"]["kv_lookup"]["acc,none"] == pytest.approx(acc)
        assert "exact_match,none" in res["results"]["kv_lookup_gen"]
    lls = {name: [r["resps"] for r in map(json.loads, (out / f"samples_{name}.jsonl").read_text().splitlines())
                  if r["task"] == "kv_lookup"] for name in ("full", "snapkv-0.25")}
    assert lls["full"] != lls["snapkv-0.25"]  # a quarter of ~700 tokens kept: the scores move
    summary = (out / "summary.md").read_text()
    assert "| kv_lookup | acc,none |" in summary and "snapkv-0.25" in summary

    # resumable: a config with a results file is read, not rerun (no model load at all)
    import kvtools.models

    monkeypatch.setattr(kvtools.models, "load_model", lambda *a, **k: pytest.fail("reran a finished config"))
    assert lm_eval_cmd(model_dir, out) == 0
    assert "not rerun" in capsys.readouterr().err


def test_lm_eval_command_errors_before_any_model_load(model_dir, tmp_path, monkeypatch, capsys):
    import kvtools.models

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(kvtools.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "run"
    assert lm_eval_cmd(model_dir, out, "full", "no_such_task") == 2
    assert "no lm-eval task, group or tag named no_such_task" in capsys.readouterr().err
    assert lm_eval_cmd(model_dir, out, "full,nope-preset") == 2
    assert "nope-preset" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    assert lm_eval_cmd(model_dir, out, "full") == 2
    assert "pip install 'kvtools[lm-eval]'" in capsys.readouterr().err
