"""Gemma3 text: q/k norms, query_pre_attn_scalar scaling, sliding-window layers with their own RoPE base."""

from .base import QKNormAdapter, base_model


class Gemma3Adapter(QKNormAdapter):
    families = ("gemma3_text",)

    def inv_freq(self, model, module):
        rotary = base_model(model).rotary_emb
        return getattr(rotary, f"{module.layer_type}_inv_freq")
