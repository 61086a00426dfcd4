"""Shared fixtures: tiny random-weight models of each supported family, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 128


def tiny_config(family: str, head_dim: int = 16):
    common = dict(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_attention_heads=6,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )
    if family == "llama":
        return LlamaConfig(num_hidden_layers=2, **common)
    if family == "qwen3":
        return Qwen3Config(num_hidden_layers=2, **common)
    if family == "mistral":  # a window shorter than the test prompts, on every layer
        return MistralConfig(num_hidden_layers=2, sliding_window=16, **common)
    if family == "qwen2":  # use_sliding_window: layers from max_window_layers on slide
        return Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=16, max_window_layers=1,
                           **common)
    if family == "gemma3":
        common["num_key_value_heads"] = 1
        return Gemma3TextConfig(
            num_hidden_layers=3, sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common,
        )
    raise ValueError(family)


FAMILIES = ["llama", "qwen3", "gemma3"]
#: every family the README lists (the contract suite runs on all of them)
ALL_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, head_dim: int = 16):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, head_dim), dtype=torch.float32).eval()
    return model.to(dtype)


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.param, tiny_model(request.param)


@pytest.fixture
def llama():
    return tiny_model("llama")


def random_ids(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, n), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    import kvtools

    try:
        return kvtools.load_model()
    except kvtools.ModelNotAvailableError as exc:  # pragma: no cover - the README setup installs it
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer with a chat template (no files, no hub)."""
    from .helpers import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    """The same tokenizer without a chat template."""
    from .helpers import byte_tokenizer

    return byte_tokenizer(chat=False)
