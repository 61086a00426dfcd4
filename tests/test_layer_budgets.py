"""Per-layer budgets for scored eviction (PyramidKV's profile): the same total as the uniform budget, each
layer keeping what the method keeps with that layer's own budget."""

from fractions import Fraction

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvtools
from kvtools.methods.scored import layer_weights

from .conftest import random_ids, tiny_config

pytestmark = pytest.mark.mechanics

LAYERS = 6


def deep_llama():
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def pyramid_budgets(budget: int, window: int, layers: int, beta: float) -> list[int]:
    """PyramidKV written out with exact fractions: the first layer keeps 2 - 1/beta shares of the rest, the last
    1/beta, linear between; cumulative rounding down so the shares add up to (budget - window) * layers."""
    lo = Fraction(1) / Fraction(beta)
    w = [2 - lo - (2 - 2 * lo) * Fraction(i, layers - 1) for i in range(layers)]
    total = (budget - window) * layers
    cum = [sum(w[: i + 1]) / sum(w) for i in range(layers)]
    floors = [int(total * c) for c in cum]  # Fraction -> int rounds toward zero
    return [window + f - (floors[i - 1] if i else 0) for i, f in enumerate(floors)]


def test_weights_are_linear_with_mean_one():
    w = layer_weights(5, 4.0)
    assert torch.allclose(w.mean(), torch.tensor(1.0, dtype=torch.float64))
    assert w[0].item() == pytest.approx(2 - 0.25) and w[-1].item() == pytest.approx(0.25)
    assert torch.allclose(w.diff(), w.diff()[0].expand(4))


@pytest.mark.parametrize("method, extra", [("snapkv", {"kernel": 3}), ("knorm", {})])
def test_pyramid_keeps_each_layer_its_share_and_the_uniform_total(method, extra):
    model = deep_llama()
    ids = random_ids(1, 80)
    budget, window, beta = 24, 4, 5.0
    want = pyramid_budgets(budget, window, LAYERS, beta)
    assert sum(want) == budget * LAYERS and want == sorted(want, reverse=True) and want[0] > want[-1]
    base = {"method": method, "budget": budget, "window": window, **extra}
    with torch.no_grad():
        with kvtools.patch(model, {"cache": {**base, "layers": "pyramid", "beta": beta}}) as p:
            pyr = p.make_cache()
            model(input_ids=ids, past_key_values=pyr, use_cache=True)
        with kvtools.patch(model, {"cache": base}) as p:
            uni = p.make_cache()
            model(input_ids=ids, past_key_values=uni, use_cache=True)
    assert pyr.slots() == want
    assert sum(pyr.slots()) == sum(uni.slots()) and pyr.nbytes() == uni.nbytes()
    # each layer keeps what the uniform method keeps with that layer's budget (prefill attention is dense, so a
    # layer's queries and keys do not depend on what other layers keep)
    for layer_idx, b in enumerate(want):
        with torch.no_grad(), kvtools.patch(model, {"cache": {**base, "budget": b}}) as p:
            alone = p.make_cache()
            model(input_ids=ids, past_key_values=alone, use_cache=True)
        assert torch.equal(pyr.layers[layer_idx].idx, alone.layers[layer_idx].idx), layer_idx


def test_fractional_budget_splits_per_row():
    """A fraction resolves per row (left padding differs); every row's shares add up to its uniform total."""
    model = deep_llama()
    ids = random_ids(2, 60)
    am = torch.ones(2, 60, dtype=torch.long)
    am[1, :20] = 0
    cfg = {"cache": {"method": "knorm", "budget": 0.5, "window": 4, "layers": "pyramid", "beta": 3.0}}
    with torch.no_grad(), kvtools.patch(model, cfg) as p:
        cache = p.make_cache()
        model(input_ids=ids, attention_mask=am, past_key_values=cache, use_cache=True)
    kept = torch.stack([layer.valid[:, 0].sum(-1) for layer in cache.layers])  # [L, B]
    assert kept[:, 0].tolist() == pyramid_budgets(30, 4, LAYERS, 3.0)
    assert kept[:, 1].tolist() == pyramid_budgets(20, 4, LAYERS, 3.0)


def capped_budgets(budget: int, window: int, layers: int, beta: float, n_real: int) -> list[int]:
    """:func:`pyramid_budgets` when a layer's share would pass the tokens it holds: held at them, the rest split
    again over the other layers, in exact fractions."""
    lo = Fraction(1) / Fraction(beta)
    w = [2 - lo - (2 - 2 * lo) * Fraction(i, layers - 1) for i in range(layers)]
    total, cap = Fraction((budget - window) * layers), Fraction(n_real - window)
    capped: set[int] = set()
    while True:
        left = total - cap * len(capped)
        free = sum(w[i] for i in range(layers) if i not in capped)
        share = [cap if i in capped else left * w[i] / free for i in range(layers)]
        over = {i for i in range(layers) if i not in capped and share[i] > cap}
        if not over:
            break
        capped |= over
    cum = [int(sum(share[: i + 1])) for i in range(layers)]
    return [window + c - (cum[i - 1] if i else 0) for i, c in enumerate(cum)]


def test_shares_beyond_what_a_layer_holds_go_to_the_other_layers():
    model = deep_llama()
    ids = random_ids(1, 40)
    cfg = {"cache": {"method": "knorm", "budget": 0.75, "window": 4, "layers": "pyramid", "beta": 20.0}}
    want = capped_budgets(30, 4, LAYERS, 20.0, 40)
    assert want[0] == 40 and sum(want) == 30 * LAYERS  # the reference does cap here
    with torch.no_grad(), kvtools.patch(model, cfg) as p:
        cache = p.make_cache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    assert cache.slots() == want
