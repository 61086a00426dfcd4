"""Rotary position helpers (the ``rotate_half`` convention HF uses for Llama, Qwen, Gemma)."""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate already-rotated vectors ``x`` [..., D] by ``delta`` positions (broadcast to x[..., 0]).

    RoPE rotations compose, so a key rotated at position p becomes the key at p + delta.
    The angles are computed once per distinct delta (a re-rotated cache has a handful:
    0 for the sinks, one shift for the window), then gathered. Returns x's dtype.
    """
    uniq, inverse = torch.unique(delta.to(x.device), return_inverse=True)
    ang = uniq.to(torch.float32)[:, None] * inv_freq.to(device=x.device, dtype=torch.float32)  # [U, D/2]
    ang = torch.cat((ang, ang), dim=-1)  # [U, D]
    cos, sin = ang.cos().to(x.dtype)[inverse], ang.sin().to(x.dtype)[inverse]  # [*delta.shape, D]
    return x * cos + _rotate_half(x) * sin
