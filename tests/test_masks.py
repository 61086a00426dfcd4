"""The visibility rule's mask functions, and every place that evaluates the rule, checked against them."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvtools.attention.block_sparse import BlockLayout, band_blocks, block_sparse_attention
from kvtools.attention.masks import dense_mask, left_padding, padding, visible


def rule(qp: int, kp: int, real: bool, window: int | None) -> bool:
    """The rule as the docs state it, one (query, key) pair at a time."""
    return kp <= qp and (window is None or qp - kp < window) and (real or kp == qp)


@pytest.mark.parametrize("window", [None, 1, 3])
@pytest.mark.parametrize("kind", ["holes", "left"])
def test_dense_mask_of_visible_is_the_rule(window, kind):
    """Keys at their index, queries from an offset; padding with holes, or left padding as one index per row."""
    b, lq, lk, off = 2, 5, 9, 4
    valid = torch.rand(b, lk, generator=torch.Generator().manual_seed(0)) < 0.6
    first = torch.tensor([0, 3])
    if kind == "left":
        valid = torch.arange(lk) >= first[:, None]
    real = padding(valid) if kind == "holes" else left_padding(first)
    got = dense_mask(visible(window, real, q_pos=off), b, 1, torch.arange(lq), torch.arange(lk))
    for r, i, j in itertools.product(range(b), range(lq), range(lk)):
        assert bool(got[r, 0, i, j]) == rule(off + i, j, bool(valid[r, j]), window)


def test_dense_mask_over_a_slot_table_uses_positions_and_per_slot_padding():
    """A slot table: slot k of (row, head) holds stream position idx[b, h, k]; validity belongs to the slot."""
    g = torch.Generator().manual_seed(1)
    b, h, s, window = 2, 3, 7, 4
    idx = torch.stack([torch.randperm(10, generator=g)[:s] for _ in range(b * h)]).view(b, h, s)
    valid = torch.rand(b, h, s, generator=g) < 0.7
    q_idx = torch.tensor([5, 6, 9])
    got = dense_mask(visible(window, padding(valid), q_idx, idx), b, h, torch.arange(3), torch.arange(s))
    for r, hd, i, j in itertools.product(range(b), range(h), range(3), range(s)):
        assert bool(got[r, hd, i, j]) == rule(int(q_idx[i]), int(idx[r, hd, j]), bool(valid[r, hd, j]), window)


@pytest.mark.parametrize("lq,lk,bq,bk,off,window", [(40, 40, 8, 8, 0, None), (30, 50, 8, 16, 20, 5),
                                                   (33, 47, 16, 8, 14, 20), (17, 17, 4, 4, 0, 1)])
def test_band_blocks_are_the_rule_per_block(lq, lk, bq, bk, off, window):
    """Some / only visible pairs per block, from block corners, equal the token rule's any / all."""
    some, only = band_blocks(lq, lk, bq, bk, off, window)
    tok = dense_mask(visible(window, q_pos=off), 1, 1, torch.arange(lq), torch.arange(lk))[0, 0]
    for qb, kb in itertools.product(range(some.shape[0]), range(some.shape[1])):
        cell = tok[qb * bq:(qb + 1) * bq, kb * bk:(kb + 1) * bk]
        assert (bool(some[qb, kb]), bool(only[qb, kb])) == (bool(cell.any()), bool(cell.all())), (qb, kb)


def pattern_case(holes: bool, window: int | None):
    """Zero queries and keys (uniform weights over what a query sees) and one-hot values: an output entry
    is > 0 exactly where the query attends to that key."""
    b, h, hk, lq, lk, bq, bk = 2, 6, 2, 96, 128, 32, 64
    g = torch.Generator().manual_seed(2)
    sel = torch.rand(b, h, 3, 2, generator=g) < 0.7
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[0, :37] = False
    if holes:
        valid[1, 50:70] = False
    q, k = torch.zeros(b, h, lq, lk), torch.zeros(b, hk, lk, lk)
    v = torch.eye(lk).expand(b, hk, lk, lk).contiguous()
    want = dense_mask(visible(window, padding(valid), q_pos=lk - lq), b, 1, torch.arange(lq), torch.arange(lk))
    want = want & sel[:, :, torch.arange(lq) // bq][..., torch.arange(lk) // bk]
    return (q, k, v, BlockLayout.from_mask(sel, bq, bk), valid, window), want


def seen(q, k, v, layout, valid, window, backend):
    return block_sparse_attention(q, k, v, layout, 1.0, kv_valid=valid, backend=backend, window=window) > 0


@pytest.mark.parametrize("backend,holes,window", [("torch", True, None), ("torch", False, 40),
                                                  ("flex", False, None), ("flex", False, 40)])
def test_backend_visibility_is_the_mask_functions(backend, holes, window):
    args, want = pattern_case(holes, window)
    assert torch.equal(seen(*args, backend), want)


def test_triton_kernel_visibility_is_the_mask_functions():
    """The kernel inlines the rule; in Triton's CPU interpreter it attends to exactly what the mask functions
    allow, padding with holes included."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_masks import pattern_case, seen
        for holes, window in [(True, None), (False, 40), (True, 7)]:
            args, want = pattern_case(holes, window)
            assert torch.equal(seen(*args, "triton"), want), (holes, window)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# one call; blocks of 3 queries (the last one short); one query a call
@pytest.mark.parametrize("elems", [1 << 22, 3 * 2 * 3 * 2 * 40, 1])
def test_grouped_sdpa_with_per_head_masks_equals_repeated_heads(monkeypatch, elems):
    """Per-KV-head masks fold each KV head's query heads into the query axis, a block of queries at a time
    (the folded mask is materialised): every block size gives plain attention with K / V repeated per query head."""
    from kvtools.attention import dense

    monkeypatch.setattr(dense, "_FOLDED_MASK_ELEMS", elems)
    torch.manual_seed(0)
    b, hk, g, lq, s, d = 2, 3, 2, 7, 40, 8
    q, k, v = torch.randn(b, hk * g, lq, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)
    mask = torch.rand(b, hk, lq, s) > 0.4
    mask[..., 0] = True  # no query sees nothing
    got = dense.sdpa_grouped(q, k, v, mask, 0.3)
    rep = mask.repeat_interleave(g, 1)
    logits = (q @ k.repeat_interleave(g, 1).transpose(-1, -2) * 0.3).masked_fill(~rep, float("-inf"))
    want = logits.softmax(-1) @ v.repeat_interleave(g, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
