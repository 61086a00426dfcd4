"""Plain step-by-step drivers used by several test files."""

from __future__ import annotations

import torch


@torch.no_grad()
def prefill_then_decode(model, ids: torch.Tensor, prompt_len: int, cache=None, attention_mask=None):
    """Teacher-forced run: prefill ``ids[:, :prompt_len]``, then feed the rest one token at a time.

    Returns the logits of the last prompt token and of every decode step, [B, 1 + steps, V].
    ``attention_mask`` (left padding) covers all of ``ids``; positions follow HF's rule
    (cumsum of the mask) so a padded row sees the positions it would see alone.
    """
    b, n = ids.shape
    am = attention_mask if attention_mask is not None else torch.ones(b, n, dtype=torch.long)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    kw = {} if cache is None else {"past_key_values": cache}
    out = model(
        input_ids=ids[:, :prompt_len], attention_mask=am[:, :prompt_len],
        position_ids=pos[:, :prompt_len], use_cache=True, **kw,
    )
    cache = out.past_key_values
    logits = [out.logits[:, -1]]
    for t in range(prompt_len, n):
        out = model(
            input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], position_ids=pos[:, t : t + 1],
            past_key_values=cache, use_cache=True,
        )
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), cache
