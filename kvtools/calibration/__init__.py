"""Calibration: learn a method's head pattern from the model itself (DuoAttention's gates)."""

from .duo import calibrate_duo, gated_attention, multi_passkey_sample, write_pattern

__all__ = ["calibrate_duo", "gated_attention", "multi_passkey_sample", "write_pattern"]
