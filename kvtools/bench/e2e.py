"""Speed and memory, measured side by side.

For each length, every method runs on the same random prompt, interleaved
(method A, B, C at 2k, then at 4k, ...), so machine noise hits all of them alike:

* a length counts the prompt and the generated tokens (prompt = length - warmup - decode_tokens);
* prefill seconds: median over ``repeats`` fresh prefills, each until the cache's background work is done
  (``KVCache.wait``: retrieval's index builds, which would otherwise overlap and slow the timed decode steps,
  their searches exact until then);
* prefill: after one untimed 1k-token prefill per method (kernel compilation is not timed);
* decode ms/token: median over ``decode_tokens`` single-token steps after ``warmup`` steps;
* end to end seconds: the prefill plus the length's new tokens (warm-up + decode steps) at the median decode
  time, the figure a user generating that many tokens after the prompt sees;
* KV bytes: what the cache holds after prefill + decode (``KVCache.nbytes``);
* memory, per phase: measured in a second, untimed pass (one more prefill and the same decode steps), the
  peak during its prefill and during its decode steps (CUDA max allocated, or on CPU the process's peak RSS,
  its high-water mark reset before each phase, glibc's mmap threshold pinned so it follows the live tensors),
  reported above the memory in use before the prefill. The timed pass runs with the allocator as glibc sets
  it: the pinned threshold maps every block afresh, which slowed a chunked sparse prefill by a
  third. ``isolate`` (the CLI's default) runs each cell's timed pass in a fresh process, with the allocator
  untouched, and its memory pass in another, pinned before its warm-up, so no cell's peak inherits another's
  allocations; without it every cell runs both passes in one process, timed with the threshold pinned
  (alike for all);
* ratios to ``full`` when it is among the methods, and to plain transformers (the unpatched model with its
  ``DynamicCache``: ``baseline="hf"``, ``kvtools bench --baseline hf``), a row named ``hf``.

``--model random:llama-3-8b:layers=4`` builds a random-weight model with a real
architecture's shape (honest for speed and memory, never for accuracy); the
report says so.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import KVConfig, load_config
from ..errors import ConfigError, InputTooLongError
from ..models import random_model
from ..patching import cache_arg, patch
from .timing import PeakMemory, pin_mmap_threshold, sync


@dataclass
class Measured:
    """One method's figures on one prompt (:func:`measure`)."""

    prefill_s: float
    decode_ms: float
    kv_bytes: int
    kv_resident_bytes: int
    memory_kind: str  # "cuda_max_allocated" | "cpu_peak_rss"
    base_bytes: int  # memory in use before the memory pass's prefill (weights, runtime)
    prefill_peak_bytes: int  # peak during the memory pass's prefill
    decode_peak_bytes: int  # peak during its decode steps (the prefilled cache included)


@dataclass
class BenchRow:
    model: str
    random_weights: bool
    method: str
    length: int
    prefill_s: float
    decode_ms: float
    kv_bytes: int
    memory_bytes: int  # the run's peak: max(prefill_peak_bytes, decode_peak_bytes)
    memory_kind: str  # "cuda_max_allocated" | "cpu_peak_rss"
    kv_resident_bytes: int = -1  # KV bytes not offloaded by the method (retrieval keeps the rest on CPU)
    base_bytes: int = -1
    prefill_peak_bytes: int = -1
    decode_peak_bytes: int = -1
    isolated: bool = False  # measured in a process of its own
    new_tokens: int = 0  # tokens generated after the prompt (warm-up + timed decode steps)

    @property
    def end_to_end_s(self) -> float:
        """Seconds to prefill the prompt and generate ``new_tokens`` at the median decode time."""
        return self.prefill_s + self.new_tokens * self.decode_ms / 1000

    @property
    def prefill_extra_bytes(self) -> int:
        """Peak memory of the prefill above what was in use before it (the method's own working memory)."""
        return self.prefill_peak_bytes - self.base_bytes

    @property
    def decode_extra_bytes(self) -> int:
        return self.decode_peak_bytes - self.base_bytes

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# tokens of the untimed warm-up prefill (long enough for sparse prefill methods to leave their dense path)
_WARM_PREFILL = 1024


def warm_length(config: KVConfig | None) -> int:
    """Tokens of the untimed warm-up prefill: ``_WARM_PREFILL``, plus one chunk when the prefill is chunked, so
    the warm-up also makes a chunk call (queries a suffix of the keys). FlexAttention traced on a first call
    (queries == keys) recompiles on the first chunk call, because dynamo's duck sizing gave the two equal sizes
    one symbol: with a 1024-token warm-up that recompile (about 6 s on CPU) fell inside the timed prefill of
    every chunked sparse-prefill cell (Gemma-3 at 16k, long-prompt-gemma3: 36.9 s first prefill, 26.5 s
    second)."""
    chunk = getattr(getattr(config, "prefill", None), "chunk", None)
    return _WARM_PREFILL + (chunk or 0)


#: the name of the plain-transformers row (``baseline="hf"``)
HF = "hf"


class _Plain:
    """The unpatched model's side of :func:`measure`: transformers' own ``DynamicCache``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache_kw = cache_arg(inspect.signature(model.forward))

    def make_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def cache_kwargs(self, cache: Any) -> dict[str, Any]:
        return {self.cache_kw: cache}


def dynamic_cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a transformers cache holds (every layer's)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if torch.is_tensor(t))


def _prefill_and_decode(model: Any, p: Any, waits: bool, ids: torch.Tensor, steps: int,
                        after_prefill: Any = None) -> tuple[Any, float, list[float]]:
    """One fresh prefill of ``ids`` (until the cache's background work is done, ``waits``) and ``steps``
    greedy decode steps: (the cache, prefill seconds, seconds of each step). ``after_prefill()`` runs between."""
    dev = ids.device
    cache = p.make_cache()
    sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=ids, logits_to_keep=1, **p.cache_kwargs(cache))
    if waits:  # background work the prompt started (index builds) belongs to the prefill
        cache.wait()
    sync(dev)
    prefill_s = time.perf_counter() - t0
    nxt = out.logits[:, -1:].argmax(-1)
    del out
    if after_prefill is not None:
        after_prefill()
    times = []
    for _ in range(steps):
        sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=nxt, **p.cache_kwargs(cache))
        sync(dev)
        times.append(time.perf_counter() - t0)
        nxt = out.logits[:, -1:].argmax(-1)
        del out
    return cache, prefill_s, times


@torch.inference_mode()
def measure(
    model: Any,
    config: KVConfig | None,
    ids: torch.Tensor,
    decode_tokens: int = 16,
    warmup: int = 2,
    repeats: int = 1,
    passes: str = "both",
) -> Measured:
    """Time and memory of one method on ``ids`` [1, L]; ``config`` None: the unpatched model (plain
    transformers). Two passes, ``passes`` says which run here ("time", "memory" or "both", in that order).
    The timed one: ``repeats`` prefills, then ``warmup + decode_tokens`` decode steps after the last, with the
    C allocator as the process has it. The memory one: one more prefill and as many decode steps, untimed, with
    the peak of each phase (:class:`PeakMemory`). On CPU that pins glibc's mmap threshold so the peak RSS
    follows the live tensors, which costs time: every block is mapped afresh, and timed that way a chunked
    sparse prefill was a third slower (Gemma-3 at 32k, long-prompt-gemma3: 86 vs 65 s). A pass not run leaves
    its figures NaN (times) or -1 (memory)."""
    if passes not in ("time", "memory", "both"):
        raise ValueError(f"passes: {passes!r} is not one of: time, memory, both")
    dev = ids.device
    steps = warmup + decode_tokens
    waits = config is not None
    # a memory-only pass pins the allocator (CPU) before its warm-up, so the warm-up's freed blocks are not
    # left on the heap for the measured prefill to reuse (the order of the benches before the passes split)
    mem = PeakMemory(dev) if passes == "memory" else None
    with patch(model, config) if config is not None else contextlib.nullcontext(_Plain(model)) as p:
        # one untimed short prefill first: compiled kernels (FlexAttention) are built outside the timing
        model(input_ids=ids[:, :warm_length(config)], logits_to_keep=1, **p.cache_kwargs(p.make_cache()))
        cache = None
        prefill_s = decode_ms = math.nan
        if passes != "memory":
            times = []
            for r in range(repeats):
                cache = None  # the previous repeat's cache is freed before the next prefill
                cache, t, step_s = _prefill_and_decode(model, p, waits, ids, steps if r == repeats - 1 else 0)
                times.append(t)
            prefill_s, decode_ms = statistics.median(times), 1000 * statistics.median(step_s[warmup:])
        base = prefill_peak = decode_peak = -1
        if passes != "time":
            cache = None
            mem = mem or PeakMemory(dev)
            base = mem.start()
            peaks = []

            def prefill_done() -> None:
                peaks.append(mem.peak())
                mem.start()

            cache, _, _ = _prefill_and_decode(model, p, waits, ids, steps, prefill_done)
            prefill_peak, decode_peak = peaks[0], mem.peak()
        if config is None:
            kv = resident = dynamic_cache_bytes(cache)
        else:
            kv = cache.nbytes()
            resident = cache.nbytes(offloaded=False)
    return Measured(prefill_s, decode_ms, kv, resident, PeakMemory.kind_of(dev), base, prefill_peak, decode_peak)


def run_bench(
    model_name: str | None,
    configs: list[str],
    lengths: list[int],
    out_dir: str | Path,
    decode_tokens: int = 16,
    warmup: int = 2,
    repeats: int = 1,
    seed: int = 0,
    quiet: bool = False,
    device: str | None = None,
    baseline: str | None = None,
    isolate: bool = False,
) -> list[BenchRow]:
    """Measure every config at every length, interleaved; write ``bench.jsonl``, ``bench.md``, ``bench.csv``,
    ``bench.png``. ``baseline="hf"``: first a row ``hf`` per length, the unpatched model (plain transformers).
    ``isolate``: every (method, length) cell runs in a fresh process that loads the model itself, so no cell's
    memory peak inherits another's allocations (what the CLI does by default)."""
    if baseline not in (None, HF):
        raise ConfigError(f"baseline: {baseline!r} is not one of: {HF} (the unpatched model)")
    kv_configs: list[KVConfig | None] = [load_config(c) for c in configs]  # validate before loading anything
    specs: list[Any] = list(configs)
    if baseline == HF:
        kv_configs.insert(0, None)
        specs.insert(0, None)
    if decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("decode_tokens and repeats must be >= 1, warmup >= 0")
    model, name, random_weights = _load_bench_model(model_name)
    if device and not isolate:
        model = model.to(device)
    ctx = getattr(model.config, "max_position_embeddings", None)
    gen = warmup + decode_tokens  # a length counts the prompt and the generated tokens (as in niah)
    too_long = [n for n in lengths if ctx is not None and n > ctx]
    if too_long:
        raise InputTooLongError(f"lengths: {too_long} exceed the model's context of {ctx} tokens")
    if min(lengths) <= gen:
        raise ConfigError(f"lengths: {min(lengths)} leaves no prompt with {gen} warm-up + decode tokens")
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    if isolate:
        del model  # each cell loads its own
    elif dev.type == "cpu":  # the first cell's memory pass would pin it for the later cells' timed passes only
        pin_mmap_threshold()
    g = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    rows: list[BenchRow] = []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(lengths) * len(kv_configs), disable=quiet, desc="bench") as bar, \
            (out / "bench.jsonl").open("w") as f:
        for length in lengths:
            ids = torch.randint(100, vocab, (1, length - gen), generator=g)
            for cfg, spec in zip(kv_configs, specs):
                method = HF if cfg is None else cfg.name
                bar.set_postfix(method=method, length=length)
                if isolate:
                    m = measure_isolated(model_name, spec, ids, device, decode_tokens, warmup, repeats)
                else:
                    m = measure(model, cfg, ids.to(dev), decode_tokens, warmup, repeats)
                row = BenchRow(name, random_weights, method, length, m.prefill_s, m.decode_ms, m.kv_bytes,
                               max(m.prefill_peak_bytes, m.decode_peak_bytes), m.memory_kind, m.kv_resident_bytes,
                               m.base_bytes, m.prefill_peak_bytes, m.decode_peak_bytes, isolate, gen)
                rows.append(row)
                f.write(json.dumps(row.as_dict()) + "\n")
                f.flush()
                bar.update()
    write_report(rows, out)
    return rows


def measure_isolated(model_name: str | None, config: Any, ids: torch.Tensor, device: str | None = None,
                     decode_tokens: int = 16, warmup: int = 2, repeats: int = 1) -> Measured:
    """:func:`measure` in fresh processes (spawned: nothing inherited) that load the model and ``config`` (a
    preset name, YAML path or dict; None: the unpatched model) themselves: the timed pass in one, with the C
    allocator untouched, then the memory pass in another, its allocator pinned for peaks before the warm-up
    prefill; errors are raised here."""
    import dataclasses
    import multiprocessing

    got = {}
    for part in ("time", "memory"):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            got[part] = pool.apply(_measure_cell, (model_name, config, ids, device, decode_tokens, warmup, repeats,
                                                   part))
    mem = got["memory"]
    return dataclasses.replace(got["time"], memory_kind=mem.memory_kind, base_bytes=mem.base_bytes,
                               prefill_peak_bytes=mem.prefill_peak_bytes, decode_peak_bytes=mem.decode_peak_bytes)


def _load_bench_model(model_name: str | None) -> tuple[Any, str, bool]:
    """(model, its name in the report, whether its weights are random) for ``model_name``: ``random:SHAPE...``
    or what :func:`kvtools.load_model` takes."""
    if model_name and model_name.startswith("random:"):
        return random_model(model_name), model_name, True
    from ..models import canonical_name, load_model

    return load_model(model_name)[0], canonical_name(model_name), False


def _measure_cell(model_name, config, ids, device, decode_tokens, warmup, repeats, passes="both") -> Measured:
    model = _load_bench_model(model_name)[0]
    if device:
        model = model.to(device)
    dev = next(model.parameters()).device
    cfg = None if config is None else load_config(config)
    return measure(model, cfg, ids.to(dev), decode_tokens, warmup, repeats, passes)


def _ratio(rows: list[BenchRow], row: BenchRow, field: str, to: str = "full") -> float | None:
    base = [r for r in rows if r.method == to and r.length == row.length]
    if not base or not getattr(base[0], field):
        return None
    return getattr(row, field) / getattr(base[0], field)


def report_markdown(rows: list[BenchRow]) -> str:
    """The bench table. Memory is per phase: the peak during the prefill and during the decode steps, above what
    was in use before the prefill (weights, runtime): CUDA max allocated, or the process's peak RSS on CPU."""
    if not rows:
        return "(no rows)\n"
    r0 = rows[0]
    weights = "random weights (speed/memory only, never accuracy)" if r0.random_weights else "real weights"
    mem_name = "CUDA max allocated" if r0.memory_kind == "cuda_max_allocated" else "peak RSS"
    offload = any(0 <= r.kv_resident_bytes != r.kv_bytes for r in rows)
    hf = any(r.method == HF for r in rows)  # then prefill and decode also as a ratio to plain transformers
    vs = " vs full |" + (" vs hf |" if hf else "")
    col = "---:|" * (2 if hf else 1)
    isolated = ("each cell in its own processes: one timed with the C allocator untouched, then one measuring memory"
                if all(r.isolated for r in rows) else
                "all cells in one process, timed with glibc's mmap threshold pinned (it slows allocation-heavy "
                "methods more), memory measured in a second pass")
    e2e = all(r.new_tokens > 0 for r in rows)
    lines = [
        f"## Benchmark — `{r0.model}` ({weights})",
        "",
        f"Memory: {mem_name} above the memory in use before the prefill, per phase; {isolated}."
        + (f" End to end: the prefill plus {r0.new_tokens} new tokens at the median decode time (a length counts "
           "the prompt and the new tokens)." if e2e else ""),
        "",
        "| method | length | prefill s |" + vs + " decode ms/token |" + vs + (" end to end s |" + vs if e2e else "")
        + " KV MiB | vs full |" + f" prefill peak +MiB |{vs} decode peak +MiB |{vs}"
        + (" resident KV MiB | vs full |" if offload else ""),
        "|---|---:|---:|" + col + "---:|" + col + ("---:|" + col if e2e else "") + "---:|---:|" + "---:|" + col
        + "---:|" + col + ("---:|---:|" if offload else ""),
    ]

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}x"

    def ratios(r: BenchRow, field: str) -> str:
        return f" {fmt(_ratio(rows, r, field))} |" + (f" {fmt(_ratio(rows, r, field, HF))} |" if hf else "")

    def mib(x: int) -> str:
        return f"{x / 2**20:.1f}"

    for r in sorted(rows, key=lambda r: (r.length, r.method != HF, r.method != "full", r.method)):
        lines.append(
            f"| {r.method} | {r.length} | {r.prefill_s:.3f} |" + ratios(r, "prefill_s") + f" {r.decode_ms:.1f} |"
            + ratios(r, "decode_ms")
            + (f" {r.end_to_end_s:.1f} |" + ratios(r, "end_to_end_s") if e2e else "")
            + f" {mib(r.kv_bytes)} | {fmt(_ratio(rows, r, 'kv_bytes'))} |"
            + f" {mib(r.prefill_extra_bytes)} |" + ratios(r, "prefill_extra_bytes")
            + f" {mib(r.decode_extra_bytes)} |" + ratios(r, "decode_extra_bytes")
            + (f" {mib(r.kv_resident_bytes)} | {fmt(_ratio(rows, r, 'kv_resident_bytes'))} |" if offload else "")
        )
    return "\n".join(lines) + "\n"


def write_report(rows: list[BenchRow], out: Path) -> None:
    """Write ``bench.md`` (the table), ``bench.csv`` (every field) and ``bench.png`` (:func:`plot_bench`) to ``out``."""
    import csv

    (out / "bench.md").write_text(report_markdown(rows))
    with (out / "bench.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].as_dict()) if rows else ["method"])
        w.writeheader()
        for r in rows:
            w.writerow(r.as_dict())
    if rows:
        plot_bench(rows, out / "bench.png")


def plot_bench(rows: list[BenchRow], path: Path) -> None:
    """Prefill time, decode ms/token and memory against prompt length, one line per method, as one PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
    methods = sorted({r.method for r in rows}, key=lambda m: (m != "full", m))
    for ax, field, label, scale in (
        (axes[0], "prefill_s", "prefill (s)", 1.0),
        (axes[1], "decode_ms", "decode (ms / token)", 1.0),
        (axes[2], "kv_bytes", "KV cache (MiB)", 2**-20),
    ):
        for m in methods:
            pts = sorted((r.length, getattr(r, field) * scale) for r in rows if r.method == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{rows[0].model}" + (" (random weights)" if rows[0].random_weights else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
