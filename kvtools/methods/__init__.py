"""Methods, one file each; the registry maps config method names to policies."""

from __future__ import annotations

from ..config import KVConfig
from ..errors import ConfigError
from .base import CachePolicy, LayerInfo
from .duo import DuoPolicy
from .full import FullPolicy
from .snapkv import SnapKVPolicy
from .streamingllm import StreamingLLMPolicy

CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    "full": FullPolicy,
    "streamingllm": StreamingLLMPolicy,
    "snapkv": SnapKVPolicy,
    "duo": DuoPolicy,
}


def make_policy(config: KVConfig) -> CachePolicy:
    """The cache policy for a validated config (prefill/decode stages are dense in this version)."""
    try:
        cls = CACHE_POLICIES[config.cache.method]
    except KeyError:
        raise ConfigError(
            f"cache.method: '{config.cache.method}' has no implementation; allowed: {', '.join(CACHE_POLICIES)}"
        ) from None
    return cls(config.cache)


__all__ = ["CACHE_POLICIES", "CachePolicy", "LayerInfo", "make_policy"]
