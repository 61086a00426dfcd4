"""Benchmarks: end-to-end speed and memory (``e2e``), attention-only prefill speed
(``attention``), and recall of the retrieval indexes (``recall``). Each measures methods side
by side in one process and writes rows, a Markdown table and a plot."""

from .e2e import BenchRow, measure, plot_bench, report_markdown, run_bench, write_report

__all__ = ["BenchRow", "measure", "plot_bench", "report_markdown", "run_bench", "write_report"]
