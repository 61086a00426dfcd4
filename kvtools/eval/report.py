"""Results files of an evaluation run, and the summary tables of a ``kvtools niah`` run.

A run folder holds ``results.jsonl``: one JSON object per sample, appended as the run
goes, the same record format for every suite and for ``kvtools niah`` (see
:func:`kvtools.eval.run.run_eval`); :func:`read_results` reads it back. :func:`write_summary`
turns NIAH results into ``summary.md`` (tables readable in a README) and ``summary.csv``
(one row per method and length, plus an ``all`` row per method), with per-method means and
the ratio to the ``full`` baseline when it is part of the run. A record's ``question`` says how its prompt
was fed (:func:`question_of`; records written before that field are question-aware), and the summaries'
titles say so for question-agnostic results (:func:`question_note`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "QUESTION_DEFAULT",
    "RESULTS_FILE",
    "cell_key",
    "format_length",
    "question_note",
    "question_of",
    "read_results",
    "record_key",
    "summarize",
    "summary_markdown",
    "write_summary",
]

log = logging.getLogger("kvtools.eval")

RESULTS_FILE = "results.jsonl"
BASELINE = "full"
MIB = 1024 * 1024

CellKey = tuple[str, int, float, int]
#: how a record's prompt was fed when the record does not say (every record before the ``question`` field)
QUESTION_DEFAULT = "aware"


def question_of(record: dict[str, Any]) -> str:
    """How the record's prompt was fed: ``aware`` (one call) or ``agnostic`` (its context first)."""
    return str(record.get("question", QUESTION_DEFAULT))


def question_note(records: Iterable[dict[str, Any]]) -> str:
    """A title suffix naming the records' question mode, empty when they are all question-aware (the default).

    >>> question_note([{"question": "agnostic", "score": 1.0}])
    ' — question-agnostic (each context compressed before its question was fed)'
    """
    modes = sorted({question_of(r) for r in records if r.get("score") is not None})
    if modes == ["agnostic"]:
        return " — question-agnostic (each context compressed before its question was fed)"
    return " — question-aware and question-agnostic records mixed" if len(modes) > 1 else ""


def record_key(record: dict[str, Any]) -> tuple[str, str, str, int, float, int]:
    """The identity of a sample in a run: (method, suite, task, length, depth, sample); depth -1 without one."""
    depth = record.get("depth")
    return (str(record["method"]), str(record["suite"]), str(record["task"]), int(record["length"]),
            -1.0 if depth is None else round(float(depth), 6), int(record["sample"]))


def cell_key(record: dict[str, Any]) -> CellKey:
    """A NIAH grid cell of one method: (method, length, depth, sample)."""
    return (str(record["method"]), int(record["length"]), round(float(record["depth"]), 6), int(record["sample"]))


def _upgraded(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` in the current format.

    ``kvtools niah`` wrote its own records before it ran through the eval runner (the committed
    ``results/niah-*`` folders hold them): NIAH samples without ``suite``, ``task``, ``references``
    and ``decode_ms``, which follow from their other fields. Their ``prompt_sha1`` hashes the prompt
    text (the current one hashes the token ids), and their prompts came from an earlier seed function
    (their ``seed`` field), so new methods cannot join those cells (see ``run_eval``).
    """
    if "suite" in record:
        return record
    steps = max(int(record["new_tokens"]) - 1, 1)
    return {**record, "suite": "niah", "task": "niah", "references": [record["value"]],
            "decode_ms": 1000 * float(record["decode_s"]) / steps}


def read_results(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Read a ``results.jsonl`` file, tolerating a partial or corrupt line.

    Unparsable lines (typically the last one, cut by an interrupted run) and repeated
    samples (same :func:`record_key`; the first one wins) are dropped with a warning.
    Records of the older ``kvtools niah`` format are read in the current one.
    With ``repair=True`` the file is rewritten without the dropped lines (atomically), and
    made to end with a newline so that appending continues on a fresh line.
    A missing file reads as no results.

    >>> read_results("runs/niah/results.jsonl")  # doctest: +SKIP
    [{'method': 'full', 'suite': 'niah', 'length': 1024, 'depth': 0.0, 'sample': 0, 'score': 1.0, ...}, ...]
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    records: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    bad = dupes = 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = _upgraded(json.loads(line))
            k = record_key(rec)
            if rec["score"] is not None:  # stream suites (ppl) have no score
                float(rec["score"])
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if k in seen:
            dupes += 1
            continue
        seen.add(k)
        records.append(rec)
    if bad or dupes:
        log.warning("%s: dropped %d unreadable and %d repeated line(s)", path, bad, dupes)
    if repair and (bad or dupes or (raw and not raw.endswith(b"\n"))):
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        os.replace(tmp, path)
    return records


def format_length(n: int) -> str:
    """Short label for a token count: 1024 -> '1k', 1536 -> '1.5k', 1000 -> '1000'."""
    if n % 1024 == 0:
        return f"{n // 1024}k"
    if n % 512 == 0:
        return f"{n / 1024:g}k"
    return str(n)


def _mean(values: Iterable[float]) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or not den:
        return None
    return num / den


def prefilled_alone(record: dict[str, Any]) -> bool:
    """Whether a record's prefill time is the method's own: not a replayed shared prefill (``prefill: shared``,
    ``share_prefill``), whose time is that prefill's."""
    return record.get("prefill") != "shared"


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-method means, per length and overall (``length == 'all'``), with ratios to ``full``.

    Each row: ``method, length, n, score, kv_bytes, kv_mib, seconds, prefill_s, decode_s,
    score_vs_full, kv_vs_full``; ``seconds`` and ``prefill_s`` over the samples that prefilled alone (not
    ``prefill: shared``; None when none did). Ratios compare the method with ``full`` on the samples
    both have (same length, depth, sample), so partial runs compare like with like;
    they are ``None`` without a ``full`` run (or when full's mean is 0).

    >>> rows = summarize(read_results("runs/niah/results.jsonl"))  # doctest: +SKIP
    """
    methods = list(dict.fromkeys(str(r["method"]) for r in records))
    if BASELINE in methods:
        methods.remove(BASELINE)
        methods.insert(0, BASELINE)
    lengths = sorted({int(r["length"]) for r in records})
    by_cell = {cell_key(r): r for r in records}
    rows: list[dict[str, Any]] = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        for length in [*lengths, "all"]:
            sel = [r for r in mine if length == "all" or int(r["length"]) == length]
            if not sel:
                continue
            kv = _mean(float(r.get("kv_bytes", 0)) for r in sel)
            row: dict[str, Any] = {
                "method": method,
                "length": length,
                "n": len(sel),
                "score": _mean(float(r["score"]) for r in sel),
                "kv_bytes": kv,
                "kv_mib": kv / MIB if kv is not None else None,
                "seconds": _mean(float(r.get("seconds", 0.0)) for r in sel if prefilled_alone(r)),
                "prefill_s": _mean(float(r.get("prefill_s", 0.0)) for r in sel if prefilled_alone(r)),
                "decode_s": _mean(float(r.get("decode_s", 0.0)) for r in sel),
                "score_vs_full": None,
                "kv_vs_full": None,
            }
            pairs = [
                (r, by_cell[(BASELINE, *cell_key(r)[1:])])
                for r in sel
                if (BASELINE, *cell_key(r)[1:]) in by_cell
            ]
            if pairs:
                row["score_vs_full"] = _ratio(
                    _mean(float(a["score"]) for a, _ in pairs), _mean(float(b["score"]) for _, b in pairs)
                )
                row["kv_vs_full"] = _ratio(
                    _mean(float(a.get("kv_bytes", 0)) for a, _ in pairs),
                    _mean(float(b.get("kv_bytes", 0)) for _, b in pairs),
                )
            rows.append(row)
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _fmt_mib(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def summary_markdown(records: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Markdown tables (accuracy, KV memory, time) for a README or a terminal."""
    rows = summarize(records)
    if not rows:
        return "_no results yet_\n"
    lengths = sorted({int(r["length"]) for r in records})
    labels = [format_length(n) for n in lengths]
    table: dict[tuple[str, Any], dict[str, Any]] = {(r["method"], r["length"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    has_full = BASELINE in methods
    model = next((str(r["model"]) for r in records if r.get("model")), None)

    out = [f"## {title or 'Needle in a haystack'}" + (f" — `{model}`" if model else "") + question_note(records), ""]

    out += ["Accuracy (mean score, 1 = value found in the output):", ""]
    head = ["method", *labels, "all"] + (["vs full"] if has_full else [])
    out += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for m in methods:
        cells = [_fmt(table[(m, n)]["score"]) if (m, n) in table else "–" for n in lengths]
        line = [m, *cells, _fmt(table[(m, "all")]["score"])]
        if has_full:
            line.append(_fmt(table[(m, "all")]["score_vs_full"], ".0%"))
        out.append("| " + " | ".join(line) + " |")

    out += ["", "KV cache held after generation (mean MiB per sample):", ""]
    head = ["method", *labels] + (["vs full"] if has_full else [])
    out += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for m in methods:
        cells = [_fmt_mib(table[(m, n)]["kv_mib"]) if (m, n) in table else "–" for n in lengths]
        line = [m, *cells]
        if has_full:
            line.append(_fmt(table[(m, "all")]["kv_vs_full"], ".0%"))
        out.append("| " + " | ".join(line) + " |")

    out += ["", "Time (mean seconds per sample):", ""]
    out += ["| method | prefill | decode | total | samples |", "|---|---:|---:|---:|---:|"]
    for m in methods:
        r = table[(m, "all")]
        out.append(
            f"| {m} | {_fmt(r['prefill_s'], '.3f')} | {_fmt(r['decode_s'], '.3f')} | "
            f"{_fmt(r['seconds'], '.3f')} | {r['n']} |"
        )
    if not all(map(prefilled_alone, records)):
        out += ["", "Prefill and total: the mean over the samples that prefilled alone; the others replayed a shared "
                "dense prefill (share_prefill), whose time is not the method's own (– where every sample did)."]
    return "\n".join(out) + "\n"


def write_summary(
    out_dir: str | Path, records: Sequence[dict[str, Any]] | None = None, title: str | None = None
) -> tuple[Path, Path]:
    """Write ``summary.md`` and ``summary.csv`` into ``out_dir``; returns both paths.

    ``records`` defaults to the run's ``results.jsonl``.

    >>> md, csv_path = write_summary("runs/niah")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = read_results(out / RESULTS_FILE)
    md_path, csv_path = out / "summary.md", out / "summary.csv"
    md_path.write_text(summary_markdown(records, title=title), encoding="utf-8")
    fields = [
        "method", "length", "n", "score", "score_vs_full", "kv_bytes", "kv_mib", "kv_vs_full",
        "seconds", "prefill_s", "decode_s",
    ]
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in summarize(records):
            writer.writerow({k: ("" if row[k] is None else row[k]) for k in fields})
    return md_path, csv_path
