"""Llama layout: Llama, Mistral, Qwen2, SmolLM2 (no q/k norms, one rotary embedding)."""

from .base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    families = ("llama", "mistral", "qwen2")
