"""The eval runner: several methods x several suites, resumable, shardable. ``kvtools eval RUN.yaml`` runs a
run file through it, and ``kvtools niah`` a run of one NIAH suite (:mod:`kvtools.eval.niah`).

A run file::

    model: smollm2-135m                      # optional; default: the embedded model
    # models: [smollm2-135m, gemma3-270m]    # or several: one subfolder of `out` each
    methods: [full, snapkv-0.25, {name: sl, cache: {method: streamingllm, n_sink: 4, window: 256}}]
    seed: 0
    out: runs/ruler-smollm2
    # question: agnostic                     # compress the context before the question is fed (default: aware)
    suites:
      - {suite: ruler, tasks: all, lengths: [1k, 2k, 4k], samples: 4}
      - {suite: niah, lengths: [1k, 2k], depths: [0, 50, 100]}
      - {suite: ppl, lengths: [16k], chunk: 512, segment: 1024}

Everything is validated before the model loads: the run file, the output folder,
the model (found, from its config alone), the datasets of the public-data suites
(loaded first: an unavailable hub is an error naming the suite's ``source``) and
the lengths against the model's context; then, with the tokenizer, the shortest prompt
of every task. Nothing is written before that. The output folder then gets the resolved
run (``run.json``), one JSON line per sample (``results.jsonl``, flushed as it goes),
``summary.md`` / ``summary.csv`` and plots. Re-running resumes: finished samples are
skipped, a truncated last line is dropped; a method added to finished items must see the
prompts the other methods saw (else the run is refused).

``question: aware`` (the default) feeds each prompt in one call, so a cache policy that compresses at the end
of a call (SnapKV's observation window, ...) has seen the question. ``question: agnostic`` feeds it in two
calls on the same cache, as a pipeline that compresses a document once and then asks it questions does: the
context (up to where the question starts, the chat template's beginning included; each prompt builder knows
that boundary: ``context_tokens``), compressed at the end of its call, then the question with the generation
prompt, then generation (:func:`~kvtools.eval.generation.generate_greedy`'s ``split``). The question is never
compressed: scored cache methods run with ``calls: first`` (:class:`~kvtools.methods.scored.ScoredParams`;
the resolved run and the records' ``config`` show it). A stream suite (``ppl``) has no question and is refused
in such a run. A folder holds one mode: its results of the other mode are refused (results written before
the option existed are question-aware).

One record per (method, item): ``model, suite, task, length, depth, sample, method, config``,
then for a generated sample ``prompt_sha1`` (of the token ids), ``n_tokens, references,
output, score, kv_bytes, new_tokens, prefill_s, decode_s, decode_ms`` (per token),
``seconds``, ``question`` (``aware`` or ``agnostic``; with ``agnostic`` also ``context_tokens``, the tokens of
the first call) and the suite's details (NIAH: ``key, value, depth_actual, seed``), or for a
stream ``score: null, ppl, ppl_segments, segment, seconds``.

Under ``accelerate launch -m kvtools eval RUN.yaml`` every process takes every
``world``-th item and writes its own shard; the main process merges them into
the same ``results.jsonl`` a single process writes (records in canonical order).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from ..config import KVConfig, StrictNumbers, check_out_dir, load_config, read_yaml, same_method, validate_fields
from ..errors import ConfigError, InputTooLongError
from .generation import DensePrefill, GenerateFn, PatchFn, PrefillMismatch, dense_prefill, replayable
from .report import QUESTION_DEFAULT, RESULTS_FILE, question_of, read_results, record_key
from .suites import Item, Prepared, SuiteSpec, suite_from_dict

__all__ = ["QUESTION_MODES", "EvalResult", "Run", "RunFile", "check_question", "load_run", "question_config",
           "resolve_items", "resolve_methods", "run_eval", "split_models"]

#: how a prompt is fed: in one call (the policy sees the question) or the context first, then the question
QUESTION_MODES = ("aware", "agnostic")


class RunFile(StrictNumbers):
    """The top level of a run file (booleans are not numbers)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    models: list[str] | None = Field(default=None, min_length=1, description="several models, one subfolder each")
    methods: list[str | dict[str, Any]] = Field(min_length=1)
    suites: list[dict[str, Any]] = Field(min_length=1)
    seed: int = 0
    out: str = "runs/eval"
    device: str | None = Field(
        default=None, description="where the model runs: cpu, cuda, cuda:1 ...; auto: its layers placed over the "
                                  "available devices (from_pretrained's device_map='auto'); default: where it loads")
    question: Literal["aware", "agnostic"] = Field(
        default=QUESTION_DEFAULT, description="aware: each prompt in one call; agnostic: its context first, "
                                              "compressed before the question is fed (the question kept whole)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="the model's weights and activations, and so its KV cache's (full's bytes "
                                       "in the reports are in it)")
    share_prefill: bool = Field(
        default=False, description="one dense prefill per prompt (and KV storage: quantised methods share one "
                                   "made with theirs), replayed into the cache of every method whose prefill "
                                   "attends exactly as it does (checked at every layer, bit for bit; the others "
                                   "prefill alone): the same records in a fraction of the time of a sweep; "
                                   "their prefill_s is that prefill's + the replay's")


@dataclass
class Run:
    """A validated run: configs and suites resolved.

    The class attributes and the methods below say how its folder is kept: the resolved run's file
    (:meth:`to_dict`), what must match for a folder to be resumed, and the report written at the end.
    """

    spec: RunFile
    configs: list[KVConfig]
    suites: list[SuiteSpec]
    source: str = ""

    #: the file holding the resolved run in the output folder
    config_file: ClassVar[str] = "run.json"
    #: the key of the resolved run that maps method names to their configs
    methods_key: ClassVar[str] = "methods"
    #: keys of the resolved run that must match the run a folder holds for it to be resumed
    must_match: ClassVar[tuple[str, ...]] = ("model", "seed", "question", "dtype")
    #: keys added to the resolved run since folders were first written, and what a folder without one held
    added_keys: ClassVar[dict[str, Any]] = {"question": QUESTION_DEFAULT, "dtype": "float32"}

    def __post_init__(self) -> None:
        self.configs = [question_config(c, self.question) for c in self.configs]

    @property
    def question(self) -> str:
        """``aware`` or ``agnostic`` (see the module docstring)."""
        return self.spec.question

    def items(self) -> list[Item]:
        return [item for suite in self.suites for item in suite.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "seed": self.spec.seed,
            "methods": {c.name: c.to_dict() for c in self.configs},
            "suites": [s.model_dump() for s in self.suites],
            "question": self.question,
            "dtype": self.spec.dtype,
        }

    def resumed(self, old: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """The resolved run to write over ``old``, the one a folder with results holds: the methods of
        both; a :class:`ConfigError` when the two differ in a ``must_match`` key or a method's config."""
        new, key = self.to_dict(), self.methods_key
        old = {**self.added_keys, **old}
        diffs = [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in self.must_match if old.get(k) != new.get(k)]
        diffs += [f"{key[:-1]} '{name}': {old[key][name]} there, {cfg} now" for name, cfg in new[key].items()
                  if name in old.get(key, {}) and not same_method(old[key][name], cfg)]
        if diffs:
            raise ConfigError(f"{out_dir} holds a different run ({'; '.join(diffs)}); results would be mixed: "
                              "use another output folder, or delete that folder to start over")
        return {**new, key: {**old.get(key, {}), **new[key]}}

    def summary(self, records: Sequence[dict[str, Any]]) -> str:
        """The markdown summary of the records."""
        from .eval_report import eval_markdown
        from .report import question_note

        return eval_markdown(records, f"`{self.model_name}`{question_note(records)}")

    def write_report(self, records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Write the summary tables and plots; returns the files written."""
        from .eval_report import write_eval_report

        return write_eval_report(records, out_dir, self.summary(records))

    @property
    def model_name(self) -> str:
        from ..models import canonical_name

        return self.spec.model if self.spec.model and self.spec.model.startswith("random:") else canonical_name(
            self.spec.model)


def question_config(config: KVConfig, question: str) -> KVConfig:
    """The config a method runs with in a run of this ``question`` mode: in a question-agnostic run a scored
    cache method compresses only the first call on a cache (``calls: first``), so the question, fed as the
    second call, is kept whole; otherwise ``config`` itself."""
    from ..methods.scored import ScoredParams

    cache = config.cache
    if question == "agnostic" and isinstance(cache, ScoredParams) and cache.calls != "first":
        return replace(config, cache=cache.model_copy(update={"calls": "first"}))
    return config


def resolve_methods(specs: Sequence[Any], what: str = "methods", base_dir: Path | None = None) -> list[KVConfig]:
    """Method configs (preset names, YAML paths, dicts or configs), validated; results are keyed by name,
    so two of the same name are a :class:`ConfigError`."""
    if not specs:
        raise ConfigError(f"{what}: give at least one (preset name, YAML path or dict)")
    configs = []
    for i, spec in enumerate(specs):
        try:
            configs.append(load_config(spec, base_dir=base_dir))
        except ConfigError as exc:
            raise ConfigError(f"{what}[{i}]: {exc}") from None
    names = [c.name for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{what}: two share the name {', '.join(repeated)}; results are keyed by name, "
                          "give each a distinct `name:`")
    return configs


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
    configs = resolve_methods(spec.methods, base_dir=Path(where).parent if where else None)
    suites = [suite_from_dict(s, f"suites[{i}]") for i, s in enumerate(spec.suites)]
    check_question(spec.question, suites)
    return Run(spec, configs, suites, where)


def check_question(question: str, suites: Sequence[SuiteSpec]) -> None:
    """A question-agnostic run has only suites of generated prompts (a :class:`ConfigError` names the others)."""
    if question not in QUESTION_MODES:
        raise ConfigError(f"question: unknown value {question!r}; allowed: {', '.join(QUESTION_MODES)}")
    streams = [f"suites[{i}] ({s.suite})" for i, s in enumerate(suites) if s.kind != "generate"]
    if question == "agnostic" and streams:
        raise ConfigError(f"question: agnostic splits each prompt before its question; {', '.join(streams)} "
                          "streams a text with no question: run it in a question-aware run")


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
    """Where a finished run wrote its files, its records (canonical order) and its markdown summary."""

    out_dir: Path
    records: list[dict[str, Any]]
    summary: str
    files: list[Path] = field(default_factory=list)


@dataclass
class _Folder:
    """The files of a run folder for this process: its results (a shard under ``accelerate``) and the others'."""

    out: Path
    rank: int
    world: int

    @property
    def results(self) -> Path:
        return self.out / RESULTS_FILE if self.world == 1 else self.shards_dir / f"rank{self.rank}.jsonl"

    @property
    def shards_dir(self) -> Path:
        return self.out / "shards"

    def shards(self) -> list[Path]:
        return sorted(self.shards_dir.glob("rank*.jsonl"))

    def has_results(self) -> bool:
        return any(p.is_file() and p.stat().st_size > 0 for p in [self.out / RESULTS_FILE, *self.shards()])

    def done(self) -> list[dict[str, Any]]:
        """Finished records of every process (this process's own file repaired if its last line was cut)."""
        records = read_results(self.out / RESULTS_FILE, repair=self.world == 1)
        return records + [r for p in self.shards() for r in read_results(p, repair=p == self.results)]

    def merge(self, run: Run) -> list[dict[str, Any]]:
        """Merge the shards into ``results.jsonl`` (canonical order, first record of a sample wins)."""
        records = read_results(self.out / RESULTS_FILE) + [r for p in self.shards() for r in read_results(p)]
        uniq = {record_key(r): r for r in reversed(records)}
        records = _canonical(list(uniq.values()), run)
        _write_atomic(self.out / RESULTS_FILE, records)
        for p in self.shards():
            p.unlink()
        if self.shards_dir.exists() and not any(self.shards_dir.iterdir()):
            self.shards_dir.rmdir()
        return records


def run_eval(
    source: str | Path | dict[str, Any] | Run,
    out: str | Path | None = None,
    quiet: bool = False,
    *,
    model: Any = None,
    tokenizer: Any = None,
    generate_fn: GenerateFn | None = None,
    patch_fn: PatchFn | None = None,
    report: bool = True,
) -> EvalResult | None:
    """Run (or resume) a run; returns its records and summary (``None`` on non-main processes).

    ``model``/``tokenizer`` skip loading the run's model; ``generate_fn`` replaces
    :func:`~kvtools.eval.generation.generate_greedy` and ``patch_fn`` :func:`kvtools.patch`
    (tests, other decoding); ``report=False`` writes no summary files nor plots.
    """
    run = source if isinstance(source, Run) else load_run(source)
    rank, world, state = _world()
    folder = _Folder(check_out_dir(out or run.spec.out, "out"), rank, world)
    config_path = folder.out / run.config_file
    resolved = run.to_dict()
    if config_path.exists() and folder.has_results():  # a config without results (a failed start) binds nothing
        try:
            old = json.loads(config_path.read_text(encoding="utf-8"))
        except ValueError:
            raise ConfigError(f"{config_path}: unreadable run config; delete it or use another output folder") \
                from None
        resolved = run.resumed(old, folder.out)
    max_context = None
    if model is None:
        _refuse_random(run)
        from ..models import model_context_length

        max_context = model_context_length(run.spec.model)  # the model exists; no weights loaded
    elif (given := _dtype_of(model)) not in (None, run.spec.dtype):
        raise ConfigError(f"dtype: the run is {run.spec.dtype}, the model passed to it is {given}; load it in "
                          f"{run.spec.dtype} or give the run `dtype: {given}`")
    all_items = resolve_items(run)  # public-data suites load their examples here, before any write
    _check_lengths([it for _, it in all_items], max_context)

    done = folder.done()
    _check_model_of(done, run, folder.out)
    _check_question_of(done, run, folder.out)
    done_keys = {record_key(r) for r in done}
    items = [pair for i, pair in enumerate(all_items) if i % folder.world == folder.rank]
    todo = [(suite, it, [c for c in run.configs if (c.name, *it.key()) not in done_keys]) for suite, it in items]
    todo = [t for t in todo if t[2]]

    first: dict[Item, Prepared] = {}
    if todo:
        if model is None or tokenizer is None:
            model, tokenizer = _load(run)
        max_context = getattr(model.config, "max_position_embeddings", None)
        _check_lengths([it for _, it, _ in todo], max_context)
        first = _prepare_shortest(todo, tokenizer, run.spec.seed, max_context)
        if run.question == "agnostic":
            _check_splits(first)
    # everything checked: only now the folder and its run config are written
    if folder.rank == 0:
        folder.out.mkdir(parents=True, exist_ok=True)
        config_path.write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    if state is not None:
        state.wait_for_everyone()
    if todo:
        folder.results.parent.mkdir(parents=True, exist_ok=True)
        loop = _Loop(run, model, tokenizer, max_context, generate_fn, patch_fn, _prompts_seen(done))
        loop.run_all(todo, first, folder.results, quiet or folder.rank != 0)

    if state is not None:
        state.wait_for_everyone()
    if folder.rank != 0:
        return None
    records = folder.merge(run)
    files = run.write_report(records, folder.out) if report else []
    return EvalResult(folder.out, records, run.summary(records), [config_path, folder.out / RESULTS_FILE, *files])


def _dtype_of(model: Any) -> str | None:
    """The dtype name of a model's first parameter (None: a model without parameters)."""
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return None


def resolve_items(run: Run) -> list[tuple[SuiteSpec, Item]]:
    """The run's items with their suite; a public-data suite loads its examples here, and a dataset it
    cannot load is a :class:`ConfigError` naming the suite (``suites[i].source: ...``)."""
    items: list[tuple[SuiteSpec, Item]] = []
    for i, suite in enumerate(run.suites):
        try:
            items += [(suite, item) for item in suite.items()]
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


def _check_model_of(records: list[dict[str, Any]], run: Run, out_dir: Path) -> None:
    """The folder's results are of the run's model (the run config already says so, unless it was deleted)."""
    others = sorted({str(r.get("model")) for r in records if r.get("model") not in (None, run.model_name)})
    if others:
        raise ConfigError(f"{out_dir} holds results of model {', '.join(others)}, this run uses {run.model_name}; "
                          "use another output folder, or delete that folder to start over")


def _check_question_of(records: list[dict[str, Any]], run: Run, out_dir: Path) -> None:
    """The folder's results were fed the way the run feeds its prompts (question-aware or agnostic)."""
    others = sorted({question_of(r) for r in records if r.get("score") is not None} - {run.question})
    if others:
        raise ConfigError(f"{out_dir} holds question-{others[0]} results, this run is question-{run.question}; "
                          "use another output folder")


def _check_splits(prepared: dict[Item, Prepared]) -> None:
    """Each prompt of a question-agnostic run can be split before its question (checked on the shortest prompt
    of each task, before anything is written; the others when they run)."""
    for item, prep in prepared.items():
        if prep.context_tokens is None:
            raise ConfigError(f"question: agnostic: {item.suite} {item.task} length {item.length}: the prompt cannot "
                              "be split into its context and its question with this tokenizer; run it question-aware")


def _prepare_shortest(todo: list[tuple[SuiteSpec, Item, list[KVConfig]]], tokenizer: Any, seed: int,
                      max_context: int | None) -> dict[Item, Prepared]:
    """Prepare the shortest item of every (suite, task) to do, before anything is written: a length too
    short for a task's prompt fails here. Returns the prepared prompts, for the run to use."""
    shortest: dict[tuple[int, str], tuple[SuiteSpec, Item]] = {}
    for suite, item, _ in todo:
        key = (id(suite), item.task)
        if suite.kind == "generate" and (key not in shortest or item.length < shortest[key][1].length):
            shortest[key] = (suite, item)
    return {item: suite.prepare(item, tokenizer, seed, max_context) for suite, item in shortest.values()}


def _prompts_seen(records: list[dict[str, Any]]) -> dict[tuple, str]:
    """The prompt hash of every finished item (any method's record of it)."""
    return {record_key(r)[1:]: r["prompt_sha1"] for r in records if r.get("prompt_sha1")}


def _refuse_random(run: Run) -> None:
    if run.spec.model and run.spec.model.startswith("random:"):
        raise ConfigError("run.model: eval needs a real model with a tokenizer; random:SHAPE models are for "
                          "`kvtools bench`")


def _release_memory() -> None:
    """Let glibc hand freed heap back to the system before the next prefill (a dropped shared storage's, or an
    item's at its end). A long prompt's shared prefill frees gigabytes that glibc otherwise keeps: on Gemma-3 at
    4k the process grew 0.9 GB from the first item to the second without this and stayed flat with it, and the
    32k sweep was OOM-killed at its third item. A garbage collection first, so that what a reference cycle still
    holds is freed too."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _storage(config: KVConfig) -> str | None:
    """The KV storage a method's prefill attends (its ``quant`` section, None: the model's dtype)."""
    return None if config.quant is None else config.quant.model_dump_json()


def _by_storage(configs: Sequence[KVConfig], shares: Callable[[KVConfig], bool]) -> list[KVConfig]:
    """An item's methods in the order they run: each shared storage's methods together (storages in the order
    the run names them first), then those that prefill alone. So one shared prefill is held at a time and none
    while a method prefills alone: on Gemma-3 at 32k, ``full-int4`` prefilling while the int8 storage waited for
    its last two methods took the process past the machine's 23 GB."""
    groups = list(dict.fromkeys(_storage(c) for c in configs if shares(c)))
    return sorted(configs, key=lambda c: groups.index(_storage(c)) if shares(c) else len(groups))


def _load(run: Run):
    _refuse_random(run)
    from ..models import load_model

    kw = {"device_map": "auto"} if run.spec.device == "auto" else {}
    import torch

    return load_model(run.spec.model, dtype=getattr(torch, run.spec.dtype),
                      device=None if run.spec.device in (None, "auto") else run.spec.device, **kw)


@dataclass
class _Loop:
    """Runs the items left to do, appending one record per (item, method) to the results file."""

    run: Run
    model: Any
    tokenizer: Any
    max_context: int | None
    generate_fn: GenerateFn | None
    patch_fn: PatchFn | None
    prompts_seen: dict[tuple, str]
    #: methods found not to prefill as the dense prefill does (share_prefill): they prefill alone
    own_prefill: set[str] = field(default_factory=set)
    #: False once the model could not give a shared prefill (share_prefill)
    sharing: bool = True

    def _shares(self, cfg: KVConfig) -> bool:
        """Whether ``cfg`` replays the item's shared dense prefill (the run asks for it, the default generation
        runs, question-aware, and the method may and has not failed to)."""
        return (self.run.spec.share_prefill and self.sharing and self.generate_fn is None and self.patch_fn is None
                and self.run.question == "aware" and cfg.name not in self.own_prefill and replayable(cfg))

    def _replayed(self, sample: Any, cfg: KVConfig, shared: dict[str | None, DensePrefill], storage: str | None,
                  patch_fn: PatchFn) -> dict[str, Any] | None:
        """``cfg``'s record from the item's shared prefill for its storage (made on first use), or None: the
        model cannot give one (split over devices: none shares from now on) or the method does not prefill as
        it does (it prefills alone from now on, freshly patched)."""
        if storage not in shared:
            try:
                shared[storage] = sample.dense(cfg.quant)
            except PrefillMismatch:
                self.sharing = False
                return None
        with patch_fn(self.model, cfg) as handle:
            try:
                return sample(handle, shared[storage])
            except PrefillMismatch:
                self.own_prefill.add(cfg.name)
                return None

    def run_all(self, todo: list[tuple[SuiteSpec, Item, list[KVConfig]]], prepared: dict[Item, Prepared],
                results: Path, quiet: bool) -> None:
        from tqdm.auto import tqdm

        from ..patching import patch

        patch_fn = self.patch_fn or patch
        total = sum(len(cs) for _, _, cs in todo)
        with tqdm(total=total, disable=quiet, desc="eval", unit="sample") as bar, \
                results.open("a", encoding="utf-8") as f:
            for suite, item, configs in todo:
                sample = self._stream(suite, item) if suite.kind == "stream" else \
                    self._prompt(suite, item, prepared.get(item))
                # the item's dense prefill per KV storage, made when its first method replays it and dropped
                # after its last one; a storage only one method would replay is not worth a prefill of its own
                shared: dict[str | None, DensePrefill] = {}
                users = Counter(_storage(c) for c in configs if suite.kind != "stream" and self._shares(c))
                left = Counter(users)

                def replays(c: KVConfig) -> bool:
                    return users[_storage(c)] > 1 and self._shares(c)

                for cfg in _by_storage(configs, replays):
                    bar.set_postfix(method=cfg.name, suite=item.suite, task=item.task, length=item.length)
                    t0 = time.perf_counter()
                    rec = None
                    storage = _storage(cfg)
                    if replays(cfg):
                        left[storage] -= 1
                        rec = self._replayed(sample, cfg, shared, storage, patch_fn)
                        if left[storage] == 0:
                            shared.pop(storage, None)
                            _release_memory()  # before the next storage's prefill, not only at the item's end
                    if rec is None:
                        with patch_fn(self.model, cfg) as handle:
                            rec = sample(handle)
                    base = {"model": self.run.model_name, "suite": item.suite, "task": item.task,
                            "length": item.length, "depth": item.depth, "sample": item.sample, "method": cfg.name,
                            "config": cfg.to_dict()}
                    rec = {**base, **rec, "seconds": rec.get("seconds", time.perf_counter() - t0)}
                    f.write(json.dumps(rec) + "\n")
                    f.flush()
                    bar.update()
                del sample, shared
                _release_memory()

    def _prompt(self, suite: SuiteSpec, item: Item, prep: Prepared | None):
        """The generated sample of one item: ``handle -> record fields``, on one prompt for every method."""
        if prep is None:
            prep = suite.prepare(item, self.tokenizer, self.run.spec.seed, self.max_context)
        sha = hashlib.sha1(json.dumps(prep.input_ids).encode()).hexdigest()[:12]
        seen = self.prompts_seen.get(item.key())
        if seen is not None and seen != sha:
            raise ConfigError(f"{item.suite} {item.task} length {item.length} depth {item.depth} sample "
                              f"{item.sample}: the methods already run saw another prompt (an earlier kvtools, "
                              "tokenizer or seed); results would be mixed: use another output folder")
        generate = self.generate_fn
        if generate is None:
            from .generation import generate_greedy as generate
        mode: dict[str, Any] = {"question": self.run.question}
        split: dict[str, int] = {}
        if self.run.question == "agnostic":
            _check_splits({item: prep})
            split["split"] = mode["context_tokens"] = prep.context_tokens

        def sample(handle: Any, shared: DensePrefill | None = None) -> dict[str, Any]:
            if shared is not None:
                gen = generate(self.model, self.tokenizer, handle, prep.prompt, prep.max_new_tokens, prefill=shared)
            else:
                gen = generate(self.model, self.tokenizer, handle, prep.prompt, prep.max_new_tokens, **split)
            return {"prompt_sha1": sha, "n_tokens": len(prep.input_ids), "references": prep.references,
                    "output": gen.text, "score": float(prep.score(gen.text)), "kv_bytes": gen.kv_bytes,
                    "new_tokens": gen.new_tokens, "prefill_s": gen.prefill_s, "decode_s": gen.decode_s,
                    "decode_ms": 1000 * gen.decode_s / max(gen.new_tokens - 1, 1),
                    "seconds": gen.prefill_s + gen.decode_s, **mode, **prep.meta,
                    **({"prefill": "shared"} if getattr(gen, "prefill", "own") == "shared" else {})}

        sample.dense = lambda quant: dense_prefill(self.model, prep.prompt, quant)  # type: ignore[attr-defined]
        return sample

    def _stream(self, suite: SuiteSpec, item: Item):
        """The perplexity sample of one stream item: ``handle -> record fields``."""
        import torch

        from .ppl import stream_nll

        ids = torch.tensor([suite.stream_ids(item, self.tokenizer, self.run.spec.seed)], device=self.model.device)

        def sample(handle: Any) -> dict[str, Any]:
            res = stream_nll(self.model, ids, handle, chunk=suite.chunk, segment=suite.segment)
            return {"score": None, "ppl": res.ppl(), "ppl_segments": res.segments(), "segment": suite.segment}

        return sample
