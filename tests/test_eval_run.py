"""kvtools eval: run files, all suites end to end on a tiny model, resume, sharded merge, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kvtools.errors import ConfigError
from kvtools.eval.report import RESULTS_FILE as RESULTS
from kvtools.eval.report import record_key
from kvtools.eval.run import load_run, run_eval

from .helpers import byte_tokenizer

TIMING = ("prefill_s", "decode_s", "decode_ms", "seconds")  # the record fields that differ from run to run


def tiny_lm(head_dim: int = 16):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=4096,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return AutoModelForCausalLM.from_config(cfg).eval()


def run_dict(out: Path) -> dict:
    return {
        "model": "tiny-test",
        "methods": ["full", {"name": "snap", "cache": {"method": "snapkv", "budget": 0.5, "window": 8}}],
        "seed": 1,
        "out": str(out),
        "suites": [
            {"suite": "niah", "lengths": [1024], "depths": [0, 100], "max_new_tokens": 4},
            {"suite": "passkey", "lengths": ["1k"], "depths": [50], "max_new_tokens": 4},
            {"suite": "ruler", "tasks": ["niah_single_number", "vt"], "lengths": [2048], "max_new_tokens": 4},
            {"suite": "ppl", "lengths": [600], "chunk": 128, "segment": 200},
        ],
    }


@pytest.fixture(scope="module")
def tiny():
    return tiny_lm(), byte_tokenizer()


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_run_all_suites_then_resume_without_redoing(tmp_path, tiny):
    model, tok = tiny
    res = run_eval(run_dict(tmp_path), quiet=True, model=model, tokenizer=tok)
    # items: niah 2 + passkey 1 + ruler 2 + ppl 1 = 6, for 2 methods
    assert len(res.records) == 12
    assert len({record_key(r) for r in res.records}) == 12
    for name in ("run.json", RESULTS, "summary.md", "summary.csv", "score_vs_length.png", "score_vs_kv.png",
                 "ppl.png", "heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    ppl = [r for r in res.records if r["suite"] == "ppl"]
    assert all(len(r["ppl_segments"]) == 3 and r["score"] is None for r in ppl)
    full = {record_key(r)[1:]: r for r in res.records if r["method"] == "full"}
    snap = {record_key(r)[1:]: r for r in res.records if r["method"] == "snap"}
    for k, r in snap.items():  # same prompt for every method; the budget shows in the bytes
        if r["suite"] != "ppl":
            assert r["prompt_sha1"] == full[k]["prompt_sha1"]
            assert r["kv_bytes"] < 0.7 * full[k]["kv_bytes"]
    md = (tmp_path / "summary.md").read_text()
    assert "### ruler" in md and "### ppl" in md

    # resume: cut the file mid-line, nothing finished is redone, nothing duplicated
    path = tmp_path / RESULTS
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:7]) + "\n" + lines[7][:25])
    calls = []

    def counting(model, tok, patch, prep, n):
        from kvtools.eval.generation import generate_greedy

        calls.append(1)
        return generate_greedy(model, tok, patch, prep, n)

    again = run_eval(run_dict(tmp_path), quiet=True, model=model, tokenizer=tok, generate_fn=counting)
    assert len(calls) <= 5  # only the lost line and the ones after it
    assert strip(again.records)[:7] == strip(res.records)[:7]
    assert len(again.records) == 12


def test_sharded_run_merges_to_the_single_process_content(tmp_path, tiny, monkeypatch):
    """Two ranks (simulated in turn) write shards; the merge equals a one-process run."""
    import kvtools.eval.run as run_mod

    model, tok = tiny
    single = run_eval(run_dict(tmp_path / "one"), quiet=True, model=model, tokenizer=tok)

    class FakeState:
        def __init__(self, rank):
            self.process_index, self.num_processes = rank, 2

        def wait_for_everyone(self):
            pass

    out = tmp_path / "two"
    monkeypatch.setattr(run_mod, "_world", lambda: (1, 2, FakeState(1)))
    assert run_eval(run_dict(out), quiet=True, model=model, tokenizer=tok) is None
    assert (out / "shards" / "rank1.jsonl").exists()
    monkeypatch.setattr(run_mod, "_world", lambda: (0, 2, FakeState(0)))
    merged = run_eval(run_dict(out), quiet=True, model=model, tokenizer=tok)
    assert strip(merged.records) == strip(single.records)
    assert not (out / "shards").exists()


@pytest.mark.parametrize(
    "change, pattern",
    [
        ({"methods": []}, r"run\.methods: .*at least 1"),
        ({"methods": ["snapk"]}, r"methods\[0\]: unknown preset 'snapk' \(did you mean 'snapkv'\?\)"),
        ({"suites": [{"suite": "rulerr", "lengths": [1024]}]}, r"suites\[0\]\.suite: unknown value 'rulerr' \(did you mean 'ruler'\?\)"),
        ({"suites": [{"suite": "ruler", "tasks": ["vtt"], "lengths": [1024]}]}, r"unknown task 'vtt' \(did you mean 'vt'\?\)"),
        ({"suites": [{"suite": "niah", "lenghts": [1024]}]}, r"suites\[0\]\.lenghts: unknown key for niah \(did you mean 'lengths'\?\)"),
        ({"suites": [{"suite": "niah", "lengths": ["1q"]}]}, r"suites\[0\]\.lengths"),
        ({"sed": 3}, r"run\.sed: unknown key \(did you mean 'seed'\?\)"),
    ],
)
def test_bad_run_files_fail_before_any_work(tmp_path, change, pattern):
    raw = run_dict(tmp_path)
    raw.update(change)
    with pytest.raises(ConfigError, match=pattern):
        load_run(raw)


def test_shipped_run_files_validate():
    import kvtools.configs.eval as shipped

    files = sorted(Path(shipped.__file__).parent.glob("*.yaml"))
    assert files
    for f in files:
        load_run(f)


def test_refuses_to_mix_with_a_different_run(tmp_path, tiny):
    model, tok = tiny
    raw = run_dict(tmp_path)
    raw["suites"] = raw["suites"][:1]
    run_eval(raw, quiet=True, model=model, tokenizer=tok)
    raw["seed"] = 2
    with pytest.raises(ConfigError, match="holds a different run"):
        run_eval(raw, quiet=True, model=model, tokenizer=tok)


def test_resume_accepts_a_record_without_parameters_added_since(tmp_path, tiny):
    """A run recorded before a method gained a parameter (here recycled's pool, at its default) resumes;
    a real change of a parameter is still refused."""
    model, tok = tiny
    raw = run_dict(tmp_path)
    raw["suites"] = raw["suites"][:1]
    raw["methods"] = [{"name": "rec", "decode": {"method": "recycled", "top_k": 0.5}}]
    run_eval(raw, quiet=True, model=model, tokenizer=tok)
    run_json = Path(raw["out"]) / "run.json"
    old = json.loads(run_json.read_text())
    del old["methods"]["rec"]["decode"]["pool"]  # as written by a version without the parameter
    run_json.write_text(json.dumps(old))
    run_eval(raw, quiet=True, model=model, tokenizer=tok)
    raw["methods"] = [{"name": "rec", "decode": {"method": "recycled", "top_k": 0.5, "pool": 4}}]
    with pytest.raises(ConfigError, match="method 'rec'"):
        run_eval(raw, quiet=True, model=model, tokenizer=tok)


@pytest.mark.skipif(sys.platform != "linux", reason="multi-process launch tested on Linux")
def test_two_cpu_processes_shard_the_run(tmp_path, tiny):
    """`kvtools eval --processes 2` (torchrun, as `accelerate launch` on several GPUs; on CPU accelerate's simple
    launcher starts one process) == one process (content)."""
    model, tok = tiny
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    raw = run_dict(tmp_path / "launched")
    raw["model"] = str(model_dir)
    raw["suites"] = raw["suites"][:2]
    (tmp_path / "run.yaml").write_text(json.dumps(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(  # kvtools eval --processes 2 runs itself under torchrun
        [sys.executable, "-m", "kvtools", "eval", str(tmp_path / "run.yaml"), "--processes", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 3 items x 2 methods: the first process's bar counts its own items' 4 samples, never all 6
    assert "/4 [" in proc.stderr and "/6 [" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "launched" / "shards").exists()  # merged into results.jsonl
    single = run_eval({**raw, "out": str(tmp_path / "single")}, quiet=True)
    launched = [json.loads(x) for x in (tmp_path / "launched" / RESULTS).read_text().splitlines()]
    assert strip(launched) == strip(single.records)


def test_public_data_suites_from_local_files(tmp_path, tiny):
    """LongBench (local jsonl through `datasets`) and InfiniteBench synthetic tasks run through eval."""
    pytest.importorskip("datasets")
    from .test_longbench import v1_example, write_jsonl

    model, tok = tiny
    data = write_jsonl(tmp_path / "qasper.jsonl", [v1_example("qasper", i) for i in range(3)])
    raw = {
        "model": "tiny-test", "methods": ["full"], "out": str(tmp_path / "out"),
        "suites": [
            {"suite": "longbench", "tasks": ["qasper"], "source": str(data), "lengths": [512], "samples": 2,
             "max_new_tokens": 4},
            {"suite": "infinitebench", "tasks": ["passkey", "kv_retrieval"], "lengths": [1500], "max_new_tokens": 4},
        ],
    }
    res = run_eval(raw, quiet=True, model=model, tokenizer=tok)
    got = sorted((r["suite"], r["task"], r["sample"]) for r in res.records)
    assert got == [("infinitebench", "kv_retrieval", 0), ("infinitebench", "passkey", 0),
                   ("longbench", "qasper", 0), ("longbench", "qasper", 1)]
    assert all(r["n_tokens"] + 4 <= r["length"] for r in res.records)
    assert all(0.0 <= r["score"] <= 1.0 for r in res.records)


def test_several_models_get_one_subfolder_each(tmp_path):
    from kvtools.eval.run import split_models

    raw = run_dict(tmp_path)
    raw.pop("model")
    raw["models"] = ["smollm2-135m", "org/Some-Model"]
    runs = split_models(load_run(raw))
    assert [(r.spec.model, str(sub)) for r, sub in runs] == [
        ("smollm2-135m", str(tmp_path / "smollm2-135m")), ("org/Some-Model", str(tmp_path / "Some-Model"))]
    raw["model"] = "x"
    with pytest.raises(ConfigError, match="give one of them"):
        load_run(raw)


def test_run_dtype_loads_the_model_in_it_and_a_folder_holds_one_dtype(tmp_path, tiny, monkeypatch):
    """``dtype:`` in a run file (``kvtools niah --dtype``): the model is loaded in it, the run file says it, and a
    folder of float32 results (also one written before the option) refuses a bfloat16 run."""
    import kvtools.models

    model, tok = tiny
    loaded: list = []

    def fake_load(name=None, dtype=torch.float32, device=None, **kw):
        loaded.append(dtype)
        return model.to(dtype), tok

    monkeypatch.setattr(kvtools.models, "load_model", fake_load)
    monkeypatch.setattr(kvtools.models, "model_context_length", lambda name: 4096)
    raw = {**run_dict(tmp_path / "bf16"), "dtype": "bfloat16"}
    raw["suites"] = raw["suites"][:1]
    try:
        res = run_eval(raw, quiet=True, report=False)
    finally:
        model.float()
    assert loaded == [torch.bfloat16] and len(res.records) == 4
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["dtype"] == "bfloat16"
    raw32 = {**raw, "dtype": "float32", "out": str(tmp_path / "fp32")}
    run_eval(raw32, quiet=True, model=model, tokenizer=tok, report=False)
    run_json = json.loads((tmp_path / "fp32" / "run.json").read_text())
    del run_json["dtype"]  # as kvtools wrote it before the option: float32
    (tmp_path / "fp32" / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(ConfigError, match="different run.*dtype: 'float32' there, 'bfloat16' now"):
        run_eval({**raw32, "dtype": "bfloat16"}, quiet=True, model=model, tokenizer=tok)
    with pytest.raises(ConfigError, match="dtype"):
        load_run({**raw32, "dtype": "int8"})


def test_niah_command_takes_a_dtype(tmp_path, tiny, monkeypatch):
    import kvtools.models
    from kvtools.cli import main

    model, tok = tiny
    loaded: list = []
    monkeypatch.setattr(kvtools.models, "load_model", lambda name=None, dtype=torch.float32, device=None, **kw: (
        loaded.append(dtype) or model.to(dtype), tok))
    monkeypatch.setattr(kvtools.models, "model_context_length", lambda name: 4096)
    out = tmp_path / "niah"
    try:
        assert main(["niah", "--config", "full", "--lengths", "600", "--depths", "0", "--max-new-tokens", "4",
                     "--out", str(out), "--quiet", "--dtype", "bfloat16"]) == 0
    finally:
        model.float()
    assert loaded == [torch.bfloat16] and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_a_model_passed_in_another_dtype_is_refused(tmp_path, tiny):
    model, tok = tiny
    raw = {**run_dict(tmp_path / "x"), "dtype": "bfloat16"}
    with pytest.raises(ConfigError, match="dtype: the run is bfloat16, the model passed to it is float32"):
        run_eval(raw, quiet=True, model=model, tokenizer=tok)
    assert not (tmp_path / "x").exists()


def test_an_items_shared_prefill_is_freed_before_the_next_item(tmp_path, tiny, monkeypatch):
    # a 32k shared prefill holds gigabytes: once its item is done nothing may keep it when the loop hands the
    # freed memory back (_release_memory, after every item)
    import weakref

    import kvtools.eval.run as run_mod

    made, alive = [], []
    real_prefill, real_release = run_mod.dense_prefill, run_mod._release_memory

    def tracking(*args, **kwargs):
        out = real_prefill(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    def checking():
        real_release()
        alive.append(sum(r() is not None for r in made))

    monkeypatch.setattr(run_mod, "dense_prefill", tracking)
    monkeypatch.setattr(run_mod, "_release_memory", checking)
    spec = {"model": "tiny-test", "seed": 1, "out": str(tmp_path), "share_prefill": True,
            "methods": ["full", {"name": "snap", "cache": {"method": "snapkv", "budget": 0.5, "window": 8}},
                        {"name": "snap-25", "cache": {"method": "snapkv", "budget": 0.25, "window": 8}}],
            "suites": [{"suite": "niah", "lengths": [1024], "depths": [0, 100], "max_new_tokens": 4}]}
    model, tok = tiny
    res = run_eval(spec, quiet=True, model=model, tokenizer=tok)
    assert len(res.records) == 6 and all(r.get("prefill") == "shared" for r in res.records)
    assert len(made) == 2 and alive == [0, 0, 0, 0]  # after each storage is dropped and after each item


def test_an_items_storages_are_held_one_at_a_time_and_none_while_a_method_prefills_alone(tmp_path, monkeypatch):
    # the run names an int8 method between dense ones, then one whose storage has no other user (it prefills alone),
    # before the int8 storage's last method: the loop runs each storage's methods together, then the lone one
    import weakref

    import kvtools.eval.generation as generation
    import kvtools.eval.run as run_mod

    # bitsandbytes may log a warning with an exception when first imported; pytest keeps that record, whose
    # traceback would keep the int8 prefill being made alive: import it before the run
    pytest.importorskip("bitsandbytes.functional")
    made, held_at_prefill = [], []
    real_prefill, real_generate = run_mod.dense_prefill, generation.generate_greedy

    def tracking(*args, **kwargs):
        held_at_prefill.append(("shared", sum(r() is not None for r in made)))
        out = real_prefill(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    def generating(*args, **kwargs):
        if kwargs.get("prefill") is None:
            held_at_prefill.append(("own", sum(r() is not None for r in made)))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(run_mod, "dense_prefill", tracking)
    monkeypatch.setattr(generation, "generate_greedy", generating)
    snap = {"method": "snapkv", "budget": 0.5, "window": 8}
    spec = {"model": "tiny-test", "seed": 1, "out": str(tmp_path), "share_prefill": True,
            "methods": ["full", {"name": "full-int8", "quant": {"bits": 8}}, {"name": "full-int8-r0", "quant": {"bits": 8, "residual": 0}},
                        {"name": "snap", "cache": snap}, {"name": "snap-int8", "quant": {"bits": 8}, "cache": snap}],
            "suites": [{"suite": "niah", "lengths": [1024], "depths": [0], "max_new_tokens": 4}]}
    res = run_eval(spec, quiet=True, model=tiny_lm(head_dim=64), tokenizer=byte_tokenizer())
    # the int8 prefill starts once the dense one is gone, and the lone one once the int8 one is
    assert held_at_prefill == [("shared", 0), ("shared", 0), ("own", 0)]
    assert {r["method"]: r.get("prefill") for r in res.records}["full-int8-r0"] is None
