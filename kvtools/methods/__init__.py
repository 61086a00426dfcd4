"""Methods, one file each; the registry maps config method names to policies."""

from __future__ import annotations

from ..config import KVConfig
from ..errors import ConfigError
from .base import CachePolicy, LayerInfo, StageMethod
from .duo import DuoPolicy
from .flexprefill import FlexPrefillMethod
from .full import FullPolicy
from .hip import HipDecodeMethod, HipPrefillMethod
from .knorm import KNormPolicy
from .recycled import RecycledDecodeMethod
from .retrieval import RetrievalPolicy
from .snapkv import SnapKVPolicy
from .streamingllm import StreamingLLMPolicy

CACHE_POLICIES: dict[str, type[CachePolicy]] = {
    "full": FullPolicy,
    "streamingllm": StreamingLLMPolicy,
    "snapkv": SnapKVPolicy,
    "knorm": KNormPolicy,
    "duo": DuoPolicy,
    "retrieval": RetrievalPolicy,
}

#: sparse prefill / decode methods ("dense" is the policy's own attention)
PREFILL_METHODS: dict[str, type[StageMethod]] = {"flexprefill": FlexPrefillMethod, "hip": HipPrefillMethod}
DECODE_METHODS: dict[str, type[StageMethod]] = {"hip": HipDecodeMethod, "recycled": RecycledDecodeMethod}


def make_policy(config: KVConfig) -> CachePolicy:
    """The cache policy for a validated config, carrying its sparse prefill / decode methods."""
    try:
        cls = CACHE_POLICIES[config.cache.method]
    except KeyError:
        raise ConfigError(
            f"cache.method: '{config.cache.method}' has no implementation; allowed: {', '.join(CACHE_POLICIES)}"
        ) from None
    policy = cls(config.cache)
    for stage, registry in (("prefill", PREFILL_METHODS), ("decode", DECODE_METHODS)):
        cfg = getattr(config, stage)
        if cfg.method == "dense" or (stage == "decode" and cfg.method == "retrieval"):  # the cache policy decodes
            continue
        if cfg.method not in registry:
            raise ConfigError(f"{stage}.method: '{cfg.method}' has no implementation; allowed: dense, "
                              f"{', '.join(registry)}")
        setattr(policy, stage, registry[cfg.method](cfg))
    return policy


__all__ = ["CACHE_POLICIES", "DECODE_METHODS", "PREFILL_METHODS", "CachePolicy", "LayerInfo", "StageMethod",
           "make_policy"]
