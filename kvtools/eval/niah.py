"""Needle in a haystack: a grid of context lengths x needle depths, several samples per cell.

:func:`run_niah` loads the model once, patches it with each config in turn, and for
every (length, depth, sample) cell builds the same prompt for every method (its seed
depends on the run seed and the cell, never on the method), generates greedily with a
fresh KV cache, scores 1 if the needle's value appears in the output, and appends one
JSON line per sample to ``results.jsonl``. A rerun with the same ``out_dir`` skips the
finished samples. Nothing is written before every check passed (grid, configs,
output folder, the model found and the lengths within its context, read from its
config before any weights load). At the end it writes ``summary.md``, ``summary.csv`` and heatmaps.

Example::

    from kvtools.eval import run_niah
    run = run_niah(None, ["full", "snapkv"], [1024, 2048], [0, 50, 100], samples=2, out_dir="runs/niah")
    print(run.summary)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtools.config import KVConfig, check_out_dir, load_config, same_method
from kvtools.errors import ConfigError, InputTooLongError

from .haystack import NiahPrompt, build_niah_prompt, load_haystack_dir
from .report import RESULTS_FILE, cell_key, read_results, summary_markdown, write_summary

__all__ = [
    "Generation",
    "NiahRun",
    "cell_seed",
    "generate_greedy",
    "parse_depths",
    "parse_lengths",
    "run_niah",
    "score_output",
]

CONFIG_FILE = "config.json"
#: run-config keys that must match for a run directory to be resumed
_MUST_MATCH = ("suite", "model", "seed", "max_new_tokens", "haystack")


# ---------------------------------------------------------------- grid parsing
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)([kK]?)$")


def _parse_number(text: str, what: str, *, allow_k: bool) -> float:
    """A plain number, or with ``allow_k`` a whole number of tokens or a multiple of k = 1024."""
    text = text.strip()
    m = _SIZE.match(text)
    whole = not allow_k or m is None or m.group(2) or float(m.group(1)).is_integer()
    if not m or (m.group(2) and not allow_k) or not whole:
        hint = "a number of tokens like 1500, 1k or 0.5k (k = 1024)" if allow_k else "a number like 0, 12.5 or 100"
        raise ConfigError(f"{what}: cannot read '{text}'; expected {hint}")
    value = float(m.group(1))
    return value * 1024 if m.group(2) else value


def _expand(spec: str | Sequence[Any], what: str, *, allow_k: bool) -> list[float]:
    """Comma list whose items are numbers or ``start:stop:count`` ranges (inclusive linspace)."""
    if not isinstance(spec, str):
        spec = ",".join(str(x) for x in spec)
    values: list[float] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ConfigError(f"{what}: empty item in '{spec}'; separate values with single commas")
        if ":" in item:
            parts = item.split(":")
            if len(parts) != 3:
                raise ConfigError(f"{what}: range '{item}' must be start:stop:count, e.g. 0:100:11")
            start = _parse_number(parts[0], what, allow_k=allow_k)
            stop = _parse_number(parts[1], what, allow_k=allow_k)
            count_text = parts[2].strip()
            if not count_text.isdigit() or int(count_text) < 1:
                raise ConfigError(f"{what}: range '{item}': count must be a whole number >= 1, got '{count_text}'")
            count = int(count_text)
            if count == 1:
                values.append(start)
            else:
                values.extend(start + (stop - start) * i / (count - 1) for i in range(count))
        else:
            values.append(_parse_number(item, what, allow_k=allow_k))
    if not values:
        raise ConfigError(f"{what}: no values in '{spec}'")
    return values


def parse_lengths(spec: str | Sequence[int | str]) -> list[int]:
    """Parse context lengths: ``"1k,2k,4k"``, ``"1500,0.5k"``, or ``"1k:16k:16"`` (k = 1024).

    Returns sorted, distinct token counts; raises :class:`~kvtools.errors.ConfigError`
    on bad syntax, non-positive or empty lists.

    >>> parse_lengths("1k,2k,1500,0.5k")
    [512, 1024, 1500, 2048]
    >>> parse_lengths("1k:4k:4")
    [1024, 2048, 3072, 4096]
    """
    out: set[int] = set()
    for value in _expand(spec, "lengths", allow_k=True):
        n = round(value)
        if n < 1:
            raise ConfigError(f"lengths: must be >= 1 token, got {value:g}")
        out.add(n)
    return sorted(out)


def parse_depths(spec: str | Sequence[float | str]) -> list[float]:
    """Parse needle depths in percent: ``"0:100:11"`` (inclusive linspace) or ``"0,25,50,100"``.

    Values are rounded to 2 decimals, sorted and distinct, each in [0, 100].

    >>> parse_depths("0:100:5")
    [0.0, 25.0, 50.0, 75.0, 100.0]
    >>> parse_depths("10,0")
    [0.0, 10.0]
    """
    out: set[float] = set()
    for value in _expand(spec, "depths", allow_k=False):
        if not 0 <= value <= 100:
            raise ConfigError(f"depths: must be percents in [0, 100], got {value:g}")
        out.add(round(value, 2))
    return sorted(out)


# ---------------------------------------------------------------- one sample
@dataclass(frozen=True)
class Generation:
    """What one greedy generation produced and cost."""

    text: str  # decoded new tokens
    kv_bytes: int  # bytes held by the KV cache after generation
    prefill_s: float
    decode_s: float
    new_tokens: int = 0


#: ``generate_fn(model, tokenizer, patch, prompt, max_new_tokens) -> Generation``
GenerateFn = Callable[[Any, Any, Any, NiahPrompt, int], Generation]
#: ``patch_fn(model, config)`` -> context manager yielding a handle with ``make_cache()``
PatchFn = Callable[[Any, KVConfig], AbstractContextManager[Any]]


def score_output(output: str, value: str) -> float:
    """1.0 if the needle's value appears verbatim in the output, else 0.0.

    >>> score_output(" 4614727.", "4614727"), score_output(" 461472", "4614727")
    (1.0, 0.0)
    """
    return 1.0 if str(value) in output else 0.0


def cell_seed(seed: int, length: int, depth: float, sample: int) -> int:
    """Seed of one grid cell's prompt; independent of the method, so every method sees the same prompts."""
    text = f"{seed}:{int(length)}:{float(depth):.6f}:{int(sample)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class _FirstTokenTimer:
    """Logits processor that records when the first logits (end of prefill) arrive."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.first: float | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.first is None:
            _sync(self.device)
            self.first = time.perf_counter()
        return scores


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def generate_greedy(model: Any, tokenizer: Any, patch: Any, prompt: NiahPrompt, max_new_tokens: int) -> Generation:
    """Greedy ``model.generate`` on the prompt with a fresh ``patch.make_cache()``; times prefill and decode.

    >>> with kvtools.patch(model, "snapkv") as p:  # doctest: +SKIP
    ...     gen = generate_greedy(model, tok, p, build_niah_prompt(tok, 1024, 50), 16)
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    device = model.device
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    cache = patch.make_cache()
    eos = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if isinstance(pad, list):
        pad = pad[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    timer = _FirstTokenTimer(device)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=config,
            logits_processor=LogitsProcessorList([timer]),
            **patch.cache_kwargs(cache),
        )
    _sync(device)
    end = time.perf_counter()
    new = out[0, ids.shape[1] :]
    first = timer.first if timer.first is not None else end
    return Generation(
        text=tokenizer.decode(new, skip_special_tokens=True),
        kv_bytes=int(cache.nbytes()),
        prefill_s=first - start,
        decode_s=end - first,
        new_tokens=int(new.numel()),
    )


# ---------------------------------------------------------------- the run
@dataclass
class NiahRun:
    """Where a finished :func:`run_niah` wrote its files, its records and summary."""

    out_dir: Path
    records: list[dict[str, Any]]
    summary: str  # markdown
    files: list[Path] = field(default_factory=list)


def _model_name(name: str | None) -> str:
    from kvtools.models import canonical_name

    return canonical_name(name)


def _resolve_configs(configs: Sequence[str | Path | dict | KVConfig]) -> list[KVConfig]:
    if isinstance(configs, (str, Path, dict, KVConfig)):
        configs = [configs]  # type: ignore[list-item]
    if not configs:
        raise ConfigError("configs: give at least one config (preset name, YAML path or dict)")
    resolved = [load_config(c) for c in configs]
    names = [c.name for c in resolved]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"configs: two configs share the name {', '.join(repeated)}; "
            "results are keyed by name, give each config a distinct `name:`"
        )
    return resolved


def _check_resume(out: Path, run_config: dict[str, Any], has_results: bool = True) -> dict[str, Any]:
    """Compare with an existing ``config.json``; returns the merged config to write.

    A ``config.json`` without results (a run that failed before its first sample) binds nothing: it is replaced.
    """
    path = out / CONFIG_FILE
    if not path.exists() or not has_results:
        return run_config
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise ConfigError(f"{path}: unreadable run config; delete it or use another --out") from None
    diffs = [
        f"{k}: {old.get(k)!r} there, {run_config.get(k)!r} now"
        for k in _MUST_MATCH
        if old.get(k) != run_config.get(k)
    ]
    for name, cfg in run_config["configs"].items():
        if name in old.get("configs", {}) and not same_method(old["configs"][name], cfg):
            diffs.append(f"config '{name}': {old['configs'][name]} there, {cfg} now")
    if diffs:
        raise ConfigError(
            f"{out} holds a different run ({'; '.join(diffs)}); "
            "results would be mixed: use another --out, or delete that folder to start over"
        )
    merged = dict(run_config)
    merged["configs"] = {**old.get("configs", {}), **run_config["configs"]}
    merged["lengths"] = sorted(set(old.get("lengths", [])) | set(run_config["lengths"]))
    merged["depths"] = sorted(set(old.get("depths", [])) | set(run_config["depths"]))
    merged["samples"] = max(int(old.get("samples", 0)), run_config["samples"])
    return merged


def run_niah(
    model_name: str | None,
    configs: Sequence[str | Path | dict | KVConfig],
    lengths: Sequence[int],
    depths: Sequence[float],
    samples: int,
    out_dir: str | Path,
    haystack_dir: str | Path | None = None,
    max_new_tokens: int = 16,
    seed: int = 0,
    quiet: bool = False,
    *,
    model: Any = None,
    tokenizer: Any = None,
    generate_fn: GenerateFn | None = None,
    patch_fn: PatchFn | None = None,
    report: bool = True,
) -> NiahRun:
    """Run (or resume) a needle-in-a-haystack grid and write its results.

    Args:
        model_name: for :func:`kvtools.load_model` (``None`` = the default model).
        configs: preset names, YAML paths, dicts or configs; one method each, keyed by name.
        lengths: target lengths in tokens (prompt + ``max_new_tokens``).
        depths: needle depths in percent of the haystack.
        samples: prompts per (length, depth) cell, each with its own needle and haystack.
        out_dir: run folder: ``config.json``, ``results.jsonl``, then ``summary.md``,
            ``summary.csv`` and ``heatmap_*.png``. An existing run there is resumed.
        haystack_dir: folder of ``.txt`` files for the haystack; ``None`` = built-in filler.
        max_new_tokens: greedy tokens generated per sample.
        seed: run seed; each cell's prompt seed derives from it (see :func:`cell_seed`).
        quiet: no progress bar.
        model, tokenizer: an already loaded model (skips :func:`kvtools.load_model`).
        generate_fn: replaces :func:`generate_greedy` (tests, other decoding).
        patch_fn: replaces :func:`kvtools.patch` (tests).
        report: write the summary and heatmaps at the end.

    Everything is validated (configs, grid, haystack folder, resume compatibility)
    before the model is loaded; a length beyond the model's context raises
    :class:`~kvtools.errors.InputTooLongError` before any generation.

    >>> run = run_niah(None, ["full", "streamingllm"], [1024, 2048], [0, 50, 100], 2, "runs/niah")  # doctest: +SKIP
    >>> print(run.summary)  # doctest: +SKIP
    """
    # ---- validate everything before touching the model
    kv_configs = _resolve_configs(configs)
    lengths = parse_lengths(lengths)
    depths = parse_depths(depths)
    if not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"samples: must be a whole number >= 1, got {samples!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be >= 1, got {max_new_tokens!r}")
    too_short = [n for n in lengths if n <= max_new_tokens]
    if too_short:
        raise ConfigError(f"lengths: {too_short} leave no room for the prompt with max_new_tokens={max_new_tokens}")
    corpus = load_haystack_dir(haystack_dir) if haystack_dir is not None else None
    name = _model_name(model_name)

    out = check_out_dir(out_dir, "out_dir")
    run_config = {
        "suite": "niah",
        "model": name,
        "configs": {c.name: c.to_dict() for c in kv_configs},
        "lengths": lengths,
        "depths": depths,
        "samples": samples,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "haystack": str(Path(haystack_dir).resolve()) if haystack_dir is not None else None,
    }
    results_path = out / RESULTS_FILE
    records = read_results(results_path, repair=True)
    merged = _check_resume(out, run_config, has_results=bool(records))
    others = sorted({str(r.get("model")) for r in records if r.get("model") not in (None, name)})
    if others:
        raise ConfigError(
            f"{results_path} holds results of model {', '.join(others)}, this run uses {name}; "
            "use another --out, or delete that folder to start over"
        )
    done = {cell_key(r) for r in records}
    grid = [(n, d, s) for n in lengths for d in depths for s in range(samples)]
    todo = {
        c.name: [cell for cell in grid if (c.name, cell[0], round(cell[1], 6), cell[2]) not in done]
        for c in kv_configs
    }
    remaining = sum(len(cells) for cells in todo.values())

    def write_config() -> None:  # only once every check passed, so a failed start leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")

    if not remaining:
        write_config()
    else:
        if model is None or tokenizer is None:
            from kvtools.models import check_context, load_model, model_context_length

            check_context(lengths, model_context_length(model_name))  # from the config: no weights loaded yet
            model, tokenizer = load_model(model_name)
        max_context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if max_context is not None and lengths[-1] > max_context:
            raise InputTooLongError(
                f"lengths: {[n for n in lengths if n > max_context]} exceed the model's context of "
                f"{max_context} tokens"
            )
        # fail fast on a length too short for the needle and question
        build_niah_prompt(tokenizer, lengths[0], 0.0, 0, max_new_tokens=max_new_tokens, haystack=corpus)
        write_config()
        if patch_fn is None:
            from kvtools import patch as patch_fn
        generate = generate_fn or generate_greedy
        from tqdm.auto import tqdm

        total = len(grid) * len(kv_configs)
        with tqdm(total=total, initial=total - remaining, disable=quiet, unit="sample", desc="niah") as bar, \
                results_path.open("a", encoding="utf-8") as f:
            for cfg in kv_configs:
                if not todo[cfg.name]:
                    continue
                scores: list[float] = []
                with patch_fn(model, cfg) as handle:
                    for length, depth, sample in todo[cfg.name]:
                        cseed = cell_seed(seed, length, depth, sample)
                        prompt = build_niah_prompt(
                            tokenizer, length, depth, cseed,
                            max_new_tokens=max_new_tokens, max_context=max_context, haystack=corpus,
                        )
                        gen = generate(model, tokenizer, handle, prompt, max_new_tokens)
                        record = _record(name, cfg, prompt, gen, sample, cseed)
                        f.write(json.dumps(record) + "\n")
                        f.flush()
                        records.append(record)
                        scores.append(record["score"])
                        bar.set_postfix(method=cfg.name, length=length, acc=f"{sum(scores) / len(scores):.2f}")
                        bar.update()

    run = NiahRun(out, records, summary_markdown(records), files=[out / CONFIG_FILE, results_path])
    if report:
        from .plots import plot_heatmaps

        run.files += [*write_summary(out, records), *plot_heatmaps(records, out)]
    return run


def _record(
    model_name: str, cfg: KVConfig, prompt: NiahPrompt, gen: Generation, sample: int, seed: int
) -> dict[str, Any]:
    """One line of ``results.jsonl``."""
    return {
        "model": model_name,
        "method": cfg.name,
        "config": cfg.to_dict(),
        "length": prompt.length,
        "n_tokens": prompt.n_tokens,
        "depth": prompt.depth,
        "depth_actual": round(prompt.depth_actual, 3),
        "sample": sample,
        "seed": seed,
        "key": prompt.key,
        "value": prompt.value,
        "output": gen.text,
        "score": score_output(gen.text, prompt.value),
        "kv_bytes": gen.kv_bytes,
        "new_tokens": gen.new_tokens,
        "prefill_s": round(gen.prefill_s, 6),
        "decode_s": round(gen.decode_s, 6),
        "seconds": round(gen.prefill_s + gen.decode_s, 6),
        "prompt_sha1": hashlib.sha1(prompt.text.encode("utf-8")).hexdigest(),
    }
