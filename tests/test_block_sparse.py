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


def dense_masked(q, k, v, mask, bq, bk, scale, off, kv_valid=None):
    """Plain reference: expand the block mask to tokens, repeat K/V per query head, softmax."""
    b, h, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = h // hk
    sel = mask[:, :, torch.arange(lq) // bq][:, :, :, torch.arange(lk) // bk]
    qi = off + torch.arange(lq)
    ki = torch.arange(lk)
    vis = sel & (ki[None, :] <= qi[:, None])
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


def check_backend(spec, backend):
    *shape, density, pad = spec
    q, k, v, mask, valid = case(*shape, density=density, pad=pad)
    bq, bk = shape[5], shape[6]
    lay = BlockLayout.from_mask(mask, bq, bk)
    off = k.shape[2] - q.shape[2]
    out = block_sparse_attention(q, k, v, lay, 0.3, kv_valid=valid, backend=backend)
    torch.testing.assert_close(out, dense_masked(q, k, v, mask, bq, bk, 0.3, off, valid), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", CASES)
def test_torch_backend_matches_dense_masked(spec):
    check_backend(spec, "torch")


def test_torch_backend_chunks_query_blocks(monkeypatch):
    """The reference bounds its memory by walking query blocks in chunks; chunking must not change results."""
    import kvtools.attention.block_sparse as bs

    q, k, v, mask, valid = case(1, 4, 2, 257, 257, 16, 16, density=0.6, pad=5)
    lay = BlockLayout.from_mask(mask, 16, 16)
    whole = block_sparse_attention(q, k, v, lay, 0.25, kv_valid=valid, backend="torch")
    monkeypatch.setattr(bs, "_CHUNK_FLOATS", 1)  # one query block per chunk
    torch.testing.assert_close(block_sparse_attention(q, k, v, lay, 0.25, kv_valid=valid, backend="torch"), whole)


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


@pytest.mark.parametrize("spec", [CASES[0], CASES[1]])
def test_flex_backend_matches_dense_masked(spec):
    """FlexAttention compiled on CPU (inductor C++), full + partial blocks, GQA, padding, q offset."""
    check_backend(spec, "flex")


def test_triton_backend_matches_dense_masked_in_interpreter(tmp_path):
    """The Triton kernel, run by Triton's CPU interpreter (the same kernel source a GPU compiles)."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_block_sparse import case, dense_masked
        from kvtools.attention.block_sparse import BlockLayout, block_sparse_attention
        for b, h, hk, lq, lk, bq, bk, dens, pad in [(2, 4, 2, 100, 100, 16, 16, 0.5, 0),
                                                    (1, 6, 2, 70, 133, 16, 32, 0.4, 50),
                                                    (2, 4, 4, 65, 65, 32, 32, 0.7, 9)]:
            q, k, v, mask, valid = case(b, h, hk, lq, lk, bq, bk, density=dens, pad=pad, d=24)
            lay = BlockLayout.from_mask(mask, bq, bk)
            out = block_sparse_attention(q, k, v, lay, 0.3, kv_valid=valid, backend="triton")
            ref = dense_masked(q, k, v, mask, bq, bk, 0.3, lk - lq, valid)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-3)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
