"""The contract between the generic patched forward and a method, one base class per stage.

Every method is a class that names its stage, its config name and its parameter model
(:class:`~kvtools.params.StageParams`, declared next to it); ``kvtools.methods`` lists the classes.
A method holds only its parameters: every piece of run-time state lives in the cache, so one patched
model can serve several caches.

* :class:`CachePolicy` (stage ``cache``): which slots are kept, at which positions; it runs the
  attention of every call, handing multi-token calls to the prefill method and single-token calls to
  the decode method when one is configured and applies.
* :class:`PrefillMethod`: ``attend(q, k, v, kv_valid, info)`` over a fresh prompt's keys.
* :class:`DecodeMethod`: ``attend(layer, q, step, info)`` for one new token over the slot table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention.dense import attend_slots, stream_ordered
from ..attention.masks import leading_padding
from ..cache import SlotLayer, Step
from ..params import StageParams


@dataclass(frozen=True)
class LayerInfo:
    """Per-layer facts the family adapter provides (fixed at patch time)."""

    layer_idx: int
    scale: float
    inv_freq: torch.Tensor
    sliding_window: int | None


class Method:
    """What every registered method declares (see ``kvtools.methods.METHODS``)."""

    #: the config name (``cache: {method: <name>}``) and the stage it belongs to
    name: ClassVar[str]
    stage: ClassVar[str]
    #: its parameter model, declared next to it
    params: ClassVar[type[StageParams]]
    #: the stage is run by the cache policy's own attention (dense prefill / decode, retrieval decode):
    #: nothing is attached to the policy
    builtin: ClassVar[bool] = False
    #: per-row state follows beam reordering (False: ``generate(num_beams > 1)`` is refused up front)
    supports_reorder: ClassVar[bool] = True

    def __init__(self, cfg: StageParams) -> None:
        self.cfg = cfg


class StageMethod(Method):
    """A sparse prefill or decode method; holds only its config, state lives in the cache."""

    def applies(self, info: LayerInfo, n_keys: int) -> bool:
        """Whether this layer, attending over ``n_keys`` slots, uses the method (sliding-window layers and
        dense first layers do not; a method may also leave short inputs to dense attention)."""
        return info.sliding_window is None and info.layer_idx >= getattr(self.cfg, "dense_layers", 0)


class PrefillMethod(StageMethod):
    """Sparse attention over a prompt. The policy calls it over each row's real tokens (left padding never
    shifts a block grid) while the slot table is exactly the stream so far."""

    stage = "prefill"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None,
               info: LayerInfo) -> torch.Tensor:
        """q [B, H, Lq, D] (the last Lq of the keys), k, v [B, Hk, Lk, D], ``kv_valid`` [B, Lk] or None (all
        real) -> the causal attention output [B, H, Lq, D]."""
        raise NotImplementedError


class DecodeMethod(StageMethod):
    """Sparse attention of one new token over the slot table. Per-row state lives in a
    :class:`~kvtools.cache.RowState` under ``layer.state[state_key]``, dropped whenever a multi-token call
    changes the table (a decode method never reuses a selection across calls)."""

    stage = "decode"
    #: key of this method's RowState in ``layer.state``
    state_key: ClassVar[str | None] = None

    def attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        """q [B, H, 1, D] of the step's token (already appended to ``layer``) -> output [B, H, 1, D]."""
        raise NotImplementedError


def row_groups(pads: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(padding, rows) for each distinct amount of left padding in ``pads`` [B]."""
    return [(int(p), (pads == p).nonzero().flatten()) for p in torch.unique(pads).tolist()]


def prefill_by_row(method: PrefillMethod, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   kv_valid: torch.Tensor, info: LayerInfo) -> torch.Tensor:
    """A sparse prefill method over each row's real tokens only, rows with the same left padding together.

    q [B, H, Lq, D] are the last Lq of the keys k, v [B, Hk, Lk, D]; ``kv_valid`` [B, Lk] marks real keys.
    A block-sparse method places its blocks from the first key, so running it over a padded row would shift
    its grid (and its "last block" estimate) by the padding: each row gets the selection it gets alone.
    A row too short for the method (``applies`` with its real length) is attended densely; padding
    queries get zeros (they feed nothing real)."""
    if bool(kv_valid.all()):
        return method.attend(q, k, v, None, info)
    pads = leading_padding(kv_valid)
    if pads is None:  # holes that are not left padding: the method masks them itself
        return method.attend(q, k, v, kv_valid, info)
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    off = lk - lq
    out = q.new_zeros(b, h, lq, v.shape[-1])
    for pad, rows in row_groups(pads):
        q0 = max(0, pad - off)  # the first real query of these rows
        if q0 >= lq:
            continue
        qr, kr, vr = q[rows, :, q0:], k[rows, :, pad:], v[rows, :, pad:]
        n = lk - pad
        if method.applies(info, n):
            o = method.attend(qr, kr, vr, None, info)
        else:
            ar = torch.arange(n, device=k.device)
            ok = torch.ones(len(rows), 1, n, dtype=torch.bool, device=k.device)
            o = attend_slots(qr, kr, vr, ok, ar.view(1, 1, n), ar[n - (lq - q0):], info.scale)
        out[rows, :, q0:] = o.to(out.dtype)
    return out


def _fresh(layer: SlotLayer, step: Step) -> bool:
    """The slot table holds exactly the stream so far, in order, the same for every head (no eviction yet)."""
    layout = layer.layout
    return layout.ordered if layout is not None else stream_ordered(layer.valid, layer.idx, step.idx)


class CachePolicy(Method):
    """A cache-stage method: which slots are kept, and at which positions.

    :meth:`attend` runs inside each patched attention layer; by default it calls,
    in order: ``before_append`` -> (append new slots) -> ``align_queries`` ->
    dense attention over the slot table -> ``after_attend``. Most methods override
    only those hooks; a method with its own storage or attention overrides ``attend``.
    """

    stage = "cache"
    #: sparse prefill / decode stage methods (None: dense), set by ``make_policy``
    prefill: PrefillMethod | None = None
    decode: DecodeMethod | None = None

    def methods(self) -> list[Method]:
        """This policy and its stage methods."""
        return [m for m in (self, self.prefill, self.decode) if m is not None]

    def attend(
        self, layer: SlotLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, info: LayerInfo
    ) -> torch.Tensor:
        """New tokens' q [B, H, Lq, D], k, v [B, Hk, Lq, D] -> attention output [B, H, Lq, D]."""
        self.before_append(layer, step, info)
        layer.append(k, v, step)
        q = self.align_queries(layer, q, step, info)
        out = self.attend_table(layer, q, step, info)
        self.after_attend(layer, q, step, info)
        if info.sliding_window is not None:  # slots no later query can see are freed
            layer.keep(layer.idx > step.idx[-1] + 1 - info.sliding_window)
        return out

    def attend_table(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        """Attention of the step's queries over the slot table: a sparse prefill when one is configured
        and the table is exactly the prompt so far, a sparse decode method when one is, else dense."""
        if step.is_prefill and self.decode is not None and self.decode.state_key:
            layer.state.pop(self.decode.state_key, None)  # slots move in a multi-token call: select afresh
        if step.is_prefill and self.prefill is not None and self.prefill.applies(info, layer.size) and _fresh(
                layer, step):
            return prefill_by_row(self.prefill, q, layer.keys, layer.values, layer.valid[:, 0], info)
        if not step.is_prefill and self.decode is not None and self.decode.applies(info, layer.size):
            return self.decode.attend(layer, q, step, info)
        return attend_slots(q, layer.keys, layer.values, layer.valid, layer.idx, step.idx, info.scale,
                            info.sliding_window, layer.layout)

    def bind(self, num_layers: int, num_kv_heads: int) -> None:
        """Check the config against the model (called by ``patch()`` before the model is touched)."""

    def before_append(self, layer: SlotLayer, step: Step, info: LayerInfo) -> None:
        """Make room for the new tokens (evict)."""

    def align_queries(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        """Return the queries at the positions the policy attends them from (default: unchanged)."""
        return q

    def after_attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> None:
        """Compress or evict after the step's attention."""
