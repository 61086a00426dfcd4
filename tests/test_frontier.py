"""Score-vs-bytes reporting: the Pareto frontier, method families and the frontier plot."""

from __future__ import annotations

from kvtools.eval.eval_report import eval_markdown, frontier_figure, method_family, pareto_front, write_eval_report


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


def test_the_frontier_plot_moves_crowded_labels_apart():
    # twelve methods that all score 100 at 9-30% of the bytes (Gemma-3's NIAH 16k sweep): drawn at their points,
    # their labels would overlap; the plot must leave every pair apart, inside the axes
    points = {f"snapkv-{b}-span-variant": (0.09 + 0.02 * i, 100.0) for i, b in enumerate(range(10, 130, 10))}
    points["full"] = (1.0, 100.0)
    fig = frontier_figure({"niah": points})
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(points)
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlaps
    inside = ax.get_window_extent(renderer)
    assert all(inside.x0 - 1 <= b.x0 and b.x1 <= inside.x1 + 1 and inside.y0 - 1 <= b.y0 and b.y1 <= inside.y1 + 1
               for b in boxes)


def test_methods_at_one_point_share_a_label():
    # uniform and adaptive budgets that hold the same bytes and score the same are one point: one label names both
    points = {"snapkv-10-span": (0.13, 100.0), "snapkv-10-span-ada": (0.13, 100.0), "full": (1.0, 100.0)}
    labels = sorted(t.get_text() for t in frontier_figure({"niah": points}).axes[0].texts)
    assert labels == ["full", "snapkv-10-span, snapkv-10-span-ada"]
