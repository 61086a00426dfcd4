"""The de-quantised model cache of ``load_model()``: a cached load is the GGUF load, entries are keyed by the
file and transformers, partial / unreadable / unwritable caches never fail a load."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from kvtools import models
from kvtools.cli import main

from .conftest import random_ids, tiny_model
from .helpers import byte_tokenizer


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_an_entry_reads_back_as_the_model_it_stored(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    entry = tmp_path / "models" / "tiny-abc-tf5"
    assert models.read_cache_entry(entry, torch.float32) is None  # nothing there yet
    assert models.store_cache_entry(entry, model, tok)
    back, back_tok = models.read_cache_entry(entry, torch.float32)
    assert type(back) is type(model) and _same_weights(back, model)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    text = "The special magic number is 7163431. Ünïcode ☃"
    assert back_tok.encode(text) == tok.encode(text)
    chat = [{"role": "user", "content": text}]
    assert back_tok.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    half, _ = models.read_cache_entry(entry, torch.bfloat16)  # another dtype: the stored fp32, cast
    assert half.dtype == torch.bfloat16 and _same_weights(half, copy.deepcopy(model).to(torch.bfloat16))
    placed, _ = models.read_cache_entry(entry, torch.float32, device_map="cpu")  # from_pretrained's options pass
    assert _same_weights(placed, model)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left behind


def test_a_partial_entry_is_ignored_and_an_unreadable_one_rebuilt(tmp_path):
    model, tok = tiny_model("llama"), byte_tokenizer()
    entry = tmp_path / "e"
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # an interrupted write: no completion marker
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert models.read_cache_entry(entry, torch.float32) is None  # silently: it is simply not there
    (entry / models._COMPLETE).write_text("")
    with pytest.warns(UserWarning, match="cannot be read.*rebuilding"):
        assert models.read_cache_entry(entry, torch.float32) is None
    assert models.store_cache_entry(entry, model, tok)  # replaces the broken entry
    assert _same_weights(models.read_cache_entry(entry, torch.float32)[0], model)


def test_an_unwritable_cache_warns_and_the_load_goes_on(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="cannot write the model cache.*KVTOOLS_CACHE.*--no-cache"):
        assert not models.store_cache_entry(blocker / "models" / "x", tiny_model("llama"), byte_tokenizer())


def test_entries_are_keyed_by_the_file_content_and_transformers(tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("KVTOOLS_CACHE", str(tmp_path / "c"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF one")
    first = models.gguf_cache_entry(f)
    assert first.parent == tmp_path / "c" / "models" and first.name.startswith("m-")
    assert first.name.endswith(f"-tf{transformers.__version__}")
    f.write_bytes(b"GGUF two")  # same size, new content
    os.utime(f, ns=(1, 1))
    assert models.gguf_cache_entry(f) != first
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    assert models.gguf_cache_entry(f).name.endswith("-tf9.9.9")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KVTOOLS_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.model_cache_dir() == tmp_path / "xdg" / "kvtools" / "models"
    monkeypatch.setenv("KVTOOLS_CACHE", str(tmp_path / "k"))
    assert models.model_cache_dir() == tmp_path / "k" / "models"


@pytest.mark.parametrize("argv", [["--no-cache", "configs"], ["configs", "--no-cache"]])
def test_no_cache_option_turns_the_cache_off(argv, monkeypatch, capsys):
    monkeypatch.delenv("KVTOOLS_MODEL_CACHE", raising=False)
    assert main(argv) == 0
    assert os.environ["KVTOOLS_MODEL_CACHE"] == "0"
    monkeypatch.delenv("KVTOOLS_MODEL_CACHE")
    assert main(["configs"]) == 0 and "KVTOOLS_MODEL_CACHE" not in os.environ


def test_the_cached_smollm2_is_the_gguf_one(tmp_path, monkeypatch):
    """The embedded model: the first load de-quantises the GGUF and writes the entry; the second reads it,
    with the same weights and tokenizer."""
    monkeypatch.setenv("KVTOOLS_CACHE", str(tmp_path))
    monkeypatch.delenv("KVTOOLS_MODEL_CACHE", raising=False)
    try:
        first, tok1 = models.load_model()
    except models.ModelNotAvailableError as exc:  # pragma: no cover - the README setup installs it
        pytest.skip(str(exc))
    (entry,) = (tmp_path / "models").iterdir()
    assert (entry / models._COMPLETE).is_file()
    second, tok2 = models.load_model()
    assert _same_weights(first, second)
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # still tied
    text = "What is the special magic number for Tbilisi? 7163431"
    assert tok1.encode(text) == tok2.encode(text) and tok2.pad_token == tok1.pad_token
    chat = [{"role": "user", "content": text}]
    assert tok1.apply_chat_template(chat, tokenize=False) == tok2.apply_chat_template(chat, tokenize=False)
