"""Suites for ``kvtools eval``: each turns its run-file entry into work items and prepared samples.

A suite is data (a pydantic model validated from the run file) plus two methods:
``items()`` lists the work (task x length x sample [x depth]) and ``prepare(item,
tokenizer, seed)`` builds the prompt and its scorer. Sample seeds never depend on
the method, so every method sees the same prompts. ``ppl`` is a stream suite:
it is scored by per-segment perplexity instead of generation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator

from ..config import StrictNumbers
from ..errors import ConfigError


@dataclass(frozen=True)
class Item:
    """One unit of work (run for every method)."""

    suite: str
    task: str
    length: int
    sample: int
    depth: float | None = None

    def key(self) -> tuple[str, str, int, float, int]:
        return (self.suite, self.task, self.length, -1.0 if self.depth is None else round(self.depth, 6), self.sample)


@dataclass
class Prepared:
    """A prompt ready to generate from, with its scorer (``score(output) -> 0..1``)."""

    input_ids: list[int]
    max_new_tokens: int
    references: list[str]
    score: Callable[[str], float]
    meta: dict[str, Any] = field(default_factory=dict)


def sample_seed(seed: int, item: Item) -> int:
    """A seed per item, independent of the method and of the process that runs it."""
    text = "|".join(map(str, (seed, *item.key())))
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")


def _parse_length(value: Any) -> int:
    from .niah import parse_lengths

    (n,) = parse_lengths(str(value))
    return n


class SuiteSpec(StrictNumbers):
    """Fields every suite has (booleans are not numbers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    suite: str
    lengths: list[int] = Field(min_length=1, description="target lengths in tokens (1k = 1024)")
    samples: int = Field(default=1, ge=1, description="samples per (task, length[, depth])")
    max_new_tokens: int | None = Field(default=None, ge=1, description="override the task default")
    kind: Literal["generate", "stream"] = "generate"

    @field_validator("lengths", mode="before")
    @classmethod
    def _lengths(cls, v: Any) -> Any:
        if isinstance(v, (str, int)):
            v = [v]
        return [_parse_length(x) for x in v]

    def items(self) -> list[Item]:
        raise NotImplementedError

    def prepare(self, item: Item, tokenizer: Any, seed: int, max_context: int | None) -> Prepared:
        raise NotImplementedError


class NiahSuite(SuiteSpec):
    """Needle in a haystack (the same prompts as ``kvtools niah``)."""

    suite: Literal["niah"] = "niah"
    depths: list[float] = Field(default_factory=lambda: [0.0, 50.0, 100.0], description="needle depths in %")
    haystack: str | None = Field(default=None, description="folder of .txt files (default: built-in filler)")

    @field_validator("depths", mode="before")
    @classmethod
    def _depths(cls, v: Any) -> Any:
        from .niah import parse_depths

        return parse_depths(v if isinstance(v, str) else ",".join(map(str, v)))

    def items(self) -> list[Item]:
        return [Item("niah", "niah", n, s, d) for n in self.lengths for d in self.depths for s in range(self.samples)]

    def prepare(self, item, tokenizer, seed, max_context):
        from .haystack import build_niah_prompt, load_haystack_dir
        from .niah import score_output

        corpus = load_haystack_dir(self.haystack) if self.haystack else None
        mnt = self.max_new_tokens or 16
        p = build_niah_prompt(
            tokenizer, item.length, float(item.depth), sample_seed(seed, item), max_new_tokens=mnt,
            max_context=max_context, haystack=corpus,
        )
        return Prepared(list(p.input_ids), mnt, [p.value], lambda out, v=p.value: score_output(out, v),
                        {"key": p.key, "n_tokens": p.n_tokens})


class PasskeySuite(SuiteSpec):
    """Passkey retrieval: the first integer of the output must be the pass key."""

    suite: Literal["passkey"] = "passkey"
    depths: list[float] = Field(default_factory=lambda: [0.0, 50.0, 100.0], description="pass key depths in %")

    def items(self) -> list[Item]:
        return [Item("passkey", "passkey", n, s, d) for n in self.lengths for d in self.depths
                for s in range(self.samples)]

    def prepare(self, item, tokenizer, seed, max_context):
        from .passkey import make_passkey, score

        mnt = self.max_new_tokens or 8
        p = make_passkey(tokenizer, item.length, float(item.depth) / 100, seed=sample_seed(seed, item),
                         max_new_tokens=mnt)
        return Prepared(list(p.input_ids), mnt, list(p.references), lambda out, s=p: score(s, out),
                        {"n_tokens": p.n_tokens})


class RulerSuite(SuiteSpec):
    """RULER-style synthetic tasks (niah variants, vt, cwe, fwe)."""

    suite: Literal["ruler"] = "ruler"
    tasks: list[str] | Literal["all"] = "all"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from .ruler import TASKS

        return _check_tasks(v, list(TASKS))

    def items(self) -> list[Item]:
        return [Item("ruler", t, n, s) for t in self.tasks for n in self.lengths for s in range(self.samples)]

    def prepare(self, item, tokenizer, seed, max_context):
        from .ruler import make_sample, score

        smp = make_sample(item.task, tokenizer, item.length, seed=sample_seed(seed, item),
                          max_new_tokens=self.max_new_tokens)
        return Prepared(list(smp.input_ids), smp.max_new_tokens, list(smp.references),
                        lambda out, s=smp: score(s, out), {"metric": smp.metric, "n_tokens": smp.n_tokens})


class PplSuite(SuiteSpec):
    """Per-segment perplexity of a long text streamed through the cache, chunk by chunk."""

    suite: Literal["ppl"] = "ppl"
    kind: Literal["generate", "stream"] = "stream"
    text: str | None = Field(default=None, description="a local text file (default: built-in varied filler)")
    chunk: int = Field(default=512, ge=1, description="tokens per forward call")
    segment: int = Field(default=1024, ge=1, description="tokens per reported perplexity")

    def items(self) -> list[Item]:
        return [Item("ppl", Path(self.text).name if self.text else "filler", n, s)
                for n in self.lengths for s in range(self.samples)]

    def stream_ids(self, item: Item, tokenizer: Any, seed: int) -> list[int]:
        from .haystack import iter_filler

        if self.text:
            path = Path(self.text)
            if not path.is_file():
                raise ConfigError(f"ppl.text: file not found: {path}")
            ids = tokenizer(path.read_text(encoding="utf-8", errors="replace")).input_ids
        else:
            parts, it, n_chars = [], iter_filler(sample_seed(seed, item)), 0
            while n_chars < item.length * 8:
                parts.append(next(it))
                n_chars += len(parts[-1]) + 1
            ids = tokenizer(" ".join(parts)).input_ids
        if len(ids) < item.length:
            raise ConfigError(f"ppl: the text has {len(ids)} tokens, fewer than the requested length {item.length}")
        return list(ids[: item.length])


def _check_tasks(v: Any, allowed: Sequence[str]) -> list[str]:
    if v == "all":
        return list(allowed)
    unknown = [t for t in v if t not in allowed]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], list(allowed), n=1)
        raise ValueError(
            f"unknown task '{unknown[0]}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; allowed: all, {', '.join(allowed)}"
        )
    return list(v)


class _DatasetSuite(SuiteSpec):
    """Public data through ``datasets`` (hub id or local jsonl/json/parquet): ``samples`` examples per task,
    each prompt middle-truncated to ``length - max_new_tokens`` tokens."""

    source: str | None = Field(default=None, description="hub id, local file or folder (default: the official hub id)")
    _data: dict[str, list[Any]] = PrivateAttr(default_factory=dict)

    def _examples(self, task: str) -> list[Any]:
        raise NotImplementedError

    def examples(self, task: str) -> list[Any]:
        if task not in self._data:
            self._data[task] = list(self._examples(task))
        return self._data[task]

    def items(self) -> list[Item]:
        return [Item(self.suite, t, n, i) for t in self.tasks for n in self.lengths
                for i in range(min(self.samples, len(self.examples(t))))]


class LongBenchSuite(_DatasetSuite):
    """LongBench v1 (21 tasks, official metrics) and v2 (``tasks: [longbench_v2]``, four-choice accuracy)."""

    suite: Literal["longbench"] = "longbench"
    tasks: list[str] | Literal["all"] = "all"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from .longbench import TASKS, V2_TASK

        return _check_tasks(v, [*TASKS, V2_TASK]) if v != "all" else list(TASKS)

    def _examples(self, task):
        from . import longbench as lb

        if task == lb.V2_TASK:
            return lb.load_longbench_v2(self.source or lb.HUB_V2, limit=self.samples)
        return lb.load_longbench(task, self.source or lb.HUB_V1, limit=self.samples)

    def prepare(self, item, tokenizer, seed, max_context):
        from . import longbench as lb

        ex = self.examples(item.task)[item.sample]
        mnt = self.max_new_tokens or (lb.V2_MAX_NEW_TOKENS if item.task == lb.V2_TASK
                                      else lb.TASK_MAX_NEW_TOKENS[lb.base_task(item.task)])
        p = lb.prepare_prompt(item.task, ex, tokenizer, item.length - mnt)
        return Prepared(list(p.input_ids), mnt, [], lambda out, t=item.task, e=ex: lb.score_example(t, out, e),
                        {"truncated": p.truncated, "n_original": p.n_original})


class InfiniteBenchSuite(_DatasetSuite):
    """InfiniteBench: synthetic tasks (passkey, number_string, kv_retrieval) generated locally at each
    length; real-data tasks through ``datasets``."""

    suite: Literal["infinitebench"] = "infinitebench"
    tasks: list[str] | Literal["all"] = "all"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        from .infinitebench import SYNTHETIC_TASKS, TASKS

        return _check_tasks(v, TASKS) if v != "all" else list(SYNTHETIC_TASKS)

    def _examples(self, task):
        from . import infinitebench as ib

        if task in ib.SYNTHETIC_TASKS:
            return [None] * self.samples  # generated per item
        return ib.load_infinitebench(task, self.source or ib.HUB_ID, limit=self.samples)

    def prepare(self, item, tokenizer, seed, max_context):
        from . import infinitebench as ib

        if item.task in ib.SYNTHETIC_TASKS:
            smp = ib.make_synthetic(item.task, tokenizer, item.length, seed=sample_seed(seed, item),
                                    max_new_tokens=self.max_new_tokens, max_context=max_context)
            ex, p = smp.example, smp.prompt
        else:
            ex = self.examples(item.task)[item.sample]
            mnt = self.max_new_tokens or ib.TASK_MAX_NEW_TOKENS[item.task]
            p = ib.prepare_prompt(item.task, ex, tokenizer, item.length - mnt)
        return Prepared(list(p.input_ids), p.max_new_tokens, [],
                        lambda out, t=item.task, e=ex: ib.score_example(t, out, e), {"truncated": p.truncated})


SUITES: dict[str, type[SuiteSpec]] = {
    "niah": NiahSuite,
    "passkey": PasskeySuite,
    "ruler": RulerSuite,
    "ppl": PplSuite,
    "longbench": LongBenchSuite,
    "infinitebench": InfiniteBenchSuite,
}


def suite_from_dict(raw: Any, where: str) -> SuiteSpec:
    """Validate one ``suites:`` entry of a run file."""
    from ..config import closest, validate_fields

    if not isinstance(raw, dict) or "suite" not in raw:
        raise ConfigError(f"{where}: must be a mapping with a 'suite' key; allowed suites: {', '.join(SUITES)}")
    name = raw["suite"]
    if name not in SUITES:
        raise ConfigError(f"{where}.suite: unknown value '{name}'{closest(name, list(SUITES))}; "
                          f"allowed: {', '.join(SUITES)}")
    return validate_fields(SUITES[name], raw, where, what=name)
