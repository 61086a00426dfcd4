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
