"""The ``best-*`` presets are what the committed results measured, and those results meet the goal the preset
descriptions claim (issue 14: >= 95% of full's score at <= 25% of its KV bytes, >= 85% at <= 10%), at every
suite and length measured. A preset edited away from its measured method, or a results folder rerun with a
different outcome, fails here instead of leaving a description that no longer holds."""

import json
from pathlib import Path

import pytest

from kvtools.config import load_config, same_method
from kvtools.eval.eval_report import main_task, summarize_eval

ROOT = Path(__file__).resolve().parents[1]

#: preset -> (the results folders that measured it beside full, with the method name it has there; the goal:
#: minimum share of full's score, maximum share of full's KV bytes, both per suite and length)
BEST = {
    "best-25-smollm2": ({"int8-compose-smollm2": "duo-snapkv-85-int8", "int8-85-smollm2-long": "duo-smollm2-snapkv-85-int8"},
                        0.95, 0.25),
    "best-10-smollm2": ({"frontier-smollm2": "duo-snapkv-r100-s7-int8"}, 0.85, 0.10),
    "best-25-gemma3": ({"frontier-gemma3-16k": "snapkv-0.85-span-int8", "long-prompt-gemma3-32k": "snapkv-0.85-span-int8",
                        "sweep-gemma3": "snapkv-85-span-int8"},
                       0.95, 0.25),
    "best-10-gemma3": ({"frontier-gemma3-16k": "snapkv-0.25-span-int8", "long-prompt-gemma3-32k": "snapkv-0.25-span-int8",
                        "sweep-gemma3": "snapkv-25-span-int8"},
                       0.85, 0.10),
}


def _as_preset(recorded: dict, preset: dict) -> dict:
    """The recorded config under the preset's name; run.json records a Duo pattern by the path it had then,
    so a pattern of the same file name stands for the preset's."""
    recorded = {**recorded, "name": preset["name"]}
    if "pattern" in recorded["cache"]:
        assert Path(recorded["cache"]["pattern"]).name == Path(preset["cache"]["pattern"]).name
        recorded["cache"] = {**recorded["cache"], "pattern": preset["cache"]["pattern"]}
    return recorded


@pytest.mark.parametrize("preset", sorted(BEST))
def test_best_preset_is_the_measured_config(preset: str) -> None:
    folders, _, _ = BEST[preset]
    now = load_config(preset).to_dict()
    for folder, measured in folders.items():
        recorded = json.loads((ROOT / "results" / folder / "run.json").read_text())["methods"][measured]
        assert same_method(_as_preset(recorded, now), now), (preset, folder)


@pytest.mark.parametrize("preset", sorted(BEST))
def test_best_preset_meets_its_goal_in_the_committed_results(preset: str) -> None:
    folders, min_score, max_bytes = BEST[preset]
    cells = 0
    for folder, measured in folders.items():
        lines = (ROOT / "results" / folder / "results.jsonl").read_text().splitlines()
        rows = summarize_eval([json.loads(line) for line in lines if line.strip()])
        main = {suite: main_task(rows, suite) for suite in {r["suite"] for r in rows}}
        for r in rows:  # each suite's headline cells, as the folder's summary reports them
            if r["method"] == measured and r["task"] == main[r["suite"]]:
                assert r["score_vs_full"] is not None and r["score_vs_full"] >= min_score, (folder, r)
                assert r["kv_bytes_vs_full"] <= max_bytes, (folder, r)
                cells += 1
    assert cells >= 2, f"{preset}: no measured cells beside full in {folders}"
