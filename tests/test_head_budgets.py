"""Per-head budgets for scored eviction (``heads: adaptive``, AdaKV): a layer's total kept as the uniform
budget's, spread over its KV heads by their scores, and stored without padding (:class:`PackedSlots`)."""

import pytest
import torch

import kvtools
from kvtools.cache import KVCache, SlotLayer, Step
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


def kv_bytes(cache) -> int:
    """Bytes of keys and values (or their codes and scales): the storage tensors but the int32 locations."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in layer._storage_tensors()
               if t.dtype != torch.int32)


def left_padded(b: int, n: int, pad: int):
    ids = random_ids(b, n)
    am = torch.ones_like(ids)
    am[1:, :pad] = 0
    return ids, am


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_adaptive_heads_keep_the_layer_total_in_the_uniform_bytes(family, batch):
    model = tiny_model(family)
    ids, am = left_padded(batch, 80, 10)  # row 1 (batch 2): 70 real tokens
    base = {"method": "snapkv", "budget": 24, "window": 4, "kernel": 3}
    ada = compressed(model, ids, {**base, "heads": "adaptive"}, am)
    uni = compressed(model, ids, base, am)
    counts = [layer.valid.sum(-1).tolist() for layer in ada.layers]  # [layer][row][head]
    assert all(sum(c) == 24 * len(c) for rows in counts for c in rows)  # each layer and row: Hk x budget slots
    assert any(len(set(c)) > 1 for rows in counts for c in rows)  # ... spread unevenly over its heads
    assert all(layer.packed for layer, rows in zip(ada.layers, counts) if any(len(set(c)) > 1 for c in rows))
    # keys + values take exactly the uniform budget's bytes; the slot metadata stays padded (counted too)
    assert kv_bytes(ada) == kv_bytes(uni)
    meta = sum(layer.valid.numel() * (1 + 4 + 4) + (layer._packed.loc.numel() * 4 if layer.packed else 0)
               for layer in ada.layers)
    assert ada.nbytes() == kv_bytes(ada) + meta
    # each head keeps what snapkv keeps with that head's count as a uniform budget (scores are per head, and
    # prefill attention is dense, so they do not depend on what is kept)
    for li, layer in enumerate(ada.layers):
        for r in range(batch):
            for h, c in enumerate(counts[li][r]):
                alone = compressed(model, ids, {**base, "budget": c}, am)
                assert kept(layer, r, h) == kept(alone.layers[li], r, h), (li, r, h)


def test_adaptive_heads_and_layers_compose():
    """``heads: adaptive`` with ``layers: adaptive``: the layers split the total, then each layer's share goes
    to its heads; every head keeps what uniform snapkv keeps with that head's count."""
    from .test_layer_budgets import LAYERS, deep_llama

    model = deep_llama()
    ids = random_ids(1, 80)
    base = {"method": "snapkv", "budget": 24, "window": 4, "kernel": 3}
    both = compressed(model, ids, {**base, "heads": "adaptive", "layers": "adaptive"})
    counts = [layer.valid.sum(-1)[0].tolist() for layer in both.layers]
    hk = len(counts[0])
    assert sum(map(sum, counts)) == 24 * hk * LAYERS
    assert len({sum(c) for c in counts}) > 1 and any(len(set(c)) > 1 for c in counts)  # uneven layers and heads
    for li, layer in enumerate(both.layers):
        for h, c in enumerate(counts[li]):
            alone = compressed(model, ids, {**base, "budget": c})
            assert kept(layer, 0, h) == kept(alone.layers[li], 0, h), (li, h)


def test_quantised_adaptive_heads_pack_codes_on_a_model():
    model = tiny_model("llama", head_dim=32)
    ids = random_ids(1, 80)
    base = {"method": "snapkv", "budget": 24, "window": 4, "kernel": 3}
    quant = {"bits": 4, "group": 32, "residual": 8}
    ada = compressed(model, ids, {**base, "heads": "adaptive"}, quant=quant)
    uni = compressed(model, ids, base, quant=quant)
    assert any(layer.packed for layer in ada.layers) and kv_bytes(ada) == kv_bytes(uni)
    for la, lu in zip(ada.layers, uni.layers):  # the heads' kept tokens read back as the uniform run's codes do
        for h in range(la.valid.shape[1]):
            same = sorted(set(kept(la, 0, h)) & set(kept(lu, 0, h)))
            ka = la.keys[0, h][la.valid[0, h]][[kept(la, 0, h).index(i) for i in same]]
            ku = lu.keys[0, h][lu.valid[0, h]][[kept(lu, 0, h).index(i) for i in same]]
            assert len(same) > 4 and torch.equal(ka, ku)


def test_packed_keys_and_values_read_as_the_padded_table(monkeypatch):
    ids = random_ids(2, 60)
    am = torch.ones_like(ids)
    am[1, :12] = 0
    model = tiny_model("llama")
    cfg = {"method": "snapkv", "budget": 20, "window": 4, "kernel": 3, "heads": "adaptive"}
    ada = compressed(model, ids, cfg, am)

    monkeypatch.setattr(KVCache, "_new_layer", lambda self: Padded())
    pad = compressed(model, ids, cfg, am)
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


def packable_pair(make, seed: int, b: int, hk: int, n: int, d: int):
    """A table that may pack and one that stays padded (``make(packable)``), a generator, and keys / values
    [B, Hk, n, D] to fill them."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(b, hk, n, d, generator=g), torch.randn(b, hk, n, d, generator=g)
    return (make(True), make(False)), g, k, v


def assert_same_table(a, p) -> None:
    """The packed table ``a`` reads as the padded ``p``: metadata, and keys / values in every valid slot."""
    assert torch.equal(a.valid, p.valid) and torch.equal(a.idx, p.idx) and torch.equal(a.pos, p.pos)
    m = a.valid[..., None]
    assert torch.equal(a.keys * m, p.keys * m) and torch.equal(a.values * m, p.values * m)


PAIRS = pytest.mark.parametrize("make", [lambda p: SlotLayer() if p else Padded(), quantised], ids=["plain", "int4"])


@PAIRS
def test_slot_operations_on_a_packed_table_equal_them_on_the_padded_one(make):
    b, hk, n, d = 2, 3, 12, 32
    tables, g, k, v = packable_pair(make, 1, b, hk, n, d)
    keep = torch.rand(b, hk, n, generator=g) < torch.tensor([0.9, 0.3, 0.6]).view(1, hk, 1)
    ops = [
        lambda t: t.append(k, v, random_step(b, n, 0)),
        lambda t: t.keep(keep, pack=True),
        lambda t: t.append(k[:, :, :1] + 1, v[:, :, :1] + 1, random_step(b, 1, n)),  # a decode step
        lambda t: t.map_rows(lambda x: x.index_select(0, torch.tensor([1, 0]))),  # beam reordering
        lambda t: t.keep(t.valid & (t.idx % 2 == 0), pack=True),  # a second compression
        lambda t: t.grow(2),
        lambda t: t.write(t.size - 1, k[:, :, :1] * 2, v[:, :, :1] * 2, random_step(b, 1, n + 1)),
        lambda t: t.rewrite_keys(torch.zeros(b, hk, 1, dtype=torch.long), torch.ones(b, hk, 1, d),
                                 torch.zeros(b, hk, 1, dtype=torch.long)),
    ]
    packed_after = []
    for op in ops:
        for t in tables:
            op(t)
        packed_after.append(tables[0].packed)
        assert_same_table(*tables)
    assert packed_after[1:6] == [True] * 5 and not any(packed_after[6:])  # packed until a write into the slots
    assert not tables[1].packed


@PAIRS
def test_dropping_rows_shrinks_a_packed_table_to_the_rows_left(make):
    b, hk, n, d = 2, 3, 16, 32
    tables, _, k, v = packable_pair(make, 2, b, hk, n, d)
    counts = torch.tensor([[12, 2, 8], [3, 1, 2]])  # row 0 keeps 22 slots, row 1 keeps 6
    keep = torch.arange(n) < counts[..., None]
    for t in tables:
        t.append(k, v, random_step(b, n, 0))
        t.keep(keep, pack=True)
    a, p = tables
    assert a.packed and a._packed.parts[0].shape[1] == 22
    for t in tables:
        t.batch_select_indices(torch.tensor([1]))
    assert a._packed.parts[0].shape[1] == 6 and a._packed.loc.shape[0] == 1
    assert_same_table(a, p)


def test_only_a_keep_that_asks_packs():
    """Uneven counts also arise without per-head budgets (a sliding window trimming a SnapKV selection each
    decode step): such a keep stays padded, and a keep of a packed table without ``pack`` unpacks it."""
    k = torch.randn(1, 2, 8, 4)
    layer = SlotLayer()
    layer.append(k, k, random_step(1, 8, 0))
    uneven = torch.arange(8) < torch.tensor([[8, 2]])[..., None]
    layer.keep(uneven)
    assert not layer.packed
    layer.keep(uneven & (torch.arange(8) < 6), pack=True)
    assert layer.packed
    layer.keep(layer.valid & (layer.idx > 0))
    assert not layer.packed and layer.keys.shape == (1, 2, 5, 4)


def test_setting_keys_of_a_packed_quantised_table_keeps_its_values():
    layer = quantised(True)
    k, v = torch.randn(2, 3, 12, 32), torch.randn(2, 3, 12, 32)
    layer.append(k, v, random_step(2, 12, 0))
    layer.keep(torch.arange(12) < torch.tensor([[12, 3, 3], [2, 2, 2]])[..., None], pack=True)
    assert layer.packed
    values = layer.values
    layer.keys = layer.keys  # what HF's CacheLayerMixin.offload / prefetch do
    assert not layer.packed and torch.equal(layer.values, values)


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
            t.keep(keep, pack=True)
        meta = p.valid.numel() * (1 + 4 + 4)
        fixed = sum(x.numel() * x.element_size() for x in (getattr(p, name, None) for name in
                    ("kscale", "ring_k", "ring_v", "ring_idx")) if x is not None)  # quantised: the fp ring
        assert p.nbytes() == meta + fixed + 160 * per_slot  # padded: 4 heads x 40 slots
        assert a.packed and a.nbytes() == meta + fixed + 52 * per_slot + 160 * 4  # 52 held + int32 locations


def test_adaptive_heads_need_attention_mass_scores():
    with pytest.raises(kvtools.ConfigError, match="cache.heads: adaptive.*knorm"):
        kvtools.load_config({"cache": {"method": "knorm", "budget": 0.25, "heads": "adaptive"}})
