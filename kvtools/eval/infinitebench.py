"""InfiniteBench: locally generated retrieval tasks, and the real-data tasks through ``datasets``.

Synthetic tasks (:data:`SYNTHETIC_TASKS`), generated here at any length for any tokenizer
(:func:`make_synthetic`, :func:`generate_synthetic`), in the InfiniteBench formats:

- ``passkey``: one repeated line of noise text with ``The pass key is NNNNN ...`` inserted
  at a chosen depth; asked for the 5-digit pass key.
- ``number_string``: the same with a 10-digit sequence of digits.
- ``kv_retrieval``: a JSON object of random UUID keys -> UUID values; asked for the value
  of one key (placed at the chosen depth of the object).

The noise line and the instructions are kvtools' own wording (so numbers are comparable
in kind, not byte-for-byte, with the published InfiniteBench files). A sample is fitted
to a target total length: prompt tokens + ``max_new_tokens`` <= ``length``, counted with
the tokenizer and the chat template (when the tokenizer has one), like the NIAH prompts.

Real-data tasks (:data:`REAL_TASKS`) load from the hub (``xinrongzhang2022/InfiniteBench``,
one ``<task>.jsonl`` per task, fields ``id, context, input, answer, options``) or a local
file (:func:`load_infinitebench`); over-long contexts lose their middle as in LongBench.

Scoring (:func:`score_example`, each in [0, 1]; summaries report x100):

==========================  ==============================================================
passkey, number_string      the first integer in the output equals the answer (exact)
kv_retrieval                the answer UUID is one of the output's words (contains)
longbook_qa_eng             QA token F1, max over answers (LongBench normalisation)
longbook_qa_chn             character-level QA F1, max over answers
longbook_sum_eng            ROUGE-L F1 (our LCS-based one; upstream reports ROUGE-Lsum)
longbook_choice_eng         chosen letter (or the only option text named) is the right one
code_debug                  same as longbook_choice_eng, over the four function options
longdialogue_qa_eng         the answer name is one of the output's words (case-insensitive)
math_find                   the first number in the output equals the answer (numerically)
math_calc                   share of the expected values the output gets right before its
                            first mistake (upstream rule)
code_run                    the last integer in the output equals the answer
==========================  ==============================================================
"""

from __future__ import annotations

import json
import random
import re
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtools.errors import ConfigError

from .datasets import load_dataset_source
from .metrics import best_score
from .prompting import (
    LongPrompt,
    Rendered,
    after_context,
    check_length,
    fit_context,
    fit_units,
    has_chat_template,
    question_split,
    render_prompt,
)

__all__ = [
    "HUB_ID",
    "REAL_TASKS",
    "SYNTHETIC_TASKS",
    "SyntheticSample",
    "TASKS",
    "TASK_MAX_NEW_TOKENS",
    "choice_letter",
    "format_prompt",
    "generate_synthetic",
    "load_infinitebench",
    "make_synthetic",
    "prepare_prompt",
    "score_example",
]

HUB_ID = "xinrongzhang2022/InfiniteBench"
SYNTHETIC_TASKS: tuple[str, ...] = ("passkey", "number_string", "kv_retrieval")
REAL_TASKS: tuple[str, ...] = (
    "longbook_sum_eng", "longbook_choice_eng", "longbook_qa_eng", "longbook_qa_chn",
    "longdialogue_qa_eng", "math_find", "math_calc", "code_run", "code_debug",
)  # fmt: skip
TASKS: tuple[str, ...] = SYNTHETIC_TASKS + REAL_TASKS

#: generation budget per task (upstream values, except roomier math_find / code_run /
#: code_debug answers and a 2048 cap on math_calc, upstream 30000)
TASK_MAX_NEW_TOKENS: dict[str, int] = {
    "passkey": 8, "number_string": 16, "kv_retrieval": 50,
    "longbook_sum_eng": 1200, "longbook_choice_eng": 40, "longbook_qa_eng": 40, "longbook_qa_chn": 40,
    "longdialogue_qa_eng": 40, "math_find": 8, "math_calc": 2048, "code_run": 8, "code_debug": 16,
}  # fmt: skip

# ---------------------------------------------------------------- prompts (kvtools wording)
_HIDDEN_INFO = (
    "Hidden somewhere in the long text below is one important piece of information; the rest is "
    "filler. Find it and keep it in mind, because you will be asked about it.\n\n{context}\n\n{input}"
)
_OPTIONS = "A. {A}\nB. {B}\nC. {C}\nD. {D}"
_TEMPLATES: dict[str, str] = {
    "passkey": _HIDDEN_INFO,
    "number_string": _HIDDEN_INFO,
    "kv_retrieval": "Below is a JSON object. Look up the value stored under the given key.\n\n{context}\n\n{input}",
    "longbook_sum_eng": "Write a summary of the book below.\n\n{context}\n\nSummary:",
    "longbook_qa_eng": "Read the book below, then answer the question. Keep the answer very short.\n\n"
    "{context}\n\nQuestion: {input}\nAnswer:",
    "longbook_qa_chn": "请阅读下面的书，然后回答问题，答案尽量简短。\n\n"
    "{context}\n\n问题：{input}\n答案：",
    "longbook_choice_eng": "Read the book below, then answer the question. Exactly one option is correct; "
    "reply with its letter (A, B, C or D) only.\n\n{context}\n\nQuestion: {input}\n" + _OPTIONS + "\n\nAnswer:",
    "longdialogue_qa_eng": "In the script below, one occurrence of a character's name has been replaced by "
    '"$$MASK$$". Work out which character it is.\n\n{context}\n\n{input}\n'
    "Reply with that character's name only, as the script writes it before the colon.\nName:",
    "math_find": "Answer the question about the list of numbers below.\n\n{context}\n\n{input}\n"
    "Reply with the number only.\nAnswer:",
    "math_calc": "Work through the long arithmetic expression below from left to right and list the value "
    "after every operation.\n\nExample:\nExpression: 2 + 5 - 3\nValues: [2, 7, 4]\n\n"
    "Expression: {context}\nValues:",
    "code_run": "Below are some Python functions.\n\n{context}\n\n{input}\n"
    "Reply with the exact return value, a single number.\nThe return value is:",
    "code_debug": "Exactly one function in the code below contains a deliberate error that makes it crash. "
    "Which one is it?\n\n{context}\n\n{input}\n" + _OPTIONS + "\n\n"
    "Reply with the letter of that function (A, B, C or D) only.\nAnswer:",
}
#: answers pre-filled after the prompt (the reply starts with the value)
_ANSWER_PREFIX = {"passkey": "The pass key is", "number_string": "The sequence of digits is"}

# synthetic formats
_NOISE = "The lake is calm. The road is long. The stones are grey. Here it comes again. Round and round once more.\n"
_NEEDLES = {
    "passkey": "The pass key is {key}. Keep it in mind: {key} is the pass key.\n",
    "number_string": "The sequence of digits is {key}. Keep it in mind: {key} is the sequence of digits.\n",
}
_QUESTIONS = {"passkey": "What is the pass key?", "number_string": "What is the sequence of digits?"}
_KV_QUESTION = 'Key: "{key}"\nThe value stored under this key is:'


def _check_task(task: str) -> str:
    if task not in TASK_MAX_NEW_TOKENS:
        raise ConfigError(f"task: unknown InfiniteBench task {task!r}; known: {', '.join(TASKS)}")
    return task


# ---------------------------------------------------------------- loading
def _features() -> Any:
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("int64"),
            "context": Value("string"),
            "input": Value("string"),
            "answer": Sequence(Value("string")),
            "options": Sequence(Value("string")),
        }
    )


def load_infinitebench(
    task: str,
    source: str | Path = HUB_ID,
    limit: int | None = None,
    *,
    cache_dir: str | Path | None = None,
) -> Any:
    """Load one InfiniteBench task as a ``datasets.Dataset``.

    ``source`` is the hub id (default; only ``<task>.jsonl`` is downloaded, cast to the
    common schema) or a local ``.jsonl``/``.json``/``.parquet`` file or a folder holding
    ``<task>.jsonl``. Examples need ``context``, ``input`` and ``answer``.
    """
    _check_task(task)
    hub_kwargs = None
    if not Path(source).exists() and str(source) == HUB_ID:
        hub_kwargs = {"data_files": {task: f"{task}.jsonl"}, "features": _features()}
    data = load_dataset_source(source, task, split=task, limit=limit, cache_dir=cache_dir, hub_kwargs=hub_kwargs)
    missing = {"context", "input", "answer"} - set(data.column_names)
    if missing:
        raise ConfigError(f"InfiniteBench {task}: examples lack the field(s) {sorted(missing)} (source {source})")
    return data


# ---------------------------------------------------------------- prompts
def format_prompt(task: str, example: Mapping[str, Any]) -> str:
    """The task's user message for ``example`` (no truncation, no chat template)."""
    _check_task(task)
    options = list(example.get("options") or [])
    fields = {"context": example.get("context") or "", "input": example.get("input") or ""}
    fields.update({letter: options[i] if i < len(options) else "" for i, letter in enumerate("ABCD")})
    return _TEMPLATES[task].format(**fields)


def prepare_prompt(task: str, example: Mapping[str, Any], tokenizer: Any, max_input_tokens: int, *,
                   chat: bool | None = None) -> LongPrompt:
    """The prompt of one example, its context middle-truncated to fit ``max_input_tokens``.

    ``chat=None`` applies the chat template when the tokenizer has one. Passkey and
    number_string prompts end with a pre-filled answer start (``The pass key is``).
    """
    _check_task(task)
    return fit_context(
        tokenizer, task, example, format_prompt, max_input_tokens, TASK_MAX_NEW_TOKENS[task],
        chat=has_chat_template(tokenizer) if chat is None else chat, answer_prefix=_ANSWER_PREFIX.get(task, ""),
    )


# ---------------------------------------------------------------- synthetic tasks
@dataclass(frozen=True)
class SyntheticSample:
    """One generated sample: the InfiniteBench-style ``example`` and its fitted ``prompt``.

    ``prompt.n_tokens + prompt.max_new_tokens <= length``.
    """

    task: str
    example: dict[str, Any]  # id, context, input, answer (list), options (empty)
    prompt: LongPrompt
    length: int  # target total length in tokens (prompt + new tokens)
    depth: float  # requested depth, % of the filler units (lines or JSON pairs)
    depth_actual: float  # where the needle landed, % of the filler units
    n_units: int  # filler units used (noise lines, or key/value pairs)

    @property
    def answer(self) -> str:
        """The expected answer."""
        return str(self.example["answer"][0])


class _Synth:
    """Builds the example of a synthetic task for a given number of filler units."""

    def __init__(self, task: str, rng: random.Random) -> None:
        self.task = task
        self.rng = rng
        if task == "passkey":
            self.key = str(rng.randint(10_000, 99_999))
        elif task == "number_string":
            self.key = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(9))
        else:
            self.pairs: list[tuple[str, str]] = []

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def example(self, n: int, depth: float) -> tuple[dict[str, Any], int]:
        """The example with ``n`` filler units and the needle at ``depth`` %, and the needle index."""
        if self.task == "kv_retrieval":
            n = max(n, 1)
            while len(self.pairs) < n:
                self.pairs.append((self._uuid(), self._uuid()))
            at = round(depth / 100 * (n - 1))
            pairs = self.pairs[:n]
            key, value = pairs[at]
            context = "JSON data:\n" + json.dumps(dict(pairs), ensure_ascii=False)
            question = _KV_QUESTION.format(key=key)
            answer = value
        else:
            at = round(depth / 100 * n)
            context = _NOISE * at + _NEEDLES[self.task].format(key=self.key) + _NOISE * (n - at)
            question = _QUESTIONS[self.task]
            answer = self.key
        return {"id": 0, "context": context, "input": question, "answer": [answer], "options": []}, at


def make_synthetic(
    task: str,
    tokenizer: Any,
    length: int,
    *,
    seed: int | str = 0,
    depth: float | None = None,
    max_new_tokens: int | None = None,
    chat: bool | None = None,
    max_context: int | None = None,
) -> SyntheticSample:
    """Generate one synthetic sample whose prompt tokens + ``max_new_tokens`` fit ``length``.

    Args:
        task: ``passkey``, ``number_string`` or ``kv_retrieval``.
        tokenizer: an HF tokenizer (chat template used when present, unless ``chat=False``).
        length: target total length in tokens (prompt + generated tokens).
        seed: picks the key/value(s) (and the depth when ``depth`` is None); deterministic.
        depth: where the needle goes, in % of the filler (0 = first, 100 = last); None: random.
        max_new_tokens: room left for the answer (default :data:`TASK_MAX_NEW_TOKENS`).
        chat: apply the chat template (default: when the tokenizer has one).
        max_context: the model's context; a ``length`` beyond it raises ``InputTooLongError``.

    The filler size is the largest that fits, searched on the real token count of the
    rendered prompt (:func:`~kvtools.eval.prompting.fit_units`).

    >>> s = make_synthetic("passkey", tok, 4096, seed=1, depth=50)  # doctest: +SKIP
    >>> s.prompt.n_tokens + s.prompt.max_new_tokens <= 4096 and s.answer in s.prompt.text  # doctest: +SKIP
    True
    """
    if task not in SYNTHETIC_TASKS:
        raise ConfigError(f"task: {task!r} is not synthetic; synthetic tasks: {', '.join(SYNTHETIC_TASKS)}")
    new_tokens = TASK_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    check_length(length, new_tokens, max_context)
    rng = random.Random(f"kvtools-infinitebench:{task}:{seed}")
    if depth is None:
        depth = round(rng.uniform(0, 100), 2)
    if not 0 <= depth <= 100:
        raise ConfigError(f"depth: must be a percent in [0, 100], got {depth!r}")
    if chat is None:
        chat = has_chat_template(tokenizer)
    synth = _Synth(task, rng)

    def render(n: int) -> Rendered:
        example, at = synth.example(n, depth)
        return (*render_prompt(tokenizer, format_prompt(task, example), _ANSWER_PREFIX.get(task, ""), chat=chat),
                example, at)

    lo_n = 1 if task == "kv_retrieval" else 0
    n_units, (text, ids, example, at) = fit_units(
        render, length, new_tokens, what=task, smallest=f"the smallest {task} prompt takes", n_min=lo_n
    )
    example = {**example, "id": seed if isinstance(seed, int) else zlib.crc32(str(seed).encode())}
    denominator = (n_units - 1) if task == "kv_retrieval" else n_units
    depth_actual = 100.0 * at / denominator if denominator > 0 else 0.0
    question = after_context(lambda ctx: format_prompt(task, {**example, "context": ctx}), example["context"])
    prompt = LongPrompt(task, text, ids, new_tokens, chat, False, len(ids),
                        question_split(tokenizer, text, ids, question, chat=chat))
    return SyntheticSample(task, example, prompt, length, float(depth), depth_actual, n_units)


def generate_synthetic(
    task: str,
    tokenizer: Any,
    length: int,
    n: int,
    *,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    **kwargs: Any,
) -> list[SyntheticSample]:
    """``n`` samples of one task at one length, needles spread evenly over depths 0..100 %.

    Sample ``i`` uses seed ``f"{seed}:{i}"`` (so keys differ) and ``depths[i]`` when given.
    Extra keyword arguments go to :func:`make_synthetic`.
    """
    if n < 1:
        raise ConfigError(f"n: must be >= 1, got {n}")
    if depths is None:
        depths = [50.0] if n == 1 else [100.0 * i / (n - 1) for i in range(n)]
    if len(depths) != n:
        raise ConfigError(f"depths: need {n} values, got {len(depths)}")
    return [
        make_synthetic(task, tokenizer, length, seed=f"{seed}:{i}", depth=d, **kwargs) for i, d in enumerate(depths)
    ]


# ---------------------------------------------------------------- scoring
def _answers(example: Mapping[str, Any]) -> list[str]:
    answer = example.get("answer")
    if answer is None:
        return []
    if isinstance(answer, (str, int, float)):
        return [str(answer)]
    return [str(a) for a in answer]


def _words(text: str) -> list[str]:
    for ch in "\n:\"'.,?!{}":
        text = text.replace(ch, " ")
    return text.split()


def _first_int(text: str) -> str:
    found = re.search(r"\d+", text)
    return found.group(0) if found else ""


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def choice_letter(example: Mapping[str, Any]) -> str | None:
    """The correct letter of a four-option example: the answer itself, or its index among ``options``."""
    options = [str(o).strip() for o in (example.get("options") or [])]
    for answer in _answers(example):
        answer = answer.strip()
        if len(answer) == 1 and answer in "ABCD":
            return answer
        if answer in options and options.index(answer) < 4:
            return "ABCD"[options.index(answer)]
    return None


def _predicted_letter(prediction: str) -> str | None:
    text = prediction.replace("*", "").strip()
    found = re.search(r"(?i:answer is|answer:|option is|option)\s*:?\s*\(?([A-D])(?![A-Za-z])", text)
    if found:
        return found.group(1)
    found = re.match(r"\(?([A-D])(?![A-Za-z])", text)
    if found:
        return found.group(1)
    found = re.search(r"(?<![A-Za-z])([A-D])(?![A-Za-z])", text)
    return found.group(1) if found else None


def _choice_score(prediction: str, example: Mapping[str, Any]) -> float:
    correct = choice_letter(example)
    if correct is None:
        return 0.0
    letter = _predicted_letter(prediction)
    if letter is not None:
        return float(letter == correct)
    options = [str(o).strip() for o in (example.get("options") or [])][:4]
    named = [i for i, o in enumerate(options) if o and o in prediction]
    return float(len(named) == 1 and "ABCD"[named[0]] == correct)


def _math_find(prediction: str, example: Mapping[str, Any]) -> float:
    found = _NUMBER.search(prediction)
    if not found:
        return 0.0
    try:
        value = float(found.group(0))
        return float(any(value == float(a) for a in _answers(example)))
    except ValueError:
        return 0.0


def _math_calc(prediction: str, example: Mapping[str, Any]) -> float:
    expected = [int(float(x)) for x in _NUMBER.findall(" ".join(_answers(example)))]
    if not expected:
        return 0.0
    got = [int(float(x)) for x in _NUMBER.findall(prediction)]
    right = 0
    for want, have in zip(expected, got):
        if want != have:
            break
        right += 1
    return right / len(expected)


def _code_run(prediction: str, example: Mapping[str, Any]) -> float:
    numbers = re.findall(r"-?\d+", prediction)
    if not numbers:
        return 0.0
    return float(any(numbers[-1] == a.strip() for a in _answers(example)))


_SCORERS: dict[str, Callable[[str, Mapping[str, Any]], float]] = {
    "passkey": lambda p, ex: float(_first_int(p) in _answers(ex)),
    "number_string": lambda p, ex: float(_first_int(p) in _answers(ex)),
    "kv_retrieval": lambda p, ex: float(any(a in _words(p) for a in _answers(ex))),
    "longbook_qa_eng": lambda p, ex: best_score("qa_f1", p, _answers(ex)),
    "longbook_qa_chn": lambda p, ex: best_score("qa_f1_zh_char", p, _answers(ex)),
    "longbook_sum_eng": lambda p, ex: best_score("rouge_lsum", p, _answers(ex)),
    "longbook_choice_eng": _choice_score,
    "code_debug": _choice_score,
    "longdialogue_qa_eng": lambda p, ex: float(
        any(a.upper() in [w.upper() for w in _words(p)] for a in _answers(ex))
    ),
    "math_find": _math_find,
    "math_calc": _math_calc,
    "code_run": _code_run,
}


def score_example(task: str, prediction: str, example: Mapping[str, Any]) -> float:
    """Score in [0, 1] of one prediction (see the module docstring for each task's rule)."""
    return float(_SCORERS[_check_task(task)](prediction, example))
