"""Method state in the cache is typed: it follows batch reordering, or reordering refuses to run."""

from dataclasses import dataclass

import pytest
import torch

from kvtools.cache import KVCache, RowState, Step

pytestmark = pytest.mark.mechanics


@dataclass
class Tail(RowState):
    q: torch.Tensor  # [B, n]
    idx: torch.Tensor  # [n], the same for every row
    age: int = 0
    shared = ("idx",)


def _cache(b=3):
    cache = KVCache(1)
    layer = cache.layer(0)
    k = torch.arange(b, dtype=torch.float).view(b, 1, 1, 1).expand(b, 2, 4, 2).contiguous()
    layer.append(k, k, Step(valid=torch.ones(b, 4, dtype=torch.bool), pos=torch.arange(4).expand(b, 4),
                            idx=torch.arange(4), prompt_real=torch.full((b,), 4), end_of_prompt=True))
    return cache, layer


def test_row_state_follows_reordering_but_shared_tensors_stay():
    cache, layer = _cache()
    layer.state["tail"] = Tail(q=torch.tensor([[0.0], [1.0], [2.0]]), idx=torch.tensor([7, 8, 9]))
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    st = layer.state["tail"]
    assert st.q.flatten().tolist() == [2.0, 0.0, 1.0] and st.idx.tolist() == [7, 8, 9]
    assert layer.keys[:, 0, 0, 0].tolist() == [2.0, 0.0, 1.0]
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in (
        layer.keys, layer.values, layer.valid, layer.pos, layer.idx, st.q, st.idx))


@pytest.mark.parametrize("untyped", [{"sel": torch.zeros(3, 2)}, torch.zeros(3, 2), (torch.zeros(3, 2),),
                                     [torch.zeros(3, 2)]])
def test_untyped_state_refuses_reordering(untyped):
    cache, layer = _cache()
    layer.state["mine"] = untyped
    with pytest.raises(TypeError, match=r"layer.state\['mine'\] is a .* cannot follow batch reordering"):
        cache.reorder_cache(torch.tensor([2, 0, 1]))


@pytest.mark.parametrize("config", ["full", {"cache": {"method": "snapkv", "budget": 12, "window": 4, "kernel": 3}}])
def test_a_used_cache_pickles_and_continues_the_same(config):
    import pickle

    import kvtools

    from .conftest import random_ids, tiny_model

    model = tiny_model("llama")
    ids = random_ids(2, 25)
    with torch.no_grad(), kvtools.patch(model, config) as p:
        cache = p.make_cache()
        model(input_ids=ids[:, :24], past_key_values=cache, use_cache=True)
        twin = pickle.loads(pickle.dumps(cache))
        assert twin.slots() == cache.slots() and twin.nbytes() == cache.nbytes()
        a = model(input_ids=ids[:, 24:], past_key_values=cache, use_cache=True).logits
        b = model(input_ids=ids[:, 24:], past_key_values=twin, use_cache=True).logits
    assert torch.equal(a, b)


@torch.inference_mode()  # as generate and kvtools' own loops run (views there have no ._base)
def test_decode_appends_write_in_place_after_one_reallocation():
    """A one-token append reallocates the table once with spare slots after its end; the next ones write
    into them (no copy of the table per token) and the table reads exactly as concatenation would; a
    replaced table (a reorder) reallocates again, and nbytes counts the filled slots."""
    from kvtools.cache import _spare_slots

    cache, layer = _cache(b=2)
    want_k, want_v = layer.keys.clone(), layer.values.clone()

    def step(t):
        k = torch.full((2, 2, 1, 2), float(t))
        want = (torch.cat([want_k, k], 2), torch.cat([want_v, -k], 2))
        layer.append(k, -k, Step(valid=torch.ones(2, 1, dtype=torch.bool), pos=torch.full((2, 1), t),
                                 idx=torch.tensor([t]), prompt_real=torch.full((2,), 4), end_of_prompt=False))
        return want

    want_k, want_v = step(4)
    ptr = layer.keys.data_ptr()
    meta = [t.data_ptr() for t in (layer.valid, layer.pos, layer.idx)]  # the slots' metadata grows alike
    spare = _spare_slots(4)
    for t in range(5, 5 + spare):  # the first decode token reserved `spare` free slots after itself
        want_k, want_v = step(t)
        assert layer.keys.data_ptr() == ptr and torch.equal(layer.keys, want_k) and torch.equal(layer.values,
                                                                                                   want_v)
    assert [t.data_ptr() for t in (layer.valid, layer.pos, layer.idx)] == meta
    assert layer.idx[0, 0].tolist() == list(range(5 + spare)) and bool(layer.valid.all())
    assert layer.nbytes() == sum(t.numel() * t.element_size() for t in (
        layer.keys, layer.values, layer.valid, layer.pos, layer.idx))
    want_k, want_v = step(5 + spare)  # the buffer is full: a new one
    assert layer.keys.data_ptr() != ptr and torch.equal(layer.keys, want_k) and torch.equal(layer.values, want_v)
    cache.reorder_cache(torch.tensor([1, 0]))
    held = layer.keys.clone()
    want_k, want_v = want_k[[1, 0]], want_v[[1, 0]]
    want_k, want_v = step(6 + spare)
    assert torch.equal(layer.keys, want_k) and torch.equal(layer.keys[:, :, :-1], held)
