"""The contract between the generic patched forward and a cache policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import SlotLayer, Step
from ..config import StageConfig


@dataclass(frozen=True)
class LayerInfo:
    """Per-layer facts the family adapter provides (fixed at patch time)."""

    layer_idx: int
    scale: float
    inv_freq: torch.Tensor
    sliding_window: int | None


class CachePolicy:
    """A cache-stage method: which slots are kept, and at which positions.

    Policies hold only their config: every piece of run-time state lives in the
    cache (``layer.state``), so one patched model can serve several caches.
    Hooks run inside each patched attention layer, in this order:
    ``before_append`` -> (append new slots) -> ``align_queries`` -> attention -> ``after_attend``.
    """

    def __init__(self, cfg: StageConfig) -> None:
        self.cfg = cfg

    def before_append(self, layer: SlotLayer, step: Step, info: LayerInfo) -> None:
        """Make room for the new tokens (evict)."""

    def align_queries(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        """Return the queries at the positions the policy attends them from (default: unchanged)."""
        return q

    def after_attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> None:
        """Compress or evict after the step's attention."""
