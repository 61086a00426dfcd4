"""A forward plans from what the host knows (``Step.first/all_real``, ``SlotLayer.layout``): on an unpadded
full cache no attention layer reads a device tensor back (on CUDA each read is a sync that stalls the queue)."""

import pytest
import torch

import kvtools

from .conftest import random_ids, tiny_model

pytestmark = pytest.mark.mechanics


class ReadCounter:
    """Counts tensor-to-host conversions (bool(), int(), float(), .item(), .tolist(), .cpu(), .nonzero(), which
    waits for its output size) while inside attention, and the attention calls."""

    def __init__(self, monkeypatch):
        self.n, self.calls, self.inside = 0, 0, False
        for name in ("__bool__", "__int__", "__float__", "item", "tolist", "cpu", "nonzero"):
            orig = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(orig))

    def _counting(self, orig):
        def wrapped(t, *a, **k):
            if self.inside:
                self.n += 1
            return orig(t, *a, **k)
        return wrapped

    def wrap(self, policy):
        orig = policy.attend

        def attend(*a, **k):
            self.calls += 1
            self.inside = True
            try:
                return orig(*a, **k)
            finally:
                self.inside = False

        policy.attend = attend


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_cache_prefill_and_decode_read_nothing_back(family, monkeypatch):
    model = tiny_model(family)
    ids = random_ids(2, 30)
    with kvtools.patch(model, "full") as p:
        counter = ReadCounter(monkeypatch)
        counter.wrap(p.policy)
        cache = p.make_cache()
        with torch.no_grad():
            model(input_ids=ids[:, :24], past_key_values=cache, use_cache=True)  # a fresh prompt
            for i in range(24, 30):  # decode steps
                model(input_ids=ids[:, i:i + 1], past_key_values=cache, use_cache=True)
    assert counter.calls == model.config.num_hidden_layers * 7  # the counter watched every layer of every call
    assert counter.n == 0, f"{counter.n} device reads inside attention"


def test_the_counter_sees_reads_when_the_host_does_not_know(monkeypatch):
    """The same run after an eviction (the layout is unknown) does read: the counter is not blind."""
    model = tiny_model("llama")
    ids = random_ids(1, 30)
    with kvtools.patch(model, {"cache": {"method": "snapkv", "budget": 8, "window": 4, "kernel": 3}}) as p:
        counter = ReadCounter(monkeypatch)
        counter.wrap(p.policy)
        cache = p.make_cache()
        with torch.no_grad():
            model(input_ids=ids[:, :24], past_key_values=cache, use_cache=True)
            model(input_ids=ids[:, 24:25], past_key_values=cache, use_cache=True)
    assert counter.calls == model.config.num_hidden_layers * 2 and counter.n > 0
