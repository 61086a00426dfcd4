"""One small adapter per model family; the patched forward is generic."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .base import FamilyAdapter
from .gemma3 import Gemma3Adapter
from .llama import LlamaAdapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (LlamaAdapter, Qwen3Adapter, Gemma3Adapter)


def supported_families() -> list[str]:
    return [f for a in ADAPTERS for f in a.families]


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for ``model``'s family, or an error listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.families:
            adapter = cls()
            adapter.check(model)
            return adapter
    raise UnsupportedModelError(
        f"model family '{model_type}' ({type(model).__name__}) is not supported; "
        f"supported: {', '.join(supported_families())}"
    )
