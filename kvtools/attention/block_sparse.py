"""Block-sparse attention: exact attention restricted to selected (query block, key block) pairs.

The contract every backend keeps::

    q          [B, H, Lq, D]     queries; query i sits at key index ``q_offset + i``
    k, v       [B, Hk, Lk, D]    keys / values, H = g * Hk (GQA: never expanded in memory)
    layout     BlockLayout       per (row, query head, query block): which key blocks to visit
    kv_valid   [B, Lk] bool      optional: False keys (left padding) are never attended
    window     int or None       optional sliding window: key j is visible to query i only if i - j < window

Inside the selected blocks the usual causal rule applies (key index <= query index,
and inside the window when one is given), and a query also always sees its own key,
so a padding query never gets an empty row.
A query whose selected blocks hold no visible key gets a zero output. Query blocks
are ``block_q`` rows of ``q`` counted from its first row; key blocks are ``block_k``
keys counted from key 0; the last block of either may be partial.

Backends: ``torch`` (reference: gathers only the selected blocks, any device),
``flex`` (FlexAttention with ``BlockMask.from_kv_blocks``, compiled once with dynamic
shapes and reused), ``triton`` (CUDA; see :mod:`kvtools.attention.triton_block_sparse`).
``auto`` picks triton on CUDA when importable, else flex when it compiles, else torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("auto", "torch", "flex", "triton")


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

        ``kv_idx`` is cut to the largest count unless ``full_width`` (FlexAttention wants NKB columns)."""
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


def causal_block_count(lq: int, lk: int, block_q: int, block_k: int, q_offset: int | None = None,
                       window: int | None = None) -> int:
    """Number of (query block, key block) pairs that hold at least one causally visible key (inside the
    sliding window when one is given), per (row, head): the work of dense causal attention."""
    off = lk - lq if q_offset is None else q_offset
    nq, nk = math.ceil(lq / block_q), math.ceil(lk / block_k)
    total = 0
    for qb in range(nq):
        last_q = off + min((qb + 1) * block_q, lq) - 1
        lo = 0 if window is None else max(0, off + qb * block_q - window + 1) // block_k
        total += min(last_q // block_k + 1, nk) - lo
    return total


def causal_block_mask(b: int, h: int, lq: int, lk: int, block_q: int, block_k: int, q_offset: int | None = None,
                      device: torch.device | str | None = None, window: int | None = None) -> torch.Tensor:
    """Boolean [B, H, NQB, NKB]: every block with a causally visible key (dense causal attention;
    with ``window``, the band of a sliding-window layer)."""
    off = lk - lq if q_offset is None else q_offset
    nq, nk = math.ceil(lq / block_q), math.ceil(lk / block_k)
    q0 = torch.arange(nq, device=device) * block_q
    last_q = off + torch.clamp(q0 + block_q, max=lq) - 1
    first_k = torch.arange(nk, device=device) * block_k
    mask = first_k[None, :] <= last_q[:, None]
    if window is not None:  # the block's last key is inside the window of the block's first query
        last_k = torch.clamp(first_k + block_k, max=lk) - 1
        mask &= last_k[None, :] > (off + q0)[:, None] - window
    return mask.expand(b, h, nq, nk)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float | None = None,
    q_offset: int | None = None,
    kv_valid: torch.Tensor | None = None,
    backend: str = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Exact attention of ``q`` over the key blocks ``layout`` selects (see module docstring)."""
    b, h, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    if h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({hk})")
    nq = math.ceil(lq / layout.block_q)
    if tuple(layout.kv_num.shape) != (b, h, nq):
        raise ValueError(f"layout.kv_num has shape {tuple(layout.kv_num.shape)}, expected {(b, h, nq)}")
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    window = None if window is None else int(window)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    off = lk - lq if q_offset is None else int(q_offset)
    if kv_valid is not None and bool(kv_valid.all()):
        kv_valid = None
    name = resolve_backend(backend, q.device)
    if name == "triton":
        from .triton_block_sparse import triton_block_sparse

        return triton_block_sparse(q, k, v, layout, scale, off, kv_valid, window)
    if name == "flex":
        first = None if kv_valid is None else _first_real(kv_valid.to(q.device))
        if kv_valid is None or first is not None:  # the kernel takes left padding as one index per row
            try:
                return _flex(q, k, v, layout, scale, off, first, window)
            except Exception as exc:  # an inductor failure must not cost the user the result
                if backend == "flex":
                    raise
                _warn_once(f"FlexAttention failed ({type(exc).__name__}); using the torch block-sparse reference")
    return _torch_reference(q, k, v, layout, scale, off, kv_valid, window)


@lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    import warnings

    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown block-sparse backend '{backend}'; allowed: {', '.join(BACKENDS)}")
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and not _triton_interpret():
            raise ValueError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for testing)")
        if backend in ("triton", "flex") and not available(backend):
            raise ValueError(f"backend '{backend}' is not available here: {_why_not(backend)}")
        return backend
    if device.type == "cuda" and available("triton"):
        return "triton"
    return "flex" if available("flex") else "torch"


def _triton_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "") == "1"


@lru_cache(maxsize=None)
def available(backend: str) -> bool:
    return _why_not(backend) is None


def _why_not(backend: str) -> str | None:
    if backend == "torch":
        return None
    if backend == "flex":
        try:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
        except ImportError as exc:
            return f"torch has no FlexAttention ({exc})"
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed (pip install 'kvtools[gpu]')"
        return None
    return "unknown backend"


# ---------------------------------------------------------------- torch reference
# Upper bound on the floats one chunk of query blocks materialises (scores + gathered K and V).
_CHUNK_FLOATS = 1 << 25


def _torch_reference(q, k, v, layout: BlockLayout, scale: float, off: int, kv_valid, window=None) -> torch.Tensor:
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
    valid_k = torch.arange(nk * bk, device=dev) < lk
    valid_k = valid_k.expand(b, -1) if kv_valid is None else valid_k & _pad_to(kv_valid.to(dev, torch.bool), nk * bk, 1)
    valid_k = valid_k.view(b, nk, bk)
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
        vis = k_abs[:, None, :] <= q_abs[:, :, None]
        if window is not None:
            vis &= (q_abs[:, :, None] - k_abs[:, None, :]) < window
        ok = valid_k[rb[:, None], idx].flatten(1)  # [n, m*bk]: real keys (padding and past the end: not)
        vis &= ok[:, None, :] | (k_abs[:, None, :] == q_abs[:, :, None])
        vis &= used.repeat_interleave(bk, 1)[:, None, :]  # the padded tail of a short selection
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


# ---------------------------------------------------------------- FlexAttention
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
    blocks. ``first`` [B]: each row's first real key (left padding, see :func:`_first_real`), or None."""
    from torch.nn.attention.flex_attention import BlockMask

    bq, bk = layout.block_q, layout.block_k
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    dev = torch.device(device)
    sel = layout.to_mask(nk).to(dev)
    first_q = off + torch.arange(nq, device=dev) * bq
    start_k = torch.arange(nk, device=dev) * bk
    last_k = torch.clamp(start_k + bk, max=lk) - 1
    full = sel & (last_k[None, :] <= first_q[:, None])
    if window is not None:  # the block's last query sees the block's first key
        last_q = off + torch.clamp(torch.arange(1, nq + 1, device=dev) * bq, max=lq) - 1
        full &= (last_q[:, None] - start_k[None, :]) < window
    if first is not None:  # a block holding padding, or running past the keys, is partial
        whole = (start_k[None, :] >= first[:, None]) & (start_k + bk <= lk)[None, :]  # [B, nk]
        full &= whole[:, None, None, :]
    partial = sel & ~full
    p = BlockLayout.from_mask(partial, bq, bk, full_width=True)
    f = BlockLayout.from_mask(full, bq, bk, full_width=True)
    offset = torch.tensor(off, device=dev)
    win = torch.tensor(lq + lk + off + 1 if window is None else window, device=dev)
    if first is None and window is None:
        def mask_mod(b, h, qi, ki):
            return ki <= qi + offset
    elif first is None:
        def mask_mod(b, h, qi, ki):
            return (ki <= qi + offset) & (qi + offset - ki < win)
    else:  # key ki is real when ki >= first[b] (a tensor index: a [B, Lk] mask breaks inductor recompiles)
        def mask_mod(b, h, qi, ki):
            return (ki <= qi + offset) & (qi + offset - ki < win) & ((ki >= first[b]) | (ki == qi + offset))
    return BlockMask.from_kv_blocks(
        p.kv_num, p.kv_idx, f.kv_num, f.kv_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(lq, lk),
        compute_q_blocks=False,  # inference only: no backward layout
    )


def _first_real(valid: torch.Tensor) -> torch.Tensor | None:
    """[B] int32 index of each row's first real key, or None when padding is not a prefix (left padding)."""
    valid = valid.bool()
    n = valid.shape[1]
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full_like(valid[:, 0], n, dtype=torch.long))
    ar = torch.arange(n, device=valid.device)
    if bool(((ar[None, :] >= first[:, None]) != valid).any()):
        return None
    return first.to(torch.int32)


def _flex(q, k, v, layout: BlockLayout, scale: float, off: int, first, window=None) -> torch.Tensor:
    lq, lk = q.shape[2], k.shape[2]
    bm = flex_block_mask(layout, lq, lk, off, first, q.device, window)
    fn = _compiled_flex((q.device.type, layout.block_q, layout.block_k, q.shape[1] // k.shape[1],
                         first is not None, window is not None))
    # rows with no visible key come back as zeros (FlexAttention's rule, which is ours)
    return fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
