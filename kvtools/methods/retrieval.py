"""RetrievalAttention: CPU-offloaded KV searched through one FAISS index per (layer, row, KV head).

Prefill is dense. At the end of the first call that leaves a layer with more than ``n_sink + window``
real slots, every slot except the first ``n_sink`` real tokens and the last ``window`` moves to CPU
(the device table really shrinks) and gets indexed by inner product (``flat`` exact, ``hnsw``,
``ivf``). Index building runs in a background daemon thread; until an index is ready (and while a
store holds fewer than ``MIN_INDEX_KEYS`` keys) its queries are answered by exact search over the
same keys.

Every later call, one token (decode) or many (a second chat turn, a question after a document): the
new tokens join the device table; every query head attends to the device slots causally (a query
sees the slots up to its own stream index) with its log-sum-exp, and to the ``top_k`` keys its KV
head's index returns for it (one batched search per (row, KV head) for its g query heads x the new
tokens, exact attention over the retrieved keys on CPU); the two parts are merged by a stable LSE
merge. Everything on CPU is older than the call, so the CPU part needs no causal mask. When the
device table exceeds sink + window, the oldest non-sink slots leave it: with ``insert`` they are
added to the CPU store and the index (every token stays reachable exactly once), otherwise they are
dropped.

The CPU copies keep the model's dtype (bf16 halves them; converting to fp32 for the exact part is
lossless, so results do not change); the index holds its own fp32 copy, as FAISS needs.
``cache.nbytes(offloaded=True)`` counts every CPU byte a store holds: its buffers at full capacity,
the index (vectors, IVF ids and centroids, HNSW links) and keys queued for an index still building.

Query-trained IVF (``train_on: queries``): the centroids are trained on the prefill queries
and each key is filed under the query centroid it scores highest with. Measured on SmolLM2 at
8k (``kvtools bench-recall``) this is a negative result: recall@128 0.07 against 0.85 for
key-trained IVF (keys pile into a few lists). ``train_on: keys`` is the default;
``recall_at_k`` / ``kvtools bench-recall`` measure any index against exact attention.

Hot keys (``hot_keys: H``, the attention-aware option that works): decode queries are out of
distribution for an index built on keys, but they resemble the last prompt queries. At the end
of prefill the last ``hot_window`` prompt queries of each KV head's query heads score the
offloaded keys; the H keys with the largest summed attention become that head's hot set. Each
step the index's ``top_k`` results and the hot set are scored exactly by q.k and the best
``top_k`` distinct keys kept. Measured on SmolLM2 at 8k (``kvtools bench-recall``), recall@128
rises from 0.942 to 0.957 (hnsw) and 0.845 to 0.885 (ivf) with H = 256.

HNSW (``hnsw_space: l2-augmented``, the default) is an L2 graph over keys padded to equal norm
(:class:`AugmentedHNSW`): recall@128 0.94, against 0.53 for a graph built on inner product.

A cache holding these stores can be deep-copied or pickled (pending builds are waited for, indexes are
serialized), but not reordered: ``supports_reorder`` is False, so beam search is refused up front.
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field

from ..attention.masks import dense_mask, padding, visible
from ..attention.merge import attention_with_lse, merge_lse
from ..cache import RowState, SlotLayer, Step
from ..errors import KVToolsError
from ..params import StageParams
from .base import CachePolicy, DecodeMethod, LayerInfo
from .common import keep_first_last

_BOTH_STAGES = "goes in both stages (the cache offloads and indexes, decode searches it)"


class RetrievalParams(StageParams):
    """RetrievalAttention: after prefill all but sink + window slots move to CPU, one ANN index per
    (layer, row, KV head); each decode query attends to its retrieved top_k there plus the device slots."""

    method: Literal["retrieval"] = "retrieval"
    requires = {"decode": ("retrieval",)}
    requires_why = _BOTH_STAGES
    n_sink: int = Field(default=128, ge=0, description="first real tokens kept on the device")
    window: int = Field(default=512, ge=1, description="most recent tokens kept on the device")
    top_k: int = Field(default=256, ge=1, description="keys retrieved per query head per step")
    index: Literal["flat", "hnsw", "ivf"] = Field(default="hnsw", description="FAISS index (inner product)")
    hnsw_m: int = Field(default=32, ge=2, description="hnsw: neighbours per node")
    ef_construction: int = Field(default=64, ge=1, description="hnsw: build beam")
    ef_search: int = Field(default=128, ge=1, description="hnsw: search beam")
    hnsw_space: Literal["l2-augmented", "ip"] = Field(
        default="l2-augmented", description="hnsw: an L2 graph over keys given one extra coordinate so all have "
                                            "the same norm (exact reduction of inner-product search), or a graph "
                                            "built on inner product itself (navigates poorly: see docs/methods/retrieval.md)")
    nlist: int = Field(default=64, ge=1, description="ivf: clusters (capped by the keys available)")
    nprobe: int = Field(default=8, ge=1, description="ivf: clusters searched")
    train_on: Literal["keys", "queries"] = Field(
        default="keys", description="ivf: centroids from the keys, or from the prefill queries (keys filed by "
                                    "inner product: poor recall, see docs/methods/retrieval.md)")
    insert: bool = Field(default=True, description="tokens leaving the window are added to the index")
    slide: int = Field(
        default=64, ge=1, description="decode tokens the device window may run over before its oldest tokens "
                                      "move to the CPU store, all at once (1: every step, as the paper; more: "
                                      "fewer table rewrites and index inserts, and up to slide - 1 more recent "
                                      "tokens attended exactly)")
    hot_keys: int = Field(
        default=0, ge=0, description="attention-aware candidates: the offloaded keys the last hot_window prompt "
                                     "queries attend to most, scored exactly with the index's results each step "
                                     "(0: off)")
    hot_window: int = Field(default=256, ge=1, description="prompt queries (per query head) that pick the hot keys")


class RetrievalDecodeParams(StageParams):
    """Decode over a retrieval cache: device slots + retrieved CPU slots, merged by log-sum-exp."""

    method: Literal["retrieval"] = "retrieval"
    requires = {"cache": ("retrieval",)}
    requires_why = _BOTH_STAGES


#: a store searches exactly (no index) until it holds this many keys: an index built on a handful of
#: keys is no faster, and IVF centroids / the augmented-HNSW norm bound drawn from so few would be poor
MIN_INDEX_KEYS = 64

#: the growable CPU buffers grow by this factor (amortised O(1) inserts, at most 25% spare capacity)
GROWTH = 1.25

#: elements of one fp32 score block (device part: H x queries x slots; CPU part: queries x top_k x D):
#: long multi-token calls are processed in query blocks of about this size (128 MiB)
_BLOCK_ELEMS = 1 << 25


class _IndexBuilder:
    """Builds indexes one after another on a single daemon thread.

    Not a ``ThreadPoolExecutor``: its worker is joined at interpreter exit (``concurrent.futures``
    registers that hook), which finishes every queued build first, a minute after a short generate with
    many heads. Here, once exit begins, queued builds are cancelled rather than started, and exit waits
    only for the one build in progress (at most one index): leaving FAISS's native code running while
    the interpreter tears down aborts the process ("terminate called without an active exception").
    FAISS releases the GIL while it builds, so the main thread is not held meanwhile."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._busy = threading.Lock()  # held while a build runs
        self._thread = threading.Thread(target=self._run, name="kvtools-index", daemon=True)
        self._thread.start()

    def finish_current(self) -> None:
        """Block until the build in progress (if any) is done; no queued build starts after exit began."""
        with self._busy:
            pass

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        fut: Future = Future()
        self._jobs.put((fut, fn, args))
        return fut

    def _run(self) -> None:
        while True:
            fut, fn, args = self._jobs.get()
            if _EXITING.is_set():
                fut.cancel()
                continue
            with self._busy:
                if _EXITING.is_set():
                    fut.cancel()
                    continue
                if not fut.set_running_or_notify_cancel():
                    continue
                try:
                    fut.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the index
                    fut.set_exception(exc)


_POOL: _IndexBuilder | None = None
_POOL_LOCK = threading.Lock()
_EXITING = threading.Event()


@atexit.register
def _stop_building() -> None:
    _EXITING.set()
    if _POOL is not None:
        _POOL.finish_current()


def _pool() -> _IndexBuilder:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _IndexBuilder()
        return _POOL


def build_index(keys: np.ndarray, cfg: RetrievalParams, queries: np.ndarray | None = None):
    """A FAISS inner-product index over ``keys`` [N, D] (float32) as ``cfg`` asks."""
    import faiss

    n, d = keys.shape
    if cfg.index == "flat" or n == 0:
        index = faiss.IndexFlatIP(d)
    elif cfg.index == "hnsw" and cfg.hnsw_space == "l2-augmented":
        return AugmentedHNSW(keys, cfg)
    elif cfg.index == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
    else:
        use_q = cfg.train_on == "queries" and queries is not None and len(queries) >= 39
        train = queries if use_q else keys
        nlist = max(1, min(cfg.nlist, len(train) // 39))  # FAISS wants >= 39 training points per centroid
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(train, dtype=np.float32))
        index.nprobe = min(cfg.nprobe, nlist)
    if n:
        index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return index


def index_nbytes(index: Any) -> int:
    """CPU bytes an index holds, from its sizes (no copy): the stored vectors, plus IVF list ids and
    centroids, plus HNSW links and levels. Matches ``faiss.serialize_index``'s size up to its headers;
    unknown index types are measured by serializing them."""
    import faiss

    if isinstance(index, AugmentedHNSW):
        return index_nbytes(index.index)
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexFlatCodes):
        return int(index.ntotal) * int(index.code_size)
    if isinstance(index, faiss.IndexHNSW):
        h = index.hnsw
        links = (h.neighbors.size() + h.levels.size() + h.cum_nneighbor_per_level.size()) * 4
        return index_nbytes(index.storage) + links + (h.offsets.size() + h.assign_probas.size()) * 8
    if isinstance(index, faiss.IndexIVF) and isinstance(index.invlists, faiss.ArrayInvertedLists):
        return index_nbytes(index.quantizer) + int(index.ntotal) * (int(index.code_size) + 8)
    return int(faiss.serialize_index(index).nbytes)


def _serialize(index: Any) -> Any:
    """A picklable form of an index (FAISS objects are SWIG pointers)."""
    import faiss

    return index if isinstance(index, AugmentedHNSW) else faiss.serialize_index(index)


def _deserialize(state: Any) -> Any:
    import faiss

    return faiss.deserialize_index(state) if isinstance(state, np.ndarray) else state


class AugmentedHNSW:
    """Inner-product search through an L2 HNSW graph: each key k gets one more coordinate
    sqrt(M^2 - |k|^2) so every key has norm M, and a query gets 0 there; then
    |q' - k'|^2 = |q|^2 + M^2 - 2 q.k, so the nearest keys are exactly the largest inner products
    (the MIPS-to-NN reduction). A graph built on raw inner products navigates poorly (not a metric).
    M is 1.2x the largest norm at build time; a later key with a larger norm gets 0 (its ranking is
    then approximate). Same ``add`` / ``search`` as a FAISS index."""

    HEADROOM = 1.2

    def __init__(self, keys: np.ndarray, cfg: RetrievalParams) -> None:
        import faiss

        d = keys.shape[1]
        self.m2 = float((np.linalg.norm(keys, axis=1).max() * self.HEADROOM) ** 2) if len(keys) else 1.0
        self.index = faiss.IndexHNSWFlat(d + 1, cfg.hnsw_m)
        self.index.hnsw.efConstruction = cfg.ef_construction
        self.index.hnsw.efSearch = cfg.ef_search
        self.add(keys)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            extra = np.sqrt(np.maximum(self.m2 - (keys.astype(np.float64) ** 2).sum(1), 0.0))
            self.index.add(np.ascontiguousarray(np.concatenate([keys, extra[:, None]], 1), dtype=np.float32))

    def search(self, q: np.ndarray, k: int):
        qx = np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), q.dtype)], 1), dtype=np.float32)
        return self.index.search(qx, k)

    def __getstate__(self) -> dict[str, Any]:
        return {"m2": self.m2, "index": _serialize(self.index)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.m2 = state["m2"]
        self.index = _deserialize(state["index"])


#: FAISS parallelises a search over its queries (OpenMP); a decode step searches each head with its g query
#: heads only, where the threads cost far more than they share out (a 3-query HNSW search: 4 ms for three
#: heads on one thread, 35 ms on two while the other core was busy). Fewer queries than this search on one.
_PARALLEL_QUERIES = 64


@contextlib.contextmanager
def _search_threads(n_queries: int):
    """FAISS's OpenMP threads for a search of ``n_queries`` queries from this thread: one for a few queries.
    OpenMP's thread count is per calling thread, so the background index builds keep theirs."""
    import faiss

    if n_queries >= _PARALLEL_QUERIES:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class HeadStore:
    """One (row, KV head)'s offloaded keys/values (CPU, growable, in the model's dtype) and its index.

    The index is built in the background once the store holds ``MIN_INDEX_KEYS`` keys; keys inserted
    while it builds are queued and added when it is ready. Deep copies and pickles wait for the build
    and carry the index serialized."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, idx: torch.Tensor, cfg: RetrievalParams,
                 queries: torch.Tensor | None, hot: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        self.hot = hot  # store positions always scored with the index's results (attention-aware)
        n = keys.shape[0]  # exactly as large as the bulk offload: the buffers grow on insert
        self.keys = torch.empty(n, keys.shape[1], dtype=keys.dtype)
        self.values = torch.empty(n, values.shape[1], dtype=values.dtype)
        self.idx = torch.empty(n, dtype=torch.long)
        self.n = 0
        self._put(keys, values, idx)
        self._queries = None if queries is None else queries.float().numpy()  # IVF training, until built
        self._index = None
        self._future: Future | None = None
        self._snapshot: np.ndarray | None = None  # the keys handed to the build in progress
        self._pending: list[np.ndarray] = []  # keys inserted while the index was still building
        if self.n >= MIN_INDEX_KEYS:
            self._build()

    def _build(self) -> None:
        self._snapshot = self.keys[: self.n].to(torch.float32, copy=True).numpy()
        q, self._queries = self._queries, None
        self._future = _pool().submit(build_index, self._snapshot, self.cfg, q)

    def _put(self, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
        m = k.shape[0]
        if self.n + m > self.keys.shape[0]:
            cap = max(int(GROWTH * self.keys.shape[0]) + 16, self.n + m)
            for name in ("keys", "values", "idx"):
                old = getattr(self, name)
                new = old.new_empty(cap, *old.shape[1:])
                new[: self.n] = old[: self.n]
                setattr(self, name, new)
        self.keys[self.n: self.n + m] = k.to(self.keys.dtype).cpu()
        self.values[self.n: self.n + m] = v.to(self.values.dtype).cpu()
        self.idx[self.n: self.n + m] = idx.cpu()
        self.n += m

    @property
    def index(self):
        if self._index is None and self._future is not None and self._future.done():
            self._index = self._future.result()
            self._future = self._snapshot = None
            for k in self._pending:
                self._index.add(k)
            self._pending.clear()
        return self._index

    def insert(self, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> None:
        self._put(k, v, idx)
        if self._index is None and self._future is None:  # no index yet: build one once there are enough keys
            if self.n >= MIN_INDEX_KEYS:
                self._build()
            return
        arr = np.ascontiguousarray(k.float().cpu().numpy())
        if self.index is not None:
            self.index.add(arr)
        else:
            self._pending.append(arr)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """Ids [g, k] of the top-k keys for each query (-1: none); exact until the index is built."""
        if self.n == 0:
            return np.full((q.shape[0], k), -1, dtype=np.int64)
        index = self.index
        if index is None:  # no index (yet): exact search over the same keys
            s = torch.from_numpy(q) @ self.keys[: self.n].float().T
            kk = min(k, self.n)
            ids = torch.topk(s, kk, dim=-1).indices.numpy()
            return np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        with _search_threads(q.shape[0]):
            ids = index.search(q, k)[1]
        if self.hot is not None and len(self.hot):
            ids = rerank(ids, self.hot, q, self.keys[: self.n], k)
        return ids

    def attention(self, q: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact attention of queries q [Q, D] (CPU) over each one's ``k`` retrieved keys: (out [Q, Dv],
        lse [Q]) fp32; a query with nothing retrieved gets out 0, lse -inf (:func:`attend_stores` for one
        store)."""
        out, lse = attend_stores([self], q[None], k, scale)
        return out[0], lse[0]

    def wait(self) -> None:
        _ = self._future.result() if self._future is not None else None
        _ = self.index

    def nbytes(self) -> int:
        """CPU bytes held: the buffers at full capacity, the hot set, the index, and what waits for it (keys
        queued during a build, the build's input copy, IVF training queries)."""
        total = sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.idx))
        total += 0 if self.hot is None else self.hot.numel() * self.hot.element_size()
        total += sum(a.nbytes for a in self._pending)
        total += sum(a.nbytes for a in (self._snapshot, self._queries) if a is not None)
        index = self.index
        return total + (0 if index is None else index_nbytes(index))

    def __getstate__(self) -> dict[str, Any]:
        self.wait()
        state = dict(self.__dict__)
        state["_future"] = None
        if self._index is not None:
            state["_index"] = _serialize(self._index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._index is not None:
            self._index = _deserialize(self._index)


class OffloadStore:
    """A layer's CPU side: a :class:`HeadStore` per (row, KV head)."""

    offloaded = True  # counted by KVCache.nbytes(offloaded=True)

    def __init__(self, heads: list[list[HeadStore]]) -> None:
        self.heads = heads

    def nbytes(self, device: str | torch.device | None = None) -> int:
        if device is not None and torch.device(device).type != "cpu":
            return 0
        return sum(h.nbytes() for row in self.heads for h in row)

    def map_rows(self, fn) -> None:
        raise KVToolsError("the retrieval cache keeps per-row CPU indexes and does not support beam search or "
                           "reordering batch rows")

    def wait(self) -> None:
        for row in self.heads:
            for h in row:
                h.wait()


@contextlib.contextmanager
def _one_torch_thread():
    """torch on one thread for a retrieval step's attention on the CPU (the CPU stores' part always; the
    device part too when the device is the CPU): its ops are small (g query heads over a few hundred keys),
    and sharing each one out over OpenMP threads costs more than it saves, the more so between FAISS calls
    (SmolLM2 shape at 16k, 4 layers, 2 cores: 32.8 -> 28.8 ms/token for the stores' part, a further ~1.5 ms
    for the device part). Process-wide (``torch.set_num_threads``), restored on exit."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_SEARCHERS: Any = None  # (pool, its workers): threads that search stores beside the calling one, made on first use


def _search_stores(stores: list[HeadStore], q: torch.Tensor, k: int, threads: int) -> torch.Tensor:
    """Ids [n, Q, k] of each store's top-``k`` keys for its queries q[i] (-1: none). A few queries per store
    (a decode step) search on one FAISS thread each (:func:`_search_threads`), so the stores are shared out
    over ``threads`` threads instead, the calling one included (FAISS releases the GIL while it searches): a
    layer's KV heads search side by side (random SmolLM2 shape, 6 layers at 32k, 2 cores: ~10% off a decode
    step; splitting a store's queries between threads as well measured no faster than one thread). Many
    queries per store search one store at a time, each on FAISS's own threads."""
    n = len(stores)
    qs = q.numpy()
    ids = np.empty((n, q.shape[1], k), dtype=np.int64)  # numpy: workers run outside the caller's inference mode

    def run(part: range) -> None:
        for i in part:
            ids[i] = stores[i].search(np.ascontiguousarray(qs[i]), k)

    if threads < 2 or n < 2 or q.shape[1] >= _PARALLEL_QUERIES:
        run(range(n))
        return torch.from_numpy(ids)
    global _SEARCHERS
    # a smaller pool is replaced, not shut down, since another caller may still hold it; its idle threads
    # end once it is collected
    with _POOL_LOCK:
        if _SEARCHERS is None or _SEARCHERS[1] < threads - 1:
            from concurrent.futures import ThreadPoolExecutor

            _SEARCHERS = (ThreadPoolExecutor(threads - 1, thread_name_prefix="kvtools-search"), threads - 1)
        pool = _SEARCHERS[0]
    parts = [range(t, n, threads) for t in range(min(threads, n))]
    futs = [pool.submit(run, part) for part in parts[1:]]
    run(parts[0])
    for fut in futs:
        fut.result()
    return torch.from_numpy(ids)


def attend_stores(stores: list[HeadStore], q: torch.Tensor, k: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each store's queries q [n, Q, D] (CPU; q[i] for ``stores[i]``) over each query's
    ``k`` retrieved keys -> (out [n, Q, Dv], lse [n, Q]) fp32; a query with nothing retrieved gets out 0,
    lse -inf. One search per store for its Q queries; then every query's own keys are gathered into one
    batch over all stores and attended in one product, in blocks of queries whose gathered keys fit
    ``_BLOCK_ELEMS`` (a decode step, a layer's KV heads x g query heads x top_k, is one block; a long
    multi-token call is several). Gathering the g query heads' ids as they are, overlaps included, measured
    faster than deduplicating them first (``torch.unique`` cost more than the rows it saved)."""
    q = q.float()
    n, nq = len(stores), q.shape[1]
    dk, dv = stores[0].keys.shape[1], stores[0].values.shape[1]
    out, lse = torch.zeros(n, nq, dv), torch.full((n, nq), float("-inf"))
    blk = max(1, _BLOCK_ELEMS // (n * k * max(dk, dv)))
    threads = torch.get_num_threads()
    with _one_torch_thread():
        ids = _search_stores(stores, q, k, threads)  # [n, Q, k], -1: none
        for s in range(0, nq, blk):
            got = ids[:, s: s + blk]
            b = got.shape[1]
            keys = stores[0].keys.new_zeros(n, b * k, dk)
            values = stores[0].values.new_zeros(n, b * k, dv)
            for i, st in enumerate(stores):
                if st.n:  # an empty store retrieved nothing (ids -1): its queries stay masked
                    safe = got[i].reshape(-1).clamp_min(0)
                    torch.index_select(st.keys, 0, safe, out=keys[i])
                    torch.index_select(st.values, 0, safe, out=values[i])
            o, l_ = attention_with_lse(q[:, s: s + blk, None], keys.view(n, b, k, dk), values.view(n, b, k, dv),
                                       (got >= 0)[:, :, None], scale)
            out[:, s: s + blk], lse[:, s: s + blk] = o[:, :, 0], l_[:, :, 0]
    return out, lse


@dataclass
class TrainQueries(RowState):
    """Prompt queries kept (on the CPU) until the offload, to train IVF centroids on (``train_on: queries``)."""

    q: torch.Tensor  # [B, H, n, D]


class RetrievalPolicy(CachePolicy):
    name = "retrieval"
    params = RetrievalParams
    cfg: RetrievalParams

    #: per-row CPU indexes cannot follow beam reordering: ``generate(num_beams > 1)`` is refused up front
    supports_reorder = False

    def attend(self, layer: SlotLayer, q, k, v, step: Step, info: LayerInfo):
        store: OffloadStore | None = layer.state.get("offload")
        if store is None:  # nothing offloaded yet: the device table holds every token, dense is exact
            if step.is_prefill:  # keep some prefill queries for attention-aware IVF training
                self._keep_queries(layer, q, step)
            out = super().attend(layer, q, k, v, step, info)
            if step.end_of_prompt and info.sliding_window is None and self._over(layer):
                self._offload(layer, info, q[:, :, -self.cfg.hot_window:] if self.cfg.hot_keys else None)
            return out
        # offloaded: any call (one decode token or a multi-token turn) needs the device and the CPU parts
        layer.append(k, v, step)
        with _one_torch_thread() if q.device.type == "cpu" else contextlib.nullcontext():
            out = self._attend_split(layer, store, q, step, info)
        self._slide(layer, store, step)
        return out

    def _over(self, layer: SlotLayer, slack: int = 0) -> bool:
        """Some (row, KV head) holds more real slots than sink + window (+ ``slack``)."""
        return layer.valid is not None and int(layer.valid.sum(-1).max()) > self.cfg.n_sink + self.cfg.window + slack

    # ------------------------------------------------------------ first overflow: offload + index
    def _keep_queries(self, layer: SlotLayer, q: torch.Tensor, step: Step) -> None:
        if self.cfg.index != "ivf" or self.cfg.train_on != "queries":
            return
        every = max(1, q.shape[2] // 2048)
        new = q[:, :, ::every].float().cpu()
        kept: TrainQueries | None = layer.state.get("train_q")
        layer.state["train_q"] = TrainQueries(new if kept is None else torch.cat([kept.q, new], dim=2))

    def _device_slots(self, layer: SlotLayer) -> torch.Tensor:
        """[B, Hk, S]: the slots that stay on the device, the first n_sink and the last window real ones."""
        return keep_first_last(layer.valid, self.cfg.n_sink, self.cfg.window)

    def _offload(self, layer: SlotLayer, info: LayerInfo, last_q: torch.Tensor | None = None) -> None:
        """Move all but the device slots to CPU stores; ``last_q`` [B, H, n, D]: the call's last queries,
        which pick each head's hot keys when ``hot_keys`` is set."""
        cfg = self.cfg
        device_keep = self._device_slots(layer)
        move = layer.valid & ~device_keep
        train_q: TrainQueries | None = layer.state.pop("train_q", None)
        tq = None if train_q is None else train_q.q  # [B, H, n, D]
        b, hk = layer.valid.shape[:2]
        g = None if tq is None else tq.shape[1] // hk
        heads = []
        for r in range(b):
            row = []
            for h in range(hk):
                sel = move[r, h]
                queries = None if tq is None else tq[r, h * g:(h + 1) * g].reshape(-1, tq.shape[-1])
                keys = layer.keys[r, h, sel]
                hot = None
                if last_q is not None:
                    gq = last_q.shape[1] // hk
                    hot = hot_set(last_q[r, h * gq:(h + 1) * gq].reshape(-1, last_q.shape[-1]).cpu(), keys.cpu(),
                                  info.scale, cfg.hot_keys)
                row.append(HeadStore(keys, layer.values[r, h, sel], layer.idx[r, h, sel], cfg, queries, hot))
            heads.append(row)
        layer.state["offload"] = OffloadStore(heads)
        layer.keep(device_keep)

    # ------------------------------------------------------------ every later call
    def _attend_split(self, layer: SlotLayer, store: OffloadStore, q: torch.Tensor, step: Step, info: LayerInfo):
        """Attention of the call's queries q [B, H, Lq, D] over the device slots (causal by stream index; the
        table already holds the call's own keys) and the CPU stores, merged by log-sum-exp; long calls in
        blocks of queries."""
        b, h, lq, d = q.shape
        hk = layer.keys.shape[1]
        g = h // hk
        qg = q.view(b, hk, g, lq, d)
        q_idx = step.idx.to(layer.idx.device)
        rule = visible(real=padding(layer.valid), q_pos=q_idx, k_pos=layer.idx)  # a query always sees its own key
        slots = torch.arange(layer.size, device=q_idx.device)
        blk = max(1, _BLOCK_ELEMS // (b * h * max(1, layer.size)))
        outs = []
        for s in range(0, lq, blk):
            e = min(s + blk, lq)
            ok = dense_mask(rule, b, hk, torch.arange(s, e, device=q_idx.device), slots)[:, :, None]  # [B,Hk,1,Lb,S]
            out_d, lse_d = attention_with_lse(qg[:, :, :, s:e], layer.keys[:, :, None], layer.values[:, :, None],
                                              ok, info.scale)
            out_c, lse_c = self._attend_cpu(store, qg[:, :, :, s:e], info)
            out, _ = merge_lse(out_d, lse_d, out_c.to(q.device), lse_c.to(q.device))
            outs.append(out)
        return torch.cat(outs, dim=3).reshape(b, h, lq, -1).to(q.dtype)

    def _attend_cpu(self, store: OffloadStore, qg: torch.Tensor, info: LayerInfo):
        """qg [B, Hk, g, Lq, D] over the CPU stores: one batched search per (row, KV head) for its g x Lq
        queries -> (out [B, Hk, g, Lq, Dv], lse [B, Hk, g, Lq]) on CPU, fp32."""
        b, hk, g, lq, d = qg.shape
        qc = qg.float().cpu().reshape(b * hk, g * lq, d)
        out, lse = attend_stores([h for row in store.heads for h in row], qc, self.cfg.top_k, info.scale)
        return out.view(b, hk, g, lq, -1), lse.view(b, hk, g, lq)

    def _slide(self, layer: SlotLayer, store: OffloadStore, step: Step) -> None:
        """Move the tokens past sink + window to the CPU store: after a multi-token call, or once ``slide``
        decode tokens have gathered."""
        cfg = self.cfg
        if not self._over(layer, 0 if step.is_prefill else cfg.slide - 1):
            return
        keep = self._device_slots(layer)
        leave = layer.valid & ~keep
        if cfg.insert:
            b, hk = leave.shape[:2]
            for r in range(b):
                for kh in range(hk):
                    sel = leave[r, kh]
                    if bool(sel.any()):
                        store.heads[r][kh].insert(layer.keys[r, kh, sel], layer.values[r, kh, sel],
                                                  layer.idx[r, kh, sel])
        layer.keep(keep)


class RetrievalDecodeMethod(DecodeMethod):
    """Decode over the retrieval cache: its policy attends to the device slots and the retrieved CPU slots."""

    name = "retrieval"
    params = RetrievalDecodeParams
    builtin = True


def hot_set(queries: torch.Tensor, keys: torch.Tensor, scale: float, n: int) -> torch.Tensor:
    """Ids of the ``n`` keys [N, D] with the largest attention summed over ``queries`` [Q, D] (softmax over
    these keys per query): the keys the end of the prompt attends to."""
    if n <= 0 or keys.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    p = torch.softmax(queries.float() @ keys.float().T * scale, dim=-1).sum(0)
    return torch.topk(p, min(n, keys.shape[0])).indices


def rerank(ids: np.ndarray, hot: torch.Tensor, q: np.ndarray, keys: torch.Tensor, k: int) -> np.ndarray:
    """The best ``k`` distinct ids by exact q.k among each query's ``ids`` [Q, k'] (-1: none) and ``hot``."""
    cand = torch.cat([torch.from_numpy(ids).long(), hot[None].expand(ids.shape[0], -1)], 1)  # [Q, C]
    s = (torch.from_numpy(q)[:, None, :] * keys[cand.clamp_min(0)].float()).sum(-1)
    srt, order = torch.sort(cand, dim=1)
    dup = torch.zeros_like(cand, dtype=torch.bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    repeat = torch.zeros_like(dup).scatter_(1, order, dup)  # a later copy of an id already present
    s = s.masked_fill((cand < 0) | repeat, float("-inf"))
    kk = min(k, cand.shape[1])
    best, pick = torch.topk(s, kk, dim=1)
    out = torch.gather(cand, 1, pick).masked_fill(best == float("-inf"), -1)
    return np.pad(out.numpy(), ((0, 0), (0, k - kk)), constant_values=-1)


def recall_at_k(store: HeadStore, queries: torch.Tensor, k: int) -> float:
    """Fraction of each query's exact top-k keys (by q.k over the store) that the index returns."""
    store.wait()
    q = np.ascontiguousarray(queries.float().numpy())
    got = store.search(q, k)
    exact = torch.topk(torch.from_numpy(q) @ store.keys[: store.n].float().T, min(k, store.n), dim=-1).indices.numpy()
    return topk_hits(got, exact) / exact.size


def topk_hits(found, exact) -> int:
    """How many ids of each row of ``exact`` [Q, k] appear in the same row of ``found`` [Q, >= k]."""
    return sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact))


__all__: list[Any] = ["MIN_INDEX_KEYS", "AugmentedHNSW", "RetrievalPolicy", "HeadStore", "OffloadStore", "attend_stores",
                      "build_index",
                      "hot_set", "index_nbytes", "recall_at_k", "rerank", "topk_hits"]
