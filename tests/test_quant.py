"""KV quantisation (kvtools.quant): codes against a plain reference, slot operations on codes, the
full-precision ring, bytes, configs, and every cache method x quantisation through the contract's drivers."""

from __future__ import annotations

import pytest
import torch

import kvtools
from kvtools.cache import KVCache, Step
from kvtools.errors import ConfigError
from kvtools.methods import CACHE_POLICIES
from kvtools.quant import Codes, QuantizedSlotLayer, QuantParams

from .conftest import random_ids, tiny_model
from .test_contract import CALLS, CASES, PAD, _tensors, padded_batch, reference, run_calls

bnb_f = pytest.importorskip("bitsandbytes.functional")

HD = 32  # head size of the test models: 4-bit blocks need >= 32 channels
Q8 = {"bits": 8, "group": 32}
Q4 = {"bits": 4, "group": 32}


def step_of(n: int, b: int = 2, start: int = 0) -> Step:
    idx = torch.arange(start, start + n)
    return Step(valid=torch.ones(b, n, dtype=torch.bool), pos=idx.expand(b, n), idx=idx,
                prompt_real=torch.full((b,), n), end_of_prompt=True)


def keys_with_outliers(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(2, 2, n, 64, generator=g)
    k[..., 5] *= 25  # an outlier channel, as real keys have
    return k, torch.randn(2, 2, n, 64, generator=g)


# ---------------------------------------------------------------- codes vs a plain reference
@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_4bit_codes_are_the_nearest_code_book_entry_times_the_block_absmax(fmt):
    x = keys_with_outliers()[1]
    c = Codes.encode(QuantParams(bits=4, format=fmt, group=32), x)
    blocks = x.view(2, 2, 40, 2, 32)
    absmax = blocks.abs().amax(-1)
    torch.testing.assert_close(c.absmax.float(), absmax, rtol=1e-3, atol=0)  # float16 storage
    book = bnb_f.get_4bit_type(fmt, device="cpu")
    scaled = blocks / absmax[..., None]  # the codes are picked with the exact absmax; read with the stored one
    want = book[(scaled[..., None] - book).abs().argmin(-1)] * c.absmax.float()[..., None]
    got = c.decode().view_as(blocks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_8bit_is_within_a_tight_tolerance_of_full_precision():
    x = keys_with_outliers()[1]
    got = Codes.encode(QuantParams(bits=8, group=32), x).decode()
    err = (got - x).abs() / x.view(2, 2, 40, 2, 32).abs().amax(-1).repeat_interleave(32, -1)
    assert float(err.max()) < 0.01  # of the block's absmax
    assert float((got - x).abs().mean()) < 0.01 * float(x.abs().mean())


def test_channel_normalised_keys_have_a_smaller_error_than_per_token_blocks():
    k, v = keys_with_outliers()
    errs = {}
    for mode in ("channel", "token"):
        layer = QuantizedSlotLayer(QuantParams(bits=4, keys=mode, residual=0))
        layer.append(k, v, step_of(40))
        errs[mode] = float((layer.keys - k).abs().mean())
        # the channel scale is each (row, head, channel)'s largest magnitude over the call's real tokens
        if mode == "channel":
            torch.testing.assert_close(layer.kscale, k.abs().amax(2, keepdim=True))
    assert errs["channel"] < errs["token"] / 2


# ---------------------------------------------------------------- slot operations act on codes
def test_slot_operations_commute_with_quantisation():
    """Selecting, reordering and growing a quantised table gives what the same operation gives on its
    dequantised tensors: nothing is quantised twice."""
    k, v = keys_with_outliers()
    layer = QuantizedSlotLayer(QuantParams(bits=4, residual=8))
    layer.append(k, v, step_of(40))
    keys, values = layer.keys, layer.values
    keep = torch.rand(2, 2, 40, generator=torch.Generator().manual_seed(1)) < 0.5
    keep[..., -3:] = True
    layer.keep(keep)
    for got, full in ((layer.keys, keys), (layer.values, values)):
        for r in range(2):
            for h in range(2):
                n = int(keep[r, h].sum())
                assert torch.equal(got[r, h, :n], full[r, h, keep[r, h]])
    before = layer.keys
    layer.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.keys, before[[1, 0]])
    layer.grow(2)
    assert torch.equal(layer.keys[:, :, :-2], before[[1, 0]]) and layer.size == before.shape[2] + 2


def test_ring_holds_the_last_tokens_exactly_and_follows_writes():
    k, v = keys_with_outliers(48)
    layer = QuantizedSlotLayer(QuantParams(bits=4, residual=8))
    layer.append(k[:, :, :40], v[:, :, :40], step_of(40))
    assert torch.equal(layer.keys[:, :, 32:], k[:, :, 32:40]) and torch.equal(layer.values[:, :, 32:], v[:, :, 32:40])
    assert not torch.equal(layer.keys[:, :, :32], k[:, :, :32])
    # a decode step written over slot 3 (a ring's eviction): the new token reads exactly, the old is gone
    layer.write(3, k[:, :, 40:41], v[:, :, 40:41], step_of(1, start=40))
    assert torch.equal(layer.keys[:, :, 3], k[:, :, 40]) and torch.equal(layer.values[:, :, 3], v[:, :, 40])
    assert int(layer.idx[0, 0, 3]) == 40
    # token 33 is still in the ring (the last 8 stream tokens are 33..40): re-rotated keys replace its copy
    new = torch.randn(2, 2, 1, 64)
    at = torch.full((2, 2, 1), 33)
    layer.rewrite_keys(at, new, torch.zeros(2, 2, 1, dtype=torch.long))
    assert torch.equal(layer.keys[:, :, 33], new[:, :, 0])
    # token 32 left the ring when token 40 came: it reads from its codes
    assert not torch.equal(layer.keys[:, :, 32], k[:, :, 32])


# ---------------------------------------------------------------- bytes
@pytest.mark.parametrize("q", [dict(Q8), dict(Q4), {**Q4, "keys": "token", "residual": 0}])
def test_nbytes_is_what_the_codes_scales_and_ring_take(q):
    model = tiny_model("llama", head_dim=HD)
    n, b, hk, n_layers = 40, 2, 2, 2
    cfg = QuantParams(**q)
    with kvtools.patch(model, {"quant": q}) as p:
        _, cache = run_calls(model, random_ids(b, n), [n], cache=p.make_cache())
    per_token = cfg.bytes_per_token(HD)  # codes + float16 absmax of a key and a value
    meta = 1 + 4 + 4  # valid (bool), pos and idx (int32)
    ring = 2 * cfg.residual * HD * 4 + 0  # fp32 model: a key and a value per ring entry
    want = n_layers * (b * hk * (n * (per_token + meta) + ring) + cfg.residual * 8
                       + (b * hk * HD * 4 if cfg.keys == "channel" else 0))
    assert cache.nbytes() == want
    tensors = [t for layer in cache.layers for t in _tensors(vars(layer), set())]
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- configs
def test_quant_config_errors_and_round_trip():
    for bad, match in (({"bits": 3}, "quant.bits"), ({"group": 48}, "quant.group"), ({"bitz": 4}, "did you mean"),
                       ({"bits": True}, "quant.bits"), ({"residual": -1}, "quant.residual")):
        with pytest.raises(ConfigError, match=match):
            kvtools.load_config({"quant": bad})
    with pytest.raises(ConfigError, match="quant: must be a mapping"):
        kvtools.load_config({"quant": [4]})
    cfg = kvtools.load_config({"cache": {"method": "snapkv", "budget": 0.5}, "quant": {"bits": 4}})
    assert cfg.name == "snapkv+int4" and cfg.quant.bits == 4
    assert kvtools.load_config(cfg.to_dict()) == cfg
    assert "quant" not in kvtools.load_config("snapkv").to_dict()  # unquantised records are unchanged


def test_group_must_divide_the_head_size_at_patch():
    with pytest.raises(ConfigError, match="does not divide this model's head size 16"):
        kvtools.patch(tiny_model("llama"), {"quant": {"bits": 8, "group": 32}})


def test_a_users_empty_cache_takes_the_configs_storage():
    model = tiny_model("llama", head_dim=HD)
    ids = random_ids(1, 12)
    with kvtools.patch(model, {"quant": Q8}) as p:
        cache = KVCache()
        model(ids, past_key_values=cache)
        assert all(isinstance(layer, QuantizedSlotLayer) for layer in cache.layers)
        with pytest.raises(RuntimeError, match="cannot change"):
            cache.store(None)


# ---------------------------------------------------------------- every cache method x quantisation
#: quantisation is storage, the same for every family: one with full layers and GQA, one with sliding-window
#: layers and a single KV head (the contract suite runs every family unquantised)
@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request):
    return tiny_model(request.param, head_dim=HD)


COVER = [pytest.param(case.covering[0], id=m) for (s, m), case in CASES.items() if s == "cache" and case.covering]
SPARSE = [pytest.param(case.sparse, id=m) for (s, m), case in CASES.items() if s == "cache" and case.sparse]


def test_every_cache_method_is_covered():
    assert set(CACHE_POLICIES) <= {p.id for p in COVER}


@pytest.mark.parametrize("config", COVER)
def test_covering_with_int8_stays_close_to_unpatched_across_calls(model, config):
    """Prefill, decode, a chat turn, decode: int8 within a tight tolerance, int4 within a looser one, and
    int8 much closer than int4."""
    ids = random_ids(2, sum(CALLS), seed=1)
    want = reference(model, ids)
    err = {}
    for q in (Q8, Q4):
        with kvtools.patch(model, {**config, "quant": q}) as p:
            got, cache = run_calls(model, ids, cache=p.make_cache())
        err[q["bits"]] = float((got - want).abs().max())
        assert cache.get_seq_length() == ids.shape[1]
    assert err[8] < 0.03, err
    assert err[4] < 0.5, err
    assert err[8] < err[4] / 3, err


@pytest.mark.parametrize("config", COVER + SPARSE)
def test_quantised_left_padded_row_equals_row_alone(model, config):
    ids, am, a, b = padded_batch(sum(CALLS))
    cfg = {**config, "quant": Q4}
    with kvtools.patch(model, cfg) as p:
        both, _ = run_calls(model, ids, cache=p.make_cache(), am=am)
        alone0, _ = run_calls(model, a, cache=p.make_cache())
        alone1, _ = run_calls(model, b, [CALLS[0] - PAD, *CALLS[1:]], cache=p.make_cache())
    torch.testing.assert_close(both[0], alone0[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(both[1, PAD:], alone1[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", SPARSE)
def test_quantised_state_follows_batch_reordering(config):
    model = tiny_model("llama", head_dim=HD)
    case = next(c for c in CASES.values() if c.sparse is config)
    if not case.beams:
        pytest.skip("the method refuses beams up front")
    cfg = {**config, "quant": Q4}
    ids = random_ids(2, 52, seed=7)
    with kvtools.patch(model, cfg) as p:
        want, _ = run_calls(model, ids, [40] + [1] * 12, cache=p.make_cache())
        _, cache = run_calls(model, ids[:, :46], [40] + [1] * 6, cache=p.make_cache())
        swap = torch.tensor([1, 0])
        cache.reorder_cache(swap)
        got, _ = run_calls(model, ids[swap, 46:], [1] * 6, cache=cache)
    torch.testing.assert_close(got, want[swap, 46:], atol=1e-4, rtol=0)


def test_beam_search_runs_on_a_quantised_cache():
    model = tiny_model("llama", head_dim=HD)
    ids = random_ids(2, 20, seed=4)
    with kvtools.patch(model, {"cache": {"method": "snapkv", "budget": 0.5, "window": 4}, "quant": Q8}):
        out = model.generate(ids, num_beams=2, do_sample=False, max_new_tokens=6, pad_token_id=0)
    assert out.shape == (2, 26)
