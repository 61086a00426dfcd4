"""FlexPrefill and HiP: exact when the budget covers everything, selections against plain references."""

from __future__ import annotations

import math

import pytest
import torch

import kvtools
from kvtools.methods.flexprefill import FlexPrefillParams
from kvtools.methods.hip import HipDecodeParams, HipPrefillParams
from kvtools.errors import ConfigError
from kvtools.methods.flexprefill import flexprefill_blocks
from kvtools.methods.hip import hip_prefill_blocks, hip_search

from .conftest import random_ids
from .helpers import assert_matches_unpatched, prefill_then_decode


# ---------------------------------------------------------------- exactness on real model code
@pytest.mark.mechanics
@pytest.mark.parametrize("prefill", [
    {"method": "flexprefill", "gamma": 1.0, "block_size": 16, "min_budget": 0, "backend": "torch"},
    {"method": "flexprefill", "gamma": 0.9, "block_size": 16, "min_budget": 4096, "backend": "torch"},
    {"method": "hip", "top_k": 4096, "block_q": 16, "block_k": 4, "n_sink": 4, "window": 8, "dense_layers": 0,
     "backend": "torch"},
])
def test_sparse_prefill_with_covering_budget_equals_unpatched(family_model, prefill):
    assert_matches_unpatched(family_model[1], {"prefill": prefill}, 70, 6)


@pytest.mark.mechanics
def test_hip_decode_with_covering_k_equals_unpatched(llama):
    cfg = {"prefill": {"method": "hip", "top_k": 1024, "block_q": 16, "block_k": 4, "dense_layers": 0},
           "decode": {"method": "hip", "top_k": 1024, "block_k": 4, "n_sink": 4, "window": 8, "dense_layers": 0}}
    assert_matches_unpatched(llama, cfg, 50, 12)


def test_sparse_prefill_really_sparse_and_left_padding_rows_stay_finite(llama):
    ids = random_ids(2, 200)
    am = torch.ones(2, 200, dtype=torch.long)
    am[1, :37] = 0
    cfg = {"prefill": {"method": "flexprefill", "gamma": 0.5, "block_size": 16, "min_budget": 16,
                       "backend": "torch"}}
    with kvtools.patch(llama, cfg) as p:
        out = llama(input_ids=ids, attention_mask=am, **p.cache_kwargs(p.make_cache()))
    dense = llama(input_ids=ids, attention_mask=am)
    assert torch.isfinite(out.logits).all()
    assert not torch.allclose(out.logits[0], dense.logits[0], atol=1e-4)  # the selection did drop blocks


def test_hip_decode_needs_full_cache_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="decode.method: 'hip'.*cache.method 'full'"):
        kvtools.load_config({"cache": {"method": "snapkv"}, "decode": {"method": "hip"}})
    with pytest.raises(ConfigError, match="prefill.gamma"):
        kvtools.load_config({"prefill": {"method": "flexprefill", "gamma": 1.5}})
    with pytest.raises(ConfigError, match="prefill.backend"):
        kvtools.load_config({"prefill": {"method": "hip", "backend": "cuda"}})


# ---------------------------------------------------------------- FlexPrefill selection
def reference_flexprefill(q, k, cfg: FlexPrefillParams, scale: float):
    """Plain per-head loops over the algorithm in METHODS.md (batch 1, no padding, q == k length)."""
    _, h, n, d = q.shape
    g = h // k.shape[1]
    bs = cfg.block_size
    nb = math.ceil(n / bs)
    masks, qaware = [], []
    for hh in range(h):
        qh, kh = q[0, hh].double(), k[0, hh // g].double()
        last = list(range((nb - 1) * bs, n))
        a = torch.zeros(len(last), n, dtype=torch.float64)
        for r, i in enumerate(last):
            a[r, : i + 1] = torch.softmax(qh[i] @ kh[: i + 1].T * scale, -1)
        vertical = a.mean(0)
        slash = torch.zeros(n, dtype=torch.float64)
        for r, i in enumerate(last):
            for j in range(i + 1):
                slash[i - j] += a[r, j] / len(last)
        kbm = torch.stack([kh[b * bs:(b + 1) * bs].mean(0) for b in range(nb)])
        abar = torch.softmax(qh[last].mean(0) @ kbm.T * scale, -1)
        vpool = torch.stack([vertical[b * bs:(b + 1) * bs].sum() for b in range(nb)])
        m = 0.5 * (abar + vpool)
        jsd = 0.5 * (abar * (abar / m).log()).nansum() + 0.5 * (vpool * (vpool / m).log()).nansum()
        qa = bool(jsd.clamp_min(0).sqrt() < cfg.tau)

        tscore = torch.zeros(nb, dtype=torch.float64)
        for t in range(nb):
            for delta in range(n):
                tscore[t] += slash[delta] * max(0, bs - abs(delta - t * bs)) / bs

        def budget(scores):
            srt = scores.sort(descending=True).values
            cnt = int((srt.cumsum(0) < cfg.gamma * srt.sum()).sum()) + 1
            return min(max(cnt, math.ceil(cfg.min_budget / bs)), nb)

        lo = math.ceil(cfg.min_budget / bs)
        nv, ns = (lo, lo) if qa else (budget(vpool), budget(tscore))
        vblocks = set(vpool.argsort(descending=True, stable=True)[:nv].tolist())
        sblocks = set(tscore.argsort(descending=True, stable=True)[:ns].tolist())
        mask = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            for kb in range(qb + 1):
                mask[qb, kb] = kb in vblocks or (qb - kb) in sblocks or kb == 0 or kb == qb
        if qa:
            qbm = torch.stack([qh[b * bs:(b + 1) * bs].mean(0) for b in range(nb)])
            est = torch.zeros(nb, nb, dtype=torch.float64)
            for qb in range(nb):
                est[qb, : qb + 1] = torch.softmax(qbm[qb] @ kbm[: qb + 1].T * scale, -1)
            flat = est.flatten()
            order = flat.argsort(descending=True)
            cum = flat[order].cumsum(0)
            take = int((cum < cfg.gamma * cum[-1]).sum()) + 1
            extra = torch.zeros(nb * nb, dtype=torch.bool)
            extra[order[:take]] = True
            mask |= extra.view(nb, nb) & torch.ones(nb, nb, dtype=torch.bool).tril()
        masks.append(mask)
        qaware.append(qa)
    return torch.stack(masks)[None], torch.tensor(qaware)[None]


@pytest.mark.parametrize("gamma,tau,min_budget", [(0.9, 0.1, 32), (0.6, 0.1, 0), (0.8, 0.9, 16)])
def test_flexprefill_selection_matches_plain_reference(gamma, tau, min_budget):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 150, 8, generator=gen) * 2
    k = torch.randn(1, 2, 150, 8, generator=gen) * 2
    cfg = FlexPrefillParams(gamma=gamma, tau=tau, block_size=16, min_budget=min_budget)
    mask, qa = flexprefill_blocks(q, k, None, cfg, 8 ** -0.5)
    ref_mask, ref_qa = reference_flexprefill(q, k, cfg, 8 ** -0.5)
    assert torch.equal(qa, ref_qa)
    assert torch.equal(mask, ref_mask)


def test_flexprefill_classifies_vertical_and_query_aware_heads():
    """Head 0: every query looks at three fixed key columns (vertical-slash). Head 1: keys come in
    blocks sharing a direction and queries prefer whole blocks: diffuse, block-level, query-specific."""
    n, d, bs = 512, 32, 64
    gen = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    q = torch.randn(1, 2, n, d, generator=gen) * 0.1
    k = torch.randn(1, 2, n, d, generator=gen) * 0.1
    q[0, 0] += 3 * u
    k[0, 0, [5, 200, 333]] += 30 * u
    dirs = torch.nn.functional.normalize(torch.randn(n // bs, d, generator=gen), dim=-1)
    k[0, 1] += 2 * dirs.repeat_interleave(bs, 0)
    q[0, 1] += 2 * dirs[torch.randint(0, n // bs, (n,), generator=gen).clamp(max=torch.arange(n) // bs)]
    q[0, 1, -bs:] = 2 * dirs[3] + 0.1 * torch.randn(bs, d, generator=gen)
    cfg = FlexPrefillParams(gamma=0.9, tau=0.1, block_size=bs, min_budget=bs)
    mask, qa = flexprefill_blocks(q, k, None, cfg, d ** -0.5)
    assert qa.tolist() == [[False, True]]
    # the blocks of the vertical columns (keys 5, 200, 333) for every query block that can see them
    assert mask[0, 0, :, 0].all() and mask[0, 0, 3:, 3].all() and mask[0, 0, 5:, 5].all()


# ---------------------------------------------------------------- HiP selection
def test_hip_tree_search_finds_planted_keys():
    """Three smooth bumps of high q.k planted in a long random key sequence: the search finds their peaks."""
    n, d, bk = 4096, 16, 8
    gen = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    q = 0.1 * torch.randn(1, 2, 32, d, generator=gen) + u
    k = 0.3 * torch.randn(1, 1, n, d, generator=gen)
    peaks = [700, 2100, 3500]
    pos = torch.arange(n).float()
    bump = sum(torch.exp(-((pos - p) / 64) ** 2) for p in peaks)
    k[0, 0] += 8 * bump[:, None] * u
    sel = hip_search(q, k, None, 16, 32, bk, torch.tensor([0]), torch.tensor([n // bk]))  # k = 128 keys
    units = set(sel[0, :, 0].flatten().tolist())
    for p in peaks:
        assert p // bk in units
    # every unit it kept scores above the typical background key
    scores = (q[0, 0] @ k[0, 0].T).amax(0).view(-1, bk).amax(-1)
    assert scores[sorted(units)].min() > scores.median() + 1


def test_hip_prefill_blocks_always_hold_sink_window_and_diagonal():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 512, 8, generator=gen), torch.randn(1, 2, 512, 8, generator=gen)
    cfg = HipPrefillParams(top_k=64, block_q=32, block_k=16, n_sink=32, window=64)
    mask = hip_prefill_blocks(q, k, None, cfg)
    nq, nk = mask.shape[-2:]
    for qb in range(nq):
        first, last = qb * 32, qb * 32 + 31
        want = {kb for kb in range(nk) if kb * 16 < 32 or ((kb + 1) * 16 > first - 64 and kb * 16 <= last)}
        got = set(mask[0, 0, qb].nonzero().flatten().tolist())
        assert want <= got
        assert len(got - want) <= 64 // 16  # at most k / block_k searched units
        assert max(got) * 16 <= last  # causal


def test_hip_decode_refreshes_on_schedule(llama):
    ids = random_ids(1, 120 + 20)
    cfg = {"decode": {"method": "hip", "top_k": 16, "block_k": 4, "n_sink": 4, "window": 16, "dense_layers": 0,
                      "refresh_interval": 6}}
    with kvtools.patch(llama, cfg) as p:
        _, cache = prefill_then_decode(llama, ids, 120, cache=p.make_cache())
    st = cache.layers[0].state["hip"]
    assert st.age == 20
    assert st.refreshed == math.ceil(20 / 6)  # steps 0, 6, 12, 18


def test_hip_decode_attends_only_to_sink_window_and_selection(llama):
    """With a fixed selection the decode output equals dense attention masked to those keys."""
    from kvtools.methods.base import LayerInfo
    from kvtools.methods.hip import HipDecodeMethod
    from kvtools.cache import SlotLayer, Step

    gen = torch.Generator().manual_seed(4)
    n, d = 300, 8
    keys, values = torch.randn(1, 2, n, d, generator=gen), torch.randn(1, 2, n, d, generator=gen)
    q = torch.randn(1, 4, 1, d, generator=gen)
    layer = SlotLayer()
    layer.keys, layer.values = keys, values
    layer.valid = torch.ones(1, 2, n, dtype=torch.bool)
    layer.idx = torch.arange(n).expand(1, 2, n)
    layer.pos = layer.idx.clone()
    step = Step(valid=torch.ones(1, 1, dtype=torch.bool), pos=torch.tensor([[n - 1]]), idx=torch.tensor([n - 1]),
                prompt_real=torch.tensor([1]), end_of_prompt=True)
    cfg = HipDecodeParams(top_k=32, block_k=8, n_sink=8, window=40, dense_layers=0)
    info = LayerInfo(0, d ** -0.5, torch.ones(1), None)
    out = HipDecodeMethod(cfg).attend(layer, q, step, info)
    sel = layer.state["hip"].sel  # [1, H, G]
    for h in range(4):
        allowed = torch.zeros(n, dtype=torch.bool)
        allowed[:8] = True
        allowed[n - 40:] = True
        for u in sel[0, h].tolist():
            allowed[u * 8:(u + 1) * 8] = True
        s = (q[0, h, 0] @ keys[0, h // 2].T) * d ** -0.5
        ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ values[0, h // 2]
        torch.testing.assert_close(out[0, h, 0], ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- chunked sparse prefill
def _token_mask(block_mask: torch.Tensor, lq: int, lk: int, bs: int) -> torch.Tensor:
    """[B, H, NQB, NKB] blocks of queries sitting at the last ``lq`` of ``lk`` keys -> [B, H, lq, lk] token mask,
    causal."""
    qi = torch.arange(lk - lq, lk)
    tok = block_mask.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :lq, :lk]
    return tok & (qi[:, None] >= torch.arange(lk)[None, :])


def test_chunked_flexprefill_runs_each_chunk_over_the_keys_so_far(llama):
    """``prefill.chunk`` with a sparse method: each chunk call's queries select their blocks over every key so
    far (queries at the end of the keys), and the layer's output is plain attention under that selection."""
    from kvtools.methods.flexprefill import FlexPrefillMethod

    cfg = {"prefill": {"method": "flexprefill", "gamma": 0.5, "block_size": 16, "min_budget": 16, "chunk": 48,
                       "backend": "torch"}}
    params = kvtools.load_config(cfg).prefill
    calls = []
    orig = FlexPrefillMethod.attend

    def record(self, q, k, v, kv_valid, info):
        out = orig(self, q, k, v, kv_valid, info)
        calls.append((q, k, v, out, info.scale))
        return out

    ids = random_ids(1, 130)
    FlexPrefillMethod.attend = record
    try:
        with kvtools.patch(llama, cfg) as p, torch.no_grad():
            chunked = llama(input_ids=ids, **p.cache_kwargs(p.make_cache())).logits
    finally:
        FlexPrefillMethod.attend = orig
    n_layers = llama.config.num_hidden_layers
    # chunks end-aligned: [0, 34), [34, 82), [82, 130), each (every layer) over every key so far
    shapes = [(c[0].shape[2], c[1].shape[2]) for c in calls]
    assert shapes == [(34, 34)] * n_layers + [(48, 82)] * n_layers + [(48, 130)] * n_layers
    sparse = False
    for q, k, v, out, scale in calls:
        lq, lk = q.shape[2], k.shape[2]
        blocks, _ = flexprefill_blocks(q, k, None, params, scale)
        tok = _token_mask(blocks, lq, lk, 16)
        g = q.shape[1] // k.shape[1]
        s = q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2) * scale
        ref = torch.softmax(s.masked_fill(~tok, float("-inf")), -1) @ v.double().repeat_interleave(g, 1)
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
        causal = _token_mask(torch.ones_like(blocks), lq, lk, 16)
        sparse |= bool((tok != causal).any())
    assert sparse  # the selection dropped blocks somewhere
    with torch.no_grad():
        dense = llama(input_ids=ids).logits
    assert not torch.allclose(chunked, dense, atol=1e-4)
