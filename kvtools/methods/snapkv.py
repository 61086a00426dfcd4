"""SnapKV (Li et al., 2024): compress the prompt's cache once, at the end of prefill.

Every prompt token is scored by the attention it gets from the last ``window``
queries (softmax in fp32, causal inside the window), summed over those queries,
1-D pooled along the sequence (``kernel``, same size, ``max`` or ``avg``), and
averaged over the g query heads of each KV head (the cache keeps Hk heads, so
GQA's saving survives). Each KV head keeps its top ``budget - window`` prefix
tokens plus the window. Prefill attention itself stays dense. A chunked prompt
is compressed after its last chunk, with the window's queries carried across
chunks. A later multi-token call on the same cache (a follow-up question) compresses its own tokens
the same way, with the budget resolved from its own length; what earlier calls kept stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cache import SlotLayer, Step
from ..config import SnapKVCache
from .base import CachePolicy, LayerInfo
from .common import resolve_tokens, valid_rank


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
    tokens); the others still take part in each query's softmax but get score zero.
    """
    b, h, w, d = q_win.shape
    hk, s = keys.shape[1], keys.shape[2]
    qg = q_win.float().view(b, hk, h // hk, w, d)  # [B, Hk, g, w, D]
    logits = torch.einsum("bhgwd,bhsd->bhgws", qg, keys.float()) * scale  # [B, Hk, g, w, S]
    seen = valid[:, :, None, None, :] & (idx[:, :, None, None, :] <= q_idx.view(1, 1, 1, w, 1))
    probs = logits.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0)
    # only the prefix is pooled (as in the reference): the window's own votes do not leak into it
    rank = valid_rank(valid)
    prefix = valid & (rank < valid.sum(-1, keepdim=True) - w)  # [B, Hk, S]
    if candidates is not None:
        prefix &= candidates
    votes = (probs.sum(-2) * prefix[:, :, None, :]).reshape(-1, 1, s)  # [B*Hk*g, 1, S]
    if pool == "max":
        pooled = F.max_pool1d(votes, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(votes, kernel, stride=1, padding=kernel // 2)
    return pooled.view(b, hk, h // hk, s).mean(2)  # [B, Hk, S]


def snapkv_keep(scores: torch.Tensor, valid: torch.Tensor, budget: torch.Tensor, window: int) -> torch.Tensor:
    """Keep mask [B, Hk, S]: the last ``window`` valid slots + the top-scored rest, ``budget`` [B] in all.

    Ties keep the earlier slot. Rows with no more than ``budget`` valid slots keep everything.
    """
    n = valid.sum(-1, keepdim=True)  # [B, Hk, 1]
    rank = valid_rank(valid)
    in_window = valid & (rank >= n - window)
    prefix = valid & ~in_window
    n_prefix = (budget.view(-1, 1, 1) - in_window.sum(-1, keepdim=True)).clamp(min=0)  # [B, Hk, 1]
    order = scores.masked_fill(~prefix, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    keep = in_window | (prefix & (place < n_prefix))
    return torch.where(n <= budget.view(-1, 1, 1), valid, keep)


class SnapKVPolicy(CachePolicy):
    cfg: SnapKVCache

    def after_attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> None:
        if not step.is_prefill:
            return
        w = self.cfg.window
        # carry the last `window` queries (and their stream indices) across chunks of one call
        prev = layer.state.get("q_tail") if step.chunk > 0 else None
        q_tail, i_tail = (q, step.idx) if prev is None else (
            torch.cat([prev[0], q], dim=2), torch.cat([prev[1], step.idx]))
        q_tail, i_tail = q_tail[:, :, -w:], i_tail[-w:]
        if not step.end_of_prompt:
            layer.state["q_tail"] = (q_tail, i_tail)
            return
        layer.state.pop("q_tail", None)
        # only this call's tokens are compressed, by a budget from this call's length: a follow-up call
        # (a question after a document, a chat turn) never re-budgets what earlier calls left
        call = layer.valid & (layer.idx >= step.start)  # [B, Hk, S]
        n_real = call[:, 0].sum(-1)  # [B]
        budget = resolve_tokens(self.cfg.budget, step.prompt_real.to(n_real.device))
        budget = torch.maximum(budget, torch.clamp(n_real, max=w))
        if bool((n_real <= budget).all()):
            return
        scores = snapkv_scores(
            q_tail, layer.keys, layer.valid, layer.idx, i_tail.to(layer.idx.device),
            info.scale, self.cfg.kernel, self.cfg.pool, candidates=call,
        )
        layer.keep(snapkv_keep(scores, call, budget, w) | (layer.valid & ~call))
