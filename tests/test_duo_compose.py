"""DuoAttention composed with other cache policies per head group (``streaming: {...}``, ``retrieval: {...}``):
each group keeps exactly what its method keeps run alone on that group's heads; covering budgets are exact;
the group configs are validated like cache stages."""

import warnings

import pytest
import torch

import kvtools
from kvtools.cache import SlotLayer, Step
from kvtools.config import same_method
from kvtools.errors import ConfigError
from kvtools.methods import CACHE_POLICIES
from kvtools.methods.base import LayerInfo
from kvtools.methods.duo import DuoParams, DuoPolicy
from kvtools.patching import chunk_bounds

from .conftest import random_ids
from .test_contract import CALLS, padded_batch, reference, run_calls

pytestmark = pytest.mark.mechanics


def duo(heads, **groups):
    return {"cache": {"method": "duo", "retrieval_heads": heads, **groups}}


SNAP = {"method": "snapkv", "window": 4, "kernel": 3}
KNORM = {"method": "knorm", "window": 4}


# ---------------------------------------------------------------- each group == its method alone on its heads
L, HK, G, D = 4, 3, 2, 16
#: layer 0: one retrieval head, layer 1: two, layer 2: all three, layer 3: none
HEADS = {0: [1], 1: [0, 2], 2: [0, 1, 2]}
N, PAD, CHUNK = 30, 5, 8
#: the calls fed to one cache: a chunked prompt, decode steps, a second multi-token call, decode steps
PLAN = [N, 1, 1, 1, 7, 1, 1]


def _steps(valid: torch.Tensor):
    """(start, end, Step) of every model call in :data:`PLAN` (the first one chunked), as the patched model
    wrapper builds them: HF positions from the padding mask, the call's real tokens per row."""
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    s = 0
    for size in PLAN:
        e = s + size
        bounds = [(s + a, s + z) for a, z in chunk_bounds(size, CHUNK)] if s == 0 else [(s, e)]
        for c, (a, z) in enumerate(bounds):
            yield a, z, Step(valid=valid[:, a:z], pos=pos[:, a:z], idx=torch.arange(a, z),
                             prompt_real=valid[:, s:e].sum(-1), end_of_prompt=z == e, chunk=c, start=s)
        s = e


def _alone(cfg: dict):
    """The cache policy of ``cfg`` run alone (a top-level cache stage), bound to the same number of layers."""
    params = kvtools.load_config({"cache": cfg, "prefill": {"method": "dense", "chunk": CHUNK}}).cache
    policy = CACHE_POLICIES[params.method](params)
    policy.bind(L, HK)
    return policy


@pytest.mark.parametrize("streaming, retrieval", [
    ({**SNAP, "budget": 0.4, "span": 2, "layers": "pyramid"}, {**KNORM, "budget": 12, "window": 3}),
    ({**KNORM, "budget": 0.5, "window": 2, "span": 3}, {**SNAP, "budget": 10, "kernel": 5, "pool": "avg",
                                                         "layers": "pyramid"}),
    (None, {**SNAP, "budget": 0.5}),  # streaming heads: the default StreamingLLM ring
    ({**SNAP, "budget": 0.3, "per_chunk": True}, {**KNORM, "budget": 6, "window": 2, "per_chunk": True}),
], ids=["snapkv-knorm", "knorm-snapkv", "default-snapkv", "per-chunk"])
def test_each_group_keeps_what_its_method_keeps_alone_on_its_heads(streaming, retrieval):
    """A chunked, left-padded prompt, decode steps, a second call: per layer, each scored group's outputs and
    slot table equal the method's run alone over that group's q / k / v (its query heads by GQA, its per-layer
    budget for that layer); the cache's bytes are the two tables'."""
    torch.manual_seed(0)
    b, n = 2, sum(PLAN)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :PAD] = False
    groups = {"retrieval": retrieval} | ({"streaming": streaming} if streaming else {"n_sink": 2, "window": 5})
    pol = DuoPolicy(DuoParams(retrieval_heads=HEADS, **groups))
    pol.bind(L, HK)
    refs = {"retrieval": _alone(retrieval), "streaming": _alone(streaming) if streaming else None}
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2) / D)
    for layer_idx in range(L):
        info = LayerInfo(layer_idx, D**-0.5, inv_freq, None)
        q, k, v = torch.randn(b, HK * G, n, D), torch.randn(b, HK, n, D), torch.randn(b, HK, n, D)
        ret = torch.tensor([h in HEADS.get(layer_idx, []) for h in range(HK)])
        heads = {"retrieval": ret.nonzero().flatten(), "streaming": (~ret).nonzero().flatten()}
        layer, tables = SlotLayer(), {g: SlotLayer() for g in heads}
        for a, z, step in _steps(valid):
            got = pol.attend(layer, q[..., a:z, :], k[..., a:z, :], v[..., a:z, :], step, info)
            for group, ref in refs.items():
                kv = heads[group]
                if ref is None or not kv.numel():
                    continue
                qh = (kv[:, None] * G + torch.arange(G)).flatten()  # the group's query heads
                want = ref.attend(tables[group], q[:, qh, a:z], k[:, kv, a:z], v[:, kv, a:z], step, info)
                torch.testing.assert_close(got[:, qh], want, atol=1e-6, rtol=0)
        held = {"retrieval": layer, "streaming": layer.state.get("stream", layer)}
        for group, ref in refs.items():
            if ref is None or not heads[group].numel():
                continue
            table, want = held[group], tables[group]
            assert want.size < n, "the group's method evicted nothing: the test would prove nothing"
            for name in ("keys", "values", "valid", "pos", "idx"):
                assert torch.equal(getattr(table, name), getattr(want, name)), (layer_idx, group, name)
        if streaming is not None:  # both groups scored: the layer holds exactly the two tables
            assert layer.nbytes() == sum(t.nbytes() for g, t in tables.items() if heads[g].numel())


# ---------------------------------------------------------------- end to end, on the tiny models
COVERING = [
    {"prefill": {"method": "dense", "chunk": 16},
     **duo({0: [0]}, streaming={**SNAP, "budget": 1.0, "span": 3}, retrieval={**KNORM, "budget": 1000,
                                                                              "layers": "pyramid"})},
    duo({1: [0]}, streaming={**KNORM, "budget": 1000, "layers": "pyramid"}, retrieval={**SNAP, "budget": 1.0}),
]


@pytest.mark.parametrize("config", COVERING, ids=["chunked-snapkv-knorm", "knorm-snapkv"])
def test_covering_compositions_equal_unpatched_across_calls(family_model, config):
    """Budgets that cover every call: prefill (chunked), decode, a second multi-token call, decode == unpatched."""
    _, model = family_model
    ids = random_ids(2, sum(CALLS), seed=5)
    want = reference(model, ids)
    with kvtools.patch(model, config) as p:
        got, cache = run_calls(model, ids, cache=p.make_cache())
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == ids.shape[1]


@pytest.mark.parametrize("group, method", [("retrieval", {**SNAP, "budget": 0.4, "span": 2}),
                                           ("streaming", {**KNORM, "budget": 12, "layers": "pyramid"})])
def test_one_group_everywhere_equals_its_method_alone(llama, group, method):
    """Every KV head in one group: duo is that group's method on the whole model (left-padded batch, two calls)."""
    hk = llama.config.num_key_value_heads
    heads = {i: list(range(hk)) for i in range(llama.config.num_hidden_layers)} if group == "retrieval" else {}
    ids, am, _, _ = padded_batch(sum(CALLS))
    with kvtools.patch(llama, {"cache": method}) as p:
        want, ref = run_calls(llama, ids, cache=p.make_cache(), am=am)
    with kvtools.patch(llama, duo(heads, **{group: method})) as p:
        got, cache = run_calls(llama, ids, cache=p.make_cache(), am=am)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert cache.nbytes() == ref.nbytes()
    assert max(ref.slots()) < sum(CALLS), "nothing evicted: the comparison would prove little"


def test_streaming_group_with_in_cache_positions_equals_streamingllm(llama):
    """``streaming: {method: streamingllm, positions: cache}``: a decoded token sees sinks + window + itself,
    i.e. StreamingLLM alone with a window one longer, at in-cache distances."""
    ids = random_ids(2, 40)
    stream = {"method": "streamingllm", "n_sink": 4, "window": 8, "positions": "cache"}
    with kvtools.patch(llama, {"cache": {**stream, "window": 9}}) as p:
        want, _ = run_calls(llama, ids, [24] + [1] * 16, cache=p.make_cache())
    with kvtools.patch(llama, duo({}, streaming=stream)) as p:
        got, _ = run_calls(llama, ids, [24] + [1] * 16, cache=p.make_cache())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- configs
def test_n_sink_and_window_are_the_default_streaming_policy():
    short = kvtools.load_config(duo({0: [0]}, n_sink=4, window=8)).cache
    long = kvtools.load_config(duo({0: [0]}, streaming={"method": "streamingllm", "n_sink": 4, "window": 8})).cache
    both = kvtools.load_config(duo({0: [0]}, n_sink=4, window=8,
                                   streaming={"method": "streamingllm", "n_sink": 4, "window": 8})).cache
    assert short.head_policies() == long.head_policies() == both.head_policies()
    assert short.head_policies()["streaming"].positions == "original"
    assert short.head_policies()["retrieval"].method == "full"


def test_configs_round_trip_and_old_records_still_match():
    """What a run records (``to_dict``) loads back to the same config; a plain duo record written before head
    groups existed (its ``recent`` key included) still matches the config it came from."""
    composed = kvtools.load_config(duo({0: [0]}, streaming={**SNAP, "budget": 0.1, "span": 8},
                                       retrieval={**SNAP, "budget": 0.5}))
    assert kvtools.load_config(composed.to_dict()) == composed
    assert isinstance(composed.cache.streaming, CACHE_POLICIES["snapkv"].params)
    assert "n_sink" not in composed.to_dict()["cache"] and "window" not in composed.to_dict()["cache"]
    plain = kvtools.load_config({"name": "d", **duo({0: [0]}, n_sink=4, window=8)})
    old = plain.to_dict()
    assert "streaming" not in old["cache"] and "retrieval" not in old["cache"]
    old["cache"]["recent"] = old["cache"].pop("window")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert same_method(old, plain.to_dict())


def test_shipped_composed_preset_loads():
    cfg = kvtools.load_config("duo-smollm2-snapkv-25").cache
    assert cfg.method == "duo" and cfg.streaming.method == "snapkv" and cfg.retrieval.method == "snapkv"


@pytest.mark.parametrize("groups, pattern", [
    ({"streaming": {"method": "snapkv", "windw": 3}},
     r"cache\.streaming\.windw: unknown key for snapkv \(did you mean 'window'\?\); allowed: budget, window"),
    ({"retrieval": {"method": "snapk"}}, r"cache\.retrieval\.method: unknown value 'snapk' \(did you mean 'snapkv'"),
    ({"streaming": {"method": "flexprefill"}}, r"'flexprefill' is a prefill method"),
    ({"streaming": {"budget": 8}}, r"cache\.streaming\.method: missing; allowed: streamingllm, snapkv, knorm"),
    ({"streaming": 5}, r"cache\.streaming: must be a mapping"),
    ({"streaming": {"method": "snapkv", "budget": 4, "window": 8}},
     r"cache\.streaming\.budget: must be >= cache\.streaming\.window \(8\)"),
    ({"retrieval": {"method": "knorm", "budget": 1.5}}, r"cache\.retrieval\.budget: a float means a fraction"),
    ({"retrieval": {"method": "knorm", "budget": True}}, r"cache\.retrieval\.budget: expected a number"),
    # policies that make no sense for a head group, and why
    ({"streaming": {"method": "full"}},
     r"cache\.streaming\.method: 'full' cannot run duo's streaming heads: it would keep every slot: make those "
     r"heads retrieval heads .*; allowed: streamingllm, snapkv, knorm"),
    ({"retrieval": "streamingllm"},
     r"cache\.retrieval\.method: 'streamingllm' cannot run duo's retrieval heads: it would keep only sinks \+ a "
     r"window: make those heads streaming heads .*; allowed: full, snapkv, knorm"),
    ({"retrieval": {"method": "retrieval"}}, r"'retrieval' cannot run duo's retrieval heads: it offloads"),
    ({"streaming": {"method": "duo"}}, r"'duo' cannot run duo's streaming heads: it is the head split itself"),
    # n_sink / window configure the default streaming policy: given with `streaming` they must agree with it
    ({"n_sink": 4, "streaming": {"method": "snapkv"}},
     r"cache\.n_sink: sets the default StreamingLLM policy of the streaming heads, but cache\.streaming runs them "
     r"with snapkv"),
    ({"window": 9, "streaming": {"method": "streamingllm", "n_sink": 4, "window": 8}},
     r"cache\.window: 9 disagrees with cache\.streaming\.window \(8\)"),
])
def test_bad_group_configs(groups, pattern):
    with pytest.raises(ConfigError, match=pattern):
        kvtools.load_config(duo({0: [0]}, **groups))


def test_group_given_as_an_object_is_checked_too():
    """A config built in Python (``DuoParams(streaming=FullParams())``) meets the same rule at validation."""
    full = CACHE_POLICIES["full"].params()
    with pytest.raises(ConfigError, match="'full' cannot run duo's streaming heads"):
        kvtools.load_config({"cache": DuoParams(retrieval_heads={0: [0]}, streaming=full).model_dump()})
    with pytest.raises(ConfigError, match="'full' cannot run duo's streaming heads"):
        DuoParams(retrieval_heads={0: [0]}, streaming=full).check("cache")
