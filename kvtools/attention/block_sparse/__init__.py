"""Block-sparse attention: exact attention restricted to selected (query block, key block) pairs.

The contract every backend keeps::

    q          [B, H, Lq, D]     queries; query i sits at key index ``q_offset + i``
    k, v       [B, Hk, Lk, D]    keys / values, H = g * Hk (GQA: never expanded in memory)
    layout     BlockLayout       per (row, query head, query block): which key blocks to visit
    kv_valid   [B, Lk] bool      optional: False keys (padding) are never attended
    window     int or None       optional sliding window: key j is visible to query i only if i - j < window

Inside the selected blocks the visibility rule of :mod:`kvtools.attention.masks` applies (key index <=
query index, inside the window when one is given, and a real key or the query's own, so a padding query
never gets an empty row). A query whose selected blocks hold no visible key gets a zero output. Query
blocks are ``block_q`` rows of ``q`` counted from its first row; key blocks are ``block_k`` keys counted
from key 0; the last block of either may be partial.

Modules: :mod:`.layout` (BlockLayout, causal / band layouts, block counting), one per backend:
``torch`` (:mod:`.torch_backend`, the reference: gathers only the selected blocks, any device),
``flex`` (:mod:`.flex_backend`, FlexAttention with ``BlockMask.from_kv_blocks``, compiled once with
dynamic shapes and reused), ``triton`` (:mod:`.triton_backend`, CUDA). ``auto`` picks triton on CUDA when
importable, else flex when it compiles, else torch. With the triton backend a call reads nothing back to
the host; flex reads whether padding is left padding (its kernel takes one index per row).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .flex_backend import flex_block_mask, flex_block_sparse
from .layout import BlockLayout, band_blocks, causal_block_count, causal_block_mask
from .torch_backend import torch_block_sparse

__all__ = [
    "BACKENDS", "BlockLayout", "available", "band_blocks", "block_sparse_attention", "causal_block_count",
    "causal_block_mask", "flex_block_mask", "resolve_backend",
]

BACKENDS = ("auto", "torch", "flex", "triton")


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
    name = resolve_backend(backend, q.device)
    if name == "triton":
        from .triton_backend import triton_block_sparse

        return triton_block_sparse(q, k, v, layout, scale, off, kv_valid, window)
    if name == "flex":
        try:
            out = flex_block_sparse(q, k, v, layout, scale, off, kv_valid, window)
        except Exception as exc:  # an inductor failure must not cost the user the result
            if backend == "flex":
                raise
            _warn_once(f"FlexAttention failed ({type(exc).__name__}); using the torch block-sparse reference")
            out = None
        if out is not None:
            return out
    return torch_block_sparse(q, k, v, layout, scale, off, kv_valid, window)


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
