"""``kvtools lm-eval``: lm-evaluation-harness tasks on the model patched with each config in turn.

The harness does the work (task loading, prompts, few-shot, metrics, aggregation); kvtools
supplies the model (:class:`kvtools.harness.KVToolsLM`). One results file per config, written
when that config finishes (``results_<config>.json``, plus its samples as
``samples_<config>.jsonl``), so an interrupted run resumes at the first config without one;
``summary.md`` puts every config's metrics side by side.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvtools.errors import ConfigError

__all__ = ["check_tasks", "run_lm_eval", "summary_table"]


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("kvtools lm-eval needs lm-evaluation-harness: pip install 'kvtools[lm-eval]'") from None
    return lm_eval


def check_tasks(tasks: Sequence[str], include_path: str | Path | None = None) -> Any:
    """The harness's task manager, after checking that every name in ``tasks`` is a task, group or tag it
    knows (its built-in tasks plus the YAMLs under ``include_path``). Raises :class:`ConfigError` otherwise.
    When ``include_path`` holds every task, the built-in index (thousands of YAMLs) is not read."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in _known(local) for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    missing = [t for t in tasks if t not in _known(manager)]
    if missing:
        where = f" or under {include_path}" if include_path is not None else ""
        raise ConfigError(f"--tasks: no lm-eval task, group or tag named {', '.join(missing)} in lm-eval's "
                          f"tasks{where} (`lm-eval ls tasks` lists them; --include-path DIR adds your own YAMLs)")
    return manager


def _known(manager: Any) -> set[str]:
    return set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "config"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_lm_eval(
    model_name: str | None,
    configs: Sequence[Any],
    tasks: Sequence[str],
    out: str | Path,
    *,
    include_path: str | Path | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    dtype: str = "float32",
    device: str | None = None,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    seed: int = 0,
    quiet: bool = False,
    batch_size: int = 1,
    apply_chat_template: bool = False,
    manager: Any = None,
) -> str:
    """Run ``tasks`` once per config on ``model_name`` (loaded once); returns the markdown summary table.

    A config whose ``results_<config>.json`` already exists in ``out`` is read, not rerun. ``manager``: the
    task manager :func:`check_tasks` returned for ``tasks`` (built here when not given)."""
    from kvtools.config import load_config
    from kvtools.models import load_model

    lm_eval = _lm_eval()
    from lm_eval.utils import handle_non_serializable

    from kvtools.harness import _DTYPES, KVToolsLM

    if manager is None:
        manager = check_tasks(tasks, include_path)
    cfgs = [load_config(c) for c in configs]
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--config: two configs share a name ({', '.join(names)}); their results would collide")
    if limit is not None and limit >= 1:
        limit = int(limit)
    out = Path(out)
    model = tok = None
    results: dict[str, dict[str, Any]] = {}
    for cfg in cfgs:
        path = out / f"results_{_slug(cfg.name)}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if (saved.get("tasks") != list(tasks) or saved.get("limit") != limit
                    or bool(saved.get("apply_chat_template")) != apply_chat_template):
                raise ConfigError(f"{path} holds a run of other tasks, --limit or chat template ({saved.get('tasks')}, "
                                  f"limit {saved.get('limit')}); use another --out")
            print(f"{cfg.name}: results found in {path}, not rerun", file=sys.stderr)
            results[cfg.name] = saved["results"]
            continue
        if model is None:
            model, tok = load_model(model_name, dtype=_DTYPES[dtype], device=device)
        lm = KVToolsLM(model=model, tokenizer=tok, config=cfg, max_length=max_length, max_gen_toks=max_gen_toks,
                       batch_size=batch_size)
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=True, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                fewshot_random_seed=seed, verbosity=None if not quiet else "ERROR",
                apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
            )
        finally:
            lm.close()
        out.mkdir(parents=True, exist_ok=True)
        samples = res.get("samples") or {}
        lines = [json.dumps({"task": task, **s}, default=handle_non_serializable)
                 for task, rows in samples.items() for s in rows]
        _write_atomic(out / f"samples_{_slug(cfg.name)}.jsonl", "\n".join(lines) + "\n")
        record = {
            "config": cfg.name, "model": model_name or "smollm2-135m", "tasks": list(tasks), "limit": limit,
            "num_fewshot": num_fewshot, "dtype": dtype, "seed": seed, "apply_chat_template": apply_chat_template,
            "lm_eval_version": getattr(lm_eval, "__version__", None),
            "results": res["results"], "n-samples": res.get("n-samples"), "versions": res.get("versions"),
        }
        _write_atomic(path, json.dumps(record, indent=1, default=handle_non_serializable))  # last: marks it done
        results[cfg.name] = record["results"]
    table = summary_table(results)
    _write_atomic(out / "summary.md", f"# lm-eval: {model_name or 'smollm2-135m'}, tasks {', '.join(tasks)}"
                  f"{'' if limit is None else f', limit {limit}'}\n\n{table}\n")
    return table


def summary_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per (task, metric), one column per config (``results``: config -> the harness's
    ``results`` dict); standard errors are left out."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for name, per_task in results.items():
        for task, metrics in per_task.items():
            for key, value in metrics.items():
                if key == "alias" or "_stderr" in key or not isinstance(value, (int, float)):
                    continue
                rows.setdefault((task, key), {})[name] = value
    names = list(results)
    lines = ["| task | metric | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for (task, key), values in sorted(rows.items()):
        cells = [f"{values[n]:.4f}" if n in values else "-" for n in names]
        lines.append(f"| {task} | {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
