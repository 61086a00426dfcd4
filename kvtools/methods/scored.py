"""Scored eviction: the base of every method that keeps the top-scored slots of a prompt under a budget.

At the end of each multi-token call (a prompt, or a later call: a question after a document, a chat
turn), the call's own slots are compressed to ``budget`` per (row, KV head) (an int, or a fraction of the
call's real tokens): the call's last ``window`` tokens are always kept, the others ranked by
:meth:`ScoredEvictionPolicy.score` (higher = keep; ties keep the earlier slot). What earlier calls kept is
never touched, and decode steps append without evicting. With ``calls: first`` only the call that starts the
cache is compressed (a document compressed once, then questions kept whole). A scorer that reads the call's
last queries (SnapKV's observation window) sets :attr:`observe`; they are carried across the chunks of a
chunked call. With ``per_chunk`` a chunked call is compressed after each chunk instead (what the call kept so
far plus the chunk, scored by the last queries so far), so its peak is ``budget + chunk`` slots.
A new method is its parameters (a :class:`ScoredParams`) plus its ``score`` (see ``knorm.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..cache import RowState, SlotLayer, Step
from ..errors import ConfigError
from ..params import StageParams
from .base import CachePolicy, LayerInfo
from .common import keep_first_last, keep_top, resolve_tokens, top_n_mask, valid_rank


class ScoredParams(StageParams):
    """A scored-eviction method's budget and protected recent window; a subclass adds ``method`` (a
    ``Literal``) and its scorer's own parameters, and may give ``window`` another default."""

    budget: int | float = Field(
        default=1024, gt=0, description="slots per KV head (int) or fraction of the prompt (0 < f <= 1)"
    )
    window: int = Field(default=32, ge=1, description="most recent tokens of each call always kept")
    layers: Literal["uniform", "pyramid", "adaptive"] = Field(
        default="uniform", description="how the budget is spread over layers, the total unchanged: the same in "
                                       "every layer; PyramidKV's, decreasing linearly with depth; or adaptive: "
                                       "after the call's last layer ran, the slots beyond the windows go to the "
                                       "layers' highest-scored tokens over all layers at once (attention-mass "
                                       "scores only: snapkv; sliding-window layers keep the uniform budget)")
    heads: Literal["uniform", "adaptive"] = Field(
        default="uniform", description="how a layer's budget is spread over its KV heads, the layer's total "
                                       "unchanged: the same for every head, or adaptive (AdaKV): the slots beyond "
                                       "the windows go to the layer's highest-scored tokens over all its heads "
                                       "at once, so heads whose attention is spread keep more (attention-mass "
                                       "scores only: snapkv)")
    floor: float = Field(default=0.2, ge=0, le=1, description="adaptive: each layer (head) keeps at least this "
                                                              "fraction of its uniform share beyond the window")
    beta: float = Field(default=20.0, gt=1, description="pyramid: the first layer keeps 2 - 1/beta times the mean "
                                                        "of what is kept beyond the window, the last 1/beta times")
    span: int = Field(default=1, ge=1, description="keep whole spans of this many consecutive tokens, ranked by "
                                                   "the sum of their tokens' scores (ChunkKV; 1: single tokens)")
    calls: Literal["all", "first"] = Field(
        default="all", description="which multi-token calls on a cache are compressed: all (each over its own "
                                   "tokens, the budget resolved from its own length: a short follow-up question at "
                                   "a fractional budget keeps only max(budget, window) of its tokens) or first "
                                   "(only the call that starts the cache, chunked or not: a document compressed "
                                   "once, the questions and chat turns after it kept whole)")
    per_chunk: bool = Field(
        default=False, description="with prefill.chunk: compress the call's slots to the budget after every chunk, "
                                   "not only after its last, so a long prompt never holds more than budget + chunk "
                                   "slots per KV head (each selection sees the queries up to its chunk, not the "
                                   "question at the prompt's end); no effect on an unchunked call")

    #: the method's scores are attention mass, comparable across layers (``layers: adaptive`` needs that)
    mass_scores: ClassVar[bool] = False

    def check(self, stage: str) -> None:
        super().check(stage)
        if self.layers == "adaptive" and not self.mass_scores:
            raise ConfigError(f"{stage}.layers: adaptive compares scores across layers, which needs attention-mass "
                              f"scores ({self.method} ranks by something else); use uniform or pyramid")
        if self.heads == "adaptive" and not self.mass_scores:
            raise ConfigError(f"{stage}.heads: adaptive compares scores across heads, which needs attention-mass "
                              f"scores ({self.method} ranks by something else); use uniform")
        if isinstance(self.budget, int) and self.budget < self.window:
            raise ConfigError(f"{stage}.budget: must be >= {stage}.window ({self.window}) so the window fits, "
                              f"got {self.budget}")


@dataclass
class ObservedQueries(RowState):
    """A chunked call's last queries so far, carried to its next chunk."""

    q: torch.Tensor  # [B, H, n, D]
    idx: torch.Tensor  # [n] their stream indices (the same for every row)
    shared = ("idx",)


class ScoredEvictionPolicy(CachePolicy):
    """Keep each call's ``window`` last tokens + its top-``score`` slots, ``budget`` in all."""

    cfg: ScoredParams

    #: how many of the call's last queries ``score`` needs (0: none)
    observe: int = 0
    num_layers: int = 1

    def bind(self, num_layers: int, num_kv_heads: int) -> None:
        self.num_layers = num_layers

    def score(self, layer: SlotLayer, candidates: torch.Tensor, q_obs: torch.Tensor | None,
              i_obs: torch.Tensor | None, info: LayerInfo) -> torch.Tensor:
        """Importance [B, Hk, S] of every slot of ``layer`` (higher is kept), read where ``candidates``
        [B, Hk, S] is true. ``q_obs`` [B, H, n, D] / ``i_obs`` [n]: the call's last ``observe`` queries and
        their stream indices (None when ``observe`` is 0). Every scored method implements it."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def layer_budget(self, budget: torch.Tensor, n_real: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """This layer's share [B] of the per-layer ``budget`` [B] for a call of ``n_real`` [B] real tokens:
        every layer keeps the window; what is kept beyond it, ``(budget - window) * num_layers`` in all, is
        split over the layers by :func:`layer_weights`, a layer's share capped at what the call holds and the
        excess passed to the others (:func:`split_capped`): the total equals the uniform budget's."""
        if self.cfg.layers != "pyramid":
            return budget
        window = torch.minimum(budget, budget.new_full((), self.cfg.window))
        rest = (budget - window) * self.num_layers  # [B]
        cap = (n_real - window).clamp(min=0)
        shares = split_capped(rest, cap, layer_weights(self.num_layers, self.cfg.beta))  # [L, B]
        return window + shares[layer_idx]

    def after_attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> None:
        if not step.is_prefill or (self.cfg.calls == "first" and step.start > 0):
            return
        q_obs = i_obs = None
        if self.observe:  # carry the call's last queries (and their stream indices) across its chunks
            prev: ObservedQueries | None = layer.state.get("q_tail") if step.chunk > 0 else None
            q_new, i_new = q[:, :, -self.observe:], step.idx[-self.observe:]  # only what can be observed
            q_obs, i_obs = (q_new, i_new) if prev is None else (
                torch.cat([prev.q, q_new], dim=2), torch.cat([prev.idx, i_new]))
            # a copy, not a view: the carried tail must not hold the chunk's queries alive
            q_obs, i_obs = q_obs[:, :, -self.observe:].clone(), i_obs[-self.observe:].clone()
        if not step.end_of_prompt:
            if self.observe:
                layer.state["q_tail"] = ObservedQueries(q_obs, i_obs)
            if not self.cfg.per_chunk:
                return
        else:
            layer.state.pop("q_tail", None)
        w = self.cfg.window
        call = layer.valid & (layer.idx >= step.start)  # [B, Hk, S]: this call's slots
        n_real = call[:, 0].sum(-1)  # [B]
        budget = resolve_tokens(self.cfg.budget, step.prompt_real.to(n_real.device))
        budget = self.layer_budget(torch.maximum(budget, torch.clamp(n_real, max=w)), n_real, info.layer_idx)
        # a sliding-window layer frees what its window no longer sees right after this hook, so it keeps its
        # uniform budget now rather than joining the split made once every layer ran
        adaptive = self.cfg.layers == "adaptive" and info.sliding_window is None
        if bool((n_real <= budget).all()) and not adaptive:
            return
        scores = self.score(layer, call, q_obs, None if i_obs is None else i_obs.to(layer.idx.device), info)
        protect = keep_first_last(call, 0, w)
        if adaptive:  # every layer's scores first: the split is made once the call's last layer ran
            group = next((d for d in step.deferred if isinstance(d, LayerAllocation) and d.policy is self), None)
            if group is None:
                step.deferred.append(group := LayerAllocation(self))
            group.layers.append((layer, scores, call, protect, budget))
            return
        self._keep(layer, scores, call, protect, budget)

    def _keep(self, layer: SlotLayer, scores: torch.Tensor, call: torch.Tensor, protect: torch.Tensor,
              budget: torch.Tensor) -> None:
        if self.cfg.span > 1:
            scores = span_scores(scores, call & ~protect, self.cfg.span)
        if self.cfg.heads == "adaptive":
            budget = head_budgets(scores, call, protect, budget, self.cfg.floor)
        layer.keep(keep_top(scores, call, budget, protect) | (layer.valid & ~call), pack=self.cfg.heads == "adaptive")


def head_budgets(scores: torch.Tensor, call: torch.Tensor, protect: torch.Tensor, budget: torch.Tensor,
                 floor: float) -> torch.Tensor:
    """``heads: adaptive`` (AdaKV): slots [B, Hk] each KV head keeps of the call, ``Hk * budget`` [B] per row in
    all (or every slot of the call). Every head keeps its protected slots; the rest of the row's budget goes by
    :func:`adaptive_counts` with each head as its own group: first ``floor`` of a head's uniform share beyond its
    protected slots, then the highest remaining scores over all the layer's heads."""
    hk = scores.shape[1]
    fixed = (call & protect).sum(-1)  # [B, Hk]
    rest = (budget[:, None] - fixed).clamp(min=0)  # [B, Hk]: each head's uniform share beyond its protected slots
    cand = call & ~protect
    n = adaptive_counts([scores[:, h:h + 1] for h in range(hk)], [cand[:, h:h + 1] for h in range(hk)], rest.T,
                        floor)  # [Hk, B]
    return fixed + n.T


class LayerAllocation:
    """``layers: adaptive``: the layers' scores of one call, split once every layer has run (a
    :attr:`~kvtools.cache.Step.deferred` task)."""

    def __init__(self, policy: ScoredEvictionPolicy) -> None:
        self.policy = policy
        self.layers: list[tuple[SlotLayer, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self) -> None:
        p = self.policy
        cand = [call & ~protect for _, _, call, protect, _ in self.layers]
        dev = self.layers[0][1].device  # layers of a model split over devices: the split is made on the first's
        rest = [(b - (call & protect)[:, 0].sum(-1)).to(dev) for (_, _, call, protect, b) in self.layers]  # [B]
        n = adaptive_counts([s for _, s, _, _, _ in self.layers], cand, torch.stack(rest), p.cfg.floor)  # [L, B]
        for (layer, scores, call, protect, _), extra in zip(self.layers, n):
            p._keep(layer, scores, call, protect, (call & protect)[:, 0].sum(-1) + extra.to(call.device))


def adaptive_counts(scores: list[torch.Tensor], candidates: list[torch.Tensor], rest: torch.Tensor,
                    floor: float) -> torch.Tensor:
    """Slots [L, B] each layer keeps beyond its protected ones, ``rest.sum(0)`` [B] in all (or every candidate).

    Layer l's curve is the mean over its KV heads of their r-th highest candidate score (``scores[l]``,
    ``candidates[l]`` [B, Hk, S]; every head of a row has the same candidates). Each layer first gets
    ``floor * rest[l]`` (its uniform share's floor, at most its candidates); the other slots go to the highest
    remaining curve values over all layers (ties: the earlier layer, then the earlier rank)."""
    curves, counts = [], []
    dev = rest.device  # layers may live on different devices: their curves meet on rest's
    for s, c in zip(scores, candidates):
        srt = s.double().masked_fill(~c, float("-inf")).sort(-1, descending=True).values  # [B, Hk, S]
        curves.append(srt.mean(1).to(dev))  # [B, S]: -inf past the candidates
        counts.append(c[:, 0].sum(-1).to(dev))  # [B]
    width = max(c.shape[-1] for c in curves)
    curve = torch.stack([F.pad(c, (0, width - c.shape[-1]), value=float("-inf")) for c in curves])  # [L, B, W]
    count = torch.stack(counts)  # [L, B]
    base = torch.minimum(torch.floor(rest.double() * floor).long(), count)  # [L, B]
    extra = (rest.sum(0) - base.sum(0)).clamp(min=0)  # [B]
    rank = torch.arange(width, device=curve.device)
    free = (rank >= base[..., None]) & (rank < count[..., None])  # [L, B, W]
    flat = curve.masked_fill(~free, float("-inf")).permute(1, 0, 2).reshape(curve.shape[1], -1)  # [B, L*W]
    take = top_n_mask(flat, extra, free.permute(1, 0, 2).reshape(flat.shape))
    return base + take.view(flat.shape[0], len(curves), width).sum(-1).T


def layer_weights(num_layers: int, beta: float) -> torch.Tensor:
    """PyramidKV's per-layer shares [L] (float64, mean 1): linear from ``2 - 1/beta`` at the first layer to
    ``1/beta`` at the last."""
    if num_layers == 1:
        return torch.ones(1, dtype=torch.float64)
    lo = 1.0 / beta
    return torch.linspace(2.0 - lo, lo, num_layers, dtype=torch.float64)


def split_capped(total: torch.Tensor, cap: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Integer shares [L, B] of ``total`` [B] in proportion to ``weights`` [L], none above ``cap`` [B]: a share
    that would pass the cap is held at it and the rest is split again over the others (water-filling); the
    shares are rounded by cumulative flooring, so each row's add up to ``min(total, L * cap)`` exactly."""
    w = weights.to(total.device, torch.float64)[:, None]  # [L, 1]
    total, cap = total.double(), cap.double()[None]  # [B], [1, B]
    total = torch.minimum(total, cap[0] * w.shape[0])
    capped = torch.zeros(w.shape[0], total.shape[0], dtype=torch.bool, device=total.device)
    for _ in range(w.shape[0]):  # each round caps at least one more layer, or stops
        free = w * ~capped  # [L, B]
        left = total - (cap * capped).sum(0)
        share = torch.where(capped, cap, left * free / free.sum(0).clamp(min=1e-300))
        over = ~capped & (share > cap)
        if not bool(over.any()):
            break
        capped |= over
    cum = torch.floor(share.cumsum(0) + 1e-9).long()  # [L, B]
    return torch.diff(cum, dim=0, prepend=torch.zeros_like(cum[:1]))


def span_scores(scores: torch.Tensor, candidates: torch.Tensor, span: int) -> torch.Tensor:
    """Scores [B, Hk, S] where each candidate carries the sum of the scores of its span: the ``span`` consecutive
    candidates of its (row, head) it falls in, counted in stream order from the first. Every token of a span
    then ranks together (ties keep the earlier slot, so spans are taken whole, the last one cut to fit the
    budget); other slots keep their scores."""
    span_id = valid_rank(candidates).clamp(min=0) // span  # [B, Hk, S]
    sums = torch.zeros(*scores.shape[:-1], scores.shape[-1] // span + 1, dtype=torch.float64, device=scores.device)
    sums.scatter_add_(-1, span_id, scores.double().masked_fill(~candidates, 0.0))
    return torch.where(candidates, sums.gather(-1, span_id), scores.double())
