"""The slot-table KV cache.

Each layer keeps, per batch row and KV head, a table of slots::

    keys, values  [B, Hk, S, D]   rotated keys / values (never expanded to H query heads)
    valid         [B, Hk, S]      bool: the slot holds a real token (False: padding, evicted filler)
    pos           [B, Hk, S]      int32: the RoPE position the key is currently rotated at
    idx           [B, Hk, S]      int32: the token's index in the stream (order, causality, sliding windows)

Policies (``kvtools.methods``) keep or drop slots with :meth:`SlotLayer.keep`, a
per-(row, head) gather: memory is really freed, selections may differ per head.
:class:`KVCache` subclasses ``transformers.Cache`` so ``generate()`` accepts it,
and reports tokens *seen* as its sequence length so HF's absolute positions
stay right after compression.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

#: the dtype of a table's ``pos`` / ``idx`` metadata: 4 bytes a slot each (positions and stream indices stay far
#: below 2**31), against 8 for int64, which matters next to int8 / int4 keys and values
SLOT_INT = torch.int32


@dataclass
class Step:
    """What the patched model forward tells every layer about the current call."""

    valid: torch.Tensor  # [B, Lq] bool: new tokens that are real (False: left padding)
    pos: torch.Tensor  # [B, Lq] long: RoPE positions HF used for the new tokens
    idx: torch.Tensor  # [Lq] long: stream indices of the new tokens
    prompt_real: torch.Tensor  # [B] long: real tokens in the whole call (all chunks)
    end_of_prompt: bool  # last chunk of the call
    chunk: int = 0  # chunk number inside this call
    start: int = 0  # stream index of the call's first token (a later call on the same cache starts after 0)
    #: host-side facts the model wrapper knows once per call (derived from the tensors when not given), so
    #: layers can plan without reading the device: the stream index of ``idx[0]`` (``idx`` is consecutive),
    #: and whether every new token is real
    first: int | None = None
    all_real: bool | None = None
    #: work a method defers until every layer has run this chunk (called in order, then dropped): e.g.
    #: ``layers: adaptive`` splits a budget over layers from all of their scores
    deferred: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.first is None:
            self.first = int(self.idx[0]) if self.idx.numel() else 0
        if self.all_real is None:
            self.all_real = bool(self.valid.all())

    def on(self, device: torch.device) -> Step:
        """This step with its tensors on ``device`` (a layer of a model split over devices reads its step
        there); one copy per device per step, sharing ``deferred`` and the host-side facts."""
        if self.valid.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            copies[device] = replace(
                self, valid=self.valid.to(device), pos=self.pos.to(device), idx=self.idx.to(device),
                prompt_real=self.prompt_real.to(device), deferred=self.deferred,
            )
        return copies[device]

    @property
    def q_len(self) -> int:
        return int(self.idx.numel())

    @property
    def is_prefill(self) -> bool:
        return self.q_len > 1


class SlotLayer(CacheLayerMixin):
    """One layer's slot table (see module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    #: a table whose heads keep different numbers of slots may store only the kept ones (``keep(..., pack=True)``,
    #: :class:`PackedSlots`); False keeps the padded table (a subclass whose storage cannot pack)
    packable: ClassVar[bool] = True

    def __init__(self, **kwargs: Any) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        #: the table's leading slots, packed per head (None: the whole table is ``_keys`` / ``_values``)
        self._packed: PackedSlots | None = None
        super().__init__()
        self.valid: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.idx: torch.Tensor | None = None
        self.seen = 0
        #: per-cache method state (re-entrant: never on modules): sub-tables, RowStates, stores
        self.state: dict[str, Any] = {}
        self._layout: tuple[tuple[Any, ...], TableLayout] | None = None  # (what it was read from, layout)

    # --- keys / values: [B, Hk, S, D], read whole whether or not the table is packed
    def _whole(self, part: int, rest: torch.Tensor | None) -> torch.Tensor | None:
        """The whole table of one stored part (0: keys, 1: values) from its padded ``rest``: the packed slots
        unpacked before it, when the table is packed."""
        if self._packed is None or rest is None:
            return rest
        return torch.cat([self._packed.unpack(part), rest], 2)

    @property
    def keys(self) -> torch.Tensor | None:
        return self._whole(0, self._keys)

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._unpack()
        self._keys = t

    @property
    def values(self) -> torch.Tensor | None:
        return self._whole(1, self._values)

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._unpack()
        self._values = t

    @property
    def packed(self) -> bool:
        """Whether the table's leading slots are stored packed per head (see :class:`PackedSlots`)."""
        return self._packed is not None

    def _unpack(self) -> None:
        """Store the whole table padded again (before a write into its slots)."""
        if self._packed is not None:
            k, v = self.keys, self.values
            self._packed = None
            self._keys, self._values = k, v

    def _pack(self, counts: torch.Tensor) -> None:
        """After ``keep(..., pack=True)``: store only each head's first ``counts`` [B, Hk] slots (the kept ones), when
        that holds fewer slots than the padded table (heads of a row keep different numbers of slots)."""
        if self._packed is not None or not self._worth_packing(counts):
            return
        self._packed = PackedSlots.pack([self._keys, self._values], counts)
        self._keys, self._values = _emptied(self._keys), _emptied(self._values)

    def _worth_packing(self, counts: torch.Tensor) -> bool:
        """Packing ``counts`` [B, Hk] holds fewer slots than the padded table (some row's heads differ)."""
        hk, s = counts.shape[1], self.size
        return self.packable and self.is_initialized and s > 0 and int(counts.sum(-1).max()) < hk * s

    # --- transformers CacheLayerMixin API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hk, _, d = key_states.shape
        dev = key_states.device
        self.keys = key_states.new_zeros(b, hk, 0, d)
        self.values = value_states.new_zeros(b, hk, 0, value_states.shape[-1])
        self.valid = torch.zeros(b, hk, 0, dtype=torch.bool, device=dev)
        self.pos = torch.zeros(b, hk, 0, dtype=SLOT_INT, device=dev)
        self.idx = torch.zeros(b, hk, 0, dtype=SLOT_INT, device=dev)
        self.is_initialized = True
        self._set_layout(TableLayout(ordered=True, all_valid=True))

    def update(self, key_states, value_states, *args, **kwargs):  # type: ignore[override]
        raise RuntimeError(
            "KVCache is driven by kvtools' patched attention; use it with a model patched by kvtools.patch()"
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._packed = None
        self.keys = self.values = self.valid = self.pos = self.idx = None
        self.is_initialized = False
        self.seen = 0
        self.state = {}
        self._layout = None

    # --- what the host knows about the table without reading it
    def _set_layout(self, layout: TableLayout | None) -> None:
        # weak references, not ids: a freed tensor's id may be reused by a later one
        self._layout = None if layout is None else (
            (weakref.ref(self.valid), _version(self.valid), weakref.ref(self.idx), _version(self.idx)), layout)

    def forget_layout(self) -> None:
        """Say that ``valid`` / ``idx`` were written in place (a method's own slot writes): the layout is no
        longer known. (Outside inference mode the tensors' version counters catch such writes as well.)"""
        self._layout = None

    @property
    def layout(self) -> TableLayout | None:
        """The table's :class:`TableLayout` when the host knows it: kept up to date by :meth:`append` and batch
        reordering; any other change of ``valid`` / ``idx`` (an eviction, a method writing slots in place)
        makes it unknown (None), and readers fall back to reading the tensors."""
        if self._layout is None or self.valid is None:
            return None
        (valid, v_version, idx, i_version), layout = self._layout
        if valid() is not self.valid or idx() is not self.idx or (v_version, i_version) != (
                _version(self.valid), _version(self.idx)):
            return None
        return layout

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_rows(lambda t: t[indices.to(t.device)])
        if self._packed is not None:  # rows dropped: the packed width may shrink (beams keep every row's width)
            self._packed.trim()

    # --- slot table operations
    def new_table(self) -> SlotLayer:
        """An empty table stored like this one (a method's sub-table: duo's streaming heads): use it rather
        than ``SlotLayer()`` so a storage option of the cache (quantisation) applies to sub-tables too."""
        return SlotLayer()

    @property
    def size(self) -> int:
        """Slots held per (row, KV head)."""
        return 0 if self.valid is None else int(self.valid.shape[2])

    def map_rows(self, fn) -> None:
        """Apply a batch-axis operation to every tensor of the table and of its sub-tables. Method state goes
        first: a state that cannot follow (untyped, or a store that refuses) raises before anything moved."""
        for key, sub in self.state.items():
            if not callable(getattr(sub, "map_rows", None)):
                raise TypeError(f"layer.state['{key}'] is a {type(sub).__name__}, which cannot follow batch "
                                "reordering; keep per-row method state in a kvtools.cache.RowState")
        for sub in self.state.values():  # also when this table is empty (duo: all heads streaming)
            sub.map_rows(fn)  # a sub-table, a RowState, or a store that decides itself (the retrieval CPU side)
        if self.is_initialized:
            layout = self.layout  # a property of every row: survives reordering / selecting rows
            self._map_storage(fn)
            for name in ("valid", "pos", "idx"):
                setattr(self, name, fn(getattr(self, name)))
            self._set_layout(layout)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_layout"] = None  # weak references do not pickle; a copy re-derives what it needs
        return state

    def append(self, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Append new tokens' slots. k, v: [B, Hk, Lq, D]."""
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        before, size = self.layout, self.size
        b, hk, lq, _ = k.shape
        self._append_kv(k, v, step)
        self.valid = _append_in_place(self.valid, step.valid[:, None, :].expand(b, hk, lq).to(self.valid))
        self.pos = _append_in_place(self.pos, step.pos[:, None, :].expand(b, hk, lq).to(self.pos))
        self.idx = _append_in_place(self.idx, step.idx.view(1, 1, lq).expand(b, hk, lq).to(self.idx))
        self.seen += lq
        if before is not None:
            self._set_layout(TableLayout(ordered=before.ordered and step.first == size,
                                         all_valid=before.all_valid and step.all_real))

    def keep(self, keep: torch.Tensor, pack: bool = False) -> None:
        """Keep only the slots flagged in ``keep`` [B, Hk, S] (bool), in stream order.

        Rows/heads may keep different counts: the table shrinks to the largest
        count and shorter ones are filled with invalid slots. ``pack``: when heads keep
        different counts, store only the kept slots (:class:`PackedSlots`; a method
        whose budgets differ per head by design asks for it: packing and the padded
        reads cost time, worth it only for large differences that last).
        """
        keep = keep & self.valid
        counts = keep.sum(-1)
        k_max = int(counts.max()) if counts.numel() else 0
        if k_max == self.size and bool(keep.all()):
            return
        s = self.size
        order = torch.arange(s, device=keep.device)
        # kept slots first, in their original order; the rest after
        key = torch.where(keep, order, order + s)
        sel = key.argsort(dim=-1)[..., :k_max]  # [B, Hk, K]
        self.gather(sel, fill_invalid=torch.arange(k_max, device=keep.device) >= counts[..., None])
        if pack:
            self._pack(counts)

    def gather(self, sel: torch.Tensor, fill_invalid: torch.Tensor | None = None) -> None:
        """Replace the table by the slots ``sel`` [B, Hk, K] (indices into the slot axis)."""
        self._gather_kv(sel)
        self.valid = self.valid.gather(2, sel)
        if fill_invalid is not None:
            self.valid = self.valid & ~fill_invalid
        self.pos = self.pos.gather(2, sel)
        self.idx = self.idx.gather(2, sel)

    def write(self, at: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        """Write one decode step's new token (``k``, ``v``: [B, Hk, 1, D]) over the slot ``at``: one slot for
        every row and head (int), or a slot per (row, head) ([B, Hk] tensor); the slot's metadata becomes the
        token's. The table's layout is then unknown (:meth:`forget_layout`)."""
        b, hk = k.shape[:2]
        pos = step.pos[:, None, :1].to(self.pos).expand(b, hk, 1)
        idx = step.idx.view(1, 1, 1).to(self.idx).expand(b, hk, 1)
        if isinstance(at, int):
            self._write_kv(at, k, v)
            self.valid[:, :, at] = True
            self.pos[:, :, at], self.idx[:, :, at] = pos[..., 0], idx[..., 0]
        else:
            at = at[..., None]  # [B, Hk, 1]
            self._write_kv(at, k, v)
            self.valid.scatter_(2, at, True)
            self.pos.scatter_(2, at, pos)
            self.idx.scatter_(2, at, idx)
        self.seen += 1
        self.forget_layout()

    def rewrite_keys(self, at: int | torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> None:
        """Replace the keys of tokens the table holds (re-rotated to the RoPE positions ``pos``): the slots
        ``[0, at)`` of every row and head (int; ``k`` [B, Hk, at, D], ``pos`` [B or 1, Hk, at]) or the slots
        ``at`` [B, Hk, n] (``k`` [B, Hk, n, D], ``pos`` [B, Hk, n])."""
        if isinstance(at, int):
            self._write_kv(slice(0, at), k, None)
            self.pos[:, :, :at] = pos
        else:
            self._write_kv(at, k, None)
            self.pos.scatter_(2, at, pos.to(self.pos))

    def grow(self, n: int = 1) -> None:
        """Append ``n`` free (invalid) slots to every row and head."""
        b, hk = self.valid.shape[:2]
        self._grow_kv(n)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(b, hk, n)], 2)
        self.pos = torch.cat([self.pos, self.pos.new_zeros(b, hk, n)], 2)
        self.idx = torch.cat([self.idx, self.idx.new_full((b, hk, n), -1)], 2)

    # --- how keys / values are stored (a subclass may store them otherwise: kvtools.quant)
    def _append_kv(self, k: torch.Tensor, v: torch.Tensor, step: Step) -> None:
        # appended slots go after the packed ones, padded (every head gets the same new tokens)
        self._keys = _append_in_place(self._keys, k)
        self._values = _append_in_place(self._values, v)

    def _gather_kv(self, sel: torch.Tensor) -> None:
        keys, values = self.keys, self.values
        self._packed = None
        self._keys = keys.gather(2, sel[..., None].expand(*sel.shape, keys.shape[-1]))
        self._values = values.gather(2, sel[..., None].expand(*sel.shape, values.shape[-1]))

    def _write_kv(self, at: int | slice | torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Write ``k`` (and ``v`` unless None) at the slot ``at`` (int: k [B, Hk, 1, D]), the slots ``at``
        (slice) or the slots ``at`` [B, Hk, n] (index tensor)."""
        self._unpack()
        for name, new in (("_keys", k), ("_values", v)):
            if new is None:
                continue
            t = getattr(self, name)
            if isinstance(at, int):
                t[:, :, at] = new[:, :, 0]
            elif isinstance(at, slice):
                t[:, :, at] = new
            else:
                t.scatter_(2, at[..., None].expand(*at.shape, t.shape[-1]), new.to(t.dtype))

    def _map_storage(self, fn) -> None:
        self._keys, self._values = fn(self._keys), fn(self._values)
        if self._packed is not None:
            self._packed.map_rows(fn)

    def _storage_tensors(self) -> list[torch.Tensor]:
        """The tensors keys and values are stored in (what :meth:`nbytes` counts for them)."""
        packed = [] if self._packed is None else self._packed.tensors()
        return [t for t in (self._keys, self._values) if t is not None] + packed

    def _grow_kv(self, n: int) -> None:
        b, hk = self.valid.shape[:2]
        self._keys = torch.cat([self._keys, self._keys.new_zeros(b, hk, n, self._keys.shape[-1])], 2)
        self._values = torch.cat([self._values, self._values.new_zeros(b, hk, n, self._values.shape[-1])], 2)

    def nbytes(self, device: str | torch.device | None = None, offloaded: bool | None = None) -> int:
        """Bytes of this table plus what a method keeps in ``state`` (duo's streaming heads, the retrieval
        cache's CPU store): with ``device``, only what lives on that device type; ``offloaded`` True/False:
        only / all but stores a method offloaded (also meaningful on a CPU-only machine)."""
        total = 0
        for t in self.state.values():  # sub-tables and RowStates are resident; a store may say it is offloaded
            if offloaded is None or bool(getattr(t, "offloaded", False)) == offloaded:
                total += t.nbytes(device)
        if offloaded:
            return total
        table = [*self._storage_tensors(), self.valid, self.pos, self.idx]
        return total + tensor_bytes([t for t in table if t is not None], device)


def _spare_slots(n: int) -> int:
    """Free slots reserved past a table of ``n`` slots when a decode step reallocates it: 1/8 of it, 16 to 1024."""
    return min(1024, max(16, n // 8))


def _append_in_place(t: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``torch.cat([t, new], 2)`` for a table's keys or values ([B, Hk, S, D]) or its slots' metadata
    ([B, Hk, S]), without copying the table on
    every decode step: a one-token append into a table reallocates it once with :func:`_spare_slots` free slots
    after its end and returns a view of the filled part; the following one-token appends write into those
    slots in place (the view grows), until they are used up. Only a table that is the prefix of its storage
    (strides and storage size say so) grows in place: a table replaced by anything else (a gather, a batch
    reorder, a copy) reallocates again. A table's storage is never shared with another table (every
    replacement is a new tensor, a deep copy copies the storage), so the slots written are nobody else's.
    Memory figures (:meth:`SlotLayer.nbytes`) count the filled slots; the spare ones are at most 1/8 of a
    table (1024 slots) and exist only while a table grows token by token. Multi-token appends (prompts,
    chunks) are plain concatenations: a prompt's table is exactly its size."""
    b, hk, n, *rest = t.shape
    d = math.prod(rest)  # elements per slot (keys / values: D; metadata [B, Hk, S]: 1)
    lq = new.shape[2]
    if lq == 1 and n > 0 and t.storage_offset() == 0 and new.dtype == t.dtype:
        # the buffer is the storage under t: [B, Hk, cap, ...] contiguous, t its first n slots (strides tell)
        size = t.untyped_storage().nbytes()
        cap = size // (t.element_size() * b * hk * d)
        inner = tuple(math.prod(rest[i + 1:]) for i in range(len(rest)))  # contiguous strides of a slot
        exact = size == t.element_size() * b * hk * cap * d
        if n < cap and exact and t.stride() == (hk * cap * d, cap * d, d, *inner):
            grown = t.as_strided((b, hk, n + lq, *rest), t.stride())
            grown[:, :, n:] = new
            return grown
    if lq > 1 or n == 0:
        return torch.cat([t, new.to(t.dtype)], dim=2)
    buf = t.new_empty(b, hk, n + lq + _spare_slots(n), *rest)
    buf[:, :, :n] = t
    buf[:, :, n:n + lq] = new
    return buf[:, :, :n + lq]


class PackedSlots:
    """A slot table's leading slots when its heads keep different numbers of them (per-head budgets: a head
    keeping 3x another's no longer pads every head to its count).

    ``parts`` (keys and values, or their codes and scales) [B, T, X] hold each row's kept slots head after
    head, ``T`` the most any row keeps over all its heads; ``loc`` [B, Hk, S] (int32) is where slot s of head h
    is in them (-1: an unkept filler, read as zeros). Reads unpack to the padded [B, Hk, S, X] (a transient of
    one layer); the table's metadata (``valid`` / ``pos`` / ``idx``) stays padded."""

    def __init__(self, parts: list[torch.Tensor], loc: torch.Tensor) -> None:
        self.parts, self.loc = parts, loc

    @classmethod
    def pack(cls, parts: list[torch.Tensor], counts: torch.Tensor) -> PackedSlots:
        """Pack each head's first ``counts`` [B, Hk] slots of every tensor of ``parts`` [B, Hk, S, X]."""
        b, hk, s = parts[0].shape[:3]
        held = torch.arange(s, device=parts[0].device) < counts[..., None].to(parts[0].device)  # [B, Hk, S]
        flat = held.view(b, hk * s)
        at = flat.long().cumsum(-1) - 1  # [B, Hk*S]: place among the row's kept slots
        t = int(flat.sum(-1).max())
        target = torch.where(flat, at, t)  # unkept slots go to a scratch place past the end
        out = []
        for x in parts:
            packed = x.new_zeros(b, t + 1, x.shape[-1])
            packed.scatter_(1, target[..., None].expand(b, hk * s, x.shape[-1]), x.reshape(b, hk * s, -1))
            out.append(packed[:, :t].clone())  # a copy: the scratch place is freed
        return cls(out, torch.where(flat, at, -1).view(b, hk, s).to(torch.int32))

    def unpack(self, i: int) -> torch.Tensor:
        """``parts[i]`` as the padded [B, Hk, S, X]."""
        x = self.parts[i]
        b, hk, s = self.loc.shape
        if x.shape[1] == 0:
            return x.new_zeros(b, hk, s, x.shape[-1])
        loc = self.loc.view(b, hk * s).long()
        out = x.gather(1, loc.clamp(min=0)[..., None].expand(b, hk * s, x.shape[-1]))
        return out.masked_fill(loc[..., None] < 0, 0).view(b, hk, s, -1)

    def map_rows(self, fn) -> None:
        self.parts, self.loc = [fn(x) for x in self.parts], fn(self.loc)

    def trim(self) -> None:
        """Drop the packed places no row uses any more (after rows were dropped: the rows left may hold
        fewer slots than the widest row did). A row's places are ``0 .. its count - 1``."""
        t = int((self.loc >= 0).flatten(1).sum(-1).max()) if self.loc.numel() else 0
        if t < self.parts[0].shape[1]:
            self.parts = [x[:, :t].clone() for x in self.parts]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.parts, self.loc]


def _emptied(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, Hk, S, X] with no slots (a new tensor, not a view: ``t``'s memory is freed)."""
    return t.new_zeros(*t.shape[:2], 0, *t.shape[3:])


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (inference-mode tensors keep none)."""
    return None if t.is_inference() else t._version


@dataclass(frozen=True)
class TableLayout:
    """Facts about a slot table the host can know without reading the device (see :attr:`SlotLayer.layout`).

    ``ordered``: slot j holds stream token j for every row and head (nothing evicted or moved), so the
    table is the stream so far; ``all_valid``: every slot is real (no padding, nothing invalidated)."""

    ordered: bool
    all_valid: bool


class RowState:
    """Per-(cache, layer) run-time state of a method (e.g. Recycled Attention's recycled set).

    Every tensor attribute has the batch on axis 0, so beam search (``reorder_cache``) and batch
    selection reorder it with the slot table, except those named in :attr:`shared` (one value for every
    row, e.g. stream indices); other attributes (step counters) are shared too. Subclass it (a dataclass
    works) and keep it in ``layer.state[name]``: ``layer.state`` accepts nothing untyped.
    """

    #: tensor attributes that are not per row (left alone by batch reordering)
    shared: ClassVar[tuple[str, ...]] = ()

    def map_rows(self, fn) -> None:
        for name, val in list(vars(self).items()):
            if torch.is_tensor(val) and val.dim() > 0 and name not in self.shared:
                setattr(self, name, fn(val))

    def nbytes(self, device: str | torch.device | None = None) -> int:
        return tensor_bytes([v for v in vars(self).values() if torch.is_tensor(v)], device)


def tensor_bytes(tensors: list[torch.Tensor], device: str | torch.device | None = None) -> int:
    """Bytes of ``tensors`` (only those on ``device``'s type, when given)."""
    kind = None if device is None else torch.device(device).type
    return sum(t.numel() * t.element_size() for t in tensors if kind is None or t.device.type == kind)


class KVCache(Cache):
    """A ``transformers.Cache`` whose layers are slot tables driven by a kvtools policy.

    Create one per generation (``patch.make_cache()``, or ``KVCache()`` and let the
    patched model size it on first use) and pass it as ``past_key_values=``::

        with kvtools.patch(model, "snapkv") as p:
            cache = p.make_cache()
            model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
            print(cache.nbytes())
    """

    def __init__(self, num_layers: int | None = None, quant: Any = None) -> None:
        #: how keys / values are stored: None (the model's dtype) or a kvtools.quant.QuantParams
        self.quant = quant
        super().__init__(layers=[self._new_layer() for _ in range(num_layers or 0)])
        self.step: Step | None = None
        #: tokens seen by the model through this cache (every layer, whatever it keeps; even a layer whose
        #: heads all live in a method's own store): HF derives positions from it
        self.seen = 0
        #: (model id, config) of the patch that first used this cache; another patch may not continue it
        self.owner: tuple[int, Any] | None = None

    def _new_layer(self) -> SlotLayer:
        if self.quant is None:
            return SlotLayer()
        from .quant import QuantizedSlotLayer  # kvtools.quant builds on this module

        return QuantizedSlotLayer(self.quant)

    def store(self, quant: Any) -> None:
        """Store keys / values as ``quant`` says (None: in the model's dtype); only an empty cache may change."""
        if quant == self.quant:
            return
        if self.seen:
            raise RuntimeError("a KVCache that holds tokens cannot change how it stores them")
        self.quant = quant
        self.layers = [self._new_layer() for _ in self.layers]

    def ensure_layers(self, num_layers: int) -> None:
        while len(self.layers) < num_layers:
            self.layers.append(self._new_layer())

    def layer(self, layer_idx: int) -> SlotLayer:
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (not slots kept): HF derives absolute positions from it."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.owner = None

    def nbytes(self, device: str | torch.device | None = None, offloaded: bool | None = None) -> int:
        """Bytes this cache holds (keys, values and slot metadata), optionally on one device type only;
        ``offloaded=True``: only what a method moved off the working set (retrieval's CPU store),
        ``False``: the resident rest."""
        return sum(layer.nbytes(device, offloaded) for layer in self.layers)

    def wait(self) -> None:
        """Block until the work a method started in the background for this cache is done (retrieval's index
        builds: until then its searches are exact and the builds share the CPU with the model)."""
        for layer in self.layers:
            for st in layer.state.values():
                if callable(getattr(st, "wait", None)):
                    st.wait()

    def slots(self) -> list[int]:
        """Slots held per (row, KV head), per layer."""
        return [layer.size for layer in self.layers]

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.layers)}, seen={self.get_seq_length()}, nbytes={self.nbytes()})"

