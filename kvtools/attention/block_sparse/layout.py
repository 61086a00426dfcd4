"""Block layouts: which (query block, key block) pairs a block-sparse attention visits, and the block-level
form of the visibility rule (which blocks hold some / only visible pairs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..masks import causal, sliding_window


@dataclass
class BlockLayout:
    """Selected key blocks per (row, query head, query block), FlexAttention's ``kv_indices`` layout."""

    kv_num: torch.Tensor  # [B, H, NQB] int32: how many entries of kv_idx are used
    kv_idx: torch.Tensor  # [B, H, NQB, M] int32: key block ids, ascending, distinct in the used part
    block_q: int
    block_k: int

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block_q: int, block_k: int, full_width: bool = False) -> BlockLayout:
        """From a boolean block mask [B, H, NQB, NKB] (True: compute this block).

        ``kv_idx`` is cut to the largest count unless ``full_width`` (FlexAttention wants NKB columns); the cut
        reads the count on the host, so build layouts once (planning), not inside a per-layer run."""
        mask = mask.bool()
        num = mask.sum(-1, dtype=torch.int32)
        m = mask.shape[-1] if full_width else max(int(num.max()) if num.numel() else 0, 1)
        # stable sort of ~mask puts the selected block ids first, in ascending order
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :m]
        return cls(num, order.to(torch.int32).contiguous(), block_q, block_k)

    def to_mask(self, nkb: int) -> torch.Tensor:
        """Back to a boolean block mask [B, H, NQB, nkb]."""
        b, h, nq, m = self.kv_idx.shape
        used = torch.arange(m, device=self.kv_idx.device) < self.kv_num[..., None]
        out = torch.zeros(b, h, nq, nkb + 1, dtype=torch.bool, device=self.kv_idx.device)
        out.scatter_(-1, torch.where(used, self.kv_idx.long(), nkb), True)
        return out[..., :nkb]

    def blocks(self) -> int:
        return int(self.kv_num.sum())


def band_blocks(lq: int, lk: int, block_q: int, block_k: int, q_offset: int, window: int | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query block, key block) pairs hold some / only pairs inside the causal band (``window`` None:
    plain causal), as two bool [NQB, NKB]; query i sits at key index ``q_offset + i``.

    The band bounds q - k from both sides (causal: >= 0, window: < window), and over a block q - k takes every
    value between its corners, so each bound is checked at the corner most (some) or least (only) favourable
    to it."""
    nq, nk = math.ceil(lq / block_q), math.ceil(lk / block_k)
    q0 = torch.arange(nq, device=device) * block_q
    first_q = (q_offset + q0)[:, None]
    last_q = (q_offset + torch.clamp(q0 + block_q, max=lq) - 1)[:, None]
    first_k = (torch.arange(nk, device=device) * block_k)[None, :]
    last_k = torch.clamp(first_k + block_k, max=lk) - 1
    some, only = causal(None, None, last_q, first_k), causal(None, None, first_q, last_k)
    if window is not None:
        inside = sliding_window(window)
        some = some & inside(None, None, first_q, last_k)
        only = only & inside(None, None, last_q, first_k)
    return some, only


def causal_block_mask(b: int, h: int, lq: int, lk: int, block_q: int, block_k: int, q_offset: int | None = None,
                      device: torch.device | str | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean [B, H, NQB, NKB]: every block with a causally visible key (dense causal attention;
    with ``window``, the band of a sliding-window layer)."""
    off = lk - lq if q_offset is None else q_offset
    some, _ = band_blocks(lq, lk, block_q, block_k, off, window, device)
    return some.expand(b, h, *some.shape)


def causal_block_count(lq: int, lk: int, block_q: int, block_k: int, q_offset: int | None = None,
                       window: int | None = None) -> int:
    """Number of (query block, key block) pairs that hold at least one causally visible key (inside the
    sliding window when one is given), per (row, head): the work of dense causal attention."""
    return int(causal_block_mask(1, 1, lq, lk, block_q, block_k, q_offset, "cpu", window).sum())
