"""Retrieval-head calibration (``kvtools calibrate heads``): the copy test per head against a plain loop and
against HF's own attention weights, the needle's tokens, the aggregation, the TSV as a duo pattern, and the
command's bad-argument errors (before any model load, nothing written)."""

from __future__ import annotations

import pytest
import torch

import kvtools
import kvtools.models
from kvtools.calibration import heads as heads_mod
from kvtools.calibration import (
    copy_hits,
    kv_head_scores,
    needle_sample,
    retrieval_head_scores,
    write_pattern,
)
from kvtools.cli import main
from kvtools.methods.duo import load_pattern

from .conftest import random_ids, tiny_config, tiny_model
from .helpers import byte_tokenizer


def byte_llama():
    """The tiny Llama of the contract tests (6 query heads, 2 KV heads), with the byte tokenizer's vocabulary."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    return AutoModelForCausalLM.from_config(cfg).eval()


def loop_hits(q, k, ids, steps, tokens, needle, window=None):
    """The definition, one head and one step at a time: the argmax over the visible keys of q . k (the first
    one on a tie) is in the needle and holds the generated token."""
    h, t_n, _ = q.shape
    hk, n, _ = k.shape
    out = torch.zeros(h, t_n, dtype=torch.bool)
    for h_i in range(h):
        kv = h_i // (h // hk)
        for t in range(t_n):
            i = int(steps[t])
            best, best_j = None, None
            for j in range(n):
                if j > i or (window is not None and i - j >= window):
                    continue
                s = float(sum(float(a) * float(b) for a, b in zip(q[h_i, t], k[kv, j])))
                if best is None or s > best:
                    best, best_j = s, j
            out[h_i, t] = bool(needle[best_j]) and int(ids[best_j]) == int(tokens[t])
    return out


@pytest.mark.parametrize("window", [None, 7])
def test_copy_hits_match_a_plain_loop(window):
    g = torch.Generator().manual_seed(1)
    h, hk, n, t, d = 6, 2, 30, 8, 5
    q = torch.randn(h, t, d, generator=g)
    k = torch.randn(hk, n, d, generator=g)
    ids = torch.randint(0, 3, (n,), generator=g)  # 3 tokens: a head's argmax often holds the generated one
    steps = torch.arange(n - t, n)
    tokens = torch.randint(0, 3, (t,), generator=g)
    needle = torch.zeros(n, dtype=torch.bool)
    needle[5:20] = True
    got = copy_hits(q, k, ids, steps, tokens, needle, window)
    want = loop_hits(q, k, ids, steps, tokens, needle, window)
    assert torch.equal(got, want)
    assert 0 < int(want.sum()) < want.numel()  # both outcomes occur


def test_a_head_that_attends_to_the_needle_token_scores_one_and_the_others_zero():
    """One-hot keys: a query e_j attends to position j exactly. Head 0 points at the needle position holding
    each generated token; head 1 there at step 1 only, elsewhere at tokens outside the needle; head 2 at the
    needle but the wrong token; head 3 at the right token, outside the needle (an earlier copy of it)."""
    n, t = 24, 4
    k = torch.eye(n).unsqueeze(0).repeat(2, 1, 1)  # [Hk=2, L, D=L]
    ids = torch.arange(100, 100 + n)
    ids[3] = ids[12]  # a copy of a needle token outside the needle
    needle = torch.zeros(n, dtype=torch.bool)
    needle[10:16] = True
    src = [11, 12, 13, 14]  # the needle positions of the generated tokens
    tokens = ids[src].clone()
    steps = torch.arange(n - t, n)

    def point(pos):
        return 10.0 * torch.eye(n)[pos]  # [T, D]

    q = torch.stack([point(src), point([0, 12, 2, 3]), point([12, 13, 14, 11]), point([4, 3, 5, 6])])
    hits = copy_hits(q, k, ids, steps, tokens, needle)
    assert hits.tolist() == [[True] * 4, [False, True, False, False], [False] * 4, [False] * 4]
    assert torch.equal(hits, loop_hits(q, k, ids, steps, tokens, needle))
    score = hits.sum(-1).float().view(1, 4) / t
    assert kv_head_scores(score, 2, "max").tolist() == [[1.0, 0.0]]
    assert kv_head_scores(score, 2, "mean").tolist() == [[0.625, 0.0]]
    # a sliding window that no longer reaches the needle: head 0 can no longer copy
    assert not bool(copy_hits(q, k, ids, steps, tokens, needle, sliding_window=4)[0].any())


@pytest.mark.parametrize("family", ["llama", "mistral"])  # GQA; mistral: a 16-token window on every layer
def test_the_hook_sees_what_hf_attention_weights_show(family):
    """The hooked dense pass agrees with the argmax of HF's eager attention probabilities, layer by layer: a
    head whose argmax tokens are taken as the generated ones copies at every step, with the whole sequence as
    the needle; the model's greedy tokens at the steps are its logits' argmax."""
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    ids = random_ids(1, 40, seed=3)[0]
    steps = list(range(30, 40))
    with torch.no_grad():
        out = model(ids[None], output_attentions=True)
    top = torch.stack([a[0, :, steps].argmax(-1) for a in out.attentions])  # [layers, H, T]
    tokens = ids[top[1, 4]].tolist()  # layer 1, query head 4 (KV head 1) copies at every step
    hits, predicted = heads_mod._layer_hits(model, ids.tolist(), steps, tokens, (0, 40))
    want = ids[top] == torch.tensor(tokens)
    assert torch.equal(hits, want)
    assert bool(hits[1, 4].all()) and not bool(hits.all())
    assert predicted.tolist() == out.logits[0, steps].argmax(-1).tolist()
    hits, _ = heads_mod._layer_hits(model, ids.tolist(), steps, tokens, (0, 5))  # needle: the first 5 only
    assert torch.equal(hits, want & (top < 5))


def test_needle_sample_finds_the_needle_and_the_answer_tokens():
    tok = byte_tokenizer()
    s = needle_sample(tok, 700, 40, "t1")
    a, b = s.needle
    assert tok.decode(s.prompt[a:b]).strip().startswith("The special magic number for ")
    value = tok.decode(s.answer).strip().rstrip(".")
    assert value.isdigit() and len(value) == 7
    assert tok.decode(s.answer) == f" {value}." and tok.decode(s.prompt[a:b]).strip().endswith(f"is: {value}.")
    assert s.prompt[b - len(s.answer) : b] == s.answer  # the answer is the needle's own last tokens
    assert tok.decode(s.prompt).endswith("is:")  # the prefix is pre-filled; the answer follows it
    assert needle_sample(tok, 700, 40, "t1") == s and needle_sample(tok, 700, 40, "t2") != s


def test_scores_average_the_per_prompt_copy_fractions(monkeypatch):
    """The aggregation over prompts, with the per-layer copy test replaced by a known one."""
    model, tok = byte_llama(), byte_tokenizer()
    seen = []

    def fake(model, ids, steps, tokens, needle):
        i = len(seen)
        seen.append(len(tokens))
        hits = torch.zeros(2, 6, len(tokens), dtype=torch.bool)
        hits[0, i % 6, : i + 1] = True  # prompt i: layer 0, query head i % 6 copies i + 1 tokens
        return hits, torch.tensor(tokens)

    monkeypatch.setattr(heads_mod, "_layer_hits", fake)
    res = retrieval_head_scores(model, tok, lengths=(600, 700), samples=2, quiet=True)
    assert res.prompts == 4 and len(seen) == 4 and res.matched == 1.0
    want = torch.zeros(2, 6)
    for i, t in enumerate(seen):
        want[0, i % 6] += min(i + 1, t) / t / 4
    torch.testing.assert_close(res.query, want)
    torch.testing.assert_close(res.kv, want.view(2, 2, 3).amax(-1))


def test_tiny_model_scores_round_trip_as_a_duo_pattern(tmp_path):
    model, tok = byte_llama(), byte_tokenizer()
    res = retrieval_head_scores(model, tok, lengths=(500,), samples=2, quiet=True)
    assert res.query.shape == (2, 6) and res.kv.shape == (2, 2)
    assert bool(((res.kv >= 0) & (res.kv <= 1)).all())
    again = retrieval_head_scores(model, tok, lengths=(500,), samples=2, quiet=True)
    assert torch.equal(res.query, again.query)
    gates = res.kv + torch.tensor([[0.1, 0.7], [0.3, 0.2]])  # distinct values, so the binarisation is known
    path = write_pattern(gates.clamp(0, 1), tmp_path / "heads.tsv", header="test")
    pat = load_pattern(path)
    torch.testing.assert_close(pat, gates.clamp(0, 1), atol=1e-6, rtol=0)
    cfg = {"cache": {"method": "duo", "pattern": str(path), "sparsity": 0.75, "n_sink": 4, "window": 16}}
    with kvtools.patch(model, cfg) as p:
        keep = p.policy.retrieval
        assert int(keep.sum()) == 1 and bool(keep.view(-1)[pat.view(-1).argmax()])


def test_greedy_mode_counts_the_models_own_tokens():
    """On a random model the greedy answer is not the needle's: nothing matches, and the run is deterministic."""
    model, tok = byte_llama(), byte_tokenizer()
    res = retrieval_head_scores(model, tok, lengths=(500,), samples=1, greedy=True, quiet=True)
    assert res.greedy and res.matched == 0.0 and res.kv.shape == (2, 2)
    assert torch.equal(res.query, retrieval_head_scores(model, tok, lengths=(500,), samples=1, greedy=True,
                                                        quiet=True).query)


# ---------------------------------------------------------------- the command's bad arguments
@pytest.fixture
def model_dir(tmp_path):
    from transformers import LlamaConfig

    path = tmp_path / "model"
    LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=4096).save_pretrained(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*a, **k):
        pytest.fail("model loaded before the checks")

    monkeypatch.setattr(kvtools.models, "load_model", fail)
    monkeypatch.setattr(kvtools, "load_model", fail)


@pytest.mark.parametrize("extra, message", [
    (["--samples", "0"], "--samples: must be >= 1"),
    (["--random"], "--random: only for calibrate duo"),
    (["--lengths", "16"], "--lengths: [16] leave no room"),
    (["--lengths", "1k,"], "empty item in '1k,'"),
    (["--lengths", "8k"], "[8192] exceed the model's context of 4096"),
    (["--model", "{tmp}/missing.gguf"], "GGUF file not found"),
])
def test_calibrate_heads_bad_arguments_fail_before_loading(tmp_path, capsys, model_dir, no_model_load, extra,
                                                           message):
    out = tmp_path / "heads.tsv"
    argv = ["calibrate", "heads", "--model", str(model_dir), "--out", str(out), "--lengths", "1k",
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_calibrate_heads_out_is_a_folder(tmp_path, capsys, model_dir, no_model_load):
    assert main(["calibrate", "heads", "--model", str(model_dir), "--out", str(tmp_path)]) == 2
    assert "--out: " in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--samples", "4"], ["--greedy"], ["--reduce", "mean"]])
def test_heads_options_are_refused_for_duo(tmp_path, capsys, model_dir, no_model_load, option):
    out = tmp_path / "gates.tsv"
    assert main(["calibrate", "duo", "--model", str(model_dir), "--out", str(out), *option]) == 2
    assert "only for calibrate heads" in capsys.readouterr().err and not out.exists()


def test_calibrate_heads_writes_a_pattern_of_the_models_shape(tmp_path, capsys, monkeypatch):
    """The command end to end on a tiny model (the loader replaced): the file loads as a duo pattern of the
    model's shape, its header holds the command."""
    model, tok = byte_llama(), byte_tokenizer()
    monkeypatch.setattr(kvtools.models, "load_model", lambda name=None, **k: (model, tok))
    monkeypatch.setattr("kvtools.cli._check_model", lambda *a, **k: None)
    out = tmp_path / "heads.tsv"
    assert main(["calibrate", "heads", "--model", "tiny", "--out", str(out), "--lengths", "500", "--samples", "1",
                 "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out
    pat = load_pattern(out)
    assert pat.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert "kvtools calibrate heads --model tiny --lengths 500 --samples 1" in out.read_text()
