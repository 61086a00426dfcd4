"""The ``kvtools`` command (also ``python -m kvtools``).

    kvtools niah --config full,snapkv,streamingllm --lengths 1k,2k,4k --depths 0:100:11 --samples 2
    kvtools eval configs/eval/ruler-smollm2.yaml
    kvtools bench --config full,snapkv --lengths 2k,4k,8k
    kvtools lm-eval --config full,snapkv --tasks arc_easy --limit 100   # lm-evaluation-harness
    kvtools configs        # presets, one line each
    kvtools methods        # methods per stage, with their parameters

Errors kvtools raises (bad configs, too-long inputs, missing models) print
``error: <message>`` on stderr and exit with status 2, without a traceback.
Every command checks its arguments, its ``--out`` path, the model (from its config,
no weights loaded) and the lengths against the model's context before any model
load, and writes nothing when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kvtools.errors import ConfigError, KVToolsError

__all__ = ["build_parser", "main"]


def _split_list(spec: str, option: str, what: str, allowed=None, cast=None) -> list:
    """A comma list option: no empty items, each in ``allowed`` / converted by ``cast``, else a clear error."""
    items = [item.strip() for item in spec.split(",")]
    if not items or any(not item for item in items):
        raise ConfigError(f"{option}: empty item in '{spec}'; give {what} separated by commas")
    if allowed is not None:
        bad = [i for i in items if i not in allowed]
        if bad:
            raise ConfigError(f"{option}: unknown {', '.join(bad)}; allowed: {', '.join(allowed)}")
    if cast is not None:
        try:
            items = [cast(i) for i in items]
        except ValueError:
            raise ConfigError(f"{option}: expected {what}, got '{spec}'") from None
    return items


def _split_configs(spec: str) -> list[str]:
    return _split_list(spec, "--config", "preset names or YAML paths")


def _positive_int(x: str) -> int:
    v = int(x)
    if v < 1:
        raise ValueError(x)
    return v


def _check_model(model: str | None, lengths: Sequence[int] = (), what: str = "--lengths") -> None:
    """The model can be found and ``lengths`` fit its context, read from its config (no weights loaded)."""
    from kvtools.models import check_context, model_context_length

    check_context(lengths, model_context_length(model), what)


def _cmd_niah(args: argparse.Namespace) -> int:
    from kvtools.config import check_out_dir
    from kvtools.eval.niah import niah_grid

    run = niah_grid(  # configs, grid and haystack validated; nothing loaded
        args.model, _split_configs(args.config), args.lengths, args.depths, args.samples, args.haystack,
        args.max_new_tokens, args.seed, args.out, question="agnostic" if args.question_agnostic else "aware",
        dtype=args.dtype, share_prefill=args.share_prefill,
    )
    check_out_dir(args.out)
    _check_model(args.model, run.suites[0].lengths)
    if args.processes > 1:
        return _spawn(args, [None])
    return _run([(run, args.out)], args.quiet)


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvtools.config import check_out_dir
    from kvtools.eval.run import load_run, split_models

    run = load_run(args.run)  # validate the whole run file before loading any model
    runs = []
    for one, sub in split_models(run):  # every model and folder checked before the first one runs
        out = args.out if sub is None else (Path(args.out) / sub.name if args.out else sub)
        check_out_dir(out or one.spec.out, "--out" if args.out else "out")
        if one.spec.model is None or not one.spec.model.startswith("random:"):
            _check_model(one.spec.model)
        runs.append((one, out))
    if args.processes > 1:
        return _spawn(args, [one.spec.device for one, _ in runs])
    return _run(runs, args.quiet)


def _spawn(args: argparse.Namespace, devices: list[str | None]) -> int:
    """``--processes N`` (validated run): the same command in N one-process-per-shard workers on CPU cores, through
    ``torchrun``; each takes every N-th item, the first merges the shards (as under ``accelerate launch``)."""
    import socket
    import subprocess

    n = args.processes
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--processes: this command already runs under a launcher (WORLD_SIZE is set)")
    if any(d not in (None, "cpu") for d in devices):
        raise ConfigError("--processes shards a run over CPU cores; on GPUs use accelerate launch "
                          "--multi_gpu --num_processes N -m kvtools ...")
    with socket.socket() as sock:  # a free port for the workers' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    threads = max(1, (os.cpu_count() or n) // n)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    rest, skip = [], False
    for a in args.argv:  # the same command without --processes
        if skip:
            skip = False
        elif a == "--processes":
            skip = True
        elif not a.startswith("--processes="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "kvtools", *rest]
    return subprocess.call(cmd, env=env)


def _run(runs: list, quiet: bool) -> int:
    """Run each ``(run, out)`` through the eval runner, which loads the datasets and checks the lengths
    before writing anything; the main process prints the summary and the files written."""
    from kvtools.eval.run import run_eval

    for run, out in runs:
        try:
            res = run_eval(run, out=out, quiet=quiet)
        except KeyboardInterrupt:
            print(f"\ninterrupted: finished samples are saved in {out or run.spec.out}; rerun the same command "
                  "to resume", file=sys.stderr)
            return 130
        if res is not None:
            print(res.summary)
            print(f"wrote {len(res.files)} files to {res.out_dir}:")
            for path in res.files:
                print(f"  {path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kvtools.eval.grid import parse_lengths

    configs = _split_configs(args.config)
    lengths = parse_lengths(args.lengths)
    from kvtools.config import check_out_dir, load_config

    check_out_dir(args.out)
    for c in configs:
        load_config(c)
    if not (args.model and args.model.startswith("random:")):
        _check_model(args.model, lengths)
    from kvtools.bench.e2e import report_markdown, run_bench

    rows = run_bench(
        args.model, configs, lengths, args.out, decode_tokens=args.decode_tokens, warmup=args.warmup,
        repeats=args.repeats, seed=args.seed, quiet=args.quiet, device=args.device, baseline=args.baseline,
        isolate=args.isolate,
    )
    print(report_markdown(rows))
    print(f"wrote bench.jsonl, bench.md, bench.csv, bench.png to {args.out}")
    return 0


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kvtools.config import check_out_dir, load_config

    configs = _split_configs(args.config)
    tasks = _split_list(args.tasks, "--tasks", "lm-eval task or group names")
    for c in configs:
        load_config(c)
    check_out_dir(args.out)
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ConfigError(f"--include-path: {args.include_path} is not a folder")
    if args.model is None or not Path(args.model).expanduser().is_dir():
        _check_model(args.model)
    from kvtools.eval.lm_eval_run import check_tasks, run_lm_eval

    manager = check_tasks(tasks, args.include_path)  # every task found before the model loads
    table = run_lm_eval(
        args.model, configs, tasks, args.out, include_path=args.include_path, limit=args.limit,
        num_fewshot=args.num_fewshot, dtype=args.dtype, device=args.device, max_length=args.max_length,
        max_gen_toks=args.max_gen_toks, seed=args.seed, quiet=args.quiet, batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template, manager=manager,
    )
    print(table)
    print(f"wrote results_<config>.json per config and summary.md to {args.out}")
    return 0


def _cmd_bench_attention(args: argparse.Namespace) -> int:
    from kvtools.eval.grid import parse_lengths

    configs = _split_configs(args.config)
    lengths = parse_lengths(args.lengths)
    from kvtools.attention.block_sparse import BACKENDS

    backends = _split_list(args.backends, "--backends", "backend names", allowed=BACKENDS)
    layers = None if args.layers is None else _split_list(args.layers, "--layers", "layer indices", cast=int)
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    from kvtools.config import check_out_dir, load_config

    check_out_dir(args.out)
    for c in configs:
        load_config(c)
    if args.model is not None:
        _check_model(args.model, lengths)
    from kvtools.bench.attention import attention_markdown, run_attention_bench

    rows = run_attention_bench(configs, lengths, shape=args.shape, backends=backends, repeats=args.repeats,
                               device=args.device, out=args.out, seed=args.seed, quiet=args.quiet,
                               model=args.model, layers=layers)
    print(attention_markdown(rows))
    print(f"wrote attention.jsonl, attention.md, attention.png to {args.out}")
    return 0


def _cmd_bench_recall(args: argparse.Namespace) -> int:
    from kvtools.eval.grid import parse_lengths

    lengths = parse_lengths(args.length)
    if len(lengths) != 1:
        raise ConfigError(f"--length: one prompt length, got {args.length!r}")
    (length,) = lengths
    top_ks = _split_list(args.top_k, "--top-k", "integers >= 1", cast=_positive_int)
    from kvtools.bench.recall import kind_params, recall_markdown, run_recall_bench

    kinds = _split_list(args.index, "--index", "index kinds")
    for kind in kinds:
        try:  # a bad name, field or value fails here, before the model loads
            kind_params(kind)
        except ConfigError as exc:
            raise ConfigError(f"--index: {exc}") from None
    from kvtools.config import check_out_dir

    check_out_dir(args.out)
    _check_model(args.model, lengths, "--length")
    rows = run_recall_bench(args.model, length, top_ks, kinds, out=args.out, n_sink=args.n_sink,
                            window=args.window, n_eval=args.queries, seed=args.seed, quiet=args.quiet)
    print(recall_markdown(rows))
    print(f"wrote recall.jsonl, recall.md, recall.png to {args.out}")
    return 0


def _cmd_calibrate_heads(args: argparse.Namespace) -> int:
    """``kvtools calibrate heads``: retrieval-head scores (no gradients) written as a Duo pattern."""
    from kvtools.eval.grid import parse_lengths
    from kvtools.eval.haystack import MAX_NEW_TOKENS

    lengths = tuple(parse_lengths(args.lengths))
    samples = 8 if args.samples is None else args.samples
    if samples < 1:
        raise ConfigError(f"--samples: must be >= 1 (prompts per length), got {samples}")
    if args.random:
        raise ConfigError("--random: only for calibrate duo (the random baseline); calibrate heads measures heads")
    short = [n for n in lengths if n <= MAX_NEW_TOKENS]
    if short:
        raise ConfigError(f"--lengths: {short} leave no room for a NIAH prompt; use lengths > {MAX_NEW_TOKENS}")
    from kvtools.config import check_out_file

    check_out_file(args.out)  # a pattern file: an existing one is replaced
    _check_model(args.model, lengths)
    from kvtools.calibration import retrieval_head_scores, write_pattern
    from kvtools.models import canonical_name, load_model

    model, tok = load_model(args.model)
    reduce = args.reduce or "max"
    res = retrieval_head_scores(model, tok, lengths=lengths, samples=samples, seed=args.seed, greedy=args.greedy,
                                reduce=reduce, quiet=args.quiet)
    name = canonical_name(args.model)
    header = (
        f"retrieval-head scores (Wu et al. 2024) for {name} (rows = layers, columns = KV heads; {reduce} over "
        f"each KV head's query heads); binarise with sparsity\n"
        f"kvtools calibrate heads --model {name} --lengths {args.lengths} --samples {samples} --reduce {reduce} "
        f"--seed {args.seed}{' --greedy' if args.greedy else ''}\n"
        f"{res.prompts} prompts, {'greedy answers' if args.greedy else 'teacher-forced needle answers'}; "
        f"greedy answer = needle on {100 * res.matched:.0f}% of them"
    )
    path = write_pattern(res.kv, args.out, header)
    print(f"wrote {path}: {res.prompts} prompts; {int((res.kv > 0).sum())} of {res.kv.numel()} KV heads copy at "
          f"least once, {int((res.kv >= 0.1).sum())} score >= 0.1; greedy answer = needle on "
          f"{100 * res.matched:.0f}% of the prompts")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    if args.method == "heads":
        return _cmd_calibrate_heads(args)
    from kvtools.eval.grid import parse_lengths

    if args.samples is not None or args.greedy or args.reduce is not None:
        raise ConfigError("--samples / --greedy / --reduce: only for calibrate heads")
    lengths = tuple(parse_lengths(args.lengths))
    if args.steps < 1 or args.lr <= 0 or args.reg < 0:
        raise ConfigError("--steps must be >= 1, --lr > 0, --reg >= 0")
    from kvtools.config import check_out_file

    check_out_file(args.out)  # a pattern file: an existing one is replaced
    _check_model(args.model, lengths)
    from kvtools.calibration import calibrate_duo, write_pattern
    from kvtools.models import canonical_name, load_model

    model, tok = load_model(args.model)
    if args.random:  # the baseline calibrated heads must beat: uniform random gates
        import torch

        from kvtools.families import adapter_for

        g = torch.Generator().manual_seed(args.seed)
        shape = (len(adapter_for(model).attention_modules(model)), model.config.num_key_value_heads)
        gates = torch.rand(shape, generator=g)
        path = write_pattern(gates, args.out, f"random gates (seed {args.seed}) for {canonical_name(args.model)}")
        print(f"wrote {path}: random gates, seed {args.seed}")
        return 0
    gates, losses = calibrate_duo(
        model, tok, steps=args.steps, lr=args.lr, reg=args.reg, lengths=lengths, n_sink=args.n_sink,
        window=args.window, seed=args.seed, quiet=args.quiet,
    )
    header = (
        f"DuoAttention gates for {canonical_name(args.model)} (rows = layers, columns = KV heads)\n"
        f"kvtools calibrate duo --model {canonical_name(args.model)} --steps {args.steps} --lr {args.lr} "
        f"--reg {args.reg} --lengths {args.lengths} --n-sink {args.n_sink} --window {args.window} --seed {args.seed}\n"
        f"loss: first {losses[0]:.5f}, last {losses[-1]:.5f}"
    )
    path = write_pattern(gates, args.out, header)
    print(f"wrote {path}: mean alpha {float(gates.mean()):.3f}; loss {losses[0]:.5f} -> {losses[-1]:.5f}")
    return 0


def _cmd_configs(args: argparse.Namespace) -> int:
    from kvtools.config import list_presets

    presets = list_presets()
    width = max((len(name) for name in presets), default=0)
    for name, description in presets.items():
        print(f"{name:<{width}}  {description.splitlines()[0] if description else ''}")
    return 0


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _cmd_methods(args: argparse.Namespace) -> int:
    from kvtools.config import STAGE_MODELS

    width = max(len(name) for methods in STAGE_MODELS.values() for name in methods)
    for stage, methods in STAGE_MODELS.items():
        print(f"{stage}:")
        for name, model in methods.items():
            print(f"  {name:<{width}}  {_first_line(model.__doc__)}")
            params = [f"{key}={info.default!r}" for key, info in model.model_fields.items() if key != "method"]
            if params:
                print(f"  {'':<{width}}  ({', '.join(params)})")
    return 0


def _add_out_seed_quiet(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every benchmark and grid command shares."""
    parser.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_processes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=_positive_int, default=1, metavar="N",
                        help="shard the run over N worker processes on CPU cores (torchrun; each takes every N-th "
                             "item with cores/N threads; the first merges the results): on a few cores N one-thread "
                             "workers decode a small model faster than one N-thread process (default: 1)")


def _command(sub: Any, name: str, func: Callable[[argparse.Namespace], int], help: str,
             description: str | None = None) -> argparse.ArgumentParser:
    """The subparser (``sub``: the parser's subparsers) of command ``name``, which runs ``func(args)``."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    parser.add_argument("--no-cache", action="store_true", default=argparse.SUPPRESS, help=_NO_CACHE_HELP)
    return parser


_NO_CACHE_HELP = ("de-quantise a GGUF model on every load instead of reading (and writing) its cached weights "
                  "(kvtools.models.model_cache_dir(); sets KVTOOLS_MODEL_CACHE=0)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvtools`` command."""
    parser = argparse.ArgumentParser(
        prog="kvtools", description="Training-free KV-cache policies for HuggingFace LLMs, and their evaluation."
    )
    parser.add_argument("--no-cache", action="store_true", help=_NO_CACHE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    niah = _command(sub, "niah", _cmd_niah, "needle-in-a-haystack grid: accuracy heatmaps per method",
                    "Needle in a haystack over context lengths x needle depths; resumable "
                    "(rerun with the same --out to continue).")
    niah.add_argument("--model", default=None, help="model name, hub id, local dir or GGUF file (default: built-in)")
    niah.add_argument("--config", default="full",
                      help="comma list of presets or YAML paths, e.g. full,snapkv,streamingllm (default: full)")
    niah.add_argument("--lengths", default="1k,2k,4k",
                      help="context lengths in tokens: 1k,2k,4k or 1500,0.5k or start:stop:count (k = 1024; "
                           "default: 1k,2k,4k)")
    niah.add_argument("--depths", default="0:100:11",
                      help="needle depths in percent: start:stop:count (inclusive) or a comma list "
                           "(default: 0:100:11)")
    niah.add_argument("--samples", type=int, default=1, help="samples per (length, depth) cell (default: 1)")
    niah.add_argument("--haystack", default=None, metavar="DIR",
                      help="folder of .txt files for the haystack (default: built-in varied filler)")
    niah.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per sample (default: 16)")
    niah.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                      help="the model's dtype, and so its KV cache's (default float32)")
    niah.add_argument("--question-agnostic", action="store_true",
                      help="feed the haystack first, compressed before the question is seen, then the question "
                           "(kept whole); default: the whole prompt in one call (question-aware)")
    _add_processes(niah)
    niah.add_argument("--share-prefill", action="store_true",
                      help="one dense prefill per prompt, replayed into every method that prefills as full does "
                           "(checked per layer): the same results, faster with many methods")
    _add_out_seed_quiet(niah, "runs/niah")

    ev = _command(sub, "eval", _cmd_eval, "a YAML-configured run: methods x suites (niah, passkey, ruler, ppl), "
                  "resumable", "Run (or resume) the evaluation described by a run file; "
                  "`accelerate launch -m kvtools eval RUN.yaml` (GPUs) or `kvtools eval RUN.yaml --processes N` "
                  "(CPU cores) shards it over processes.")
    ev.add_argument("run", help="run file (YAML), e.g. configs/eval/ruler-smollm2.yaml")
    ev.add_argument("--out", default=None, help="output folder (default: the run file's `out`)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_processes(ev)

    bench = _command(sub, "bench", _cmd_bench, "prefill time, decode ms/token, KV bytes and memory per method, "
                     "side by side", "Speed and memory of each method vs full, measured interleaved in one process.")
    bench.add_argument("--model", default=None,
                       help="model name/path (default: built-in), or random:SHAPE[:layers=N] for a random-weight "
                            "model of a real shape (llama-3-8b, qwen3-8b, smollm2-135m)")
    bench.add_argument("--config", default="full,snapkv,streamingllm", help="comma list of presets or YAML paths")
    bench.add_argument("--lengths", default="2k,4k,8k", help="prompt lengths (k = 1024)")
    bench.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps (default: 16)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (default: 2)")
    bench.add_argument("--repeats", type=int, default=1, help="prefills timed per cell; median (default: 1)")
    bench.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: where the model loads)")
    bench.add_argument("--baseline", choices=["hf"], default=None,
                       help="hf: also measure the unpatched model with transformers' DynamicCache (row 'hf'), "
                            "and give prefill/decode as a ratio to it")
    bench.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=True,
                       help="run each (method, length) cell in a fresh process, so its memory peak is its own "
                            "(default: on; --no-isolate: one process, faster)")
    _add_out_seed_quiet(bench, "runs/bench")

    lm = _command(sub, "lm-eval", _cmd_lm_eval, "lm-evaluation-harness tasks on the patched model, one run per "
                  "config, side by side", "Run lm-evaluation-harness tasks (pip install 'kvtools[lm-eval]') on the "
                  "model patched with each config in turn; resumable (a config whose results file exists is "
                  "skipped).")
    lm.add_argument("--tasks", required=True, help="comma list of lm-eval task or group names")
    lm.add_argument("--config", default="full", help="comma list of presets or YAML paths (default: full)")
    lm.add_argument("--model", default=None, help="model name, hub id, local dir or GGUF file (default: built-in)")
    lm.add_argument("--include-path", default=None, metavar="DIR", help="folder of extra task YAMLs")
    lm.add_argument("--limit", type=float, default=None,
                    help="documents per task (an integer), or a fraction of each task if < 1")
    lm.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    lm.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    lm.add_argument("--device", default=None, help="cpu, cuda, ... (default: where the model loads)")
    lm.add_argument("--max-length", type=int, default=None,
                    help="tokens per request; longer contexts lose their start (default: the model's context)")
    lm.add_argument("--max-gen-toks", type=int, default=256,
                    help="new tokens for generation tasks that set none (default: 256)")
    lm.add_argument("--batch-size", type=int, default=1,
                    help="generation requests per left-padded batch; log-likelihood requests run one context at a "
                         "time (default: 1)")
    lm.add_argument("--apply-chat-template", action="store_true",
                    help="wrap each prompt (and few-shot examples, as turns) in the tokenizer's chat template")
    _add_out_seed_quiet(lm, "runs/lm-eval")

    ba = _command(sub, "bench-attention", _cmd_bench_attention,
                  "attention-only prefill time of sparse prefill methods vs dense SDPA, with block density",
                  "One attention layer of a real shape on structured synthetic q/k/v, or a real model's captured "
                  "q/k/v (--model): selection + block-sparse attention per backend vs dense SDPA, side by side.")
    ba.add_argument("--model", default=None,
                    help="capture real q/k/v from this model's full-attention layers (e.g. gemma3-270m) "
                         "instead of synthetic inputs")
    ba.add_argument("--layers", default=None, help="with --model: comma list of layer indices "
                                                   "(default: full-attention layers, at most 4)")
    ba.add_argument("--config", default="flexprefill,hip", help="comma list of presets / YAML paths")
    ba.add_argument("--lengths", default="8k,16k,32k", help="prompt lengths (k = 1024)")
    ba.add_argument("--shape", default="smollm2-135m", help="head layout: llama-3-8b, qwen3-8b, smollm2-135m")
    ba.add_argument("--backends", default="torch,flex", help="comma list: torch, flex, triton")
    ba.add_argument("--repeats", type=int, default=3, help="timed runs per cell; median (default: 3)")
    ba.add_argument("--device", default="cpu")
    _add_out_seed_quiet(ba, "runs/bench-attention")

    br = _command(sub, "bench-recall", _cmd_bench_recall,
                  "recall@k vs exact attention and search time of each ANN index kind (retrieval cache)",
                  "One dense pass over a NIAH prompt; per layer and KV head, index the keys between sink and "
                  "window and search with the last prompt queries.")
    br.add_argument("--model", default=None, help="model name/path (default: built-in)")
    br.add_argument("--length", default="8k", help="prompt length (k = 1024)")
    br.add_argument("--top-k", default="128,256", help="comma list of k")
    br.add_argument("--index", default="flat,hnsw,ivf-keys,ivf-queries", help="comma list of index kinds (flat, hnsw, hnsw-ip, ivf-keys, ivf-queries, hnsw+hot, ivf+hot), each "
                         "optionally with retrieval parameters: ivf-keys:nlist=256:nprobe=16")
    br.add_argument("--n-sink", type=int, default=128)
    br.add_argument("--window", type=int, default=512)
    br.add_argument("--queries", type=int, default=64, help="last prompt queries searched per head")
    _add_out_seed_quiet(br, "runs/bench-recall")

    cal = _command(sub, "calibrate", _cmd_calibrate, "calibrate a method's parameters on the model (duo: head gates; "
                   "heads: retrieval-head scores without gradients, a duo pattern)")
    cal.add_argument("method", choices=["duo", "heads"], help="what to calibrate")
    cal.add_argument("--model", default=None, help="model name/path (default: built-in)")
    cal.add_argument("--out", required=True, help="pattern file to write (TSV)")
    cal.add_argument("--steps", type=int, default=200)
    cal.add_argument("--lr", type=float, default=0.02)
    cal.add_argument("--reg", type=float, default=0.05, help="L1 weight on the gates")
    cal.add_argument("--lengths", default="1k,2k", help="context lengths of the synthetic samples")
    cal.add_argument("--n-sink", type=int, default=64)
    cal.add_argument("--window", "--recent", dest="window", type=int, default=256,
                     help="streaming heads' recent tokens (--recent: the old name)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--random", action="store_true", help="write seeded random gates instead (a baseline)")
    cal.add_argument("--samples", type=int, default=None,
                     help="heads: NIAH prompts per length, depths evenly spaced (default: 8)")
    cal.add_argument("--greedy", action="store_true",
                     help="heads: score the model's greedy answers (default: teacher-force the needle's)")
    cal.add_argument("--reduce", choices=["max", "mean"], default=None,
                     help="heads: a KV head's score from its query heads' (default: max)")
    cal.add_argument("--quiet", action="store_true")

    _command(sub, "configs", _cmd_configs, "list the preset configs")
    _command(sub, "methods", _cmd_methods, "list the methods of each stage and their parameters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvtools`` command line; returns the exit status.

    >>> main(["configs"])  # doctest: +SKIP
    full               Keep every K/V entry (the baseline).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.no_cache:  # read by every load_model() of this process
        os.environ["KVTOOLS_MODEL_CACHE"] = "0"
    try:
        return int(args.func(args))
    except KVToolsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
