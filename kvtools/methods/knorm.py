"""KNorm (Devoto et al., 2024): keep the keys with the smallest L2 norm.

Low-norm keys draw high attention in trained LLMs, so a key's norm alone ranks it: no queries, no
attention scores, nothing to compute at prefill time beyond a norm per slot. The cheapest
query-agnostic scorer; a worked example of :class:`~kvtools.methods.scored.ScoredEvictionPolicy`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .scored import ScoredEvictionPolicy, ScoredParams


class KNormParams(ScoredParams):
    """At the end of each prompt (multi-token call) keep its recent window + the keys with the smallest L2 norm."""

    method: Literal["knorm"] = "knorm"
    window: int = Field(default=16, ge=1, description="most recent prompt tokens always kept")


class KNormPolicy(ScoredEvictionPolicy):
    name = "knorm"
    params = KNormParams

    def score(self, layer, candidates, q_obs, i_obs, info):
        return -layer.keys.float().norm(dim=-1)  # [B, Hk, S]: the smaller the norm, the higher the score
