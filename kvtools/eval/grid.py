"""Grid specs of the eval commands: context lengths (``1k,2k``, ``1k:16k:16``) and needle depths
(``0:100:11``), each a comma list of values or inclusive ``start:stop:count`` ranges."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from kvtools.errors import ConfigError

__all__ = ["parse_depths", "parse_lengths"]

_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([kK]?)$")


def _parse_number(text: str, what: str, *, allow_k: bool) -> float:
    """A plain number, or with ``allow_k`` a whole number of tokens or a multiple of k = 1024."""
    text = text.strip()
    m = _SIZE.match(text)
    whole = not allow_k or m is None or m.group(2) or float(m.group(1)).is_integer()
    if not m or (m.group(2) and not allow_k) or not whole:
        hint = "a number of tokens like 1500, 1k or 0.5k (k = 1024)" if allow_k else "a number like 0, 12.5 or 100"
        raise ConfigError(f"{what}: cannot read '{text}'; expected {hint}")
    value = float(m.group(1))
    return value * 1024 if m.group(2) else value


def _expand(spec: str | Sequence[Any], what: str, *, allow_k: bool) -> list[float]:
    """Comma list whose items are numbers or ``start:stop:count`` ranges (inclusive linspace)."""
    if not isinstance(spec, str):
        spec = ",".join(str(x) for x in spec)
    values: list[float] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"{what}: empty item in '{spec}'; separate values with single commas")
        if ":" in item:
            parts = item.split(":")
            if len(parts) != 3:
                raise ConfigError(f"{what}: range '{item}' must be start:stop:count, e.g. 0:100:11")
            start = _parse_number(parts[0], what, allow_k=allow_k)
            stop = _parse_number(parts[1], what, allow_k=allow_k)
            count_text = parts[2].strip()
            if not count_text.isdigit() or int(count_text) < 1:
                raise ConfigError(f"{what}: range '{item}': count must be a whole number >= 1, got '{count_text}'")
            count = int(count_text)
            if count == 1:
                values.append(start)
            else:
                values.extend(start + (stop - start) * i / (count - 1) for i in range(count))
        else:
            values.append(_parse_number(item, what, allow_k=allow_k))
    if not values:
        raise ConfigError(f"{what}: no values in '{spec}'")
    return values


def parse_lengths(spec: str | Sequence[int | str]) -> list[int]:
    """Parse context lengths: ``"1k,2k,4k"``, ``"1500,0.5k"``, or ``"1k:16k:16"`` (k = 1024).

    Returns sorted, distinct token counts; raises :class:`~kvtools.errors.ConfigError`
    on bad syntax, non-positive or empty lists.

    >>> parse_lengths("1k,2k,1500,0.5k")
    [512, 1024, 1500, 2048]
    >>> parse_lengths("1k:4k:4")
    [1024, 2048, 3072, 4096]
    """
    out: set[int] = set()
    for value in _expand(spec, "lengths", allow_k=True):
        n = round(value)
        if n < 1:
            raise ConfigError(f"lengths: must be >= 1 token, got {value:g}")
        out.add(n)
    return sorted(out)


def parse_depths(spec: str | Sequence[float | str]) -> list[float]:
    """Parse needle depths in percent: ``"0:100:11"`` (inclusive linspace) or ``"0,25,50,100"``.

    Values are rounded to 2 decimals, sorted and distinct, each in [0, 100].

    >>> parse_depths("0:100:5")
    [0.0, 25.0, 50.0, 75.0, 100.0]
    >>> parse_depths("10,0")
    [0.0, 10.0]
    """
    out: set[float] = set()
    for value in _expand(spec, "depths", allow_k=False):
        if not 0 <= value <= 100:
            raise ConfigError(f"depths: must be percents in [0, 100], got {value:g}")
        out.add(round(value, 2))
    return sorted(out)
