"""SnapKV (Li et al., 2024): compress the prompt's cache once, at the end of prefill.

Every prompt token is scored by the attention it gets from the last ``window``
queries (softmax in fp32, causal inside the window), summed over those queries,
1-D pooled along the sequence (``kernel``, same size, ``max`` or ``avg``), and
averaged over the g query heads of each KV head (the cache keeps Hk heads, so
GQA's saving survives). Each KV head keeps its top ``budget - window`` prefix
tokens plus the window. Prefill attention itself stays dense. A chunked prompt
is compressed after its last chunk, with the window's queries carried across
chunks (``per_chunk``: after every chunk, so it never holds more than budget +
chunk slots; each selection then sees only the queries up to its chunk). Pooling
runs along the stream: a slot pools only tokens within ``kernel // 2`` of it,
never table neighbours whose tokens between were evicted. A later multi-token call on the same cache (a follow-up question) compresses its own tokens
the same way, with the budget resolved from its own length; what earlier calls kept stays.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ..attention.masks import and_masks, causal_band, dense_mask, padding
from ..errors import ConfigError
from .common import keep_first_last, keep_top, valid_rank
from .scored import ScoredEvictionPolicy, ScoredParams


class SnapKVParams(ScoredParams):
    """Compress each prompt's cache at its end by observation-window attention."""

    method: Literal["snapkv"] = "snapkv"
    window: int = Field(default=32, ge=1, description="observation window: the prompt's last queries (always kept)")
    kernel: int = Field(default=7, ge=1, description="1-D pooling kernel over the sequence (odd)")
    pool: Literal["max", "avg"] = "max"

    mass_scores = True  # summed attention probabilities: comparable across layers

    def check(self, stage: str) -> None:
        super().check(stage)
        if self.kernel % 2 == 0:
            raise ConfigError(f"{stage}.kernel: must be odd (same-size pooling), got {self.kernel}")


def snapkv_scores(
    q_win: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor,
    idx: torch.Tensor,
    q_idx: torch.Tensor,
    scale: float,
    kernel: int,
    pool: str,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores [B, Hk, S] of each slot from the window queries q_win [B, H, w, D] at stream indices q_idx [w].

    The window is the last ``w`` valid slots of each row; its own scores are zero (it is always kept).
    ``candidates`` [B, Hk, S] (default: every valid slot): the slots being compressed (a later call's own
    tokens); the others still take part in each query's softmax but get score zero. Pooling runs along the
    stream, not the table: a slot pools the votes of the slots whose stream index is within ``kernel // 2`` of
    its own (a table compressed before, ``per_chunk``, holds tokens whose neighbours are gone).
    """
    b, h, w, d = q_win.shape
    hk, s = keys.shape[1], keys.shape[2]
    qg = q_win.float().view(b, hk, h // hk, w, d)  # [B, Hk, g, w, D]
    logits = torch.einsum("bhgwd,bhsd->bhgws", qg, keys.float()) * scale  # [B, Hk, g, w, S]
    rule = and_masks(causal_band(q_pos=q_idx, k_pos=idx), padding(valid))  # no own-key exception: q is not in keys
    seen = dense_mask(rule, b, hk, torch.arange(w, device=idx.device), torch.arange(s, device=idx.device))[:, :, None]
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0)
    # only the prefix is pooled (as in the reference): the window's own votes do not leak into it
    rank = valid_rank(valid)
    prefix = valid & (rank < valid.sum(-1, keepdim=True) - w)  # [B, Hk, S]
    if candidates is not None:
        prefix &= candidates
    votes = (probs.sum(-2) * prefix[:, :, None, :]).reshape(-1, s)  # [B*Hk*g, S]
    # onto the stream axis (non-prefix slots add zero votes, so fillers sharing an index change nothing)
    at = idx.clamp(min=0).long()[:, :, None, :].expand(b, hk, h // hk, s).reshape(-1, s)
    stream = votes.new_zeros(votes.shape[0], max(int(idx.max()) + 1, 1)).scatter_add_(1, at, votes)[:, None]  # [B*Hk*g, 1, T]
    if pool == "max":
        pooled = F.max_pool1d(stream, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(stream, kernel, stride=1, padding=kernel // 2)
    return pooled[:, 0].gather(1, at).view(b, hk, h // hk, s).mean(2)  # [B, Hk, S]


def snapkv_keep(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, window: int) -> torch.Tensor:
    """Keep mask [B, Hk, S]: the last ``window`` valid slots + the top-scored rest, ``budget`` [B] in all.

    Ties keep the earlier slot. Rows with no more than ``budget`` valid slots keep everything.
    """
    return keep_top(scores, valid, budget, keep_first_last(valid, 0, window))


class SnapKVPolicy(ScoredEvictionPolicy):
    name = "snapkv"
    params = SnapKVParams
    cfg: SnapKVParams

    @property
    def observe(self) -> int:  # the observation window: the call's last `window` queries
        return self.cfg.window

    def score(self, layer, candidates, q_obs, i_obs, info):
        return snapkv_scores(q_obs, layer.keys, layer.valid, layer.idx, i_obs, info.scale, self.cfg.kernel,
                             self.cfg.pool, candidates=candidates)
