"""FAISS index backends behind one small interface (DESIGN §5).

Three kinds, all inner product over the unit-norm hybrid vectors of ``index.embedding``:

* ``"exact"``: ``IDMap2,Flat``. Brute force; the reference every recall figure is measured
  against, the right choice while the library is small, and the serving layer's delta.
* ``"hnsw"``: ``IDMap2,HNSW{M}`` with efConstruction >= 80 (FAISS's default of 40 costs recall
  that efSearch then has to buy back). Best latency at a given recall; **cannot remove**: deleted
  and superseded ids are the serving layer's tombstones (ID selectors or over-fetch and filter).
* ``"ivf"``: ``IVF{nlist},Flat`` with ``nlist`` from the size (``nlist_for``), trained on the
  data it is built from; supports ``remove`` (a scan of the lists).

``choose_backend`` picks a kind by size; the thresholds are arguments so the store's config owns
them.

Threading (FAISS's rules, research/index-anchors.md §1): concurrent ``search`` calls on an
unchanging index are safe, and FAISS releases the GIL inside ``search``, ``add`` and ``train``, so
Python threads really run in parallel there. ``add``, ``remove`` and ``set_search_params`` change
the index and need mutual exclusion against every other call; this module takes no lock, the
serving layer does. Per-call ``params=`` to ``search`` change nothing shared, so readers that
want a different efSearch/nprobe use them instead of ``set_search_params``.

``build(..., threads=n)`` limits FAISS's OpenMP threads for the build. ``omp_set_num_threads``
sets the calling thread's own setting (each external thread gets its own OpenMP pool), so a
builder thread limited this way does not starve the query threads of the same process.

FAISS errors cross into xpstore at one place, :func:`faiss_errors` (as LMDB's do in
``persistence.lmdb_tables``): every call into ``faiss`` that can raise runs inside it, and a
failure becomes a ``StoreCorruptionError`` naming the file when FAISS was reading damaged data, an
``InvalidArgumentError`` naming the argument when FAISS refused a plain argument (an ``ef_search``
too large for its ``int``), else an ``XpStoreError``; always ``raise ... from``, so the FAISS
exception stays attached as ``__cause__``. The serving layer and the builder reach FAISS only
through this module (``IndexBackend.search(exclude=...)``, ``ids``, ``reconstruct``,
``exact_knn``).

Persistence (``save``, ``load``, ``read_meta``) is :mod:`xpstore.index.index_file`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, cast

import faiss as _faiss
import numpy as np
import numpy.typing as npt

from xpstore.errors import (
    InvalidArgumentError,
    RemoveUnsupportedError,
    StoreCorruptionError,
    XpStoreError,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_EXACT_BELOW",
    "DEFAULT_HNSW_BELOW",
    "DEFAULT_HNSW_M",
    "DEFAULT_NPROBE",
    "KINDS",
    "MIN_EF_CONSTRUCTION",
    "BackendKind",
    "ExactBackend",
    "Exclusion",
    "HNSWBackend",
    "IVFBackend",
    "IndexBackend",
    "QuantizedCopy",
    "RemoveUnsupportedError",
    "build",
    "choose_backend",
    "corrupt_index_file",
    "exact_knn",
    "exclusion",
    "faiss_errors",
    "faiss_threads",
    "nlist_for",
]

log = logging.getLogger(__name__)
faiss: Any = _faiss
"""FAISS is untyped at this boundary (its partial stubs disagree with the runtime)."""

F32Array = npt.NDArray[np.float32]
I64Array = npt.NDArray[np.int64]
BackendKind = Literal["exact", "hnsw", "ivf"]

KINDS: Final[tuple[BackendKind, ...]] = ("exact", "hnsw", "ivf")
DEFAULT_EXACT_BELOW: Final = 10_000
"""Brute force below this many vectors (Milvus uses the same 10,000; a flat scan of 10k x 25
float32 takes well under a millisecond)."""
DEFAULT_HNSW_BELOW: Final = 2_000_000
"""HNSW up to this size (best recall per microsecond in research §5), IVF beyond (faster to
build and about half the memory per vector)."""
DEFAULT_HNSW_M: Final = 32
MIN_EF_CONSTRUCTION: Final = 80
DEFAULT_EF_CONSTRUCTION: Final = 128
DEFAULT_EF_SEARCH: Final = 64
DEFAULT_NPROBE: Final = 32
_NLIST_PER_SQRT: Final = 4
_MIN_POINTS_PER_CENTROID: Final = 39
"""FAISS's k-means warns below 39 training points per centroid; ``nlist_for`` stays above."""
_MAX_NLIST: Final = 65_536



# --------------------------------------------------------------------------- the FAISS boundary

_FAISS_ERRORS: Final = (
    RuntimeError,  # a C++ exception (FaissException, std::exception): bad data, bad state, I/O
    TypeError,  # SWIG: an argument of the wrong type; also a deserialized index of the wrong type
    ArithmeticError,  # SWIG: OverflowError, a value out of range for its C++ int / size_t
    ValueError,
    AttributeError,  # an index object without the attribute its kind should have
    AssertionError,  # FAISS's Python wrappers check shapes with assert
)
"""What a call into FAISS raises. ``MemoryError`` is not among them: running out of memory is
not a FAISS failure, and is left to propagate as itself."""


@contextmanager
def faiss_errors(
    what: str, *, argument: str | None = None, damaged: Path | None = None
) -> Iterator[None]:
    """Run calls into FAISS; translate what they raise into the xpstore tree (``raise ... from``).

    ``damaged``: FAISS is reading data from that file, so a failure means damage
    (``StoreCorruptionError`` naming it). ``argument``: FAISS is taking the plain argument of that
    name, so a failure means FAISS refused it (``InvalidArgumentError`` with ``field=argument``).
    Neither: ``XpStoreError``. An xpstore error raised inside passes through unchanged. Keep the
    block to the FAISS calls themselves, so a bug of ours is not reported as a FAISS failure.
    """
    try:
        yield
    except XpStoreError:
        raise
    except _FAISS_ERRORS as exc:
        detail = f"{type(exc).__name__}: {exc}"
        if damaged is not None:
            raise corrupt_index_file(damaged, f"{what}: {detail}") from exc
        if argument is not None:
            raise InvalidArgumentError(
                f"{argument}: FAISS refused it ({what}): {detail}", field=argument
            ) from exc
        raise XpStoreError(f"FAISS error ({what}): {detail}") from exc


def corrupt_index_file(path: Path, what: str) -> StoreCorruptionError:
    """The error for a damaged index file (``index_file`` and the FAISS boundary share it)."""
    return StoreCorruptionError(f"index file {path}: {what}; rebuild the index from the store")


# --------------------------------------------------------------------------- validation


def _check_ids(ids: npt.ArrayLike) -> I64Array:
    """A 1-D int64 array of distinct non-negative ids (-1 is FAISS's 'no result')."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidArgumentError(f"ids must be 1-D, got shape {arr.shape}", field="ids")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(f"ids must be integers, got dtype {arr.dtype}", field="ids")
    out = np.ascontiguousarray(arr, dtype=np.int64)
    if out.size and int(out.min()) < 0:
        raise InvalidArgumentError("ids must be >= 0 (-1 means 'no result')", field="ids")
    if np.unique(out).size != out.size:
        raise InvalidArgumentError("ids contain duplicates", field="ids")
    return out


def _check_vectors(vectors: npt.ArrayLike, dim: int, *, allow_1d: bool) -> F32Array:
    """A C-contiguous ``(n, dim)`` float32 array of finite values."""
    arr = np.asarray(vectors)
    if allow_1d and arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise InvalidArgumentError(
            f"vector must have dimension {dim}, got shape {arr.shape}", field="vector"
        )
    if arr.size and not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidArgumentError(f"vector must be numeric, got dtype {arr.dtype}", field="vector")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidArgumentError("vector contains NaN or infinity", field="vector")
    return out


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}", field=name)
    return int(value)


def _check_dim(dim: object) -> int:
    return _check_positive_int(dim, "dim")


@contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """Limit FAISS's OpenMP threads in the calling thread for the block (None: leave as is)."""
    if threads is None:
        yield
        return
    n = _check_positive_int(threads, "threads")
    with faiss_errors("setting FAISS's OpenMP threads", argument="threads"):
        previous = int(faiss.omp_get_max_threads())
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        with faiss_errors("restoring FAISS's OpenMP threads"):
            faiss.omp_set_num_threads(previous)
        _omp.threads = None  # query_threads sets it again at the next single query


_omp = threading.local()


_SWIG_PTR: Any = getattr(
    faiss.swig_ptr.__globals__.get("_swigfaiss"), "swig_ptr", faiss.swig_ptr
)
"""FAISS's C-level ``swig_ptr`` when its Python wrapper exposes it (the wrapper adds a Python
call to each of a single query's three pointers), else the wrapper itself."""


def query_threads(threads: int | None) -> None:
    """Set FAISS's OpenMP threads for the calling thread's single-query searches, calling
    FAISS only when the thread's setting changes (``faiss_threads`` on and off cost every
    query a few µs). None: leave it as it is."""
    if threads is None or getattr(_omp, "threads", None) == threads:
        return
    n = _check_positive_int(threads, "threads")
    with faiss_errors("setting FAISS's OpenMP threads", argument="threads"):
        faiss.omp_set_num_threads(n)
    _omp.threads = n


# --------------------------------------------------------------------------- backends


@dataclass(frozen=True, eq=False)
class Exclusion:
    """A FAISS ID selector that rejects a set of ids (the serving layer's tombstones), for
    ``IndexBackend.search(exclude=...)``. Holds every part FAISS points into, so none is freed
    while a search uses it. Built by :func:`exclusion`; immutable, so searches may share one."""

    selector: Any
    _parts: tuple[Any, ...]


def exclusion(ids: npt.ArrayLike) -> Exclusion:
    """An :class:`Exclusion` of ``ids`` (FAISS's ``IDSelectorNot(IDSelectorBatch(ids))``).

    Duplicates are harmless here, so unlike ``add`` this does not sort ``ids`` to look for them
    (the serving layer rebuilds the selector after every change of its tombstones)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgumentError(
            f"ids must be a 1-D array of integers, got shape {arr.shape}, dtype {arr.dtype}",
            field="ids",
        )
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    with faiss_errors("building an ID selector"):
        batch = faiss.IDSelectorBatch(arr)
        selector = faiss.IDSelectorNot(batch)
    return Exclusion(selector, (batch, arr))


def exact_knn(queries: npt.ArrayLike, base: npt.ArrayLike, k: int) -> I64Array:
    """Positions in ``base`` of each query's ``k`` best inner products, by brute force (the
    truth a build's recall probe is measured against); -1 pads when ``base`` is smaller."""
    kk = _check_positive_int(k, "k")
    b = np.asarray(base)
    if b.ndim != 2:
        raise InvalidArgumentError(f"base must be 2-D (n, dim), got shape {b.shape}", field="base")
    vec = _check_vectors(b, int(b.shape[1]), allow_1d=False)
    q = _check_vectors(queries, vec.shape[1], allow_1d=True)
    with faiss_errors("exact k-NN"):
        _, positions = faiss.knn(q, vec, kk, metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(positions, dtype=np.int64)


class IndexBackend(ABC):
    """One FAISS index searched by inner product, with int64 ids chosen by the caller.

    Not thread-safe for mutation: see the module docstring for what needs a lock.
    """

    kind: ClassVar[BackendKind]
    _search_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, index: Any, dim: int, params: Mapping[str, Any]) -> None:
        self._index: Any = index
        self._dim = dim
        self._params: dict[str, Any] = dict(params)
        self._one_cache: dict[tuple[tuple[str, int], ...], Any] = {}
        self._positional: Any = None  # the index under the id map, at its first search

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def params(self) -> dict[str, Any]:
        """Build and search parameters (JSON-safe; persisted with the index)."""
        return dict(self._params)

    @property
    def faiss_index(self) -> Any:
        """The raw FAISS index (benchmarks compare against it; do not mutate it unlocked)."""
        return self._index

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self._dim}, count={len(self)}, params={self._params})"

    def add(self, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n,). Ids must be distinct within the call;
        uniqueness against ids already present is the caller's job (FAISS keeps both)."""
        id_arr = _check_ids(ids)
        vec = _check_vectors(vectors, self._dim, allow_1d=False)
        if id_arr.shape[0] != vec.shape[0]:
            raise InvalidArgumentError(
                f"{id_arr.shape[0]} ids for {vec.shape[0]} vectors", field="ids"
            )
        if id_arr.size:
            with faiss_errors(f"adding {id_arr.size} vectors to the {self.kind} index"):
                self._index.add_with_ids(vec, id_arr)

    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        *,
        params: Mapping[str, int] | None = None,
        exclude: Exclusion | None = None,
    ) -> tuple[F32Array, I64Array]:
        """The ``k`` best inner products per query: ``(scores, ids)``, each ``(nq, k)``.

        A missing result has id -1 and score ``-inf``. ``params`` (``ef_search`` for HNSW,
        ``nprobe`` for IVF) apply to this call only and change nothing shared. ``exclude``
        (from :func:`exclusion`) makes FAISS skip those ids inside the search.
        """
        kk = _check_positive_int(k, "k")
        q = _check_vectors(queries, self._dim, allow_1d=True)
        if exclude is not None:
            sp = self._parameters_with(exclude.selector, self._validate_search_params(params or {}))
        else:
            sp = self._search_parameters(params) if params else None
        with faiss_errors(f"searching the {self.kind} index"):
            if sp is None:
                scores, ids = self._index.search(q, kk)
            else:
                scores, ids = self._index.search(q, kk, params=sp)
        scores = np.asarray(scores, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        scores[ids < 0] = -np.inf
        return scores, ids

    def search_one(
        self,
        q: F32Array,
        k: int,
        params: Mapping[str, int] | None = None,
        *,
        positions: bool = False,
    ) -> tuple[F32Array, I64Array]:
        """:meth:`search` of one query the caller has already checked (a C-contiguous float32
        ``(1, dim)`` row, ``k`` >= 1): FAISS's C++ search is called on it directly (no second
        validation of the values, no Python wrapper). Missing results keep FAISS's id -1.
        The layout is checked (FAISS reads ``dim`` floats from the row's address).

        ``positions``: answer FAISS positions instead of ids (the index under the id map is
        searched; see :meth:`position_ids`), for a caller that maps positions itself."""
        if q.dtype != np.float32 or q.shape != (1, self._dim) or not q.flags.c_contiguous:
            raise InvalidArgumentError(
                f"search_one needs a C-contiguous float32 (1, {self._dim}) query, got "
                f"{q.dtype} {q.shape}",
                field="vector",
            )
        sp = self._one_parameters(params) if params else None
        scores = np.empty((1, k), dtype=np.float32)
        ids = np.empty((1, k), dtype=np.int64)
        ptr = _SWIG_PTR
        index = self._index
        if positions:
            index = self._positional
            if index is None:
                index = self._positional = self._position_index()
        try:
            index.search_c(1, ptr(q), k, ptr(scores), ptr(ids), sp)
        except _FAISS_ERRORS as exc:
            raise XpStoreError(
                f"FAISS error (searching the {self.kind} index): {type(exc).__name__}: {exc}"
            ) from exc
        return scores, ids

    def _one_parameters(self, params: Mapping[str, int]) -> Any:
        """:meth:`_search_parameters`, kept per distinct ``params`` (single queries pass the
        same live defaults every call; a FAISS parameter object costs a few µs to build, and
        is only read by a search, so one object serves concurrent calls)."""
        key = tuple(sorted(params.items()))
        sp = self._one_cache.get(key)
        if sp is None:
            sp = self._search_parameters(params)
            if len(self._one_cache) >= 8:
                self._one_cache.clear()
            self._one_cache[key] = sp
        return sp

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove ``ids`` (absent ones are ignored); the number removed."""
        id_arr = _check_ids(ids)
        if not id_arr.size:
            return 0
        with faiss_errors(f"removing {id_arr.size} ids from the {self.kind} index"):
            return int(self._index.remove_ids(id_arr))

    def position_ids(self) -> I64Array | None:
        """The id held at each FAISS position (the id map), or None where FAISS keeps the ids
        inside its lists (IVF): a search by position (``search_one(positions=True)``) needs
        this map to name its answers."""
        with faiss_errors(f"listing the ids of the {self.kind} index"):
            return np.asarray(faiss.vector_to_array(self._index.id_map), dtype=np.int64)

    def _position_index(self) -> Any:
        """The index under the id map, searched by position (kept alive by the id map)."""
        with faiss_errors(f"opening the {self.kind} index by position"):
            return self._index.index

    def ids(self) -> I64Array:
        """The ids the index holds, sorted."""
        with faiss_errors(f"listing the ids of the {self.kind} index"):
            held = faiss.vector_to_array(self._index.id_map)
        return np.sort(np.asarray(held, dtype=np.int64))

    def reconstruct(self, rid: int) -> F32Array:
        """The stored vector of id ``rid`` (an ``XpStoreError`` if the index lacks it)."""
        with faiss_errors(f"reconstructing id {rid} from the {self.kind} index"):
            out = self._index.reconstruct(int(rid))
        return np.asarray(out, dtype=np.float32)

    def vectors(self) -> tuple[I64Array, F32Array]:
        """Every ``(id, vector)`` the index stores, in its internal order: the base of exact
        recall probes and of a quantized copy. Exact and HNSW read their flat storage."""
        with faiss_errors(f"reading the vectors of the {self.kind} index"):
            inner = faiss.downcast_index(self._index.index)
            storage = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
            n = int(storage.ntotal)
            vecs = storage.reconstruct_n(0, n) if n else np.zeros((0, self._dim), np.float32)
            ids = faiss.vector_to_array(self._index.id_map)
        return np.asarray(ids, dtype=np.int64), np.asarray(vecs, dtype=np.float32)

    def memory_bytes(self) -> int:
        """About the memory the index holds: the size of its serialized form (FAISS writes
        the same arrays it keeps in memory: vectors, graph links, id map)."""
        with faiss_errors(f"measuring the {self.kind} index"):
            return int(faiss.serialize_index(self._index).nbytes)

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change the default search parameters (a write: exclude concurrent searches)."""
        given = {
            name: value
            for name, value in (("ef_search", ef_search), ("nprobe", nprobe))
            if value is not None
        }
        self._validate_search_params(given)
        for name, value in given.items():
            with faiss_errors(f"setting the {self.kind} index's {name}", argument=name):
                self._apply_search_param(name, int(value))
            self._params[name] = int(value)

    def _validate_search_params(self, params: Mapping[str, object]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, value in params.items():
            if name not in self._search_keys:
                allowed = ", ".join(sorted(self._search_keys)) or "none"
                raise InvalidArgumentError(
                    f"{self.kind} backend has no search parameter {name!r} (allowed: {allowed})",
                    field=f"params.{name}",
                )
            out[name] = _check_positive_int(value, f"params.{name}")
        return out

    def _parameters_with(self, selector: Any, checked: Mapping[str, int]) -> Any:
        """FAISS ``SearchParameters`` for one call that only considers ids ``selector`` takes,
        with this backend's knobs from ``checked`` (validated ``params``)."""
        with faiss_errors("building search parameters"):
            return faiss.SearchParameters(sel=selector)

    def _search_parameters(self, params: Mapping[str, int]) -> Any:
        """FAISS ``SearchParameters`` for one call (None when the backend has no knobs)."""
        self._validate_search_params(params)
        return None

    def _apply_search_param(self, name: str, value: int) -> None:
        """Set one search knob; a backend with knobs overrides this (the exact one has none)."""
        raise InvalidArgumentError(
            f"{self.kind} backend has no search parameter {name!r}", field=f"params.{name}"
        )

    @classmethod
    @abstractmethod
    def create(cls, dim: int, **params: Any) -> IndexBackend:
        """An empty index of this kind (IVF needs ``train_vectors`` as well)."""

    @classmethod
    @abstractmethod
    def _from_faiss(cls, index: Any, dim: int, params: Mapping[str, Any]) -> IndexBackend:
        """Wrap a deserialized index after checking it is of this kind (TypeError if not).

        Calls into FAISS without a boundary of its own: the caller (``load``) runs it inside
        ``faiss_errors(damaged=...)``, so any failure reads as a damaged file.
        """


def _reject_unknown(kind: str, params: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise InvalidArgumentError(
            f"{kind} backend has no parameter {unknown[0]!r} (allowed: {sorted(allowed)})",
            field=unknown[0],
        )


class ExactBackend(IndexBackend):
    """``IDMap2,Flat``: brute-force inner product, exact by construction."""

    kind: ClassVar[BackendKind] = "exact"

    @classmethod
    def create(cls, dim: int, **params: Any) -> ExactBackend:
        _reject_unknown(cls.kind, params, set())
        d = _check_dim(dim)
        with faiss_errors(f"creating IDMap2,Flat of dimension {d}", argument="dim"):
            index = faiss.index_factory(d, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
        return cls(index, d, {})

    @classmethod
    def _from_faiss(cls, index: Any, dim: int, params: Mapping[str, Any]) -> ExactBackend:
        if not isinstance(index, faiss.IndexIDMap2) or not isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlat
        ):
            raise TypeError(f"expected IDMap2,Flat, got {type(index).__name__}")
        return cls(index, dim, {})


class HNSWBackend(IndexBackend):
    """``IDMap2,HNSW{M}``: graph search; no removal (tombstones live in the serving layer)."""

    kind: ClassVar[BackendKind] = "hnsw"
    _search_keys: ClassVar[frozenset[str]] = frozenset({"ef_search"})

    def __init__(self, index: Any, dim: int, params: Mapping[str, Any]) -> None:
        super().__init__(index, dim, params)
        self._hnsw: Any = faiss.downcast_index(index.index)  # callers hold the boundary

    @classmethod
    def create(cls, dim: int, **params: Any) -> HNSWBackend:
        _reject_unknown(cls.kind, params, {"m", "ef_construction", "ef_search"})
        d = _check_dim(dim)
        m = _check_positive_int(params.get("m", DEFAULT_HNSW_M), "m")
        efc = _check_positive_int(
            params.get("ef_construction", DEFAULT_EF_CONSTRUCTION), "ef_construction"
        )
        if efc < MIN_EF_CONSTRUCTION:
            raise InvalidArgumentError(
                f"ef_construction must be >= {MIN_EF_CONSTRUCTION} (FAISS's 40 loses recall), "
                f"got {efc}",
                field="ef_construction",
            )
        efs = _check_positive_int(params.get("ef_search", DEFAULT_EF_SEARCH), "ef_search")
        with faiss_errors(f"creating IDMap2,HNSW{m} of dimension {d}", argument="m"):
            index = faiss.index_factory(d, f"IDMap2,HNSW{m}", faiss.METRIC_INNER_PRODUCT)
            backend = cls(index, d, {"m": m, "ef_construction": efc, "ef_search": efs})
        with faiss_errors("setting efConstruction", argument="ef_construction"):
            backend._hnsw.hnsw.efConstruction = efc
        with faiss_errors("setting efSearch", argument="ef_search"):
            backend._hnsw.hnsw.efSearch = efs
        return backend

    @classmethod
    def _from_faiss(cls, index: Any, dim: int, params: Mapping[str, Any]) -> HNSWBackend:
        if not isinstance(index, faiss.IndexIDMap2) or not isinstance(
            faiss.downcast_index(index.index), faiss.IndexHNSWFlat
        ):
            raise TypeError(f"expected IDMap2,HNSW, got {type(index).__name__}")
        backend = cls(index, dim, params)
        if "ef_search" in params:
            backend._hnsw.hnsw.efSearch = int(params["ef_search"])
        return backend

    def remove(self, ids: npt.ArrayLike) -> int:
        """Always raises: FAISS HNSW cannot unlink a node from its graph."""
        raise RemoveUnsupportedError(
            "the hnsw backend cannot remove vectors (FAISS HNSW has no remove_ids); deleted and "
            "superseded ids are the serving layer's job: keep tombstones and filter them with an "
            "ID selector or by over-fetching, and drop them at the next rebuild"
        )

    def _search_parameters(self, params: Mapping[str, int]) -> Any:
        return self._parameters_with(None, self._validate_search_params(params))

    def _apply_search_param(self, name: str, value: int) -> None:
        self._hnsw.hnsw.efSearch = value

    def _parameters_with(self, selector: Any, checked: Mapping[str, int]) -> Any:
        with faiss_errors("building HNSW search parameters", argument="params.ef_search"):
            ef = checked.get("ef_search", int(self._hnsw.hnsw.efSearch))
            if selector is None:
                return faiss.SearchParametersHNSW(efSearch=ef)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)


def nlist_for(n: int) -> int:
    """IVF list count for ``n`` vectors: about 4*sqrt(n), at most n/39 (k-means needs ~39
    training points per centroid), clamped to [1, 65536]."""
    if n < 1:
        return 1
    target = round(_NLIST_PER_SQRT * math.sqrt(n))
    return max(1, min(target, n // _MIN_POINTS_PER_CENTROID, _MAX_NLIST))


class IVFBackend(IndexBackend):
    """``IVF{nlist},Flat`` over inner product; trained on the data it is built from."""

    kind: ClassVar[BackendKind] = "ivf"
    _search_keys: ClassVar[frozenset[str]] = frozenset({"nprobe"})

    @classmethod
    def create(cls, dim: int, **params: Any) -> IVFBackend:
        """An empty trained IVF index; ``train_vectors`` (n, dim) is required."""
        _reject_unknown(cls.kind, params, {"nlist", "nprobe", "train_vectors"})
        d = _check_dim(dim)
        train = params.get("train_vectors")
        if train is None:
            raise InvalidArgumentError("an ivf index needs train_vectors", field="train_vectors")
        tv = _check_vectors(train, d, allow_1d=False)
        if tv.shape[0] < 1:
            raise InvalidArgumentError(
                "an ivf index needs at least one training vector", field="train_vectors"
            )
        nlist_raw = params.get("nlist")
        nlist = (
            nlist_for(tv.shape[0]) if nlist_raw is None else _check_positive_int(nlist_raw, "nlist")
        )
        if nlist > tv.shape[0]:
            raise InvalidArgumentError(
                f"nlist {nlist} exceeds the {tv.shape[0]} training vectors", field="nlist"
            )
        nprobe = _check_positive_int(params.get("nprobe", DEFAULT_NPROBE), "nprobe")
        with faiss_errors(f"creating IVF{nlist},Flat of dimension {d}", argument="nlist"):
            index = faiss.index_factory(d, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        with faiss_errors(f"training IVF{nlist},Flat on {tv.shape[0]} vectors"):
            index.train(tv)
        with faiss_errors("setting nprobe", argument="nprobe"):
            index.nprobe = nprobe
        return cls(index, d, {"nlist": nlist, "nprobe": nprobe})

    @classmethod
    def _from_faiss(cls, index: Any, dim: int, params: Mapping[str, Any]) -> IVFBackend:
        if not isinstance(index, faiss.IndexIVFFlat):
            raise TypeError(f"expected IVF,Flat, got {type(index).__name__}")
        if "nprobe" in params:
            index.nprobe = int(params["nprobe"])
        merged = dict(params)
        merged["nlist"] = int(index.nlist)
        return cls(index, dim, merged)

    def position_ids(self) -> I64Array | None:
        """None: the inverted lists hold the ids, a search answers them directly."""
        return None

    def ids(self) -> I64Array:
        """The ids the index holds, sorted (read from the inverted lists)."""
        with faiss_errors("listing the ids of the ivf index"):
            invlists = self._index.invlists
            parts = [
                faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                for i in range(invlists.nlist)
                if invlists.list_size(i)
            ]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate(parts).astype(np.int64))

    def vectors(self) -> tuple[I64Array, F32Array]:
        """Every ``(id, vector)``, read list by list from the inverted lists (IVF-Flat stores
        the raw float32 vectors as its codes)."""
        with faiss_errors("reading the vectors of the ivf index"):
            invlists = self._index.invlists
            ids: list[I64Array] = []
            vecs: list[F32Array] = []
            for i in range(invlists.nlist):
                size = invlists.list_size(i)
                if not size:
                    continue
                ids.append(faiss.rev_swig_ptr(invlists.get_ids(i), size).copy())
                codes = faiss.rev_swig_ptr(invlists.get_codes(i), size * self._dim * 4).copy()
                vecs.append(codes.view(np.float32).reshape(size, self._dim))
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self._dim), np.float32)
        return np.concatenate(ids).astype(np.int64), np.vstack(vecs)

    def reconstruct(self, rid: int) -> F32Array:
        """Always raises: the index is built without a direct map (it would cost memory per
        vector), so FAISS cannot find a vector by id; the caller re-embeds the record."""
        raise XpStoreError(
            f"the ivf index cannot reconstruct id {rid}: it has no direct map (re-embed instead)"
        )

    def _search_parameters(self, params: Mapping[str, int]) -> Any:
        return self._parameters_with(None, self._validate_search_params(params))

    def _apply_search_param(self, name: str, value: int) -> None:
        self._index.nprobe = value

    def _parameters_with(self, selector: Any, checked: Mapping[str, int]) -> Any:
        with faiss_errors("building IVF search parameters", argument="params.nprobe"):
            nprobe = checked.get("nprobe", int(self._index.nprobe))
            if selector is None:
                return faiss.SearchParametersIVF(nprobe=nprobe)
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)


class QuantizedCopy(ExactBackend):
    """``IDMap2,SQ8``: a brute-force copy of another index's vectors at one byte per
    dimension (a quarter of the float vectors, none of HNSW's graph): what the store serves
    from under critical memory pressure. Never persisted; the file keeps the full index."""

    @classmethod
    def of(cls, source: IndexBackend) -> QuantizedCopy:
        """Quantize ``source``'s vectors (trained on them: per-dimension min/max)."""
        ids, vecs = source.vectors()
        d = source.dim
        with faiss_errors(f"building an SQ8 copy of {len(ids)} vectors"):
            index = faiss.index_factory(d, "IDMap2,SQ8", faiss.METRIC_INNER_PRODUCT)
            if len(ids):
                index.train(vecs)
                index.add_with_ids(vecs, ids)
        return cls(index, d, {"quantized": "sq8", "of": source.kind})


BACKENDS: Final[dict[str, type[IndexBackend]]] = {  # kind -> class (also index_file's)
    "exact": ExactBackend,
    "hnsw": HNSWBackend,
    "ivf": IVFBackend,
}


def _check_kind(kind: object) -> BackendKind:
    if kind not in BACKENDS:
        raise InvalidArgumentError(
            f"unknown index kind {kind!r}; expected one of {KINDS}", field="kind"
        )
    return cast(BackendKind, kind)


def choose_backend(
    n: int, *, exact_below: int = DEFAULT_EXACT_BELOW, hnsw_below: int = DEFAULT_HNSW_BELOW
) -> BackendKind:
    """The kind for ``n`` vectors: exact below ``exact_below``, HNSW below ``hnsw_below``, else
    IVF. (The store's config owns the thresholds.)"""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"n must be an int >= 0, got {n!r}", field="n")
    if not 0 <= exact_below <= hnsw_below:
        raise InvalidArgumentError(
            f"need 0 <= exact_below ({exact_below}) <= hnsw_below ({hnsw_below})",
            field="exact_below",
        )
    if n < exact_below:
        return "exact"
    if n < hnsw_below:
        return "hnsw"
    return "ivf"


def build(
    kind: str,
    ids: npt.ArrayLike,
    vectors: npt.ArrayLike,
    *,
    dim: int | None = None,
    threads: int | None = None,
    **params: Any,
) -> IndexBackend:
    """A backend of ``kind`` holding ``vectors`` under ``ids``.

    ``dim`` defaults to the vectors' width (give it when ``vectors`` may be empty). ``threads``
    limits FAISS's OpenMP threads in this thread for the build (a background builder should, so
    queries keep their cores). IVF trains on ``vectors`` and needs at least one.
    Params: hnsw ``m``, ``ef_construction`` (>= 80), ``ef_search``; ivf ``nlist``, ``nprobe``.
    """
    k = _check_kind(kind)
    arr = np.asarray(vectors)
    if dim is None:
        if arr.ndim != 2:
            raise InvalidArgumentError(
                f"vector must be 2-D (n, dim), got shape {arr.shape}", field="vector"
            )
        dim = int(arr.shape[1])
    d = _check_dim(dim)
    vec = _check_vectors(arr, d, allow_1d=False)
    id_arr = _check_ids(ids)
    if id_arr.shape[0] != vec.shape[0]:
        raise InvalidArgumentError(f"{id_arr.shape[0]} ids for {vec.shape[0]} vectors", field="ids")
    started = time.perf_counter()
    with faiss_threads(threads):
        if k == "ivf":
            backend: IndexBackend = IVFBackend.create(d, train_vectors=vec, **params)
        else:
            backend = BACKENDS[k].create(d, **params)
        backend.add(id_arr, vec)
    log.info(
        "built %s index: %d vectors, dim %d, %.3f s, params %s",
        k,
        len(backend),
        d,
        time.perf_counter() - started,
        backend.params,
    )
    return backend
