"""Shipped YAML presets (method configs and eval runs)."""
