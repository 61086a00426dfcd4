"""KNorm: each call keeps its recent window + the lowest-norm keys, per (row, KV head), against a plain loop."""

import pytest
import torch

import kvtools

from .conftest import random_ids

pytestmark = pytest.mark.mechanics


def test_knorm_keeps_window_plus_lowest_norm_keys(llama):
    ids = random_ids(2, 50, seed=3)
    cfg = {"cache": {"method": "knorm", "budget": 20, "window": 5}}
    with kvtools.patch(llama, {}) as p:  # the full cache holds every key the policy ranks
        full = p.make_cache()
        llama(ids, past_key_values=full)
    with kvtools.patch(llama, cfg) as p:
        cache = p.make_cache()
        llama(ids, past_key_values=cache)
    for layer, ref in zip(cache.layers, full.layers):
        for b in range(2):
            for h in range(ref.keys.shape[1]):
                norms = ref.keys[b, h].float().norm(dim=-1)
                ranked = sorted(range(45), key=lambda j: (norms[j].item(), j))  # ties: the earlier slot
                want = sorted(ranked[:15] + list(range(45, 50)))
                assert sorted(layer.idx[b, h][layer.valid[b, h]].tolist()) == want


def test_knorm_budget_must_hold_the_window():
    with pytest.raises(kvtools.ConfigError, match="cache.budget: must be >= cache.window"):
        kvtools.load_config({"cache": {"method": "knorm", "budget": 4, "window": 8}})
