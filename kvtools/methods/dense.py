"""`dense` prefill and decode: the cache policy's own exact attention (SDPA over the slot table)."""

from typing import Literal

from pydantic import Field

from ..params import StageParams
from .base import DecodeMethod, PrefillMethod


class DensePrefillParams(StageParams):
    """Dense causal attention over the prompt (SDPA)."""

    method: Literal["dense"] = "dense"
    chunk: int | None = Field(
        default=None, ge=2, description="split long prompts into chunks of this many tokens (a last chunk of one "
                                        "token joins the one before: every chunk is a multi-token call)"
    )


class DenseDecodeParams(StageParams):
    """Each new token attends to every kept slot."""

    method: Literal["dense"] = "dense"


class DensePrefillMethod(PrefillMethod):
    """Exact causal attention over the prompt; ``chunk`` is applied by the patched model wrapper."""

    name = "dense"
    params = DensePrefillParams
    builtin = True


class DenseDecodeMethod(DecodeMethod):
    """Exact attention of each new token over every kept slot."""

    name = "dense"
    params = DenseDecodeParams
    builtin = True
