"""Triton block-sparse attention forward (CUDA; runs on CPU under ``TRITON_INTERPRET=1`` for tests).

One program per (query block, row x query head). It walks only that query block's
selected key blocks (``kv_idx[:kv_num]``) with an online softmax, reading K/V of the
query head's KV head directly (GQA without expansion). Same contract as
:func:`kvtools.attention.block_sparse.block_sparse_attention`. The launch reads nothing
back to the host, so a CUDA forward never waits on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_sparse_fwd(
    Q, K, V, O, KV_NUM, KV_IDX, VALID,
    sqb, sqh, sql,
    skb, skh, skl,
    svb, svh, svl,
    sob, soh, sol,
    snb, snh,
    sib, sih, siq,
    s_valid,
    H, G, LQ, LK, OFF, WIN, D, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_VALID: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    rq = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rd = tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    q = tl.load(Q + b * sqb + h * sqh + rq[:, None] * sql + rd[None, :],
                mask=(rq[:, None] < LQ) & (rd[None, :] < D), other=0.0)
    q_abs = OFF + rq
    num = tl.load(KV_NUM + b * snb + h * snh + qb)
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for j in range(0, num):
        kb = tl.load(KV_IDX + b * sib + h * sih + qb * siq + j)
        ka = kb * BLOCK_K + rk
        kmask = (ka[:, None] < LK) & (rd[None, :] < D)
        k = tl.load(K + b * skb + hk * skh + ka[:, None] * skl + rd[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + hk * svh + ka[:, None] * svl + rd[None, :], mask=kmask, other=0.0)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        # kvtools.attention.masks.visible, inlined: causal, inside the window, a real key or the query's own
        if HAS_VALID:
            real = tl.load(VALID + b * s_valid + ka, mask=ka < LK, other=0) != 0
        else:
            real = ka < LK
        vis = (ka[None, :] <= q_abs[:, None]) & ((q_abs[:, None] - ka[None, :]) < WIN)
        vis = vis & (real[None, :] | (ka[None, :] == q_abs[:, None])) & (ka[None, :] < LK)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + rq[:, None] * sol + rd[None, :], out.to(O.dtype.element_ty),
             mask=(rq[:, None] < LQ) & (rd[None, :] < D))


def triton_block_sparse(q, k, v, layout, scale: float, off: int, kv_valid, window: int | None = None) -> torch.Tensor:
    """Launch the kernel; see the contract in :mod:`kvtools.attention.block_sparse`."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if v.shape[-1] != d:
        raise ValueError("triton backend: value head dim must equal the query/key head dim")
    bq, bk = layout.block_q, layout.block_k
    for name, size in (("block_q", bq), ("block_k", bk)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"triton backend: {name} must be a power of two >= 16, got {size}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    num = layout.kv_num.to(q.device, torch.int32).contiguous()
    idx = layout.kv_idx.to(q.device, torch.int32).contiguous()
    # padding as one byte per key (any pattern, nothing to check on the host); a dummy pointer when all real
    valid = num if kv_valid is None else kv_valid.to(q.device, torch.int8).contiguous()
    out = torch.empty_like(q)
    grid = (triton.cdiv(lq, bq), b * h)
    _block_sparse_fwd[grid](
        q, k, v, out, num, idx, valid,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num.stride(0), num.stride(1),
        idx.stride(0), idx.stride(1), idx.stride(2),
        valid.stride(0),
        h, h // hk, lq, lk, off, lq + lk + off + 1 if window is None else window, d, scale,
        BLOCK_Q=bq, BLOCK_K=bk, BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_VALID=kv_valid is not None,
    )
    return out
