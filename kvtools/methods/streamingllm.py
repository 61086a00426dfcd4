"""StreamingLLM (Xiao et al., 2023): attention sinks + a recent window.

Keep each row's first ``n_sink`` real tokens and its most recent ``window``
tokens; evict everything between. A decoded token attends to exactly
``n_sink + window`` slots, itself included (as the reference does); a prompt
longer than that is attended densely and then evicted.

Storage is a ring. Between calls each row's table holds its sinks in slots
``[0, n_sink)`` and its window after them, real slots first (in stream order after
a multi-token call; the window's slot order wraps once the row is full). A decode
step writes the new token into the row's first free slot or, at capacity, over
its oldest window slot: no gather of the table, and no reallocation once the table
has its full size. Multi-token calls (prefill, prefill chunks, a later chat turn)
evict to make room, append, attend with the causal mask from ``idx`` and leave
the table in that layout again.

Keys stay as HF rotated them, at their original positions, and are never
re-rotated. ``positions: cache`` makes the model see in-cache positions (0..S-1:
it never sees a distance beyond its cache size, so it can stream past its trained
context). RoPE only sees relative distances, and the window and the queries are
contiguous in the stream, so their distances already are the in-cache ones; only
the sinks sit farther away than in the cache, by the number of evicted tokens. So
each call writes into the sink slots a pristine copy of the sink keys (kept in
``layer.state``) rotated forward by that amount, in float32: one rounding per step,
never compounding. (A first version re-rotated every cached key by one position per
step in the cache dtype; in bf16 a held key's relative error reached 0.12 after
700 steps.) Before any eviction the shift is 0 and this is exactly full attention.
``positions: original`` keeps HF's absolute positions for the sinks too. (Queries and
window keys carry HF's absolute rotations in both modes, so over very long streams,
P around 1e6 and beyond, HF's float32 angles lose precision in the fastest RoPE
frequencies, as the old query re-rotation by T - P did.)

A sliding-window layer (Gemma-3) keeps sinks + the last ``min(window, W)`` tokens;
sinks out of its window are masked like any key there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..attention.dense import attend_slots, sdpa_grouped
from ..attention.rope import rotate_f32, rotate_half
from ..cache import SLOT_INT, RowState, SlotLayer, Step
from ..params import StageParams
from .base import CachePolicy, LayerInfo
from .common import resolve_tokens

class StreamingLLMParams(StageParams):
    """Attention sinks + a recent window; everything between is evicted."""

    method: Literal["streamingllm"] = "streamingllm"
    n_sink: int = Field(default=4, ge=0, description="first real tokens always kept")
    window: int | float = Field(
        default=1020, gt=0, description="recent tokens kept (int) or fraction of the prompt (0 < f <= 1)"
    )
    positions: Literal["cache", "original"] = Field(
        default="cache",
        description="the query sees kept keys at in-cache distances (sinks rotated each call, nothing re-rotated "
                    "in place), or at their original positions",
    )


_LAST = torch.iinfo(SLOT_INT).max  # sort key of invalid slots: after every real token


@dataclass(eq=False)
class RingState(RowState):
    """One layer's ring bookkeeping. Tensors are batch first (they follow beam reordering and count in
    ``nbytes``); the ints describe every row at once and stay true under any reordering of the rows."""

    cap: torch.Tensor  # [B] slots a row keeps between calls: sinks + window (<= sinks + W on a sliding layer)
    max_cap: int  # the table's final size
    #: [B] sinks + window where a sliding layer keeps less between calls (None: ``cap``): what a call's new
    #: tokens see besides / including themselves
    room: torch.Tensor | None = None
    #: when every row holds the same number of real slots and has the same capacity: that number (the
    #: rows are then written at the same slot, chosen in Python); None: per-row tensors decide
    n_all: int | None = None
    ptr: int = 0  # with n_all at capacity: the (common) oldest window slot, overwritten next
    #: positions: cache - each row's sinks as HF rotated them [B, Hk, n_sink, D] (float32, exact copies),
    #: rotate_half of them, their original positions [B, Hk, n_sink] and arange(n_sink) - those positions
    sink_k: torch.Tensor | None = None
    sink_kh: torch.Tensor | None = None
    sink_pos: torch.Tensor | None = None
    sink_base: torch.Tensor | None = None


class StreamingLLMPolicy(CachePolicy):
    name = "streamingllm"
    params = StreamingLLMParams
    cfg: StreamingLLMParams

    #: the new tokens see sinks + window *and* themselves (duo's streaming heads: a chunk attends to
    #: sink + recent + itself), instead of sinks + window including themselves
    attend_with_self = False

    def attend(
        self, layer: SlotLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, info: LayerInfo
    ) -> torch.Tensor:
        ring = layer.state.get("ring")
        if ring is not None and step.q_len == 1 and layer.size > 0 and step.all_real:
            if ring.n_all is not None:
                return self._decode_uniform(layer, ring, q, k, v, step, info)
            return self._decode_rows(layer, ring, q, k, v, step, info)
        return self._call(layer, q, k, v, step, info)

    # ------------------------------------------------------------ decode: one ring write per row
    def _decode_uniform(self, layer: SlotLayer, ring: RingState, q, k, v, step: Step, info: LayerInfo):
        """Every row holds n_all real slots (the first ones) and has the same capacity: one slot for all."""
        n, cap = ring.n_all, ring.max_cap
        out = self._attend_with_self(layer, ring, q, k, v, step, info, n + 1) if self.attend_with_self else None
        if n < cap:
            w = n
            ring.n_all = n + 1
        else:
            w = ring.ptr
            ring.ptr = w + 1 if w + 1 < cap else self.cfg.n_sink
        if w == layer.size:  # still growing
            layer.append(k, v, step)
        else:
            layer.write(w, k, v, step)
        if ring.sink_k is not None and w < self.cfg.n_sink:  # the token is itself a sink
            self._new_sink(ring, k, step, torch.arange(self.cfg.n_sink, device=k.device) == w)
        if out is not None:
            return out
        self._place_sinks(layer, ring, step, info, ring.n_all)
        if ring.n_all == layer.size and info.sliding_window is None and self.decode is None:
            return sdpa_grouped(q, layer.keys, layer.values, None, info.scale)  # every slot real, none masked
        return self.attend_table(layer, q, step, info)

    def _decode_rows(self, layer: SlotLayer, ring: RingState, q, k, v, step: Step, info: LayerInfo):
        """Rows in different states (left padding, per-row capacities): the write slot per row, as tensors."""
        s = layer.size
        ns = self.cfg.n_sink
        cap = ring.cap[:, None]  # [B, 1]
        n = layer.valid.sum(-1)  # [B, Hk] real slots held: the first n
        oldest = torch.where(layer.valid[..., ns:], layer.idx[..., ns:], _LAST).argmin(-1) + ns
        w = torch.where(n >= cap, oldest, n)  # [B, Hk]
        out = self._attend_with_self(layer, ring, q, k, v, step, info, n + 1) if self.attend_with_self else None
        if s < ring.max_cap and bool((w >= s).any()):
            layer.grow(1)
        layer.write(w, k, v, step)
        if ring.sink_k is not None:
            self._new_sink(ring, k, step, torch.arange(ns, device=w.device) == w[..., None])
        n_now = torch.minimum(n + 1, cap)
        self._check_uniform(layer, ring, n_now)
        if out is not None:
            return out
        self._place_sinks(layer, ring, step, info, n_now)
        return self.attend_table(layer, q, step, info)

    def _attend_with_self(self, layer: SlotLayer, ring: RingState, q, k, v, step: Step, info: LayerInfo, n_seen):
        """Attention over the table as it is plus the new token (before the token takes a slot)."""
        self._place_sinks(layer, ring, step, info, n_seen)
        b, hk = k.shape[:2]
        return attend_slots(
            q, torch.cat([layer.keys, k], 2), torch.cat([layer.values, v], 2),
            torch.cat([layer.valid, step.valid[:, None].expand(b, hk, 1)], 2),
            torch.cat([layer.idx, step.idx.view(1, 1, 1).to(layer.idx.device).expand(b, hk, 1)], 2),
            step.idx, info.scale, info.sliding_window,
        )

    @staticmethod
    def _new_sink(ring: RingState, k: torch.Tensor, step: Step, is_new: torch.Tensor) -> None:
        """Record the new token as a row's sink where ``is_new`` [B or 1, Hk or 1, n_sink] says so."""
        kf = k.to(torch.float32)  # [B, Hk, 1, D]
        ring.sink_k = torch.where(is_new[..., None], kf, ring.sink_k)
        ring.sink_kh = torch.where(is_new[..., None], rotate_half(kf), ring.sink_kh)
        ring.sink_pos = torch.where(is_new, step.pos[:, None, :1].to(is_new.device), ring.sink_pos)
        ring.sink_base = torch.arange(ring.sink_pos.shape[-1], device=is_new.device) - ring.sink_pos

    def _place_sinks(self, layer: SlotLayer, ring: RingState, step: Step, info: LayerInfo, n_seen) -> None:
        """``positions: cache``: write the sinks (slots [0, n_sink)) where a decode query that is the
        ``n_seen``-th real slot it attends (int, or [B, Hk]) sees them at in-cache distance. The query keeps its
        original position P at in-cache rank T = n_seen - 1, so sink t (original position p_t) goes to
        position t + P - T: its pristine copy rotated by t - p_t + P - T, in float32."""
        if ring.sink_k is None:
            return
        ns = min(self.cfg.n_sink, layer.size)
        c = step.pos[:, None, :1].to(ring.sink_base.device) - (n_seen - 1 if isinstance(n_seen, int) else
                                                               (n_seen - 1)[..., None])  # [B, 1 or Hk, 1]: P - T
        delta = ring.sink_base[:, :, :ns] + c
        layer.rewrite_keys(ns, rotate_f32(ring.sink_k[:, :, :ns], ring.sink_kh[:, :, :ns], delta, info.inv_freq),
                           delta + ring.sink_pos[:, :, :ns])

    def _check_uniform(self, layer: SlotLayer, ring: RingState, n: torch.Tensor) -> None:
        """Switch to the one-slot-for-all path once every row holds the same count (and, when full, has its
        oldest window slot at the same place)."""
        if not bool((ring.cap == ring.max_cap).all()) or not bool((n == n.flatten()[0]).all()):
            return
        n0 = int(n.flatten()[0])
        if n0 < ring.max_cap:
            ring.n_all, ring.ptr = n0, self.cfg.n_sink
            return
        oldest = torch.where(layer.valid[..., self.cfg.n_sink:], layer.idx[..., self.cfg.n_sink:], _LAST).argmin(-1)
        if bool((oldest == oldest.flatten()[0]).all()):
            ring.n_all, ring.ptr = n0, int(oldest.flatten()[0]) + self.cfg.n_sink

    # ------------------------------------------------------------ multi-token calls (and the odd decode)
    def _ring(self, layer: SlotLayer, step: Step, info: LayerInfo) -> RingState:
        """The layer's ring state; capacities resolve on the first call (a fractional window per row)."""
        ring = layer.state.get("ring")
        if ring is None:
            window = resolve_tokens(self.cfg.window, step.prompt_real.to(step.valid.device)).clamp(min=1)
            cap = self.cfg.n_sink + window
            room = None
            if info.sliding_window is not None and bool((window > info.sliding_window).any()):
                cap, room = self.cfg.n_sink + window.clamp(max=info.sliding_window), cap
            ring = layer.state["ring"] = RingState(cap=cap, max_cap=int(cap.max()), room=room)
        return ring

    def _call(self, layer: SlotLayer, q, k, v, step: Step, info: LayerInfo) -> torch.Tensor:
        """Evict to make room, append, attend with the causal mask from ``idx``, evict to capacity; the
        table is left in ring layout (sinks first, then the window, in stream order; real slots first)."""
        ring = self._ring(layer, step, info)
        cache_pos = self.cfg.positions == "cache"
        if cache_pos and ring.sink_k is not None and layer.size:  # every key back at its original position
            ns = min(self.cfg.n_sink, layer.size)
            layer.rewrite_keys(ns, ring.sink_k[:, :, :ns], ring.sink_pos[:, :, :ns])
        if layer.size:
            room = ring.cap if ring.room is None else ring.room
            self._select(layer, room if self.attend_with_self else room - step.valid.sum(-1))
        layer.append(k, v, step)
        if cache_pos:
            self._snapshot_and_place_sinks(layer, ring, step, info)
        out = self.attend_table(layer, q, step, info)
        self._select(layer, ring.cap, canonical=True)
        ring.n_all = None
        self._check_uniform(layer, ring, layer.valid.sum(-1))
        return out

    def _snapshot_and_place_sinks(self, layer: SlotLayer, ring: RingState, step: Step, info: LayerInfo) -> None:
        """Copy each row's sinks (its first ``n_sink`` real tokens by stream index, all keys being at their
        original positions here) and rotate them in place for the call's queries: these keep their positions
        P_i at in-cache ranks T_i, and P_i - T_i is the same for every real query of a row."""
        ns_all = self.cfg.n_sink
        ns = min(ns_all, layer.size)
        if not ns_all:
            return
        valid, keys = layer.valid, layer.keys  # read once: a quantised table dequantises on every read
        b, hk, _, d = keys.shape
        first = torch.where(valid, layer.idx, _LAST).argsort(dim=-1, stable=True)[..., :ns]  # [B, Hk, ns]
        ok = valid.gather(2, first)
        sk = keys.gather(2, first[..., None].expand(b, hk, ns, d)).to(torch.float32)
        sp = layer.pos.gather(2, first)
        if ns < ns_all:  # a short table: the missing sinks arrive later (decode records them)
            sk = torch.cat([sk, sk.new_zeros(b, hk, ns_all - ns, d)], 2)
            sp = torch.cat([sp, sp.new_zeros(b, hk, ns_all - ns)], 2)
        ring.sink_k, ring.sink_kh, ring.sink_pos = sk, rotate_half(sk), sp
        ring.sink_base = torch.arange(ns_all, device=sp.device) - sp
        p_last = torch.where(step.valid, step.pos, -1).amax(-1).to(valid.device)  # [B]
        c = p_last[:, None, None] - (valid.sum(-1, keepdim=True) - 1)  # [B, Hk, 1]: P - T of the last real query
        has = (ok & step.valid.any(-1).to(ok.device)[:, None, None])
        delta = torch.where(has, ring.sink_base[..., :ns] + c, 0)
        if not bool(delta.any()):  # nothing evicted before these queries
            return
        rot = rotate_f32(sk[:, :, :ns], ring.sink_kh[:, :, :ns], delta, info.inv_freq)
        layer.rewrite_keys(first, rot, sp[..., :ns] + delta)

    def _select(self, layer: SlotLayer, target: torch.Tensor, canonical: bool = False) -> None:
        """Keep each row's first ``n_sink`` and last ``target - n_sink`` [B] real tokens (by stream index),
        kept slots first, in stream order. Without ``canonical`` nothing moves unless a row holds more than
        ``target``."""
        valid, idx = layer.valid, layer.idx
        n = valid.sum(-1, keepdim=True)  # [B, Hk, 1]
        if not canonical and not bool((n > target[:, None, None]).any()):
            return
        s = layer.size
        ar = torch.arange(s, device=valid.device)
        order = torch.where(valid, idx, _LAST).argsort(dim=-1, stable=True)  # real slots by stream index first
        recent = (target - self.cfg.n_sink).clamp(min=0)[:, None, None]
        keep = (ar < n) & ((ar < self.cfg.n_sink) | (ar >= n - recent))  # over the sorted order
        counts = keep.sum(-1)
        k_max = int(counts.max()) if counts.numel() else 0
        pick = torch.where(keep, ar, ar + s).argsort(dim=-1)[..., :k_max]
        sel = order.gather(2, pick)
        drop = torch.arange(k_max, device=valid.device) >= counts[..., None]
        if k_max == s and bool((sel == ar).all()):  # already in layout: just forget the evicted
            layer.valid = valid & ~drop
            return
        layer.gather(sel, fill_invalid=drop)
