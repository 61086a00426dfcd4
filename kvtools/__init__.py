"""kvtools: training-free KV-cache policies and sparse prefill for HuggingFace LLMs.

>>> import kvtools                                          # doctest: +SKIP
>>> model, tok = kvtools.load_model()                       # embedded SmolLM2-135M, offline
>>> with kvtools.patch(model, "snapkv"):
...     out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=32)
"""

from .cache import KVCache
from .config import KVConfig, list_presets, load_config
from .errors import (
    ConfigError,
    InputTooLongError,
    KVToolsError,
    ModelNotAvailableError,
    UnsupportedModelError,
)
from .models import load_model
from .patching import Patch, patch

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InputTooLongError",
    "KVCache",
    "KVConfig",
    "KVToolsError",
    "ModelNotAvailableError",
    "Patch",
    "UnsupportedModelError",
    "list_presets",
    "load_config",
    "load_model",
    "patch",
]
