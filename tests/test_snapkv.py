"""SnapKV: exact when the budget covers everything; selection equals a plain reference; exact budget."""

import math

import pytest
import torch

import kvtools
from kvtools.cache import SlotLayer
from kvtools.methods.snapkv import snapkv_keep, snapkv_scores
from kvtools.patching import capture_qkv, chunk_bounds

from .conftest import random_ids
from .helpers import prefill_then_decode

pytestmark = pytest.mark.mechanics


def snap(budget, window=4, kernel=3, pool="max", prefill=None, **cache):
    cfg = {"cache": {"method": "snapkv", "budget": budget, "window": window, "kernel": kernel, "pool": pool, **cache}}
    if prefill is not None:
        cfg["prefill"] = prefill
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


def reference_selection(q_win, keys, budget, window, kernel, pool, scale, stream=None):
    """Plain loops: per query head, window attention (causal inside the window), summed, pooled over the prefix
    along the stream (``stream``: each slot's stream index, default its slot number: a slot pools the prefix
    slots at most ``kernel // 2`` tokens away); averaged over the query heads of each KV head; top
    (budget - window) prefix tokens + the window."""
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
                at = list(range(s)) if stream is None else stream
                for j in range(s - w):  # pooling runs over the prefix only
                    span = [votes[t] for t in range(s - w) if abs(at[t] - at[j]) <= kernel // 2]
                    if pool == "max":
                        pooled.append(max(span))
                    else:
                        pooled.append(sum(span) / kernel)
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


@pytest.mark.parametrize("n", [48, 41])  # 41: a last chunk of one token joins the chunk before it
def test_chunked_prefill_compresses_once_at_the_end(llama, n):
    ids = random_ids(1, n)
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


def test_per_chunk_selection_equals_plain_reference(llama):
    """``per_chunk``: after each chunk, layer 0 keeps the window + the top of (what it kept so far + the chunk),
    scored by the last ``window`` queries so far; recomputed here with :func:`reference_selection` on the
    layer's captured queries and keys (layer 0's do not depend on what the cache kept)."""
    n, chunk, budget, w, kernel = 47, 10, 12, 4, 3
    ids = random_ids(1, n, seed=3)
    cap = capture_qkv(llama, ids)[0]
    q, k = cap.q[0], cap.k[0]  # [H, L, D], [Hk, L, D]
    hk, g, scale = k.shape[0], q.shape[0] // k.shape[0], q.shape[-1] ** -0.5
    kept = [[] for _ in range(hk)]
    for s, e in chunk_bounds(n, chunk):
        for h in range(hk):
            cand = kept[h] + list(range(s, e))
            if len(cand) > budget:
                sel = reference_selection(q[None, h * g:(h + 1) * g, e - w:e], k[None, h:h + 1, cand], budget, w,
                                          kernel, "max", scale, stream=cand)[0][0]
                cand = [cand[j] for j in sel]
            kept[h] = cand
    with kvtools.patch(llama, snap(budget, window=w, kernel=kernel, per_chunk=True,
                                   prefill={"method": "dense", "chunk": chunk})) as p:
        cache = p.make_cache()
        llama(ids, past_key_values=cache)
    got = [sorted(cache.layers[0].idx[0, h].tolist()) for h in range(hk)]
    assert got == kept
    assert got != [sorted(x) for x in _one_shot_layer0(llama, ids, budget, w, kernel)]  # the option changes something


def _one_shot_layer0(model, ids, budget, w, kernel):
    with kvtools.patch(model, snap(budget, window=w, kernel=kernel)) as p:
        cache = p.make_cache()
        model(ids, past_key_values=cache)
    return [cache.layers[0].idx[0, h].tolist() for h in range(cache.layers[0].idx.shape[1])]


@pytest.mark.parametrize("heads", ["uniform", "adaptive"])
def test_per_chunk_bounds_the_table_by_budget_plus_chunk(llama, monkeypatch, heads):
    """Without ``per_chunk`` a chunked prompt holds every token until its end; with it, never more than
    budget + chunk slots per KV head (adaptive heads: per row, Hk x that over its heads), and the prompt ends at
    the budget."""
    held = []  # the most valid slots any row holds over its KV heads, after each append
    append = SlotLayer.append

    def spy(self, k, v, step):
        append(self, k, v, step)
        held.append(int(self.valid.sum((1, 2)).max()))

    monkeypatch.setattr(SlotLayer, "append", spy)
    ids = random_ids(2, 90)
    hk = 2
    for per_chunk, most in ((False, 90), (True, 12 + 16)):
        held.clear()
        with kvtools.patch(llama, snap(12, per_chunk=per_chunk, heads=heads,
                                       prefill={"method": "dense", "chunk": 16})) as p:
            cache = p.make_cache()
            llama(ids, past_key_values=cache)
        assert max(held) == hk * most
        for layer in cache.layers:
            assert layer.valid.sum((1, 2)).tolist() == [hk * 12] * 2
