"""Recall@k of each ANN index kind against exact attention, and its search time, on a real model.

The model reads a NIAH prompt of ``length`` tokens once (dense); every layer's rotated
queries and keys are captured. Per (layer, KV head): the keys between the first ``n_sink``
and the last ``window`` tokens are indexed; the last ``n_eval`` prompt queries (the ones
closest to decode queries) are searched; recall@k = |ANN top-k  ∩  exact top-k by q.k| / k
(for one query, attention order is q.k order, so exact top-k by q.k is the top-k by
attention). Query-trained IVF trains on the earlier prompt queries (disjoint from the
evaluation queries). Search time: wall seconds per query, all heads and layers.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..methods.retrieval import RetrievalParams
from ..patching import capture_qkv

KINDS: dict[str, dict[str, Any]] = {
    "flat": {"index": "flat"},
    "hnsw": {"index": "hnsw"},
    "hnsw-ip": {"index": "hnsw", "hnsw_space": "ip"},
    "ivf-keys": {"index": "ivf", "train_on": "keys"},
    "ivf-queries": {"index": "ivf", "train_on": "queries"},
    "hnsw+hot": {"index": "hnsw", "hot_keys": 256},
    "ivf+hot": {"index": "ivf", "hot_keys": 256},
}


def kind_params(spec: str) -> RetrievalParams:
    """The index settings of a kind: ``NAME`` from :data:`KINDS`, or ``NAME:key=value[:key=value...]`` with
    RetrievalParams fields overridden (e.g. ``ivf-keys:nlist=256:nprobe=16``). Bad names, fields or values
    raise ConfigError."""
    from ..errors import ConfigError

    name, *items = spec.split(":")
    if name not in KINDS:
        raise ConfigError(f"unknown {name} in index kind {spec!r}; allowed: {', '.join(KINDS)}")
    over: dict[str, str] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or key not in RetrievalParams.model_fields or key == "method":
            raise ConfigError(f"index kind {spec!r}: expected key=value with a retrieval parameter, got {item!r}")
        over[key] = val
    try:
        return RetrievalParams(**{**KINDS[name], **over})
    except ValueError as exc:
        raise ConfigError(f"index kind {spec!r}: {exc}") from None


@dataclass
class RecallRow:
    model: str
    length: int
    index: str
    top_k: int
    recall: float
    search_ms_per_query: float
    build_s: float
    n_keys: int
    n_queries: int


def capture_qk(model: Any, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per attention layer: (q [H, L, D], k [Hk, L, D]) after RoPE, from one dense pass."""
    return [(c.q[0], c.k[0]) for c in capture_qkv(model, ids)]


def measure_recall(layers_qk, top_ks: list[int], kinds: list[str], n_sink: int = 128, window: int = 512,
                   n_eval: int = 64, layers: list[int] | None = None, quiet: bool = False,
                   **index_kw: Any) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from ..methods.retrieval import build_index, hot_set, rerank, topk_hits

    rows = []
    layer_ids = layers if layers is not None else list(range(len(layers_qk)))
    for kind in kinds:
        cfg = kind_params(kind).model_copy(update=index_kw)
        hits = {k: 0 for k in top_ks}
        total = {k: 0 for k in top_ks}
        search_s, build_s, n_q, n_keys = 0.0, 0.0, 0, 0
        for li in tqdm(layer_ids, desc=f"recall {kind}", disable=quiet):
            q, k = layers_qk[li]
            h, n, d = q.shape
            hk = k.shape[0]
            g = h // hk
            lo, hi = n_sink, n - window
            if hi - lo <= max(top_ks):
                continue
            for kh in range(hk):
                keys = k[kh, lo:hi].numpy()
                qs = q[kh * g:(kh + 1) * g]  # [g, L, D]
                evalq = np.ascontiguousarray(qs[:, n - n_eval:].reshape(-1, d).numpy())
                trainq = np.ascontiguousarray(qs[:, lo:n - n_eval].reshape(-1, d).numpy())
                t = time.perf_counter()
                index = build_index(keys, cfg, trainq)
                hot = None
                if cfg.hot_keys:  # picked by the prompt queries just before the evaluation queries
                    obs = qs[:, max(lo, n - n_eval - cfg.hot_window):n - n_eval].reshape(-1, d)
                    hot = hot_set(obs, torch.from_numpy(keys), d ** -0.5, cfg.hot_keys)
                build_s += time.perf_counter() - t
                exact = torch.topk(torch.from_numpy(evalq) @ torch.from_numpy(keys).T, max(top_ks), -1).indices
                t = time.perf_counter()
                found = index.search(evalq, max(top_ks))[1]
                if hot is not None:
                    found = rerank(found, hot, evalq, torch.from_numpy(keys), max(top_ks))
                search_s += time.perf_counter() - t
                n_q += len(evalq)
                n_keys += len(keys)
                for kk in top_ks:
                    hits[kk] += topk_hits(found[:, :kk], exact[:, :kk])
                    total[kk] += kk * len(evalq)
        for kk in top_ks:
            rows.append({"index": kind, "top_k": kk, "recall": hits[kk] / max(total[kk], 1),
                         "search_ms_per_query": 1000 * search_s / max(n_q, 1), "build_s": build_s,
                         "n_keys": n_keys, "n_queries": n_q})
    return rows


def run_recall_bench(model_name: str | None, length: int, top_ks: list[int], kinds: list[str] | None = None,
                     out: str | Path | None = None, n_sink: int = 128, window: int = 512, n_eval: int = 64,
                     seed: int = 0, quiet: bool = False) -> list[RecallRow]:
    from ..eval.haystack import build_niah_prompt
    from ..models import canonical_name, load_model

    kinds = kinds or list(KINDS)
    model, tok = load_model(model_name)
    prompt = build_niah_prompt(tok, length, 50, seed=seed, max_new_tokens=16)
    ids = torch.tensor([prompt.input_ids])
    qk = capture_qk(model, ids)
    rows = [RecallRow(canonical_name(model_name), ids.shape[1], r["index"], r["top_k"], r["recall"],
                      r["search_ms_per_query"], r["build_s"], r["n_keys"], r["n_queries"])
            for r in measure_recall(qk, top_ks, kinds, n_sink, window, n_eval, quiet=quiet)]
    if out:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "recall.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
        (d / "recall.md").write_text(recall_markdown(rows))
        plot_recall(rows, d / "recall.png")
    return rows


def recall_markdown(rows: list[RecallRow]) -> str:
    if not rows:
        return "(no rows)\n"
    r0 = rows[0]
    lines = [f"Recall@k vs exact attention, `{r0.model}`, {r0.length}-token NIAH prompt, last queries of the "
             "prompt, keys between sink and window, every layer and KV head.", "",
             "| index | top_k | recall | search ms/query | build s (all heads) | keys | queries |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.index} | {r.top_k} | {r.recall:.3f} | {r.search_ms_per_query:.3f} | {r.build_s:.1f} | "
                     f"{r.n_keys} | {r.n_queries} |")
    return "\n".join(lines) + "\n"


def plot_recall(rows: list[RecallRow], path: Path) -> None:
    from matplotlib.figure import Figure  # object API: no pyplot state, no global backend switch

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for kk in sorted({r.top_k for r in rows}):
        rs = [r for r in rows if r.top_k == kk]
        ax.scatter([r.search_ms_per_query for r in rs], [r.recall for r in rs], label=f"top_k={kk}")
        for r in rs:
            ax.annotate(r.index, (r.search_ms_per_query, r.recall), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("search ms per query (log)")
    ax.set_ylabel("recall@k vs exact attention")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
