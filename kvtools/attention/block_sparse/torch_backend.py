"""The torch reference backend: gathers only the selected key blocks and runs SDPA over them (any device)."""

from __future__ import annotations

import math

import torch

from ..masks import padding, visible
from .layout import BlockLayout

# Upper bound on the floats one chunk of query blocks materialises (scores + gathered K and V).
_CHUNK_FLOATS = 1 << 25


def torch_block_sparse(q, k, v, layout: BlockLayout, scale: float, off: int, kv_valid, window=None) -> torch.Tensor:
    """Gather each (row, head, query block)'s selected key blocks and run SDPA over them with the
    token-level mask. Items are processed in order of block count, in chunks padded only to the
    chunk's own largest count, so ragged selections waste little work on padding."""
    b, h, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // hk
    bq, bk = layout.block_q, layout.block_k
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    dev = q.device
    kp = _pad_to(k, nk * bk, 2).view(b, hk, nk, bk, d)
    vp = _pad_to(v, nk * bk, 2).view(b, hk, nk, bk, dv)
    qp = _pad_to(q, nq * bq, 2).view(b, h, nq, bq, d)
    real = torch.arange(nk * bk, device=dev) < lk  # keys past the end are not real
    real = real.expand(b, -1) if kv_valid is None else real & _pad_to(kv_valid.to(dev, torch.bool), nk * bk, 1)
    rule = visible(window, padding(real))
    out = q.new_zeros(b * h * nq, bq, dv)
    num = layout.kv_num.to(dev).long().reshape(-1)  # items: (row, head, query block), flattened
    kv_idx = layout.kv_idx.to(dev).long().reshape(num.numel(), -1)
    order = torch.argsort(num, descending=True)
    order = order[num[order] > 0]
    counts = num[order].tolist()
    ar_q, ar_k = torch.arange(bq, device=dev), torch.arange(bk, device=dev)
    i = 0
    while i < len(order):
        m = counts[i]
        n = max(1, min(len(order) - i, _CHUNK_FLOATS // (m * bk * (bq + d + dv))))
        items = order[i:i + n]
        i += n
        rb = torch.div(items, h * nq, rounding_mode="floor")
        rh = torch.div(items, nq, rounding_mode="floor") % h
        rq = items % nq
        idx = kv_idx[items, :m].clamp(0, nk - 1)  # [n, m]
        used = torch.arange(m, device=dev) < num[items, None]  # [n, m]
        ks = kp[rb[:, None], (rh // g)[:, None], idx].flatten(1, 2)  # [n, m*bk, D]
        vs = vp[rb[:, None], (rh // g)[:, None], idx].flatten(1, 2)
        k_abs = (idx[..., None] * bk + ar_k).flatten(1)  # [n, m*bk]
        q_abs = off + rq[:, None] * bq + ar_q  # [n, bq]
        vis = rule(rb[:, None, None], rh[:, None, None], q_abs[:, :, None], k_abs[:, None, :])  # [n, bq, m*bk]
        vis = vis & used.repeat_interleave(bk, 1)[:, None, :]  # the padded tail of a short selection
        o = torch.nn.functional.scaled_dot_product_attention(
            qp[rb, rh, rq][:, None], ks[:, None], vs[:, None], attn_mask=vis[:, None], scale=scale)[:, 0]
        out[items] = torch.where(vis.any(-1, keepdim=True), o, 0.0).to(out.dtype)
    return out.view(b, h, nq * bq, dv)[:, :, :lq]


def _pad_to(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    extra = n - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
