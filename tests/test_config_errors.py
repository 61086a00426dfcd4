"""Invariant 5: bad configs and unsupported models fail at patch() with a message naming key, value, options."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import kvtools
from kvtools import ConfigError, UnsupportedModelError
from kvtools.config import list_presets, load_config

pytestmark = pytest.mark.mechanics


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        ({"cache": {"method": "snapkv", "window": 0}}, r"cache\.window: .*greater than or equal to 1.*got 0"),
        ({"cache": {"method": "snapkv", "windw": 8}}, r"cache\.windw: unknown key .*did you mean 'window'"),
        ({"cache": {"method": "snapkv", "pool": "mean"}}, r"cache\.pool: .*'max' or 'avg'.*got 'mean'"),
        ({"cache": {"method": "snapkv", "kernel": 4}}, r"cache\.kernel: must be odd"),
        ({"cache": {"method": "snapkv", "budget": 1.5}}, r"cache\.budget: .*fraction.*\(0, 1\], got 1\.5"),
        ({"cache": {"method": "snapkv", "budget": 8, "window": 32}}, r"cache\.budget: must be >= cache\.window"),
        ({"cache": {"method": "snapkvv"}}, r"cache\.method: unknown value 'snapkvv' \(did you mean 'snapkv'\?\); allowed: full"),
        ({"cache": {"method": "dense"}}, r"'dense' is a prefill method"),
        ({"cache": {"method": "streamingllm", "positions": "rope"}}, r"cache\.positions: .*'cache' or 'original'"),
        ({"cache": {"method": "streamingllm", "n_sink": -1}}, r"cache\.n_sink: .*got -1"),
        ({"prefill": {"method": "dense", "chunk": 0}}, r"prefill\.chunk: .*got 0"),
        ({"prefill": {"method": "dense", "chunk": 1}}, r"prefill\.chunk: .*got 1"),
        ({"cache": {"method": "snapkv", "per_chunk": True}}, r"cache\.per_chunk: .*not chunked.*chunk: N"),
        ({"cache": {"method": "duo", "retrieval_heads": {0: [0]},
                    "streaming": {"method": "knorm", "budget": 0.5, "per_chunk": True}}}, r"cache\.per_chunk"),
        ({"cahce": {"method": "full"}}, r"cahce: unknown top-level key \(did you mean 'cache'\?\)"),
        ({"cache": {}}, r"cache\.method: missing; allowed"),
        ([1, 2], r"config: must be a mapping"),
    ],
)
def test_bad_config_messages(cfg, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(cfg) if isinstance(cfg, dict) else kvtools.config.config_from_dict(cfg)


def test_bad_config_fails_before_touching_the_model(llama):
    with pytest.raises(ConfigError):
        kvtools.patch(llama, {"cache": {"method": "snapkv", "budget": -3}})
    assert not hasattr(llama, "_kvtools_patch")
    assert all("forward" not in m.__dict__ for m in llama.modules())


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"unknown preset 'snapk' \(did you mean 'snapkv'\?\); available presets: "):
        load_config("snapk")


def test_yaml_files_load_and_bad_yaml_is_reported(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("cache: {method: streamingllm, n_sink: 2, window: 64}\n")
    cfg = load_config(good)
    assert cfg.name == "mine" and cfg.cache.window == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("cache: {method: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_preset_validates():
    presets = list_presets()
    assert {"full", "snapkv", "streamingllm", "snapkv-0.25", "streamingllm-0.25"} <= set(presets)
    for name, desc in presets.items():
        assert load_config(name).name == name and desc


def test_unsupported_family_lists_supported_ones():
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' .* not supported; supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        kvtools.patch(gpt2, "full")


def test_missing_gguf_file_names_the_problem(tmp_path):
    with pytest.raises(kvtools.ModelNotAvailableError, match="GGUF file not found"):
        kvtools.load_model(str(tmp_path / "nope.gguf"))


# ---------------------------------------------------------------- YAML and types that used to pass silently
def test_empty_yaml_is_an_error_not_the_full_config(tmp_path):
    for text in ("", "\n", "# nothing but a comment\n"):
        path = tmp_path / "empty.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=r"empty\.yaml: empty config file .*expected a mapping with keys prefill"):
            load_config(path)


@pytest.mark.parametrize("text, key", [
    ("cache:\n  method: snapkv\n  budget: 64\n  budget: 128\n", "budget"),
    ("cache: {method: streamingllm, window: 64, window: 32}\n", "window"),
    ("cache: {method: full}\ncache: {method: snapkv}\n", "cache"),
])
def test_duplicate_yaml_keys_are_errors(tmp_path, text, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup\.yaml: duplicate key '{key}' at line \d+, column \d+ \(first at line"):
        load_config(path)


def test_yaml_merge_keys_may_still_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("name: m\ncache:\n  <<: {method: streamingllm, n_sink: 2, window: 64}\n  window: 32\n")
    cfg = load_config(path)
    assert cfg.cache.window == 32 and cfg.cache.n_sink == 2


@pytest.mark.parametrize("cfg, key", [
    ({"cache": {"method": "streamingllm", "window": True}}, "cache.window"),
    ({"cache": {"method": "streamingllm", "n_sink": False}}, "cache.n_sink"),
    ({"cache": {"method": "snapkv", "budget": True}}, "cache.budget"),
    ({"prefill": {"method": "dense", "chunk": True}}, "prefill.chunk"),
    ({"prefill": {"method": "flexprefill", "gamma": True}}, "prefill.gamma"),
    ({"decode": {"method": "recycled", "s": False}}, "decode.s"),
    ({"cache": {"method": "duo", "retrieval_heads": {0: [True]}}}, "cache.retrieval_heads"),
])
def test_booleans_are_not_numbers(cfg, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected a number, not a boolean, got "):
        load_config(cfg)


def test_numbers_and_booleans_where_they_belong_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache: {method: snapkv, budget: 1.0, window: 32}\n")
    assert load_config(path).cache.budget == 1.0 and isinstance(load_config(path).cache.budget, float)  # fraction
    path.write_text("cache: {method: snapkv, budget: 1024}\n")
    assert load_config(path).cache.budget == 1024 and isinstance(load_config(path).cache.budget, int)  # slots
    rec = load_config({"decode": {"method": "recycled", "s": 1, "dynamic": True}}).decode
    assert rec.s == 1.0 and rec.dynamic is True  # an int for a float field, a bool for a bool field
    assert load_config({"cache": {"method": "retrieval", "insert": False}, "decode": "retrieval"}).cache.insert is False


@pytest.mark.parametrize("old, new", [
    ({"cache": {"method": "duo", "retrieval_heads": {0: [0]}, "recent": 12}},
     {"cache": {"method": "duo", "retrieval_heads": {0: [0]}, "window": 12}}),
    ({"prefill": {"method": "hip", "k": 64}, "decode": {"method": "hip", "k": 32}},
     {"prefill": {"method": "hip", "top_k": 64}, "decode": {"method": "hip", "top_k": 32}}),
])
def test_renamed_keys_still_load_with_a_warning(old, new):
    """One vocabulary (window: recent tokens kept; top_k: keys selected); configs written with the old keys
    load to the same config, with a FutureWarning naming the new key."""
    with pytest.warns(FutureWarning, match="is deprecated, use '(window|top_k)'"):
        got = load_config(old)
    assert got.to_dict() == load_config(new).to_dict()
    record = {**load_config(new).to_dict(), **old}  # a results folder's config.json written before the rename
    assert record != got.to_dict() and kvtools.config.same_method(record, got.to_dict())  # still resumes


def test_old_params_class_names_still_import_with_a_warning():
    from kvtools.methods.snapkv import SnapKVParams

    with pytest.warns(DeprecationWarning, match="SnapKVCache is deprecated: use kvtools.methods' SnapKVParams"):
        from kvtools.config import SnapKVCache
    assert SnapKVCache is SnapKVParams


def test_cross_stage_rules_live_with_the_params():
    """Each rule is declared by the method's parameter model and enforced for every stage."""
    from kvtools.methods import STAGE_MODELS

    rules = {(s, m): p.requires for s, models in STAGE_MODELS.items() for m, p in models.items() if p.requires}
    assert rules  # hip decode, recycled, retrieval declare theirs
    for (stage, method), requires in rules.items():
        for other, allowed in requires.items():
            bad = next(m for m in STAGE_MODELS[other] if m not in allowed)
            cfg = {stage: _minimal(stage, method), other: _minimal(other, bad)}
            with pytest.raises(ConfigError, match=rf"{stage}\.method: '{method}' .* needs {other}\.method"):
                load_config(cfg)


def _minimal(stage, method):
    return {"method": method, "retrieval_heads": {0: [0]}} if method == "duo" else {"method": method}
