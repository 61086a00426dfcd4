"""Helpers shared by cache policies."""

from __future__ import annotations

import torch


def valid_rank(valid: torch.Tensor) -> torch.Tensor:
    """Rank of each slot among the valid slots of its (row, head), 0-based (-1 before the first)."""
    return valid.long().cumsum(-1) - 1


def resolve_tokens(value: int | float, n_real: torch.Tensor) -> torch.Tensor:
    """A token count from an int, or from a fraction of each row's real prompt tokens ``n_real`` [B]."""
    if isinstance(value, float):
        return torch.round(n_real.float() * value).long()
    return torch.full_like(n_real, int(value))


def keep_first_last(valid: torch.Tensor, first: torch.Tensor | int, last: torch.Tensor) -> torch.Tensor:
    """Keep mask [B, Hk, S]: the first ``first`` and the last ``last`` [B] (or [B, Hk]) valid slots."""
    rank = valid_rank(valid)
    n = valid.sum(-1, keepdim=True)
    last = last.view(last.shape[0], -1, 1) if torch.is_tensor(last) else last
    first = first.view(first.shape[0], -1, 1) if torch.is_tensor(first) else first
    return valid & ((rank < first) | (rank >= n - last))


def top_n_mask(scores: torch.Tensor, n: torch.Tensor, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the ``n[...]`` highest ``scores`` along the last axis (one count per leading index), among
    ``eligible`` entries when given; ties keep the earlier entry."""
    if eligible is not None:
        scores = scores.masked_fill(~eligible, float("-inf"))
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    mask = rank < n[..., None]
    return mask if eligible is None else mask & eligible


def keep_top(scores: torch.Tensor, candidates: torch.Tensor, budget: torch.Tensor,
             protect: torch.Tensor) -> torch.Tensor:
    """Keep mask [B, Hk, S] over ``candidates``: the ``protect``-ed ones plus the top-scored others, ``budget``
    slots in all per (row, KV head) ([B]: the same for every head of a row, or [B, Hk]); ties keep the earlier
    slot; heads whose candidates fit keep them all."""
    n = candidates.sum(-1, keepdim=True)
    fixed = candidates & protect
    budget = budget.view(-1, 1, 1) if budget.dim() == 1 else budget[..., None]
    room = (budget - fixed.sum(-1, keepdim=True)).clamp(min=0)[..., 0]  # [B, Hk]
    keep = fixed | top_n_mask(scores, room, candidates & ~protect)
    return torch.where(n <= budget, candidates, keep)
