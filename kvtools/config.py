"""Typed, validated configs: YAML / dict / preset name -> :class:`KVConfig`.

A config names at most one method per stage::

    prefill: {method: dense}
    cache:   {method: snapkv, budget: 1024, window: 32, kernel: 7, pool: max}
    decode:  {method: dense}

Every stage's parameters are a pydantic model declared next to its method
(``SnapKVParams`` in ``methods/snapkv.py``) and registered with it in
``kvtools.methods``; its constraints and cross-stage rules live there too
(:class:`~kvtools.params.StageParams`). Validation happens here, before any
model work, and every error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .methods import STAGE_MODELS
from .params import STAGES, StageParams, StrictNumbers, closest, validate_fields
from .quant import QuantParams

__all__ = ["STAGES", "STAGE_MODELS", "KVConfig", "StrictNumbers", "check_out_dir", "check_out_file", "closest",
           "config_from_dict", "list_presets", "load_config", "parse_yaml", "read_yaml", "same_method",
           "validate_fields"]

_DEFAULTS = {"prefill": "dense", "cache": "full", "decode": "dense"}

#: the names the parameter models had before they moved next to their methods (kept loading, with a warning)
_OLD_NAMES = {
    "DensePrefill": ("dense", "DensePrefillParams"), "FlexPrefill": ("flexprefill", "FlexPrefillParams"),
    "HipPrefill": ("hip", "HipPrefillParams"), "HipDecode": ("hip", "HipDecodeParams"),
    "RecycledDecode": ("recycled", "RecycledParams"), "FullCache": ("full", "FullParams"),
    "StreamingLLMCache": ("streamingllm", "StreamingLLMParams"), "SnapKVCache": ("snapkv", "SnapKVParams"),
    "KNormCache": ("knorm", "KNormParams"), "RetrievalCache": ("retrieval", "RetrievalParams"),
    "DuoCache": ("duo", "DuoParams"), "RetrievalDecode": ("retrieval", "RetrievalDecodeParams"),
    "DenseDecode": ("dense", "DenseDecodeParams"), "StageConfig": (None, "StageParams"),
}


def __getattr__(name: str) -> Any:
    if name in _OLD_NAMES:
        method, new = _OLD_NAMES[name]
        warnings.warn(f"kvtools.config.{name} is deprecated: use kvtools.methods' {new}", DeprecationWarning,
                      stacklevel=2)
        if method is None:
            return StageParams
        stage = next(s for s in STAGES if STAGE_MODELS[s].get(method) is not None
                     and STAGE_MODELS[s][method].__name__ == new)
        return STAGE_MODELS[stage][method]
    raise AttributeError(f"module 'kvtools.config' has no attribute '{name}'")


@dataclass(frozen=True)
class KVConfig:
    """A validated config: one method per stage, plus a display name."""

    prefill: StageParams = field(default_factory=lambda: _default("prefill"))
    cache: StageParams = field(default_factory=lambda: _default("cache"))
    decode: StageParams = field(default_factory=lambda: _default("decode"))
    name: str = "full"
    description: str = ""
    #: how the cache stores keys and values (None: in the model's dtype); see :mod:`kvtools.quant`
    quant: QuantParams | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "prefill": self.prefill.model_dump(exclude_none=True),
            "cache": self.cache.model_dump(exclude_none=True),
            "decode": self.decode.model_dump(exclude_none=True),
        }
        if self.quant is not None:
            out["quant"] = self.quant.model_dump()
        return out


# ---------------------------------------------------------------- validation
def _default(stage: str) -> StageParams:
    return STAGE_MODELS[stage][_DEFAULTS[stage]]()


def _stage_from_dict(stage: str, raw: Any) -> StageParams:
    models = STAGE_MODELS[stage]
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{stage}: must be a mapping like {{method: ...}}, got {raw!r}")
    method = raw.get("method")
    if method is None:
        raise ConfigError(f"{stage}.method: missing; allowed: {', '.join(models)}")
    if method not in models:
        others = [s for s in STAGES if s != stage and method in STAGE_MODELS[s]]
        hint = f" ('{method}' is a {others[0]} method)" if others else closest(method, list(models))
        raise ConfigError(f"{stage}.method: unknown value '{method}'{hint}; allowed: {', '.join(models)}")
    cfg = validate_fields(models[method], raw, stage, what=method)
    cfg.check(stage)
    return cfg


def config_from_dict(raw: dict[str, Any], name: str | None = None, base_dir: Path | None = None) -> KVConfig:
    """Validate a plain dict (as loaded from YAML) into a :class:`KVConfig`.

    ``base_dir``: the YAML file's folder; relative file paths in the config (a duo ``pattern``)
    are looked up there when they do not exist relative to the working directory.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: must be a mapping with keys {', '.join(STAGES)}, got {type(raw).__name__}")
    allowed_top = [*STAGES, "quant", "name", "description"]
    for key in raw:
        if key not in allowed_top:
            raise ConfigError(
                f"{key}: unknown top-level key{closest(key, allowed_top)}; allowed: {', '.join(allowed_top)}"
            )
    cache = raw.get("cache")
    if base_dir is not None and isinstance(cache, dict) and isinstance(cache.get("pattern"), str):
        pat = Path(cache["pattern"])
        if not pat.is_absolute() and not pat.exists() and (base_dir / pat).exists():
            raw = {**raw, "cache": {**cache, "pattern": str(base_dir / pat)}}
    stages = {s: _stage_from_dict(s, raw[s]) if s in raw else _default(s) for s in STAGES}
    methods = {s: stages[s].method for s in STAGES}
    for s in STAGES:
        stages[s].check_stages(s, methods)
    if _per_chunk(stages["cache"]) and not getattr(stages["prefill"], "chunk", None):
        raise ConfigError("cache.per_chunk: compresses a prompt after each of its chunks, but the prompt is not "
                          "chunked; add prefill: {method: dense, chunk: N} (or drop per_chunk)")
    quant = None
    if raw.get("quant") is not None:
        if not isinstance(raw["quant"], dict):
            raise ConfigError(f"quant: must be a mapping like {{bits: 4}}, got {raw['quant']!r}")
        quant = validate_fields(QuantParams, raw["quant"], "quant", what="quantisation")
    display = raw.get("name") or name or _auto_name(stages) + (f"+int{quant.bits}" if quant else "")
    return KVConfig(**stages, name=str(display), description=str(raw.get("description", "")), quant=quant)


def _per_chunk(params: StageParams) -> bool:
    """A cache stage (or a head group's policy inside it, duo's) compresses after every chunk."""
    if getattr(params, "per_chunk", False):
        return True
    return any(_per_chunk(v) for v in vars(params).values() if isinstance(v, StageParams))


def _auto_name(stages: dict[str, StageParams]) -> str:
    parts = [stages[s].method for s in STAGES if stages[s].method not in ("dense", "full")]
    return "+".join(parts) or "full"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, at: str, first: str) -> None:
        super().__init__(f"duplicate key {key!r} at {at} (first at {first})")
        self.key, self.at, self.first = key, at, first


def _position(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


class StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, str] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=True)
            at = _position(key_node.start_mark)
            try:
                if key in seen:
                    raise _DuplicateKey(key, at, seen[key])
                seen[key] = at
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, where: str, what: str = "file", expected: str = "") -> Any:
    """Parse YAML text with :class:`StrictYamlLoader`; bad YAML, a duplicate key or an empty document is a
    :class:`ConfigError` naming ``where`` (``expected``: what the file should hold, for that message)."""
    try:
        data = yaml.load(text, Loader=StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(
            f"{where}: duplicate key '{exc.key}' at {exc.at} (first at {exc.first}); give each key once"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    if data is None:
        hint = f"; expected {expected}" if expected else ""
        raise ConfigError(f"{where}: empty {what} (only whitespace or comments){hint}")
    return data


def read_yaml(path: Path, what: str, expected: str = "") -> Any:
    """Parse a YAML file (see :func:`parse_yaml`); a missing or empty file, bad YAML or a duplicate key is a
    :class:`ConfigError` naming the file."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    return parse_yaml(path.read_text(), str(path), what, expected)


# ---------------------------------------------------------------- output paths
def _nearest_existing(start: Path, key: str, shown: Path) -> Path:
    """The closest existing folder at or above ``start``; a file on the way is a :class:`ConfigError`
    about ``shown`` (the path the user gave)."""
    for above in (start, *start.parents):
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                where = "is" if above == shown else f"is under {above}, which is"
                raise ConfigError(f"{key}: {shown} {where} a file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                raise ConfigError(f"{key}: {above} is not writable")
            return above
    return Path.cwd()


def check_out_dir(path: str | Path, key: str = "--out") -> Path:
    """An output folder that exists or can be created: not a file, not under a file, writable.

    Nothing is created; call it before any expensive work.
    """
    out = Path(path).expanduser()
    if str(path).strip() == "":
        raise ConfigError(f"{key}: empty path; give an output folder")
    _nearest_existing(out, key, out)
    return out


def check_out_file(path: str | Path, key: str = "--out") -> Path:
    """An output file that can be written: not a folder, not under a file; an existing file is replaced."""
    out = Path(path).expanduser()
    if str(path).strip() == "" or out.is_dir():
        raise ConfigError(f"{key}: {path!s} is a folder; give a file path")
    _nearest_existing(out.parent, key, out)
    return out


# ---------------------------------------------------------------- presets
def _preset_dir() -> Path:
    return Path(str(resources.files("kvtools.configs")))


def list_presets() -> dict[str, str]:
    """Preset name -> one-line description, from the YAML files shipped in ``kvtools.configs``."""
    out = {}
    for path in sorted(_preset_dir().glob("*.yaml")):
        data = read_yaml(path, "preset")
        out[path.stem] = str(data.get("description", "")).strip()
    return out


def load_config(spec: str | Path | dict | KVConfig, base_dir: Path | None = None) -> KVConfig:
    """Turn a preset name, a YAML path, a dict or a config object into a validated config.

    >>> load_config("snapkv").cache.budget
    1024
    >>> load_config({"cache": {"method": "streamingllm", "n_sink": 4, "window": 60}}).name
    'streamingllm'
    """
    if isinstance(spec, KVConfig):
        return spec
    if isinstance(spec, dict):
        return config_from_dict(spec, base_dir=base_dir)
    text = str(spec)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        raw = read_yaml(path, "config file", f"a mapping with keys {', '.join(STAGES)}, e.g. cache: {{method: full}}")
        return config_from_dict(raw, name=path.stem, base_dir=path.parent)
    presets = _preset_dir()
    candidate = presets / f"{text}.yaml"
    if candidate.is_file():
        return config_from_dict(read_yaml(candidate, "preset"), name=text, base_dir=presets)
    names = sorted(p.stem for p in presets.glob("*.yaml"))
    raise ConfigError(f"unknown preset '{text}'{closest(text, names)}; available presets: {', '.join(names)}")


def same_method(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether a method config recorded by an earlier run (``to_dict``) is the one ``new`` resolves to:
    the old record is re-validated first, so parameters added since, at their defaults, do not count."""
    if old == new:
        return True
    try:
        with warnings.catch_warnings():  # an old record may use a deprecated key: that is not the user's doing
            warnings.simplefilter("ignore", FutureWarning)
            return load_config(old).to_dict() == new
    except ConfigError:
        return False
