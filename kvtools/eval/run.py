"""``kvtools eval RUN.yaml``: several methods x several suites, resumable, shardable.

A run file::

    model: smollm2-135m                      # optional; default: the embedded model
    # models: [smollm2-135m, gemma3-270m]    # or several: one subfolder of `out` each
    methods: [full, snapkv-0.25, {name: sl, cache: {method: streamingllm, n_sink: 4, window: 256}}]
    seed: 0
    out: runs/ruler-smollm2
    suites:
      - {suite: ruler, tasks: all, lengths: [1k, 2k, 4k], samples: 4}
      - {suite: niah, lengths: [1k, 2k], depths: [0, 50, 100]}
      - {suite: ppl, lengths: [16k], chunk: 512, segment: 1024}

Everything is validated before the model loads: the run file, the output folder,
the model (found, from its config alone), the datasets of the public-data suites
(loaded first: an unavailable hub is an error naming the suite's ``source``) and
the lengths against the model's context. Nothing is written before that. The
output folder then gets the resolved run (``run.json``), one JSON line per sample
(``results.jsonl``, flushed as it goes), ``summary.md`` / ``summary.csv`` and
plots. Re-running resumes: finished samples are skipped, a truncated last line is
dropped.

Under ``accelerate launch -m kvtools eval RUN.yaml`` every process takes every
``world``-th item and writes its own shard; the main process merges them into
the same ``results.jsonl`` a single process writes (records in canonical order).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from ..config import KVConfig, StrictNumbers, check_out_dir, load_config, read_yaml, same_method, validate_fields
from ..errors import ConfigError, InputTooLongError
from .report import read_results
from .suites import Item, SuiteSpec, suite_from_dict

RESULTS = "results.jsonl"
TIMING_FIELDS = ("prefill_s", "decode_ms", "seconds")


class RunFile(StrictNumbers):
    """The top level of a run file (booleans are not numbers)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    models: list[str] | None = Field(default=None, min_length=1, description="several models, one subfolder each")
    methods: list[str | dict[str, Any]] = Field(min_length=1)
    suites: list[dict[str, Any]] = Field(min_length=1)
    seed: int = 0
    out: str = "runs/eval"
    device: str | None = None


@dataclass
class Run:
    """A validated run: configs and suites resolved."""

    spec: RunFile
    configs: list[KVConfig]
    suites: list[SuiteSpec]
    source: str = ""

    def items(self) -> list[Item]:
        return [item for suite in self.suites for item in suite.items()]

    def suite(self, name: str, task: str) -> SuiteSpec:
        for s in self.suites:
            if s.suite == name and any(i.task == task for i in s.items()):
                return s
        raise KeyError((name, task))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "seed": self.spec.seed,
            "methods": {c.name: c.to_dict() for c in self.configs},
            "suites": [s.model_dump() for s in self.suites],
        }

    @property
    def model_name(self) -> str:
        from ..models import canonical_name

        return self.spec.model if self.spec.model and self.spec.model.startswith("random:") else canonical_name(
            self.spec.model)


def load_run(source: str | Path | dict[str, Any]) -> Run:
    """Validate a run file (path or dict) into a :class:`Run`; errors name the key and the value."""
    where = ""
    if not isinstance(source, dict):
        path = Path(source)
        raw = read_yaml(path, "run file", "a mapping with keys model, methods, suites, seed, out")
        where = str(path)
    else:
        raw = source
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'run'}: must be a mapping with keys model, methods, suites, seed, out")
    spec = validate_fields(RunFile, raw, "run")
    if spec.model is not None and spec.models is not None:
        raise ConfigError("run.model / run.models: give one of them")
    configs = []
    for i, m in enumerate(spec.methods):
        try:
            configs.append(load_config(m, base_dir=Path(where).parent if where else None))
        except ConfigError as exc:
            raise ConfigError(f"methods[{i}]: {exc}") from None
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"methods: two methods share a name ({names}); give inline configs a distinct `name:`")
    suites = [suite_from_dict(s, f"suites[{i}]") for i, s in enumerate(spec.suites)]
    return Run(spec, configs, suites, where)


def record_key(rec: dict[str, Any]) -> tuple:
    depth = rec.get("depth")
    return (rec["method"], rec["suite"], rec["task"], int(rec["length"]),
            -1.0 if depth is None else round(float(depth), 6), int(rec["sample"]))


def _world() -> tuple[int, int, Any]:
    """(rank, world size, accelerate state or None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true"))
        return state.process_index, state.num_processes, state
    return 0, 1, None


def _canonical(records: list[dict[str, Any]], run: Run) -> list[dict[str, Any]]:
    """Records in run order: item order of the run file, then method order."""
    order = {item.key(): i for i, item in enumerate(run.items())}
    methods = {c.name: i for i, c in enumerate(run.configs)}

    def rank(r: dict[str, Any]) -> tuple:
        k = record_key(r)
        return (order.get(k[1:], len(order)), methods.get(r["method"], len(methods)), k)

    return sorted(records, key=rank)


def _write_atomic(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def split_models(run: Run) -> list[tuple[Run, Path | None]]:
    """One run per model: ``models: [a, b]`` -> runs writing to ``out/<a>``, ``out/<b>``."""
    if not run.spec.models:
        return [(run, None)]
    out = []
    for m in run.spec.models:
        spec = run.spec.model_copy(update={"model": m, "models": None})
        sub = Path(run.spec.out) / "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(m).name)
        out.append((Run(spec, run.configs, run.suites, run.source), sub))
    return out


@dataclass
class EvalResult:
    out_dir: Path
    records: list[dict[str, Any]]
    summary: str
    files: list[Path] = field(default_factory=list)


def run_eval(
    source: str | Path | dict[str, Any] | Run,
    out: str | Path | None = None,
    quiet: bool = False,
    *,
    model: Any = None,
    tokenizer: Any = None,
    generate_fn: Any = None,
) -> EvalResult | None:
    """Run (or resume) an eval run; returns its records and summary (``None`` on non-main processes)."""
    run = source if isinstance(source, Run) else load_run(source)
    out_dir = check_out_dir(out or run.spec.out, "out")
    rank, world, state = _world()
    resolved = run.to_dict()
    run_json = out_dir / "run.json"
    shard_dir = out_dir / "shards"
    results_path = out_dir / RESULTS if world == 1 else shard_dir / f"rank{rank}.jsonl"
    shards = sorted(shard_dir.glob("rank*.jsonl"))
    has_results = any(p.is_file() and p.stat().st_size > 0 for p in [out_dir / RESULTS, *shards])
    if run_json.exists() and has_results:  # a run.json without results (an older failed start) binds nothing
        old = json.loads(run_json.read_text())
        diffs = [k for k in ("model", "seed") if old.get(k) != resolved[k]]
        diffs += [f"method '{n}'" for n, c in resolved["methods"].items() if n in old.get("methods", {})
                  and not same_method(old["methods"][n], c)]
        if diffs:
            raise ConfigError(f"{out_dir} holds a different run ({', '.join(diffs)} differ); results would be "
                              "mixed: use another out, or delete that folder to start over")
        resolved["methods"] = {**old.get("methods", {}), **resolved["methods"]}
    max_context = None
    if model is None:
        if run.spec.model and run.spec.model.startswith("random:"):
            raise ConfigError("run.model: eval needs a real model with a tokenizer; random:SHAPE models are for "
                              "`kvtools bench`")
        from ..models import model_context_length

        max_context = model_context_length(run.spec.model)  # the model exists; no weights loaded
    all_items = resolve_items(run)  # public-data suites load their examples here, before any write
    _check_lengths(all_items, max_context)

    done = {record_key(r) for r in read_results(out_dir / RESULTS, repair=world == 1, key=record_key)}
    done |= {record_key(r) for p in shards for r in read_results(p, repair=p == results_path, key=record_key)}
    items = [it for i, it in enumerate(all_items) if i % world == rank]
    todo = [(it, [c for c in run.configs if (c.name, *it.key()) not in done]) for it in items]
    todo = [(it, cs) for it, cs in todo if cs]

    if todo:
        if model is None or tokenizer is None:
            model, tokenizer = _load(run)
        _check_lengths([it for it, _ in todo], getattr(model.config, "max_position_embeddings", None))
    # everything checked: only now the folder and run.json are written
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_json.write_text(json.dumps(resolved, indent=2) + "\n")
    if state is not None:
        state.wait_for_everyone()
    if todo:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        _run_items(run, todo, model, tokenizer, results_path, quiet or rank != 0, generate_fn)

    if state is not None:
        state.wait_for_everyone()
    if rank != 0:
        return None
    records = read_results(out_dir / RESULTS, key=record_key)
    for p in sorted(shard_dir.glob("rank*.jsonl")):
        records += read_results(p, key=record_key)
    uniq = {record_key(r): r for r in reversed(records)}  # first occurrence wins
    records = _canonical(list(uniq.values()), run)
    _write_atomic(out_dir / RESULTS, records)
    for p in shard_dir.glob("rank*.jsonl"):
        p.unlink()
    if shard_dir.exists() and not any(shard_dir.iterdir()):
        shard_dir.rmdir()
    from .eval_report import write_eval_report

    summary, files = write_eval_report(records, out_dir, run)
    return EvalResult(out_dir, records, summary, [out_dir / "run.json", out_dir / RESULTS, *files])


def resolve_items(run: Run) -> list[Item]:
    """The run's items; a public-data suite loads its examples here, and a dataset it cannot load is a
    :class:`ConfigError` naming the suite (``suites[i].source: ...``)."""
    items: list[Item] = []
    for i, suite in enumerate(run.suites):
        try:
            items += suite.items()
        except ConfigError as exc:
            raise ConfigError(f"suites[{i}].{exc}" if str(exc).startswith("source:") else f"suites[{i}]: {exc}") \
                from None
        except ImportError as exc:  # the optional `datasets` package; the message names the install command
            raise ConfigError(f"suites[{i}] ({suite.suite}): {exc}") from None
    return items


def _check_lengths(items: list[Item], max_context: int | None) -> None:
    """Generated samples must fit the model's context (a ppl stream is cut into chunks and may be longer)."""
    too_long = sorted({it.length for it in items if max_context and it.length > max_context and it.suite != "ppl"})
    if too_long:
        raise InputTooLongError(f"lengths {too_long} exceed the model's context of {max_context} tokens")


def _load(run: Run):
    if run.spec.model and run.spec.model.startswith("random:"):
        raise ConfigError("run.model: eval needs a real model with a tokenizer; random:SHAPE models are for "
                          "`kvtools bench`")
    from ..models import load_model

    kw = {"device_map": "auto"} if run.spec.device == "auto" else {}
    model, tok = load_model(run.spec.model, device=None if run.spec.device in (None, "auto") else run.spec.device,
                            **kw)
    return model, tok


def _run_items(run, todo, model, tokenizer, results_path, quiet, generate_fn) -> None:
    import torch
    from tqdm.auto import tqdm

    from ..patching import patch
    from .niah import generate_greedy
    from .ppl import stream_nll

    generate = generate_fn or generate_greedy
    max_context = getattr(model.config, "max_position_embeddings", None)
    _check_lengths([it for it, _ in todo], max_context)
    total = sum(len(cs) for _, cs in todo)
    with tqdm(total=total, disable=quiet, desc="eval", unit="sample") as bar, \
            results_path.open("a", encoding="utf-8") as f:
        for item, configs in todo:
            suite = run.suite(item.suite, item.task)
            base = {"model": run.model_name, "suite": item.suite, "task": item.task, "length": item.length,
                    "depth": item.depth, "sample": item.sample}
            if suite.kind == "stream":
                ids = suite.stream_ids(item, tokenizer, run.spec.seed)
                x = torch.tensor([ids], device=model.device)
            else:
                prep = suite.prepare(item, tokenizer, run.spec.seed, max_context)
                sha = hashlib.sha1(json.dumps(prep.input_ids).encode()).hexdigest()[:12]
            for cfg in configs:
                bar.set_postfix(method=cfg.name, suite=item.suite, task=item.task, length=item.length)
                t0 = time.perf_counter()
                with patch(model, cfg) as p:
                    if suite.kind == "stream":
                        res = stream_nll(model, x, p, chunk=suite.chunk, segment=suite.segment)
                        segs = res.segments()
                        rec = {**base, "method": cfg.name, "score": None, "ppl": res.ppl(),
                               "ppl_segments": segs, "segment": suite.segment,
                               "seconds": time.perf_counter() - t0}
                    else:
                        gen = generate(model, tokenizer, p, prep, prep.max_new_tokens)
                        steps = max(gen.new_tokens - 1, 1)
                        rec = {**base, "method": cfg.name, "prompt_sha1": sha, "n_tokens": len(prep.input_ids),
                               "references": prep.references, "output": gen.text,
                               "score": float(prep.score(gen.text)), "kv_bytes": gen.kv_bytes,
                               "prefill_s": gen.prefill_s, "decode_ms": 1000 * gen.decode_s / steps,
                               "new_tokens": gen.new_tokens, **{k: v for k, v in prep.meta.items()
                                                                if k not in ("n_tokens",)}}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                bar.update()
