"""Dense attention over a slot table with SDPA, GQA without expanding K/V in memory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .block_sparse import BlockLayout, available, block_sparse_attention, causal_block_mask
from .masks import causal_band, dense_mask, padding, real_or_own, visible
from .merge import merge_lse

if TYPE_CHECKING:
    from ..cache import TableLayout


def build_slot_mask(
    valid: torch.Tensor,
    idx: torch.Tensor,
    q_idx: torch.Tensor,
    sliding_window: int | None = None,
    layout: TableLayout | None = None,
) -> torch.Tensor | None:
    """Boolean attention mask [B, Hk or 1, Lq, S] for queries at stream indices ``q_idx`` [Lq].

    A query sees valid slots at or before its own index (and inside the sliding
    window when one is given); it always sees its own key, so padding queries
    never get an all-masked row. Returns ``None`` when nothing needs masking
    (all valid, single query, no binding window). ``layout``: what the host knows about the table (then
    nothing is read from the device to decide), with ``q_idx`` the table's last stream indices.
    """
    lq, s = q_idx.numel(), idx.shape[-1]
    if layout is not None and layout.ordered:  # idx is arange(s), the queries are the last ones
        all_valid, same_heads = layout.all_valid, True
        window_binds = sliding_window is not None and s - 1 >= sliding_window
    else:
        all_valid = bool(valid.all())
        window_binds = sliding_window is not None and bool((q_idx.max() - idx.min()) >= sliding_window)
        same_heads = valid.shape[1] == 1 or (bool((valid == valid[:, :1]).all()) and bool((idx == idx[:, :1]).all()))
    if all_valid and lq == 1 and not window_binds:
        return None
    if same_heads:  # one mask for every head when the table is the same across heads (no per-head selection)
        valid, idx = valid[:, :1], idx[:, :1]
    b, h, s = idx.shape
    rule = visible(sliding_window, padding(valid), q_pos=q_idx.to(idx.device), k_pos=idx)
    return dense_mask(rule, b, h, torch.arange(lq, device=idx.device), torch.arange(s, device=idx.device))


def sdpa_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA for q [B, H, Lq, D] over k, v [B, Hk, S, D] with a mask [B, 1 or Hk, Lq, S] (or None).

    A per-KV-head mask is applied by folding the g = H / Hk query heads of each KV
    head into the query axis ([B, Hk, g*Lq, D]) so K/V are never repeated.
    """
    b, h, lq, d = q.shape
    hk = k.shape[1]
    if mask is None or mask.shape[1] == 1 or hk == 1:
        if mask is not None and mask.shape[1] != 1:
            mask = mask[:, :1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=h != hk
        )
    g, s = h // hk, mask.shape[-1]
    # the folded mask is materialised (and SDPA on CPU makes a float copy of it): a few MiB of it at a time
    rows = max(1, _FOLDED_MASK_ELEMS // (b * hk * g * s))
    outs = []
    for a in range(0, lq, rows):
        e = min(a + rows, lq)
        qg = q[:, :, a:e].reshape(b, hk, g * (e - a), d)  # [B, Hk, g*n, D]
        mg = mask[:, :, None, a:e].expand(b, hk, g, e - a, s).reshape(b, hk, g * (e - a), s)
        outs.append(F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, scale=scale)
                    .reshape(b, h, e - a, v.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


#: elements of a per-KV-head mask folded for SDPA per call (4M: 4 MiB as bool, 16 MiB as SDPA's float copy)
_FOLDED_MASK_ELEMS = 1 << 22


@dataclass
class AttendMemo:
    """:func:`attend_slots` calls kept from one pass (the first call of each layer: its inputs and output) and
    given back to a later call of that layer whose inputs are equal to them, bit for bit, instead of attending
    again; the output is what the call would compute. A replayed prefill (``kvtools.eval.generation``) uses it
    so that methods whose prefill attends as ``full`` does cost no second dense attention.
    ``layer``: the layer now running (None: calls are neither kept nor looked up)."""

    record: bool = True
    layer: int | None = None
    calls: dict[int, tuple[tuple[Any, ...], torch.Tensor]] = field(default_factory=dict)

    @contextmanager
    def at(self, layer: int) -> Iterator[None]:
        """Calls within the block are ``layer``'s."""
        self.layer = layer
        try:
            yield
        finally:
            self.layer = None

    def attend(self, fn: Callable[..., torch.Tensor], args: tuple[Any, ...]) -> torch.Tensor:
        """``fn(*args)`` for the current layer: kept (recording) or answered from the kept call when ``args``
        equal its inputs."""
        if self.record:
            out = fn(*args)
            self.calls.setdefault(self.layer, (args, out))
            return out
        hit = self.calls.get(self.layer)
        return hit[1] if hit is not None and all(map(_same, hit[0], args)) else fn(*args)


_MEMO: ContextVar[AttendMemo | None] = ContextVar("kvtools_attend_memo", default=None)


@contextmanager
def attend_memo(memo: AttendMemo) -> Iterator[AttendMemo]:
    """Within the block, :func:`attend_slots` keeps its calls in ``memo`` (``record=True``) or answers from it."""
    token = _MEMO.set(memo)
    try:
        yield memo
    finally:
        _MEMO.reset(token)


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.device == b.device and torch.equal(a, b))
    return a == b


def attend_slots(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    idx: torch.Tensor,
    q_idx: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    layout: TableLayout | None = None,
) -> torch.Tensor:
    """Exact attention of queries q [B, H, Lq, D] at stream indices q_idx over a slot table.

    ``layout`` (the table's :attr:`~kvtools.cache.SlotLayer.layout`, the queries its last tokens): what the
    host knows about the table, so the path is chosen without reading the device."""
    args = (q, keys, values, valid, idx, q_idx, scale, sliding_window, layout)
    memo = _MEMO.get()
    return _attend_slots(*args) if memo is None or memo.layer is None else memo.attend(_attend_slots, args)


def _attend_slots(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    idx: torch.Tensor,
    q_idx: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    layout: TableLayout | None = None,
) -> torch.Tensor:
    lq, s = q.shape[2], keys.shape[2]
    whole_prompt = lq == s and (sliding_window is None or s <= sliding_window)
    long_band = sliding_window is not None and s > _BAND_MIN * sliding_window
    if layout is not None:
        ordered, all_valid = layout.ordered, layout.all_valid
    elif whole_prompt or long_band:  # only these paths need the table's order: read it only for them
        ordered = stream_ordered(valid, idx, q_idx)
        all_valid = ordered and bool(valid.all())
    else:
        ordered = all_valid = False
    if whole_prompt and ordered and all_valid:
        # a whole prompt on an empty cache: plain causal attention
        return sdpa_grouped(q, keys, values, None, scale, is_causal=True)
    if (ordered and all_valid and 1 < lq < s and (sliding_window is None or s <= sliding_window)
            and prefix_causal_available(q)):
        # a later chunk of a chunked prompt over the whole table so far: the earlier keys unmasked plus the
        # chunk's own causal square, merged by log-sum-exp (no [Lq, S] mask)
        return prefix_causal_attention(q, keys, values, scale)
    if long_band and ordered:
        # a long prompt through a sliding-window layer: only the band, O(L * window) instead of O(L^2)
        return banded_attention(q, keys, values, None if all_valid else valid[:, 0], scale, sliding_window)
    if long_band and lq > 1 and stream_contiguous(valid, idx, q_idx):
        # a later chunk of a chunked prompt through a sliding-window layer: the table is the stream's last
        # slots (the window evicted the rest), the queries its last tokens: the band again
        return banded_attention(q, keys, values, None if bool(valid.all()) else valid[:, 0], scale, sliding_window)
    mask = build_slot_mask(valid, idx, q_idx, sliding_window, layout)
    return sdpa_grouped(q, keys, values, mask, scale)


# a sliding-window layer takes the banded path once the table is this many windows long
_BAND_MIN = 2


def stream_ordered(valid: torch.Tensor, idx: torch.Tensor, q_idx: torch.Tensor) -> bool:
    """Slot j holds stream token j for every head (no eviction yet), and the queries at stream indices
    ``q_idx`` are the last tokens (a fresh prompt, possibly left-padded: a per-row prefix of invalid slots):
    :func:`stream_contiguous` from the stream's first token."""
    return int(q_idx[-1]) == idx.shape[-1] - 1 and stream_contiguous(valid, idx, q_idx)


#: SDPA's CPU flash kernel with its log-sum-exp (a private aten op; absent in some torch builds)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prefix_causal_available(q: torch.Tensor) -> bool:
    """Whether :func:`prefix_causal_attention` runs here (CPU, with SDPA's flash kernel exposing its LSE)."""
    return q.device.type == "cpu" and _CPU_FLASH is not None and q.dtype in (torch.float32, torch.bfloat16,
                                                                             torch.float16)


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [B, H, Lq, D], the last Lq of the keys k, v [B, Hk, S, D] (S > Lq, every key
    real): SDPA over the first S - Lq keys with no mask, SDPA over the last Lq keys with ``is_causal``, merged
    by log-sum-exp. Dense SDPA with a [Lq, S] mask costs a third more on CPU and materialises a float copy of
    the mask (512 MiB for a 4k chunk at 32k); this is the cost of the causal attention itself."""
    b, h, lq, d = q.shape
    s, hk = k.shape[2], k.shape[1]
    g, m = h // hk, s - lq
    # the unmasked prefix: each KV head's g query heads folded into its query axis (K/V read once, no copy)
    qg = q.reshape(b, hk, g * lq, d)
    out_p, lse_p = _CPU_FLASH(qg, k[:, :, :m], v[:, :, :m], 0.0, False, scale=scale)
    out_p, lse_p = out_p.reshape(b, h, lq, -1), lse_p.reshape(b, h, lq)
    # the chunk's own keys, causal: K/V repeated per query head (Lq keys only)
    kd, vd = (t[:, :, m:].repeat_interleave(g, 1) if g > 1 else t[:, :, m:] for t in (k, v))
    out_d, lse_d = _CPU_FLASH(q, kd, vd, 0.0, True, scale=scale)
    out, _ = merge_lse(out_p.float(), lse_p.float(), out_d.float(), lse_d.float())
    return out.to(q.dtype)


def stream_contiguous(valid: torch.Tensor, idx: torch.Tensor, q_idx: torch.Tensor) -> bool:
    """Slot j holds stream token ``q_idx[-1] - S + 1 + j`` for every row and head (a contiguous stretch of the
    stream ending at the last query: what a sliding window leaves of a prompt, plus the new chunk), the same
    slots valid in every head, and the queries at stream indices ``q_idx`` are the last slots."""
    s, lq = idx.shape[-1], q_idx.numel()
    if lq > s:
        return False
    q_idx = q_idx.to(idx.device)
    want = q_idx[-1] - (s - 1) + torch.arange(s, device=idx.device)
    if not bool((idx == want).all()) or not bool((valid == valid[:, :1]).all()):
        return False
    return bool((q_idx == want[s - lq:]).all())


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_valid: torch.Tensor | None,
    scale: float,
    window: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """Sliding-window causal attention of q [B, H, Lq, D] (the last Lq of the keys) over k, v [B, Hk, Lk, D]:
    key j is visible to query i when i - window < j <= i and ``kv_valid`` [B, Lk] (a query always sees its
    own key; None: every key is real). Work is O(Lq * window).

    On CUDA with Triton this is the block-sparse engine over the band layout; elsewhere each chunk of
    queries runs SDPA over just the keys its window reaches (on CPU that is faster than the engine's torch
    and flex backends). The shape-only work comes from :func:`band_plan`, shared by every layer of the shape.
    """
    b, h, lq, _ = q.shape
    return band_plan(b, h, lq, k.shape[2], window, chunk or max(window, 256), q.device).run(q, k, v, kv_valid, scale)


@lru_cache(maxsize=16)
def band_plan(b: int, h: int, lq: int, lk: int, window: int, chunk: int, device: torch.device) -> BandPlan:
    """The :class:`BandPlan` of this shape: built once, then shared by every layer (and forward) asking for it."""
    return BandPlan(b, h, lq, lk, window, chunk, torch.device(device))


@dataclass(frozen=True)
class BandPlan:
    """The shape-only half of :func:`banded_attention`: queries are the last ``lq`` of ``lk`` keys, ``chunk``
    queries per SDPA call off Triton. Planning reads the device at most once (the block layout's width);
    :meth:`run` never reads it, so a CUDA forward does not wait on the host between layers."""

    b: int
    h: int
    lq: int
    lk: int
    window: int
    chunk: int
    device: torch.device
    block: int = 64  # Triton block size

    @cached_property
    def layout(self) -> BlockLayout:
        """The band as a block layout (the Triton path)."""
        band = causal_block_mask(self.b, self.h, self.lq, self.lk, self.block, self.block, self.lk - self.lq,
                                 self.device, self.window)
        return BlockLayout.from_mask(band, self.block, self.block)

    @cached_property
    def chunks(self) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
        """Per chunk of queries: its query rows [s, e), the keys [lo, hi) its window reaches, and the band
        mask [1, 1, e - s, hi - lo]. The band depends only on query - key, so chunks placed alike relative to
        their keys share one mask."""
        off = self.lk - self.lq
        shared: dict[tuple[int, int], torch.Tensor] = {}
        out = []
        for s in range(0, self.lq, self.chunk):
            e = min(s + self.chunk, self.lq)
            lo, hi = max(0, off + s - self.window + 1), off + e
            rel = (off + s - lo, hi - lo)  # the first query and the last key, relative to the first key
            if rel not in shared:
                ar = torch.arange(rel[1], device=self.device)
                shared[rel] = dense_mask(causal_band(self.window), 1, 1, ar[rel[0]:], ar)
            out.append((s, e, lo, hi, shared[rel]))
        return tuple(out)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None,
            scale: float) -> torch.Tensor:
        """The attention of one layer (see :func:`banded_attention`)."""
        if q.is_cuda and available("triton"):
            return block_sparse_attention(q, k, v, self.layout, scale, self.lk - self.lq, kv_valid, "triton",
                                          self.window)
        real = None if kv_valid is None else real_or_own(padding(kv_valid.to(q.device)))
        off = self.lk - self.lq
        outs = []
        for s, e, lo, hi, band in self.chunks:
            m = band
            if real is not None:
                ar = torch.arange(lo, hi, device=q.device)
                m = band & dense_mask(real, self.b, 1, ar[off + s - lo:], ar)
            outs.append(sdpa_grouped(q[:, :, s:e], k[:, :, lo:hi], v[:, :, lo:hi], m, scale))
        return torch.cat(outs, 2)
