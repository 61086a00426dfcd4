"""FlexPrefill: context-aware sparse prefill (per head: vertical-slash or query-aware blocks).

For each (row, query head), from the last block of queries:

* ``Ahat = softmax(q_last K^T)`` (causal inside the last block, fp32, padding masked);
  vertical scores = its mean over rows, slash scores = the sum of each diagonal / bs.
* Pattern: ``abar = softmax(mean(q_last) . blockmean(K))`` over key blocks versus the
  block-pooled vertical scores; ``D = sqrt(JSD)``. D < tau: query-aware, else vertical-slash.
* Vertical-slash heads: vertical scores pooled per key block, slash scores per block diagonal
  (each token diagonal shared by the two block diagonals it crosses, by overlap); each budget
  is the number of pooled blocks whose sorted mass reaches gamma (blocks of ``block_size``,
  not a fixed 128), clamped to [min_budget, max_budget]; the top vertical key blocks (for
  every query block) and the top block diagonals. Pooling before ranking keeps a budget of
  n blocks to n blocks (ranking single tokens first scatters a token budget over many blocks).
* Query-aware heads: vertical/slash budgets drop to min_budget, plus blocks from the
  block-level estimate ``softmax(blockmean(Q) blockmean(K)^T)`` (causal) in order of mass
  until the mass reaches gamma x (query blocks) over the whole head, as the reference does.
* The first key block and the diagonal block are always kept; prompts of at most
  ``max(2 bs, min_budget)`` tokens are dense.

Unlike the reference: batch > 1 (each row its own selection, left padding masked),
GQA without K/V expansion (scores from each query head against its KV head), and
queries may be a suffix of the keys (``q_offset``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from ..attention.block_sparse import BlockLayout, band_blocks, block_sparse_attention
from ..attention.masks import dense_mask, padding, visible
from ..params import Backend, PrefillParams
from .base import LayerInfo, PrefillMethod
from .common import top_n_mask


class FlexPrefillParams(PrefillParams):
    """FlexPrefill: per-head sparse prefill, vertical-slash or query-aware block selection."""

    method: Literal["flexprefill"] = "flexprefill"
    gamma: float = Field(default=0.9, gt=0, le=1, description="attention mass each head's selection must cover")
    tau: float = Field(default=0.1, ge=0, le=1, description="JSD threshold: below -> query-aware, else vertical-slash")
    block_size: int = Field(default=128, ge=16, description="query/key block size (tokens)")
    min_budget: int = Field(default=512, ge=0, description="least tokens selected per head (rounded up to blocks)")
    max_budget: int | None = Field(default=None, ge=1, description="most tokens per head for vertical/slash")
    backend: Backend = Field(default="auto", description="block-sparse engine backend")


def _gqa_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, n, D] . k [B, Hk, m, D] -> [B, H, n, m] in fp32, K read per KV head (no expansion)."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    s = torch.einsum("bkgnd,bkmd->bkgnm", q.float().view(b, hk, h // hk, n, d), k.float())
    return s.reshape(b, h, n, -1) * scale


def _mass_count(scores: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per leading index: how many of the largest entries are needed to reach mass gamma (scores sum to 1)."""
    srt = torch.sort(scores, dim=-1, descending=True).values
    cum = srt.cumsum(-1)
    return (cum < gamma * cum[..., -1:]).sum(-1) + 1


def _jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(a > 0, a * (torch.log(a.clamp_min(1e-30)) - torch.log(b.clamp_min(1e-30))), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0)


def flexprefill_blocks(
    q: torch.Tensor, k: torch.Tensor, kv_valid: torch.Tensor | None, cfg: FlexPrefillParams, scale: float,
    q_offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block mask [B, H, NQB, NKB] FlexPrefill computes, and which heads were query-aware [B, H]."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    bs = cfg.block_size
    off = lk - lq if q_offset is None else q_offset
    nq, nk = math.ceil(lq / bs), math.ceil(lk / bs)
    dev = q.device
    valid = torch.ones(b, lk, dtype=torch.bool, device=dev) if kv_valid is None else kv_valid.to(dev, torch.bool)

    # --- last-block estimate
    n_last = lq - (nq - 1) * bs  # the last query block (may be partial)
    q_last = q[:, :, lq - n_last:]
    qi = off + torch.arange(lq - n_last, lq, device=dev)
    ki = torch.arange(lk, device=dev)
    vis = dense_mask(visible(real=padding(valid)), b, 1, qi, ki)  # [B, 1, n_last, Lk]
    s = _gqa_scores(q_last, k, scale).masked_fill(~vis, float("-inf"))
    a = torch.softmax(s, dim=-1)  # [B, H, n_last, Lk]
    vertical = a.mean(2)  # [B, H, Lk], sums to 1
    delta = (qi[:, None] - ki[None, :]).clamp_min(0)  # diagonal index of each (query, key)
    slash = torch.zeros(b, h, lk, device=dev)
    slash.scatter_add_(-1, delta.reshape(1, 1, -1).expand(b, h, -1), a.reshape(b, h, -1))
    slash = slash / n_last  # [B, H, Lk] by distance, sums to 1

    # --- pattern choice by JSD between the block-level estimate and the pooled vertical scores
    kpad = torch.nn.functional.pad(k.float() * valid[:, None, :, None], (0, 0, 0, nk * bs - lk))
    cnt = torch.nn.functional.pad(valid.float(), (0, nk * bs - lk)).view(b, nk, bs).sum(-1).clamp_min(1)
    kbm = kpad.view(b, k.shape[1], nk, bs, d).sum(3) / cnt[:, None, :, None]  # block means of real keys
    blk_valid = _block_any(valid, nk, bs)  # [B, NKB]
    abar = _gqa_scores(q_last.mean(2, keepdim=True), kbm, scale)[:, :, 0]  # [B, H, NKB]
    abar = torch.softmax(abar.masked_fill(~blk_valid[:, None], float("-inf")), dim=-1)
    vpool = torch.nn.functional.pad(vertical, (0, nk * bs - lk)).view(b, h, nk, bs).sum(-1)
    query_aware = torch.sqrt(_jsd(abar, vpool)) < cfg.tau  # [B, H]

    # --- vertical-slash: scores pooled to key blocks and to block diagonals; each budget is the number of
    # pooled blocks reaching mass gamma, clamped to [min_budget, max_budget] (tokens, in whole blocks)
    sp = torch.nn.functional.pad(slash, (0, nk * bs - lk))
    # block diagonal t of a (query block, key block) pair holds token diagonals within bs of t * bs,
    # in proportion (bs - |delta - t bs|) / bs of the pair's cells
    tri = torch.cat([torch.arange(1, bs + 1), torch.arange(bs - 1, 0, -1)]).float().to(dev) / bs
    spool = torch.nn.functional.conv1d(
        torch.nn.functional.pad(sp.reshape(b * h, 1, -1), (bs - 1, bs)), tri.view(1, 1, -1)
    ).view(b, h, -1)[..., ::bs][..., :nk]
    lo_b = math.ceil(cfg.min_budget / bs)
    hi_b = nk if cfg.max_budget is None else max(lo_b, math.ceil(cfg.max_budget / bs))
    nv = _mass_count(vpool, cfg.gamma).clamp(lo_b, hi_b)
    ns = _mass_count(spool, cfg.gamma).clamp(lo_b, hi_b)
    lo = torch.full_like(nv, lo_b)
    nv = torch.where(query_aware, lo, nv)
    ns = torch.where(query_aware, lo, ns)
    v_blocks = top_n_mask(vpool, nv)  # [B, H, NKB]
    s_blocks = top_n_mask(spool, ns)  # [B, H, NKB] block diagonals t

    qb = torch.arange(nq, device=dev)
    q_first = off + qb * bs
    q_last_idx = off + torch.clamp((qb + 1) * bs, max=lq) - 1
    kb = torch.arange(nk, device=dev)
    causal = band_blocks(lq, lk, bs, bs, off, device=dev)[0]  # [NQB, NKB]
    # block diagonal of (query block, key block): distance of block starts, in blocks
    diag_t = torch.div(q_first[:, None] - kb[None, :] * bs, bs, rounding_mode="floor").clamp(0, nk - 1)
    mask = v_blocks[:, :, None, :] | torch.gather(
        s_blocks[:, :, None, :].expand(b, h, nq, nk), -1, diag_t.expand(b, h, nq, nk)
    )

    # --- query-aware heads: block-level estimate, blocks by mass up to gamma * NQB over the head
    if bool(query_aware.any()):
        qpad = torch.nn.functional.pad(q.float(), (0, 0, 0, nq * bs - lq))
        qn = torch.clamp(lq - qb * bs, max=bs).float()
        qbm = qpad.view(b, h, nq, bs, d).sum(3) / qn[None, None, :, None]
        est = _gqa_scores(qbm, kbm, scale).masked_fill(~(causal[None, None] & blk_valid[:, None, None, :]),
                                                       float("-inf"))
        est = torch.softmax(est, dim=-1).nan_to_num(0.0)  # [B, H, NQB, NKB]
        flat = est.reshape(b, h, -1)
        n_take = _mass_count(flat, cfg.gamma)
        qa_mask = top_n_mask(flat, n_take).view(b, h, nq, nk)
        mask = torch.where(query_aware[..., None, None], mask | qa_mask, mask)

    if cfg.gamma >= 1:  # all of the mass: every causal block (exact attention)
        mask = torch.ones_like(mask)
    first_blk = torch.zeros(nk, dtype=torch.bool, device=dev)
    first_blk[0] = True
    diag = (kb[None, :] >= torch.div(q_first, bs, rounding_mode="floor")[:, None]) & (
        kb[None, :] <= torch.div(q_last_idx, bs, rounding_mode="floor")[:, None])
    mask = (mask | first_blk | diag) & causal
    return mask, query_aware


def _block_any(valid: torch.Tensor, nk: int, bs: int) -> torch.Tensor:
    """[B, NKB]: the key block holds at least one real key."""
    return torch.nn.functional.pad(valid, (0, nk * bs - valid.shape[1])).view(valid.shape[0], nk, bs).any(-1)


class FlexPrefillMethod(PrefillMethod):
    name = "flexprefill"
    params = FlexPrefillParams
    cfg: FlexPrefillParams

    def applies(self, info: LayerInfo, n_keys: int) -> bool:
        """Prompts of at most max(2 block_size, min_budget) tokens stay dense."""
        return super().applies(info, n_keys) and n_keys > max(2 * self.cfg.block_size, self.cfg.min_budget)

    def attend(self, q, k, v, kv_valid, info: LayerInfo) -> torch.Tensor:
        mask, _ = flexprefill_blocks(q, k, kv_valid, self.cfg, info.scale)
        layout = BlockLayout.from_mask(mask, self.cfg.block_size, self.cfg.block_size)
        return block_sparse_attention(q, k, v, layout, info.scale, kv_valid=kv_valid, backend=self.cfg.backend)
