"""Slow accuracy checks on the real SmolLM2-135M (run with `make test-slow`)."""

import pytest
import torch

import kvtools
from kvtools.eval.haystack import iter_filler
from kvtools.eval.ppl import stream_nll

pytestmark = pytest.mark.slow


def _stream_ids(tok, n_tokens: int) -> torch.Tensor:
    text, it = "", iter_filler(0)
    while len(text) < n_tokens * 8:
        text += next(it) + " "
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    assert ids.shape[1] == n_tokens
    return ids


def test_streamingllm_cache_positions_keeps_perplexity_flat_past_8k(smollm2):
    """16k+ tokens through an 8k-context model: sinks + re-rotated positions stay within 1.5x of the
    first 2k's perplexity in every segment; dense attention past 8k does not."""
    model, tok = smollm2
    ids = _stream_ids(tok, 16384 + 1024)
    with kvtools.patch(model, "streamingllm") as p:
        stream = stream_nll(model, ids, p, chunk=512, segment=2048).segments()
    with kvtools.patch(model, "full") as p:
        dense = stream_nll(model, ids, p, chunk=512, segment=2048).segments()
    print("streamingllm", [round(x, 2) for x in stream])
    print("full", [round(x, 2) for x in dense])
    assert max(stream) <= 1.5 * stream[0]
    assert max(dense[4:]) > 1.5 * dense[0]  # segments past 8k


def test_full_equals_unpatched_on_the_real_model(smollm2):
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
        with kvtools.patch(model, "full"):
            got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
