"""Invariants 1 and 3: `full` equals the unpatched model; unpatch restores; patching is per instance."""

import pytest
import torch

import kvtools
from kvtools.errors import KVToolsError

from .conftest import random_ids, tiny_model
from .helpers import prefill_then_decode

pytestmark = pytest.mark.mechanics


def test_full_logits_equal_unpatched_prefill_and_20_decode_steps(family_model):
    family, model = family_model
    ids = random_ids(2, 40 + 20)  # 40-token prompt (past gemma3's 16-token sliding window) + 20 steps
    ref, _ = prefill_then_decode(model, ids, 40)
    with kvtools.patch(model, "full") as p:
        got, cache = prefill_then_decode(model, ids, 40, cache=p.make_cache())
    assert isinstance(cache, kvtools.KVCache)
    assert cache.get_seq_length() == 60
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_full_generate_matches_unpatched_token_for_token(family_model):
    _, model = family_model
    ids = random_ids(1, 24, seed=1)
    ref = model.generate(ids, max_new_tokens=20, do_sample=False)
    with kvtools.patch(model, "full"):
        got = model.generate(ids, max_new_tokens=20, do_sample=False)  # cache created automatically
    assert torch.equal(got, ref)


def test_generate_with_sampling_and_user_cache(llama):
    ids = random_ids(1, 12)
    with kvtools.patch(llama, "full") as p:
        cache = p.make_cache()
        torch.manual_seed(0)
        a = llama.generate(ids, max_new_tokens=8, do_sample=True, top_k=5, past_key_values=cache)
        assert cache.get_seq_length() == a.shape[1] - 1  # the last sampled token is never fed back
        torch.manual_seed(0)
        b = llama.generate(ids, max_new_tokens=8, do_sample=True, top_k=5, past_key_values=kvtools.KVCache())
    assert torch.equal(a, b)


def test_unpatch_restores_exactly_and_repatching_is_safe(llama):
    ids = random_ids(1, 20)
    before = llama(ids).logits
    forwards = {id(m): m.__dict__.get("forward") for m in llama.modules()}
    p = kvtools.patch(llama, {"cache": {"method": "streamingllm", "n_sink": 2, "window": 4}})
    patched = llama(ids[:, :10]).logits
    p.unpatch()
    assert {id(m): m.__dict__.get("forward") for m in llama.modules()} == forwards
    assert torch.equal(llama(ids).logits, before)
    with kvtools.patch(llama, "full"):
        assert llama(ids).logits.shape == before.shape
    assert torch.equal(llama(ids).logits, before)
    assert patched.shape[1] == 10


def test_patching_a_patched_model_is_a_clear_error(llama):
    with kvtools.patch(llama, "full"):
        with pytest.raises(KVToolsError, match="already patched"):
            kvtools.patch(llama, "snapkv")


def test_two_models_patched_independently():
    a, b = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    ids = random_ids(1, 16)
    ra, rb = a(ids).logits, b(ids).logits
    with kvtools.patch(a, "full"), kvtools.patch(b, "full"):
        torch.testing.assert_close(a(ids).logits, ra, atol=1e-5, rtol=0)
        torch.testing.assert_close(b(ids).logits, rb, atol=1e-5, rtol=0)
    assert not hasattr(a, "_kvtools_patch") and not hasattr(b, "_kvtools_patch")


def test_one_patched_model_serves_two_caches_interleaved(llama):
    """Policies keep no run-time state: two generations can interleave on one patched model."""
    ids1, ids2 = random_ids(1, 30, seed=3), random_ids(1, 30, seed=4)
    cfg = {"cache": {"method": "streamingllm", "n_sink": 2, "window": 8}}
    with kvtools.patch(llama, cfg) as p:
        alone1, _ = prefill_then_decode(llama, ids1, 20, cache=p.make_cache())
        alone2, _ = prefill_then_decode(llama, ids2, 20, cache=p.make_cache())
        c1, c2 = p.make_cache(), p.make_cache()
        o1 = llama(ids1[:, :20], past_key_values=c1)
        o2 = llama(ids2[:, :20], past_key_values=c2)
        l1, l2 = [o1.logits[:, -1]], [o2.logits[:, -1]]
        for t in range(20, 30):
            l1.append(llama(ids1[:, t : t + 1], past_key_values=c1).logits[:, -1])
            l2.append(llama(ids2[:, t : t + 1], past_key_values=c2).logits[:, -1])
    torch.testing.assert_close(torch.stack(l1, 1), alone1, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(l2, 1), alone2, atol=1e-5, rtol=0)


def test_chunked_prefill_full_equals_one_shot(family_model):
    _, model = family_model
    ids = random_ids(2, 50)
    ref = model(ids).logits
    with kvtools.patch(model, {"prefill": {"method": "dense", "chunk": 16}, "cache": "full"}) as p:
        cache = p.make_cache()
        got = model(ids, past_key_values=cache).logits
    assert cache.get_seq_length() == 50
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_streamers_receive_every_token(llama):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.chunks.append("end")

    ids = random_ids(1, 10)
    streamer = Collect()
    with kvtools.patch(llama, {"cache": {"method": "streamingllm", "n_sink": 2, "window": 6}}):
        out = llama.generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert streamer.chunks[-1] == "end"
    streamed = [t for c in streamer.chunks[1:-1] for t in c]  # first put is the prompt
    assert streamed == out[0, 10:].tolist()
