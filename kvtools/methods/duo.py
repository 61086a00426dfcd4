"""DuoAttention (Xiao et al., 2024): retrieval heads keep everything, streaming heads sink + recent.

The split is per (layer, KV head). Retrieval heads live in the layer's slot table;
streaming heads live in a second, smaller table (``layer.state["stream"]``) that
holds only ``n_sink`` + ``recent`` slots: the memory is really freed, no masking.
Prefill is dense for every head and then crops the streaming heads (one shot);
with ``prefill: {chunk: N}`` streaming heads attend only to sink + recent + the
current chunk, so long prefill gets cheaper too. Outputs are reassembled in head order.

Each head group may run another cache policy (``streaming: {...}``, ``retrieval: {...}``,
validated like a ``cache:`` stage): streaming heads StreamingLLM (the default, from
``n_sink`` / ``window``) or a scored-eviction method (SnapKV, KNorm: a budget per KV head
instead of sink + recent), retrieval heads everything (the default) or a scored method.
A group's policy runs on its table exactly as it runs alone on a model whose KV heads are
that group's (its observation queries are the group's query heads, its per-layer budget
the one it gives that layer alone); a sparse prefill stage runs on the retrieval heads.

Patterns: the reference TSV (one row per layer, one float in [0, 1] per KV head),
binarised by ``threshold`` (retrieval: value > threshold; default 0.5) or
``sparsity`` (that fraction of all KV heads, the lowest values, stream), or
``retrieval_heads`` given explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, SerializeAsAny, ValidationInfo, field_validator

from ..errors import ConfigError
from ..params import STAGES, StageParams, closest, validate_fields
from .base import CachePolicy, DecodeMethod, PrefillMethod
from .full import FullParams
from .scored import ScoredEvictionPolicy
from .streamingllm import StreamingLLMParams, StreamingLLMPolicy

#: the head groups, each run by its own cache policy: group -> the policy that runs it by default
GROUPS = {"streaming": "streamingllm", "retrieval": "full"}
#: what each group's allowed policies keep (for the error naming them)
_KEEPS = {"streaming": "sinks + a recent window, or a scored method's budget per KV head",
          "retrieval": "every slot, or a scored method's budget per KV head"}
#: why a cache policy cannot run a head group, completing "'<method>' cannot run duo's <group> heads: it ..."
_WHY_NOT = {
    ("streaming", "full"): "would keep every slot: make those heads retrieval heads (retrieval_heads, threshold "
                           "or sparsity)",
    ("retrieval", "streamingllm"): "would keep only sinks + a window: make those heads streaming heads "
                                   "(retrieval_heads, threshold or sparsity)",
    "duo": "is the head split itself",
    "retrieval": "offloads to its own per-head CPU index and needs decode: retrieval, not a table per head group",
}


def group_allowed(group: str) -> list[str]:
    """The cache policies that may run a head group: the group's default (StreamingLLM for streaming heads,
    full for retrieval heads) and every scored-eviction method (its budget holds per KV head, so it applies to
    any subset of a layer's heads)."""
    from . import CACHE_POLICIES  # the registry imports this module

    return [name for name, cls in CACHE_POLICIES.items()
            if name == GROUPS[group] or issubclass(cls, ScoredEvictionPolicy)]


def _check_group_method(group: str, method: str) -> None:
    """A :class:`ConfigError` unless ``method`` may run the head ``group`` (see :func:`group_allowed`)."""
    allowed = group_allowed(group)
    if method in allowed:
        return
    why = _WHY_NOT.get((group, method)) or _WHY_NOT.get(method) or "is not a policy of one slot table per KV head"
    raise ConfigError(f"cache.{group}.method: '{method}' cannot run duo's {group} heads: it {why}; allowed: "
                      f"{', '.join(allowed)} ({_KEEPS[group]})")


def group_params(group: str, raw: Any) -> StageParams:
    """A head group's cache policy config from YAML (a mapping, or a method name), validated like a ``cache:``
    stage (the same messages, under ``cache.<group>``). A StreamingLLM group keeps its keys at their original
    positions unless it says otherwise (DuoAttention's streaming heads; ``n_sink`` / ``window`` mean that)."""
    from . import STAGE_MODELS  # the registry imports this module

    where = f"cache.{group}"
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping like {{method: ...}}, got {raw!r}")
    allowed = group_allowed(group)
    method = raw.get("method")
    if method is None:
        raise ConfigError(f"{where}.method: missing; allowed: {', '.join(allowed)}")
    if method not in STAGE_MODELS["cache"]:
        others = [s for s in STAGES if method in STAGE_MODELS[s]]
        hint = f" ('{method}' is a {others[0]} method)" if others else closest(method, allowed)
        raise ConfigError(f"{where}.method: unknown value '{method}'{hint}; allowed: {', '.join(allowed)}")
    _check_group_method(group, method)
    if method == "streamingllm":
        raw = {"positions": "original", **raw}
    cfg = validate_fields(STAGE_MODELS["cache"][method], raw, where, what=method)
    cfg.check(where)
    return cfg


class DuoParams(StageParams):
    """DuoAttention: retrieval KV heads keep everything, streaming ones sink + window (or a scored method each).

    ``streaming: {method: snapkv, budget: 0.1}`` / ``retrieval: {method: snapkv, budget: 0.5}`` run a head group
    under another cache policy (see :func:`group_allowed`); ``n_sink`` / ``window`` are the default streaming
    policy's (StreamingLLM at original positions) and, given with ``streaming``, must agree with it."""

    aliases = {"recent": "window"}

    method: Literal["duo"] = "duo"
    pattern: str | None = Field(default=None, description="TSV: one row per layer, one float in [0, 1] per KV head")
    retrieval_heads: dict[int, list[int]] | None = Field(
        default=None, description="explicit retrieval KV heads per layer ({layer: [heads]}); other heads stream"
    )
    sparsity: float | None = Field(default=None, ge=0, le=1, description="fraction of KV heads made streaming")
    threshold: float | None = Field(default=None, ge=0, le=1, description="retrieval heads: pattern value > this")
    n_sink: int | None = Field(default=64, ge=0, description="first real tokens kept by streaming heads (their "
                                                             "StreamingLLM policy when `streaming` is not given)")
    window: int | None = Field(default=256, ge=1, description="most recent tokens kept by streaming heads (their "
                                                              "StreamingLLM policy when `streaming` is not given)")
    streaming: SerializeAsAny[StageParams] | None = Field(
        default=None, description="streaming heads' cache policy, a cache stage: streamingllm, or a scored method "
                                  "(snapkv, knorm; its budget per KV head); default streamingllm with n_sink, "
                                  "window and original positions")
    retrieval: SerializeAsAny[StageParams] | None = Field(
        default=None, description="retrieval heads' cache policy, a cache stage: full (the default), or a scored "
                                  "method (snapkv, knorm; its budget per KV head)")

    def __init__(self, **data: Any) -> None:
        # the head groups are validated here, outside pydantic, so a bad one reads like a bad cache stage
        for group in GROUPS:
            if data.get(group) is not None and not isinstance(data[group], StageParams):
                data[group] = group_params(group, data[group])
        if data.get("streaming") is None:  # n_sink / window configure the default streaming policy
            for key in ("n_sink", "window", "recent"):
                if key in data and data[key] is None:
                    del data[key]
        else:  # the streaming policy holds its own parameters: n_sink / window only if given (check: they agree)
            data.setdefault("n_sink", None)
            if "window" not in data and "recent" not in data:
                data["window"] = None
        super().__init__(**data)

    @field_validator("streaming", "retrieval", mode="before")
    @classmethod
    def _group(cls, raw: Any, info: ValidationInfo) -> Any:
        """``model_validate`` (which skips ``__init__``) validates a head group's config the same way."""
        return raw if raw is None or isinstance(raw, StageParams) else group_params(info.field_name, raw)

    def check(self, stage: str) -> None:
        super().check(stage)
        if (self.pattern is None) == (self.retrieval_heads is None):
            raise ConfigError(f"{stage}.pattern / {stage}.retrieval_heads: give exactly one of them (duo)")
        if self.sparsity is not None and self.threshold is not None:
            raise ConfigError(f"{stage}.sparsity / {stage}.threshold: give at most one of them (duo)")
        if self.retrieval_heads is not None and (self.sparsity is not None or self.threshold is not None):
            raise ConfigError(f"{stage}.sparsity / {stage}.threshold: only apply to a pattern file (duo)")
        if self.pattern is not None and not Path(self.pattern).is_file():
            raise ConfigError(f"{stage}.pattern: file not found: {self.pattern} (duo)")
        for group in GROUPS:
            cfg = getattr(self, group)
            if cfg is not None:
                _check_group_method(group, cfg.method)
                cfg.check(f"{stage}.{group}")
        stream = self.streaming
        for key in ("n_sink", "window"):
            given = getattr(self, key)
            if stream is None or given is None:
                continue
            if stream.method != "streamingllm":
                raise ConfigError(f"{stage}.{key}: sets the default StreamingLLM policy of the streaming heads, but "
                                  f"{stage}.streaming runs them with {stream.method}: give their parameters inside "
                                  f"{stage}.streaming only (duo)")
            if getattr(stream, key) != given:
                raise ConfigError(f"{stage}.{key}: {given} disagrees with {stage}.streaming.{key} "
                                  f"({getattr(stream, key)}); give it once, inside {stage}.streaming (duo)")

    def head_policies(self) -> dict[str, StageParams]:
        """Each head group's cache policy config: group -> params (the defaults filled in)."""
        return {
            "streaming": self.streaming or StreamingLLMParams(n_sink=self.n_sink, window=self.window,
                                                              positions="original"),
            "retrieval": self.retrieval or FullParams(),
        }


def load_pattern(path: str | Path) -> torch.Tensor:
    """A DuoAttention pattern file -> float tensor [layers, KV heads]."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            rows.append([float(x) for x in line.replace(",", " ").split()])
        except ValueError:
            raise ConfigError(f"cache.pattern: {path} line {n}: expected numbers separated by tabs") from None
    if not rows or len({len(r) for r in rows}) != 1:
        raise ConfigError(f"cache.pattern: {path}: every row needs the same number of KV heads")
    pat = torch.tensor(rows)
    if bool(((pat < 0) | (pat > 1)).any()):
        raise ConfigError(f"cache.pattern: {path}: values must lie in [0, 1]")
    return pat


def binarize(pattern: torch.Tensor, sparsity: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Retrieval mask [layers, KV heads] from gate values.

    ``sparsity`` s: the round(s * n) heads with the lowest values (ties: later heads first) stream.
    Otherwise heads with value > ``threshold`` (default 0.5) are retrieval heads.
    """
    if sparsity is None:
        return pattern > (0.5 if threshold is None else threshold)
    flat = pattern.flatten()
    n_stream = round(sparsity * flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[order[: flat.numel() - n_stream]] = True
    return keep.view_as(pattern)


class _StreamingHeads(StreamingLLMPolicy):
    """Streaming heads: a chunk (or a decoded token) attends to sink + recent + itself; the table then keeps
    sink + recent (a decode step writes the token over the oldest recent slot: the ring, no gather)."""

    attend_with_self = True


def _group_policy(cfg: StageParams) -> CachePolicy:
    """The policy that runs a head group (``cfg`` allowed by :func:`group_allowed`)."""
    if cfg.method == "streamingllm":
        return _StreamingHeads(cfg)
    from . import CACHE_POLICIES  # the registry imports this module

    return CACHE_POLICIES[cfg.method](cfg)


class DuoPolicy(CachePolicy):
    """Each layer's KV heads split in two groups, each run by its own cache policy on its own table."""

    name = "duo"
    params = DuoParams
    cfg: DuoParams

    def __init__(self, cfg: DuoParams) -> None:
        super().__init__(cfg)
        groups = cfg.head_policies()
        #: the policies of the streaming heads (in ``layer.state["stream"]``) and of the retrieval heads (the
        #: layer's own table)
        self.streaming = _group_policy(groups["streaming"])
        self.retrieving = _group_policy(groups["retrieval"])
        self.retrieval: torch.Tensor | None = None  # [layers, KV heads] bool, set by bind()
        self._heads: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (retrieval, streaming) KV heads

    # the sparse prefill / decode stages run on the retrieval heads (streaming heads attend densely)
    @property
    def prefill(self) -> PrefillMethod | None:  # type: ignore[override]
        return self.retrieving.prefill

    @prefill.setter
    def prefill(self, method: PrefillMethod | None) -> None:
        self.retrieving.prefill = method

    @property
    def decode(self) -> DecodeMethod | None:  # type: ignore[override]
        return self.retrieving.decode

    @decode.setter
    def decode(self, method: DecodeMethod | None) -> None:
        self.retrieving.decode = method

    def bind(self, num_layers: int, num_kv_heads: int) -> None:
        self.retrieval = self._retrieval_mask(num_layers, num_kv_heads)
        self._heads = [(m.nonzero().flatten(), (~m).nonzero().flatten()) for m in self.retrieval]
        for policy in (self.streaming, self.retrieving):  # a scored method's per-layer budgets
            policy.bind(num_layers, num_kv_heads)

    def _retrieval_mask(self, num_layers: int, num_kv_heads: int) -> torch.Tensor:
        cfg = self.cfg
        if cfg.pattern is not None:
            pat = load_pattern(cfg.pattern)
            if tuple(pat.shape) != (num_layers, num_kv_heads):
                raise ConfigError(
                    f"cache.pattern: {cfg.pattern} has {pat.shape[0]} rows x {pat.shape[1]} columns; this model "
                    f"has {num_layers} layers x {num_kv_heads} KV heads"
                )
            return binarize(pat, cfg.sparsity, cfg.threshold)
        mask = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
        for layer, heads in (cfg.retrieval_heads or {}).items():
            bad = [h for h in heads if not 0 <= h < num_kv_heads]
            if not 0 <= layer < num_layers or bad:
                raise ConfigError(
                    f"cache.retrieval_heads: layer {layer} heads {heads} out of range for {num_layers} layers x "
                    f"{num_kv_heads} KV heads"
                )
            mask[layer, heads] = True
        return mask

    def attend(self, layer, q, k, v, step, info):
        r, s = self._heads[info.layer_idx]  # host tensors: no device read to split the heads
        if not s.numel():  # every KV head retrieves: the layer is the retrieval policy's alone
            return self.retrieving.attend(layer, q, k, v, step, info)
        b, h, lq, d = q.shape
        hk = k.shape[1]
        g = h // hk
        qg = q.view(b, hk, g, lq, d)  # query heads grouped by their KV head (GQA)
        out = q.new_empty(b, hk, g, lq, v.shape[-1])
        sub = layer.state.get("stream")
        if sub is None:
            sub = layer.state["stream"] = layer.new_table()
        for heads, policy, table in ((r, self.retrieving, layer), (s, self.streaming, sub)):
            if not heads.numel():
                continue
            heads = heads.to(k.device)
            o = policy.attend(table, qg[:, heads].reshape(b, -1, lq, d), k[:, heads], v[:, heads], step, info)
            out[:, heads] = o.view(b, heads.numel(), g, lq, -1)
        return out.view(b, h, lq, -1)
