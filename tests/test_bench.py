"""kvtools bench: mechanics only (timings are never asserted: machines are noisy)."""

import json
import math

import pytest

from kvtools.bench.e2e import report_markdown, run_bench
from kvtools.models import random_model
from kvtools.errors import ConfigError, InputTooLongError

TINY = "random:smollm2-135m:layers=2,vocab=512"


def test_random_shape_with_overrides():
    m = random_model(TINY)
    assert m.config.num_hidden_layers == 2 and m.config.num_key_value_heads == 3
    assert m.config.vocab_size == 512


@pytest.mark.parametrize("spec", ["random:nope", "random:llama-3-8b:depth=3", "random"])
def test_bad_random_spec(spec):
    with pytest.raises(ConfigError):
        random_model(spec)


def test_bench_writes_reports_and_budgets_show_in_kv_bytes(tmp_path):
    snap = {"name": "snap64", "cache": {"method": "snapkv", "budget": 64, "window": 8}}
    rows = run_bench(TINY, ["full", snap], [128, 256], tmp_path, decode_tokens=2, warmup=1, quiet=True)
    assert [(r.method, r.length) for r in rows] == [("full", 128), ("snap64", 128), ("full", 256), ("snap64", 256)]
    by = {(r.method, r.length): r for r in rows}
    # 2 layers x 3 KV heads x (64 kept + 3 decoded) slots: the budget is visible in the bytes held
    assert by[("snap64", 256)].kv_bytes < by[("full", 256)].kv_bytes / 3
    assert by[("snap64", 128)].kv_bytes == by[("snap64", 256)].kv_bytes
    for name in ("bench.jsonl", "bench.md", "bench.csv", "bench.png"):
        assert (tmp_path / name).stat().st_size > 0
    lines = [json.loads(x) for x in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["random_weights"] is True
    md = report_markdown(rows)
    assert "random weights" in md and "1.00x" in md
    # end to end: the prefill and the 3 new tokens (1 warm-up + 2 timed) at the median decode time
    r = by[("snap64", 256)]
    assert r.new_tokens == 3 and r.end_to_end_s == pytest.approx(r.prefill_s + 3 * r.decode_ms / 1000)
    assert "end to end s" in md and f"| {r.end_to_end_s:.1f} |" in md


def test_timed_prefill_waits_for_the_cache_background_work(tmp_path, monkeypatch):
    """The prefill time includes KVCache.wait() (retrieval's index builds), called once per timed prefill."""
    from kvtools.cache import KVCache

    calls = []
    monkeypatch.setattr(KVCache, "wait", lambda self: calls.append(self))
    run_bench(TINY, ["full"], [128], tmp_path, decode_tokens=1, warmup=0, quiet=True, repeats=2)
    assert len(calls) == 3  # two timed prefills, then the memory pass's


def test_timed_pass_runs_before_the_allocator_is_pinned(monkeypatch):
    """The timed prefills and decode steps run with the C allocator untouched; the memory pass (one more
    prefill, the same decode steps) comes after, with glibc's mmap threshold pinned."""
    import torch

    import kvtools.bench.timing
    from kvtools.bench.e2e import measure
    from kvtools.config import load_config

    model = random_model(TINY)
    events = []
    monkeypatch.setattr(kvtools.bench.timing, "pin_mmap_threshold", lambda *a: events.append("pin"))
    model.register_forward_pre_hook(lambda m, a, kw: events.append(kw["input_ids"].shape[1]), with_kwargs=True)
    m = measure(model, load_config("full"), torch.randint(0, 100, (1, 300)), decode_tokens=2, warmup=1, repeats=2)
    assert events == [300, 300, 300, 1, 1, 1, "pin", 300, 1, 1, 1]  # warm-up, 2 timed prefills + steps, memory
    assert m.decode_peak_bytes > 0 and m.prefill_peak_bytes > 0
    # one pass each, as an isolated cell runs them (in two processes)
    events.clear()
    t = measure(model, load_config("full"), torch.randint(0, 100, (1, 300)), decode_tokens=2, warmup=1,
                passes="time")
    assert events == [300, 300, 1, 1, 1] and t.prefill_s > 0 and t.decode_ms > 0
    assert t.prefill_peak_bytes == t.decode_peak_bytes == t.base_bytes == -1 and t.kv_bytes == m.kv_bytes
    events.clear()
    mm = measure(model, load_config("full"), torch.randint(0, 100, (1, 300)), decode_tokens=2, warmup=1,
                 passes="memory")
    assert events == ["pin", 300, 300, 1, 1, 1] and math.isnan(mm.prefill_s)  # pinned before its warm-up and math.isnan(mm.decode_ms)
    assert mm.prefill_peak_bytes > 0 and mm.decode_peak_bytes > 0
    with pytest.raises(ValueError, match="passes"):
        measure(model, None, torch.randint(0, 100, (1, 300)), passes="timed")


def test_warm_up_prefill_of_a_chunked_config_makes_a_chunk_call():
    """The untimed warm-up spans at least two chunks, so kernels compiled for a chunk call (queries a suffix
    of the keys: FlexAttention recompiles for it) are built before the timed prefill."""
    import torch

    from kvtools.bench.e2e import measure
    from kvtools.config import load_config

    model = random_model(TINY)
    lengths = []
    model.register_forward_pre_hook(lambda m, a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    cfg = load_config({"prefill": {"method": "dense", "chunk": 64}})
    measure(model, cfg, torch.randint(0, 100, (1, 2000)), decode_tokens=1, warmup=0)
    assert lengths[0] > 1024 + 64 - 1 and lengths[1] == 2000  # warm-up, then the timed prefill
    lengths.clear()
    measure(model, load_config("full"), torch.randint(0, 100, (1, 2000)), decode_tokens=1, warmup=0)
    assert lengths[0] == 1024


def test_hf_baseline_row_is_the_unpatched_model(tmp_path):
    rows = run_bench(TINY, ["full"], [128], tmp_path, decode_tokens=2, warmup=1, quiet=True, baseline="hf")
    assert [r.method for r in rows] == ["hf", "full"] and not any(r.isolated for r in rows)
    assert "all cells in one process" in report_markdown(rows)
    hf, full = rows
    # transformers' DynamicCache holds keys + values only: 2 layers x 3 KV heads x 128 tokens x 64 dims x fp32,
    # twice; kvtools' slot table holds the same plus 9 bytes of metadata per slot (valid, int32 pos and idx)
    assert hf.kv_bytes == 2 * 2 * 3 * 128 * 64 * 4 == hf.kv_resident_bytes
    assert full.kv_bytes == hf.kv_bytes + 2 * 3 * 128 * 9
    md = report_markdown(rows)
    assert "| vs hf |" in md and md.index("| hf | 128 |") < md.index("| full | 128 |")
    assert "| full | 128 |" in report_markdown([full]) and "vs hf" not in report_markdown([full])


def test_memory_is_measured_per_phase_and_the_cache_shows_in_the_decode_peak(tmp_path):
    # a long prompt: full's cache (2 layers x 3 KV heads x 4k tokens x 64 dims x fp32, keys and values: 12 MiB)
    # is held through the decode phase; snapkv keeps 64 slots. Each cell in its own process: in one process the
    # allocator keeps what earlier work freed (earlier tests, earlier cells), and a CPU peak RSS may then not rise
    snap = {"name": "snap64", "cache": {"method": "snapkv", "budget": 64, "window": 8}}
    rows = run_bench(TINY, ["full", snap], [4096], tmp_path, decode_tokens=1, warmup=0, quiet=True, isolate=True)
    by = {r.method: r for r in rows}
    for r in rows:
        assert r.base_bytes > 0 and r.prefill_peak_bytes >= r.base_bytes and r.decode_peak_bytes >= r.base_bytes
        assert r.memory_bytes == max(r.prefill_peak_bytes, r.decode_peak_bytes) and r.isolated
        assert r.prefill_s > 0 and r.decode_ms > 0  # from the timed process, the peaks from the memory one
    assert by["full"].decode_extra_bytes >= 0.9 * by["full"].kv_bytes
    assert by["snap64"].decode_extra_bytes < by["full"].decode_extra_bytes
    assert "prefill peak +MiB" in report_markdown(rows)


def test_isolated_cells_run_in_their_own_process(tmp_path):
    rows = run_bench(TINY, ["full"], [128], tmp_path, decode_tokens=1, warmup=0, quiet=True, isolate=True,
                     baseline="hf")
    assert [r.method for r in rows] == ["hf", "full"] and all(r.isolated for r in rows)
    assert rows[1].kv_bytes == 2 * 2 * 3 * 128 * 64 * 4 + 2 * 3 * 128 * 9  # same figures as in-process
    assert "each cell in its own process" in report_markdown(rows)


def test_bench_runs_the_embedded_model(tmp_path, smollm2):
    """The real-model branch (it once imported a module that does not exist): the default model, by name."""
    rows = run_bench(None, ["full"], [256], tmp_path, decode_tokens=1, warmup=0, quiet=True)
    assert [(r.model, r.random_weights) for r in rows] == [("smollm2-135m", False)]
    cfg = smollm2[0].config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert rows[0].kv_bytes == cfg.num_hidden_layers * cfg.num_key_value_heads * 256 * (2 * head_dim * 4 + 9)


def test_bench_rejects_an_unknown_baseline(tmp_path):
    with pytest.raises(ConfigError, match="baseline"):
        run_bench(TINY, ["full"], [128], tmp_path, quiet=True, baseline="vllm")


def test_bench_rejects_lengths_beyond_context(tmp_path):
    with pytest.raises(InputTooLongError):
        run_bench(TINY + ",context=256", ["full"], [512], tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="leaves no prompt"):
        run_bench(TINY, ["full"], [10], tmp_path, decode_tokens=8, warmup=2, quiet=True)


def test_bench_rejects_bad_config_before_loading(tmp_path, monkeypatch):
    import kvtools.bench.e2e as bench

    monkeypatch.setattr(bench, "random_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    with pytest.raises(ConfigError):
        run_bench(TINY, ["full", "nope"], [128], tmp_path, quiet=True)


def test_bench_attention_reports_density_speed_and_error(tmp_path):
    from kvtools.bench.attention import run_attention_bench

    cfgs = [{"name": "fp", "prefill": {"method": "flexprefill", "block_size": 64, "min_budget": 64}},
            {"name": "hip", "prefill": {"method": "hip", "top_k": 128, "block_q": 32, "block_k": 16, "n_sink": 16,
                                        "window": 64}}]
    rows = run_attention_bench(cfgs, [1024], backends=["torch"], repeats=1, out=tmp_path, quiet=True)
    assert [r.method for r in rows] == ["fp", "hip"]
    for r in rows:
        assert 0 < r.density < 1 and r.limit == pytest.approx(1 / r.density)
        assert r.dense_s > 0 and r.attn_s > 0 and r.rel_err >= 0
    assert (tmp_path / "attention.md").exists() and (tmp_path / "attention.png").exists()
    with pytest.raises(ConfigError, match="sparse prefill methods"):
        run_attention_bench(["full"], [1024], quiet=True)


def test_bench_attention_on_captured_model_layers(tmp_path, monkeypatch):
    """--model: real q/k/v of the full-attention layers only (Gemma-3's sliding layers are skipped), a
    shorter length is the captured prompt's prefix, and a budget covering everything is exact."""
    import torch
    from transformers import AutoModelForCausalLM

    import kvtools.models
    from kvtools.bench.attention import run_attention_bench

    from .conftest import tiny_config
    from .helpers import byte_tokenizer

    cfg = tiny_config("gemma3")
    cfg.vocab_size, cfg.max_position_embeddings = 300, 4096
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    monkeypatch.setattr(kvtools.models, "load_model", lambda name=None, **kw: (model, byte_tokenizer()))
    every = {"name": "fp-all", "prefill": {"method": "flexprefill", "block_size": 32, "min_budget": 4096}}
    some = {"name": "fp", "prefill": {"method": "flexprefill", "block_size": 32, "min_budget": 64, "gamma": 0.5}}
    rows = run_attention_bench([every, some], [512, 2000], backends=["torch"], repeats=1, out=tmp_path,
                               quiet=True, model="tiny-gemma3")
    assert all(r.shape.endswith("layers 2") for r in rows)  # layers 0 and 1 slide
    assert rows[0].length == 512 and 1800 < rows[-1].length <= 2000  # the prompt as built
    full = [r for r in rows if r.method == "fp-all"]
    assert all(r.density == 1 and r.rel_err < 1e-5 for r in full)
    assert any(r.density < 1 for r in rows if r.method == "fp")
    with pytest.raises(ConfigError, match="sliding-window layers"):
        run_attention_bench([some], [256], backends=["torch"], quiet=True, model="tiny-gemma3", layers=[0])


def test_pinned_mmap_threshold_returns_freed_tensors_to_the_system():
    """Once glibc has freed an 8 MiB block its dynamic threshold serves later such blocks from the heap, where
    freed ones may stay resident; pinned, a freed tensor leaves the RSS (what the CPU peaks rely on)."""
    import ctypes.util
    import sys

    import torch

    from kvtools.bench.timing import pin_mmap_threshold, rss

    if not sys.platform.startswith("linux") or "libc.so" not in str(ctypes.util.find_library("c")):
        pytest.skip("glibc only")
    first = torch.ones(2 * 1024 * 1024)
    del first  # a freed 8 MiB block: unpinned, glibc would now serve such blocks from the heap
    assert pin_mmap_threshold()
    base = rss()
    xs = [torch.ones(2 * 1024 * 1024) for _ in range(8)]  # 8 x 8 MiB, every page touched
    last = torch.ones(2 * 1024 * 1024)  # still held: in the heap it would keep the freed blocks below it
    assert rss() - base > 64 * 2**20
    del xs
    assert rss() - base < 40 * 2**20  # unpinned: all 72 MiB stay
    del last
