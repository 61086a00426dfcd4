"""Recycled Attention: exact at stride 1 and top_k = everything; the recycle set is the plain top-k."""

from __future__ import annotations

import math

import pytest
import torch

import kvtools
from kvtools.cache import SlotLayer, Step
from kvtools.methods.recycled import RecycledParams
from kvtools.errors import ConfigError
from kvtools.methods.base import LayerInfo
from kvtools.methods.recycled import RecycledDecodeMethod

from .conftest import random_ids
from .helpers import assert_matches_unpatched, prefill_then_decode


@pytest.mark.mechanics
@pytest.mark.parametrize("decode", [{"method": "recycled", "stride": 1, "top_k": 4},
                                    {"method": "recycled", "stride": 5, "top_k": 1.0}])
def test_recycled_exact_when_always_full_or_top_k_covers_all(family_model, decode):
    assert_matches_unpatched(family_model[1], {"decode": decode}, 40, 16)


def test_recycled_really_drops_work_and_follows_the_stride(llama):
    ids = random_ids(1, 60 + 20)
    ref, _ = prefill_then_decode(llama, ids, 60)
    with kvtools.patch(llama, {"decode": {"method": "recycled", "stride": 6, "top_k": 8}}) as p:
        got, cache = prefill_then_decode(llama, ids, 60, cache=p.make_cache())
    st = cache.layers[0].state["recycled"]
    assert st.full_steps == math.ceil(20 / 6)  # steps 0, 6, 12, 18
    assert not torch.allclose(got, ref, atol=1e-4)


def _layer(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = SlotLayer()
    layer.keys, layer.values = torch.randn(2, 2, n, d, generator=g), torch.randn(2, 2, n, d, generator=g)
    layer.valid = torch.ones(2, 2, n, dtype=torch.bool)
    layer.valid[1, :, :5] = False  # left padding in row 1
    layer.idx = torch.arange(n).expand(2, 2, n)
    layer.pos = layer.idx.clone()
    return layer


def _step(i):
    return Step(valid=torch.ones(2, 1, dtype=torch.bool), pos=torch.tensor([[i], [i]]), idx=torch.tensor([i]),
                prompt_real=torch.tensor([1, 1]), end_of_prompt=True)


def test_recycle_set_and_recycled_step_match_plain_references():
    d, n, k = 8, 100, 12
    layer = _layer(n)
    g = torch.Generator().manual_seed(5)
    method = RecycledDecodeMethod(RecycledParams(top_k=k, stride=4))
    info = LayerInfo(0, d ** -0.5, torch.ones(1), None)
    q = torch.randn(2, 4, 1, d, generator=g)
    method.attend(layer, q, _step(n - 1), info)  # a full step
    sel = layer.state["recycled"].sel
    for b in range(2):
        for hk in range(2):
            score = torch.zeros(n)
            for hh in (2 * hk, 2 * hk + 1):
                s = (q[b, hh, 0] @ layer.keys[b, hk].T) * d ** -0.5
                s[~layer.valid[b, hk]] = float("-inf")
                score += torch.softmax(s, -1)
            # chosen among the slots before the full step's own token (that one is always attended)
            assert set(sel[b, hk].tolist()) == set(score[: n - 1].topk(k).indices.tolist())
    # two new tokens, then a recycled step: attends to the set + the tokens since the full step
    for extra in range(2):
        for name in ("keys", "values"):
            setattr(layer, name, torch.cat([getattr(layer, name), torch.randn(2, 2, 1, d, generator=g)], 2))
        layer.valid = torch.cat([layer.valid, torch.ones(2, 2, 1, dtype=torch.bool)], 2)
        layer.idx = torch.arange(n + extra + 1).expand(2, 2, -1)
        q = torch.randn(2, 4, 1, d, generator=g)
        out = method.attend(layer, q, _step(n + extra), info)
    for b in range(2):
        for hh in range(4):
            hk = hh // 2
            allowed = torch.zeros(n + 2, dtype=torch.bool)
            allowed[sel[b, hk]] = True
            allowed[n - 1:] = True  # the full step's token and the two after it
            allowed &= layer.valid[b, hk]
            s = (q[b, hh, 0] @ layer.keys[b, hk].T) * d ** -0.5
            ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ layer.values[b, hk]
            torch.testing.assert_close(out[b, hh, 0], ref, atol=1e-5, rtol=1e-4)


def test_pooled_recycle_set_matches_plain_reference():
    """pool = w: a slot scores the largest summed attention among itself and the w - 1 slots before it."""
    from kvtools.methods.recycled import recycle_set

    g = torch.Generator().manual_seed(2)
    probs = torch.rand(2, 2, 3, 40, generator=g)
    ok = torch.rand(2, 2, 40, generator=g) > 0.2
    for pool in (1, 4):
        sel, in_set = recycle_set(probs, ok, 9, pool)
        assert bool(in_set.all())
        for b in range(2):
            for hk in range(2):
                raw = probs[b, hk].sum(0).masked_fill(~ok[b, hk], -1.0)
                score = [max(raw[max(0, j - pool + 1): j + 1].tolist()) if ok[b, hk, j] else -1.0 for j in range(40)]
                want = sorted(range(40), key=lambda j: (-score[j], j))[:9]
                # ties (a peak shared by its followers) may break either way: compare the scores chosen
                assert sorted(score[j] for j in sel[b, hk].tolist()) == sorted(score[j] for j in want)
                assert all(ok[b, hk, j] for j in sel[b, hk].tolist())


def test_dynamic_schedule_runs_full_steps_when_the_query_drifts():
    d, n = 8, 64
    layer = _layer(n)
    info = LayerInfo(0, d ** -0.5, torch.ones(1), None)
    method = RecycledDecodeMethod(RecycledParams(top_k=8, stride=100, dynamic=True, s=0.9))
    g = torch.Generator().manual_seed(1)
    q0 = torch.randn(2, 4, 1, d, generator=g)
    method.attend(layer, q0, _step(n - 1), info)
    method.attend(layer, q0 + 0.01 * torch.randn(2, 4, 1, d, generator=g), _step(n - 1), info)  # same direction
    assert layer.state["recycled"].full_steps == 1
    method.attend(layer, -q0, _step(n - 1), info)  # opposite direction: a full step
    assert layer.state["recycled"].full_steps == 2


def test_recycled_config_errors():
    with pytest.raises(ConfigError, match="decode.method: 'recycled'.*'full' or 'snapkv'"):
        kvtools.load_config({"cache": {"method": "streamingllm"}, "decode": {"method": "recycled"}})
    with pytest.raises(ConfigError, match="decode.top_k"):
        kvtools.load_config({"decode": {"method": "recycled", "top_k": 1.5}})
