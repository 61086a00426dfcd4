"""``kvtools niah``: a grid of context lengths x needle depths, several samples per cell, on the eval runner.

:func:`niah_grid` turns the command's options into a run of one ``niah`` suite
(:class:`~kvtools.eval.suites.NiahSuite`) and :func:`~kvtools.eval.run.run_eval` runs it,
like any run file: the model loads once, every method is patched in turn on the same prompt
per (length, depth, sample) cell (its seed depends on the run seed and the cell, never on the
method, and equals a run file's ``niah`` suite's), generates greedily with a fresh KV cache,
scores 1 if the needle's value appears in the output, and appends one JSON line per sample to
``results.jsonl``. A rerun with the same output folder skips the finished samples and may
extend the grid. Nothing is written before every check passed (grid, configs, output folder,
the model found and the lengths within its context, read from its config before any weights
load, the shortest prompt). What differs from a run file: the folder keeps the grid's flat
``config.json`` and gets the NIAH tables (``summary.md``, ``summary.csv``) and heatmaps.
``question="agnostic"`` (``kvtools niah --question-agnostic``) feeds the haystack first, compressed before
the question is seen, then the question (a run file's ``question: agnostic``, :mod:`kvtools.eval.run`).

Example::

    from kvtools.eval import run_niah
    run = run_niah(None, ["full", "snapkv"], [1024, 2048], [0, 50, 100], samples=2, out_dir="runs/niah")
    print(run.summary)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from kvtools.config import KVConfig

from .generation import GenerateFn, PatchFn
from .grid import parse_depths, parse_lengths
from .haystack import MAX_NEW_TOKENS
from .report import summary_markdown, write_summary
from .run import EvalResult, Run, RunFile, check_question, resolve_methods, run_eval
from .suites import suite_from_dict

__all__ = ["NiahGrid", "NiahRun", "niah_grid", "run_niah"]

#: what :func:`run_niah` returns (the result of any run)
NiahRun = EvalResult


class NiahGrid(Run):
    """A ``kvtools niah`` run: one NIAH suite; its folder holds the flat ``config.json`` below (the layout
    of the committed ``results/niah-*`` folders), a rerun may add lengths, depths, samples and configs,
    and the report is the NIAH tables and heatmaps."""

    config_file: ClassVar[str] = "config.json"
    methods_key: ClassVar[str] = "configs"
    must_match: ClassVar[tuple[str, ...]] = ("suite", "model", "seed", "max_new_tokens", "haystack", "question",
                                             "dtype")

    def to_dict(self) -> dict[str, Any]:
        (suite,) = self.suites
        return {
            "suite": "niah",
            "model": self.model_name,
            "configs": {c.name: c.to_dict() for c in self.configs},
            "lengths": list(suite.lengths),
            "depths": list(suite.depths),
            "samples": suite.samples,
            "max_new_tokens": suite.max_new_tokens,
            "seed": self.spec.seed,
            "haystack": suite.haystack,
            "question": self.question,
            "dtype": self.spec.dtype,
        }

    def resumed(self, old: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        merged = super().resumed(old, out_dir)
        merged["lengths"] = sorted(set(old.get("lengths", [])) | set(merged["lengths"]))
        merged["depths"] = sorted(set(old.get("depths", [])) | set(merged["depths"]))
        merged["samples"] = max(int(old.get("samples", 0)), merged["samples"])
        return merged

    def summary(self, records: Sequence[dict[str, Any]]) -> str:
        return summary_markdown(records)

    def write_report(self, records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
        from .plots import plot_heatmaps

        return [*write_summary(out_dir, records), *plot_heatmaps(records, out_dir)]


def niah_grid(
    model_name: str | None,
    configs: Sequence[str | Path | dict | KVConfig],
    lengths: str | Sequence[int | str],
    depths: str | Sequence[float | str],
    samples: int,
    haystack_dir: str | Path | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    out_dir: str | Path = "runs/niah",
    *,
    question: str = "aware",
    dtype: str = "float32",
    share_prefill: bool = False,
) -> NiahGrid:
    """The run of a NIAH grid, validated (configs, grid, haystack folder, question mode); nothing is loaded.

    ``lengths`` / ``depths`` are lists or specs (:func:`~kvtools.eval.grid.parse_lengths`,
    :func:`~kvtools.eval.grid.parse_depths`); the other arguments are those of :func:`run_niah`.
    """
    if isinstance(configs, (str, Path, dict, KVConfig)):
        configs = [configs]  # type: ignore[list-item]
    resolved = resolve_methods(list(configs), "configs")
    haystack = str(Path(haystack_dir).resolve()) if haystack_dir is not None else None
    suite = suite_from_dict({"suite": "niah", "lengths": parse_lengths(lengths), "depths": parse_depths(depths),
                             "samples": samples, "max_new_tokens": max_new_tokens, "haystack": haystack}, "niah")
    check_question(question, [suite])
    spec = RunFile(model=model_name, methods=[c.to_dict() for c in resolved], suites=[suite.model_dump()],
                   seed=seed, out=str(out_dir), question=question, dtype=dtype, share_prefill=share_prefill)
    return NiahGrid(spec, resolved, [suite])


def run_niah(
    model_name: str | None,
    configs: Sequence[str | Path | dict | KVConfig],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    out_dir: str | Path,
    haystack_dir: str | Path | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    seed: int = 0,
    quiet: bool = False,
    *,
    model: Any = None, tokenizer: Any = None,
    generate_fn: GenerateFn | None = None,
    patch_fn: PatchFn | None = None,
    report: bool = True,
    question: str = "aware",
    dtype: str = "float32",
    share_prefill: bool = False,
) -> EvalResult | None:
    """Run (or resume) a needle-in-a-haystack grid and write its results (what ``kvtools niah`` does);
    returns the records and summary (``None`` on the other processes of an ``accelerate launch``).

    Args:
        model_name: for :func:`kvtools.load_model` (``None`` = the default model).
        configs: preset names, YAML paths, dicts or configs; one method each, keyed by name.
        lengths: target lengths in tokens (prompt + ``max_new_tokens``).
        depths: needle depths in percent of the haystack.
        samples: prompts per (length, depth) cell, each with its own needle and haystack.
        out_dir: run folder: ``config.json``, ``results.jsonl``, then ``summary.md``,
            ``summary.csv`` and ``heatmap_*.png``. An existing run there is resumed.
        haystack_dir: folder of ``.txt`` files for the haystack; ``None`` = built-in filler.
        max_new_tokens: greedy tokens generated per sample.
        seed: run seed; each cell's prompt seed derives from it
            (:func:`~kvtools.eval.suites.sample_seed`).
        quiet: no progress bar.
        model: an already loaded model (skips :func:`kvtools.load_model`); pass ``tokenizer`` with it.
        tokenizer: the loaded model's tokenizer.
        generate_fn: replaces :func:`~kvtools.eval.generation.generate_greedy` (tests, other decoding).
        patch_fn: replaces :func:`kvtools.patch` (tests).
        report: write the summary and heatmaps at the end.
        question: ``aware`` (each prompt in one call) or ``agnostic`` (the haystack first, compressed before the
            question is fed; the question kept whole: scored cache methods run with ``calls: first``).
        dtype: the model's dtype when this run loads it (``float32``, ``bfloat16``, ``float16``): the KV cache's
            too; a folder holds one dtype's results.
        share_prefill: one dense prefill per prompt, replayed into each method that prefills as ``full``
            does (:mod:`kvtools.eval.generation`): the same records, faster over many methods.

    Everything is validated (configs, grid, haystack folder, resume compatibility)
    before the model is loaded; a length beyond the model's context raises
    :class:`~kvtools.errors.InputTooLongError` before any generation.

    >>> run = run_niah(None, ["full", "streamingllm"], [1024, 2048], [0, 50, 100], 2, "runs/niah")  # doctest: +SKIP
    >>> print(run.summary)  # doctest: +SKIP
    """
    run = niah_grid(model_name, configs, lengths, depths, samples, haystack_dir, max_new_tokens, seed, out_dir,
                    question=question, dtype=dtype, share_prefill=share_prefill)
    return run_eval(run, out_dir, quiet, model=model, tokenizer=tokenizer, generate_fn=generate_fn,
                    patch_fn=patch_fn, report=report)
