"""`full`: keep every K/V entry (the baseline)."""

from .base import CachePolicy


class FullPolicy(CachePolicy):
    """Nothing is evicted; attention is exact."""
