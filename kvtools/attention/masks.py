"""The visibility rule, written once, as composable mask functions (FlexAttention's ``mask_mod`` convention).

Key k is visible to query q iff k is at or before q (causal), q - k < window (when the layer has a sliding
window), and k is a real key (not padding) or q's own key (so a padding query never gets an empty row).

A mask function ``mod(b, h, q, k) -> bool tensor`` answers that for row b, head h, query q and key k.
FlexAttention calls it with scalar indices; :func:`dense_mask` (and any caller) with broadcastable index
tensors, which gives the dense boolean mask in one vectorised evaluation. The Triton kernel inlines the same
rule (a kernel cannot call Python); the tests check every backend's visibility against these functions.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Window = int | torch.Tensor | None
QPos = int | torch.Tensor | None  # see at_positions

__all__ = [
    "MaskMod", "and_masks", "or_masks", "causal", "sliding_window", "same_position", "padding", "left_padding",
    "at_positions", "causal_band", "real_or_own", "visible", "dense_mask", "leading_padding",
]


def causal(b, h, q, k):
    """The key is at or before the query."""
    return k <= q


def same_position(b, h, q, k):
    """The key is the query's own."""
    return k == q


def sliding_window(window: int | torch.Tensor) -> MaskMod:
    """The key is less than ``window`` positions behind the query (a tensor keeps a compiled kernel generic)."""

    def inside(b, h, q, k):
        return q - k < window

    return inside


def padding(valid: torch.Tensor) -> MaskMod:
    """The key is real per ``valid`` [B, Lk], or [B, H or 1, Lk] for a per-head slot table (indexed by key index)."""
    if valid.dim() == 2:
        return lambda b, h, q, k: valid[b, k]
    return lambda b, h, q, k: valid[b, h, k]


def left_padding(first: torch.Tensor) -> MaskMod:
    """The key is real when it is at or after its row's first real key ``first`` [B] (left padding)."""
    return lambda b, h, q, k: k >= first[b]


def at_positions(mod: MaskMod, q_pos: QPos = None, k_pos: torch.Tensor | None = None) -> MaskMod:
    """``mod``, a rule over stream positions, as a rule over query/key indices.

    ``q_pos``: the first query's position (an int or 0-d tensor: consecutive queries) or each query's [Lq];
    ``k_pos`` [B, H or 1, Lk]: each key's (a slot table). None: the index is the position.
    """
    if q_pos is None and k_pos is None:
        return mod
    per_query = torch.is_tensor(q_pos) and q_pos.dim() > 0

    def remapped(b, h, q, k):
        qp = q if q_pos is None else (q_pos[q] if per_query else q + q_pos)
        return mod(b, h, qp, k if k_pos is None else k_pos[b, h, k])

    return remapped


def causal_band(window: Window = None, q_pos: QPos = None, k_pos: torch.Tensor | None = None) -> MaskMod:
    """The positional half of the rule: causal, inside the sliding window when one is given."""
    return at_positions(causal if window is None else and_masks(causal, sliding_window(window)), q_pos, k_pos)


def real_or_own(real: MaskMod, q_pos: QPos = None, k_pos: torch.Tensor | None = None) -> MaskMod:
    """The padding half of the rule: ``real`` (over key indices), or the query's own key."""
    return or_masks(real, at_positions(same_position, q_pos, k_pos))


def visible(window: Window = None, real: MaskMod | None = None, q_pos: QPos = None,
            k_pos: torch.Tensor | None = None) -> MaskMod:
    """The whole rule. ``real``: which keys are real (:func:`padding`, :func:`left_padding`), None: all are;
    ``q_pos`` / ``k_pos``: where queries and keys sit when not at their index (see :func:`at_positions`)."""
    band = causal_band(window, q_pos, k_pos)
    return band if real is None else and_masks(band, real_or_own(real, q_pos, k_pos))


def dense_mask(mod: MaskMod, b: int, h: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``mod`` as a bool tensor [B, H, Lq, Lk] over rows ``range(b)``, heads ``range(h)`` and the query and key
    indices ``q`` [Lq], ``k`` [Lk]; a dimension the rule does not depend on stays 1 (broadcastable)."""
    dev = q.device
    rows = torch.arange(b, device=dev).view(-1, 1, 1, 1)
    heads = torch.arange(h, device=dev).view(1, -1, 1, 1)
    return mod(rows, heads, q.view(1, 1, -1, 1), k.to(dev).view(1, 1, 1, -1))


def leading_padding(valid: torch.Tensor) -> torch.Tensor | None:
    """[B] count of leading invalid slots of each row of ``valid`` [B, S], or None when some row's invalid
    slots are not a prefix (not left padding)."""
    pads = (~valid).long().cumprod(-1).sum(-1)
    real = valid.sum(-1)
    if bool((pads + real != valid.shape[-1]).any()):
        return None
    return pads
