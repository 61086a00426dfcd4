"""Score-vs-bytes reporting: the Pareto frontier, method families and the frontier plot."""

from __future__ import annotations

from kvtools.eval.eval_report import eval_markdown, method_family, pareto_front, write_eval_report


def test_pareto_front_keeps_what_nothing_beats_on_both_axes():
    points = {"a": (0.10, 50.0), "b": (0.25, 70.0), "c": (0.25, 60.0), "d": (0.50, 65.0), "e": (1.0, 97.0),
              "f": (0.10, 50.0)}
    # c: b holds as many bytes and scores higher; d: b holds fewer and scores higher; a and f tie
    assert pareto_front(points) == ["a", "f", "b", "e"]


def test_method_family_replaces_the_budget():
    assert method_family("snapkv-0.25-span") == method_family("snapkv-0.1-span") == "snapkv-*-span"
    assert method_family("full") == "full"


def _records():
    out = []
    for method, share, score in (("full", 1.0, 1.0), ("snapkv-0.1", 0.12, 0.4), ("snapkv-0.25", 0.27, 0.7),
                                 ("knorm-0.25", 0.27, 0.5)):
        for length in (1024, 2048):
            out.append({"suite": "niah", "task": "niah", "length": length, "method": method, "score": score,
                        "kv_bytes": share * 1000 * length, "depth": 50, "sample": 0})
    return out


def test_the_summary_names_the_frontier_and_the_plot_is_written(tmp_path):
    md = eval_markdown(_records())
    line = next(x for x in md.splitlines() if x.startswith("Pareto frontier"))
    assert "snapkv-0.1 (12% -> 40.0)" in line and "snapkv-0.25 (27% -> 70.0)" in line and "knorm" not in line
    files = write_eval_report(_records(), tmp_path, md)
    assert tmp_path / "score_vs_kv_share.png" in files and (tmp_path / "score_vs_kv_share.png").stat().st_size > 0
