"""What a model family must tell the generic patched forward."""

from __future__ import annotations

import torch
from torch import nn


class FamilyAdapter:
    """Default (Llama layout): q/k/v/o projections, rotate-half RoPE, one rotary embedding.

    A family overrides only what differs (q/k norms, per-layer RoPE bases, sliding windows).
    """

    families: tuple[str, ...] = ()

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of every decoder layer, in layer order."""
        return [layer.self_attn for layer in _decoder_layers(model)]

    def project(self, module: nn.Module, hidden: torch.Tensor):
        """hidden [B, L, E] -> q [B, H, L, D], k, v [B, Hk, L, D]."""
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        q = module.q_proj(hidden).view(shape).transpose(1, 2)
        k = module.k_proj(hidden).view(shape).transpose(1, 2)
        v = module.v_proj(hidden).view(shape).transpose(1, 2)
        return q, k, v

    def rope(self, module: nn.Module, q: torch.Tensor, k: torch.Tensor, position_embeddings):
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k

    def inv_freq(self, model: nn.Module, module: nn.Module) -> torch.Tensor:
        """Inverse RoPE frequencies of this layer (for re-rotating cached keys)."""
        return base_model(model).rotary_emb.inv_freq

    def scale(self, module: nn.Module) -> float:
        return float(module.scaling)

    def sliding_window(self, model: nn.Module, layer_idx: int) -> int | None:
        """This layer's sliding window, decided from the config the way transformers decides it: with
        ``layer_types``, the window applies to the ``sliding_attention`` layers only (Qwen2/Qwen3 with
        ``use_sliding_window``, Gemma3); without, ``sliding_window`` applies to every layer (Mistral)."""
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            return window if types[layer_idx] == "sliding_attention" else None
        return window

    def output(self, module: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """out [B, H, L, D] -> o_proj([B, L, H*D])."""
        b, h, l, d = out.shape
        return module.o_proj(out.transpose(1, 2).reshape(b, l, h * d))

    def check(self, model: nn.Module) -> None:
        """Raise if this instance has something the generic forward cannot reproduce exactly."""
        cap = getattr(model.config, "attn_logit_softcapping", None)
        if cap:
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"attention logit soft-capping ({cap}) is not supported yet")


class QKNormAdapter(FamilyAdapter):
    """Families with RMSNorm on each head's q and k before RoPE (Qwen3, Gemma3)."""

    def project(self, module, hidden):
        q, k, v = super().project(module, hidden)
        return module.q_norm(q), module.k_norm(k), v


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    return getattr(base, "language_model", base)


def _decoder_layers(model: nn.Module):
    base = base_model(model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise AttributeError(f"{type(model).__name__}: no decoder layers found at .model.layers")
    return layers
