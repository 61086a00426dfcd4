"""Summary tables and plots of a ``kvtools eval`` run."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .report import BASELINE, format_length, prefilled_alone


def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize_eval(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (suite, task, length, method): n, mean score (x100), timings, KV bytes, ratios to full.

    ``prefill_s`` is the mean over the records that prefilled alone (a record that replayed a shared prefill,
    ``prefill: shared``, has that prefill's time in it, not the method's own); None when none did.

    Rows with task ``*`` average the suite's tasks (each task weighted equally).
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("score") is None:
            continue
        groups[(r["suite"], r["task"], int(r["length"]), r["method"])].append(r)
    rows = []
    for (suite, task, length, method), rs in groups.items():
        rows.append({
            "suite": suite, "task": task, "length": length, "method": method, "n": len(rs),
            "score": 100 * _mean([float(r["score"]) for r in rs]),
            "prefill_s": _mean([r.get("prefill_s") for r in rs if prefilled_alone(r)]),
            "decode_ms": _mean([r.get("decode_ms") for r in rs]),
            "kv_bytes": _mean([r.get("kv_bytes") for r in rs]),
        })
    by_task: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_task[(row["suite"], row["length"], row["method"])].append(row)
    for (suite, length, method), rs in by_task.items():
        if len({r["task"] for r in rs}) > 1:
            rows.append({
                "suite": suite, "task": "*", "length": length, "method": method, "n": sum(r["n"] for r in rs),
                **{k: _mean([r[k] for r in rs]) for k in ("score", "prefill_s", "decode_ms", "kv_bytes")},
            })
    base = {(r["suite"], r["task"], r["length"]): r for r in rows if r["method"] == BASELINE}
    for r in rows:
        b = base.get((r["suite"], r["task"], r["length"]))
        for k in ("score", "kv_bytes", "decode_ms"):
            r[f"{k}_vs_full"] = (r[k] / b[k]) if b and b.get(k) and r.get(k) is not None else None
    rows.sort(key=lambda r: (r["suite"], r["task"] != "*", r["task"], r["length"], r["method"] != BASELINE,
                             r["method"]))
    return rows


def main_task(rows: Sequence[dict[str, Any]], suite: str) -> str | None:
    """The task ``suite`` is reported by in :func:`summarize_eval`'s rows: its task mean ``*`` when it has
    several tasks, else its one task (``None`` when it has no rows)."""
    srows = [r for r in rows if r["suite"] == suite]
    return "*" if any(r["task"] == "*" for r in srows) else (srows[0]["task"] if srows else None)


def method_points(rows: Sequence[dict[str, Any]], suite: str) -> dict[str, tuple[float, float]]:
    """Each method's (mean KV bytes as a fraction of full's, mean score x100) over the lengths of ``suite``
    (its task mean when it has several tasks); methods without a KV ratio (no ``full`` run) are left out."""
    srows = [r for r in rows if r["suite"] == suite]
    main = main_task(rows, suite)
    out = {}
    for m in dict.fromkeys(r["method"] for r in srows):
        cells = [r for r in srows if r["task"] == main and r["method"] == m]
        kv = _mean([c["kv_bytes_vs_full"] for c in cells])
        score = _mean([c["score"] for c in cells])
        if kv is not None and score is not None:
            out[m] = (kv, score)
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The methods no other beats on both axes (fewer KV bytes *and* a higher score; (x, y) = (KV share,
    score)), from the fewest bytes up. A tie on both keeps every tied method."""
    front = []
    for m, (x, y) in points.items():
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for m2, (x2, y2) in points.items() if m2 != m)
        if not dominated:
            front.append(m)
    return sorted(front, key=lambda m: points[m])


def method_family(name: str) -> str:
    """A method's name with its first number (a budget) replaced by ``*``: the curve it belongs to
    (``snapkv-0.1-span``, ``snapkv-0.25-span`` -> ``snapkv-*-span``)."""
    return re.sub(r"\d+(\.\d+)?", "*", name, count=1)


def _f(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def eval_markdown(records: Sequence[dict[str, Any]], title: str = "") -> str:
    rows = summarize_eval(records)
    methods = list(dict.fromkeys(r["method"] for r in records))
    out = [f"## {title}" if title else "## Evaluation", ""]
    for suite in dict.fromkeys(r["suite"] for r in rows):
        srows = [r for r in rows if r["suite"] == suite]
        lengths = sorted({r["length"] for r in srows})
        main = main_task(rows, suite)
        label = "mean over tasks" if main == "*" else main
        out += [f"### {suite} — score x100 ({label})", "",
                "| method | " + " | ".join(format_length(n) for n in lengths) + " | mean | vs full | KV MiB | KV vs full | prefill s | decode ms/token |",
                "|---|" + "---:|" * (len(lengths) + 6)]
        for m in methods:
            cells = {r["length"]: r for r in srows if r["task"] == main and r["method"] == m}
            if not cells:
                continue
            mean = _mean([c["score"] for c in cells.values()])
            ratio = _mean([c["score_vs_full"] for c in cells.values() if c["score_vs_full"] is not None])
            kv = _mean([c["kv_bytes"] for c in cells.values()])
            kv_ratio = _mean([c["kv_bytes_vs_full"] for c in cells.values() if c["kv_bytes_vs_full"] is not None])
            dec = _mean([c["decode_ms"] for c in cells.values()])
            pre = _mean([c["prefill_s"] for c in cells.values()])
            out.append(f"| {m} | " + " | ".join(_f(cells[n]["score"], ".1f") if n in cells else "—" for n in lengths)
                       + f" | {_f(mean, '.1f')} | {_pct(ratio)} | "
                       f"{_f(None if kv is None else kv / 2**20, '.1f')} | {_pct(kv_ratio)} | {_f(pre, '.2f')} | "
                       f"{_f(dec, '.1f')} |")
        points = method_points(rows, suite)
        if len(points) >= 3:
            front = pareto_front(points)
            out += ["", "Pareto frontier (mean KV share of full -> mean score; nothing else holds fewer bytes and "
                    "scores higher): " + ", ".join(f"{m} ({_pct(points[m][0])} -> {points[m][1]:.1f})"
                                                   for m in front)]
        tasks = [t for t in dict.fromkeys(r["task"] for r in srows) if t != "*"]
        if len(tasks) > 1:
            out += ["", f"Per task (score x100, mean over lengths {', '.join(format_length(n) for n in lengths)}):", "",
                    "| task | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
            for t in tasks:
                vals = [_mean([r["score"] for r in srows if r["task"] == t and r["method"] == m]) for m in methods]
                out.append(f"| {t} | " + " | ".join(_f(v, ".1f") for v in vals) + " |")
        out.append("")
    if not all(map(prefilled_alone, records)):
        out += ["prefill s: the mean over the records that prefilled alone; the others replayed a shared dense "
                "prefill (share_prefill), whose time is not the method's own (— where every record did).", ""]
    ppl = [r for r in records if r.get("ppl_segments")]
    if ppl:
        out += ["### ppl — perplexity per segment of the stream", ""]
        for r in ppl:
            segs = ", ".join(f"{x:.1f}" for x in r["ppl_segments"])
            out.append(f"- {r['method']} ({r['task']}, {format_length(r['length'])}, segments of "
                       f"{r['segment']}): overall {r['ppl']:.2f}; segments: {segs}")
        out.append("")
    return "\n".join(out)


def write_eval_report(records: Sequence[dict[str, Any]], out_dir: Path, markdown: str) -> list[Path]:
    """Write ``markdown`` (:func:`eval_markdown` of the records) as summary.md, then summary.csv and the plots;
    returns the files written."""
    files = [out_dir / "summary.md", out_dir / "summary.csv"]
    files[0].write_text(markdown)
    rows = summarize_eval(records)
    with files[1].open("w", newline="") as f:
        cols = ["suite", "task", "length", "method", "n", "score", "score_vs_full", "kv_bytes", "kv_bytes_vs_full",
                "prefill_s", "decode_ms", "decode_ms_vs_full"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    files += _plots(records, rows, out_dir)
    return files


def _plots(records, rows, out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    files: list[Path] = []
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in records))
    if suites:
        for name, x_of, xlabel in (
            ("score_vs_length.png", lambda r: r["length"], "context length (tokens)"),
            ("score_vs_kv.png", lambda r: (r["kv_bytes"] or 0) / 2**20, "KV cache held (MiB)"),
        ):
            fig = Figure(figsize=(4.2 * len(suites), 3.6))
            axes = fig.subplots(1, len(suites), squeeze=False)[0]
            for ax, suite in zip(axes, suites):
                main = "*" if any(r["suite"] == suite and r["task"] == "*" for r in rows) else None
                for m in methods:
                    pts = sorted((x_of(r), r["score"]) for r in rows if r["suite"] == suite and r["method"] == m
                                 and (r["task"] == main if main else True))
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
                ax.set_title(suite)
                ax.set_xlabel(xlabel)
                ax.set_ylabel("score x100")
                ax.set_ylim(-3, 103)
                ax.grid(alpha=0.3)
            axes[0].legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            files.append(out_dir / name)
    shares = {suite: method_points(rows, suite) for suite in suites}
    if any(len(p) >= 3 for p in shares.values()):
        files.append(_plot_frontier(shares, out_dir / "score_vs_kv_share.png"))
    niah = [r for r in records if r["suite"] == "niah" and r.get("score") is not None]
    if niah:
        from .plots import plot_heatmaps

        files += plot_heatmaps(niah, out_dir)
    ppl = [r for r in records if r.get("ppl_segments")]
    if ppl:
        fig = Figure(figsize=(6, 3.8))
        ax = fig.subplots()
        for r in ppl:
            xs = [(i + 1) * r["segment"] for i in range(len(r["ppl_segments"]))]
            ax.plot(xs, r["ppl_segments"], marker=".", label=f"{r['method']} ({r['task']})")
        ax.set_yscale("log")
        ax.set_xlabel("position in the stream (tokens)")
        ax.set_ylabel("perplexity per segment")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "ppl.png", dpi=110)
        files.append(out_dir / "ppl.png")
    return files


def _colors(n: int) -> list:
    """``n`` distinct colours: matplotlib's default cycle, tab20 beyond its 10."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_frontier(shares: dict[str, dict[str, tuple[float, float]]], path: Path) -> Path:
    frontier_figure(shares).savefig(path, dpi=110)
    return path


def frontier_figure(shares: dict[str, dict[str, tuple[float, float]]]) -> Any:
    """Per suite (``{suite: {method: (mean KV share of full, mean score)}}``): every method at its point, labelled
    (labels moved apart where points crowd), the budgets of one method joined (:func:`method_family`), the Pareto
    frontier dashed."""
    from adjustText import adjust_text
    from matplotlib.figure import Figure

    suites = [s for s, p in shares.items() if p]
    fig = Figure(figsize=(6 * len(suites), 4.8))
    axes = fig.subplots(1, len(suites), squeeze=False)[0]
    texts = []
    for ax, suite in zip(axes, suites):
        points = shares[suite]
        families: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for m, (x, y) in points.items():
            families[method_family(m)].append((100 * x, y, m))
        colors = _colors(len(families))
        at: dict[tuple[float, float], list[str]] = defaultdict(list)  # methods drawn at one point share a label
        for (fam, pts), color in zip(families.items(), colors):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=fam, color=color)
            for x, y, m in pts:
                at[round(x, 1), round(y, 1)].append(m)
        labels = [ax.text(x, y, ", ".join(ms), fontsize=6, color="0.2") for (x, y), ms in at.items()]
        front = pareto_front(points)
        ax.plot([100 * points[m][0] for m in front], [points[m][1] for m in front], "k--", lw=1, label="Pareto frontier")
        ax.set_title(suite)
        ax.set_xlabel("KV bytes held, % of full")
        ax.set_ylabel("score x100 (mean over lengths)")
        # the scores' own range (RULER means sit far below 100), with room above for the labels
        ax.set_ylim(-3, 1.2 * max(y for _, y in points.values()) + 8)
        ax.set_yticks([t for t in ax.get_yticks() if 0 <= t <= 100])
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
        texts.append(labels)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    for ax, labels in zip(axes, texts):
        # labels moved off the points and apart where points crowd (budgets that score alike), each tied to its
        # point by a line
        xs, ys = zip(*(t.get_position() for t in labels))
        adjust_text(labels, x=list(xs), y=list(ys), ax=ax, arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.4},
                    iter_lim=2000)
    return fig
