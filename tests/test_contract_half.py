"""The contract's half-precision check: bf16 / fp16 runs of every method stay as close to their fp32 run as
``full``'s do, over a few hundred decode steps (no per-step re-rounding of held keys). Dtype behaviour does
not depend on the transformers version, so this runs once (not under the oldest transformers too)."""

from __future__ import annotations

import pytest
import torch

import kvtools

from .conftest import random_ids, tiny_model
from .test_contract import CASES, run_calls

STEPS = 300


@pytest.fixture(scope="module")
def half_runs():
    """Teacher-forced logits of a 40-token prompt + STEPS decode steps, per (config name, dtype)."""
    ids = random_ids(1, 40 + STEPS, seed=11)
    models = {dt: tiny_model("llama", dtype=dt) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    cache: dict = {}

    def get(name, config, dtype):
        if (name, dtype) not in cache:
            with kvtools.patch(models[dtype], config) as p:
                cache[(name, dtype)] = run_calls(models[dtype], ids, [40] + [1] * STEPS, cache=p.make_cache())[0]
        return cache[(name, dtype)].float()

    return get


HALF = [pytest.param(case.covering[0] if case.selects else case.sparse, id=f"{s}-{m}")
        for (s, m), case in CASES.items() if (s, m) != ("cache", "full")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", HALF)
def test_half_precision_stays_as_close_as_full(half_runs, config, dtype):
    def err(name, cfg):
        a, b = half_runs(name, cfg, dtype), half_runs(name, cfg, torch.float32)
        return ((a - b).abs().mean(-1) / b.abs().mean(-1)).mean().item()

    full = err("full", {})
    got = err(str(config), config)
    assert got <= 1.5 * full + 2e-3, f"{got:.4f} vs full {full:.4f}"
