"""Public datasets through the ``datasets`` package: one task's examples from local files or the hub.

``source`` is a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a folder holding
``<name>.<ext>`` (directly or under ``data/``), a ``.zip`` holding ``data/<name>.jsonl``, or
a hub dataset id. A hub id that cannot be loaded (hub unreachable, offline mode without a
cached copy, unknown id) is a :class:`~kvtools.errors.ConfigError` naming the dataset and the
local files ``source`` accepts, raised at once rather than after the hub libraries' retries;
so is a local file that ``datasets`` cannot parse.

Loading needs the optional ``datasets`` package (``pip install 'kvtools[eval]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kvtools.errors import ConfigError

__all__ = ["load_dataset_source"]

#: local file suffixes and the ``datasets`` builder that reads them
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - only without the optional package
        raise ImportError(
            "LongBench/InfiniteBench loading needs the 'datasets' package: pip install 'kvtools[eval]'"
        ) from exc
    return datasets


def _local_hint(name: str) -> str:
    return (f"give local files as `source:` (a run file's suite key): a {name}.jsonl / .json / .parquet file, "
            f"a folder holding {name}.jsonl (or data/{name}.jsonl), or a .zip holding data/{name}.jsonl")


def _from_hub(source: str, name: str, load: Callable[[], Any], lib_offline: bool) -> Any:
    """Run ``load`` (a hub download) unless the hub is unavailable; any failure is a :class:`ConfigError`
    naming the dataset and how to give local files.

    ``lib_offline``: the loading library itself runs in offline mode (it then reads the HF cache and fails
    fast); otherwise an unreachable hub fails here at once, instead of after the library's retries.
    """
    from kvtools.models import hub_unreachable

    reason = hub_unreachable()
    if reason is not None and not lib_offline:
        raise ConfigError(
            f"source: cannot load '{source}' ({name}) from the hub: {reason}; to read a copy already in the HF "
            f"cache, run with HF_HUB_OFFLINE=1; or {_local_hint(name)}"
        )
    try:
        return load()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network and dataset errors of several libraries
        detail = (str(exc).strip().splitlines() or [""])[0]
        where = f"the HF cache ({reason})" if reason else "the hub"
        raise ConfigError(
            f"source: cannot load '{source}' ({name}) from {where}: {type(exc).__name__}: {detail}; "
            f"{_local_hint(name)}"
        ) from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _datasets_offline() -> bool:
    return bool(getattr(_datasets().config, "HF_HUB_OFFLINE", False))


def _pick_file(folder: Path, name: str) -> Path:
    for sub in (folder, folder / "data"):
        for suffix in _BUILDERS:
            candidate = sub / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise ConfigError(f"source: no {name}.jsonl/.json/.parquet in {folder} (or its data/ folder)")


def _read_local(path: Path, load: Callable[[], Any]) -> Any:
    """Run ``load`` (``datasets`` reading a local file); a file it cannot parse is a :class:`ConfigError`."""
    try:
        return load()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets' several parse / schema errors
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"source: cannot read {path}: {type(exc).__name__}: {detail}") from None


def load_dataset_source(
    source: str | Path,
    name: str,
    *,
    split: str = "test",
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    hub_zip: bool = False,
    hub_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Load one task's examples as a ``datasets.Dataset``, from a local file/folder/zip or the hub.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file; a folder with ``<name>.<ext>``
            (directly or under ``data/``); a ``.zip`` holding ``data/<name>.jsonl``; or a
            hub dataset id. Local files are read through ``load_dataset("json"|"parquet")``.
        name: the task (file stem or hub config name).
        split: hub split; local files have a single split and ignore it.
        limit: keep only the first ``limit`` examples.
        cache_dir: the ``datasets`` cache folder (default: the HF cache).
        hub_zip: the hub repo holds its data as ``data.zip`` (read ``data/<name>.jsonl`` from it,
            downloaded with ``huggingface_hub``) instead of one config per task.
        hub_kwargs: load a hub id as ``load_dataset(source, split=split, **hub_kwargs)`` (e.g.
            ``data_files``, ``features``; no config name); by default the hub dataset is loaded
            as ``load_dataset(source, name, split=split)``.
    """
    ds = _datasets()
    kw: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir is not None else None}
    path = Path(source).expanduser()
    if path.is_dir():
        path = _pick_file(path, name)
    if path.is_file() and path.suffix == ".zip":
        data = _read_local(path, lambda: ds.load_dataset(
            "json", data_files=f"zip://data/{name}.jsonl::{path.resolve()}", split="train", **kw))
    elif path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise ConfigError(f"source: {path} is not a .jsonl, .json, .parquet or .zip file")
        data = _read_local(path, lambda: ds.load_dataset(builder, data_files=str(path), split="train", **kw))
    elif path.suffix in _BUILDERS or path.suffix == ".zip" or str(source).startswith((".", "/", "~")):
        raise ConfigError(f"source: file not found: {source}")
    elif hub_zip:
        from huggingface_hub import hf_hub_download

        def from_zip() -> Any:
            zip_path = hf_hub_download(str(source), "data.zip", repo_type="dataset")
            return ds.load_dataset("json", data_files=f"zip://data/{name}.jsonl::{zip_path}", split="train", **kw)

        data = _from_hub(str(source), name, from_zip, _hub_offline())
    elif hub_kwargs is not None:
        hub_kw = {**kw, **hub_kwargs}
        data = _from_hub(str(source), name, lambda: ds.load_dataset(str(source), split=split, **hub_kw),
                         _datasets_offline())
    else:
        data = _from_hub(str(source), name, lambda: ds.load_dataset(str(source), name, split=split, **kw),
                         _datasets_offline())
    if limit is not None:
        data = data.select(range(min(max(limit, 0), len(data))))
    return data
