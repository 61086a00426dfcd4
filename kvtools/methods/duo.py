"""DuoAttention (Xiao et al., 2024): retrieval heads keep everything, streaming heads sink + recent.

The split is per (layer, KV head). Retrieval heads live in the layer's slot table;
streaming heads live in a second, smaller table (``layer.state["stream"]``) that
holds only ``n_sink`` + ``recent`` slots: the memory is really freed, no masking.
Prefill is dense for every head and then crops the streaming heads (one shot);
with ``prefill: {chunk: N}`` streaming heads attend only to sink + recent + the
current chunk, so long prefill gets cheaper too. Outputs are reassembled in head order.

Patterns: the reference TSV (one row per layer, one float in [0, 1] per KV head),
binarised by ``threshold`` (retrieval: value > threshold; default 0.5) or
``sparsity`` (that fraction of all KV heads, the lowest values, stream), or
``retrieval_heads`` given explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..errors import ConfigError
from ..params import StageParams
from .base import CachePolicy
from .streamingllm import StreamingLLMParams, StreamingLLMPolicy


class DuoParams(StageParams):
    """DuoAttention: retrieval KV heads keep everything, streaming KV heads keep sink + window slots."""

    aliases = {"recent": "window"}

    method: Literal["duo"] = "duo"
    pattern: str | None = Field(default=None, description="TSV: one row per layer, one float in [0, 1] per KV head")
    retrieval_heads: dict[int, list[int]] | None = Field(
        default=None, description="explicit retrieval KV heads per layer ({layer: [heads]}); other heads stream"
    )
    sparsity: float | None = Field(default=None, ge=0, le=1, description="fraction of KV heads made streaming")
    threshold: float | None = Field(default=None, ge=0, le=1, description="retrieval heads: pattern value > this")
    n_sink: int = Field(default=64, ge=0, description="first real tokens kept by streaming heads")
    window: int = Field(default=256, ge=1, description="most recent tokens kept by streaming heads")

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


class DuoPolicy(CachePolicy):
    name = "duo"
    params = DuoParams
    cfg: DuoParams

    def __init__(self, cfg: DuoParams) -> None:
        super().__init__(cfg)
        self.streaming = _StreamingHeads(
            StreamingLLMParams(n_sink=cfg.n_sink, window=cfg.window, positions="original")
        )
        self.retrieval: torch.Tensor | None = None  # [layers, KV heads] bool, set by bind()

    def bind(self, num_layers: int, num_kv_heads: int) -> None:
        cfg = self.cfg
        if cfg.pattern is not None:
            pat = load_pattern(cfg.pattern)
            if tuple(pat.shape) != (num_layers, num_kv_heads):
                raise ConfigError(
                    f"cache.pattern: {cfg.pattern} has {pat.shape[0]} rows x {pat.shape[1]} columns; this model "
                    f"has {num_layers} layers x {num_kv_heads} KV heads"
                )
            self.retrieval = binarize(pat, cfg.sparsity, cfg.threshold)
            return
        mask = torch.zeros(num_layers, num_kv_heads, dtype=torch.bool)
        for layer, heads in (cfg.retrieval_heads or {}).items():
            bad = [h for h in heads if not 0 <= h < num_kv_heads]
            if not 0 <= layer < num_layers or bad:
                raise ConfigError(
                    f"cache.retrieval_heads: layer {layer} heads {heads} out of range for {num_layers} layers x "
                    f"{num_kv_heads} KV heads"
                )
            mask[layer, heads] = True
        self.retrieval = mask

    def attend(self, layer, q, k, v, step, info):
        ret = self.retrieval[info.layer_idx].to(k.device)
        if bool(ret.all()):
            return super().attend(layer, q, k, v, step, info)
        b, h, lq, d = q.shape
        hk = k.shape[1]
        g = h // hk
        qg = q.view(b, hk, g, lq, d)
        out = q.new_empty(b, hk, g, lq, v.shape[-1])
        r, s = ret.nonzero().flatten(), (~ret).nonzero().flatten()
        if r.numel():
            o = super().attend(layer, qg[:, r].reshape(b, -1, lq, d), k[:, r], v[:, r], step, info)
            out[:, r] = o.view(b, r.numel(), g, lq, -1)
        sub = layer.state.get("stream")
        if sub is None:
            sub = layer.state["stream"] = layer.new_table()
        o = self.streaming.attend(sub, qg[:, s].reshape(b, -1, lq, d), k[:, s], v[:, s], step, info)
        out[:, s] = o.view(b, s.numel(), g, lq, -1)
        return out.view(b, h, lq, -1)
