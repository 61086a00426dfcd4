"""`dense` prefill and decode: the cache policy's own exact attention (SDPA over the slot table)."""

from typing import Literal

from ..params import PrefillParams, StageParams
from .base import DecodeMethod, PrefillMethod


class DensePrefillParams(PrefillParams):
    """Dense causal attention over the prompt (SDPA)."""

    method: Literal["dense"] = "dense"


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
