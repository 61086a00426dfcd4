"""Typed, validated configs: YAML / dict / preset name -> :class:`KVConfig`.

A config names at most one method per stage::

    prefill: {method: dense}
    cache:   {method: snapkv, budget: 1024, window: 32, kernel: 7, pool: max}
    decode:  {method: dense}

Every stage's parameters are a pydantic model registered under the method's
name (see ``kvtools.methods``). Validation happens here, before any model work,
and every error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError

STAGES = ("prefill", "cache", "decode")


def _bool_where_number(value: Any, annotation: Any) -> bool:
    """Whether ``value`` holds a bool where ``annotation`` wants an int or a float (pydantic's lax mode
    would read ``true`` as 1), looking into lists and dicts."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _bool_where_number(value, typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if isinstance(value, bool):
            return bool not in args and any(a in (int, float) for a in args)
        return any(_bool_where_number(value, a) for a in args)
    if annotation in (int, float):
        return isinstance(value, bool)
    if origin in (list, tuple, set, frozenset) and isinstance(value, (list, tuple, set, frozenset)):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return bool(args) and any(_bool_where_number(v, args[0]) for v in value)
    if origin is dict and isinstance(value, dict):
        key_type, value_type = typing.get_args(annotation) or (Any, Any)
        return any(_bool_where_number(k, key_type) or _bool_where_number(v, value_type) for k, v in value.items())
    return False


class StrictNumbers(BaseModel):
    """Base of the models read from YAML: int / float fields refuse booleans (``window: true`` is an
    error, not 1); ints stay accepted for float fields."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        info_field = cls.model_fields.get(info.field_name or "")
        if info_field is not None and _bool_where_number(value, info_field.annotation):
            raise PydanticCustomError("bool_for_number", "expected a number, not a boolean")
        return value


class StageConfig(StrictNumbers):
    """Base of every stage's parameter model: unknown keys are errors, booleans are not numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str


# ---------------------------------------------------------------- stage models
class DensePrefill(StageConfig):
    """Dense causal attention over the prompt (SDPA)."""

    method: Literal["dense"] = "dense"
    chunk: int | None = Field(
        default=None, ge=1, description="split long prompts into chunks of this many tokens"
    )


Backend = Literal["auto", "torch", "flex", "triton"]


class FlexPrefill(StageConfig):
    """FlexPrefill: per-head sparse prefill, vertical-slash or query-aware block selection."""

    method: Literal["flexprefill"] = "flexprefill"
    gamma: float = Field(default=0.9, gt=0, le=1, description="attention mass each head's selection must cover")
    tau: float = Field(default=0.1, ge=0, le=1, description="JSD threshold: below -> query-aware, else vertical-slash")
    block_size: int = Field(default=128, ge=16, description="query/key block size (tokens)")
    min_budget: int = Field(default=512, ge=0, description="least tokens selected per head (rounded up to blocks)")
    max_budget: int | None = Field(default=None, ge=1, description="most tokens per head for vertical/slash")
    backend: Backend = Field(default="auto", description="block-sparse engine backend")


class _HipParams(StageConfig):
    k: int = Field(default=512, ge=1, description="keys selected per query block by the tree search")
    block_k: int = Field(default=16, ge=1, description="selection granularity in keys (the paper uses 2)")
    n_sink: int = Field(default=64, ge=0, description="first keys always attended")
    window: int = Field(default=256, ge=0, description="most recent keys always attended")
    dense_layers: int = Field(default=3, ge=0, description="the first layers stay dense")


class HipPrefill(_HipParams):
    """HiP: hierarchical top-k key-block selection per query block, plus sink and window."""

    method: Literal["hip"] = "hip"
    block_q: int = Field(default=32, ge=1, description="queries sharing one selection")
    backend: Backend = Field(default="auto", description="block-sparse engine backend")


class HipDecode(_HipParams):
    """HiP decode: each new token attends to a tree-searched top-k, refreshed every `refresh_interval` steps."""

    method: Literal["hip"] = "hip"
    refresh_interval: int = Field(default=8, ge=1, description="decode steps between selection refreshes")


class RecycledDecode(StageConfig):
    """Recycled Attention: a full step every `stride` steps picks each KV head's top-k slots; the steps
    between attend only to them plus the tokens generated since (the full cache is kept)."""

    method: Literal["recycled"] = "recycled"
    top_k: int | float = Field(default=0.25, gt=0, description="slots per KV head (int) or fraction of the slots")
    stride: int = Field(default=16, ge=1, description="decode steps per full step (1: always full)")
    dynamic: bool = Field(default=False, description="also run a full step when the query drifts (cosine < s)")
    s: float = Field(default=0.8, ge=-1, le=1, description="cosine threshold of the dynamic schedule")
    pool: int = Field(default=1, ge=1, description="max-pool the full step's scores over this many following "
                                                   "slots before the top-k, so a picked token brings the tokens "
                                                   "after it (copying needs them; 1: the paper's top-k)")


class FullCache(StageConfig):
    """Keep every K/V entry (the baseline)."""

    method: Literal["full"] = "full"


class StreamingLLMCache(StageConfig):
    """Attention sinks + a recent window; everything between is evicted."""

    method: Literal["streamingllm"] = "streamingllm"
    n_sink: int = Field(default=4, ge=0, description="first real tokens always kept")
    window: int | float = Field(
        default=1020, gt=0, description="recent tokens kept (int) or fraction of the prompt (0 < f <= 1)"
    )
    positions: Literal["cache", "original"] = Field(
        default="cache",
        description="the query sees kept keys at in-cache distances (sinks rotated each call, nothing re-rotated "
                    "in place), or at their original positions",
    )


class SnapKVCache(StageConfig):
    """Compress the prompt's cache once, at the end of prefill, by observation-window attention."""

    method: Literal["snapkv"] = "snapkv"
    budget: int | float = Field(
        default=1024, gt=0, description="slots per KV head (int) or fraction of the prompt (0 < f <= 1)"
    )
    window: int = Field(default=32, ge=1, description="observation window: last queries of the prompt")
    kernel: int = Field(default=7, ge=1, description="1-D pooling kernel over the sequence (odd)")
    pool: Literal["max", "avg"] = "max"


class KNormCache(StageConfig):
    """At the end of each prompt (multi-token call) keep its recent window + the keys with the smallest L2 norm."""

    method: Literal["knorm"] = "knorm"
    budget: int | float = Field(
        default=1024, gt=0, description="slots per KV head (int) or fraction of the prompt (0 < f <= 1)"
    )
    window: int = Field(default=16, ge=1, description="most recent prompt tokens always kept")


class RetrievalCache(StageConfig):
    """RetrievalAttention: after prefill all but sink + window slots move to CPU, one ANN index per
    (layer, row, KV head); each decode query attends to its retrieved top_k there plus the device slots."""

    method: Literal["retrieval"] = "retrieval"
    n_sink: int = Field(default=128, ge=0, description="first real tokens kept on the device")
    window: int = Field(default=512, ge=1, description="most recent tokens kept on the device")
    top_k: int = Field(default=256, ge=1, description="keys retrieved per query head per step")
    index: Literal["flat", "hnsw", "ivf"] = Field(default="hnsw", description="FAISS index (inner product)")
    hnsw_m: int = Field(default=32, ge=2, description="hnsw: neighbours per node")
    ef_construction: int = Field(default=64, ge=1, description="hnsw: build beam")
    ef_search: int = Field(default=128, ge=1, description="hnsw: search beam")
    hnsw_space: Literal["l2-augmented", "ip"] = Field(
        default="l2-augmented", description="hnsw: an L2 graph over keys given one extra coordinate so all have "
                                            "the same norm (exact reduction of inner-product search), or a graph "
                                            "built on inner product itself (navigates poorly: measured recall ~0.6)")
    nlist: int = Field(default=64, ge=1, description="ivf: clusters (capped by the keys available)")
    nprobe: int = Field(default=8, ge=1, description="ivf: clusters searched")
    train_on: Literal["keys", "queries"] = Field(
        default="keys", description="ivf: centroids from the keys, or from the prefill queries (keys filed by "
                                    "inner product; measured recall is poor, see README)")
    insert: bool = Field(default=True, description="tokens leaving the window are added to the index")
    hot_keys: int = Field(
        default=0, ge=0, description="attention-aware candidates: the offloaded keys the last hot_window prompt "
                                     "queries attend to most, scored exactly with the index's results each step "
                                     "(0: off)")
    hot_window: int = Field(default=256, ge=1, description="prompt queries (per query head) that pick the hot keys")


class DuoCache(StageConfig):
    """DuoAttention: retrieval KV heads keep everything, streaming KV heads keep sink + recent slots."""

    method: Literal["duo"] = "duo"
    pattern: str | None = Field(default=None, description="TSV: one row per layer, one float in [0, 1] per KV head")
    retrieval_heads: dict[int, list[int]] | None = Field(
        default=None, description="explicit retrieval KV heads per layer ({layer: [heads]}); other heads stream"
    )
    sparsity: float | None = Field(default=None, ge=0, le=1, description="fraction of KV heads made streaming")
    threshold: float | None = Field(default=None, ge=0, le=1, description="retrieval heads: pattern value > this")
    n_sink: int = Field(default=64, ge=0, description="first real tokens kept by streaming heads")
    recent: int = Field(default=256, ge=1, description="most recent tokens kept by streaming heads")


class RetrievalDecode(StageConfig):
    """Decode over a retrieval cache: device slots + retrieved CPU slots, merged by log-sum-exp."""

    method: Literal["retrieval"] = "retrieval"


class DenseDecode(StageConfig):
    """Each new token attends to every kept slot."""

    method: Literal["dense"] = "dense"


#: stage -> method name -> parameter model. Methods register here (listed by `kvtools methods`).
STAGE_MODELS: dict[str, dict[str, type[StageConfig]]] = {
    "prefill": {"dense": DensePrefill, "flexprefill": FlexPrefill, "hip": HipPrefill},
    "cache": {"full": FullCache, "streamingllm": StreamingLLMCache, "snapkv": SnapKVCache, "knorm": KNormCache,
              "duo": DuoCache, "retrieval": RetrievalCache},
    "decode": {"dense": DenseDecode, "hip": HipDecode, "recycled": RecycledDecode, "retrieval": RetrievalDecode},
}

_DEFAULTS = {"prefill": DensePrefill(), "cache": FullCache(), "decode": DenseDecode()}


@dataclass(frozen=True)
class KVConfig:
    """A validated config: one method per stage, plus a display name."""

    prefill: StageConfig = field(default_factory=DensePrefill)
    cache: StageConfig = field(default_factory=FullCache)
    decode: StageConfig = field(default_factory=DenseDecode)
    name: str = "full"
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "prefill": self.prefill.model_dump(exclude_none=True),
            "cache": self.cache.model_dump(exclude_none=True),
            "decode": self.decode.model_dump(exclude_none=True),
        }


# ---------------------------------------------------------------- validation
def closest(word: str, options: list[str]) -> str:
    hit = difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    return f" (did you mean '{hit[0]}'?)" if hit else ""


def _check_fractions(stage: str, cfg: StageConfig) -> None:
    for key in ("budget", "window", "top_k"):
        val = getattr(cfg, key, None)
        if isinstance(val, float) and not (0 < val <= 1):
            of = "the cached slots" if stage == "decode" else "the prompt"
            raise ConfigError(f"{stage}.{key}: a float means a fraction of {of} and must be in (0, 1], got {val}")
    if isinstance(cfg, DuoCache):
        if (cfg.pattern is None) == (cfg.retrieval_heads is None):
            raise ConfigError("cache.pattern / cache.retrieval_heads: give exactly one of them (duo)")
        if cfg.sparsity is not None and cfg.threshold is not None:
            raise ConfigError("cache.sparsity / cache.threshold: give at most one of them (duo)")
        if cfg.retrieval_heads is not None and (cfg.sparsity is not None or cfg.threshold is not None):
            raise ConfigError("cache.sparsity / cache.threshold: only apply to a pattern file (duo)")
        if cfg.pattern is not None and not Path(cfg.pattern).is_file():
            raise ConfigError(f"cache.pattern: file not found: {cfg.pattern} (duo)")
    if isinstance(cfg, SnapKVCache) and cfg.kernel % 2 == 0:
        raise ConfigError(f"cache.kernel: must be odd (same-size pooling), got {cfg.kernel}")
    if isinstance(cfg, (SnapKVCache, KNormCache)):
        if isinstance(cfg.budget, int) and cfg.budget < cfg.window:
            raise ConfigError(
                f"cache.budget: must be >= cache.window ({cfg.window}) so the window fits, "
                f"got {cfg.budget}"
            )


def validate_fields(model: type[BaseModel], raw: dict[str, Any], where: str, what: str = "") -> Any:
    """Build a pydantic ``model`` from ``raw``; the first error becomes a :class:`ConfigError`
    naming ``where.key``, the problem, the bad value and (for unknown keys) the closest allowed one."""
    try:
        return model(**raw)
    except ValidationError as exc:
        errors = exc.errors()
        # an unknown key (typically a typo) explains a "missing" one: report it first
        err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
        key = ".".join(str(p) for p in err["loc"]) or "?"
        allowed = [k for k in model.model_fields if k not in ("method", "suite")]
        label = f" for {what}" if what else ""
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"{where}.{key}: unknown key{label}{closest(key, allowed)}; allowed: {', '.join(allowed)}"
            ) from None
        if err["type"] == "missing":
            raise ConfigError(f"{where}.{key}: missing{label}") from None
        suffix = f" ({what})" if what else ""
        raise ConfigError(f"{where}.{key}: {err['msg'].lower()}, got {err.get('input')!r}{suffix}") from None


def _stage_from_dict(stage: str, raw: Any) -> StageConfig:
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
    _check_fractions(stage, cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], name: str | None = None, base_dir: Path | None = None) -> KVConfig:
    """Validate a plain dict (as loaded from YAML) into a :class:`KVConfig`.

    ``base_dir``: the YAML file's folder; relative file paths in the config (a duo ``pattern``)
    are looked up there when they do not exist relative to the working directory.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"config: must be a mapping with keys {', '.join(STAGES)}, got {type(raw).__name__}")
    allowed_top = [*STAGES, "name", "description"]
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
    stages = {s: _stage_from_dict(s, raw[s]) if s in raw else _DEFAULTS[s] for s in STAGES}
    if (stages["cache"].method == "retrieval") != (stages["decode"].method == "retrieval"):
        raise ConfigError(
            "cache.method / decode.method: 'retrieval' goes in both stages (the cache offloads and indexes, "
            f"decode searches it); got cache '{stages['cache'].method}', decode '{stages['decode'].method}'"
        )
    if stages["decode"].method == "recycled" and stages["cache"].method not in ("full", "snapkv"):
        raise ConfigError(
            f"decode.method: 'recycled' keeps slot positions between full steps and needs cache.method 'full' or "
            f"'snapkv' (no eviction while decoding), got '{stages['cache'].method}'"
        )
    if stages["decode"].method == "hip" and stages["cache"].method != "full":
        raise ConfigError(
            f"decode.method: 'hip' searches the whole prompt cache and needs cache.method 'full', got "
            f"'{stages['cache'].method}'"
        )
    display = raw.get("name") or name or _auto_name(stages)
    return KVConfig(**stages, name=str(display), description=str(raw.get("description", "")))


def _auto_name(stages: dict[str, StageConfig]) -> str:
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
        return load_config(old).to_dict() == new
    except ConfigError:
        return False
