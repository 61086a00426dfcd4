"""Attention math only: no model or method knowledge lives here."""

from .dense import attend_slots, build_slot_mask, sdpa_grouped
from .rope import rotate

__all__ = ["attend_slots", "build_slot_mask", "sdpa_grouped", "rotate"]
