"""The base of every method's parameter model, and the validation helpers every YAML-facing model shares.

A method declares its parameters next to its code (``SnapKVParams`` in ``methods/snapkv.py``) as a
subclass of :class:`StageParams`; what a field cannot say alone goes on the class too:

* :meth:`StageParams.check` — constraints between fields (``budget >= window``), files that must exist;
* :attr:`StageParams.requires` — cross-stage rules (``decode: recycled`` needs ``cache: full`` or ``snapkv``);
* :attr:`StageParams.aliases` — old key -> new key: configs in users' hands keep loading, with a warning.

``kvtools.config`` assembles the stages; this module imports nothing from kvtools but the errors.
"""

from __future__ import annotations

import difflib
import types
import typing
import warnings
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError

#: the three stages of a config, in the order a forward meets them
STAGES = ("prefill", "cache", "decode")

#: the block-sparse engine backends a sparse prefill may ask for
Backend = Literal["auto", "torch", "flex", "triton"]


def closest(word: str, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the option closest to ``word``, or nothing when none is close."""
    hit = difflib.get_close_matches(str(word), options, n=1, cutoff=0.5)
    return f" (did you mean '{hit[0]}'?)" if hit else ""


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


def _is_int_or_fraction(annotation: Any) -> bool:
    """``int | float``: a token count, or a fraction of the prompt (of the slots, for decode)."""
    return set(typing.get_args(annotation)) == {int, float}


class StageParams(StrictNumbers):
    """Base of every stage's parameter model: unknown keys are errors, booleans are not numbers, an
    ``int | float`` field's float is a fraction in (0, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str

    #: cross-stage rule: other stage -> the methods it may use with this one (empty: any)
    requires: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: why, completing "'<method>' ..." in the error message
    requires_why: ClassVar[str] = ""
    #: deprecated key -> current key; the old key still loads, with a FutureWarning
    aliases: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _rename_aliases(cls, raw: Any) -> Any:
        if not cls.aliases or not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for old, new in cls.aliases.items():
            if old not in raw:
                continue
            if new in raw:
                raise PydanticCustomError("alias_twice", f"'{old}' is the old name of '{new}': give only '{new}'")
            warnings.warn(f"{raw.get('method', cls.__name__)}: '{old}' is deprecated, use '{new}'", FutureWarning,
                          stacklevel=2)
            raw[new] = raw.pop(old)
        return raw

    def check(self, stage: str) -> None:
        """Constraints a single field cannot express; raise :class:`ConfigError` naming ``stage.key``.
        Subclasses extend it (and call ``super().check(stage)``)."""
        for key, info in type(self).model_fields.items():
            val = getattr(self, key)
            if _is_int_or_fraction(info.annotation) and isinstance(val, float) and not (0 < val <= 1):
                of = "the cached slots" if stage == "decode" else "the prompt"
                raise ConfigError(f"{stage}.{key}: a float means a fraction of {of} and must be in (0, 1], got {val}")

    def check_stages(self, stage: str, methods: dict[str, str]) -> None:
        """The cross-stage rule (:attr:`requires`) against the config's ``methods`` (stage -> method)."""
        for other, allowed in self.requires.items():
            if methods[other] not in allowed:
                need = " or ".join(f"'{m}'" for m in allowed)
                raise ConfigError(f"{stage}.method: '{self.method}' {self.requires_why} and needs {other}.method "
                                  f"{need}, got '{methods[other]}'")


class PrefillParams(StageParams):
    """Base of every prefill method's parameters: ``chunk`` feeds a long prompt in calls of that many tokens
    (the patched model wrapper splits it). A sparse prefill method runs on each chunk's queries over the
    table so far while that table is the whole stream (the cache evicts nothing yet), else the chunk is
    attended densely over what the cache kept."""

    chunk: int | None = Field(
        default=None, ge=2, description="split long prompts into chunks of this many tokens (a last chunk of one "
                                        "token joins the one before: every chunk is a multi-token call)"
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
        if err["type"] == "alias_twice":
            raise ConfigError(f"{where}: {err['msg']}{f' ({what})' if what else ''}") from None
        suffix = f" ({what})" if what else ""
        raise ConfigError(f"{where}.{key}: {err['msg'].lower()}, got {err.get('input')!r}{suffix}") from None
