"""Qwen3: q/k RMSNorm per head before RoPE; optional sliding-window layers."""

from .base import QKNormAdapter


class Qwen3Adapter(QKNormAdapter):
    families = ("qwen3",)
