"""A shared dense prefill replayed into a method's cache (``share_prefill``) gives exactly what the method's own
prefill gives, for every method of the contract suite on every family; methods that do not prefill densely are
refused by the per-layer check; an eval run with it writes the same records."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import kvtools
import kvtools.attention.dense as dense
from kvtools.config import load_config
from kvtools.eval.generation import (PrefillMismatch, dense_prefill, generate_greedy, replay_prefill,
                                     replayable)
from kvtools.eval.run import run_eval

from .conftest import ALL_FAMILIES, tiny_model
from .helpers import byte_tokenizer
from .test_contract import CASES
from .test_eval_run import tiny_lm

pytestmark = pytest.mark.mechanics

QUANT = [{"quant": {"bits": 8, "group": 32}}, {"quant": {"bits": 4, "group": 32}},
         {"quant": {"bits": 8, "group": 32},
          "cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3}}]
# every method's config that really drops work, as the contract suite runs it, and quantised storage
CONFIGS = [pytest.param("full", id="full")] + [
    pytest.param(case.sparse, id=f"{s}-{m}") for (s, m), case in CASES.items() if case.sparse] + [
    pytest.param(c, id=f"quant-{i}") for i, c in enumerate(QUANT)]
STEPS = 8


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def model(request):
    return tiny_model(request.param, head_dim=32)  # quant groups of 32 channels


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def prompt(n: int = 60, seed: int = 5) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(input_ids=torch.randint(3, 128, (n,), generator=g).tolist())


@torch.inference_mode()
def logits_after(model, handle, p, shared=None) -> torch.Tensor:
    """The prompt's last logits, then those of STEPS fixed decode tokens: from the method's own prefill, or from
    ``shared`` replayed into its cache."""
    cache = handle.make_cache()
    kw = handle.cache_kwargs(cache)
    ids = torch.tensor([p.input_ids])
    if shared is None:
        out = [model(input_ids=ids, use_cache=True, logits_to_keep=1, **kw).logits[0, -1]]  # as generate() runs it
    else:
        replay_prefill(handle, cache, shared)
        out = [shared.logits]
    for t in range(STEPS):
        out.append(model(input_ids=torch.tensor([[7 + 11 * t]]), use_cache=True, **kw).logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("config", CONFIGS)
def test_replay_equals_the_methods_own_prefill_or_is_refused(model, config):
    cfg = load_config(config)
    p = prompt()
    shared = dense_prefill(model, p, cfg.quant)  # quantised storage: a prefill made with the same
    with kvtools.patch(model, cfg) as h:
        own = logits_after(model, h, p)
    with kvtools.patch(model, cfg) as h:
        try:
            replayed = logits_after(model, h, p, shared)
        except PrefillMismatch:
            replayed = None
    if not replayable(cfg):  # a sparse or chunked prefill: the eval never replays these
        return
    # every method whose prefill stage is dense replays, bit for bit
    assert replayed is not None, f"{cfg.name}: refused"
    assert torch.equal(replayed, own)


@pytest.mark.parametrize("config", QUANT[:2] + [
    CASES["prefill", "flexprefill"].sparse, CASES["prefill", "hip"].sparse])
def test_a_prefill_that_is_not_the_shared_one_is_refused_at_the_first_layer_that_differs(model, config):
    cfg = load_config(config)
    if cfg.quant is None and model.config.model_type == "mistral":
        pytest.skip("every mistral layer slides: sparse prefill methods leave sliding layers dense")
    shared = dense_prefill(model, prompt())  # in the model's dtype: quantised tables attend other keys
    with kvtools.patch(model, cfg) as h:
        cache = h.make_cache()
        with pytest.raises(PrefillMismatch, match="does not prefill densely"):
            replay_prefill(h, cache, shared)


@pytest.mark.parametrize("config", ["full", {"cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3}},
                                    {"cache": {"method": "streamingllm", "n_sink": 3, "window": 8}}])
def test_generation_from_a_replay_equals_generate_greedy(model, config, tok):
    p = prompt(80, seed=9)
    shared = dense_prefill(model, p)
    with kvtools.patch(model, config) as h:
        own = generate_greedy(model, tok, h, p, 12)
    with kvtools.patch(model, config) as h:
        got = generate_greedy(model, tok, h, p, 12, prefill=shared)
    assert (got.text, got.new_tokens, got.kv_bytes) == (own.text, own.new_tokens, own.kv_bytes)
    assert got.prefill == "shared" and own.prefill == "own"
    with kvtools.patch(model, config) as h:  # one new token: the prefill's argmax alone
        assert generate_greedy(model, tok, h, p, 1, prefill=shared).text == \
               generate_greedy(model, tok, h, p, 1).text


def test_replayed_layers_reuse_the_dense_attention_instead_of_attending_again(monkeypatch):
    model = tiny_model("llama", head_dim=32)
    shared = dense_prefill(model, prompt())
    calls = []
    real = dense._attend_slots
    monkeypatch.setattr(dense, "_attend_slots", lambda *a: calls.append(a[0].shape) or real(*a))
    with kvtools.patch(model, {"cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3}}) as h:
        cache = h.make_cache()
        replay_prefill(h, cache, shared)
    assert calls == []  # both layers: equal table and queries, the kept output
    # a call whose inputs differ (one query changed) is attended, not answered from the memo
    (args, out) = shared.memo.calls[0]
    q = args[0].clone()
    q[0, 0, -1, 0] += 1.0
    with dense.attend_memo(shared.memo), shared.memo.at(0):
        got = dense.attend_slots(q, *args[1:])
        again = dense.attend_slots(*args)
    assert len(calls) == 1 and not torch.equal(got, out) and again is out
    assert torch.equal(got, real(q, *args[1:]))


# ------------------------------------------------------------------ the eval loop


def tiny_lm32():
    return tiny_lm(head_dim=32)  # quant groups of 32 channels


TIMING = ("prefill_s", "decode_s", "decode_ms", "seconds", "prefill")


def run_dict(out, share: bool) -> dict:
    return {
        "model": "tiny-test", "seed": 1, "out": str(out), "share_prefill": share,
        "methods": ["full", {"name": "snap", "cache": {"method": "snapkv", "budget": 0.5, "window": 8}},
                    {"name": "sllm", "cache": {"method": "streamingllm", "n_sink": 4, "window": 0.25}},
                    {"name": "snap-int8", "quant": {"bits": 8, "group": 32},
                     "cache": {"method": "snapkv", "budget": 0.5, "window": 8}},
                    {"name": "full-int8", "quant": {"bits": 8, "group": 32}},
                    {"name": "full-int4", "quant": {"bits": 4, "group": 32}}],
        "suites": [{"suite": "niah", "lengths": [512], "depths": [0, 100], "max_new_tokens": 4},
                   {"suite": "ruler", "tasks": ["vt"], "lengths": [512], "max_new_tokens": 4},
                   {"suite": "ppl", "lengths": [300], "chunk": 128, "segment": 100}],
    }


def records(res):
    return sorted((json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True)
                   for r in res.records))


def test_an_eval_run_sharing_its_prefill_writes_the_same_records(tmp_path, monkeypatch, tok):
    model = tiny_lm32()
    own = run_eval(run_dict(tmp_path / "own", False), quiet=True, model=model, tokenizer=tok, report=False)
    shared = run_eval(run_dict(tmp_path / "shared", True), quiet=True, model=model, tokenizer=tok, report=False)
    assert records(shared) == records(own)
    how = {(r["method"], r["suite"]): r.get("prefill", "own") for r in shared.records}
    # int8 storage: its two methods share an int8 prefill; int4: one method, which prefills alone
    assert how == {(m, s): "own" if s == "ppl" or m == "full-int4" else "shared"
                   for m in ("full", "snap", "sllm", "snap-int8", "full-int8", "full-int4")
                   for s in ("niah", "ruler", "ppl")}
    assert not any("prefill" in r for r in own.records)
    # reports: a shared prefill's time is not the method's own
    from kvtools.eval.eval_report import eval_markdown, summarize_eval

    pre = {(r["method"], r["suite"]): r["prefill_s"] for r in summarize_eval(shared.records) if r["task"] != "*"}
    assert pre[("snap", "niah")] is None and pre[("full-int4", "niah")] > 0
    assert "replayed a shared dense prefill" in eval_markdown(shared.records)
    assert "replayed a shared" not in eval_markdown(own.records)

    # a method the per-layer check refuses prefills alone, in a fresh patch, and is not tried again
    import kvtools.eval.run as run_mod

    import kvtools.eval.generation as gen_mod

    tried = []
    real_replay = gen_mod.replay_prefill
    monkeypatch.setattr(run_mod, "replayable", lambda c: True)
    monkeypatch.setattr(gen_mod, "replay_prefill", lambda p, *a: tried.append(p.config.name) or real_replay(p, *a))
    spec = run_dict(tmp_path / "forced", True)
    spec["methods"].append({"name": "flex", **CASES["prefill", "flexprefill"].sparse})
    forced = run_eval(spec, quiet=True, model=model, tokenizer=tok, report=False)
    alone = run_eval({**spec, "share_prefill": False, "methods": spec["methods"][-1:], "out": str(tmp_path / "alone")},
                     quiet=True, model=model, tokenizer=tok, report=False)
    assert records(forced) == sorted(records(own) + records(alone))
    assert tried.count("flex") == 1 and tried.count("snap") == 3  # 3 prompt items
    assert all(r.get("prefill", "own") == "own" for r in forced.records if r["method"] == "flex")


def test_a_model_that_cannot_give_a_shared_prefill_runs_every_method_alone(tmp_path, monkeypatch, tok):
    import kvtools.eval.run as run_mod

    model = tiny_lm32()
    calls = []

    def split_model(*a):  # as a model whose layers sit on several devices
        calls.append(1)
        raise PrefillMismatch("the dense prefill ran in more than one step (a model over several devices)")

    monkeypatch.setattr(run_mod, "dense_prefill", split_model)
    res = run_eval(run_dict(tmp_path / "split", True), quiet=True, model=model, tokenizer=tok, report=False)
    own = run_eval(run_dict(tmp_path / "own", False), quiet=True, model=model, tokenizer=tok, report=False)
    assert records(res) == records(own) and len(calls) == 1


def test_niah_command_shares_its_prefill(tmp_path, monkeypatch, tok):
    import kvtools.models
    from kvtools.cli import main

    model = tiny_lm32()
    monkeypatch.setattr(kvtools.models, "load_model", lambda name=None, dtype=torch.float32, device=None, **kw: (
        model, tok))
    monkeypatch.setattr(kvtools.models, "model_context_length", lambda name: 4096)
    outs = {}
    for flag in ([], ["--share-prefill"]):
        out = tmp_path / ("shared" if flag else "own")
        assert main(["niah", "--config", "full,snapkv-0.25,streamingllm-0.25", "--lengths", "600", "--depths", "0,100",
                     "--max-new-tokens", "4", "--out", str(out), "--quiet", *flag]) == 0
        outs[bool(flag)] = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert all(r["prefill"] == "shared" for r in outs[True]) and not any("prefill" in r for r in outs[False])
    from kvtools.eval.report import summarize

    assert all(row["prefill_s"] is None and row["seconds"] is None for row in summarize(outs[True]))
    assert all(row["prefill_s"] > 0 for row in summarize(outs[False]))
    strip = lambda rs: sorted(json.dumps({k: v for k, v in r.items() if k not in TIMING}, sort_keys=True)
                              for r in rs)
    assert strip(outs[True]) == strip(outs[False])
