"""RetrievalAttention: exact with a flat index covering everything, stable LSE merge, insert path."""

from __future__ import annotations

import pytest
import torch

import kvtools
from kvtools.attention.merge import attention_with_lse, merge_lse
from kvtools.config import RetrievalCache
from kvtools.errors import ConfigError
from kvtools.methods.retrieval import HeadStore, recall_at_k

from .conftest import random_ids
from .helpers import assert_matches_unpatched, prefill_then_decode


def retrieval(index="flat", top_k=500, **kw):
    return {"cache": {"method": "retrieval", "n_sink": 4, "window": 8, "top_k": top_k, "index": index, **kw},
            "decode": {"method": "retrieval"}}


@pytest.mark.mechanics
def test_flat_index_covering_everything_equals_full(family_model):
    cache = assert_matches_unpatched(family_model[1], retrieval(), 60, 12)
    assert cache.nbytes(offloaded=True) > 0


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_ann_indexes_covering_everything_equal_full(llama, index):
    assert_matches_unpatched(llama, retrieval(index, ef_search=256, nprobe=64), 80, 6, batch=1)


def test_left_padded_row_equals_row_alone(llama):
    ids = random_ids(2, 50 + 6)
    am = torch.ones(2, 56, dtype=torch.long)
    am[1, :9] = 0
    with kvtools.patch(llama, retrieval()) as p:
        both, _ = prefill_then_decode(llama, ids, 50, cache=p.make_cache(), attention_mask=am)
        alone, _ = prefill_then_decode(llama, ids[1:, 9:], 41, cache=p.make_cache())
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=0)


def test_device_table_shrinks_and_insert_keeps_every_token_once(llama):
    ids = random_ids(2, 40 + 15)
    with kvtools.patch(llama, retrieval(top_k=3)) as p:
        _, cache = prefill_then_decode(llama, ids, 40, cache=p.make_cache())
    seen = 55
    for layer in cache.layers:
        assert int(layer.valid.sum(-1).max()) <= 4 + 8  # sink + window (+ nothing else) on the device
        store = layer.state["offload"]
        for r in range(2):
            for h in range(layer.keys.shape[1]):
                dev = layer.idx[r, h][layer.valid[r, h]].tolist()
                hs = store.heads[r][h]
                off = hs.idx[: hs.n].tolist()
                assert sorted(dev + off) == list(range(seen))  # every token, exactly once
    with kvtools.patch(llama, retrieval(top_k=3, insert=False)) as p:
        _, cache = prefill_then_decode(llama, ids, 40, cache=p.make_cache())
    hs = cache.layers[0].state["offload"].heads[0][0]
    assert hs.n == 40 - 12  # only what left at the end of prefill


def test_lse_merge_is_exact_and_stable_with_extreme_logits():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 16, generator=g, dtype=torch.float64)
    k = torch.randn(3, 40, 16, generator=g, dtype=torch.float64) * 300  # logits in the thousands
    v = torch.randn(3, 40, 8, generator=g, dtype=torch.float64)
    ok = torch.ones(3, 5, 40, dtype=torch.bool)
    full, lse = attention_with_lse(q, k, v, ok, 1.0)
    split = torch.zeros(40, dtype=torch.bool)
    split[::3] = True
    a = attention_with_lse(q, k, v, ok & split, 1.0)
    b = attention_with_lse(q, k, v, ok & ~split, 1.0)
    out, lse_m = merge_lse(*a, *b)
    assert torch.isfinite(out).all()
    ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)), -1) @ v.double()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)  # fp32 logits in the thousands
    torch.testing.assert_close(lse_m, lse.float())
    empty = attention_with_lse(q, k, v, torch.zeros_like(ok), 1.0)  # one side with no keys
    out2, _ = merge_lse(*a, *empty)
    torch.testing.assert_close(out2, a[0])
    out3, lse3 = merge_lse(*empty, *empty)
    assert (out3 == 0).all() and torch.isneginf(lse3).all()


def test_recall_flat_is_one_and_query_trained_ivf_is_measured():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2000, 16, generator=g)
    queries = torch.randn(400, 16, generator=g) + 2.0  # out of the keys' distribution
    flat = HeadStore(keys, keys, torch.arange(2000), RetrievalCache(index="flat"), None)
    assert recall_at_k(flat, queries[:50], 32) == 1.0
    for train_on in ("keys", "queries"):
        store = HeadStore(keys, keys, torch.arange(2000), RetrievalCache(index="ivf", nlist=16, nprobe=2,
                                                                          train_on=train_on), queries)
        assert 0 < recall_at_k(store, queries[:50], 32) <= 1


def test_retrieval_needs_both_stages():
    with pytest.raises(ConfigError, match="'retrieval' goes in both stages"):
        kvtools.load_config({"cache": {"method": "retrieval"}})
    with pytest.raises(ConfigError, match="'retrieval' goes in both stages"):
        kvtools.load_config({"decode": {"method": "retrieval"}})


def test_recall_bench_on_captured_model_queries(llama):
    from kvtools.bench_recall import capture_qk, measure_recall

    qk = capture_qk(llama, random_ids(1, 120))
    assert len(qk) == llama.config.num_hidden_layers
    rows = measure_recall(qk, [8], ["flat", "hnsw", "ivf-queries", "ivf+hot"], n_sink=4, window=8, n_eval=16,
                          quiet=True)
    by = {r["index"]: r for r in rows}
    assert by["flat"]["recall"] == 1.0
    assert 0 < by["ivf-queries"]["recall"] <= 1 and by["hnsw"]["n_queries"] > 0
    assert 0 < by["ivf+hot"]["recall"] <= 1


def test_hot_set_and_rerank_against_plain_reference():
    """The hot set is the top-H keys by attention summed over the observation queries, and the rerank keeps
    the best k distinct candidates by exact q.k (index results and hot keys together)."""
    import numpy as np

    from kvtools.methods.retrieval import hot_set, rerank

    g = torch.Generator().manual_seed(0)
    keys, obs, q = torch.randn(50, 8, generator=g), torch.randn(12, 8, generator=g), torch.randn(3, 8, generator=g)
    hot = hot_set(obs, keys, 0.5, 10)
    mass = [sum(torch.softmax(obs[i] @ keys.T * 0.5, 0)[j].item() for i in range(12)) for j in range(50)]
    assert sorted(hot.tolist()) == sorted(sorted(range(50), key=lambda j: -mass[j])[:10])
    ids = np.array([[0, 1, 2, -1], [hot[0].item(), 5, 5, 7], [-1, -1, -1, -1]])  # repeats, misses, overlap with hot
    got = rerank(ids, hot, q.numpy(), keys, 4)
    for r in range(3):
        cand = {int(i) for i in ids[r] if i >= 0} | set(hot.tolist())
        want = sorted(cand, key=lambda j: -(q[r] @ keys[j]).item())[:4]
        assert got[r].tolist() == want  # best first, distinct


class _Inline:
    """An executor that builds indexes at once, so the first decode step already searches the index."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f = Future()
        f.set_result(fn(*args))
        return f


def test_hot_keys_covering_everything_make_any_index_exact(llama, monkeypatch):
    """With every offloaded key hot, a step scores all of them exactly: equal to full attention through an
    IVF index that probes one of its four lists (and not equal without the hot keys)."""
    import kvtools.methods.retrieval as retr

    monkeypatch.setattr(retr, "_pool", lambda: _Inline())
    ivf = dict(top_k=500, nlist=4, nprobe=1)
    cache = assert_matches_unpatched(llama, retrieval("ivf", hot_keys=500, **ivf), 200, 1, batch=1)
    hs = cache.layers[0].state["offload"].heads[0][0]
    hs.wait()
    assert hs.index.nlist == 4 and len(hs.hot) == 200 - 4 - 8  # every offloaded prompt key is hot
    with pytest.raises(AssertionError):
        assert_matches_unpatched(llama, retrieval("ivf", **ivf), 200, 1, batch=1)


def test_augmented_hnsw_is_exact_inner_product_search_on_small_sets():
    """The L2 graph over norm-equalised keys ranks by inner product: with a search beam covering the set it
    returns the exact top-k, also for keys inserted later (norms up to the build headroom)."""
    import numpy as np

    from kvtools.methods.retrieval import AugmentedHNSW

    g = np.random.default_rng(0)
    keys = (g.standard_normal((300, 16)) * g.uniform(0.1, 5.0, (300, 1))).astype(np.float32)  # varied norms
    q = g.standard_normal((20, 16)).astype(np.float32)
    index = AugmentedHNSW(keys[:250], RetrievalCache(index="hnsw", ef_search=400, hnsw_m=16))
    more = keys[250:] * 0.9  # inserted later, inside the headroom
    index.add(more)
    allk = np.concatenate([keys[:250], more])
    exact = np.argsort(-(q @ allk.T), axis=1)[:, :10]
    assert index.ntotal == 300
    assert (np.sort(index.search(q, 10)[1], 1) == np.sort(exact, 1)).all()
