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

import torch

from ..cache import SlotLayer, Step
from ..config import RecycledDecode
from .base import LayerInfo, StageMethod
from .common import resolve_tokens


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, scale: float):
    """q [B, H, 1, D] over k, v [B, Hk, M, D] with ok [B, Hk, M] -> (out [B, H, 1, D], probs [B, Hk, g, M])."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    qg = q.float().view(b, hk, h // hk, d)
    s = torch.einsum("bkgd,bkmd->bkgm", qg, k.float()) * scale
    p = torch.softmax(s.masked_fill(~ok[:, :, None], float("-inf")), -1)
    out = torch.einsum("bkgm,bkmd->bkgd", p, v.float())
    return out.reshape(b, h, 1, -1).to(q.dtype), p


def recycle_set(probs: torch.Tensor, ok: torch.Tensor, k: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Top-k slots per (row, KV head) by attention summed over the group's query heads: [B, Hk, K].

    With ``pool`` > 1 a slot scores the largest attention among itself and the ``pool - 1`` slots before
    it, so each strongly attended token brings the tokens that follow it."""
    score = probs.sum(2).masked_fill(~ok, -1.0)  # [B, Hk, S]
    if pool > 1:
        b, hk, n = score.shape
        padded = torch.nn.functional.pad(score.reshape(b * hk, 1, n), (pool - 1, 0), value=-1.0)
        score = torch.nn.functional.max_pool1d(padded, pool, stride=1).view(b, hk, n).masked_fill(~ok, -1.0)
    return torch.topk(score, int(k), dim=-1).indices.sort(-1).values


class RecycledDecodeMethod(StageMethod):
    cfg: RecycledDecode

    def attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        keys, values, valid = layer.keys, layer.values, layer.valid
        n = keys.shape[2]
        own = layer.idx == step.idx[-1]  # the new token's slot: always visible to itself
        ok_all = valid | own
        st = layer.state.setdefault("recycled", {"sel": None, "since": 0, "n_full": 0, "q_full": None,
                                                 "full_steps": 0})
        full = st["sel"] is None or st["since"] >= self.cfg.stride or n <= st["n_full"]
        if not full and self.cfg.dynamic and st["q_full"] is not None:
            cos = torch.nn.functional.cosine_similarity(q.float().flatten(2), st["q_full"], dim=-1)  # [B, H]
            full = bool((cos < self.cfg.s).any())
        if full:
            out, p = _grouped_attention(q, keys, values, ok_all, info.scale)
            # the set is chosen among the slots before this step's token; that token and every later one
            # are "generated since the full step" and always attended
            n_old = n - 1
            k = int(resolve_tokens(self.cfg.top_k, torch.tensor([n_old])).clamp(1, max(n_old, 1)))
            sel = recycle_set(p[..., :n_old], ok_all[..., :n_old], k, self.cfg.pool) if n_old > 0 else None
            st.update(sel=sel, since=1, n_full=n_old, q_full=q.float().flatten(2), full_steps=st["full_steps"] + 1)
            return out
        sel = st["sel"]  # [B, Hk, K] slot positions (slots are only appended while decoding)
        fresh = torch.arange(st["n_full"], n, device=keys.device).expand(*sel.shape[:2], -1)
        pos = torch.cat([sel, fresh], -1)
        gk = torch.gather(keys, 2, pos[..., None].expand(-1, -1, -1, keys.shape[-1]))
        gv = torch.gather(values, 2, pos[..., None].expand(-1, -1, -1, values.shape[-1]))
        ok = torch.gather(ok_all, 2, pos)
        st["since"] += 1
        return _grouped_attention(q, gk, gv, ok, info.scale)[0]
