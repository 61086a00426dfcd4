"""``patch()`` / ``unpatch()``: per-instance, reversible replacement of attention forwards.

Two things are replaced on the *instance* (never the class, never at import):

* each attention module's ``forward`` by one generic forward that asks the
  family adapter for q, k, v and RoPE, lets the cache policy evict / compress,
  and attends over the slot table;
* the model's top-level ``forward`` by a thin wrapper that makes sure a
  :class:`~kvtools.cache.KVCache` is used, tells the cache which new tokens
  are padding and at which positions they sit, and runs chunked prefill.

HF's own ``generate()`` (sampling, stopping, streamers) is untouched.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .cache import KVCache, Step
from .config import KVConfig, load_config
from .errors import ConfigError, KVToolsError
from .methods import LayerInfo, make_policy
from .families import adapter_for

_MARK = "_kvtools_patch"


class Patch:
    """A live patch of one model instance. Use as a context manager or call :meth:`unpatch`.

    >>> with kvtools.patch(model, "snapkv") as p:          # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=32)
    """

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.config: KVConfig = load_config(config)  # validate before touching the model
        self.policy = make_policy(self.config)
        self.adapter = adapter_for(model)
        _check_backends(self.config, model)
        if getattr(model, _MARK, None) is not None:
            raise KVToolsError(
                f"model is already patched with '{getattr(model, _MARK).config.name}'; unpatch it first"
            )
        self.model = model
        self.modules = self.adapter.attention_modules(model)
        self.num_layers = len(self.modules)
        self.policy.bind(self.num_layers, int(model.config.num_key_value_heads))
        if self.config.quant is not None:
            self.config.quant.check_model(int(self.modules[0].head_dim))
        self._saved: list[tuple[nn.Module, Any]] = []
        self._install()

    # ------------------------------------------------------------ install / restore
    def _install(self) -> None:
        for i, module in enumerate(self.modules):
            info = LayerInfo(
                layer_idx=getattr(module, "layer_idx", i),
                scale=self.adapter.scale(module),
                inv_freq=self.adapter.inv_freq(self.model, module),
                sliding_window=self.adapter.sliding_window(self.model, getattr(module, "layer_idx", i)),
            )
            self._replace(module, types.MethodType(_attention_forward(self, info), module))
        self.cache_kw = cache_arg(inspect.signature(self.model.forward))
        self._replace(self.model, _model_forward(self, self.model.forward))
        if callable(getattr(self.model, "generate", None)):
            self._replace(self.model, _generate(self, self.model.generate), "generate")
        setattr(self.model, _MARK, self)

    def _replace(self, module: nn.Module, fn: Any, name: str = "forward") -> None:
        self._saved.append((module, name, module.__dict__.get(name, _MISSING)))
        setattr(module, name, fn)

    def unpatch(self) -> None:
        """Restore every replaced forward; the model behaves exactly as before patching."""
        for module, name, old in reversed(self._saved):
            if old is _MISSING:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, old)
        self._saved.clear()
        if getattr(self.model, _MARK, None) is self:
            delattr(self.model, _MARK)

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()

    # ------------------------------------------------------------ caches
    def make_cache(self) -> KVCache:
        """A fresh cache sized for this model; pass it as ``past_key_values=`` to ``generate``."""
        return KVCache(self.num_layers, quant=self.config.quant)

    def cache_kwargs(self, cache: KVCache) -> dict[str, KVCache]:
        """``{name: cache}`` with the argument name the installed transformers prefers
        (``cache`` from 5.24, ``past_key_values`` before), for ``model(...)`` and ``generate(...)``."""
        return {self.cache_kw: cache}

    def _ensure_cache(self, cache: Any) -> KVCache:
        if isinstance(cache, KVCache):
            owner = (id(self.model), self.config)
            if cache.seen == 0 or cache.owner is None:
                cache.store(self.config.quant)  # an empty cache takes this config's storage
                cache.owner = owner
            elif cache.owner != owner:
                raise KVToolsError(
                    f"this KVCache holds {cache.seen} tokens written under another model or config "
                    f"({cache.owner[1].name!r}); continue it under that patch, or pass a new cache "
                    f"(patch.make_cache()) for '{self.config.name}'"
                )
            cache.ensure_layers(self.num_layers)
            return cache
        if cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0):
            return self.make_cache()  # e.g. the empty DynamicCache generate() creates
        raise KVToolsError(
            f"a model patched by kvtools needs a kvtools.KVCache, got a non-empty {type(cache).__name__}"
        )


_MISSING = object()


def cache_arg(sig: inspect.Signature) -> str:
    """The name a model forward with signature ``sig`` takes its cache under: ``cache`` from transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in sig.parameters else "past_key_values"


def _check_backends(config: KVConfig, model: nn.Module) -> None:
    """``backend: triton`` needs the model on a CUDA device with Triton installed: say so at patch()."""
    for stage in ("prefill", "decode"):
        cfg = getattr(config, stage)
        if getattr(cfg, "backend", None) != "triton":
            continue
        param = next(iter(model.parameters()), None)
        dev = param.device if param is not None else torch.device("cpu")
        if dev.type != "cuda":
            raise ConfigError(
                f"{stage}.backend: 'triton' runs on CUDA only and this model is on {dev.type}; use 'auto' "
                "(flex or torch here), 'flex' or 'torch'"
            )
        from .attention.block_sparse import available

        if not available("triton"):
            raise ConfigError(f"{stage}.backend: 'triton' is not installed; pip install triton, or use 'auto'")


def patch(model: nn.Module, config: Any = "full") -> Patch:
    """Patch ``model`` in place with a KV policy; returns a handle (context manager, ``.unpatch()``).

    ``config``: preset name (``kvtools configs``), YAML path, dict or :class:`KVConfig`.
    Errors in the config or an unsupported model family raise before the model is touched.

    >>> with kvtools.patch(model, {"cache": {"method": "snapkv", "budget": 256}}):   # doctest: +SKIP
    ...     model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=16)
    """
    return Patch(model, config)


# ---------------------------------------------------------------- the generic attention forward
def _attention_forward(patch: Patch, info: LayerInfo):
    adapter, policy = patch.adapter, patch.policy

    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, KVCache) or cache.step is None:
            raise KVToolsError("kvtools-patched attention was called without a KVCache prepared by the model")
        step = cache.step.on(hidden_states.device)  # a model split over devices: this layer's device
        q, k, v = adapter.project(self, hidden_states)
        q, k = adapter.rope(self, q, k, position_embeddings)
        out = policy.attend(cache.layer(info.layer_idx), q, k, v, step, info)
        return adapter.output(self, out), None

    return forward


# ---------------------------------------------------------------- the top-level model forward
def _model_forward(patch: Patch, orig: Any):
    sig = inspect.signature(orig)
    cache_kw = cache_arg(sig)

    @functools.wraps(orig)
    def forward(*args: Any, **kwargs: Any):
        bound = sig.bind_partial(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop("kwargs", {}) if "kwargs" in sig.parameters else {}
        kw.update(extra)
        cache = kw.pop("cache", None)
        legacy = kw.pop("past_key_values", None)
        given = cache if cache is not None else legacy
        # use_cache=False with no cache given: this call attends through a private cache that is dropped
        # after it (HF's generate would otherwise feed a returned cache back while re-feeding the sequence)
        private = kw.get("use_cache") is False and not isinstance(given, KVCache)
        cache = patch.make_cache() if private else patch._ensure_cache(given)
        ids = kw.get("input_ids")
        embeds = kw.get("inputs_embeds")
        x = ids if ids is not None else embeds
        if x is None:
            raise KVToolsError("patched forward needs input_ids or inputs_embeds")
        b, n = x.shape[0], x.shape[1]
        dev = x.device
        seen = cache.get_seq_length()
        valid = _new_token_mask(kw.get("attention_mask"), b, n, dev)
        pos = kw.get("position_ids")
        if pos is None:
            pos = torch.arange(seen, seen + n, device=dev).expand(b, n)
        elif pos.dim() == 3:  # multimodal rope layouts: take the text axis
            pos = pos[0]
        pos = pos.expand(b, n)
        chunk = getattr(patch.config.prefill, "chunk", None)
        bounds = chunk_bounds(n, chunk)
        real = valid.sum(-1)
        am = kw.get("attention_mask")
        # read once per call (never without a padding mask); layers plan from it without reading the device
        all_real = not (torch.is_tensor(am) and am.dim() == 2) or bool(valid.all())
        outs = []
        for c, (s, e) in enumerate(bounds):
            cache.step = Step(
                valid=valid[:, s:e],
                pos=pos[:, s:e],
                idx=torch.arange(seen + s, seen + e, device=dev),
                prompt_real=real,
                end_of_prompt=e == n,
                chunk=c,
                start=seen,
                first=seen + s,
                all_real=all_real or bool(valid[:, s:e].all()),
            )
            ckw = dict(kw)
            if len(bounds) > 1:
                ckw = _slice_inputs(kw, s, e)
            ckw[cache_kw] = cache
            if private:
                ckw["use_cache"] = True
            outs.append(orig(**ckw))
            for task in cache.step.deferred:  # after every layer ran this chunk
                task()
            cache.seen += e - s
        cache.step = None
        out = outs[-1]
        if len(outs) > 1 and not kw.get("logits_to_keep") and getattr(out, "logits", None) is not None:
            out.logits = torch.cat([o.logits for o in outs], dim=1)  # every chunk's logits, as one call
        if private:
            for name in ("cache", "past_key_values"):
                if name in out:
                    out[name] = None
        return out

    return forward


def _generate(patch: Patch, orig: Any):
    """``generate`` unchanged, after refusing what the patch's methods cannot do (beam search where
    per-row method state cannot follow the beams) before any prefill work."""

    @functools.wraps(orig)
    def generate(*args: Any, **kwargs: Any):
        gen_cfg = kwargs.get("generation_config") or getattr(patch.model, "generation_config", None)
        beams = kwargs.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1
        if int(beams) > 1:
            for method in patch.policy.methods():
                if not method.supports_reorder:
                    raise KVToolsError(
                        f"num_beams={beams}: '{method.cfg.method}' keeps per-row state that cannot follow beam "
                        "reordering (e.g. per-row CPU indexes); use num_beams=1 (greedy or sampling) with it"
                    )
        return orig(*args, **kwargs)

    return generate


def chunk_bounds(n: int, chunk: int | None) -> list[tuple[int, int]]:
    """The [s, e) chunks a call of ``n`` tokens runs in with ``prefill.chunk``: aligned to the call's end (the
    short remainder first), so every chunk ends where it would for the same prompt without left padding, and a
    padded row is split as it is alone. A first chunk of one token joins the next: a one-token call would look
    like a decode step to every layer."""
    if not chunk or n <= chunk:
        return [(0, n)]
    edges = [0, *range(n % chunk, n, chunk), n]
    if edges[1] <= 1:  # no remainder (0) or a one-token one: the first whole chunk starts the call
        del edges[1]
    return list(zip(edges[:-1], edges[1:]))


def _new_token_mask(attention_mask: Any, b: int, n: int, dev: torch.device) -> torch.Tensor:
    """[B, n] bool: which of the new tokens are real (from HF's 2-D padding mask, if any)."""
    if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 2:
        return torch.ones(b, n, dtype=torch.bool, device=dev)
    return attention_mask[:, -n:].to(device=dev, dtype=torch.bool)


def _slice_inputs(kw: dict[str, Any], s: int, e: int) -> dict[str, Any]:
    """The inputs of chunk [s, e) of a call (the 2-D padding mask covers the past and the chunk)."""
    out = dict(kw)
    if kw.get("labels") is not None:
        raise KVToolsError("prefill.chunk does not support labels; compute the loss from the returned logits")
    for name in ("input_ids", "inputs_embeds", "position_ids"):
        if kw.get(name) is not None:
            out[name] = kw[name][:, s:e]
    am = kw.get("attention_mask")
    if torch.is_tensor(am) and am.dim() == 2:
        out["attention_mask"] = am[:, : am.shape[1] - (_input_len(kw) - e)]
    return out


def _input_len(kw: dict[str, Any]) -> int:
    x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
    return int(x.shape[1])


@dataclass
class Captured:
    """One attention layer's inputs from a dense pass: q [B, H, L, D], k, v [B, Hk, L, D] (after RoPE)."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor | None
    scale: float
    sliding_window: int | None


def capture_qkv(model: Any, ids: torch.Tensor, keep: Any = None, values: bool = False) -> list[Captured]:
    """The rotated queries and keys (and values) of every layer ``keep(info)`` accepts, from one dense
    pass over ``ids``, on the CPU in fp32."""
    got: list[Captured] = []
    with patch(model, "full") as p:
        orig = p.policy.attend

        def attend(layer, q, k, v, step, info):
            if keep is None or keep(info):
                cpu = [None if x is None else x.detach().float().cpu() for x in (q, k, v if values else None)]
                got.append(Captured(info.layer_idx, *cpu, info.scale, info.sliding_window))
            return orig(layer, q, k, v, step, info)

        p.policy.attend = attend
        with torch.no_grad():  # logits of the last token only: all of them would be L x vocab floats
            model(input_ids=ids, logits_to_keep=1, **p.cache_kwargs(p.make_cache()))
    return got
