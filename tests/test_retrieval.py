"""RetrievalAttention: exact with a flat index covering everything, stable LSE merge, insert path."""

from __future__ import annotations

import threading

import pytest
import torch

import kvtools
from kvtools.attention.merge import attention_with_lse, merge_lse
from kvtools.methods.retrieval import RetrievalParams
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


@pytest.mark.parametrize("slide", [1, 4])
def test_device_table_shrinks_and_insert_keeps_every_token_once(llama, slide):
    ids = random_ids(2, 40 + 15)
    with kvtools.patch(llama, retrieval(top_k=3, slide=slide)) as p:
        _, cache = prefill_then_decode(llama, ids, 40, cache=p.make_cache())
    seen = 55
    for layer in cache.layers:
        held = int(layer.valid.sum(-1).max())
        # sink + window on the device, plus the tokens gathered since the last slide (15 decoded: 15 % slide)
        assert held == 4 + 8 + 15 % slide
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


@pytest.mark.parametrize("ok_query_axis", [1, 4])
def test_grouped_queries_over_one_kv_head_equal_per_query_head_attention(ok_query_axis):
    """q [B, Hk, g, n, D] over k, v [B, Hk, 1, m, D] (the folded path) equals each query head attending its
    KV head's keys on its own, masks per query or shared by the queries included."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, ok_query_axis, 16, generator=g)
    k, v = torch.randn(2, 3, 1, 30, 16, generator=g), torch.randn(2, 3, 1, 30, 8, generator=g)
    ok = torch.rand(2, 3, 1, ok_query_axis, 30, generator=g) > 0.3
    ok[0, 0] = False  # a KV head with nothing visible: out 0, lse -inf
    out, lse = attention_with_lse(q, k, v, ok, 0.25)
    assert out.shape == (2, 3, 4, ok_query_axis, 8) and lse.shape == (2, 3, 4, ok_query_axis)
    for i in range(4):  # one query head at a time: nothing to fold
        o_i, l_i = attention_with_lse(q[:, :, i], k[:, :, 0], v[:, :, 0], ok[:, :, 0], 0.25)
        torch.testing.assert_close(out[:, :, i], o_i)
        torch.testing.assert_close(lse[:, :, i], l_i)
    assert (out[0, 0] == 0).all() and torch.isneginf(lse[0, 0]).all()


@pytest.mark.parametrize("block_elems", [1, 1 << 25])
def test_store_attention_is_each_query_over_its_own_top_k(monkeypatch, block_elems):
    """HeadStore.attention, in one block of queries or one query per block:
    each query attends exactly to its own top-k keys by q.k (the store searches exactly while it is below
    MIN_INDEX_KEYS), checked against a plain per-query softmax."""
    from kvtools.methods import retrieval as ret

    monkeypatch.setattr(ret, "_BLOCK_ELEMS", block_elems)
    g = torch.Generator().manual_seed(2)
    n, top = 50, 7
    keys, values = torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)
    store = ret.HeadStore(keys, values, torch.arange(n), ret.RetrievalParams(top_k=top), None)
    q = torch.randn(3, 16, generator=g) + keys[0]  # overlapping top-k sets
    out, lse = store.attention(q, top, 0.5)
    for i in range(3):
        s = 0.5 * (keys @ q[i])
        sel = torch.topk(s, top).indices
        torch.testing.assert_close(out[i], torch.softmax(s[sel], 0) @ values[sel])
        torch.testing.assert_close(lse[i], torch.logsumexp(s[sel], 0))
    few = ret.HeadStore(keys[:3], values[:3], torch.arange(3), ret.RetrievalParams(top_k=top), None)
    out_few, _ = few.attention(q, top, 0.5)  # fewer keys than top_k: the missing ids (-1) are masked
    torch.testing.assert_close(out_few, torch.softmax(0.5 * q @ keys[:3].T, -1) @ values[:3])


@pytest.mark.parametrize("block_elems", [1, 1 << 25])
def test_attend_stores_batches_stores_of_different_sizes(monkeypatch, block_elems):
    """attend_stores over several stores at once (a layer's KV heads; one store empty, one with fewer keys
    than top_k), in one block of queries or one query per block, equals each query's plain softmax over its own exact
    top-k."""
    from kvtools.methods import retrieval as ret

    monkeypatch.setattr(ret, "_BLOCK_ELEMS", block_elems)
    g = torch.Generator().manual_seed(5)
    top, cfg = 6, ret.RetrievalParams(top_k=6)
    sizes = [40, 0, 4, 25]
    stores, data = [], []
    for n in sizes:
        keys, values = torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)
        stores.append(ret.HeadStore(keys, values, torch.arange(n), cfg, None))
        data.append((keys, values))
    q = torch.randn(len(sizes), 3, 16, generator=g)
    out, lse = ret.attend_stores(stores, q, top, 0.5)
    assert out.shape == (4, 3, 8) and lse.shape == (4, 3)
    for i, (keys, values) in enumerate(data):
        for j in range(3):
            if not len(keys):
                assert (out[i, j] == 0).all() and torch.isneginf(lse[i, j])
                continue
            s = 0.5 * (keys @ q[i, j])
            sel = torch.topk(s, min(top, len(keys))).indices
            torch.testing.assert_close(out[i, j], torch.softmax(s[sel], 0) @ values[sel])
            torch.testing.assert_close(lse[i, j], torch.logsumexp(s[sel], 0))


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_stores_searched_side_by_side_equal_one_at_a_time(monkeypatch, threads):
    """A decode step's stores (a layer's KV heads, a few queries each) are searched on ``threads`` threads,
    the calling one included, under inference mode as in a forward: the same ids as one store after another
    (stores with a built IVF index, one below MIN_INDEX_KEYS searched exactly, one empty), and the work did
    not all stay on the calling thread."""
    import threading

    from kvtools.methods import retrieval as ret

    g = torch.Generator().manual_seed(7)
    cfg = ret.RetrievalParams(top_k=5, index="ivf", nlist=4, nprobe=2)
    stores = []
    for n in [300, 0, 20, 300, 250]:
        keys, values = torch.randn(n, 16, generator=g), torch.randn(n, 8, generator=g)
        stores.append(ret.HeadStore(keys, values, torch.arange(n), cfg, None))
    for st in stores:
        st.wait()
    assert stores[0].index is not None and stores[2].index is None
    q = torch.randn(len(stores), 3, 16, generator=g)
    seen = set()
    search = ret.HeadStore.search

    def recording(self, *a, **kw):
        seen.add(threading.get_ident())
        return search(self, *a, **kw)

    with torch.inference_mode():
        alone = ret._search_stores(stores, q, 5, 1)
        monkeypatch.setattr(ret.HeadStore, "search", recording)
        shared = ret._search_stores(stores, q, 5, threads)
    assert torch.equal(alone, shared) and (alone[1] == -1).all() and (alone[0] >= 0).all()
    assert len(seen) >= 2  # an idle pool thread may take two parts


def test_recall_flat_is_one_and_query_trained_ivf_is_measured():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2000, 16, generator=g)
    queries = torch.randn(400, 16, generator=g) + 2.0  # out of the keys' distribution
    flat = HeadStore(keys, keys, torch.arange(2000), RetrievalParams(index="flat"), None)
    assert recall_at_k(flat, queries[:50], 32) == 1.0
    for train_on in ("keys", "queries"):
        store = HeadStore(keys, keys, torch.arange(2000), RetrievalParams(index="ivf", nlist=16, nprobe=2,
                                                                          train_on=train_on), queries)
        assert 0 < recall_at_k(store, queries[:50], 32) <= 1


def test_retrieval_needs_both_stages():
    with pytest.raises(ConfigError, match="'retrieval' goes in both stages"):
        kvtools.load_config({"cache": {"method": "retrieval"}})
    with pytest.raises(ConfigError, match="'retrieval' goes in both stages"):
        kvtools.load_config({"decode": {"method": "retrieval"}})


def test_recall_bench_on_captured_model_queries(llama):
    from kvtools.bench.recall import capture_qk, measure_recall

    qk = capture_qk(llama, random_ids(1, 120))
    assert len(qk) == llama.config.num_hidden_layers
    rows = measure_recall(qk, [8], ["flat", "hnsw", "ivf-queries", "ivf+hot"], n_sink=4, window=8, n_eval=16,
                          quiet=True)
    by = {r["index"]: r for r in rows}
    assert by["flat"]["recall"] == 1.0
    assert 0 < by["ivf-queries"]["recall"] <= 1 and by["hnsw"]["n_queries"] > 0
    assert 0 < by["ivf+hot"]["recall"] <= 1
    # parameters in a kind reach the index: an IVF probing all of its lists is an exact search
    rows = measure_recall(qk, [8], ["ivf-keys:nlist=2:nprobe=2"], n_sink=4, window=8, n_eval=16, quiet=True)
    assert rows[0]["index"] == "ivf-keys:nlist=2:nprobe=2" and rows[0]["recall"] == 1.0


def test_recall_kind_parameters_are_validated():
    from kvtools.bench.recall import kind_params

    assert (kind_params("ivf-keys:nlist=256:nprobe=16").nlist, kind_params("ivf-keys:nlist=256:nprobe=16").nprobe) \
        == (256, 16)
    assert kind_params("hnsw+hot").hot_keys == 256
    for bad, msg in [("ivf:nlist=2", "unknown ivf"), ("flat:method=x", "expected key=value"),
                     ("hnsw:ef_search=-1", "ef_search")]:
        with pytest.raises(ConfigError, match=msg):
            kind_params(bad)


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
    index = AugmentedHNSW(keys[:250], RetrievalParams(index="hnsw", ef_search=400, hnsw_m=16))
    more = keys[250:] * 0.9  # inserted later, inside the headroom
    index.add(more)
    allk = np.concatenate([keys[:250], more])
    exact = np.argsort(-(q @ allk.T), axis=1)[:, :10]
    assert index.ntotal == 300
    assert (np.sort(index.search(q, 10)[1], 1) == np.sort(exact, 1)).all()


# ---------------------------------------------------------------- later multi-token calls, nbytes, exit, copies
@torch.no_grad()
def run_calls(model, ids: torch.Tensor, lens: list[int], cache=None, attention_mask=None,
              start: int = 0) -> tuple[torch.Tensor, object]:
    """Feed ``ids[:, start:]`` in consecutive calls of ``lens`` tokens (a prompt, decode steps, a second turn, ...)
    on one cache (holding ``ids[:, :start]`` already); returns the logits of every token of every call
    [B, sum(lens), V] and the cache."""
    b, n = ids.shape
    am = attention_mask if attention_mask is not None else torch.ones(b, n, dtype=torch.long)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits, s = [], start
    for m in lens:
        out = model(input_ids=ids[:, s:s + m], attention_mask=am[:, :s + m], position_ids=pos[:, s:s + m],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits.append(out.logits)
        s += m
    return torch.cat(logits, 1), cache


def assert_calls_match_unpatched(model, config, lens: list[int], batch: int = 2, attention_mask=None):
    """Patched with ``config``, the call schedule ``lens`` gives the unpatched model's logits at every real token
    (fp32, 1e-4); returns the patched cache."""
    ids = random_ids(batch, sum(lens))
    ref, _ = run_calls(model, ids, lens, attention_mask=attention_mask)
    with kvtools.patch(model, config) as p:
        got, cache = run_calls(model, ids, lens, cache=p.make_cache(), attention_mask=attention_mask)
    real = torch.ones(ids.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    return cache


def assert_every_token_once(cache, seen: int, cap: int = 4 + 8 + 63) -> None:
    """Each (layer, row, KV head) holds every stream token exactly once (device or CPU), at most ``cap`` on the
    device (full-attention layers): sink + window + the decode tokens gathered before a slide (64)."""
    for layer in cache.layers:
        store = layer.state.get("offload")
        if store is None:
            continue
        assert int(layer.valid.sum(-1).max()) <= cap
        for r, row in enumerate(store.heads):
            for h, hs in enumerate(row):
                dev = layer.idx[r, h][layer.valid[r, h]].tolist()
                assert sorted(dev + hs.idx[: hs.n].tolist()) == list(range(seen))


@pytest.mark.mechanics
def test_second_multi_token_call_after_offload_equals_full(family_model):
    """A prompt, decode steps, a 7-token second turn, more steps: the turn attends to the offloaded keys too
    (covering flat index: equal to the unpatched model at every token, turn included)."""
    lens = [40, 1, 1, 1, 7, 1, 1, 1]
    cache = assert_calls_match_unpatched(family_model[1], retrieval(), lens)
    assert_every_token_once(cache, sum(lens))


def test_first_call_shorter_than_sink_window_then_turns(llama):
    """A 5-token first call offloads nothing; the store appears when the table outgrows sink + window (here during
    decode steps), and later turns, one longer than the window, stay exact."""
    lens = [5] + [1] * 10 + [7, 1, 1, 20, 1, 1]
    cache = assert_calls_match_unpatched(llama, retrieval(), lens)
    assert_every_token_once(cache, sum(lens))
    with kvtools.patch(llama, retrieval()) as p:
        _, short = run_calls(llama, random_ids(2, 12), [5, 1, 1, 1, 1, 1, 1, 1], cache=p.make_cache())
    assert "offload" not in short.layers[0].state  # sink + window not exceeded yet: nothing moved


def test_second_turn_left_padded_batch_equals_full(llama):
    am = torch.ones(2, 60, dtype=torch.long)
    am[1, :9] = 0
    assert_calls_match_unpatched(llama, retrieval(), [30, 1, 1, 9, 1, 16, 1, 1], attention_mask=am)


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_second_turn_through_built_ann_indexes_equals_full(llama, index, monkeypatch):
    """Indexes built at once (so the turn really searches them, one search per (row, KV head) for g x 7 queries)
    and covering everything: still exact."""
    import kvtools.methods.retrieval as retr

    monkeypatch.setattr(retr, "_pool", lambda: _Inline())
    cache = assert_calls_match_unpatched(llama, retrieval(index, ef_search=256, nprobe=64), [80, 1, 7, 1, 1],
                                         batch=1)
    assert cache.layers[0].state["offload"].heads[0][0].index is not None


def _true_cpu_bytes(hs) -> int:
    """What a store holds, measured independently: its tensors at full size plus the serialized index."""
    import faiss

    from kvtools.methods.retrieval import AugmentedHNSW

    tensors = sum(t.numel() * t.element_size() for t in (hs.keys, hs.values, hs.idx))
    index = hs.index.index if isinstance(hs.index, AugmentedHNSW) else hs.index
    return tensors + faiss.serialize_index(index).nbytes


@pytest.mark.parametrize("index,kw", [("flat", {}), ("hnsw", {}), ("hnsw", {"hnsw_space": "ip"}),
                                      ("ivf", {"nlist": 8})])
def test_nbytes_counts_buffers_at_capacity_and_the_index(index, kw):
    """HeadStore.nbytes = its buffers' full size (exactly) + the index's memory (vectors, ids, centroids, HNSW
    links: within 1% of FAISS's serialized size), before and after inserts grow the buffers."""
    from kvtools.methods.retrieval import index_nbytes

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(600, 32, generator=g)
    hs = HeadStore(keys, keys[:, :16], torch.arange(600), RetrievalParams(index=index, **kw), None)
    hs.wait()
    for extra in (0, 1, 37):
        if extra:
            new = torch.randn(extra, 32, generator=g)
            hs.insert(new, new[:, :16], torch.arange(hs.n, hs.n + extra))
        tensors = sum(t.numel() * t.element_size() for t in (hs.keys, hs.values, hs.idx))
        assert hs.nbytes() - index_nbytes(hs.index) == tensors
        assert abs(hs.nbytes() - _true_cpu_bytes(hs)) <= 0.01 * _true_cpu_bytes(hs)
        assert hs.keys.shape[0] <= 1.25 * hs.n + 16  # spare capacity bounded (growth by 1.25x)
    assert hs.index.ntotal == hs.n == 638


def test_cache_nbytes_offloaded_is_what_the_stores_hold(llama):
    with kvtools.patch(llama, retrieval("hnsw")) as p:
        _, cache = run_calls(llama, random_ids(2, 110), [100, 1, 1, 7, 1], cache=p.make_cache())
    stores = [layer.state["offload"] for layer in cache.layers]
    for s in stores:
        s.wait()
    true = sum(_true_cpu_bytes(hs) for s in stores for row in s.heads for hs in row)
    assert abs(cache.nbytes(offloaded=True) - true) <= 0.01 * true


def test_cache_wait_finishes_every_index_build(llama, monkeypatch):
    """KVCache.wait() returns once every store's background build is done and its index is in use."""
    from kvtools.methods import retrieval as ret

    gate = threading.Event()
    real = ret.build_index

    def slow_build(*a):  # hold the builds until the test lets them go
        gate.wait(10)
        return real(*a)

    monkeypatch.setattr(ret, "build_index", slow_build)
    with kvtools.patch(llama, retrieval("ivf", nlist=2, nprobe=2)) as p:
        _, cache = run_calls(llama, random_ids(1, 110), [100], cache=p.make_cache())
        heads = [hs for layer in cache.layers for row in layer.state["offload"].heads for hs in row]
        assert heads and all(hs._future is not None and not hs._future.done() for hs in heads)
        gate.set()
        cache.wait()
        assert all(hs._future is None and hs._index is not None for hs in heads)


def test_store_keeps_the_model_dtype_and_stays_exact():
    """bf16 keys / values stay bf16 on CPU (half the bytes) and the attention over them is bit-identical to the
    same keys held in fp32."""
    g = torch.Generator().manual_seed(0)
    keys, vals = torch.randn(200, 16, generator=g).bfloat16(), torch.randn(200, 16, generator=g).bfloat16()
    q = torch.randn(12, 16, generator=g)
    cfg = RetrievalParams(index="flat")
    low = HeadStore(keys, vals, torch.arange(200), cfg, None)
    full = HeadStore(keys.float(), vals.float(), torch.arange(200), cfg, None)
    low.wait()
    full.wait()
    assert low.keys.dtype == low.values.dtype == torch.bfloat16
    for a, b in zip(low.attention(q, 50, 0.25), full.attention(q, 50, 0.25)):
        assert torch.equal(a, b)
    assert low.nbytes() < full.nbytes()


_EXIT_SCRIPT = """
import time, torch
from kvtools.methods.retrieval import RetrievalParams
from kvtools.methods.retrieval import HeadStore
keys = torch.randn(4000, 64, generator=torch.Generator().manual_seed(0))
cfg = RetrievalParams(index="hnsw", ef_construction=200)
stores = [HeadStore(keys, keys[:, :1], torch.arange(4000), cfg, None) for _ in range(64)]
print(time.time(), flush=True)
"""


def test_pending_index_builds_do_not_delay_interpreter_exit():
    """64 HNSW builds queued (about a minute of work on two cores) and the script ends: the process exits at
    within seconds, cleanly (no abort): queued builds are cancelled, only the one in progress finishes."""
    import subprocess
    import sys
    import time

    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], capture_output=True, text=True, timeout=120)
    done = time.time()
    assert proc.returncode == 0, proc.stderr
    assert done - float(proc.stdout.split()[-1]) < 10


def test_deepcopied_cache_continues_identically_and_independently(llama):
    """A deep copy (taken while indexes may still build) continues decoding exactly like the original; advancing
    one afterwards leaves the other untouched."""
    import copy

    ids = random_ids(2, 120)
    other = torch.cat([ids[:, :102], random_ids(2, 18, seed=5)], 1)
    lens = [1, 1, 7, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    with kvtools.patch(llama, retrieval("hnsw", top_k=16)) as p:
        _, cache = run_calls(llama, ids, [100, 1, 1], cache=p.make_cache())
        twin, spare = copy.deepcopy(cache), copy.deepcopy(cache)
        hs, hs2 = cache.layers[0].state["offload"].heads[0][0], twin.layers[0].state["offload"].heads[0][0]
        assert hs2 is not hs and hs2.keys.data_ptr() != hs.keys.data_ptr() and hs2.index is not hs.index
        run_calls(llama, other, lens, cache=twin, start=102)  # the twin moves on with other tokens
        a, _ = run_calls(llama, ids, lens, cache=cache, start=102)
        b, _ = run_calls(llama, ids, lens, cache=spare, start=102)
    assert torch.equal(a, b)
    assert not torch.equal(hs.keys[: hs.n], hs2.keys[: hs2.n])  # each store has its own tokens


def test_policy_declares_it_cannot_follow_beams():
    """Per-row CPU indexes cannot be reordered: the patch refuses beam search before any work."""
    from kvtools.methods.retrieval import RetrievalPolicy

    assert RetrievalPolicy.supports_reorder is False
