"""Span-aware selection (ChunkKV) for scored eviction: whole spans of consecutive tokens, ranked by their summed
scores, checked against a plain loop."""

import pytest
import torch

import kvtools
from kvtools.methods.scored import span_scores

from .conftest import random_ids, tiny_model

pytestmark = pytest.mark.mechanics


def test_span_scores_sum_each_run_of_candidates():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 23)
    cand = torch.rand(2, 3, 23) > 0.3
    got = span_scores(scores, cand, 4)
    for b in range(2):
        for h in range(3):
            slots = [j for j in range(23) if cand[b, h, j]]
            for start in range(0, len(slots), 4):
                members = slots[start:start + 4]
                total = sum(float(scores[b, h, j]) for j in members)
                for j in members:
                    assert got[b, h, j].item() == pytest.approx(total, rel=1e-6)
            for j in range(23):
                if not cand[b, h, j]:
                    assert got[b, h, j].item() == pytest.approx(float(scores[b, h, j]))


def reference_knorm_spans(keys: torch.Tensor, n: int, window: int, budget: int, span: int) -> list[list[int]]:
    """Per KV head of row 0: the window + the lowest-norm spans (summed -norm, ties: earlier), cut to the budget."""
    out = []
    for h in range(keys.shape[1]):
        norms = [-float(keys[0, h, j].norm()) for j in range(n - window)]
        spans = [list(range(s, min(s + span, n - window))) for s in range(0, n - window, span)]
        ranked = sorted(range(len(spans)), key=lambda i: (-sum(norms[j] for j in spans[i]), i))
        kept: list[int] = []
        for i in ranked:
            kept += spans[i][: budget - window - len(kept)]
        out.append(sorted(kept) + list(range(n - window, n)))
    return out


@pytest.mark.parametrize("span", [1, 3, 5])
def test_knorm_keeps_whole_lowest_norm_spans(span):
    model = tiny_model("llama")
    ids = random_ids(1, 50)
    n, window, budget = 50, 4, 21
    with torch.no_grad():
        with kvtools.patch(model, "full") as p:
            full = p.make_cache()
            model(input_ids=ids, past_key_values=full, use_cache=True)
        cfg = {"cache": {"method": "knorm", "budget": budget, "window": window, "span": span}}
        with kvtools.patch(model, cfg) as p:
            cache = p.make_cache()
            model(input_ids=ids, past_key_values=cache, use_cache=True)
    for layer, ref_layer in zip(cache.layers, full.layers):
        want = reference_knorm_spans(ref_layer.keys, n, window, budget, span)
        got = [layer.idx[0, h][layer.valid[0, h]].tolist() for h in range(layer.idx.shape[1])]
        assert got == want
