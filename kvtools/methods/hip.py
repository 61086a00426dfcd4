"""HiP: hierarchically pruned attention (our implementation, from the paper's description).

Per query block (``block_q`` queries) and query head, a tree search estimates the top-``k``
keys in ``block_k``-key units: start with G = k / block_k groups spanning the searchable
range, split every group in two, score each child by one representative key (its centre)
as the maximum over the block's queries of q.k, keep the best G children, and repeat until
groups are one unit wide (about log2(L / k) rounds). Each query attends to its selection
plus the first ``n_sink`` keys and the last ``window`` keys (the search covers only the
keys between them, so nothing is counted twice). The first ``dense_layers`` layers stay dense.

Prefill runs through the block-sparse engine. Decode (``decode: {method: hip}``) searches
for the newest query, reuses that selection for ``refresh_interval`` steps (new tokens are
covered by the window meanwhile) and gathers only the selected keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..attention.block_sparse import BlockLayout, band_blocks, block_sparse_attention
from ..attention.dense import attend_slots
from ..attention.masks import leading_padding
from ..attention.merge import attention_with_lse
from ..cache import RowState, SlotLayer, Step
from ..params import Backend, PrefillParams, StageParams
from .base import DecodeMethod, LayerInfo, PrefillMethod, row_groups

class HipParams(StageParams):
    """What HiP prefill and decode share: the tree search's budget and granularity, sink and window."""

    aliases = {"k": "top_k"}
    top_k: int = Field(default=512, ge=1, description="keys selected per query block by the tree search")
    block_k: int = Field(default=16, ge=1, description="selection granularity in keys (the paper uses 2)")
    n_sink: int = Field(default=64, ge=0, description="first keys always attended")
    window: int = Field(default=256, ge=0, description="most recent keys always attended")
    dense_layers: int = Field(default=3, ge=0, description="the first layers stay dense")


class HipPrefillParams(HipParams, PrefillParams):
    """HiP: hierarchical top-k key-block selection per query block, plus sink and window."""

    method: Literal["hip"] = "hip"
    block_q: int = Field(default=32, ge=1, description="queries sharing one selection")
    backend: Backend = Field(default="auto", description="block-sparse engine backend")


class HipDecodeParams(HipParams):
    """HiP decode: each new token attends to a tree-searched top-k, refreshed every `refresh_interval` steps."""

    method: Literal["hip"] = "hip"
    requires = {"cache": ("full",)}
    requires_why = "searches the whole prompt cache"
    refresh_interval: int = Field(default=8, ge=1, description="decode steps between selection refreshes")


# bound on the floats one chunk of query blocks materialises during the search
_SEARCH_FLOATS = 1 << 24


def hip_search(
    q: torch.Tensor, k: torch.Tensor, kv_valid: torch.Tensor | None, n_groups: int, block_q: int, block_k: int,
    lo: torch.Tensor, hi: torch.Tensor,
) -> torch.Tensor:
    """Tree search. q [B, H, NQB*block_q (or fewer), D], k [B, Hk, Lk, D]; ``lo``/``hi`` [NQB] the searchable
    key-unit range [lo, hi) of each query block. Returns selected key units [B, H, NQB, G] (-1: none)."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = h // hk
    nq = lo.numel()
    dev = q.device
    qp = torch.nn.functional.pad(q, (0, 0, 0, nq * block_q - lq)).view(b, h, nq, block_q, d)
    q_ok = (torch.arange(nq * block_q, device=dev) < lq).view(nq, block_q)
    heads = torch.arange(h, device=dev) // g
    rows = torch.arange(b, device=dev)
    valid = None if kv_valid is None else kv_valid.to(dev, torch.bool)
    out = torch.full((b, h, nq, n_groups), -1, dtype=torch.long, device=dev)
    step = max(1, _SEARCH_FLOATS // max(1, b * h * 2 * n_groups * (block_q + d)))
    for c0 in range(0, nq, step):
        c1 = min(c0 + step, nq)
        lo_c, hi_c = lo[c0:c1], hi[c0:c1]
        width = (hi_c - lo_c).clamp_min(0)  # [n]
        i = torch.arange(n_groups + 1, device=dev)
        edges = lo_c[:, None] + torch.div(i[None, :] * width[:, None], n_groups, rounding_mode="floor")  # [n, G+1]
        s = edges[:, :-1].expand(b, h, -1, -1).clone()  # [B, H, n, G]
        e = edges[:, 1:].expand(b, h, -1, -1).clone()
        qc = qp[:, :, c0:c1]
        okc = q_ok[c0:c1]
        while bool(((e - s) > 1).any()):
            w = e - s
            mid = s + torch.div(w + 1, 2, rounding_mode="floor")
            cs = torch.cat([s, torch.where(w > 1, mid, e)], -1)  # [B, H, n, 2G]
            ce = torch.cat([torch.where(w > 1, mid, e), e], -1)
            empty = ce <= cs
            rep = torch.div((cs + ce) * block_k, 2, rounding_mode="floor").clamp(0, lk - 1)  # centre key
            kr = k[rows[:, None, None, None], heads[None, :, None, None], rep]  # [B, H, n, 2G, D]
            sc = torch.einsum("bhnqd,bhnmd->bhnqm", qc.float(), kr.float())
            sc = sc.masked_fill(~okc[None, None, :, :, None], float("-inf")).amax(3)  # max over the block's queries
            if valid is not None:  # a padding representative ranks below every real one
                sc = sc.masked_fill(~valid[rows[:, None, None, None], rep], -1e30)
            sc = sc.masked_fill(empty, float("-inf"))  # empty children rank last
            top = torch.topk(sc, n_groups, dim=-1).indices
            s, e = torch.gather(cs, -1, top), torch.gather(ce, -1, top)
        out[:, :, c0:c1] = torch.where(e - s == 1, s, torch.full_like(s, -1))
    return out


def _prefill_ranges(off: int, cfg, nq: int, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query block: first query index, and the searchable key-unit range [lo, hi) between sink and window."""
    bq, bk = cfg.block_q, cfg.block_k
    q_first = off + torch.arange(nq, device=dev) * bq
    lo = torch.full((nq,), math.ceil(cfg.n_sink / bk), dtype=torch.long, device=dev)
    hi = torch.div(q_first - cfg.window, bk, rounding_mode="floor").clamp_min(0)  # units wholly before the window
    return q_first, lo, torch.maximum(hi, lo)


def hip_prefill_blocks(q: torch.Tensor, k: torch.Tensor, kv_valid: torch.Tensor | None, cfg: HipPrefillParams,
                       q_offset: int | None = None) -> torch.Tensor:
    """Block mask [B, H, NQB, NKB] in (block_q, block_k) units: search + sink + window, causal."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    off = lk - lq if q_offset is None else q_offset
    bq, bk = cfg.block_q, cfg.block_k
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    dev = q.device
    q_first, lo, hi = _prefill_ranges(off, cfg, nq, dev)
    n_groups = max(1, cfg.top_k // bk)
    sel = hip_search(q, k, kv_valid, n_groups, bq, bk, lo, hi)  # [B, H, NQB, G]
    mask = torch.zeros(b, h, nq, nk + 1, dtype=torch.bool, device=dev)
    mask.scatter_(-1, torch.where(sel >= 0, sel, nk), True)
    mask = mask[..., :nk]
    kb = torch.arange(nk, device=dev)
    sink = kb * bk < cfg.n_sink
    window = (kb[None, :] + 1) * bk > (q_first - cfg.window)[:, None]
    causal = band_blocks(lq, lk, bq, bk, off, device=dev)[0]
    return (mask | sink | window) & causal


class HipPrefillMethod(PrefillMethod):
    name = "hip"
    params = HipPrefillParams
    cfg: HipPrefillParams

    def attend(self, q, k, v, kv_valid, info: LayerInfo) -> torch.Tensor:
        mask = hip_prefill_blocks(q, k, kv_valid, self.cfg)
        layout = BlockLayout.from_mask(mask, self.cfg.block_q, self.cfg.block_k)
        return block_sparse_attention(q, k, v, layout, info.scale, kv_valid=kv_valid, backend=self.cfg.backend)


@dataclass
class HipState(RowState):
    """HiP decode's selection (per row, batch first: follows beam reordering) and the refresh schedule."""

    sel: torch.Tensor  # [B, H, G] selected key units counted from the row's first real slot (-1: none)
    age: int = 0  # decode steps taken with a selection
    refreshed: int = 0  # searches run


class HipDecodeMethod(DecodeMethod):
    """Decode with a tree-searched selection refreshed every ``refresh_interval`` steps (state in the cache).

    Sinks, window and search units count from each row's first real token, so a left-padded row selects
    what it selects alone."""

    name = "hip"
    params = HipDecodeParams
    cfg: HipDecodeParams
    state_key = "hip"

    def attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        cfg = self.cfg
        keys, values, valid = layer.keys, layer.values, layer.valid
        b, h, lq, d = q.shape
        n = keys.shape[2]
        q_abs = int(step.idx[-1])
        pads = leading_padding(valid[:, 0])
        if lq != 1 or n != q_abs + 1 or pads is None:  # not a stream-ordered full cache: exact attention
            return attend_slots(q, keys, values, valid, layer.idx, step.idx, info.scale)
        n_groups = max(1, cfg.top_k // cfg.block_k)
        lo = math.ceil(cfg.n_sink / cfg.block_k)
        st: HipState | None = layer.state.get(self.state_key)
        refresh = st is None or st.age % cfg.refresh_interval == 0
        out = q.new_empty(b, h, lq, values.shape[-1])
        sparse = searched = False
        for pad, rows in row_groups(pads):
            q_loc = q_abs - pad  # the new token's index among the row's real tokens
            hi = max(lo, (q_loc + 1 - cfg.window) // cfg.block_k)
            if hi - lo <= n_groups:  # the budget covers everything for these rows: exact attention
                out[rows] = attend_slots(q[rows], keys[rows], values[rows], valid[rows], layer.idx[rows], step.idx,
                                         info.scale)
                continue
            if st is None:
                st = layer.state[self.state_key] = HipState(
                    sel=torch.full((b, h, n_groups), -1, dtype=torch.long, device=q.device))
            sel = st.sel[rows]
            if refresh or bool((sel < 0).all()):
                # the search reads these rows' real keys (a view when every row has this padding)
                kr = keys[:, :, pad:] if len(rows) == b else keys[rows, :, pad:]
                sel = hip_search(q[rows], kr, None, n_groups, 1, cfg.block_k, torch.tensor([lo], device=q.device),
                                 torch.tensor([hi], device=q.device))[:, :, 0]  # [b, H, G]
                st.sel[rows] = sel
                searched = True
            out[rows] = self._attend_selection(q[rows], keys, values, valid, rows, pad, sel, q_loc, info)
            sparse = True
        if sparse:
            st.refreshed += int(searched)
            st.age += 1
        return out

    def _attend_selection(self, q, keys, values, valid, rows: torch.Tensor, pad: int, sel, q_loc: int,
                          info: LayerInfo) -> torch.Tensor:
        """One query per row of ``rows`` (row-local token q_loc, the table's slots from ``pad`` on) over sink +
        selected units + window: only those slots are gathered from the table, never the whole of it."""
        cfg = self.cfg
        bk = cfg.block_k
        b, h = q.shape[:2]
        hk, n = keys.shape[1], keys.shape[2] - pad
        g = h // hk
        units = sel.clamp_min(0)[..., None] * bk + torch.arange(bk, device=q.device)  # [b, H, G, bk]
        tok_sel = units.flatten(2)
        ok_sel = (sel >= 0)[..., None].expand(-1, -1, -1, bk).flatten(2) & (tok_sel < n)
        w0 = max(0, q_loc + 1 - cfg.window)
        fixed = torch.cat([torch.arange(min(cfg.n_sink, w0), device=q.device),
                           torch.arange(w0, q_loc + 1, device=q.device)])
        tok = torch.cat([fixed.expand(b, h, -1), tok_sel.clamp(max=n - 1)], -1)  # [b, H, M]
        ok = torch.cat([torch.ones(b, h, fixed.numel(), dtype=torch.bool, device=q.device), ok_sel], -1)
        rows = rows.to(q.device)[:, None, None]
        heads = (torch.arange(h, device=q.device) // g)[None, :, None]
        at = tok + pad
        ks, vs = keys[rows, heads, at], values[rows, heads, at]  # [b, H, M, D]
        ok &= valid[rows, heads, at] | (tok == q_loc)
        return attention_with_lse(q, ks, vs, ok[:, :, None], info.scale)[0].to(q.dtype)
