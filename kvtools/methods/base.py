"""The contract between the generic patched forward and a cache policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.dense import attend_slots, stream_ordered
from ..cache import SlotLayer, Step
from ..config import StageConfig


@dataclass(frozen=True)
class LayerInfo:
    """Per-layer facts the family adapter provides (fixed at patch time)."""

    layer_idx: int
    scale: float
    inv_freq: torch.Tensor
    sliding_window: int | None


class StageMethod:
    """A prefill or decode stage method (sparse attention); holds only its config, state lives in the cache."""

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg

    def applies(self, info: LayerInfo, n_keys: int) -> bool:
        """Whether this layer, attending over ``n_keys`` slots, uses the method (sliding-window layers and
        dense first layers do not; a method may also leave short inputs to dense attention)."""
        return info.sliding_window is None and info.layer_idx >= getattr(self.cfg, "dense_layers", 0)


def _fresh(layer: SlotLayer, step: Step) -> bool:
    """The slot table holds exactly the stream so far, in order, the same for every head (no eviction yet)."""
    return stream_ordered(layer.valid, layer.idx, step.idx)


class CachePolicy:
    """A cache-stage method: which slots are kept, and at which positions.

    Policies hold only their config: every piece of run-time state lives in the
    cache (``layer.state``), so one patched model can serve several caches.
    :meth:`attend` runs inside each patched attention layer; by default it calls,
    in order: ``before_append`` -> (append new slots) -> ``align_queries`` ->
    dense attention over the slot table -> ``after_attend``. Most methods override
    only those hooks; a method with its own storage or attention overrides ``attend``.
    """

    #: sparse prefill / decode stage methods (None: dense), set by ``make_policy``
    prefill: StageMethod | None = None
    decode: StageMethod | None = None

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg

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
        if step.is_prefill and self.prefill is not None and self.prefill.applies(info, layer.size) and _fresh(
                layer, step):
            return self.prefill.attend(q, layer.keys, layer.values, layer.valid[:, 0], info)
        if not step.is_prefill and self.decode is not None and self.decode.applies(info, layer.size):
            return self.decode.attend(layer, q, step, info)
        return attend_slots(
            q, layer.keys, layer.values, layer.valid, layer.idx, step.idx, info.scale, info.sliding_window
        )

    def bind(self, num_layers: int, num_kv_heads: int) -> None:
        """Check the config against the model (called by ``patch()`` before the model is touched)."""

    def before_append(self, layer: SlotLayer, step: Step, info: LayerInfo) -> None:
        """Make room for the new tokens (evict)."""

    def align_queries(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        """Return the queries at the positions the policy attends them from (default: unchanged)."""
        return q

    def after_attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> None:
        """Compress or evict after the step's attention."""
