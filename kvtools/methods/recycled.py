"""Recycled Attention (also published as RefreshKV): decode with a recycled top-k.

Every ``stride`` decode steps (and, with ``dynamic``, whenever the new query's cosine
similarity to the last full step's query falls below ``s``) a *full* step attends to every
slot and records, per row and KV head, the ``top_k`` slots with the most attention
(summed over the KV head's g query heads). The steps in between attend only to those
slots plus the slots appended since the full step: work ~ top_k instead of the context.
The full cache is kept (nothing is evicted), so a full step sees everything again. The set is
chosen among the slots before the full step's own token: that token and all later ones are
attended at every recycled step (they are the ones "generated since"). ``pool: w`` (an
extension) scores each slot by the largest attention among itself and the w - 1 slots before
it, so an attended token brings the ones after it: the full step's induction heads attend to
the next token to copy, and without pooling the tokens after that one are rarely kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..cache import RowState, SlotLayer, Step
from ..params import StageParams
from .base import DecodeMethod, LayerInfo
from .common import resolve_tokens


class RecycledParams(StageParams):
    """Recycled Attention: a full step every `stride` steps picks each KV head's top-k slots; the steps
    between attend only to them plus the tokens generated since (the full cache is kept)."""

    method: Literal["recycled"] = "recycled"
    requires = {"cache": ("full", "snapkv")}
    requires_why = "keeps slot positions between full steps (no eviction while decoding)"
    top_k: int | float = Field(default=0.25, gt=0, description="slots per KV head (int) or fraction of the slots")
    stride: int = Field(default=16, ge=1, description="decode steps per full step (1: always full)")
    dynamic: bool = Field(default=False, description="also run a full step when the query drifts (cosine < s)")
    s: float = Field(default=0.8, ge=-1, le=1, description="cosine threshold of the dynamic schedule")
    pool: int = Field(default=1, ge=1, description="max-pool the full step's scores over this many following "
                                                   "slots before the top-k, so a picked token brings the tokens "
                                                   "after it (copying needs them; 1: the paper's top-k)")


def _grouped_attention(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, 1, D] over the keys of one or more parts (k, v [B, Hk, M_i, D], ok [B, Hk, M_i]) with one softmax
    over all of them, without concatenating their keys and values -> (out [B, H, 1, D], probs [B, Hk, g, sum M_i])."""
    b, h, _, d = q.shape
    hk = parts[0][0].shape[1]
    qg = q.float().view(b, hk, h // hk, d)
    s = torch.cat([(torch.einsum("bkgd,bkmd->bkgm", qg, k.float()) * scale).masked_fill(~ok[:, :, None], float("-inf"))
                   for k, _, ok in parts], -1)
    p = torch.softmax(s, -1)
    out, at = 0, 0
    for k, v, _ in parts:
        m = k.shape[2]
        out = out + torch.einsum("bkgm,bkmd->bkgd", p[..., at:at + m], v.float())
        at += m
    return out.reshape(b, h, 1, -1).to(q.dtype), p


def recycle_set(probs: torch.Tensor, ok: torch.Tensor, k: int | torch.Tensor, pool: int = 1):
    """Top-k slots per (row, KV head) by attention summed over the group's query heads.

    ``k``: one count, or one per (row, KV head) [B, Hk]. Returns (slots [B, Hk, K], in_set [B, Hk, K]) with
    K the largest count, slots in table order; ``in_set`` is False past a row's own count.
    With ``pool`` > 1 a slot scores the largest attention among itself and the ``pool - 1`` slots before
    it, so each strongly attended token brings the tokens that follow it."""
    score = probs.sum(2).masked_fill(~ok, -1.0)  # [B, Hk, S]
    if pool > 1:
        b, hk, n = score.shape
        padded = torch.nn.functional.pad(score.reshape(b * hk, 1, n), (pool - 1, 0), value=-1.0)
        score = torch.nn.functional.max_pool1d(padded, pool, stride=1).view(b, hk, n).masked_fill(~ok, -1.0)
    k = torch.as_tensor(k, device=score.device).expand(score.shape[:2])
    kmax = int(k.max())
    top = torch.topk(score, kmax, dim=-1).indices  # by score, best first
    in_set = torch.arange(kmax, device=score.device) < k[..., None]
    order = top.argsort(-1)
    return top.gather(-1, order), in_set.gather(-1, order)


@dataclass
class RecycledState(RowState):
    """A layer's recycled set (per row, batch first: follows beam reordering) and the shared schedule. The set's
    keys and values are copied once, at the full step that picks it: the recycled steps read them contiguously
    (memory: the set's keys and values again, ``top_k`` of the table; ``nbytes`` counts them)."""

    sel: torch.Tensor  # [B, Hk, K] slot positions of each row's recycled set
    sel_ok: torch.Tensor  # [B, Hk, K] the entry is in the row's set (rows' fractional top_k differ) and valid
    k_sel: torch.Tensor  # [B, Hk, K, D] the set's keys
    v_sel: torch.Tensor  # [B, Hk, K, Dv] the set's values
    q_full: torch.Tensor  # [B, H, D] the last full step's query (dynamic schedule)
    n_full: int  # slots before the last full step's token
    since: int = 1  # decode steps since the last full step
    full_steps: int = 1


class RecycledDecodeMethod(DecodeMethod):
    name = "recycled"
    params = RecycledParams
    cfg: RecycledParams
    state_key = "recycled"

    def attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        keys, values, valid = layer.keys, layer.values, layer.valid
        n = keys.shape[2]
        own = layer.idx == step.idx[-1]  # the new token's slot: always visible to itself
        ok_all = valid | own
        st: RecycledState | None = layer.state.get(self.state_key)
        full = st is None or st.since >= self.cfg.stride or n <= st.n_full
        if not full and self.cfg.dynamic:
            cos = torch.nn.functional.cosine_similarity(q.float().flatten(2), st.q_full, dim=-1)  # [B, H]
            full = bool((cos < self.cfg.s).any())
        if full:
            out, p = _grouped_attention(q, [(keys, values, ok_all)], info.scale)
            # the set is chosen among the slots before this step's token; that token and every later one
            # are "generated since the full step" and always attended
            n_old = n - 1
            if n_old <= 0:
                layer.state.pop(self.state_key, None)
                return out
            # a fractional top_k is a fraction of each row's own real slots (left padding does not count)
            real = valid[:, :, :n_old].sum(-1)  # [B, Hk]
            k_row = resolve_tokens(self.cfg.top_k, real.flatten()).view_as(real).clamp(min=1)
            k_row = torch.minimum(k_row, real.clamp(min=1))
            sel, sel_ok = recycle_set(p[..., :n_old], ok_all[..., :n_old], k_row, self.cfg.pool)
            prev = 0 if st is None else st.full_steps
            layer.state[self.state_key] = RecycledState(
                sel=sel, sel_ok=sel_ok & ok_all.gather(2, sel),
                k_sel=keys.gather(2, sel[..., None].expand(-1, -1, -1, keys.shape[-1])),
                v_sel=values.gather(2, sel[..., None].expand(-1, -1, -1, values.shape[-1])),
                q_full=q.float().flatten(2), n_full=n_old, since=1, full_steps=prev + 1)
            return out
        # the set (copied at the full step; slots are only appended while decoding, so it still holds) and the
        # slots appended since, a contiguous slice of the table
        st.since += 1
        return _grouped_attention(q, [(st.k_sel, st.v_sel, st.sel_ok),
                                      (keys[:, :, st.n_full:n], values[:, :, st.n_full:n], ok_all[:, :, st.n_full:n])],
                                  info.scale)[0]
