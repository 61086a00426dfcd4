"""Shipped eval run files (kvtools eval)."""
