"""Evaluation suites, scoring, reports and plots.

Needle in a haystack::

    from kvtools.eval import run_niah
    run = run_niah(None, ["full", "snapkv"], [1024, 2048], [0, 50, 100], samples=2, out_dir="runs/niah")
    print(run.summary)

A YAML-configured run over several suites (the same runner)::

    from kvtools.eval import run_eval
    res = run_eval("configs/eval/quick-smollm2.yaml")

Heavy dependencies (torch, transformers, matplotlib) are imported only when used.
"""

from .generation import Generation, generate_greedy
from .grid import parse_depths, parse_lengths
from .haystack import NiahPrompt, build_niah_prompt, filler_sentences, iter_filler, load_haystack_dir, score_output
from .niah import NiahRun, run_niah
from .plots import plot_heatmaps
from .report import read_results, summarize, summary_markdown, write_summary
from .run import EvalResult, load_run, run_eval

__all__ = [
    "EvalResult",
    "Generation",
    "NiahPrompt",
    "NiahRun",
    "build_niah_prompt",
    "filler_sentences",
    "generate_greedy",
    "iter_filler",
    "load_haystack_dir",
    "load_run",
    "parse_depths",
    "parse_lengths",
    "plot_heatmaps",
    "read_results",
    "run_eval",
    "run_niah",
    "score_output",
    "summarize",
    "summary_markdown",
    "write_summary",
]
