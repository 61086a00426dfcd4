"""Per-layer budgets for scored eviction (PyramidKV's profile): the same total as the uniform budget, each
layer keeping what the method keeps with that layer's own budget."""

from fractions import Fraction

import pytest
import torch
from transformers import AutoModelForCausalLM

import kvtools
from kvtools.methods.scored import layer_weights

from .conftest import random_ids, tiny_config
from .helpers import compressed

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


def assert_layers_keep_alone(model, ids, base: dict, cache) -> None:
    """Each layer of ``cache`` keeps what the uniform ``base`` method keeps with that layer's slot count as its
    budget (prefill attention is dense, so a layer's queries and keys do not depend on what other layers keep)."""
    for layer_idx, b in enumerate(cache.slots()):
        alone = compressed(model, ids, {**base, "budget": b})
        assert torch.equal(cache.layers[layer_idx].idx, alone.layers[layer_idx].idx), layer_idx


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
    pyr, uni = compressed(model, ids, {**base, "layers": "pyramid", "beta": beta}), compressed(model, ids, base)
    assert pyr.slots() == want
    assert sum(pyr.slots()) == sum(uni.slots()) and pyr.nbytes() == uni.nbytes()
    # each layer keeps what the uniform method keeps with that layer's budget (prefill attention is dense, so a
    # layer's queries and keys do not depend on what other layers keep)
    assert_layers_keep_alone(model, ids, base, pyr)


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


# ---------------------------------------------------------------- layers: adaptive
def adaptive_reference(curves: list[list[float]], rest: list[int], floor: float) -> list[int]:
    """Plain loop: each layer its floor, then the largest remaining curve values over all layers one by one."""
    counts = [min(int(r * floor), len(c)) for r, c in zip(rest, curves)]
    left = sum(rest) - sum(counts)
    pool = sorted(((-v, li, r) for li, c in enumerate(curves) for r, v in enumerate(c) if r >= counts[li]))
    for _, li, _ in pool[:max(left, 0)]:
        counts[li] += 1
    return counts


def test_adaptive_counts_match_a_plain_greedy_reference():
    from kvtools.methods.scored import adaptive_counts

    g = torch.Generator().manual_seed(0)
    scores, cands = [], []
    for n_cand in (30, 12, 30, 25):
        s = torch.rand(2, 3, 40, generator=g) ** (1 + 3 * torch.rand(1, generator=g))  # layers spread differently
        c = torch.zeros(2, 3, 40, dtype=torch.bool)
        c[..., 5:5 + n_cand] = True
        scores.append(s)
        cands.append(c)
    rest = torch.tensor([[10, 8], [10, 8], [10, 8], [10, 8]])
    got = adaptive_counts(scores, cands, rest, 0.2)
    for b in range(2):
        curves = [sorted(s[b][:, c[b, 0]].double().sort(-1, descending=True).values.mean(0).tolist(), reverse=True)
                  for s, c in zip(scores, cands)]
        assert got[:, b].tolist() == adaptive_reference(curves, rest[:, b].tolist(), 0.2)
    assert got.sum(0).tolist() == rest.sum(0).tolist() and bool((got != rest).any())


def test_adaptive_keeps_the_uniform_total_and_each_layer_its_top_scores():
    model = deep_llama()
    ids = random_ids(1, 80)
    base = {"method": "snapkv", "budget": 24, "window": 4, "kernel": 3}
    ada, uni = compressed(model, ids, {**base, "layers": "adaptive"}), compressed(model, ids, base)
    assert sum(ada.slots()) == sum(uni.slots()) and ada.nbytes() == uni.nbytes()
    assert ada.slots() != uni.slots() and min(ada.slots()) >= 4 + int(20 * 0.2)
    assert_layers_keep_alone(model, ids, base, ada)


def test_adaptive_covering_budget_equals_unpatched_across_calls():
    from .test_contract import CALLS, reference, run_calls

    model = deep_llama()
    ids = random_ids(2, sum(CALLS), seed=1)
    cfg = {"cache": {"method": "snapkv", "budget": 1000, "window": 4, "kernel": 3, "layers": "adaptive", "span": 2}}
    with kvtools.patch(model, cfg) as p:
        got, _ = run_calls(model, ids, cache=p.make_cache())
    torch.testing.assert_close(got, reference(model, ids), atol=1e-4, rtol=0)


def test_adaptive_needs_attention_mass_scores():
    with pytest.raises(kvtools.ConfigError, match="cache.layers: adaptive.*knorm"):
        kvtools.load_config({"cache": {"method": "knorm", "budget": 0.25, "layers": "adaptive"}})


def test_adaptive_leaves_sliding_window_layers_their_uniform_budget():
    """qwen2 here: layer 0 attends globally, layer 1 slides (window 100, longer than the prompt, so nothing is
    trimmed): the sliding layer keeps its uniform budget instead of joining the split, the global layer the
    rest of the total (a sliding layer frees what its window no longer sees right after each call)."""
    from .conftest import tiny_config

    cfg = tiny_config("qwen2")
    cfg.sliding_window = 100
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = random_ids(1, 80)
    base = {"method": "snapkv", "budget": 24, "window": 4, "kernel": 3}
    ada, uni = compressed(model, ids, {**base, "layers": "adaptive"}), compressed(model, ids, base)
    assert ada.layers[1].valid.sum(-1).tolist() == [[24, 24]]
    assert torch.equal(ada.layers[1].idx, uni.layers[1].idx) and torch.equal(ada.layers[1].valid, uni.layers[1].valid)
    assert ada.layers[0].valid.sum(-1).tolist() == [[24, 24]]
