"""Combine partial attentions computed over disjoint key sets (numerically stable log-sum-exp merge)."""

from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ok: torch.Tensor, scale: float):
    """Exact attention and its log-sum-exp.

    q [..., n, D] over k, v [..., m, D] with ok [..., n or 1, m] (False: masked) ->
    (out [..., n, Dv] fp32, lse [..., n] fp32). A row with no visible key gets out 0, lse -inf.

    Grouped queries (q [..., g, n, D] over k, v [..., 1, m, D], a KV head's g query heads) are folded into
    one [g * n, m] product per KV head: a broadcast matmul would copy each KV head's keys g times.
    """
    if q.dim() == k.dim() == ok.dim() >= 3 and k.shape[-3] == 1 and v.shape[-3] == 1 and q.shape[-3] > 1:
        *lead, g, n, _ = q.shape
        m = k.shape[-2]
        okf = ok.expand(*ok.shape[:-3], g, n, m).reshape(*ok.shape[:-3], 1, g * n, m)
        out, lse = attention_with_lse(q.reshape(*lead, 1, g * n, q.shape[-1]), k, v, okf, scale)
        return out.reshape(*lead, g, n, -1), lse.reshape(*lead, g, n)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s.masked_fill_(~ok, float("-inf"))
    # one exp pass: the row max, exp(s - max), its sum (torch.logsumexp would exponentiate once more)
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill_(torch.isneginf(m), 0.0)
    p = torch.exp_(s.sub_(m))
    tot = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v.float()).div_(tot.clamp_min(torch.finfo(tot.dtype).tiny))
    return out, (m + torch.log(tot)).squeeze(-1)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Attention over keys A and B from the attentions over each: (out [..., Dv], lse [...]).

    Exact and stable for any logits: weights are exp(lse_x - max) with the max taken per row;
    a side with lse -inf (no keys) contributes nothing; both empty -> out 0, lse -inf.
    """
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    tot = wa + wb
    out = (out_a * wa[..., None] + out_b * wb[..., None]) / torch.where(tot > 0, tot, 1.0)[..., None]
    return out, m + torch.log(tot)
