"""Dense attention over a slot table with SDPA, GQA without expanding K/V in memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def build_slot_mask(
    valid: torch.Tensor,
    idx: torch.Tensor,
    q_idx: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean attention mask [B, Hk or 1, Lq, S] for queries at stream indices ``q_idx`` [Lq].

    A query sees valid slots at or before its own index (and inside the sliding
    window when one is given); it always sees its own key, so padding queries
    never get an all-masked row. Returns ``None`` when nothing needs masking
    (all valid, single query, no binding window).
    """
    lq = q_idx.numel()
    all_valid = bool(valid.all())
    window_binds = sliding_window is not None and bool((q_idx.max() - idx.min()) >= sliding_window)
    if all_valid and lq == 1 and not window_binds:
        return None
    # one mask for every head when the table is the same across heads (no per-head selection)
    if valid.shape[1] > 1 and bool((valid == valid[:, :1]).all()) and bool((idx == idx[:, :1]).all()):
        valid, idx = valid[:, :1], idx[:, :1]
    k_idx = idx[:, :, None, :]  # [B, h, 1, S]
    qi = q_idx.view(1, 1, lq, 1).to(idx.device)
    mask = (k_idx <= qi) & (valid[:, :, None, :] | (k_idx == qi))
    if sliding_window is not None:
        mask &= (qi - k_idx) < sliding_window
    return mask


def sdpa_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA for q [B, H, Lq, D] over k, v [B, Hk, S, D] with a mask [B, 1 or Hk, Lq, S] (or None).

    A per-KV-head mask is applied by folding the g = H / Hk query heads of each KV
    head into the query axis ([B, Hk, g*Lq, D]) so K/V are never repeated.
    """
    b, h, lq, d = q.shape
    hk = k.shape[1]
    if mask is None or mask.shape[1] == 1 or hk == 1:
        if mask is not None and mask.shape[1] != 1:
            mask = mask[:, :1]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, scale=scale, enable_gqa=h != hk
        )
    g = h // hk
    qg = q.reshape(b, hk, g * lq, d)  # [B, Hk, g*Lq, D]
    mg = mask[:, :, None].expand(b, hk, g, lq, mask.shape[-1]).reshape(b, hk, g * lq, mask.shape[-1])
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mg, scale=scale)
    return out.reshape(b, h, lq, v.shape[-1])


def attend_slots(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    idx: torch.Tensor,
    q_idx: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Exact attention of queries q [B, H, Lq, D] at stream indices q_idx over a slot table."""
    lq, s = q.shape[2], keys.shape[2]
    fresh = (
        lq == s
        and bool(valid.all())
        and (sliding_window is None or s <= sliding_window)
        and bool((idx[0, 0] == q_idx.to(idx.device)).all())
    )
    if fresh:  # a whole prompt on an empty cache: plain causal attention
        return sdpa_grouped(q, keys, values, None, scale, is_causal=True)
    mask = build_slot_mask(valid, idx, q_idx, sliding_window)
    return sdpa_grouped(q, keys, values, mask, scale)
