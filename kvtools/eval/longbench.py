"""LongBench v1 and v2: task tables, loading, prompts and scoring.

LongBench v1 has 21 tasks whose examples share the fields ``input, context, answers,
length, all_classes``. Each task has a metric (:data:`TASK_METRIC`, implemented in
:mod:`kvtools.eval.metrics`), a prompt template written for kvtools (same information
and answer format as the upstream prompts, our own wording), and a generation budget
(:data:`TASK_MAX_NEW_TOKENS`, the upstream values). Prompts longer than the token budget
lose the middle of their context (:func:`kvtools.eval.prompting.fit_context`): its head
and tail halves are kept, as upstream recommends. Unlike upstream, which cuts the middle
of the whole formatted prompt, the instructions, question and options are never cut (for
long contexts the two agree).

LongBench v2 has 503 four-choice questions (``_id, domain, sub_domain, difficulty,
length, question, choice_A..D, answer, context``); it is used through the pseudo task
name :data:`V2_TASK` with the same :func:`prepare_prompt` / :func:`score_example` API.
The model is asked to reply ``The correct answer is (X)``; :func:`extract_choice` also
accepts a bare ``(X)`` or ``X`` at the end of the reply.

Typical use::

    from kvtools.eval.longbench import load_longbench, prepare_prompt, score_example
    data = load_longbench("hotpotqa", limit=20)
    for ex in data:
        p = prepare_prompt("hotpotqa", ex, tokenizer, max_input_tokens=7500)
        out = my_generate(p.input_ids, p.max_new_tokens)
        print(score_example("hotpotqa", out, ex))

Loading goes through :func:`kvtools.eval.datasets.load_dataset_source` (hub id or local
``.jsonl`` / ``.json`` / ``.parquet`` file, a folder holding ``<task>.jsonl``, e.g. the
unzipped upstream ``data.zip``, or the ``data.zip`` itself). The upstream hub repo
``THUDM/LongBench`` ships a loading script that ``datasets>=4`` refuses to run, so for
that id kvtools downloads the repo's ``data.zip`` and reads ``data/<task>.jsonl`` from it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvtools.errors import ConfigError

from .datasets import load_dataset_source
from .metrics import best_score
from .prompting import LongPrompt, fit_context, has_chat_template

__all__ = [
    "FIRST_LINE_TASKS",
    "HUB_V1",
    "HUB_V2",
    "NO_CHAT_TASKS",
    "TASKS",
    "TASK_CATEGORY",
    "TASK_LANGUAGE",
    "TASK_MAX_NEW_TOKENS",
    "TASK_METRIC",
    "V2_MAX_NEW_TOKENS",
    "V2_TASK",
    "base_task",
    "extract_choice",
    "format_prompt",
    "load_longbench",
    "load_longbench_v2",
    "prepare_prompt",
    "score_example",
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
    data = load_dataset_source(source, task, split=split, limit=limit, cache_dir=cache_dir,
                               hub_zip=str(source) in _ZIP_REPOS)
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
    data = load_dataset_source(source, "data", split=split, cache_dir=cache_dir, hub_kwargs={})
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


# ---------------------------------------------------------------- prompts
def format_prompt(task: str, example: Mapping[str, Any]) -> str:
    """The task's user message for ``example`` (no truncation, no chat template)."""
    name = base_task(task)
    if name == V2_TASK:
        return _V2_TEMPLATE.format(**{k: example[k] for k in _v2_fields()})
    return _TEMPLATES[name].format(context=example["context"], input=example.get("input") or "")


def _v2_fields() -> tuple[str, ...]:
    return ("context", "question", "choice_A", "choice_B", "choice_C", "choice_D")


def prepare_prompt(task: str, example: Mapping[str, Any], tokenizer: Any, max_input_tokens: int, *,
                   chat: bool | None = None) -> LongPrompt:
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
    max_new = V2_MAX_NEW_TOKENS if name == V2_TASK else TASK_MAX_NEW_TOKENS[name]
    return fit_context(tokenizer, task, example, format_prompt, max_input_tokens, max_new, chat=chat)


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
