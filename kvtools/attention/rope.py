"""Rotary position helpers (the ``rotate_half`` convention HF uses for Llama, Qwen, Gemma)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last axis: a vector rotated by angle a is x * cos a + rotate_half(x) * sin a."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate already-rotated vectors ``x`` [..., D] by ``delta`` positions (broadcast to x[..., 0]).

    RoPE rotations compose, so a key rotated at position p becomes the key at p + delta. Computed in
    float32 and rounded once to x's dtype (bf16 cos/sin would add roundings of their own).
    """
    xf = x.to(torch.float32)
    return rotate_f32(xf, rotate_half(xf), delta, inv_freq).to(x.dtype)


def rotate_f32(x: torch.Tensor, x_half: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """:func:`rotate` of float32 vectors ``x`` given ``x_half = rotate_half(x)`` (kept by a caller that rotates the
    same vectors again and again, e.g. StreamingLLM's pristine sinks each step); returns float32."""
    f32 = torch.float32
    ang = torch.as_tensor(delta, device=x.device).to(f32)[..., None] * inv_freq.to(x.device, f32)  # [..., D/2]
    ang = torch.cat((ang, ang), dim=-1)
    return x * ang.cos() + x_half * ang.sin()
