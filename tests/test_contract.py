"""The contract every registered method keeps, on every supported family and every way `generate` is called.

Each registered method (cache policy, sparse prefill, sparse decode) has a *covering* config (its budget
covers everything: it must equal exact attention) and a *sparse* one (it really drops work). For every
method x family (tiny random models, offline) the suite checks:

- covering == unpatched: prefill + decode, and multi-turn (prefill, decode, a second multi-token call,
  decode), with int and fractional budgets;
- a left-padded batch row == the row run alone, covering and sparse, across the same calls;
- ``generate(use_cache=False)``, beam search and seeded sampling: covering == unpatched; per-row method
  state follows batch reordering (or the method refuses beams before any work);
- ``unpatch()`` restores exactly; two caches interleaved on one patched model stay independent;
- ``cache.nbytes()`` equals the bytes of the tensors the cache really holds;
- bf16 / fp16 runs stay as close to their fp32 run as ``full``'s do, over a few hundred decode steps.

A method without a case fails ``test_every_registered_method_has_a_case``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

import kvtools
from kvtools.cache import KVCache, SlotLayer
from kvtools.methods import CACHE_POLICIES, DECODE_METHODS, PREFILL_METHODS

from .conftest import ALL_FAMILIES, VOCAB, random_ids, tiny_model

pytestmark = pytest.mark.mechanics


@dataclass
class Case:
    covering: list[dict]  # configs whose budget covers everything (int and fractional where the method has both)
    sparse: dict  # a config that really drops work on the test prompts
    beams: bool = True  # False: the method refuses beam search up front
    #: the sparse config ranks near-tied scores (a top-k by attention each step, or by key norm): on a tiny
    #: random model half precision flips near-tied picks, a discrete change that is not rounding drift; the
    #: half-precision check then runs its covering config (same arithmetic, nothing to flip)
    selects: bool = False


RETR = {"method": "retrieval"}
CASES: dict[tuple[str, str], Case] = {
    ("cache", "full"): Case([{}], {}),
    ("cache", "streamingllm"): Case(
        [{"cache": {"method": "streamingllm", "n_sink": 4, "window": 1000}},
         {"cache": {"method": "streamingllm", "n_sink": 4, "window": 1000, "positions": "original"}}],
        {"cache": {"method": "streamingllm", "n_sink": 3, "window": 8}},
    ),
    ("cache", "snapkv"): Case(
        [{"cache": {"method": "snapkv", "budget": 1000, "window": 4, "kernel": 3}},
         {"cache": {"method": "snapkv", "budget": 1.0, "window": 4, "kernel": 3}},
         {"cache": {"method": "snapkv", "budget": 1000, "window": 4, "kernel": 3, "layers": "pyramid", "span": 4}}],
        {"cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3}},
    ),
    ("cache", "knorm"): Case(
        [{"cache": {"method": "knorm", "budget": 1000, "window": 4}},
         {"cache": {"method": "knorm", "budget": 1.0, "window": 4}},
         {"cache": {"method": "knorm", "budget": 1000, "window": 4, "layers": "pyramid"}}],
        {"cache": {"method": "knorm", "budget": 0.5, "window": 4}},
        selects=True,  # bf16 keys reorder near-equal key norms (0.0145 vs full's 0.0054 on the sparse config)
    ),
    ("cache", "duo"): Case(  # layer 0 has no retrieval head: its heads all live in the streaming table
        [{"cache": {"method": "duo", "retrieval_heads": {1: [0]}, "n_sink": 4, "window": 1000}},
         # composed: each head group under a scored method (int / fractional budgets, pyramid, spans)
         {"cache": {"method": "duo", "retrieval_heads": {1: [0]},
                    "streaming": {"method": "snapkv", "budget": 1.0, "window": 4, "kernel": 3, "span": 4},
                    "retrieval": {"method": "knorm", "budget": 1000, "window": 4, "layers": "pyramid"}}}],
        {"cache": {"method": "duo", "retrieval_heads": {1: [0]}, "n_sink": 3, "window": 6}},
    ),
    ("cache", "snapkv+heads"): Case(  # per-head budgets (AdaKV): the tables pack the heads' ragged slots
        [{"cache": {"method": "snapkv", "budget": 1000, "window": 4, "kernel": 3, "heads": "adaptive"}},
         {"cache": {"method": "snapkv", "budget": 1.0, "window": 4, "kernel": 3, "heads": "adaptive",
                    "layers": "adaptive", "span": 2}}],
        {"cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3, "heads": "adaptive", "floor": 0.0}},
    ),
    ("cache", "snapkv+per_chunk"): Case(  # a chunked prompt compressed after every chunk (chunks end-aligned)
        [{"prefill": {"method": "dense", "chunk": 16},
          "cache": {"method": "snapkv", "budget": 1.0, "window": 4, "kernel": 3, "per_chunk": True}}],
        {"prefill": {"method": "dense", "chunk": 16},
         "cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3, "per_chunk": True, "span": 2}},
    ),
    ("cache", "duo+snapkv"): Case(  # duo composed with scored methods: the sparse case (covering: duo's)
        [],
        {"cache": {"method": "duo", "retrieval_heads": {1: [0]},
                   "streaming": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3, "span": 2},
                   "retrieval": {"method": "snapkv", "budget": 12, "window": 4, "kernel": 3, "layers": "pyramid"}}},
    ),
    ("cache", "retrieval"): Case(
        [{"cache": {**RETR, "index": "flat", "top_k": 1000, "n_sink": 4, "window": 8}, "decode": RETR}],
        {"cache": {**RETR, "index": "flat", "top_k": 4, "n_sink": 2, "window": 6}, "decode": RETR},
        beams=False, selects=True,
    ),
    ("prefill", "flexprefill"): Case(
        [{"prefill": {"method": "flexprefill", "gamma": 1.0, "block_size": 16, "min_budget": 0,
                      "backend": "torch"}}],
        {"prefill": {"method": "flexprefill", "gamma": 0.5, "block_size": 16, "min_budget": 16, "tau": 0.1,
                     "backend": "torch"}},
    ),
    ("prefill", "flexprefill+chunk"): Case(  # each chunk's queries over the table so far (end-aligned chunks)
        [{"prefill": {"method": "flexprefill", "gamma": 1.0, "block_size": 16, "min_budget": 0, "chunk": 16,
                      "backend": "torch"}}],
        {"prefill": {"method": "flexprefill", "gamma": 0.5, "block_size": 16, "min_budget": 16, "tau": 0.1,
                     "chunk": 16, "backend": "torch"},
         "cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3}},
    ),
    ("prefill", "hip"): Case(
        [{"prefill": {"method": "hip", "top_k": 1024, "block_q": 8, "block_k": 2, "n_sink": 2, "window": 4,
                      "dense_layers": 0, "backend": "torch"}}],
        {"prefill": {"method": "hip", "top_k": 8, "block_q": 8, "block_k": 2, "n_sink": 2, "window": 4,
                     "dense_layers": 0, "backend": "torch"}},
    ),
    ("prefill", "hip+chunk"): Case(
        [{"prefill": {"method": "hip", "top_k": 1024, "block_q": 8, "block_k": 2, "n_sink": 2, "window": 4,
                      "dense_layers": 0, "chunk": 16, "backend": "torch"}}],
        {"prefill": {"method": "hip", "top_k": 8, "block_q": 8, "block_k": 2, "n_sink": 2, "window": 4,
                     "dense_layers": 0, "chunk": 16, "backend": "torch"}},
    ),
    ("decode", "hip"): Case(
        [{"decode": {"method": "hip", "top_k": 1024, "block_k": 2, "n_sink": 2, "window": 4, "dense_layers": 0}}],
        {"decode": {"method": "hip", "top_k": 8, "block_k": 2, "n_sink": 2, "window": 4, "dense_layers": 0,
                    "refresh_interval": 3}},
        selects=True,
    ),
    ("decode", "recycled"): Case(
        [{"decode": {"method": "recycled", "stride": 5, "top_k": 1000}},
         {"decode": {"method": "recycled", "stride": 5, "top_k": 1.0}}],
        {"decode": {"method": "recycled", "stride": 4, "top_k": 0.25}},
        selects=True,
    ),
}

COVERING = [pytest.param(c, id=f"{s}-{m}-{i}") for (s, m), case in CASES.items() for i, c in
            enumerate(case.covering)]
SPARSE = [pytest.param(case.sparse, id=f"{s}-{m}") for (s, m), case in CASES.items() if case.sparse]

# calls of one conversation: a prompt, decode steps, a second multi-token call (a chat turn), decode steps
CALLS = [40, 1, 1, 1, 1, 1, 9, 1, 1, 1, 1]
PAD = 9


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def model(request):
    return tiny_model(request.param)


def test_every_registered_method_has_a_case():
    registered = {("cache", m) for m in CACHE_POLICIES} | {("prefill", m) for m in PREFILL_METHODS} | {
        ("decode", m) for m in DECODE_METHODS}
    missing = registered - set(CASES)
    assert not missing, f"methods without a contract case: {sorted(missing)}"


# ---------------------------------------------------------------- drivers
@torch.inference_mode()  # as generate runs (no version counters: in-place slot writes must say so)
def run_calls(model, ids, calls=CALLS, cache=None, am=None):
    """Feed ``ids`` in consecutive calls of the given sizes on one cache (HF positions: cumsum of the padding
    mask). Returns every fed token's logits [B, N, V] and the cache."""
    b, n = ids.shape
    assert sum(calls) == n
    past = 0 if cache is None else cache.get_seq_length()  # continuing a cache: an unpadded past
    am = torch.ones(b, past + n, dtype=torch.long) if am is None else am
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out, s = [], past
    for c in calls:
        e = s + c
        res = model(input_ids=ids[:, s - past:e - past], attention_mask=am[:, :e], position_ids=pos[:, s:e],
                    past_key_values=cache, use_cache=True)
        cache = res.past_key_values
        check_layouts(cache)
        out.append(res.logits)
        s = e
    return torch.cat(out, 1), cache


def check_layouts(cache):
    """What the host believes about each slot table (``SlotLayer.layout``, used to skip device reads) is what
    the tensors say, for every layer and every sub-table a method keeps."""
    tables = list(cache.layers)
    while tables:
        layer = tables.pop()
        tables += [t for t in layer.state.values() if isinstance(t, SlotLayer)]
        known = layer.layout
        if known is None or layer.valid is None:
            continue
        ar = torch.arange(layer.size)
        ordered = bool((layer.idx == ar).all()) and bool((layer.valid == layer.valid[:, :1]).all())
        assert not known.ordered or ordered, "layout says ordered; the table is not"
        assert known.all_valid == bool(layer.valid.all()), "layout's all_valid is wrong"


@torch.no_grad()
def reference(model, ids, am=None):
    """Unpatched logits of the whole sequence in one call."""
    am = torch.ones_like(ids) if am is None else am
    return model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits


def padded_batch(n: int, pad: int = PAD, seed: int = 3):
    """Row 0 full length, row 1 left-padded by ``pad``; returns (ids, mask, row0 alone, row1 alone)."""
    a, b = random_ids(1, n, seed=seed), random_ids(1, n - pad, seed=seed + 1)
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    am = torch.ones_like(ids)
    am[1, :pad] = 0
    return ids, am, a, b


def close(got, want, atol=1e-4):
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


# ---------------------------------------------------------------- exactness
@pytest.mark.parametrize("config", COVERING)
def test_covering_equals_unpatched_across_calls(model, config):
    """Prefill, decode, a second multi-token call, decode: covering == unpatched, batch of 2."""
    ids = random_ids(2, sum(CALLS), seed=1)
    want = reference(model, ids)
    with kvtools.patch(model, config) as p:
        got, cache = run_calls(model, ids, cache=p.make_cache())
    close(got, want)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("config", COVERING + SPARSE)
def test_left_padded_row_equals_row_alone(model, config):
    ids, am, a, b = padded_batch(sum(CALLS))
    with kvtools.patch(model, config) as p:
        both, _ = run_calls(model, ids, cache=p.make_cache(), am=am)
        alone0, _ = run_calls(model, a, cache=p.make_cache())
        alone1, _ = run_calls(model, b, [CALLS[0] - PAD, *CALLS[1:]], cache=p.make_cache())
    close(both[0], alone0[0])
    close(both[1, PAD:], alone1[0])


_UNPATCHED: dict = {}  # unpatched generate outputs per (model, with beams)


@pytest.mark.parametrize("config", COVERING)
def test_generate_without_cache_beams_and_sampling_equal_unpatched(model, config):
    ids = random_ids(2, 20, seed=4)
    kw = dict(max_new_tokens=8, pad_token_id=0)

    def runs():
        out = {"nocache": model.generate(ids, do_sample=False, use_cache=False, **kw)}
        torch.manual_seed(0)
        out["sample"] = model.generate(ids, do_sample=True, top_k=0, **kw)
        if beams:
            out["beams"] = model.generate(ids, num_beams=2, do_sample=False, **kw)
        return out

    beams = not _needs(config, "retrieval")
    key = (model.config.model_type, beams)  # tiny_model(family) is deterministic (seed 0)
    if key not in _UNPATCHED:
        _UNPATCHED[key] = runs()
    want = _UNPATCHED[key]
    with kvtools.patch(model, config):
        got = runs()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_methods_that_cannot_follow_beams_refuse_before_any_work(llama_counted):
    model, calls = llama_counted
    cfg = CASES[("cache", "retrieval")].sparse
    with kvtools.patch(model, cfg):
        with pytest.raises(kvtools.KVToolsError, match="num_beams=2"):
            model.generate(random_ids(1, 12), num_beams=2, max_new_tokens=4)
    assert calls == []  # refused before the prompt was fed


@pytest.fixture
def llama_counted():
    model = tiny_model("llama")
    calls: list[int] = []
    model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    return model, calls


def _needs(config, method):
    return any(isinstance(v, dict) and v.get("method") == method for v in config.values())


# ---------------------------------------------------------------- per-row state, isolation, bytes
@pytest.mark.parametrize("config", SPARSE)
def test_per_row_state_follows_batch_reordering(model, config):
    """Swapping the batch rows mid-generation (what beam search does) and feeding the rows swapped gives
    each row the logits it gets unswapped: the table *and* every piece of method state move with the row."""
    case = next(c for c in CASES.values() if c.sparse is config)
    ids = random_ids(2, 40 + 12, seed=7)
    with kvtools.patch(model, config) as p:
        want, _ = run_calls(model, ids, [40] + [1] * 12, cache=p.make_cache())
        got1, cache = run_calls(model, ids[:, :46], [40] + [1] * 6, cache=p.make_cache())
        swap = torch.tensor([1, 0])
        try:
            cache.reorder_cache(swap)
        except kvtools.KVToolsError:
            # allowed only for a method that refuses beams up front (generate never gets here with it)
            assert not case.beams
            return
        got2, _ = run_calls(model, ids[swap, 46:], [1] * 6, cache=cache)
    close(got1, want[:, :46])
    close(got2, want[swap, 46:])


@pytest.mark.parametrize("config", SPARSE)
def test_two_caches_interleaved_stay_independent(model, config):
    x, y = random_ids(1, 52, seed=8), random_ids(1, 52, seed=9)
    with kvtools.patch(model, config) as p:
        want_x, _ = run_calls(model, x, [40] + [1] * 12, cache=p.make_cache())
        want_y, _ = run_calls(model, y, [40] + [1] * 12, cache=p.make_cache())
        cx, cy = p.make_cache(), p.make_cache()
        lx, cx = run_calls(model, x[:, :40], [40], cache=cx)
        ly, cy = run_calls(model, y[:, :40], [40], cache=cy)
        outs_x, outs_y = [lx], [ly]
        for t in range(40, 52):
            lx, cx = run_calls(model, x[:, t:t + 1], [1], cache=cx)
            ly, cy = run_calls(model, y[:, t:t + 1], [1], cache=cy)
            outs_x.append(lx)
            outs_y.append(ly)
    close(torch.cat(outs_x, 1), want_x)
    close(torch.cat(outs_y, 1), want_y)


def test_unpatch_restores_exactly_and_repatching_is_safe(model):
    ids = random_ids(2, 30, seed=2)
    want = reference(model, ids)
    with kvtools.patch(model, CASES[("cache", "snapkv")].sparse):
        pass
    close(reference(model, ids), want, atol=0)
    for (_, _), case in CASES.items():
        p = kvtools.patch(model, case.sparse)
        p.unpatch()
    assert "forward" not in model.__dict__ and "generate" not in model.__dict__
    close(reference(model, ids), want, atol=0)


def test_a_cache_cannot_continue_under_another_config_or_model(model):
    ids = random_ids(1, 20)
    with kvtools.patch(model, "full") as p:
        cache = p.make_cache()
        model(ids, past_key_values=cache)
    with kvtools.patch(model, CASES[("cache", "snapkv")].sparse):
        with pytest.raises(kvtools.KVToolsError, match="another model or config"):
            model(ids[:, :1], past_key_values=cache)
    other = tiny_model(model.config.model_type if model.config.model_type != "gemma3_text" else "gemma3", seed=1)
    with kvtools.patch(other, "full"):
        with pytest.raises(kvtools.KVToolsError, match="another model or config"):
            other(ids[:, :1], past_key_values=cache)


def _tensors(obj, seen: set[int], depth=0):
    """Every tensor reachable from ``obj`` through attributes, dicts, lists (not into modules)."""
    if depth > 6:
        return
    if torch.is_tensor(obj):
        if id(obj) not in seen:
            seen.add(id(obj))
            yield obj
        return
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        for k, v in vars(obj).items():
            if k not in ("cfg", "step", "owner"):
                yield from _tensors(v, seen, depth + 1)


@pytest.mark.parametrize("config", COVERING + SPARSE)
def test_nbytes_counts_the_tensors_the_cache_holds(config):
    model = tiny_model("llama")
    ids, am, _, _ = padded_batch(sum(CALLS))
    with kvtools.patch(model, config) as p:
        _, cache = run_calls(model, ids, cache=p.make_cache(), am=am)
    resident = [t for layer in cache.layers for t in _tensors(
        {k: v for k, v in vars(layer).items() if k != "state"} | {
            k: v for k, v in layer.state.items() if not getattr(v, "offloaded", False)}, set())]
    assert cache.nbytes(offloaded=False) == sum(t.numel() * t.element_size() for t in resident)
    assert cache.nbytes() == cache.nbytes(offloaded=False) + cache.nbytes(offloaded=True)


def test_nbytes_counts_state_carried_between_calls():
    """What a method keeps in layer.state between calls (retrieval's IVF training queries before the
    offload) is part of the bytes the cache holds."""
    model = tiny_model("llama")
    cfg = {"cache": {**RETR, "index": "ivf", "train_on": "queries", "n_sink": 4, "window": 64}, "decode": RETR}
    with kvtools.patch(model, cfg) as p:
        _, cache = run_calls(model, random_ids(1, 20), [20], cache=p.make_cache())
    kept = [layer.state["train_q"].q for layer in cache.layers if "train_q" in layer.state]
    assert kept, "the prompt is shorter than sink + window: the training queries wait in the cache"
    resident = [t for layer in cache.layers for t in _tensors(
        {k: v for k, v in vars(layer).items() if k != "state"} | dict(layer.state), set())]
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in resident)
