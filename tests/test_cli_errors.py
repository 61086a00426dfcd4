"""The README's promise for bad input: a KVToolsError before any expensive work, `error: <message>` and exit
status 2 from the CLI, no model load and no files left behind.

No real model loads here: `kvtools.models.load_model` fails the test if reached, models are a folder holding
only a config.json (or a GGUF header), and the hub is declared unreachable instead of being asked.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import kvtools
import kvtools.models
from kvtools.cli import main
from kvtools.errors import ConfigError, InputTooLongError, ModelNotAvailableError
from kvtools.eval.niah import run_niah
from kvtools.eval.run import load_run, run_eval

from .test_niah import CONFIGS, FakeBackend

pytestmark = pytest.mark.mechanics

CONTEXT = 4096


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A local model folder with only its config.json (context 4096): enough for every check, nothing loads."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("tiny-model")
    LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=CONTEXT).save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    def fail(*a, **k):
        pytest.fail("model loaded before the checks")

    monkeypatch.setattr(kvtools.models, "load_model", fail)
    monkeypatch.setattr(kvtools, "load_model", fail)


@pytest.fixture
def offline(monkeypatch):
    """The hub is unreachable (declared, not probed), and nothing may try it anyway."""
    monkeypatch.setattr(kvtools.models, "hub_unreachable", lambda *a, **k: "unreachable in this test")
    try:
        import datasets
        import huggingface_hub
    except ImportError:
        return
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was tried"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the hub was tried"))


def cli(capsys, *argv) -> str:
    """Run the CLI in-process; it must fail with status 2 and a one-line `error:` message; returns stderr."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def write_run(path: Path, out: Path, model: str | None = None, **suite) -> Path:
    raw = {"methods": ["full"], "out": str(out),
           "suites": [suite or {"suite": "niah", "lengths": [256], "depths": [50], "max_new_tokens": 4}]}
    if model is not None:
        raw["model"] = model
    path.write_text(json.dumps(raw))
    return path


def files_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


# ---------------------------------------------------------------- 1. public datasets, no hub
@pytest.mark.parametrize("suite, task, dataset", [
    ("longbench", "qasper", "THUDM/LongBench"),
    ("infinitebench", "longbook_qa_eng", "xinrongzhang2022/InfiniteBench"),
])
def test_eval_real_data_without_hub_fails_at_once_naming_the_source_key(
        tmp_path, capsys, offline, model_dir, suite, task, dataset):
    pytest.importorskip("datasets")
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.yaml", out, str(model_dir), suite=suite, tasks=[task], lengths=["1k"])
    err = cli(capsys, "eval", run)
    assert f"suites[0].source: cannot load '{dataset}' ({task})" in err and "unreachable in this test" in err
    assert f"{task}.jsonl" in err and "HF_HUB_OFFLINE=1" in err  # how to give local files, or use the cache
    assert not out.exists()  # no run.json, no results


@pytest.mark.parametrize("suite, task", [("longbench", "hotpotqa"), ("infinitebench", "longbook_qa_eng")])
def test_eval_real_data_in_offline_mode_tries_only_the_cache(tmp_path, capsys, monkeypatch, model_dir, suite, task):
    """HF_HUB_OFFLINE=1 (as read by the libraries at start) and an empty HF cache: the libraries' own error,
    which comes at once in offline mode, becomes the `error:` line."""
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    out = tmp_path / "out"
    run = write_run(tmp_path / "run.yaml", out, str(model_dir), suite=suite, tasks=[task], lengths=["1k"])
    err = cli(capsys, "eval", run, "--quiet")
    assert "suites[0].source: cannot load " in err and "from the HF cache (offline mode: HF_HUB_OFFLINE=1)" in err
    assert f"a folder holding {task}.jsonl" in err
    assert not out.exists()


# ---------------------------------------------------------------- 2. models that cannot be found
COMMANDS = {  # every command with --model, with fast options
    "niah": ["niah", "--lengths", "1k", "--depths", "50"],
    "bench": ["bench", "--lengths", "1k"],
    "bench-attention": ["bench-attention", "--lengths", "1k", "--backends", "torch", "--repeats", "1"],
    "bench-recall": ["bench-recall", "--length", "1k"],
    "calibrate": ["calibrate", "duo", "--lengths", "1k"],
}


def _out_for(cmd: str, tmp_path: Path) -> Path:
    return tmp_path / ("gates.tsv" if cmd == "calibrate" else "out")


@pytest.mark.parametrize("cmd", [*COMMANDS, "eval"])
@pytest.mark.parametrize("model, pattern", [
    ("foo/bar", r"model 'foo/bar': no such local folder .*not in the HF cache, and the hub is unavailable"),
    ("{tmp}/missing/model", r"model folder not found: .*missing/model"),
    ("{tmp}/missing.gguf", r"GGUF file not found"),
    ("{tmp}", r"not a model folder \(need the config.json"),
])
def test_missing_model_is_an_error_before_any_load(tmp_path, capsys, offline, cmd, model, pattern):
    import re

    model = model.format(tmp=tmp_path)
    out = _out_for(cmd, tmp_path)
    if cmd == "eval":
        argv = ["eval", write_run(tmp_path / "run.yaml", out, model)]
    else:
        argv = [*COMMANDS[cmd], "--model", model, "--out", out]
    before = files_under(tmp_path)
    assert re.search(pattern, cli(capsys, *argv))
    assert files_under(tmp_path) == before


def test_load_model_turns_a_missing_hub_model_into_model_not_available(offline, monkeypatch):
    monkeypatch.undo()  # the real load_model; the hub stays unreachable
    monkeypatch.setattr(kvtools.models, "hub_unreachable", lambda *a, **k: "unreachable in this test")
    with pytest.raises(ModelNotAvailableError, match="model 'foo/bar'.*unreachable in this test"):
        kvtools.models.load_model("foo/bar")


# ---------------------------------------------------------------- 3. --out that cannot be a folder
@pytest.mark.parametrize("cmd", [*COMMANDS, "eval"])
@pytest.mark.parametrize("under", [False, True])
def test_out_on_or_under_a_file_fails_before_any_work(tmp_path, capsys, cmd, under):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    out = blocker / "sub" if under else blocker
    if cmd == "calibrate":  # --out is the pattern file: an existing file is replaced, a folder is refused
        out = blocker / "gates.tsv" if under else tmp_path
    argv = ["eval", write_run(tmp_path / "run.yaml", tmp_path / "elsewhere"), "--out", out] if cmd == "eval" \
        else [*COMMANDS[cmd], "--out", out]
    err = cli(capsys, *argv)
    assert "--out: " in err
    assert ("which is a file" if under else ("is a folder" if cmd == "calibrate" else "is a file")) in err
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == \
        sorted(["a-file", *(["run.yaml"] if cmd == "eval" else [])])


def test_eval_run_file_out_under_a_file(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    err = cli(capsys, "eval", write_run(tmp_path / "run.yaml", tmp_path / "a-file" / "out"))
    assert err.startswith("error: out: ") and "which is a file" in err


def test_processes_refused_on_gpus_and_under_a_launcher(tmp_path, capsys, model_dir, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("workers started"))
    run = write_run(tmp_path / "run.yaml", tmp_path / "out", str(model_dir))
    raw = json.loads(run.read_text())
    (tmp_path / "gpu.yaml").write_text(json.dumps({**raw, "device": "cuda"}))
    err = cli(capsys, "eval", tmp_path / "gpu.yaml", "--processes", "2")
    assert "on GPUs use accelerate launch" in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = cli(capsys, "eval", run, "--processes", "2")
    assert "already runs under a launcher" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse: not a positive count
        main(["eval", str(run), "--processes", "0"])


# ---------------------------------------------------------------- 4. lengths beyond the context, from the config
@pytest.mark.parametrize("cmd", [*COMMANDS, "eval"])
def test_length_beyond_context_is_refused_from_the_config(tmp_path, capsys, model_dir, cmd):
    out = _out_for(cmd, tmp_path)
    if cmd == "eval":
        argv = ["eval", write_run(tmp_path / "run.yaml", out, str(model_dir), suite="niah", lengths=["8k"])]
    else:
        argv = [*COMMANDS[cmd], "--model", model_dir, "--out", out]
        argv[argv.index("--length" if cmd == "bench-recall" else "--lengths") + 1] = "8k"
    err = cli(capsys, *argv)
    assert f"[8192] exceed the model's context of {CONTEXT} tokens" in err
    assert not out.exists()


def write_gguf_header(path: Path, arch: str, context: int) -> Path:
    """A GGUF file holding only metadata: arrays before the context length, as real files have."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    kv = [
        s("general.architecture") + struct.pack("<I", 8) + s(arch),
        s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + s("a") + s("b"),
        s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0, 0, 0),
        s(f"{arch}.context_length") + struct.pack("<II", 4, context),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv)) + b"".join(kv))
    return path


def test_gguf_context_is_read_from_its_header(tmp_path, capsys):
    gguf = write_gguf_header(tmp_path / "m.gguf", "qwen3", 512)
    assert kvtools.models.model_context_length(str(gguf)) == 512
    err = cli(capsys, "niah", "--model", gguf, "--lengths", "256,1k", "--out", tmp_path / "out")
    assert "lengths: [1024] exceed the model's context of 512 tokens" in err
    assert not (tmp_path / "out").exists()


def test_default_model_64k_is_refused_before_loading(tmp_path, capsys):
    try:
        context = kvtools.models.model_context_length(None)
    except ModelNotAvailableError as exc:
        pytest.skip(str(exc))
    assert context == 8192  # SmolLM2-135M, as EMBEDDED says
    err = cli(capsys, "niah", "--lengths", "64k", "--out", tmp_path / "out")
    assert "[65536] exceed the model's context of 8192 tokens" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 5. a failed run leaves nothing that blocks the next
def test_failed_niah_leaves_no_config_and_the_corrected_run_goes_on(tmp_path, capsys, offline):
    out = tmp_path / "run"
    cli(capsys, "niah", "--model", "foo/bar", "--lengths", "256", "--depths", "50", "--out", out)
    fake = FakeBackend(context=300)
    with pytest.raises(InputTooLongError):
        fake.run(out, lengths=[256, 512], depths=[50], samples=1, report=False)
    assert not out.exists()
    fake = FakeBackend()
    fake.run(out, lengths=[256], depths=[50], samples=1, report=False)
    assert len(fake.calls) == 2 and json.loads((out / "config.json").read_text())["model"] == "fake-model"


def test_niah_config_without_results_does_not_block(tmp_path):
    """A folder left by an earlier version (config.json of another run, no results) is taken over."""
    tmp_path.joinpath("config.json").write_text(json.dumps({"suite": "niah", "model": "other", "seed": 7,
                                                            "configs": {}, "lengths": [64], "depths": [0]}))
    fake = FakeBackend()
    fake.run(tmp_path, lengths=[256], depths=[50], samples=1, report=False)
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0 and len(fake.calls) == 2
    with pytest.raises(ConfigError, match="different run"):  # with results, a different run is still refused
        run_niah("other-model", CONFIGS, [256], [50], 1, tmp_path, model=fake.model, tokenizer=fake.tokenizer,
                 generate_fn=fake.generate, patch_fn=fake.patch, quiet=True)


def test_eval_run_json_without_results_does_not_block(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from .helpers import byte_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=CONTEXT, eos_token_id=1, bos_token_id=1)).eval()
    raw = json.loads(write_run(tmp_path / "run.yaml", tmp_path / "out", "tiny").read_text())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "run.json").write_text(json.dumps({"model": "other", "seed": 9, "methods": {}}))
    res = run_eval(raw, quiet=True, model=model, tokenizer=byte_tokenizer())
    assert len(res.records) == 1 and json.loads((tmp_path / "out" / "run.json").read_text())["model"] == "tiny"


# ---------------------------------------------------------------- 6. run files: empty, duplicate keys, booleans
@pytest.mark.parametrize("text, pattern", [
    ("", r"empty run file .*expected a mapping with keys model, methods, suites"),
    ("# only a comment\n", r"empty run file"),
    ("methods: [full]\nseed: 1\nseed: 2\nsuites: [{suite: niah, lengths: [1k]}]\n",
     r"duplicate key 'seed' at line 3, column 1 \(first at line 2"),
    ("methods: [full]\nsuites: [{suite: niah, lengths: [1k], samples: 2, samples: 3}]\n", r"duplicate key 'samples'"),
    ("methods: [full]\nseed: true\nsuites: [{suite: niah, lengths: [1k]}]\n",
     r"run\.seed: expected a number, not a boolean, got True"),
    ("methods: [full]\nsuites: [{suite: niah, lengths: [1k], samples: true}]\n",
     r"suites\[0\]\.samples: expected a number, not a boolean, got True \(niah\)"),
    ("methods: [full]\nsuites: [{suite: ppl, lengths: [1k], chunk: false}]\n", r"suites\[0\]\.chunk: .*not a boolean"),
    ("methods: [full]\nsuites: [{suite: ruler, lengths: [1k], max_new_tokens: true}]\n",
     r"suites\[0\]\.max_new_tokens: .*not a boolean"),
    ("methods: [{name: sl, cache: {method: streamingllm, window: true}}]\nsuites: [{suite: niah, lengths: [1k]}]\n",
     r"methods\[0\]: cache\.window: expected a number, not a boolean, got True"),
])
def test_bad_run_files_are_config_errors(tmp_path, capsys, text, pattern):
    import re

    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_run(path)
    assert re.search(pattern, cli(capsys, "eval", path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_method_config_file_errors_through_the_cli(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n")
    assert "empty config file" in cli(capsys, "niah", "--config", empty, "--out", tmp_path / "out")
    dup = tmp_path / "dup.yaml"
    dup.write_text("cache:\n  method: snapkv\n  budget: 64\n  budget: 128\n")
    assert "duplicate key 'budget'" in cli(capsys, "bench", "--config", f"full,{dup}", "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()
