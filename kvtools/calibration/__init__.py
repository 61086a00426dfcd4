"""Calibration: learn a method's head pattern from the model itself (DuoAttention's gates, or
retrieval-head scores measured without gradients)."""

from .duo import calibrate_duo, gated_attention, multi_passkey_sample, write_pattern
from .heads import HeadScores, copy_hits, kv_head_scores, needle_sample, retrieval_head_scores

__all__ = [
    "HeadScores",
    "calibrate_duo",
    "copy_hits",
    "gated_attention",
    "kv_head_scores",
    "multi_passkey_sample",
    "needle_sample",
    "retrieval_head_scores",
    "write_pattern",
]
