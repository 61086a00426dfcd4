"""Suites for ``kvtools eval``: each turns its run-file entry into work items and prepared samples.

A suite is data (a pydantic model validated from the run file) plus two methods:
``items()`` lists the work (task x length x sample [x depth]) and ``prepare(item,
tokenizer, seed, max_context)`` builds the prompt and its scorer. Prompt seeds come from
:func:`sample_seed` alone: they never depend on the method, so every method sees the same
prompts, and ``kvtools niah`` (a run of one ``niah`` suite) draws the same prompts as a run
file's ``niah`` suite. ``ppl`` is a stream suite: it is scored by per-segment perplexity
instead of generation.
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
from .grid import parse_depths, parse_lengths
from .haystack import MAX_NEW_TOKENS as NIAH_MAX_NEW_TOKENS
from .haystack import build_niah_prompt, iter_filler, load_haystack_dir, score_output


@dataclass(frozen=True)
class Item:
    """One unit of work (run for every method)."""

    suite: str
    task: str
    length: int
    sample: int
    depth: float | None = None

    def key(self) -> tuple[str, str, int, float, int]:
        """The item's identity in a run (its records add the method); depth -1 for suites without one."""
        depth = -1.0 if self.depth is None else round(float(self.depth), 6)
        return (self.suite, self.task, self.length, depth, self.sample)


@dataclass
class Prepared:
    """A prompt ready to generate from, with its scorer (``score(output) -> 0..1``).

    ``prompt`` is the suite's own prompt object (``NiahPrompt``, ``RulerSample``, ``PasskeySample``,
    ``LongPrompt``): what the generate function receives; ``meta`` goes into the sample's record.
    """

    prompt: Any
    max_new_tokens: int
    references: list[str]
    score: Callable[[str], float]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> list[int]:
        return list(self.prompt.input_ids)

    @property
    def context_tokens(self) -> int | None:
        """How many prompt tokens come before the question (``None``: the prompt cannot be split there)."""
        return getattr(self.prompt, "context_tokens", None)


def sample_seed(seed: int, item: Item) -> int:
    """The prompt seed of one item: from the run seed and the item alone, never the method nor the process
    that runs it, so every method sees the same prompts. The one seed of every suite (``kvtools niah``
    included)."""
    text = "|".join(map(str, (seed, *item.key())))
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:4], "little")


def _parse_length(value: Any) -> int:
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

    def check(self) -> None:
        """Checks beyond the fields' own, run once the suite is validated (a :class:`ConfigError` names the key)."""

    def items(self) -> list[Item]:
        raise NotImplementedError

    def prepare(self, item: Item, tokenizer: Any, seed: int, max_context: int | None) -> Prepared:
        raise NotImplementedError


class _DepthSuite(SuiteSpec):
    """A needle at each of ``depths`` percent of the haystack, for every length and sample."""

    depths: list[float] = Field(default_factory=lambda: [0.0, 50.0, 100.0], description="depths in % of the haystack")

    @field_validator("depths", mode="before")
    @classmethod
    def _depths(cls, v: Any) -> Any:
        return parse_depths(v if isinstance(v, str) else ",".join(map(str, v)))

    def items(self) -> list[Item]:
        return [Item(self.suite, self.suite, n, s, d) for n in self.lengths for d in self.depths
                for s in range(self.samples)]


class NiahSuite(_DepthSuite):
    """Needle in a haystack (``kvtools niah`` runs one of these)."""

    suite: Literal["niah"] = "niah"
    haystack: str | None = Field(default=None, description="folder of .txt files (default: built-in filler)")
    _corpus: list[str] | None = PrivateAttr(default=None)

    def check(self) -> None:
        """Every length leaves room for the answer, and the haystack folder holds text."""
        new_tokens = self.max_new_tokens or NIAH_MAX_NEW_TOKENS
        too_short = [n for n in self.lengths if n <= new_tokens]
        if too_short:
            raise ConfigError(f"lengths: {too_short} leave no room for the prompt with max_new_tokens={new_tokens}")
        self.corpus()

    def corpus(self) -> list[str] | None:
        """The haystack folder's sentences (read once), or ``None`` for the built-in filler."""
        if self.haystack and self._corpus is None:
            self._corpus = load_haystack_dir(self.haystack)
        return self._corpus

    def prepare(self, item, tokenizer, seed, max_context):
        new_tokens = self.max_new_tokens or NIAH_MAX_NEW_TOKENS
        cell_seed = sample_seed(seed, item)
        p = build_niah_prompt(tokenizer, item.length, float(item.depth), cell_seed, max_new_tokens=new_tokens,
                              max_context=max_context, haystack=self.corpus())
        return Prepared(p, new_tokens, [p.value], lambda out, v=p.value: score_output(out, v),
                        {"key": p.key, "value": p.value, "depth_actual": round(p.depth_actual, 3), "seed": cell_seed})


class PasskeySuite(_DepthSuite):
    """Passkey retrieval: the first integer of the output must be the pass key."""

    suite: Literal["passkey"] = "passkey"

    def prepare(self, item, tokenizer, seed, max_context):
        from .passkey import make_passkey, score

        mnt = self.max_new_tokens or 8
        p = make_passkey(tokenizer, item.length, float(item.depth) / 100, seed=sample_seed(seed, item),
                         max_new_tokens=mnt)
        return Prepared(p, mnt, list(p.references), lambda out, s=p: score(s, out))


def _check_tasks(v: Any, allowed: Sequence[str]) -> list[str]:
    unknown = [t for t in v if t not in allowed]
    if unknown:
        import difflib

        hint = difflib.get_close_matches(unknown[0], list(allowed), n=1)
        raise ValueError(
            f"unknown task '{unknown[0]}'" + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; allowed: all, {', '.join(allowed)}"
        )
    return list(v)


class _TaskSuite(SuiteSpec):
    """A suite of named tasks: ``tasks: all`` or a list of :meth:`task_names`."""

    tasks: list[str] | Literal["all"] = "all"

    @classmethod
    def task_names(cls) -> tuple[list[str], list[str]]:
        """(the tasks a run file may name, the tasks ``all`` stands for)."""
        raise NotImplementedError

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: Any) -> Any:
        allowed, everything = cls.task_names()
        return list(everything) if v == "all" else _check_tasks(v, allowed)


class RulerSuite(_TaskSuite):
    """RULER-style synthetic tasks (niah variants, vt, cwe, fwe)."""

    suite: Literal["ruler"] = "ruler"

    @classmethod
    def task_names(cls):
        from .ruler import TASKS

        return list(TASKS), list(TASKS)

    def items(self) -> list[Item]:
        return [Item("ruler", t, n, s) for t in self.tasks for n in self.lengths for s in range(self.samples)]

    def prepare(self, item, tokenizer, seed, max_context):
        from .ruler import make_sample, score

        smp = make_sample(item.task, tokenizer, item.length, seed=sample_seed(seed, item),
                          max_new_tokens=self.max_new_tokens)
        return Prepared(smp, smp.max_new_tokens, list(smp.references), lambda out, s=smp: score(s, out),
                        {"metric": smp.metric})


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


class _DatasetSuite(_TaskSuite):
    """Public data through ``datasets`` (hub id or local jsonl/json/parquet): ``samples`` examples per task,
    each prompt middle-truncated to ``length - max_new_tokens`` tokens."""

    source: str | None = Field(default=None, description="hub id, local file or folder (default: the official hub id)")
    _data: dict[str, list[Any]] = PrivateAttr(default_factory=dict)

    def _examples(self, task: str) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def _benchmark() -> Any:
        """The benchmark module: ``prepare_prompt(task, example, tokenizer, max_input_tokens)`` and
        ``score_example(task, output, example)``."""
        raise NotImplementedError

    def _default_new_tokens(self, task: str) -> int:
        raise NotImplementedError

    def examples(self, task: str) -> list[Any]:
        if task not in self._data:
            self._data[task] = list(self._examples(task))
        return self._data[task]

    def items(self) -> list[Item]:
        return [Item(self.suite, t, n, i) for t in self.tasks for n in self.lengths
                for i in range(min(self.samples, len(self.examples(t))))]

    def prepare(self, item, tokenizer, seed, max_context):
        bench = self._benchmark()
        ex = self.examples(item.task)[item.sample]
        new_tokens = self.max_new_tokens or self._default_new_tokens(item.task)
        p = bench.prepare_prompt(item.task, ex, tokenizer, item.length - new_tokens)
        return Prepared(p, new_tokens, [], lambda out, t=item.task, e=ex: bench.score_example(t, out, e),
                        {"truncated": p.truncated, "n_original": p.n_original})


class LongBenchSuite(_DatasetSuite):
    """LongBench v1 (21 tasks, official metrics) and v2 (``tasks: [longbench_v2]``, four-choice accuracy)."""

    suite: Literal["longbench"] = "longbench"

    @classmethod
    def task_names(cls):
        from .longbench import TASKS, V2_TASK

        return [*TASKS, V2_TASK], list(TASKS)

    @staticmethod
    def _benchmark():
        from . import longbench

        return longbench

    def _default_new_tokens(self, task):
        from . import longbench as lb

        return lb.V2_MAX_NEW_TOKENS if task == lb.V2_TASK else lb.TASK_MAX_NEW_TOKENS[lb.base_task(task)]

    def _examples(self, task):
        from . import longbench as lb

        if task == lb.V2_TASK:
            return lb.load_longbench_v2(self.source or lb.HUB_V2, limit=self.samples)
        return lb.load_longbench(task, self.source or lb.HUB_V1, limit=self.samples)


class InfiniteBenchSuite(_DatasetSuite):
    """InfiniteBench: synthetic tasks (passkey, number_string, kv_retrieval) generated locally at each
    length; real-data tasks through ``datasets``."""

    suite: Literal["infinitebench"] = "infinitebench"

    @classmethod
    def task_names(cls):
        from .infinitebench import SYNTHETIC_TASKS, TASKS

        return list(TASKS), list(SYNTHETIC_TASKS)

    @staticmethod
    def _benchmark():
        from . import infinitebench

        return infinitebench

    def _default_new_tokens(self, task):
        from .infinitebench import TASK_MAX_NEW_TOKENS

        return TASK_MAX_NEW_TOKENS[task]

    def _examples(self, task):
        from . import infinitebench as ib

        if task in ib.SYNTHETIC_TASKS:
            return [None] * self.samples  # generated per item
        return ib.load_infinitebench(task, self.source or ib.HUB_ID, limit=self.samples)

    def prepare(self, item, tokenizer, seed, max_context):
        from . import infinitebench as ib

        if item.task not in ib.SYNTHETIC_TASKS:
            return super().prepare(item, tokenizer, seed, max_context)
        smp = ib.make_synthetic(item.task, tokenizer, item.length, seed=sample_seed(seed, item),
                                max_new_tokens=self.max_new_tokens, max_context=max_context)
        p = smp.prompt
        return Prepared(p, p.max_new_tokens, [], lambda out, t=item.task, e=smp.example: ib.score_example(t, out, e),
                        {"truncated": p.truncated, "n_original": p.n_original})


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
    suite = validate_fields(SUITES[name], raw, where, what=name)
    try:
        suite.check()
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    return suite
