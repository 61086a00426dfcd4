"""The FlexAttention backend: ``BlockMask.from_kv_blocks`` over the layout, compiled once with dynamic shapes."""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..masks import leading_padding, left_padding, visible
from .layout import BlockLayout, band_blocks


@lru_cache(maxsize=None)
def _compiled_flex(key: tuple):
    """A compiled FlexAttention (dynamic shapes) per (device, block sizes, group size, padding mask):
    kernels are reused across calls and lengths, and one key's recompiles never disturb another's."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_block_mask(layout: BlockLayout, lq: int, lk: int, off: int, first: torch.Tensor | None, device,
                    window: int | None = None):
    """A FlexAttention BlockMask for ``layout``: blocks wholly below the diagonal (and wholly inside
    the window) with no padding are passed as full blocks (no mask_mod evaluated), the rest as partial
    blocks. ``first`` [B]: each row's first real key (left padding, see :func:`first_real`), or None."""
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = layout.block_q, layout.block_k
    nk = math.ceil(lk / bk)
    dev = torch.device(device)
    sel = layout.to_mask(nk).to(dev)
    full = sel & band_blocks(lq, lk, bq, bk, off, window, dev)[1]
    if first is not None:  # a block holding padding, or running past the keys, is partial
        start_k = torch.arange(nk, device=dev) * bk
        whole = (start_k[None, :] >= first[:, None]) & (start_k + bk <= lk)[None, :]  # [B, nk]
        full &= whole[:, None, None, :]
    partial = sel & ~full
    p = BlockLayout.from_mask(partial, bq, bk, full_width=True)
    f = BlockLayout.from_mask(full, bq, bk, full_width=True)
    # offset and window as tensors: the compiled kernel stays generic over them (no recompile per value);
    # padding as one index per row (a [B, Lk] mask breaks inductor recompiles)
    win = None if window is None else torch.tensor(window, device=dev)
    mask_mod = visible(win, None if first is None else left_padding(first), q_pos=torch.tensor(off, device=dev))
    return BlockMask.from_kv_blocks(
        p.kv_num, p.kv_idx, f.kv_num, f.kv_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(lq, lk),
        compute_q_blocks=False,  # inference only: no backward layout
    )


def first_real(valid: torch.Tensor) -> torch.Tensor | None:
    """[B] int32 index of each row's first real key, or None when padding is not a prefix (left padding).
    Reads the answer on the host."""
    pads = leading_padding(valid.bool())
    return None if pads is None else pads.to(torch.int32)


def flex_block_sparse(q, k, v, layout: BlockLayout, scale: float, off: int, kv_valid, window=None):
    """FlexAttention over ``layout``, or None when ``kv_valid`` is not left padding (the kernel takes padding
    as one index per row): the caller then uses another backend."""
    first = None
    if kv_valid is not None and not bool(kv_valid.all()):
        first = first_real(kv_valid.to(q.device))
        if first is None:
            return None
    lq, lk = q.shape[2], k.shape[2]
    bm = flex_block_mask(layout, lq, lk, off, first, q.device, window)
    fn = _compiled_flex((q.device.type, layout.block_q, layout.block_k, q.shape[1] // k.shape[1],
                         first is not None, window is not None))
    # rows with no visible key come back as zeros (FlexAttention's rule, which is ours)
    return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
