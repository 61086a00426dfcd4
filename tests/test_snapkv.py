"""SnapKV: exact when the budget covers everything; selection equals a plain reference; exact budget."""

import math

import pytest
import torch

import kvtools
from kvtools.methods.snapkv import snapkv_keep, snapkv_scores

from .conftest import random_ids
from .helpers import prefill_then_decode

pytestmark = pytest.mark.mechanics


def snap(budget, window=4, kernel=3, pool="max", **extra):
    cfg = {"cache": {"method": "snapkv", "budget": budget, "window": window, "kernel": kernel, "pool": pool}}
    cfg.update(extra)
    return cfg


def test_budget_covering_everything_equals_full(family_model):
    _, model = family_model
    ids = random_ids(2, 30 + 20)
    ref, _ = prefill_then_decode(model, ids, 30)
    with kvtools.patch(model, snap(64)) as p:
        got, _ = prefill_then_decode(model, ids, 30, cache=p.make_cache())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_fraction_one_equals_full(llama):
    ids = random_ids(1, 40)
    ref, _ = prefill_then_decode(llama, ids, 30)
    with kvtools.patch(llama, snap(1.0)) as p:
        got, _ = prefill_then_decode(llama, ids, 30, cache=p.make_cache())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cache_holds_exactly_budget_slots_per_layer_and_kv_head(llama):
    ids = random_ids(2, 50)
    with kvtools.patch(llama, snap(12)) as p:
        cache = p.make_cache()
        llama(ids, past_key_values=cache)
        assert cache.slots() == [12, 12]
        assert all(bool(layer.valid.all()) for layer in cache.layers)
        k = cache.layers[0].keys
        assert k.shape == (2, 2, 12, 16)  # Hk = 2 heads stored, never expanded to H = 6
        llama(ids[:, :1], past_key_values=cache)  # decoding appends, no more eviction
        assert cache.slots() == [13, 13]


def reference_selection(q_win, keys, budget, window, kernel, pool, scale):
    """Plain loops: per query head, window attention (causal inside the window), summed, pooled over the prefix;
    averaged over the query heads of each KV head; top (budget - window) prefix tokens + the window."""
    b_, h, w, d = q_win.shape
    hk, s = keys.shape[1], keys.shape[2]
    g = h // hk
    out = []
    for b in range(b_):
        row = []
        for kh in range(hk):
            pooled_heads = []
            for qh in range(kh * g, (kh + 1) * g):
                votes = [0.0] * s
                for i in range(w):
                    qpos = s - w + i
                    logits = [
                        float(q_win[b, qh, i] @ keys[b, kh, j]) * scale if j <= qpos else -math.inf
                        for j in range(s)
                    ]
                    m = max(logits)
                    ex = [math.exp(x - m) for x in logits]
                    z = sum(ex)
                    for j in range(s):
                        votes[j] += ex[j] / z
                pooled = []
                for j in range(s - w):
                    prefix_len = s - w  # pooling runs over the prefix only
                    span = [votes[t] if 0 <= t < prefix_len else None
                            for t in range(j - kernel // 2, j + kernel // 2 + 1)]
                    if pool == "max":
                        pooled.append(max(v for v in span if v is not None))
                    else:
                        pooled.append(sum(v for v in span if v is not None) / kernel)
                pooled_heads.append(pooled)
            score = [sum(ph[j] for ph in pooled_heads) / g for j in range(s - w)]
            prefix = sorted(range(s - w), key=lambda j: (-score[j], j))[: budget - w]
            row.append(sorted(prefix) + list(range(s - w, s)))
        out.append(row)
    return out


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_selection_equals_plain_reference(pool):
    torch.manual_seed(0)
    b, h, hk, s, d, w, budget, kernel = 2, 6, 2, 40, 8, 5, 15, 5
    keys = torch.randn(b, hk, s, d)
    q_win = torch.randn(b, h, w, d) * 2
    valid = torch.ones(b, hk, s, dtype=torch.bool)
    idx = torch.arange(s).expand(b, hk, s)
    scale = d**-0.5
    scores = snapkv_scores(q_win, keys, valid, idx, torch.arange(s - w, s), scale, kernel, pool)
    keep = snapkv_keep(scores, valid, torch.full((b,), budget), w)
    got = [[torch.nonzero(keep[i, j]).flatten().tolist() for j in range(hk)] for i in range(b)]
    assert got == reference_selection(q_win, keys, budget, w, kernel, pool, scale)
    assert all(len(sel) == budget for row in got for sel in row)


def test_heads_select_different_tokens():
    """Per-head selection is real: different KV heads keep different slots (no shared mask)."""
    torch.manual_seed(1)
    b, h, hk, s, d, w = 1, 4, 2, 64, 8, 4
    keys = torch.randn(b, hk, s, d)
    q = torch.randn(b, h, w, d) * 3
    valid = torch.ones(b, hk, s, dtype=torch.bool)
    idx = torch.arange(s).expand(b, hk, s)
    keep = snapkv_keep(snapkv_scores(q, keys, valid, idx, torch.arange(s - w, s), d**-0.5, 3, "max"),
                       valid, torch.tensor([16]), w)
    assert not torch.equal(keep[0, 0], keep[0, 1])


def test_chunked_prefill_compresses_once_at_the_end(llama):
    ids = random_ids(1, 48)
    with kvtools.patch(llama, snap(12)) as p:
        one = p.make_cache()
        llama(ids, past_key_values=one)
    with kvtools.patch(llama, snap(12, prefill={"method": "dense", "chunk": 10})) as p:
        chunked = p.make_cache()
        llama(ids, past_key_values=chunked)
    assert chunked.slots() == [12, 12]
    for a, c in zip(one.layers, chunked.layers):
        assert torch.equal(a.idx.sort(-1).values, c.idx.sort(-1).values)


def test_follow_up_call_compresses_only_its_own_tokens(llama):
    """A second multi-token call (a question after a document) never re-budgets what the first call kept:
    with budget 1.0 nothing is dropped; with 0.5 the old slots stay and the new call keeps half of its own."""
    doc, question = random_ids(1, 60, seed=1), random_ids(1, 20, seed=2)
    for budget, want in ((1.0, 80), (0.5, 30 + 10)):
        with kvtools.patch(llama, {"cache": {"method": "snapkv", "budget": budget, "window": 4, "kernel": 3}}) as p:
            cache = p.make_cache()
            llama(doc, past_key_values=cache)
            before = [layer.idx[0, 0].tolist() for layer in cache.layers]
            llama(question, past_key_values=cache)
        assert cache.slots() == [want] * len(cache.layers)
        for layer, old in zip(cache.layers, before):
            kept = layer.idx[0, 0].tolist()
            assert kept[: len(old)] == old  # the first call's slots are untouched
            assert all(i >= 60 for i in kept[len(old):])
