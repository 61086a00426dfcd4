"""Invariant 4: a left-padded batch row gets the result it gets alone (full, snapkv, streamingllm)."""

import pytest
import torch

import kvtools

from .conftest import random_ids
from .helpers import prefill_then_decode

pytestmark = pytest.mark.mechanics

CONFIGS = {
    "full": "full",
    "snapkv": {"cache": {"method": "snapkv", "budget": 14, "window": 4, "kernel": 3}},
    "snapkv-frac": {"cache": {"method": "snapkv", "budget": 0.5, "window": 4, "kernel": 3, "pool": "avg"}},
    "streamingllm": {"cache": {"method": "streamingllm", "n_sink": 3, "window": 8}},
    "streamingllm-original": {"cache": {"method": "streamingllm", "n_sink": 3, "window": 8, "positions": "original"}},
    "duo": {"cache": {"method": "duo", "retrieval_heads": {0: [0]}, "n_sink": 3, "window": 6}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_rows_equal_running_alone(family_model, name):
    _, model = family_model
    pad = 9
    long_ids = random_ids(1, 40, seed=5)
    short_ids = random_ids(1, 40 - pad, seed=6)
    ids = torch.cat([long_ids, torch.cat([torch.zeros(1, pad, dtype=torch.long), short_ids], 1)])
    am = torch.ones_like(ids)
    am[1, :pad] = 0
    prompt = 28  # then 12 teacher-forced decode steps
    with kvtools.patch(model, CONFIGS[name]) as p:
        batch, _ = prefill_then_decode(model, ids, prompt, cache=p.make_cache(), attention_mask=am)
        alone0, _ = prefill_then_decode(model, long_ids, prompt, cache=p.make_cache())
        alone1, _ = prefill_then_decode(model, short_ids, prompt - pad, cache=p.make_cache())
    torch.testing.assert_close(batch[0], alone0[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch[1], alone1[0], atol=1e-4, rtol=0)


def test_generate_left_padded_batch_equals_alone(llama):
    a, b = random_ids(1, 20, seed=7), random_ids(1, 13, seed=8)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    am = torch.ones_like(ids)
    am[1, :7] = 0
    cfg = {"cache": {"method": "snapkv", "budget": 10, "window": 3, "kernel": 3}}
    with kvtools.patch(llama, cfg):
        both = llama.generate(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=False)
        ga = llama.generate(input_ids=a, max_new_tokens=10, do_sample=False)
        gb = llama.generate(input_ids=b, max_new_tokens=10, do_sample=False)
    assert torch.equal(both[0, 20:], ga[0, 20:])
    assert torch.equal(both[1, 20:], gb[0, 13:])
