"""Methods, one file each. :data:`METHODS` is the registry: adding a method is its file (its parameter
model and its class) and one line here."""

from __future__ import annotations

from typing import Protocol

from ..errors import ConfigError
from ..params import STAGES, StageParams
from .base import CachePolicy, DecodeMethod, LayerInfo, Method, PrefillMethod, StageMethod
from .dense import DenseDecodeMethod, DensePrefillMethod
from .duo import DuoPolicy
from .flexprefill import FlexPrefillMethod
from .full import FullPolicy
from .hip import HipDecodeMethod, HipPrefillMethod
from .knorm import KNormPolicy
from .recycled import RecycledDecodeMethod
from .retrieval import RetrievalDecodeMethod, RetrievalPolicy
from .snapkv import SnapKVPolicy
from .streamingllm import StreamingLLMPolicy


class Stages(Protocol):
    """What :func:`make_policy` reads from a config (``kvtools.KVConfig`` is one)."""

    prefill: StageParams
    cache: StageParams
    decode: StageParams


#: every method, by stage; ``kvtools methods`` lists them in this order
METHODS: tuple[type[Method], ...] = (
    DensePrefillMethod, FlexPrefillMethod, HipPrefillMethod,
    FullPolicy, StreamingLLMPolicy, SnapKVPolicy, KNormPolicy, DuoPolicy, RetrievalPolicy,
    DenseDecodeMethod, HipDecodeMethod, RecycledDecodeMethod, RetrievalDecodeMethod,
)

#: stage -> method name -> class
REGISTRY: dict[str, dict[str, type[Method]]] = {s: {m.name: m for m in METHODS if m.stage == s} for s in STAGES}
#: stage -> method name -> parameter model (what a config is validated against)
STAGE_MODELS: dict[str, dict[str, type[StageParams]]] = {
    s: {name: m.params for name, m in REGISTRY[s].items()} for s in STAGES}

#: the cache policies, and the prefill / decode methods a policy runs (the builtin ones are its own attention)
CACHE_POLICIES: dict[str, type[CachePolicy]] = dict(REGISTRY["cache"])  # type: ignore[arg-type]
PREFILL_METHODS: dict[str, type[PrefillMethod]] = {n: m for n, m in REGISTRY["prefill"].items() if not m.builtin}  # type: ignore[misc]
DECODE_METHODS: dict[str, type[DecodeMethod]] = {n: m for n, m in REGISTRY["decode"].items() if not m.builtin}  # type: ignore[misc]


def make_policy(config: Stages) -> CachePolicy:
    """The cache policy for a validated config, carrying its sparse prefill / decode methods."""
    try:
        policy = CACHE_POLICIES[config.cache.method](config.cache)
    except KeyError:
        raise ConfigError(
            f"cache.method: '{config.cache.method}' has no implementation; allowed: {', '.join(CACHE_POLICIES)}"
        ) from None
    for stage in ("prefill", "decode"):
        cfg = getattr(config, stage)
        cls = REGISTRY[stage].get(cfg.method)
        if cls is None:
            raise ConfigError(f"{stage}.method: '{cfg.method}' has no implementation; allowed: "
                              f"{', '.join(REGISTRY[stage])}")
        if not cls.builtin:
            setattr(policy, stage, cls(cfg))
    return policy


__all__ = ["CACHE_POLICIES", "DECODE_METHODS", "METHODS", "PREFILL_METHODS", "REGISTRY", "STAGE_MODELS",
           "CachePolicy", "DecodeMethod", "LayerInfo", "Method", "PrefillMethod", "StageMethod", "make_policy"]
