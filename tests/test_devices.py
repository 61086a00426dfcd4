"""A model whose layers live on different devices: each layer reads its step and keeps its slot table
on its own device.

On a CUDA machine the layers are split over the CPU and the GPU and every contract config must give
the one-device outputs. Without a GPU, torch still has a second device: ``meta`` (shapes only, no
values). A layer moved there sees meta hidden states, so any tensor of the step left on the input's
device fails the op that mixes them; methods that read values on the host (``.item()``) cannot run on
meta, so that check covers the methods that do not.
"""

from __future__ import annotations

import pytest
import torch

import kvtools
from kvtools.cache import Step

from .conftest import random_ids, tiny_model


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(y, device) for y in x)
    return x


def split_model(device: str, family: str = "llama"):
    """A tiny model whose last decoder layer, final norm and head live on ``device`` (the rest on the CPU),
    with hooks that move their inputs there, as accelerate's device_map dispatch does."""
    model = tiny_model(family)
    moved = [model.model.layers[-1], model.model.norm, model.lm_head]
    for m in moved:
        m.to(device)
        m.register_forward_pre_hook(
            lambda mod, args, kwargs: (_to(args, device), {k: _to(v, device) for k, v in kwargs.items()}),
            with_kwargs=True,
        )
    return model


@pytest.mark.mechanics
def test_step_on_another_device_is_one_copy_sharing_the_deferred_work():
    ids = torch.arange(5)
    step = Step(valid=torch.ones(2, 5, dtype=torch.bool), pos=ids.expand(2, 5), idx=ids,
                prompt_real=torch.tensor([5, 5]), end_of_prompt=True)
    assert step.on(torch.device("cpu")) is step
    meta = step.on(torch.device("meta"))
    assert meta is step.on(torch.device("meta"))
    assert {t.device.type for t in (meta.valid, meta.pos, meta.idx, meta.prompt_real)} == {"meta"}
    assert meta.deferred is step.deferred and (meta.first, meta.all_real) == (step.first, step.all_real)


@pytest.mark.mechanics
@pytest.mark.parametrize("config", ["full", "flexprefill", "hip"])
def test_layers_on_another_device_keep_their_slot_table_there(config):
    model = split_model("meta")
    ids = random_ids(1, 40)
    with kvtools.patch(model, config) as p:
        cache = p.make_cache()
        model(input_ids=ids, use_cache=True, **p.cache_kwargs(cache))
        out = model(input_ids=ids[:, :1], use_cache=True, **p.cache_kwargs(cache))
    assert out.logits.device.type == "meta"
    first, last = cache.layers[0], cache.layers[-1]
    assert first.keys.device.type == "cpu" and first.valid.device.type == "cpu"
    assert {t.device.type for t in (last.keys, last.values, last.valid, last.pos, last.idx)} == {"meta"}


CONTRACT = ["full", "streamingllm", "snapkv", "snapkv-0.25-pyramid", "knorm-0.25", "recycled", "retrieval",
            "flexprefill", "hip",
            {"name": "snapkv-adaptive-int8", "cache": {"method": "snapkv", "budget": 0.5, "layers": "adaptive"},
             "quant": {"bits": 8}},
            {"name": "snapkv-chunked", "prefill": {"method": "dense", "chunk": 32}, "cache": {"method": "snapkv", "budget": 0.5,
                                                                          "per_chunk": True}}]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split layers over cpu and cuda")
@pytest.mark.parametrize("config", CONTRACT, ids=lambda c: c if isinstance(c, str) else c["name"])
def test_layers_split_over_cpu_and_cuda_equal_one_device(config):
    ids = random_ids(2, 96)
    am = torch.ones_like(ids)
    am[1, :7] = 0  # left padding
    want_model = tiny_model("llama")
    with kvtools.patch(want_model, config) as p:
        want = want_model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0, **p.cache_kwargs(p.make_cache()))
    model = split_model("cuda")
    with kvtools.patch(model, config) as p:
        cache = p.make_cache()
        got = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0,
                             **p.cache_kwargs(cache))
    assert torch.equal(got.cpu(), want)
    assert cache.layers[0].valid.device.type == "cpu" and cache.layers[-1].valid.device.type == "cuda"


@pytest.mark.mechanics
def test_load_model_refuses_a_device_and_a_device_map_before_loading():
    with pytest.raises(kvtools.ConfigError, match="give one of them"):
        kvtools.load_model("no/such-model", device="cpu", device_map="auto")
