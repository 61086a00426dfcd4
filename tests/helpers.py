"""Plain step-by-step drivers used by several test files."""

from __future__ import annotations

import importlib
import json

import pytest
import torch


@torch.no_grad()
def prefill_then_decode(model, ids: torch.Tensor, prompt_len: int, cache=None, attention_mask=None):
    """Teacher-forced run: prefill ``ids[:, :prompt_len]``, then feed the rest one token at a time.

    Returns the logits of the last prompt token and of every decode step, [B, 1 + steps, V].
    ``attention_mask`` (left padding) covers all of ``ids``; positions follow HF's rule
    (cumsum of the mask) so a padded row sees the positions it would see alone.
    """
    b, n = ids.shape
    am = attention_mask if attention_mask is not None else torch.ones(b, n, dtype=torch.long)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    kw = {} if cache is None else {"past_key_values": cache}
    out = model(
        input_ids=ids[:, :prompt_len], attention_mask=am[:, :prompt_len],
        position_ids=pos[:, :prompt_len], use_cache=True, **kw,
    )
    cache = out.past_key_values
    logits = [out.logits[:, -1]]
    for t in range(prompt_len, n):
        out = model(
            input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], position_ids=pos[:, t : t + 1],
            past_key_values=cache, use_cache=True,
        )
        cache = out.past_key_values
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), cache


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def word_tokenizer(words, chat: bool = True):
    """A real HF tokenizer built offline: one token per word of ``words`` (others -> [UNK])."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>", *sorted(words)])}
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def byte_tokenizer(chat: bool = True):
    """A real HF tokenizer built offline: one token per UTF-8 byte (byte-level BPE without merges),
    BOS added by ``add_special_tokens``; 259 ids."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    core = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def assert_matches_unpatched(model, config, prompt_len: int, steps: int, batch: int = 2, seed: int = 0):
    """Patched with ``config``, a teacher-forced prefill + ``steps`` decode steps equals the unpatched model
    (fp32, 1e-4); returns the patched run's cache."""
    import kvtools

    from .conftest import random_ids

    ids = random_ids(batch, prompt_len + steps, seed=seed)
    ref, _ = prefill_then_decode(model, ids, prompt_len)
    with kvtools.patch(model, config) as p:
        got, cache = prefill_then_decode(model, ids, prompt_len, cache=p.make_cache())
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    return cache


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


#: loader tests need the optional ``datasets`` package (kvtools[eval]); metrics and prompts do not
needs_datasets = pytest.mark.skipif(
    not _importable("datasets"), reason="needs the 'datasets' package: pip install 'kvtools[eval]'"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def compressed(model, ids: torch.Tensor, cache_cfg: dict, attention_mask=None, quant: dict | None = None):
    """The cache a prompt leaves, fed in one call to ``model`` patched with ``{"cache": cache_cfg}`` (and
    ``quant``)."""
    import kvtools

    with kvtools.patch(model, {"cache": cache_cfg, **({"quant": quant} if quant else {})}) as p:
        cache = p.make_cache()
        model(input_ids=ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
    return cache

