"""Needle in a haystack: haystack, prompt fitting, grid parsing, scoring, resume, reports, CLI.

No real model: a word-level fake tokenizer (and one HF tokenizer built in memory),
a fake model/patch and an injected generate function.
"""

from __future__ import annotations

import json
import re
import zlib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kvtools.errors import ConfigError, InputTooLongError
from kvtools.eval.generation import Generation
from kvtools.eval.grid import parse_depths, parse_lengths
from kvtools.eval.haystack import NEEDLE_KEYS, build_niah_prompt, filler_sentences, load_haystack_dir, score_output
from kvtools.eval.niah import run_niah
from kvtools.eval.plots import plot_heatmaps
from kvtools.eval.report import read_results, summarize, summary_markdown, write_summary
from kvtools.eval.run import run_eval
from kvtools.eval.suites import Item, sample_seed


# ---------------------------------------------------------------- fakes
class WordTokenizer:
    """Word/punctuation tokenizer with a tiny chat template; enough for the prompt builder."""

    eos_token_id = 0
    pad_token_id = 0
    chat_template = "fake"

    def __init__(self, chat: bool = True) -> None:
        self.vocab: dict[str, int] = {"<eos>": 0, "<bos>": 1}
        if not chat:
            self.chat_template = None  # type: ignore[assignment]

    def _id(self, token: str) -> int:
        # a fixed id per token, as a real tokenizer has (not the order this instance met them in)
        return self.vocab.setdefault(token, 2 + zlib.crc32(token.encode()))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(t) for t in re.findall(r"<\|\w+\|>|\w+|[^\w\s]", text)]
        return ([1] if add_special_tokens else []) + ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv[int(i)] for i in ids)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = False):
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")


def user_content(text: str) -> str:
    return text.split("<|user|>\n", 1)[1].split("\n\nWhat is the special magic number", 1)[0]


CONFIGS = [
    {"name": "full", "cache": {"method": "full"}},
    {"name": "streamingllm", "cache": {"method": "streamingllm", "n_sink": 4, "window": 64}},
]


class FakeBackend:
    """Fake model, patch and generate: full always answers; streamingllm only sees a recent needle."""

    def __init__(self, fail_after: int | None = None, context: int = 4096) -> None:
        self.model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=context))
        self.tokenizer = WordTokenizer()
        self.calls: list[tuple[str, int, float, int]] = []
        self.fail_after = fail_after

    @contextmanager
    def patch(self, model: Any, cfg: Any):
        yield SimpleNamespace(name=cfg.name)

    def generate(self, model: Any, tokenizer: Any, handle: Any, prompt: Any, max_new_tokens: int) -> Generation:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((handle.name, prompt.length, prompt.depth, prompt.n_tokens))
        if handle.name == "full":
            return Generation(f" {prompt.value}.", kv_bytes=100 * prompt.n_tokens, prefill_s=0.01, decode_s=0.02)
        found = prompt.depth_actual >= 90
        text = f" {prompt.value}." if found else " 1234567."
        return Generation(text, kv_bytes=100 * 68, prefill_s=0.005, decode_s=0.02)

    def run(self, out: Path, **kw: Any):
        args = dict(configs=CONFIGS, lengths=[256, 512], depths=[0, 50, 100], samples=2, out_dir=out, quiet=True)
        args.update(kw)
        return run_niah(
            "fake-model", **args, model=self.model, tokenizer=self.tokenizer,
            generate_fn=self.generate, patch_fn=self.patch,
        )


# ---------------------------------------------------------------- haystack
def test_filler_is_varied_seeded_and_digit_free():
    a = filler_sentences(500, seed=1)
    assert len(set(a)) > 480, "filler must not repeat one line"
    assert len({s.split()[0] for s in a}) > 20, "sentences should start in many ways"
    assert a == filler_sentences(500, seed=1)
    assert a != filler_sentences(500, seed=2)
    assert not any(re.search(r"\d", s) for s in a)
    assert all(s[0].isupper() and s.endswith(".") for s in a)


def test_needle_keys_never_appear_in_filler():
    text = " ".join(filler_sentences(2000, seed=0)).lower()
    assert not [k for k in NEEDLE_KEYS if re.search(rf"\b{k.lower()}\b", text)]


@pytest.mark.parametrize("depth", [0, 25, 50, 75, 100])
def test_needle_lands_at_depth_snapped_to_sentence_end(depth):
    tok = WordTokenizer()
    p = build_niah_prompt(tok, 1024, depth, seed=3)
    content = user_content(p.text)
    before, after = content.split(p.needle)
    if depth == 0:
        assert before == ""
    else:
        assert before.endswith(". "), "needle must follow a full sentence"
    if depth == 100:
        assert after == ""
    assert after == "" or after.startswith(" ")
    # achieved depth: at or just before the request (snapped back by at most one sentence)
    assert p.depth_actual <= depth + 1e-9
    assert depth - p.depth_actual < 5
    words_before = len(tok.encode(before, add_special_tokens=False))
    words_all = len(tok.encode(content.replace(p.needle, ""), add_special_tokens=False))
    assert abs(100 * words_before / words_all - depth) < 5


def test_prompt_fits_length_and_ends_with_answer_prefix():
    tok = WordTokenizer()
    for length in (128, 200, 512, 777, 2048):
        for depth in (0, 33.3, 100):
            p = build_niah_prompt(tok, length, depth, seed=length, max_new_tokens=16)
            assert p.n_tokens + 16 <= length
            assert p.n_tokens + 16 > length - 40, "the haystack should fill the length up to a sentence"
            assert p.input_ids == tok.encode(p.text, add_special_tokens=False)
            assert p.text.endswith(f"<|assistant|>\nThe special magic number for {p.key} is:")
            assert f"What is the special magic number for {p.key}?" in p.text
            assert re.fullmatch(r"\d{7}", p.value)
            assert p.text.count(p.value) == 1


def test_prompt_is_deterministic_per_seed():
    tok = WordTokenizer()
    a, b = build_niah_prompt(tok, 512, 50, seed=7), build_niah_prompt(tok, 512, 50, seed=7)
    c = build_niah_prompt(tok, 512, 50, seed=8)
    assert a.text == b.text and (a.key, a.value) == (b.key, b.value)
    assert a.text != c.text


def test_prompt_without_chat_template_is_plain_text():
    tok = WordTokenizer(chat=False)
    p = build_niah_prompt(tok, 300, 50, seed=1)
    assert "<|user|>" not in p.text and p.input_ids[0] == 1
    assert p.text.endswith(f"\n\nThe special magic number for {p.key} is:")
    assert p.n_tokens + 16 <= 300


def test_length_beyond_context_or_below_overhead_raises():
    tok = WordTokenizer()
    with pytest.raises(InputTooLongError, match="exceeds the model's context of 2048"):
        build_niah_prompt(tok, 4096, 50, max_context=2048)
    with pytest.raises(InputTooLongError, match="alone take"):
        build_niah_prompt(tok, 30, 50)
    with pytest.raises(ConfigError, match="depth"):
        build_niah_prompt(tok, 512, 150)


def test_prompt_with_hf_tokenizer_and_jinja_template():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = {w for s in filler_sentences(3000, seed=0) for w in re.findall(r"\w+|[^\w\s]", s)}
    words |= {"The", "special", "magic", "number", "for", "is", "What", "?", ":", ".", *NEEDLE_KEYS}
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *sorted(words)])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    for length in (256, 1000):
        p = build_niah_prompt(tok, length, 40, seed=2, max_new_tokens=8, max_context=1024)
        assert p.n_tokens + 8 <= length
        assert p.n_tokens + 8 > length - 40
        assert p.text.startswith("<s>user\n") and p.text.endswith("is:")


def test_haystack_dir(tmp_path):
    with pytest.raises(ConfigError, match="folder not found"):
        load_haystack_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt files"):
        load_haystack_dir(tmp_path / "empty")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("Alpha beta gamma. Delta epsilon!\n\nZeta eta theta? Iota kappa.")
    (docs / "b.txt").write_text("Lambda mu nu. Xi omicron pi.")
    sentences = load_haystack_dir(docs)
    assert sentences == [
        "Alpha beta gamma.", "Delta epsilon!", "Zeta eta theta?", "Iota kappa.", "Lambda mu nu.", "Xi omicron pi.",
    ]
    p = build_niah_prompt(WordTokenizer(), 200, 50, seed=1, haystack=sentences)
    assert "omicron" in p.text and "fisherman" not in p.text
    assert p.n_tokens + 16 <= 200


# ---------------------------------------------------------------- grid parsing and scoring
def test_parse_lengths():
    assert parse_lengths("1k,2k,4k") == [1024, 2048, 4096]
    assert parse_lengths("1500, 0.5k,1k") == [512, 1024, 1500]
    assert parse_lengths("1k:4k:4") == [1024, 2048, 3072, 4096]
    assert parse_lengths([2048, 1024, 1024]) == [1024, 2048]


@pytest.mark.parametrize("spec", ["", "1k,,2k", "abc", "2x", "1k:2k", "1k:2k:0", "0", "1500.5", "-1k"])
def test_parse_lengths_errors(spec):
    with pytest.raises(ConfigError, match="lengths"):
        parse_lengths(spec)


def test_parse_depths():
    assert parse_depths("0:100:11") == [float(x) for x in range(0, 101, 10)]
    assert parse_depths("0:100:1") == [0.0]
    assert parse_depths("50,0,100,50") == [0.0, 50.0, 100.0]
    assert len(parse_depths("0:100:35")) == 35 and parse_depths("0:100:35")[1] == 2.94


@pytest.mark.parametrize("spec", ["", ",", "0:100", "0:100:x", "0:100:-2", "101", "-5", "1k", "a,b"])
def test_parse_depths_errors(spec):
    with pytest.raises(ConfigError, match="depths"):
        parse_depths(spec)


def test_score_is_substring_match_of_the_value():
    assert score_output(" 4614727.", "4614727") == 1.0
    assert score_output("The number is 4614727", "4614727") == 1.0
    assert score_output(" 461472", "4614727") == 0.0
    assert score_output("", "4614727") == 0.0


def cell_seed(seed: int, length: int, depth: float, sample: int) -> int:
    """The prompt seed of a NIAH grid cell."""
    return sample_seed(seed, Item("niah", "niah", length, sample, depth))


def test_cell_seed_is_method_independent_and_distinct():
    seeds = {cell_seed(0, n, d, s) for n in (1024, 2048) for d in (0.0, 50.0) for s in range(3)}
    assert len(seeds) == 12
    assert cell_seed(0, 1024, 50.0, 1) == cell_seed(0, 1024, 50, 1) != cell_seed(1, 1024, 50.0, 1)


# ---------------------------------------------------------------- run, resume, reports
def test_run_writes_results_and_same_prompts_across_methods(tmp_path):
    fake = FakeBackend()
    run = fake.run(tmp_path)
    records = read_results(tmp_path / "results.jsonl")
    assert len(records) == len(run.records) == 2 * 2 * 3 * 2
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"] == "fake-model" and set(cfg["configs"]) == {"full", "streamingllm"}
    first = records[0]
    for key in ("method", "config", "length", "n_tokens", "depth", "sample", "key", "value", "output", "score",
                "kv_bytes", "prefill_s", "decode_s", "seconds", "prompt_sha1"):
        assert key in first
    by_method: dict[str, dict] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[(r["length"], r["depth"], r["sample"])] = r["prompt_sha1"]
    assert by_method["full"] == by_method["streamingllm"]
    assert len(set(by_method["full"].values())) == 12, "every cell gets its own prompt"
    assert {r["score"] for r in records if r["method"] == "full"} == {1.0}
    for name in ("summary.md", "summary.csv", "heatmap_full.png", "heatmap_streamingllm.png", "heatmaps.png"):
        assert (tmp_path / name).is_file()


def test_resume_after_interrupt_and_truncated_line(tmp_path):
    fake = FakeBackend(fail_after=7)
    with pytest.raises(KeyboardInterrupt):
        fake.run(tmp_path)
    path = tmp_path / "results.jsonl"
    assert len(path.read_text().splitlines()) == 7
    with path.open("a") as f:
        f.write('{"method": "streamingllm", "length": 512, "dep')  # a write cut mid-line
    fake2 = FakeBackend()
    fake2.run(tmp_path)
    assert len(fake2.calls) == 24 - 7, "finished samples are skipped"
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses again
    keys = [(r["method"], r["length"], r["depth"], r["sample"]) for r in records]
    assert len(keys) == len(set(keys)) == 24
    fake3 = FakeBackend()
    fake3.run(tmp_path)
    assert fake3.calls == [] and len(path.read_text().splitlines()) == 24


def test_niah_command_and_run_file_suite_draw_the_same_prompts(tmp_path):
    """`kvtools niah` (run_niah) and a run file's `niah` suite, same seed, model, lengths and depths: the same
    token ids in every cell; another seed draws other prompts."""
    def prompts(run) -> dict:
        fake, ids = FakeBackend(), {}

        def generate(model, tokenizer, handle, prompt, max_new_tokens):
            ids[(prompt.length, prompt.depth, prompt.value)] = list(prompt.input_ids)
            return fake.generate(model, tokenizer, handle, prompt, max_new_tokens)

        records = run(dict(model=fake.model, tokenizer=fake.tokenizer, generate_fn=generate, patch_fn=fake.patch))
        assert len(ids) == len(records) == 2 * 3 * 2
        return {(r["length"], r["depth"], r["sample"]): ids[(r["length"], r["depth"], r["value"])] for r in records}

    def command(seed: int, out: Path):
        return lambda fakes: run_niah("fake-model", CONFIGS[:1], [256, 512], [0, 50, 100], 2, out, seed=seed,
                                      quiet=True, report=False, **fakes).records

    suite = {"suite": "niah", "lengths": ["256", "0.5k"], "depths": [0, 50, 100], "samples": 2, "max_new_tokens": 16}
    run_file = {"model": "fake-model", "methods": CONFIGS[:1], "seed": 3, "out": str(tmp_path / "eval"),
                "suites": [suite]}
    from_file = prompts(lambda fakes: run_eval(run_file, quiet=True, report=False, **fakes).records)
    assert prompts(command(3, tmp_path / "niah")) == from_file
    other = prompts(command(4, tmp_path / "niah-seed-4"))
    assert other.keys() == from_file.keys() and all(other[k] != from_file[k] for k in other)


def test_results_of_the_older_niah_format_are_read_and_not_mixed(tmp_path):
    """A folder written by `kvtools niah` before it ran on the eval runner (records without suite, task,
    references, decode_ms; prompts of an earlier seed): its samples count as done and are re-reported in the
    current format, but a method added to its cells is refused, as its prompts would differ."""
    grid = dict(lengths=[256], depths=[0, 100], samples=1)
    FakeBackend().run(tmp_path, configs=CONFIGS[:1], **grid)
    path = tmp_path / "results.jsonl"
    older = []
    for line in path.read_text().splitlines():
        rec = {k: v for k, v in json.loads(line).items() if k not in ("suite", "task", "references", "decode_ms")}
        older.append({**rec, "prompt_sha1": f"text of the prompt of seed {rec['seed'] + 1}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in older))

    fake = FakeBackend()
    run = fake.run(tmp_path, configs=CONFIGS[:1], **grid)
    assert fake.calls == [] and len(run.records) == len(older) == 2
    for old, new in zip(older, run.records):
        assert {k: new[k] for k in old} == old
        assert (new["suite"], new["task"], new["references"]) == ("niah", "niah", [old["value"]])
        assert new["decode_ms"] == pytest.approx(1000 * old["decode_s"] / max(old["new_tokens"] - 1, 1))
    assert (tmp_path / "heatmap_full.png").is_file()
    with pytest.raises(ConfigError, match="saw another prompt"):
        fake.run(tmp_path, **grid)  # adds streamingllm to those cells
    assert fake.calls == []


def test_resume_extends_the_grid(tmp_path):
    FakeBackend().run(tmp_path, lengths=[256])
    fake = FakeBackend()
    fake.run(tmp_path, lengths=[256, 512])
    assert {c[1] for c in fake.calls} == {512}
    assert json.loads((tmp_path / "config.json").read_text())["lengths"] == [256, 512]


def test_resume_refuses_a_different_model_or_config(tmp_path):
    FakeBackend().run(tmp_path, lengths=[256], depths=[0])
    fake = FakeBackend()
    with pytest.raises(ConfigError, match="different run.*model"):
        run_niah("other-model", CONFIGS, [256], [0], 1, tmp_path, model=fake.model, tokenizer=fake.tokenizer,
                 generate_fn=fake.generate, patch_fn=fake.patch, quiet=True)
    changed = [CONFIGS[0], {"name": "streamingllm", "cache": {"method": "streamingllm", "window": 128}}]
    with pytest.raises(ConfigError, match="config 'streamingllm'"):
        fake.run(tmp_path, configs=changed, lengths=[256], depths=[0])
    assert fake.calls == []


def test_invalid_args_fail_before_loading_the_model(tmp_path, monkeypatch):
    import kvtools.eval.suites as suites

    def boom(*a, **k):
        raise AssertionError("model must not be loaded")

    monkeypatch.setattr(suites, "build_niah_prompt", boom)
    with pytest.raises(ConfigError, match="cache.method"):
        run_niah(None, [{"cache": {"method": "nope"}}], [256], [0], 1, tmp_path)
    with pytest.raises(ConfigError, match="samples"):
        run_niah(None, CONFIGS, [256], [0], 0, tmp_path)
    with pytest.raises(ConfigError, match="haystack"):
        run_niah(None, CONFIGS, [256], [0], 1, tmp_path, haystack_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match="share the name"):
        run_niah(None, [CONFIGS[0], CONFIGS[0]], [256], [0], 1, tmp_path)
    assert not (tmp_path / "results.jsonl").exists()


def test_length_beyond_model_context_raises_before_generating(tmp_path):
    fake = FakeBackend(context=300)
    with pytest.raises(InputTooLongError, match="512"):
        fake.run(tmp_path)
    assert fake.calls == []


def test_summary_ratios_to_full(tmp_path):
    FakeBackend().run(tmp_path, report=False)
    records = read_results(tmp_path / "results.jsonl")
    rows = {(r["method"], r["length"]): r for r in summarize(records)}
    full, stream = rows[("full", "all")], rows[("streamingllm", "all")]
    assert full["score"] == 1.0 and full["score_vs_full"] == 1.0 and full["kv_vs_full"] == 1.0
    assert stream["score"] == pytest.approx(1 / 3)  # only depth 100 of 0/50/100
    assert stream["score_vs_full"] == pytest.approx(1 / 3)
    full_kv = sum(r["kv_bytes"] for r in records if r["method"] == "full") / 12
    assert stream["kv_vs_full"] == pytest.approx(6800 / full_kv)
    assert rows[("streamingllm", 512)]["kv_vs_full"] < rows[("streamingllm", 256)]["kv_vs_full"]
    md = summary_markdown(records)
    assert "| method | 256 | 0.5k | all | vs full |" in md and "| streamingllm |" in md and "33%" in md
    md_path, csv_path = write_summary(tmp_path)
    csv_lines = csv_path.read_text().splitlines()
    assert csv_lines[0].startswith("method,length,n,score,score_vs_full,kv_bytes,kv_mib")
    assert len(csv_lines) == 1 + 2 * 3


def test_summary_without_full_has_no_ratios():
    records = [{"method": "snapkv", "length": 1024, "depth": 0.0, "sample": 0, "score": 1.0, "kv_bytes": 1 << 20}]
    (row,) = [r for r in summarize(records) if r["length"] == "all"]
    assert row["score_vs_full"] is None and row["kv_mib"] == 1.0
    assert "vs full" not in summary_markdown(records)


def test_heatmaps_are_written(tmp_path):
    records = [
        {"method": m, "length": n, "depth": d, "sample": 0, "score": float(d >= 50 or m == "full")}
        for m in ("full", "snapkv", "streamingllm") for n in (1024, 2048) for d in (0.0, 50.0, 100.0)
    ]
    paths = plot_heatmaps(records, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == ["heatmap_full.png", "heatmap_snapkv.png", "heatmap_streamingllm.png", "heatmaps.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_heatmaps(records[:3], tmp_path / "one") == [tmp_path / "one" / "heatmap_full.png"]


# ---------------------------------------------------------------- CLI
def test_cli_bad_grid_prints_error_and_exits_2(capsys):
    from kvtools.cli import main

    assert main(["niah", "--lengths", "1k,,2k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lengths:") and "Traceback" not in err
    assert main(["niah", "--depths", "0:100"]) == 2
    assert "start:stop:count" in capsys.readouterr().err
    assert main(["niah", "--config", "full,,snapkv"]) == 2


@pytest.mark.parametrize("argv,msg", [
    (["bench-attention", "--backends", "torch,,flex"], "--backends: empty item"),
    (["bench-attention", "--backends", "torch,cuda"], "--backends: unknown cuda"),
    (["bench-attention", "--layers", "1,x"], "--layers: expected layer indices"),
    (["bench-attention", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench-recall", "--top-k", "128,abc"], "--top-k: expected integers >= 1"),
    (["bench-recall", "--top-k", "0"], "--top-k: expected integers >= 1"),
    (["bench-recall", "--index", "flat,,hnsw"], "--index: empty item"),
    (["bench-recall", "--index", "annoy"], "--index: unknown annoy"),
    (["bench-recall", "--index", "ivf-keys:nlists=256"], "expected key=value with a retrieval parameter"),
    (["bench-recall", "--index", "ivf-keys:nlist"], "expected key=value with a retrieval parameter"),
    (["bench-recall", "--index", "ivf-keys:nprobe=0"], "--index: index kind 'ivf-keys:nprobe=0'"),
    (["bench-recall", "--length", "4k,8k"], "--length: one prompt length"),
])
def test_cli_bench_lists_are_checked_before_any_work(argv, msg, capsys, monkeypatch):
    """Every comma-list option rejects empty and unknown items the same way, with a clear message."""
    import kvtools.models
    from kvtools.cli import main

    monkeypatch.setattr(kvtools.models, "load_model", lambda *a, **k: pytest.fail("model loaded before validation"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_cli_lists_methods_and_configs(capsys, monkeypatch):
    import kvtools.config
    from kvtools.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "cache:" in out and "snapkv" in out and "observation-window" in out and "budget=1024" in out
    monkeypatch.setattr(kvtools.config, "list_presets", lambda: {"full": "Keep everything.", "snapkv": "SnapKV."})
    assert main(["configs"]) == 0
    assert capsys.readouterr().out.splitlines() == ["full    Keep everything.", "snapkv  SnapKV."]


def test_cli_niah_runs_and_prints_summary(tmp_path, capsys, monkeypatch):
    import kvtools.eval.run as runner
    from kvtools.cli import main

    fake = FakeBackend()
    real = runner.run_eval
    monkeypatch.setattr(
        runner, "run_eval",
        lambda *a, **k: real(*a, **k, model=fake.model, tokenizer=fake.tokenizer,
                             generate_fn=fake.generate, patch_fn=fake.patch),
    )
    cfgs = []
    for c in CONFIGS:
        path = tmp_path / f"{c['name']}.yaml"
        path.write_text(json.dumps({k: v for k, v in c.items() if k != "name"}))
        cfgs.append(str(path))
    out = tmp_path / "run"
    argv = ["niah", "--config", ",".join(cfgs), "--lengths", "256,0.5k", "--depths", "0:100:3",
            "--samples", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| streamingllm |" in printed and str(out) in printed
    assert len(read_results(out / "results.jsonl")) == 2 * 2 * 3
