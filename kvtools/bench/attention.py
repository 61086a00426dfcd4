"""Attention-only prefill speed: sparse prefill methods vs dense SDPA, side by side in one process.

Inputs are either one attention layer of a real architecture's shape (``--shape``), on
queries and keys with the structure real attention has (a strong sink, locality from a
slowly varying shared component, a few heavy key columns, noise), or (``--model``) the
real rotated q/k/v of a model's full-attention layers, captured from one dense pass over a
needle-in-a-haystack prompt of the longest length (a shorter length is that prompt's
prefix: causal attention makes it the same as a shorter prompt). Per length, in this order:
dense SDPA (causal, GQA), then every (method, backend): the method's block selection and
the block-sparse attention, timed separately (median of ``repeats``). Reported: seconds,
speedup vs dense, fraction of causal blocks computed (density), ``1 / density`` (the
limit a perfect kernel reaches), and the output's relative error vs dense. With several
captured layers, times and blocks are summed over the layers and the error is averaged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..attention.block_sparse import BlockLayout, block_sparse_attention, causal_block_count, causal_block_mask
from ..config import load_config
from ..methods.flexprefill import FlexPrefillParams
from ..methods.hip import HipPrefillParams
from ..errors import ConfigError
from ..models import SHAPES
from .timing import median_time


def structured_qkv(length: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """q [1, H, L, D], k, v [1, Hk, L, D] whose attention has a sink, locality and a few heavy columns."""
    g = torch.Generator().manual_seed(seed)
    d = head_dim
    q = 0.5 * torch.randn(1, heads, length, d, generator=g)
    k = 0.5 * torch.randn(1, kv_heads, length, d, generator=g)
    v = torch.randn(1, kv_heads, length, d, generator=g)
    # locality: a smooth random walk shared by queries and keys (q_i . k_j large when i ~ j)
    steps = torch.randn(kv_heads, length // 64 + 2, d, generator=g)
    walk = torch.nn.functional.interpolate(steps.transpose(1, 2), size=length, mode="linear",
                                           align_corners=False).transpose(1, 2)  # [Hk, L, D]
    walk = torch.nn.functional.normalize(walk, dim=-1) * 9
    rep = heads // kv_heads
    q += walk.repeat_interleave(rep, 0)[None]
    k += walk[None]
    # a sink and a few heavy columns every query attends to
    u = torch.nn.functional.normalize(torch.randn(kv_heads, d, generator=g), dim=-1)
    q += 2 * u.repeat_interleave(rep, 0)[None, :, None, :]
    cols = torch.randint(1, length, (kv_heads, 8), generator=g)
    k[0, :, 0] += 40 * u
    for h in range(kv_heads):
        k[0, h, cols[h]] += 30 * u[h]
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


@dataclass
class AttnRow:
    length: int
    method: str
    backend: str
    select_s: float
    attn_s: float
    total_s: float
    dense_s: float
    speedup: float
    attn_speedup: float
    density: float
    limit: float
    rel_err: float
    shape: str
    device: str


def _selection(cfg, q, k, scale):
    from ..methods.flexprefill import flexprefill_blocks
    from ..methods.hip import hip_prefill_blocks

    if isinstance(cfg, FlexPrefillParams):
        mask, _ = flexprefill_blocks(q, k, None, cfg, scale)
        return BlockLayout.from_mask(mask, cfg.block_size, cfg.block_size)
    if isinstance(cfg, HipPrefillParams):
        mask = hip_prefill_blocks(q, k, None, cfg)
        return BlockLayout.from_mask(mask, cfg.block_q, cfg.block_k)
    raise ConfigError(f"bench-attention: '{cfg.method}' is not a sparse prefill method (flexprefill, hip)")


def _model_layers(model_name: str, length: int, layers: list[int] | None, seed: int):
    """Real q/k/v of ``layers`` (default: every full-attention layer, at most 4 evenly spaced) from one
    dense pass over a NIAH prompt of ``length`` tokens; returns (label, captured layers, tokens)."""
    from ..eval.haystack import build_niah_prompt
    from ..models import canonical_name, load_model
    from ..patching import capture_qkv

    model, tok = load_model(model_name)
    n_layers = model.config.num_hidden_layers
    if layers is not None and any(not 0 <= i < n_layers for i in layers):
        raise ConfigError(f"--layers: the model has layers 0..{n_layers - 1}, got {layers}")
    prompt = build_niah_prompt(tok, length, 50, seed=seed, max_new_tokens=16)
    ids = torch.tensor([prompt.input_ids])
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * n_layers
    full = [i for i, t in enumerate(types) if t != "sliding_attention"]
    if layers is None:
        layers = full if len(full) <= 4 else [full[round(j * (len(full) - 1) / 3)] for j in range(4)]
    bad = [i for i in layers if i not in full]
    if bad:
        raise ConfigError(f"--layers {bad}: sliding-window layers; sparse prefill applies to full-attention layers "
                          f"({full})")
    want = set(layers)
    got = capture_qkv(model, ids, keep=lambda info: info.layer_idx in want, values=True)
    label = f"{canonical_name(model_name)} layers {','.join(map(str, layers))}"
    del model
    return label, got, ids.shape[1]


def run_attention_bench(configs: list[Any], lengths: list[int], shape: str = "smollm2-135m",
                        backends: list[str] | None = None, repeats: int = 3, device: str = "cpu",
                        out: str | Path | None = None, seed: int = 0, quiet: bool = False,
                        model: str | None = None, layers: list[int] | None = None) -> list[AttnRow]:
    if model is None and shape not in SHAPES:
        raise ConfigError(f"--shape {shape!r}: one of {', '.join(SHAPES)}")
    cfgs = [load_config(c) for c in configs]
    for c in cfgs:
        if c.prefill.method not in ("flexprefill", "hip"):
            raise ConfigError(f"config '{c.name}': prefill.method is '{c.prefill.method}'; bench-attention "
                              "measures sparse prefill methods (flexprefill, hip)")
    backends = backends or ["torch", "flex"]
    dev = torch.device(device)
    out_dir = Path(out) if out else None
    if model is not None:
        label, captured, n_tok = _model_layers(model, max(lengths), layers, seed)
        lengths = sorted({min(n, n_tok) for n in lengths})

        def inputs(n):
            return [(c.q[..., :n, :].to(dev), c.k[..., :n, :].to(dev), c.v[..., :n, :].to(dev), c.scale)
                    for c in captured]
    else:
        sh = SHAPES[shape]
        h, hk = sh["num_attention_heads"], sh["num_key_value_heads"]
        d = sh.get("head_dim") or sh["hidden_size"] // h
        label = shape

        def inputs(n):
            return [(*structured_qkv(n, h, hk, d, seed=seed, device=dev), d ** -0.5)]
    rows: list[AttnRow] = []
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    todo = [(n, c, b) for n in lengths for c in cfgs for b in backends]
    bar = tqdm(total=len(todo), desc="bench-attention", unit="cell", disable=quiet)
    with torch.no_grad():
        for n in lengths:
            lays = inputs(n)
            dense_s, refs = 0.0, []
            for q, k, v, scale in lays:
                t, ref = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=scale, enable_gqa=True), repeats, dev)
                dense_s, refs = dense_s + t, refs + [ref]
            for c in cfgs:
                p = c.prefill
                sel_s, layouts, blocks, causal = 0.0, [], 0, 0
                for q, k, v, scale in lays:
                    t, layout = median_time(lambda: _selection(p, q, k, scale), repeats, dev)
                    sel_s, layouts = sel_s + t, layouts + [layout]
                    blocks += layout.blocks()
                    causal += causal_block_count(n, n, layout.block_q, layout.block_k) * q.shape[0] * q.shape[1]
                density = blocks / causal
                for b in backends:
                    bar.set_postfix(length=n, method=c.name, backend=b)
                    attn_s, errs = 0.0, []
                    for (q, k, v, scale), layout, ref in zip(lays, layouts, refs):
                        warm = BlockLayout.from_mask(
                            causal_block_mask(q.shape[0], q.shape[1], 256, 256, layout.block_q, layout.block_k),
                            layout.block_q, layout.block_k)
                        block_sparse_attention(q[:, :, :256], k[:, :, :256], v[:, :, :256], warm, scale,
                                               backend=b)  # compile / warm up outside the timing
                        t, o = median_time(lambda: block_sparse_attention(q, k, v, layout, scale, backend=b), repeats,
                                     dev)
                        attn_s += t
                        errs.append(float((o.float() - ref.float()).abs().mean() / ref.float().abs().mean()))
                    row = AttnRow(n, c.name, b, sel_s, attn_s, sel_s + attn_s, dense_s, dense_s / (sel_s + attn_s),
                                  dense_s / attn_s, density, 1 / density, sum(errs) / len(errs), label, str(dev))
                    rows.append(row)
                    if out_dir:
                        with (out_dir / "attention.jsonl").open("a") as f:
                            f.write(json.dumps(asdict(row)) + "\n")
                    bar.update(1)
    bar.close()
    if out_dir:
        (out_dir / "attention.md").write_text(attention_markdown(rows))
        plot_attention(rows, out_dir / "attention.png")
    return rows


def attention_markdown(rows: list[AttnRow]) -> str:
    if not rows:
        return "(no rows)\n"
    lines = [
        (f"Attention-only prefill, real q/k/v of `{rows[0].shape}` (a NIAH prompt) on {rows[0].device}; "
         "times summed over the layers, medians." if " layers " in rows[0].shape else
         f"Attention-only prefill, one layer of `{rows[0].shape}` shape on {rows[0].device} "
         "(structured synthetic q/k/v; medians)."),
        "",
        "| length | method | backend | dense s | select s | attention s | speedup (total) | speedup (attention) "
        "| density | 1/density | rel. error |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.length} | {r.method} | {r.backend} | {r.dense_s:.3f} | {r.select_s:.3f} | {r.attn_s:.3f} | "
            f"{r.speedup:.2f}x | {r.attn_speedup:.2f}x | {r.density:.3f} | {r.limit:.1f}x | {r.rel_err:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_attention(rows: list[AttnRow], path: Path) -> None:
    from matplotlib.figure import Figure  # object API: no pyplot state, no global backend switch

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for key in sorted({(r.method, r.backend) for r in rows}):
        rs = sorted((r for r in rows if (r.method, r.backend) == key), key=lambda r: r.length)
        ax.plot([r.length for r in rs], [r.speedup for r in rs], marker="o", label=f"{key[0]} ({key[1]})")
        ax.plot([r.length for r in rs], [r.limit for r in rs], ls=":", color=ax.lines[-1].get_color())
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("speedup vs dense SDPA (dotted: 1/density)")
    ax.legend(fontsize=8)
    ax.set_title("sparse prefill, attention only")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
