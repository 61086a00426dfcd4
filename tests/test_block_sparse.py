"""The block-sparse engine: every backend against dense masked attention computed the plain way."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvtools.attention.block_sparse import (
    BlockLayout,
    block_sparse_attention,
    causal_block_count,
    causal_block_mask,
)


def dense_masked(q, k, v, mask, bq, bk, scale, off, kv_valid=None, window=None):
    """Plain reference: expand the block mask to tokens, repeat K/V per query head, softmax."""
    b, h, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = h // hk
    sel = mask[:, :, torch.arange(lq) // bq][:, :, :, torch.arange(lk) // bk]
    qi = off + torch.arange(lq)
    ki = torch.arange(lk)
    vis = sel & (ki[None, :] <= qi[:, None])
    if window is not None:
        vis &= (qi[:, None] - ki[None, :]) < window
    if kv_valid is not None:
        vis &= kv_valid[:, None, None, :] | (ki[None, :] == qi[:, None])
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1).nan_to_num(0.0)
    return (p @ v.double().repeat_interleave(g, 1)).float()


def case(b, h, hk, lq, lk, bq, bk, density=0.5, pad=0, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, hk, lk, d, generator=g)
    v = torch.randn(b, hk, lk, d, generator=g)
    mask = torch.rand(b, h, math.ceil(lq / bq), math.ceil(lk / bk), generator=g) < density
    kv_valid = None
    if pad:
        kv_valid = torch.ones(b, lk, dtype=torch.bool)
        kv_valid[0, :pad] = False
    return q, k, v, mask, kv_valid


# (b, h, hk, lq, lk, bq, bk, density, pad): ragged counts per head, partial last blocks,
# GQA groups of 1/2/3, queries that are a suffix of the keys (chunked prefill), left padding
CASES = [
    (2, 4, 2, 300, 300, 64, 64, 0.5, 0),
    (1, 6, 2, 200, 333, 32, 64, 0.3, 50),
    (2, 4, 4, 129, 129, 32, 32, 0.7, 17),
    (1, 3, 1, 64, 250, 16, 16, 0.2, 0),
]


def check_backend(spec, backend, window=None):
    *shape, density, pad = spec
    q, k, v, mask, valid = case(*shape, density=density, pad=pad)
    bq, bk = shape[5], shape[6]
    lay = BlockLayout.from_mask(mask, bq, bk)
    off = k.shape[2] - q.shape[2]
    out = block_sparse_attention(q, k, v, lay, 0.3, kv_valid=valid, backend=backend, window=window)
    ref = dense_masked(q, k, v, mask, bq, bk, 0.3, off, valid, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


# sliding windows that cut through blocks, span several blocks, or are shorter than one block
WINDOWS = [(CASES[0], 100), (CASES[1], 64), (CASES[2], 7), (CASES[3], 40)]


@pytest.mark.parametrize("spec", CASES)
def test_torch_backend_matches_dense_masked(spec):
    check_backend(spec, "torch")


def test_torch_backend_chunks_query_blocks(monkeypatch):
    """The reference bounds its memory by walking query blocks in chunks; chunking must not change results."""
    import kvtools.attention.block_sparse.torch_backend as bs

    q, k, v, mask, valid = case(1, 4, 2, 257, 257, 16, 16, density=0.6, pad=5)
    lay = BlockLayout.from_mask(mask, 16, 16)
    whole = block_sparse_attention(q, k, v, lay, 0.25, kv_valid=valid, backend="torch")
    monkeypatch.setattr(bs, "_CHUNK_FLOATS", 1)  # one query block per chunk
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, 0.25, kv_valid=valid, backend="torch"), whole)


@pytest.mark.parametrize("spec,window", WINDOWS)
def test_torch_backend_sliding_window_matches_dense_masked(spec, window):
    check_backend(spec, "torch", window)


@pytest.mark.parametrize("lq,lk,bq,bk,window", [(300, 300, 64, 64, 100), (200, 333, 32, 64, 50), (129, 129, 16, 32, 16)])
def test_window_band_layout_equals_sliding_sdpa(lq, lk, bq, bk, window):
    """The band layout of a sliding-window layer holds exactly the blocks with a visible key, and
    attention over it equals SDPA with the token-level sliding-window mask."""
    q, k, v, _, _ = case(1, 4, 2, lq, lk, bq, bk)
    off = lk - lq
    band = causal_block_mask(1, 4, lq, lk, bq, bk, window=window)
    qi, ki = off + torch.arange(lq), torch.arange(lk)
    tok = (ki[None, :] <= qi[:, None]) & (qi[:, None] - ki[None, :] < window)
    # per (query block, key block): does any query of the block see any key of the block
    per_block = torch.stack([tok[qb * bq:(qb + 1) * bq].any(0) for qb in range(band.shape[2])])
    needed = torch.stack([per_block[:, kb * bk:(kb + 1) * bk].any(1) for kb in range(band.shape[3])], 1)
    assert torch.equal(band[0, 0], needed)
    lay = BlockLayout.from_mask(band, bq, bk)
    assert lay.blocks() == 4 * causal_block_count(lq, lk, bq, bk, window=window)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tok, enable_gqa=True)
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, backend="torch", window=window), ref,
                               atol=1e-5, rtol=1e-4)


def test_causal_layout_equals_sdpa():
    q, k, v, _, _ = case(2, 4, 2, 300, 300, 64, 64)
    mask = causal_block_mask(2, 4, 300, 300, 64, 64)
    lay = BlockLayout.from_mask(mask, 64, 64)
    assert lay.blocks() == 2 * 4 * causal_block_count(300, 300, 64, 64)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, backend="torch"), ref, atol=1e-5, rtol=1e-4)


def test_unselected_query_block_gives_zeros_and_layout_round_trips():
    q, k, v, mask, _ = case(1, 2, 1, 128, 128, 32, 32, density=0.5)
    mask[0, 1, 2] = False
    lay = BlockLayout.from_mask(mask, 32, 32)
    assert torch.equal(lay.to_mask(4), mask)
    assert (lay.kv_idx[..., :1] >= 0).all()
    out = block_sparse_attention(q, k, v, lay, backend="torch")
    assert out[0, 1, 64:96].abs().max() == 0


def test_bad_layout_and_backend_are_clear_errors():
    q, k, v, mask, _ = case(1, 4, 2, 64, 64, 32, 32)
    lay = BlockLayout.from_mask(mask, 32, 32)
    with pytest.raises(ValueError, match="unknown block-sparse backend"):
        block_sparse_attention(q, k, v, lay, backend="cuda")
    with pytest.raises(ValueError, match="kv_num has shape"):
        block_sparse_attention(q, k, v, BlockLayout.from_mask(mask, 16, 32), backend="torch")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        block_sparse_attention(q[:, :3], k, v, lay, backend="torch")


@pytest.mark.parametrize("spec,window", [(CASES[0], None), (CASES[1], None), WINDOWS[0], WINDOWS[1]])
def test_flex_backend_matches_dense_masked(spec, window):
    """FlexAttention compiled on CPU (inductor C++), full + partial blocks, GQA, padding, q offset, window."""
    check_backend(spec, "flex", window)


def test_triton_backend_matches_dense_masked_in_interpreter(tmp_path):
    """The Triton kernel, run by Triton's CPU interpreter (the same kernel source a GPU compiles)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_block_sparse import case, dense_masked
        from kvtools.attention.block_sparse import BlockLayout, block_sparse_attention
        for b, h, hk, lq, lk, bq, bk, dens, pad, win in [(2, 4, 2, 100, 100, 16, 16, 0.5, 0, None),
                                                         (1, 6, 2, 70, 133, 16, 32, 0.4, 50, None),
                                                         (2, 4, 4, 65, 65, 32, 32, 0.7, 9, None),
                                                         (1, 6, 2, 70, 133, 16, 32, 0.6, 50, 40)]:
            q, k, v, mask, valid = case(b, h, hk, lq, lk, bq, bk, density=dens, pad=pad, d=24)
            lay = BlockLayout.from_mask(mask, bq, bk)
            out = block_sparse_attention(q, k, v, lay, 0.3, kv_valid=valid, backend="triton", window=win)
            ref = dense_masked(q, k, v, mask, bq, bk, 0.3, lk - lq, valid, win)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("pad,window,chunk", [(0, 16, None), (9, 16, 16), (30, 7, 5), (0, 40, 64)])
def test_banded_attention_equals_masked_slot_attention(pad, window, chunk):
    """The O(L * window) path a long prompt takes through a sliding-window layer equals dense attention
    over the slot table with the token-level mask, left padding included."""
    from kvtools.attention.dense import banded_attention, build_slot_mask, sdpa_grouped

    b, h, hk, lq, lk, d = 2, 6, 2, 90, 120, 16
    q, k, v, _, valid = case(b, h, hk, lq, lk, 16, 16, pad=pad, d=d)
    valid = torch.ones(b, lk, dtype=torch.bool) if valid is None else valid
    idx = torch.arange(lk).expand(b, hk, lk)
    mask = build_slot_mask(valid[:, None].expand(b, hk, lk), idx, torch.arange(lk - lq, lk), window)
    ref = sdpa_grouped(q, k, v, mask, 0.25)
    torch.testing.assert_close(banded_attention(q, k, v, valid, 0.25, window, chunk), ref, atol=1e-5, rtol=1e-4)


def test_long_sliding_prompt_takes_the_banded_path(monkeypatch):
    """A fresh prompt longer than two windows goes through the band, and the patched tiny Gemma-3
    (window 16) still equals the unpatched model with left padding in the batch."""
    import kvtools
    import kvtools.attention.dense as dense

    from .conftest import random_ids, tiny_model

    calls = []
    real = dense.banded_attention
    monkeypatch.setattr(dense, "banded_attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    model = tiny_model("gemma3")
    ids = random_ids(2, 70, seed=3)
    am = torch.ones_like(ids)
    am[1, :11] = 0
    ref = model(ids, attention_mask=am).logits
    with kvtools.patch(model, "full"):
        got = model(ids, attention_mask=am).logits
    assert len(calls) == 2  # the two sliding layers, once each
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 11:], ref[1, 11:], atol=1e-4, rtol=0)


def test_chunked_prompt_takes_the_banded_path_in_every_long_chunk(monkeypatch):
    """A chunked prompt through a sliding-window layer: after the window evicted the start, a chunk's table is a
    contiguous stretch of the stream ending at its queries, so the chunk goes through the band as well (not a
    dense mask over the chunk x table); the tiny Gemma-3 (window 16) still equals the unpatched model, left
    padding included, and a table that is not contiguous is not taken for one."""
    import kvtools
    import kvtools.attention.dense as dense

    from .conftest import random_ids, tiny_model

    calls = []
    real = dense.banded_attention
    monkeypatch.setattr(dense, "banded_attention", lambda *a, **kw: calls.append(a[0].shape[2]) or real(*a, **kw))
    model = tiny_model("gemma3")
    ids = random_ids(2, 110, seed=4)
    am = torch.ones_like(ids)
    am[1, :11] = 0
    ref = model(ids, attention_mask=am).logits
    with kvtools.patch(model, {"prefill": {"method": "dense", "chunk": 40}}) as p:
        got = model(ids, attention_mask=am, **p.cache_kwargs(p.make_cache())).logits
    # chunks [0, 30), [30, 70), [70, 110): the first is shorter than two windows (dense); the later two see
    # 15 kept + 40 new slots (> 2 windows): the band, in both sliding layers
    assert calls == [40, 40, 40, 40]
    torch.testing.assert_close(got[0], ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, 11:], ref[1, 11:], atol=1e-4, rtol=0)
    idx = torch.arange(100, 150).view(1, 1, 50)
    valid = torch.ones(1, 1, 50, dtype=torch.bool)
    assert dense.stream_contiguous(valid, idx, torch.arange(130, 150))
    assert not dense.stream_contiguous(valid, idx, torch.arange(129, 149))  # queries not the last slots
    gap = idx.clone()
    gap[..., :10] -= 5  # an evicted stretch in the middle
    assert not dense.stream_contiguous(valid, gap, torch.arange(130, 150))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_prefix_causal_attention_equals_masked_attention(dtype, tol):
    """A chunk's queries (the last Lq keys) over the whole table: unmasked prefix + causal square merged by
    LSE equals SDPA under the [Lq, S] causal mask, GQA included."""
    from kvtools.attention.dense import build_slot_mask, prefix_causal_attention, sdpa_grouped

    b, h, hk, lq, s, d = 2, 6, 2, 37, 120, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(b, n, m, d, generator=g).to(dtype) for n, m in ((h, lq), (hk, s), (hk, s)))
    mask = build_slot_mask(torch.ones(b, hk, s, dtype=torch.bool), torch.arange(s).expand(b, hk, s),
                           torch.arange(s - lq, s))
    ref = sdpa_grouped(q.float(), k.float(), v.float(), mask, 0.25)
    got = prefix_causal_attention(q, k, v, 0.25)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


def test_chunked_full_prompt_takes_the_prefix_causal_path(monkeypatch):
    """A chunked prompt on a cache that keeps everything: every chunk after the first attends the table so
    far without a [Lq, S] mask, and the patched model equals the unpatched one (left padding: the masked path)."""
    import kvtools
    import kvtools.attention.dense as dense

    from .conftest import random_ids, tiny_model

    if not dense.prefix_causal_available(torch.zeros(1)):
        pytest.skip("this torch build has no CPU flash kernel with LSE")
    calls = []
    real = dense.prefix_causal_attention
    monkeypatch.setattr(dense, "prefix_causal_attention", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    model = tiny_model("llama")
    ids = random_ids(2, 70, seed=6)
    ref = model(ids).logits
    with kvtools.patch(model, {"prefill": {"method": "dense", "chunk": 32}}) as p:
        got = model(ids, **p.cache_kwargs(p.make_cache())).logits
    n_layers = model.config.num_hidden_layers
    assert calls == [32] * (2 * n_layers)  # chunks [0, 6), [6, 38), [38, 70): the later two, every layer
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_band_plan_is_built_once_for_every_layer_of_a_shape():
    """Layers of one shape share one plan (built on the first), each layer's result equals dense attention
    over its slot table, the chunks placed alike share one band mask, and the band layout the Triton path
    runs gives the same result through the engine."""
    from kvtools.attention.dense import band_plan, banded_attention, build_slot_mask, sdpa_grouped

    b, h, hk, lq, lk, window = 2, 4, 2, 200, 200, 16
    band_plan.cache_clear()
    for layer in range(3):
        q, k, v, _, valid = case(b, h, hk, lq, lk, 16, 16, pad=9, d=16, seed=layer)
        idx = torch.arange(lk).expand(b, hk, lk)
        ref = sdpa_grouped(q, k, v, build_slot_mask(valid[:, None].expand(b, hk, lk), idx, torch.arange(lk), window),
                           0.25)
        torch.testing.assert_close(banded_attention(q, k, v, valid, 0.25, window, 16), ref, atol=1e-5, rtol=1e-4)
    assert (band_plan.cache_info().misses, band_plan.cache_info().hits) == (1, 2)
    plan = band_plan(b, h, lq, lk, window, 16, q.device)
    # 13 chunks of 16 queries: the first (keys from 0), the full ones after it, the partial last one
    assert len(plan.chunks) == 13 and len({id(c[-1]) for c in plan.chunks}) == 3
    torch.testing.assert_close(block_sparse_attention(q, k, v, plan.layout, 0.25, kv_valid=valid, backend="torch",
                                                      window=window), ref, atol=1e-5, rtol=1e-4)
    banded_attention(q[:, :, 1:], k, v, valid, 0.25, window, 16)  # another shape: another plan
    assert band_plan.cache_info().misses == 2
