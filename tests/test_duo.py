"""DuoAttention: head-split cache with real savings; exactness at both extremes; pattern handling."""

import pytest
import torch

import kvtools
from kvtools.attention.dense import sdpa_grouped
from kvtools.cache import SlotLayer, Step
from kvtools.methods.duo import DuoParams
from kvtools.errors import ConfigError
from kvtools.methods.base import LayerInfo
from kvtools.methods.duo import DuoPolicy, binarize, load_pattern

from .conftest import random_ids
from .helpers import prefill_then_decode

pytestmark = pytest.mark.mechanics


def duo(heads, n_sink=4, window=8, **extra):
    cfg = {"cache": {"method": "duo", "retrieval_heads": heads, "n_sink": n_sink, "window": window}}
    cfg.update(extra)
    return cfg


def test_all_retrieval_heads_equal_full(family_model):
    family, model = family_model
    hk = model.config.num_key_value_heads
    heads = {i: list(range(hk)) for i in range(model.config.num_hidden_layers)}
    ids = random_ids(2, 40)
    ref, _ = prefill_then_decode(model, ids, 28)
    with kvtools.patch(model, duo(heads)) as p:
        got, _ = prefill_then_decode(model, ids, 28, cache=p.make_cache())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_all_streaming_heads_equal_streamingllm_original_positions(llama):
    ids = random_ids(2, 40)
    stream = {"cache": {"method": "streamingllm", "n_sink": 4, "window": 9, "positions": "original"}}
    with kvtools.patch(llama, stream) as p:
        ref, _ = prefill_then_decode(llama, ids, 28, cache=p.make_cache())
    with kvtools.patch(llama, duo({})) as p:  # no retrieval head anywhere
        got, cache = prefill_then_decode(llama, ids, 28, cache=p.make_cache())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert all(layer.size == 0 and layer.state["stream"].size == 12 for layer in cache.layers)


def test_memory_is_freed_and_matches_the_formula(llama):
    # layer 0: head 0 retrieval, head 1 streaming; layer 1: both streaming
    ids = random_ids(2, 50)
    n_sink, recent = 4, 8
    with kvtools.patch(llama, duo({0: [0]}, n_sink, recent)) as p:
        cache = p.make_cache()
        llama(ids, past_key_values=cache)
    b, d, itemsize = 2, 16, 4
    per_slot = 2 * d * itemsize + 1 + 4 + 4  # keys + values + valid (bool) + pos, idx (int32)
    slots = 50 * 1 + (n_sink + recent) * 1 + (n_sink + recent) * 2  # retrieval + streaming heads
    ring = 2 * b * 8  # the streaming tables' ring bookkeeping: each row's capacity (a long), per layer
    assert cache.nbytes() == b * slots * per_slot + ring
    assert cache.layers[0].keys.shape == (2, 1, 50, 16)
    assert cache.layers[0].state["stream"].keys.shape == (2, 1, 12, 16)
    with kvtools.patch(llama, "full") as p:
        full = p.make_cache()
        llama(ids, past_key_values=full)
    assert full.nbytes() == b * 50 * 4 * per_slot


def _reference(q, k, v, keep_mask, scale):
    """Plain masked attention: q [B, H, L, D] over k, v [B, Hk, L, D], causal & keep_mask [L, L] per group."""
    b, h, l, d = q.shape
    causal = torch.ones(l, l, dtype=torch.bool).tril() & keep_mask
    return sdpa_grouped(q, k, v, causal.expand(b, 1, l, l), scale)


def test_chunked_prefill_streaming_heads_see_only_sink_recent_and_chunk():
    torch.manual_seed(0)
    b, h, hk, l, d, chunk, n_sink, recent = 1, 4, 2, 40, 8, 10, 2, 5
    q, k, v = torch.randn(b, h, l, d), torch.randn(b, hk, l, d), torch.randn(b, hk, l, d)
    pol = DuoPolicy(DuoParams(retrieval_heads={0: [0]}, n_sink=n_sink, window=recent))
    pol.bind(1, hk)
    info = LayerInfo(0, d**-0.5, torch.ones(d // 2), None)
    layer, outs = SlotLayer(), []
    for s in range(0, l, chunk):
        step = Step(valid=torch.ones(b, chunk, dtype=torch.bool), pos=torch.arange(s, s + chunk)[None],
                    idx=torch.arange(s, s + chunk), prompt_real=torch.tensor([l]), end_of_prompt=s + chunk == l,
                    chunk=s // chunk)
        outs.append(pol.attend(layer, q[:, :, s:s + chunk], k[:, :, s:s + chunk], v[:, :, s:s + chunk], step, info))
    got = torch.cat(outs, dim=2)
    # retrieval KV head 0 (query heads 0, 1): dense causal attention
    full = _reference(q[:, :2], k[:, :1], v[:, :1], torch.ones(l, l, dtype=torch.bool), info.scale)
    torch.testing.assert_close(got[:, :2], full, atol=1e-5, rtol=0)
    # streaming KV head 1: a query in chunk c sees sinks, the `recent` tokens before the chunk, and the chunk
    qi, ki = torch.arange(l)[:, None], torch.arange(l)[None]
    chunk_start = (qi // chunk) * chunk
    keep = (ki < n_sink) | ((ki >= chunk_start - recent) & (ki < chunk_start)) | (ki >= chunk_start)
    stream = _reference(q[:, 2:], k[:, 1:], v[:, 1:], keep, info.scale)
    torch.testing.assert_close(got[:, 2:], stream, atol=1e-5, rtol=0)
    assert layer.size == l and layer.state["stream"].size == n_sink + recent


def test_pattern_file_binarised_by_threshold_or_sparsity(tmp_path):
    path = tmp_path / "pattern.tsv"
    path.write_text("0.9\t0.1\n0.4\t0.6\n")
    pat = load_pattern(path)
    assert pat.shape == (2, 2)
    assert binarize(pat).tolist() == [[True, False], [False, True]]
    assert binarize(pat, threshold=0.05).all()
    assert binarize(pat, sparsity=0.75).tolist() == [[True, False], [False, False]]
    assert binarize(pat, sparsity=0.25).sum() == 3
    cfg = kvtools.load_config({"cache": {"method": "duo", "pattern": str(path), "sparsity": 0.5}})
    assert cfg.cache.sparsity == 0.5


def test_pattern_shape_mismatch_is_a_clear_error(tmp_path, llama):
    path = tmp_path / "p.tsv"
    path.write_text("0.5\t0.5\t0.5\n")
    with pytest.raises(ConfigError, match=r"has 1 rows x 3 columns; this model has 2 layers x 2 KV heads"):
        kvtools.patch(llama, {"cache": {"method": "duo", "pattern": str(path)}})
    assert not hasattr(llama, "_kvtools_patch")


@pytest.mark.parametrize(
    "cache, pattern",
    [
        ({"method": "duo"}, "give exactly one of them"),
        ({"method": "duo", "pattern": "missing.tsv"}, "file not found"),
        ({"method": "duo", "retrieval_heads": {0: [0]}, "sparsity": 0.5}, "only apply to a pattern"),
        ({"method": "duo", "retrieval_heads": {0: [0]}, "window": 0}, r"cache\.window"),
        ({"method": "duo", "retrieval_heads": {0: [0]}, "window": 8, "recent": 8}, r"'recent' is the old name of 'window'"),
    ],
)
def test_bad_duo_configs(cache, pattern):
    with pytest.raises(ConfigError, match=pattern):
        kvtools.load_config({"cache": cache})


def test_retrieval_heads_out_of_range(llama):
    with pytest.raises(ConfigError, match="out of range"):
        kvtools.patch(llama, duo({0: [5]}))
