"""DuoAttention calibration: gates start at 1 (= full), the loss goes down, output is deterministic."""

import pytest
import torch

import kvtools
from kvtools.calibration import calibrate_duo, gated_attention, write_pattern
from kvtools.methods.duo import load_pattern

from .helpers import byte_tokenizer
from .test_eval_run import tiny_lm


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(), byte_tokenizer()


def test_gates_at_one_reproduce_the_full_model(tiny):
    model, _ = tiny
    ids = torch.randint(3, 200, (1, 64))
    ref = model(ids).logits
    n = model.config.num_hidden_layers
    with gated_attention(model, torch.ones(n, 2), n_sink=2, window=4):
        got = model(ids, use_cache=False).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    with gated_attention(model, torch.zeros(n, 2), n_sink=2, window=4):
        stream = model(ids, use_cache=False).logits
    assert (stream - ref).abs().max() > 1e-3  # gates at 0 really use the streaming mask
    assert torch.equal(model(ids).logits, ref)  # restored


def test_calibration_lowers_its_loss_and_is_deterministic(tiny, tmp_path):
    model, tok = tiny
    kw = dict(steps=12, lr=0.05, reg=0.05, lengths=(600,), n_sink=4, window=16, seed=3, quiet=True)
    gates, losses = calibrate_duo(model, tok, **kw)
    assert gates.shape == (2, 2) and bool(((gates >= 0) & (gates <= 1)).all())
    assert sum(losses[-3:]) / 3 < losses[0]
    again, _ = calibrate_duo(model, tok, **kw)
    assert torch.equal(gates, again)
    assert all(p.requires_grad for p in model.parameters())  # the model's own flags are restored
    path = write_pattern(gates, tmp_path / "p.tsv", header="test")
    torch.testing.assert_close(load_pattern(path), gates, atol=1e-6, rtol=0)
    cfg = {"cache": {"method": "duo", "pattern": str(path), "sparsity": 0.5, "n_sink": 4, "window": 16}}
    with kvtools.patch(model, cfg) as p:
        assert int(p.policy.retrieval.sum()) == 2
