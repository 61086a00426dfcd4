"""Per-head budgets for scored eviction (``heads: adaptive``, AdaKV): a layer's total kept as the uniform
budget's, spread over its KV heads by their scores, and stored without padding (:class:`PackedSlots`)."""

import pytest
import torch

import kvtools
from kvtools.cache import SlotLayer, Step
from kvtools.methods.common import keep_first_last
from kvtools.methods.scored import head_budgets

from .conftest import random_ids, tiny_model
from .helpers import compressed
from .test_layer_budgets import adaptive_reference

pytestmark = pytest.mark.mechanics


def test_head_budgets_match_a_plain_greedy_reference():
    g = torch.Generator().manual_seed(0)
    b, hk, s, w = 2, 4, 50, 4
    # heads whose scores are spread differently: a flat head wants more slots than a peaked one
    scores = torch.rand(b, hk, s, generator=g) ** torch.tensor([1.0, 4.0, 8.0, 2.0]).view(1, hk, 1)
    call = torch.ones(b, hk, s, dtype=torch.bool)
    call[1, :, :10] = False  # row 1: a shorter call (left padding)
    protect = keep_first_last(call, 0, w)
    budget = torch.tensor([16, 12])
    got = head_budgets(scores, call, protect, budget, 0.2)
    for r in range(b):
        cand = call[r] & ~protect[r]
        curves = [sorted(scores[r, h][cand[h]].double().tolist(), reverse=True) for h in range(hk)]
        rest = [int(budget[r]) - w] * hk
        want = [w + c for c in adaptive_reference(curves, rest, 0.2)]
        assert got[r].tolist() == want
        assert sum(want) == hk * int(budget[r]) and len(set(want)) > 1


def test_a_call_that_fits_keeps_every_slot():
    scores = torch.rand(1, 2, 10)
    call = torch.ones(1, 2, 10, dtype=torch.bool)
    got = head_budgets(scores, call, keep_first_last(call, 0, 2), torch.tensor([12]), 0.2)
    assert got.tolist() == [[10, 10]]


def kept(layer, r, h):
    return sorted(layer.idx[r, h][layer.valid[r, h]].tolist())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_adaptive_heads_keep_the_layer_total_in_the_uniform_bytes(family):
    model = tiny_model(family)
    ids = random_ids(1, 80)
    base = {"method": "snapkv", "budget": 24, "window": 4, "kernel": 3}
    ada = compressed(model, ids, {**base, "heads": "adaptive"})
    uni = compressed(model, ids, base)
    counts = [layer.valid.sum(-1)[0].tolist() for layer in ada.layers]
    assert all(sum(c) == 24 * len(c) for c in counts)  # each layer: Hk x budget slots
    assert any(len(set(c)) > 1 for c in counts)  # ... spread unevenly over its heads
    assert all(layer.packed for layer, c in zip(ada.layers, counts) if len(set(c)) > 1)
    # keys + values take exactly the uniform budget's bytes; the slot metadata stays padded (counted too)
    kv = [sum(t.numel() * t.element_size() for t in layer._storage_tensors() if t.dtype.is_floating_point)
          for layer in (*ada.layers, *uni.layers)]
    assert sum(kv[:len(ada.layers)]) == sum(kv[len(ada.layers):])
    meta = sum(layer.valid.numel() * (1 + 8 + 8) + layer._packed.loc.numel() * 4 for layer in ada.layers
               if layer.packed) + sum(layer.valid.numel() * 17 for layer in ada.layers if not layer.packed)
    assert ada.nbytes() == sum(kv[:len(ada.layers)]) + meta
    # each head keeps what snapkv keeps with that head's count as a uniform budget (scores are per head, and
    # prefill attention is dense, so they do not depend on what is kept)
    for li, layer in enumerate(ada.layers):
        for h, c in enumerate(counts[li]):
            alone = compressed(model, ids, {**base, "budget": c})
            assert kept(layer, 0, h) == kept(alone.layers[li], 0, h), (li, h)


def test_packed_keys_and_values_read_as_the_padded_table():
    ids = random_ids(2, 60)
    am = torch.ones_like(ids)
    am[1, :12] = 0
    model = tiny_model("llama")
    cfg = {"method": "snapkv", "budget": 20, "window": 4, "kernel": 3, "heads": "adaptive"}
    ada = compressed(model, ids, cfg, am)

    import kvtools.cache as kc

    orig = kc.KVCache._new_layer
    kc.KVCache._new_layer = lambda self: Padded()
    try:
        pad = compressed(model, ids, cfg, am)
    finally:
        kc.KVCache._new_layer = orig
    assert any(layer.packed for layer in ada.layers) and not any(layer.packed for layer in pad.layers)
    for a, p in zip(ada.layers, pad.layers):
        assert torch.equal(a.valid, p.valid) and torch.equal(a.idx, p.idx)
        v = a.valid[..., None]
        assert torch.equal(a.keys * v, p.keys * v) and torch.equal(a.values * v, p.values * v)
    assert ada.nbytes() < pad.nbytes()


def random_step(b, n, first, valid=None):
    return Step(valid=torch.ones(b, n, dtype=torch.bool) if valid is None else valid,
                pos=torch.arange(first, first + n).expand(b, n), idx=torch.arange(first, first + n),
                prompt_real=torch.full((b,), n), end_of_prompt=True)


class Padded(SlotLayer):
    packable = False


def quantised(packable: bool):
    from kvtools.quant import QuantizedSlotLayer, QuantParams

    layer = QuantizedSlotLayer(QuantParams(bits=4, group=32, residual=4))
    layer.packable = packable
    return layer


@pytest.mark.parametrize("make", [lambda p: SlotLayer() if p else Padded(), quantised], ids=["plain", "int4"])
def test_slot_operations_on_a_packed_table_equal_them_on_the_padded_one(make):
    g = torch.Generator().manual_seed(1)
    b, hk, n, d = 2, 3, 12, 32
    tables = (make(True), make(False))
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    keep = torch.rand(b, hk, n, generator=g) < torch.tensor([0.9, 0.3, 0.6]).view(1, hk, 1)
    ops = [
        lambda t: t.append(k, v, random_step(b, n, 0)),
        lambda t: t.keep(keep),
        lambda t: t.append(k[:, :, :1] + 1, v[:, :, :1] + 1, random_step(b, 1, n)),  # a decode step
        lambda t: t.map_rows(lambda x: x.index_select(0, torch.tensor([1, 0]))),  # beam reordering
        lambda t: t.keep(t.valid & (t.idx % 2 == 0)),  # a second compression
        lambda t: t.rewrite_keys(torch.zeros(b, hk, 1, dtype=torch.long), torch.ones(b, hk, 1, d),
                                 torch.zeros(b, hk, 1, dtype=torch.long)),
        lambda t: t.grow(2),
        lambda t: t.write(t.size - 1, k[:, :, :1] * 2, v[:, :, :1] * 2, random_step(b, 1, n + 1)),
    ]
    packed_after = []
    for op in ops:
        for t in tables:
            op(t)
        a, p = tables
        packed_after.append(a.packed)
        assert torch.equal(a.valid, p.valid) and torch.equal(a.idx, p.idx) and torch.equal(a.pos, p.pos)
        m = a.valid[..., None]
        assert torch.equal(a.keys * m, p.keys * m) and torch.equal(a.values * m, p.values * m)
    assert packed_after[1:5] == [True] * 4  # packed from the uneven keep until a write into the slots
    assert not tables[1].packed


def test_a_packed_table_holds_fewer_bytes_than_the_padded_one():
    """Packed, a table holds its kept slots' keys and values (or codes and scales) and an int32 location per
    slot of the padded metadata: fewer bytes than the padded table when its heads keep different counts."""
    g = torch.Generator().manual_seed(2)
    b, hk, n, d = 1, 4, 40, 32
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    counts = torch.tensor([[40, 4, 4, 4]])  # one head keeps everything, the others a tenth
    keep = torch.arange(n) < counts[..., None]
    # bytes per (slot, head) of keys + values: fp32, or 4-bit codes + a float16 absmax per 32 channels
    for make, per_slot in ((lambda p: SlotLayer() if p else Padded(), 2 * d * 4), (quantised, 2 * (d // 2 + 2))):
        a, p = make(True), make(False)
        for t in (a, p):
            t.append(k, v, random_step(b, n, 0))
            t.keep(keep)
        meta = p.valid.numel() * (1 + 8 + 8)
        fixed = sum(x.numel() * x.element_size() for x in (getattr(p, name, None) for name in
                    ("kscale", "ring_k", "ring_v", "ring_idx")) if x is not None)  # quantised: the fp ring
        assert p.nbytes() == meta + fixed + 160 * per_slot  # padded: 4 heads x 40 slots
        assert a.packed and a.nbytes() == meta + fixed + 52 * per_slot + 160 * 4  # 52 held + int32 locations


def test_adaptive_heads_need_attention_mass_scores():
    with pytest.raises(kvtools.ConfigError, match="cache.heads: adaptive.*knorm"):
        kvtools.load_config({"cache": {"method": "knorm", "budget": 0.25, "heads": "adaptive"}})
