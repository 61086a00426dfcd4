"""`full`: keep every K/V entry (the baseline)."""

from typing import Literal

from ..params import StageParams
from .base import CachePolicy


class FullParams(StageParams):
    """Keep every K/V entry (the baseline)."""

    method: Literal["full"] = "full"


class FullPolicy(CachePolicy):
    """Nothing is evicted; attention is exact."""

    name = "full"
    params = FullParams
