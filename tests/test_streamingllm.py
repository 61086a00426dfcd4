"""StreamingLLM: bounded cache, sinks + recent selection, exact when the window covers everything, re-rotation."""

import pytest
import torch

import kvtools
from kvtools.attention.rope import rotate

from .conftest import random_ids, tiny_model
from .helpers import prefill_then_decode

pytestmark = pytest.mark.mechanics


def streaming(n_sink, window, positions="cache"):
    return {"cache": {"method": "streamingllm", "n_sink": n_sink, "window": window, "positions": positions}}


@pytest.mark.parametrize("positions", ["cache", "original"])
def test_window_covering_everything_equals_full(family_model, positions):
    _, model = family_model
    ids = random_ids(2, 30 + 20)
    ref, _ = prefill_then_decode(model, ids, 30)
    with kvtools.patch(model, streaming(4, 100, positions)) as p:
        got, _ = prefill_then_decode(model, ids, 30, cache=p.make_cache())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cache_never_exceeds_sinks_plus_window_and_keeps_the_right_tokens(llama):
    ids = random_ids(1, 60)
    with kvtools.patch(llama, streaming(3, 10)) as p:
        cache = p.make_cache()
        llama(ids[:, :40], past_key_values=cache)
        assert cache.slots() == [13, 13]
        for t in range(40, 60):
            llama(ids[:, t : t + 1], past_key_values=cache)
            assert max(cache.slots()) <= 13
    layer = cache.layers[0]
    kept = sorted(layer.idx[0, 0].tolist())
    assert kept == [0, 1, 2] + list(range(50, 60))  # 3 sinks + the 10 most recent
    assert cache.get_seq_length() == 60  # tokens seen, not kept
    # positions: cache -> kept keys sit at 0..12
    assert sorted(layer.pos[0, 0].tolist()) == list(range(13))


def test_decode_token_attends_to_exactly_sinks_plus_window(llama):
    """Reference: the same model, unpatched, fed only the kept tokens at their original positions.

    For layer 0 the keys depend on the token alone, so the cache's keys must equal the
    full cache's keys for the same tokens, re-rotated by (in-cache position - original position).
    """
    ids = random_ids(1, 30)
    _, full = prefill_then_decode(llama, ids, 30)
    with kvtools.patch(llama, streaming(2, 6)) as p:
        _, cache = prefill_then_decode(llama, ids, 20, cache=p.make_cache())
    layer = cache.layers[0]
    order = layer.idx[0, 0].argsort()
    idx, pos, keys = layer.idx[0, :, order], layer.pos[0, :, order], layer.keys[0, :, order]
    assert idx[0].tolist() == [0, 1, 24, 25, 26, 27, 28, 29]
    inv_freq = llama.model.rotary_emb.inv_freq
    full_keys = full.layers[0].keys[0][:, idx[0]]  # [Hk, 8, D] at original positions
    expected = rotate(full_keys, (pos - idx).to(torch.float32), inv_freq)
    torch.testing.assert_close(keys, expected, atol=1e-4, rtol=1e-4)


def test_positions_original_keeps_absolute_positions(llama):
    ids = random_ids(1, 30)
    with kvtools.patch(llama, streaming(2, 5, "original")) as p:
        _, cache = prefill_then_decode(llama, ids, 20, cache=p.make_cache())
    layer = cache.layers[1]
    assert torch.equal(layer.pos, layer.idx)


def test_fractional_window_resolves_against_each_prompt(llama):
    ids = random_ids(1, 40)
    with kvtools.patch(llama, streaming(4, 0.25)) as p:
        cache = p.make_cache()
        llama(ids, past_key_values=cache)
    assert cache.slots() == [4 + 10, 4 + 10]


def test_sinks_are_each_rows_first_real_tokens_with_left_padding():
    model = tiny_model("llama")
    ids = random_ids(2, 30)
    am = torch.ones(2, 30, dtype=torch.long)
    am[1, :7] = 0  # row 1: 7 pad tokens on the left
    with kvtools.patch(model, streaming(2, 5)) as p:
        _, cache = prefill_then_decode(model, ids, 20, cache=p.make_cache(), attention_mask=am)
    layer = cache.layers[0]
    row1 = sorted(layer.idx[1, 0][layer.valid[1, 0]].tolist())
    assert row1[:2] == [7, 8]
