"""LongBench v1 and v2: loading, prompts, middle truncation, scoring and summaries.

LongBench v1 has 21 tasks whose examples share the fields ``input, context, answers,
length, all_classes``. Each task has a metric (:data:`TASK_METRIC`, implemented in
:mod:`kvtools.eval.metrics`), a prompt template written for kvtools (same information
and answer format as the upstream prompts, our own wording), and a generation budget
(:data:`TASK_MAX_NEW_TOKENS`, the upstream values). Prompts longer than the token budget
lose the middle of their context: its head and tail halves are kept, as upstream
recommends. Unlike upstream, which cuts the middle of the whole formatted prompt, the
instructions, question and options are never cut (for long contexts the two agree).

LongBench v2 has 503 four-choice questions (``_id, domain, sub_domain, difficulty,
length, question, choice_A..D, answer, context``); it is used through the pseudo task
name :data:`V2_TASK` with the same :func:`build_prompt` / :func:`score_example` API.
The model is asked to reply ``The correct answer is (X)``; :func:`extract_choice` also
accepts a bare ``(X)`` or ``X`` at the end of the reply.

Typical use::

    from kvtools.eval.longbench import load_longbench, prepare_prompt, score_example, result_record, summarize
    data = load_longbench("hotpotqa", limit=20)
    records = []
    for ex in data:
        p = prepare_prompt("hotpotqa", ex, tokenizer, max_input_tokens=7500)
        out = my_generate(p.input_ids, p.max_new_tokens)
        records.append(result_record("hotpotqa", out, ex))
    print(summarize(records))

Data loading needs the optional ``datasets`` package (``pip install 'kvtools[eval]'``).
``source`` is a hub dataset id or a local ``.jsonl`` / ``.json`` / ``.parquet`` file, a
folder holding ``<task>.jsonl`` (e.g. the unzipped upstream ``data.zip``) or the
``data.zip`` itself. The upstream hub repo ``THUDM/LongBench`` ships a loading script
that ``datasets>=4`` refuses to run, so for that id kvtools downloads the repo's
``data.zip`` with ``huggingface_hub`` and reads ``data/<task>.jsonl`` from it.
A hub id that cannot be loaded (hub unreachable, offline mode without a cached copy,
unknown id) is a :class:`~kvtools.errors.ConfigError` naming the dataset and the local
files ``source`` accepts, raised at once rather than after the hub libraries' retries.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtools.errors import ConfigError, InputTooLongError

from .metrics import best_score
from .prompting import has_chat_template

__all__ = [
    "FIRST_LINE_TASKS",
    "HUB_V1",
    "HUB_V2",
    "LongPrompt",
    "NO_CHAT_TASKS",
    "TASKS",
    "TASK_CATEGORY",
    "TASK_LANGUAGE",
    "TASK_MAX_NEW_TOKENS",
    "TASK_METRIC",
    "V2_MAX_NEW_TOKENS",
    "V2_TASK",
    "base_task",
    "build_prompt",
    "encode",
    "extract_choice",
    "fit_prompt",
    "format_prompt",
    "has_chat_template",
    "length_bucket",
    "load_dataset_source",
    "load_longbench",
    "load_longbench_v2",
    "prepare_prompt",
    "render",
    "result_record",
    "score_example",
    "summarize",
    "truncate_middle",
]

HUB_V1 = "THUDM/LongBench"
HUB_V2 = "THUDM/LongBench-v2"
#: hub repos that hold the v1 data as ``data.zip`` (plus a loading script datasets>=4 won't run)
_ZIP_REPOS = frozenset({"THUDM/LongBench", "zai-org/LongBench"})
#: pseudo task name of LongBench v2 in this module's API
V2_TASK = "longbench_v2"
V2_MAX_NEW_TOKENS = 128

# ---------------------------------------------------------------- task tables
TASKS: tuple[str, ...] = (
    "narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh",
    "hotpotqa", "2wikimqa", "musique", "dureader",
    "gov_report", "qmsum", "multi_news", "vcsum",
    "trec", "triviaqa", "samsum", "lsht",
    "passage_count", "passage_retrieval_en", "passage_retrieval_zh",
    "lcc", "repobench-p",
)  # fmt: skip

#: metric name (a key of :data:`kvtools.eval.metrics.METRICS`) per task
TASK_METRIC: dict[str, str] = {
    "narrativeqa": "qa_f1", "qasper": "qa_f1", "multifieldqa_en": "qa_f1", "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1", "2wikimqa": "qa_f1", "musique": "qa_f1", "dureader": "rouge_zh",
    "gov_report": "rouge", "qmsum": "rouge", "multi_news": "rouge", "vcsum": "rouge_zh",
    "trec": "classification", "triviaqa": "qa_f1", "samsum": "rouge", "lsht": "classification",
    "passage_count": "count", "passage_retrieval_en": "retrieval", "passage_retrieval_zh": "retrieval_zh",
    "lcc": "code_sim", "repobench-p": "code_sim",
}  # fmt: skip

#: generation budget per task (upstream values)
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64,
    "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "vcsum": 512,
    "trec": 64, "triviaqa": 32, "samsum": 128, "lsht": 64,
    "passage_count": 32, "passage_retrieval_en": 32, "passage_retrieval_zh": 32,
    "lcc": 64, "repobench-p": 64,
}  # fmt: skip

TASK_CATEGORY: dict[str, str] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"), "single_doc_qa"),
    **dict.fromkeys(("hotpotqa", "2wikimqa", "musique", "dureader"), "multi_doc_qa"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "vcsum"), "summarization"),
    **dict.fromkeys(("trec", "triviaqa", "samsum", "lsht"), "few_shot"),
    **dict.fromkeys(("passage_count", "passage_retrieval_en", "passage_retrieval_zh"), "synthetic"),
    **dict.fromkeys(("lcc", "repobench-p"), "code"),
}

_ZH_TASKS = frozenset({"multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"})
TASK_LANGUAGE: dict[str, str] = {t: ("zh" if t in _ZH_TASKS else "en") for t in TASKS}

#: few-shot and code-completion tasks: the prompt is a completion, not a chat turn (as upstream)
NO_CHAT_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
#: few-shot tasks scored on the first line of the output only (the model tends to go on with more examples)
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

# ---------------------------------------------------------------- prompt templates (kvtools wording)
_SINGLE_DOC_EN = (
    "Read the text below, then answer the question briefly.\n\n{context}\n\n"
    "Question: {input}\nGive only the answer, with no other words.\nAnswer:"
)
_MULTI_DOC_EN = (
    "Use the passages below to answer the question. Reply with the answer only, no other words.\n\n"
    "Passages:\n{context}\n\nQuestion: {input}\nReply with the answer only.\nAnswer:"
)
_TEMPLATES: dict[str, str] = {
    "narrativeqa": (
        "Below is a story (a novel or a film script) and then a question about it. Reply with the "
        "shortest answer you can, ideally a short phrase, and give no explanation.\n\n"
        "Story:\n{context}\n\nQuestion: {input}\nReply with a short phrase only, no explanation.\n\nAnswer:"
    ),
    "qasper": (
        "Below is a scientific paper and then a question about it. Reply as briefly as possible (a phrase "
        "or one sentence) and give no explanation. If the paper does not contain the answer, reply "
        '"unanswerable"; for a yes/no question reply "yes", "no" or "unanswerable".\n\n'
        "Paper:\n{context}\n\nQuestion: {input}\n"
        'Reply briefly, with no explanation ("unanswerable" if the paper does not say).\n\nAnswer:'
    ),
    "multifieldqa_en": _SINGLE_DOC_EN,
    "multifieldqa_zh": (
        "请阅读下面的文本，然后用中文简要回答问题。\n\n{context}\n\n问题：{input}\n只需给出答案，不要写其他内容。\n答案："
    ),
    "hotpotqa": _MULTI_DOC_EN,
    "2wikimqa": _MULTI_DOC_EN,
    "musique": _MULTI_DOC_EN,
    "dureader": "请根据下面的文档回答问题。\n\n文档：\n{context}\n\n问题：{input}\n答案：",
    "gov_report": (
        "Below is a report written by a government agency. Summarise it in about one page.\n\n"
        "Report:\n{context}\n\nWrite a summary of the report of about one page.\n\nSummary:"
    ),
    "qmsum": (
        "Below is a meeting transcript and then a query (a question or an instruction). Respond to the "
        "query in one or more sentences.\n\nTranscript:\n{context}\n\nQuery: {input}\n"
        "Respond to the query from the transcript, in one or more sentences.\nAnswer:"
    ),
    "multi_news": (
        "Below are several news articles. Write one summary of all of them, of about one page.\n\n"
        "Articles:\n{context}\n\nWrite a summary of about one page covering all the articles.\n\nSummary:"
    ),
    "vcsum": "下面是一份会议记录。请阅读后写一段总结，概括会议的内容。\n\n会议记录：\n{context}\n\n总结：",
    "trec": (
        "Classify the type of the last question. Examples of questions with their types come first.\n\n"
        "{context}\n{input}"
    ),
    "triviaqa": (
        "Answer the last question using its passage, with the answer only and no other words. "
        "Worked examples come first.\n\n{context}\n\n{input}"
    ),
    "samsum": "Summarise the last dialogue in a few short sentences. Examples come first.\n\n{context}\n\n{input}",
    "lsht": "请判断最后一条新闻属于哪个类别。下面先给出一些例子。\n\n{context}\n{input}",
    "passage_count": (
        "Below are paragraphs taken from Wikipedia; some of them appear more than once. Count how many "
        "distinct paragraphs there are once the duplicates are removed.\n\n{context}\n\n"
        "Reply with the number of distinct paragraphs only, for example 1, 2, 3.\n\n"
        "The number of distinct paragraphs is: "
    ),
    "passage_retrieval_en": (
        "Below are 30 numbered paragraphs from Wikipedia, then a summary of one of them. Find the "
        "paragraph that the summary describes.\n\n{context}\n\nSummary:\n{input}\n\n"
        'Reply with the label of that paragraph only, in the form "Paragraph 1", "Paragraph 2" and so on.\n\n'
        "The answer is: "
    ),
    "passage_retrieval_zh": (
        "下面是若干段落，以及其中某一段的摘要。请找出摘要对应的是哪一段。\n\n"
        "{context}\n\n摘要：\n{input}\n\n"
        '请只回答段落编号，格式为"段落1"、"段落2"等。\n\n答案是：'
    ),
    "lcc": "Continue the code below.\n{context}Next line of code:\n",
    "repobench-p": "Continue the code below.\n{context}{input}Next line of code:\n",
}

_V2_TEMPLATE = (
    "Read the document below, then answer the multiple-choice question that follows it.\n\n"
    "<document>\n{context}\n</document>\n\n"
    "Question: {question}\n(A) {choice_A}\n(B) {choice_B}\n(C) {choice_C}\n(D) {choice_D}\n\n"
    "Exactly one choice is correct. Reply in the form \"The correct answer is (X)\", "
    "where X is A, B, C or D."
)


def base_task(task: str) -> str:
    """Validate a task name; LongBench-E names (``hotpotqa_e``) map to their base task.

    >>> base_task("hotpotqa_e"), base_task("longbench_v2")
    ('hotpotqa', 'longbench_v2')
    """
    name = task[:-2] if task.endswith("_e") and task[:-2] in TASK_METRIC else task
    if name not in TASK_METRIC and name != V2_TASK:
        raise ConfigError(f"task: unknown LongBench task {task!r}; known: {', '.join(TASKS)}, {V2_TASK}")
    return name


# ---------------------------------------------------------------- loading
def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - only without the optional package
        raise ImportError(
            "LongBench/InfiniteBench loading needs the 'datasets' package: pip install 'kvtools[eval]'"
        ) from exc
    return datasets


def _local_hint(name: str) -> str:
    return (f"give local files as `source:` (a run file's suite key): a {name}.jsonl / .json / .parquet file, "
            f"a folder holding {name}.jsonl (or data/{name}.jsonl), or a .zip holding data/{name}.jsonl")


def _from_hub(source: str, name: str, load: Callable[[], Any], lib_offline: bool) -> Any:
    """Run ``load`` (a hub download) unless the hub is unavailable; any failure is a :class:`ConfigError`
    naming the dataset and how to give local files.

    ``lib_offline``: the loading library itself runs in offline mode (it then reads the HF cache and fails
    fast); otherwise an unreachable hub fails here at once, instead of after the library's retries.
    """
    from kvtools.models import hub_unreachable

    reason = hub_unreachable()
    if reason is not None and not lib_offline:
        raise ConfigError(
            f"source: cannot load '{source}' ({name}) from the hub: {reason}; to read a copy already in the HF "
            f"cache, run with HF_HUB_OFFLINE=1; or {_local_hint(name)}"
        )
    try:
        return load()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - hub, network and dataset errors of several libraries
        detail = (str(exc).strip().splitlines() or [""])[0]
        where = f"the HF cache ({reason})" if reason else "the hub"
        raise ConfigError(
            f"source: cannot load '{source}' ({name}) from {where}: {type(exc).__name__}: {detail}; "
            f"{_local_hint(name)}"
        ) from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _datasets_offline() -> bool:
    return bool(getattr(_datasets().config, "HF_HUB_OFFLINE", False))


_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _pick_file(folder: Path, name: str) -> Path:
    for sub in (folder, folder / "data"):
        for suffix in _BUILDERS:
            candidate = sub / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise ConfigError(f"source: no {name}.jsonl/.json/.parquet in {folder} (or its data/ folder)")


def _read_local(path: Path, load: Callable[[], Any]) -> Any:
    """Run ``load`` (``datasets`` reading a local file); a file it cannot parse is a :class:`ConfigError`."""
    try:
        return load()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets' several parse / schema errors
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"source: cannot read {path}: {type(exc).__name__}: {detail}") from None


def load_dataset_source(
    source: str | Path,
    name: str,
    *,
    split: str = "test",
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    features: Any = None,
    hub_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Load one task's examples as a ``datasets.Dataset``, from a local file/folder/zip or the hub.

    Args:
        source: a ``.jsonl``/``.json``/``.parquet`` file; a folder with ``<name>.<ext>``
            (directly or under ``data/``); a ``.zip`` holding ``data/<name>.jsonl``; or a
            hub dataset id. Local files are read through ``load_dataset("json"|"parquet")``.
        name: the task (file stem or hub config name).
        split: hub split; local files have a single split and ignore it.
        limit: keep only the first ``limit`` examples.
        cache_dir: the ``datasets`` cache folder (default: the HF cache).
        features: optional ``datasets.Features`` to cast to while loading.
        hub_kwargs: extra ``load_dataset`` arguments for a hub id (e.g. ``data_files``);
            by default the hub dataset is loaded as ``load_dataset(source, name, split=split)``.
    """
    ds = _datasets()
    kw: dict[str, Any] = {"cache_dir": str(cache_dir) if cache_dir is not None else None}
    if features is not None:
        kw["features"] = features
    path = Path(source).expanduser()
    if path.is_dir():
        path = _pick_file(path, name)
    if path.is_file() and path.suffix == ".zip":
        data = _read_local(path, lambda: ds.load_dataset(
            "json", data_files=f"zip://data/{name}.jsonl::{path.resolve()}", split="train", **kw))
    elif path.is_file():
        builder = _BUILDERS.get(path.suffix)
        if builder is None:
            raise ConfigError(f"source: {path} is not a .jsonl, .json, .parquet or .zip file")
        data = _read_local(path, lambda: ds.load_dataset(builder, data_files=str(path), split="train", **kw))
    elif path.suffix in _BUILDERS or path.suffix == ".zip" or str(source).startswith((".", "/", "~")):
        raise ConfigError(f"source: file not found: {source}")
    elif str(source) in _ZIP_REPOS and not hub_kwargs:
        from huggingface_hub import hf_hub_download

        def from_zip() -> Any:
            zip_path = hf_hub_download(str(source), "data.zip", repo_type="dataset")
            return ds.load_dataset("json", data_files=f"zip://data/{name}.jsonl::{zip_path}", split="train", **kw)

        data = _from_hub(str(source), name, from_zip, _hub_offline())
    elif hub_kwargs:
        hub_kw = {**kw, **hub_kwargs}
        data = _from_hub(str(source), name, lambda: ds.load_dataset(str(source), split=split, **hub_kw),
                         _datasets_offline())
    else:
        data = _from_hub(str(source), name, lambda: ds.load_dataset(str(source), name, split=split, **kw),
                         _datasets_offline())
    if limit is not None:
        data = data.select(range(min(max(limit, 0), len(data))))
    return data


def load_longbench(
    task: str,
    source: str | Path = HUB_V1,
    split: str = "test",
    limit: int | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> Any:
    """Load a LongBench v1 task (``hotpotqa``; ``hotpotqa_e`` for LongBench-E) as a ``datasets.Dataset``.

    ``source`` is ``"THUDM/LongBench"`` (the default), another hub id with one config per
    task, or a local file / folder / ``data.zip`` (see :func:`load_dataset_source`).
    Every example must have ``input, context, answers`` (``length`` and ``all_classes``
    are used when present).

    >>> data = load_longbench("hotpotqa", "LongBench/data", limit=10)  # doctest: +SKIP
    """
    base_task(task)
    if task == V2_TASK:
        return load_longbench_v2(source if source != HUB_V1 else HUB_V2, limit=limit, cache_dir=cache_dir)
    data = load_dataset_source(source, task, split=split, limit=limit, cache_dir=cache_dir)
    missing = {"input", "context", "answers"} - set(data.column_names)
    if missing:
        raise ConfigError(f"LongBench {task}: examples lack the field(s) {sorted(missing)} (source {source})")
    return data


def load_longbench_v2(
    source: str | Path = HUB_V2,
    split: str = "train",
    limit: int | None = None,
    *,
    difficulty: str | None = None,
    length: str | None = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """Load LongBench v2 (503 questions) from the hub or a local ``data.json`` / ``.jsonl`` / ``.parquet``.

    ``difficulty`` (``easy``/``hard``) and ``length`` (``short``/``medium``/``long``) filter
    the questions before ``limit`` applies.
    """
    path = Path(source).expanduser()
    if path.is_file() or path.is_dir() or path.suffix in _BUILDERS:
        data = load_dataset_source(source, "data", split=split, cache_dir=cache_dir)
    else:
        ds = _datasets()
        data = _from_hub(str(source), "data", lambda: ds.load_dataset(
            str(source), split=split, cache_dir=str(cache_dir) if cache_dir else None), _datasets_offline())
    need = {"question", "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context"}
    missing = need - set(data.column_names)
    if missing:
        raise ConfigError(f"LongBench v2: examples lack the field(s) {sorted(missing)} (source {source})")
    if difficulty is not None or length is not None:
        data = data.filter(
            lambda ex: (difficulty is None or ex.get("difficulty") == difficulty)
            and (length is None or ex.get("length") == length)
        )
    if limit is not None:
        data = data.select(range(min(max(limit, 0), len(data))))
    return data


# ---------------------------------------------------------------- tokenization helpers
def encode(tokenizer: Any, text: str, *, chat: bool) -> list[int]:
    """Token ids of a full prompt: a chat-templated text already holds its special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=not chat))


def _join(head: str, tail: str) -> str:
    # keep two ASCII words from fusing into one at the cut (decoders may drop the boundary space)
    if head and tail and head[-1].isascii() and head[-1].isalnum() and tail[0].isascii() and tail[0].isalnum():
        return f"{head} {tail}"
    return head + tail


def truncate_middle(text: str, tokenizer: Any, max_tokens: int) -> str:
    """Cut the middle out of ``text`` so that it holds at most about ``max_tokens`` tokens.

    The text is tokenized without special tokens; when it is longer than ``max_tokens``
    the first ``ceil(max_tokens / 2)`` and the last ``floor(max_tokens / 2)`` tokens are
    decoded and joined. Re-tokenizing the result can differ by a token or two at the cut;
    :func:`fit_prompt` corrects for that.

    >>> truncate_middle(long_text, tok, 1000)  # doctest: +SKIP
    """
    if max_tokens < 0:
        raise ConfigError(f"max_tokens: must be >= 0, got {max_tokens}")
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if len(ids) <= max_tokens:
        return text
    n_tail = max_tokens // 2
    n_head = max_tokens - n_tail
    head = tokenizer.decode(ids[:n_head], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - n_tail :], skip_special_tokens=True) if n_tail else ""
    return _join(head, tail)


def render(tokenizer: Any, user_text: str, *, chat: bool, answer_prefix: str = "") -> str:
    """The model input for one user message: chat-templated (generation prompt added) or plain.

    ``answer_prefix`` pre-fills the start of the answer: right after the generation prompt
    in chat mode, on a new line after the message otherwise.
    """
    if chat:
        messages = [{"role": "user", "content": user_text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{text}{answer_prefix}"
    return f"{user_text}\n{answer_prefix}" if answer_prefix else user_text


@dataclass(frozen=True)
class LongPrompt:
    """A prompt ready for generation.

    ``text`` is the whole model input (chat template applied when ``chat``) and
    ``input_ids`` its tokens (``tokenizer.encode(text, add_special_tokens=not chat)``);
    ``len(input_ids) <= max_input_tokens`` of the call that built it.
    """

    task: str
    text: str
    input_ids: list[int]
    max_new_tokens: int
    chat: bool
    truncated: bool  # the middle of the user message was cut
    n_original: int  # tokens the prompt would have had without truncation

    @property
    def n_tokens(self) -> int:
        """Number of prompt tokens."""
        return len(self.input_ids)


def fit_prompt(
    tokenizer: Any,
    make_user_text: Callable[[str], str],
    context: str,
    max_input_tokens: int,
    *,
    chat: bool,
    answer_prefix: str = "",
) -> tuple[str, list[int], bool, int]:
    """Render ``make_user_text(context)``, cutting the middle of ``context`` until the prompt fits.

    Everything but the context (instructions, question, options, chat template) is kept
    whole; the context keeps its head and tail halves (:func:`truncate_middle`), with the
    budget corrected until the whole prompt has at most ``max_input_tokens`` tokens.
    Returns ``(text, input_ids, truncated, n_original)``; raises
    :class:`~kvtools.errors.InputTooLongError` when the prompt does not fit even with an
    empty context.
    """
    if max_input_tokens < 1:
        raise ConfigError(f"max_input_tokens: must be >= 1, got {max_input_tokens}")
    text = render(tokenizer, make_user_text(context), chat=chat, answer_prefix=answer_prefix)
    ids = encode(tokenizer, text, chat=chat)
    n_original = len(ids)
    if n_original <= max_input_tokens:
        return text, ids, False, n_original
    empty = render(tokenizer, make_user_text(""), chat=chat, answer_prefix=answer_prefix)
    overhead = len(encode(tokenizer, empty, chat=chat))
    budget = max_input_tokens - overhead
    for _ in range(16):
        if budget < 0:
            break
        user_text = make_user_text(truncate_middle(context, tokenizer, budget))
        text = render(tokenizer, user_text, chat=chat, answer_prefix=answer_prefix)
        ids = encode(tokenizer, text, chat=chat)
        if len(ids) <= max_input_tokens:
            return text, ids, True, n_original
        budget -= len(ids) - max_input_tokens
    raise InputTooLongError(
        f"max_input_tokens {max_input_tokens}: the prompt without its context already takes {overhead} tokens "
        f"(instructions, question, template); use a larger budget"
    )


# ---------------------------------------------------------------- prompts
def format_prompt(task: str, example: Mapping[str, Any]) -> str:
    """The task's user message for ``example`` (no truncation, no chat template)."""
    name = base_task(task)
    if name == V2_TASK:
        return _V2_TEMPLATE.format(**{k: example[k] for k in _v2_fields()})
    return _TEMPLATES[name].format(context=example["context"], input=example.get("input") or "")


def _v2_fields() -> tuple[str, ...]:
    return ("context", "question", "choice_A", "choice_B", "choice_C", "choice_D")


def prepare_prompt(
    task: str,
    example: Mapping[str, Any],
    tokenizer: Any,
    max_input_tokens: int,
    *,
    chat: bool | None = None,
) -> LongPrompt:
    """Build the (middle-truncated) prompt of one example as a :class:`LongPrompt`.

    Args:
        task: a LongBench v1 task (``_e`` suffix allowed) or :data:`V2_TASK`.
        example: one dataset row.
        tokenizer: an HF tokenizer (``encode``/``decode``; ``apply_chat_template`` when chatting).
        max_input_tokens: the prompt's token budget (leave room for ``max_new_tokens``
            within the model's context yourself).
        chat: apply the chat template; ``None`` (default) does so when the tokenizer has
            one, except for the few-shot and code tasks (:data:`NO_CHAT_TASKS`), as upstream.
    """
    name = base_task(task)
    if chat is None:
        chat = has_chat_template(tokenizer) and name not in NO_CHAT_TASKS
    elif chat and not has_chat_template(tokenizer):
        raise ConfigError("chat=True: the tokenizer has no chat template")
    text, ids, truncated, n_original = fit_prompt(
        tokenizer,
        lambda context: format_prompt(name, {**example, "context": context}),
        str(example.get("context") or ""),
        max_input_tokens,
        chat=chat,
    )
    max_new = V2_MAX_NEW_TOKENS if name == V2_TASK else TASK_MAX_NEW_TOKENS[name]
    return LongPrompt(task, text, ids, max_new, chat, truncated, n_original)


def build_prompt(
    task: str,
    example: Mapping[str, Any],
    tokenizer: Any,
    max_input_tokens: int,
    *,
    chat: bool | None = None,
) -> tuple[str, int]:
    """``(prompt_text, max_new_tokens)`` of one example; see :func:`prepare_prompt` (which also gives ids).

    Tokenize the text with ``add_special_tokens=False`` when a chat template was applied
    (the default whenever the tokenizer has one, except :data:`NO_CHAT_TASKS`), with
    ``add_special_tokens=True`` otherwise; it then has at most ``max_input_tokens`` tokens.
    """
    p = prepare_prompt(task, example, tokenizer, max_input_tokens, chat=chat)
    return p.text, p.max_new_tokens


# ---------------------------------------------------------------- scoring
_CHOICE_PATTERNS = (
    re.compile(r"(?i:the correct answer is)\s*\(([A-D])\)"),
    re.compile(r"(?i:the correct answer is):?\s*([A-D])\b"),
    re.compile(r"\(([A-D])\)\s*[.!]?\s*$"),
    re.compile(r"(?:^|[^A-Za-z0-9])([A-D])\s*[.!]?\s*$"),
    re.compile(r"^\s*\(([A-D])\)"),
    re.compile(r"^\s*([A-D])(?:[.):]|\s*$)"),
)


def extract_choice(response: str) -> str | None:
    """The letter chosen in a LongBench v2 reply, or ``None``.

    Tried in order: ``The correct answer is (X)``, ``The correct answer is X``, ``(X)`` or
    ``X`` at the very end, ``(X)`` / ``X.`` / ``X)`` at the very start. Markdown ``*`` is ignored.

    >>> extract_choice("**The correct answer is (B)**"), extract_choice("... so I pick (C)."), extract_choice("D")
    ('B', 'C', 'D')
    """
    text = response.replace("*", "").strip()
    for pattern in _CHOICE_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(1).upper()
    return None


def _answers(example: Mapping[str, Any]) -> list[str]:
    answers = example.get("answers")
    if answers is None:
        answers = example.get("answer")
    if answers is None:
        return []
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def score_example(task: str, prediction: str, example: Mapping[str, Any]) -> float:
    """Score in [0, 1] of one prediction: the task's metric, max over the reference answers.

    Few-shot tasks (trec, triviaqa, samsum, lsht) are scored on the first non-empty line
    of the prediction, as upstream. For :data:`V2_TASK`: 1.0 if :func:`extract_choice`
    equals ``example["answer"]``, else 0.0.
    """
    name = base_task(task)
    if name == V2_TASK:
        return float(extract_choice(prediction) == str(example["answer"]).strip().upper())
    if name in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return best_score(TASK_METRIC[name], prediction, _answers(example), example.get("all_classes"))


def length_bucket(length: int) -> str:
    """LongBench-E length bucket of an example's ``length`` (words/characters): ``0-4k``, ``4-8k``, ``8k+``."""
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def result_record(task: str, prediction: str, example: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A JSON-ready result row for :func:`summarize`: task, score, prediction and the grouping fields."""
    record: dict[str, Any] = {
        "task": task,
        "score": score_example(task, prediction, example),
        "prediction": prediction,
    }
    for key in ("_id", "length", "difficulty", "domain", "answer", "answers"):
        if key in example and example[key] is not None:
            record[key] = example[key]
    record.update(extra)
    return record


def _pct(values: Sequence[float]) -> float:
    return round(100.0 * sum(values) / len(values), 2) if values else 0.0


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-example records (``task``, ``score`` in [0, 1], optional ``length`` / ``difficulty``).

    Returns (scores x100, 2 decimals)::

        {"tasks": {task: {"score", "n", "by_length": {"0-4k", "4-8k", "8k+"}}},   # v1 tasks
         "categories": {category: mean task score}, "average": mean task score,
         "v2": {"accuracy", "n", "by_difficulty": {...}, "by_length": {...}}}       # if any v2 record

    ``by_length`` (LongBench-E buckets of the integer ``length``) is filled only from
    records that have one. Sections with no records are omitted.
    """
    by_task: dict[str, list[float]] = defaultdict(list)
    by_task_len: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    v2: list[float] = []
    v2_diff: dict[str, list[float]] = defaultdict(list)
    v2_len: dict[str, list[float]] = defaultdict(list)
    for rec in records:
        name = base_task(str(rec["task"]))
        score = float(rec["score"])
        if name == V2_TASK:
            v2.append(score)
            if rec.get("difficulty") is not None:
                v2_diff[str(rec["difficulty"])].append(score)
            if rec.get("length") is not None:
                v2_len[str(rec["length"])].append(score)
            continue
        task = str(rec["task"])
        by_task[task].append(score)
        length = rec.get("length")
        if isinstance(length, int) and not isinstance(length, bool):
            by_task_len[task][length_bucket(length)].append(score)

    out: dict[str, Any] = {}
    if by_task:
        tasks = {}
        for task in sorted(by_task, key=lambda t: (TASKS.index(base_task(t)), t)):
            entry: dict[str, Any] = {"score": _pct(by_task[task]), "n": len(by_task[task])}
            if task in by_task_len:
                buckets = by_task_len[task]
                entry["by_length"] = {b: _pct(buckets[b]) for b in ("0-4k", "4-8k", "8k+") if buckets[b]}
            tasks[task] = entry
        cats: dict[str, list[float]] = defaultdict(list)
        for task, entry in tasks.items():
            cats[TASK_CATEGORY[base_task(task)]].append(entry["score"])
        out["tasks"] = tasks
        out["categories"] = {c: round(sum(v) / len(v), 2) for c, v in cats.items()}
        out["average"] = round(sum(e["score"] for e in tasks.values()) / len(tasks), 2)
    if v2:
        order = {"easy": 0, "hard": 1, "short": 0, "medium": 1, "long": 2}
        out["v2"] = {
            "accuracy": _pct(v2),
            "n": len(v2),
            "by_difficulty": {k: _pct(v2_diff[k]) for k in sorted(v2_diff, key=lambda k: (order.get(k, 9), k))},
            "by_length": {k: _pct(v2_len[k]) for k in sorted(v2_len, key=lambda k: (order.get(k, 9), k))},
        }
    return out
