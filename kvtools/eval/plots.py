"""NIAH heatmaps: x = context length, y = depth percent, colour = mean score (red -> yellow -> green).

Figures are drawn with matplotlib's object API on an Agg canvas (``matplotlib.figure.Figure``),
so nothing touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import BASELINE, format_length

__all__ = ["heatmap_grid", "plot_heatmaps"]

_MAX_ANNOTATED_CELLS = 400
_COLORS = ["#d73027", "#fc8d59", "#fee08b", "#d9ef8b", "#91cf60", "#1a9850"]  # red -> yellow -> green


def _cmap() -> Any:
    from matplotlib.colors import LinearSegmentedColormap

    # grey: cells without results
    return LinearSegmentedColormap.from_list("kvtools_niah", _COLORS).with_extremes(bad="#dddddd")


def heatmap_grid(
    records: Sequence[dict[str, Any]], method: str, lengths: Sequence[int], depths: Sequence[float]
) -> list[list[float | None]]:
    """Mean score per (depth row, length column) for one method; ``None`` where no sample ran."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in records:
        if r["method"] == method:
            cells[(round(float(r["depth"]), 6), int(r["length"]))].append(float(r["score"]))
    return [
        [
            (sum(v) / len(v)) if (v := cells.get((round(float(d), 6), int(n)))) else None
            for n in lengths
        ]
        for d in depths
    ]


def _safe_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", method)


def _draw(ax: Any, grid: list[list[float | None]], lengths: Sequence[int], depths: Sequence[float], title: str) -> Any:
    import numpy as np

    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float))
    im = ax.imshow(data, cmap=_cmap(), vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    if len(lengths) > 12:
        ax.tick_params(axis="x", labelrotation=90)
    if len(lengths) > 20 or len(depths) > 20:
        ax.tick_params(labelsize=6)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    n_cells = len(lengths) * len(depths)
    if n_cells <= _MAX_ANNOTATED_CELLS:
        size = 9 if n_cells <= 100 else 6
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v is not None:
                    label = f"{v:.0f}" if v in (0.0, 1.0) else f"{v:.2f}"
                    ax.text(j, i, label, ha="center", va="center", fontsize=size, color="black")
    return im


def _mean_score(records: Sequence[dict[str, Any]], method: str) -> float:
    scores = [float(r["score"]) for r in records if r["method"] == method]
    return sum(scores) / len(scores) if scores else float("nan")


def plot_heatmaps(
    records: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str | None = None
) -> list[Path]:
    """Write ``heatmap_<method>.png`` per method, and ``heatmaps.png`` side by side when several ran.

    All heatmaps share the same axes (every length and depth present in the results)
    and the same 0..1 colour scale; cells without results are grey. Returns the paths.

    >>> plot_heatmaps(read_results("runs/niah/results.jsonl"), "runs/niah")  # doctest: +SKIP
    [PosixPath('runs/niah/heatmap_full.png'), ...]
    """
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(str(r["method"]) for r in records))
    if BASELINE in methods:
        methods.remove(BASELINE)
        methods.insert(0, BASELINE)
    if not methods:
        return []
    lengths = sorted({int(r["length"]) for r in records})
    depths = sorted({round(float(r["depth"]), 6) for r in records})
    width = max(4.0, 0.45 * len(lengths) + 2.5)
    height = max(3.0, 0.3 * len(depths) + 1.8)
    prefix = f"{title}: " if title else ""
    paths: list[Path] = []

    for method in methods:
        fig = Figure(figsize=(width + 1.2, height), layout="constrained")
        ax = fig.subplots()
        grid = heatmap_grid(records, method, lengths, depths)
        im = _draw(ax, grid, lengths, depths, f"{prefix}{method} — mean score {_mean_score(records, method):.2f}")
        fig.colorbar(im, ax=ax, label="mean score")
        path = out / f"heatmap_{_safe_name(method)}.png"
        fig.savefig(path, dpi=120)
        paths.append(path)

    if len(methods) > 1:
        cols = min(len(methods), 3)
        rows = -(-len(methods) // cols)
        panel_w, panel_h = min(width, 8.0), min(height, 7.0)
        fig = Figure(figsize=(cols * panel_w + 1.2, rows * panel_h), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False)
        im = None
        for ax, method in zip(axes.flat, methods):
            grid = heatmap_grid(records, method, lengths, depths)
            im = _draw(ax, grid, lengths, depths, f"{method} — mean {_mean_score(records, method):.2f}")
        for ax in list(axes.flat)[len(methods):]:
            ax.set_visible(False)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="mean score", shrink=0.9)
        if title:
            fig.suptitle(title)
        path = out / "heatmaps.png"
        fig.savefig(path, dpi=120)
        paths.append(path)
    return paths
