"""Long-stream perplexity: feed a token stream in order, chunk by chunk, through one cache.

This is the StreamingLLM evaluation: each chunk attends to whatever the cache
policy kept of everything before it; the negative log-likelihood of every next
token is accumulated and reported per segment of the stream, so the curve over
position shows where a method breaks (e.g. dense attention past the trained
context) and where it stays flat (sinks + re-rotated positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..patching import Patch


@dataclass
class StreamPPL:
    nll: torch.Tensor  # [T-1] per-token negative log-likelihood (nats)
    segment: int

    def ppl(self) -> float:
        """Perplexity over the whole stream."""
        return math.exp(float(self.nll.mean()))

    def segments(self) -> list[float]:
        """Perplexity of each ``segment``-token stretch of the stream (the last one may be shorter)."""
        out = []
        for s in range(0, self.nll.numel(), self.segment):
            out.append(math.exp(float(self.nll[s : s + self.segment].mean())))
        return out


@torch.no_grad()
def stream_nll(
    model, ids: torch.Tensor, patch: Patch, chunk: int = 512, segment: int = 1024, quiet: bool = True
) -> StreamPPL:
    """Per-token NLL of ``ids`` [1, T] fed in ``chunk``-token calls through one cache of ``patch``."""
    cache = patch.make_cache()
    nll = []
    prev_logit = None
    for s in tqdm(range(0, ids.shape[1], chunk), disable=quiet, desc=f"ppl {patch.config.name}"):
        x = ids[:, s : s + chunk]
        logits = model(input_ids=x, **patch.cache_kwargs(cache)).logits.float()  # [1, c, V]
        if prev_logit is not None:  # the previous chunk's last logit predicts this chunk's first token
            logits = torch.cat([prev_logit, logits], dim=1)
            targets = x
        else:
            targets = x[:, 1:]
        pred = logits[:, : targets.shape[1]]
        nll.append(torch.nn.functional.cross_entropy(pred[0], targets[0], reduction="none"))
        prev_logit = logits[:, -1:]
    return StreamPPL(torch.cat(nll), segment)
