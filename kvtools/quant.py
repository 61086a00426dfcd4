"""KV quantisation: slot tables that hold keys and values as 8- or 4-bit codes, for every cache method.

A config's top-level ``quant`` section (``quant: {bits: 4}``) makes every slot table of the cache (and
every sub-table a method makes with :meth:`~kvtools.cache.SlotLayer.new_table`, e.g. duo's streaming
heads) a :class:`QuantizedSlotLayer`: what the cache method keeps is unchanged, the bytes it keeps them in
shrink. Codes come from bitsandbytes' blockwise kernels (CPU and CUDA): each block of ``group``
consecutive channels of one token's key or value has its own absmax (stored in float16); 8 bits use the
library's dynamic code book, 4 bits NF4 or FP4. Quantisation is per token, so every slot stays independent
and the table's operations (append, eviction, in-place ring writes, beam reordering) act on codes and
scales directly, never re-quantising.

- ``keys: channel`` (default): keys are divided by a per-(row, KV head) channel scale, each channel's
  largest magnitude over the first call's real tokens, before quantisation (multiplied back on read).
  Keys have a few outlier channels (the reason KIVI quantises keys per channel); with them normalised, a
  token's block absmax no longer comes from one channel. The scale is D float32 per (row, head) per layer.
  ``token``: plain per-token blocks.
- ``residual: R``: the last R tokens of the stream are also kept in the model's dtype (KIVI's recent
  window) and read instead of their codes; the ring costs R full-precision slots per (row, head).

Reads dequantise the whole table (the attention reads keys and values once per layer and step); no fused
kernel. :meth:`QuantizedSlotLayer.nbytes` counts what is stored: codes, scales, the channel scale, the ring.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field

from .cache import PackedSlots, SlotLayer, Step, _emptied, tensor_bytes
from .errors import ConfigError, KVToolsError
from .params import StrictNumbers

_EMPTY = torch.iinfo(torch.long).min  # ring entry holding no token


class QuantParams(StrictNumbers):
    """How a cache stores keys and values (the top-level ``quant`` section of a config)."""

    model_config = ConfigDict(extra="forbid")

    bits: Literal[8, 4] = Field(default=8, description="bits per key / value element")
    format: Literal["nf4", "fp4"] = Field(default="nf4", description="4 bits: the code book (NF4 or FP4)")
    group: Literal[32, 64, 128, 256] = Field(
        default=64, description="channels per block: each block of a token's key or value has its own absmax")
    keys: Literal["channel", "token"] = Field(
        default="channel", description="channel: keys normalised per channel before per-token blocks; token: not")
    residual: int = Field(default=32, ge=0, description="most recent tokens also kept in full precision")

    def check_model(self, head_dim: int) -> None:
        """A clear error when the model's head size does not split into ``group`` blocks."""
        if head_dim % self.group:
            ok = [g for g in (32, 64, 128, 256) if head_dim % g == 0]
            raise ConfigError(f"quant.group: {self.group} does not divide this model's head size {head_dim}; "
                              f"allowed here: {', '.join(map(str, ok)) or 'none (head size not a multiple of 32)'}")

    def bytes_per_token(self, head_dim: int) -> float:
        """Stored bytes of one token's key + value per KV head (codes and float16 absmax), without the ring and
        the channel scale: what a slot costs."""
        return 2 * (head_dim * self.bits / 8 + 2 * head_dim / self.group)


def _bnb() -> Any:
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise KVToolsError("quant: needs bitsandbytes (pip install 'kvtools[quant]' or bitsandbytes)") from exc
    return bnb_f


class Codes:
    """One tensor's codes [B, Hk, S, D * bits / 8] (uint8) and block absmax [B, Hk, S, D / group] (float16)."""

    def __init__(self, cfg: QuantParams, codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> None:
        self.cfg, self.codes, self.absmax, self.dtype = cfg, codes, absmax, dtype

    @classmethod
    def encode(cls, cfg: QuantParams, x: torch.Tensor) -> Codes:
        b, hk, n, d = x.shape
        flat = x.reshape(-1, d).contiguous()
        if flat.shape[0] == 0:
            return cls(cfg, x.new_zeros(b, hk, 0, d * cfg.bits // 8, dtype=torch.uint8),
                       x.new_zeros(b, hk, 0, d // cfg.group, dtype=torch.float16), x.dtype)
        bnb_f = _bnb()
        if cfg.bits == 8:
            codes, state = bnb_f.quantize_blockwise(flat, code=_code8(x.device), blocksize=cfg.group)
        else:
            codes, state = bnb_f.quantize_4bit(flat, blocksize=cfg.group, quant_type=cfg.format)
        return cls(cfg, codes.view(b, hk, n, d * cfg.bits // 8),
                   state.absmax.to(torch.float16).view(b, hk, n, d // cfg.group), x.dtype)

    def decode(self) -> torch.Tensor:
        b, hk, n, nb = self.codes.shape
        d = nb * 8 // self.cfg.bits
        if n == 0 or b == 0:
            return self.codes.new_zeros(b, hk, n, d, dtype=self.dtype)
        bnb_f = _bnb()
        absmax = self.absmax.reshape(-1).float()
        if self.cfg.bits == 8:
            state = bnb_f.QuantState(absmax=absmax, code=_code8(self.codes.device), blocksize=self.cfg.group,
                                     dtype=self.dtype)
            out = bnb_f.dequantize_blockwise(self.codes.reshape(-1, d), state)
        else:
            state = bnb_f.QuantState(absmax=absmax, shape=torch.Size((b * hk * n, d)), blocksize=self.cfg.group,
                                     quant_type=self.cfg.format, dtype=self.dtype)
            out = bnb_f.dequantize_4bit(self.codes.reshape(-1, 1), state)
        return out.view(b, hk, n, d)

    def map(self, fn) -> None:
        """Apply a slot-wise or row-wise operation (``fn(t)``, t [B, Hk, S, ...]) to codes and absmax."""
        self.codes, self.absmax = fn(self.codes), fn(self.absmax)

    def cat(self, other: Codes) -> None:
        self.codes = torch.cat([self.codes, other.codes], 2)
        self.absmax = torch.cat([self.absmax, other.absmax], 2)

    def write(self, at: int | slice | torch.Tensor, other: Codes) -> None:
        for name in ("codes", "absmax"):
            t, new = getattr(self, name), getattr(other, name)
            if isinstance(at, int):
                t[:, :, at] = new[:, :, 0]
            elif isinstance(at, slice):
                t[:, :, at] = new
            else:
                t.scatter_(2, at[..., None].expand(*at.shape, t.shape[-1]), new)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.absmax]


_CODE8: dict[torch.device, torch.Tensor] = {}


def _code8(device: torch.device) -> torch.Tensor:
    """bitsandbytes' dynamic 8-bit code book (256 floats, shared by every table: not counted per cache)."""
    if device not in _CODE8:
        _CODE8[device] = _bnb().create_dynamic_map().to(device)
    return _CODE8[device]


class QuantizedSlotLayer(SlotLayer):
    """A slot table whose keys and values are stored as :class:`Codes` (see the module docstring).

    ``keys`` / ``values`` read as dequantised tensors (a new tensor on every read: write through
    :meth:`write` / :meth:`rewrite_keys`, never in place); assigning a tensor quantises it."""

    def __init__(self, cfg: QuantParams, **kwargs: Any) -> None:
        self.cfg = cfg
        self._k: Codes | None = None
        self._v: Codes | None = None
        self._dtype: torch.dtype | None = None
        self.kscale: torch.Tensor | None = None  # [B, Hk, 1, D] float32: keys' channel scale
        #: [B, 1, 1, 1] rows whose scale waits for their first real token (a left-padded row's first chunks);
        #: None once every row has its scale
        self._kscale_unset: torch.Tensor | None = None
        self.ring_k: torch.Tensor | None = None  # [B, Hk, R, D]: the last R tokens' keys in full precision
        self.ring_v: torch.Tensor | None = None
        self.ring_idx: torch.Tensor | None = None  # [R] stream index each ring entry holds (_EMPTY: none)
        super().__init__(**kwargs)

    def new_table(self) -> QuantizedSlotLayer:
        return QuantizedSlotLayer(self.cfg)

    # --- keys / values as tensors
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        if self._k is None:
            return None
        k = self._codes(0).decode()
        if self.kscale is not None:
            k = (k.float() * self.kscale).to(k.dtype)
        return self._overlay(k, self.ring_k)

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._unpack()
        if t is None:
            self._k = None
            return
        self._dtype = t.dtype
        self._k = self._encode_keys(t)

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._overlay(self._codes(1).decode(), self.ring_v)

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._unpack()
        self._v = None if t is None else Codes.encode(self.cfg, t)

    def _codes(self, which: int) -> Codes:
        """Keys' (0) or values' (1) codes for the whole table (the packed slots unpacked before the rest)."""
        c = (self._k, self._v)[which]
        if self._packed is None:
            return c
        return Codes(self.cfg, self._whole(2 * which, c.codes), self._whole(2 * which + 1, c.absmax), c.dtype)

    def _unpack(self) -> None:
        if self._packed is not None:
            k, v = self._codes(0), self._codes(1)
            self._packed = None
            self._k, self._v = k, v

    def _pack(self, counts: torch.Tensor) -> None:
        if self._packed is not None or self._k is None or not self._worth_packing(counts):
            return
        self._packed = PackedSlots.pack([*self._k.tensors(), *self._v.tensors()], counts)
        for c in (self._k, self._v):
            c.map(_emptied)

    def _encode_keys(self, k: torch.Tensor) -> Codes:
        if self.kscale is not None:
            k = (k.float() / self.kscale).to(k.dtype)
        return Codes.encode(self.cfg, k)

    def _overlay(self, x: torch.Tensor, ring: torch.Tensor | None) -> torch.Tensor:
        """``x`` (a freshly decoded tensor, written in place) with the slots whose token is in the
        full-precision ring read from it: only those slots are copied (at most the ring's R per row and
        head), not a gathered copy of the whole table."""
        if ring is None or self.idx is None or x.shape[2] == 0:
            return x
        at = self.idx.remainder(ring.shape[2])  # [B, Hk, S]
        b, h, s = (self.ring_idx[at] == self.idx).nonzero(as_tuple=True)
        if b.numel():
            x[b, h, s] = ring[b, h, at[b, h, s]].to(x.dtype)
        return x

    # --- storage hooks
    def _append_kv(self, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        if self.cfg.keys == "channel" and (self.kscale is None or self._kscale_unset is not None):
            # each row's scale comes from the first call (chunk) holding real tokens of it: a left-padded row's
            # chunks of padding only do not set it, so it is the scale the row gets alone
            real = step.valid[:, None, :, None].to(k.device)
            has = real.any(2, keepdim=True)  # [B, 1, 1, 1]
            new = torch.where(has, k.float().abs().masked_fill(~real, 0).amax(2, keepdim=True).clamp(min=1e-6), 1.0)
            if self.kscale is None:
                self.kscale, unset = new, ~has
            else:
                self.kscale = torch.where(self._kscale_unset, new, self.kscale)
                unset = self._kscale_unset & ~has
            self._kscale_unset = None if step.all_real or not bool(unset.any()) else unset
        if self._k is None or self._k.codes.shape[2] == 0:
            self._k, self._v, self._dtype = self._encode_keys(k), Codes.encode(self.cfg, v), k.dtype
        else:
            self._k.cat(self._encode_keys(k))
            self._v.cat(Codes.encode(self.cfg, v))
        self._ring_put(step.idx.to(k.device), k, v)

    def _gather_kv(self, sel: torch.Tensor) -> None:
        self._unpack()
        self._k.map(lambda t: t.gather(2, sel[..., None].expand(*sel.shape, t.shape[-1])))
        self._v.map(lambda t: t.gather(2, sel[..., None].expand(*sel.shape, t.shape[-1])))

    def _write_kv(self, at: int | slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        self._unpack()
        self._k.write(at, self._encode_keys(k.to(self._dtype)))
        if v is not None:  # a new token (decode): write() puts it in the ring
            self._v.write(at, Codes.encode(self.cfg, v.to(self._dtype)))
        elif self.ring_k is not None:  # tokens re-rotated in place: their ring copies follow
            idx = self.idx[:, :, at] if isinstance(at, slice) else self.idx.gather(2, at)
            self._ring_rewrite(idx, k.to(self._dtype))

    def _grow_kv(self, n: int) -> None:  # free slots go after the packed ones, as appended ones do
        b, hk = self.valid.shape[:2]
        for codes in (self._k, self._v):
            codes.map(lambda t: torch.cat([t, t.new_zeros(b, hk, n, t.shape[-1])], 2))

    def write(self, at: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        super().write(at, k, v, step)
        self._ring_put(step.idx.to(k.device), k, v)

    # --- the full-precision ring of the last `residual` tokens, by stream index
    def _ring_put(self, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Record new tokens (stream indices ``idx`` [n], consecutive; k, v [B, Hk, n, D]): the last R."""
        r = self.cfg.residual
        if not r:
            return
        if self.ring_k is None:
            b, hk, _, d = k.shape
            self.ring_k = k.new_zeros(b, hk, r, d)
            self.ring_v = v.new_zeros(b, hk, r, v.shape[-1])
            self.ring_idx = torch.full((r,), _EMPTY, dtype=torch.long, device=k.device)
        idx, k, v = idx[-r:], k[:, :, -r:], v[:, :, -r:]
        at = idx.remainder(r)
        self.ring_k[:, :, at] = k.to(self.ring_k.dtype)
        self.ring_v[:, :, at] = v.to(self.ring_v.dtype)
        self.ring_idx[at] = idx

    def _ring_rewrite(self, idx: torch.Tensor, k: torch.Tensor) -> None:
        """New keys ``k`` [B, Hk, n, D] for held tokens of stream indices ``idx`` [B, Hk, n]: where the ring
        holds one of them, its copy takes the new key."""
        r = self.ring_k.shape[2]
        at = idx.remainder(r)
        held = self.ring_idx[at] == idx  # [B, Hk, n]
        onehot = (at[..., None] == torch.arange(r, device=at.device)) & held[..., None]  # [B, Hk, n, R]
        new = torch.einsum("bhnr,bhnd->bhrd", onehot.to(k.dtype), k)
        self.ring_k = torch.where(onehot.any(2)[..., None], new.to(self.ring_k.dtype), self.ring_k)

    # --- rows, bytes
    def _map_storage(self, fn) -> None:
        for codes in (self._k, self._v):
            if codes is not None:
                codes.map(fn)
        for name in ("kscale", "_kscale_unset", "ring_k", "ring_v"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if self._packed is not None:
            self._packed.map_rows(fn)

    def reset(self) -> None:
        super().reset()
        self._k = self._v = self.kscale = self._kscale_unset = self.ring_k = self.ring_v = self.ring_idx = None

    def _storage_tensors(self) -> list[torch.Tensor]:
        out = [t for c in (self._k, self._v) if c is not None for t in c.tensors()]
        out += [] if self._packed is None else self._packed.tensors()
        return out + [t for t in (self.kscale, self._kscale_unset, self.ring_k, self.ring_v, self.ring_idx)
                      if t is not None]
