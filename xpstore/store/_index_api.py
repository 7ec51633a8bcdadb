"""Store methods for similar-track lookup (issue 4): similar, similar_many, index_status,
rebuild_index.

A mixin of :class:`~xpstore.store.store.Store`. The index is attached lazily, at the first call
that needs it (``xpstore.index.manager``): a store that never asks for similar tracks never
imports FAISS, and a crash-test child stays light. From then on every acknowledged fingerprint
change reaches the index before its writer returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from xpstore.errors import (
    InvalidRecordError,
    RecordNotFoundError,
    XpStoreError,
)
from xpstore.index.neighbors import Neighbor
from xpstore.model.records import BATCH_FIELDS, Fingerprint, record_from_json
from xpstore.model.where import compile_where

if TYPE_CHECKING:
    from xpstore.index.manager import IndexManager
    from xpstore.index.serving import IndexServer
    from xpstore.store.store import Store

log = logging.getLogger(__name__)

_ATTACH_LOCK = threading.Lock()


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidRecordError(f"k must be an int >= 1, got {k!r}", field="k")
    return k


class IndexAPI:
    """Mixed into Store; see the module docstring."""

    _index: IndexManager | None = None

    # ------------------------------------------------------------------ public
    def similar(
        self,
        track_id: str | None = None,
        *,
        fingerprint: Fingerprint | Mapping[str, Any] | None = None,
        vector: npt.ArrayLike | None = None,
        k: int = 10,
        weights: Mapping[str, float] | None = None,
        exclude_self: bool = True,
        where: Mapping[str, Any] | None = None,
        precomputed: bool = False,
        params: Mapping[str, int] | None = None,
    ) -> list[Neighbor]:
        """The ``k`` tracks most similar to a track, a fingerprint or a hybrid vector.

        Give exactly one of ``track_id`` (a stored track), ``fingerprint`` (a Fingerprint, or a
        mapping of raw audio values by name such as ``{"tempo_bpm": 120, "lufs": -9}``) or
        ``vector`` (a hybrid vector of the index's dimension). ``weights`` reweights the blocks
        for this query (``{"audio": .5, "embedding": .5}``; exact between vectors with the same
        blocks present). ``exclude_self`` leaves the query's own track out. ``where`` filters
        the answers' fingerprint records (``{"metadata.style": "techno"}``). ``precomputed``
        reads the track's neighbour list materialized by the last build (no FAISS; the lists
        say which build made them). ``params`` sets ``ef_search``/``nprobe`` for this query.
        Best first; fewer than ``k`` when the library is smaller.
        """
        store = self._as_store()
        store._check_open()
        k = _check_k(k)
        given = [x is not None for x in (track_id, fingerprint, vector)]
        if sum(given) != 1:
            raise InvalidRecordError(
                "give exactly one of track_id, fingerprint= or vector=", field="track_id"
            )
        predicate = compile_where(where, ("fingerprint",))
        if precomputed:
            if track_id is None:
                raise InvalidRecordError(
                    "precomputed=True needs a track_id (lists are stored per track)",
                    field="precomputed",
                )
            return self._precomputed(str(track_id), k, predicate)
        server = self._server()
        exclude: set[int] = set()
        if track_id is not None:
            rid = store._read_track(str(track_id))
            if rid is None:
                raise RecordNotFoundError(f"no track {track_id!r}")
            query = self._track_vector(server, rid, weights)
            if exclude_self:
                exclude.add(rid)
        elif fingerprint is not None:
            query, own = self._fingerprint_vector(server, fingerprint, weights)
            if exclude_self and own is not None:
                mine = store._read_track(own)
                if mine is not None:
                    exclude.add(mine)
        else:
            if weights is not None:
                raise InvalidRecordError(
                    "weights apply to track or fingerprint queries; a vector is already weighted",
                    field="weights",
                )
            query = _check_vector(vector, server.embedder.dim)
        accept = None
        if predicate is not None:
            accept = self._accept(predicate)
        hits = server.search(
            query[None, :], k, exclude=[exclude], accept=accept, params=_params(params)
        )[0]
        return self._neighbors(server, hits)

    def similar_many(
        self,
        vectors: npt.ArrayLike,
        *,
        k: int = 10,
        params: Mapping[str, int] | None = None,
    ) -> list[list[Neighbor]]:
        """``similar(vector=v)`` for each row of ``vectors`` (n, dim), searched as one batch."""
        store = self._as_store()
        store._check_open()
        k = _check_k(k)
        server = self._server()
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2:
            raise InvalidRecordError(
                f"vectors must be 2-D (n, {server.embedder.dim}), got shape {arr.shape}",
                field="vector",
            )
        for row in arr:
            _check_vector(row, server.embedder.dim)
        hits = server.search(np.ascontiguousarray(arr), k, params=_params(params))
        return [self._neighbors(server, h) for h in hits]

    def index_status(self) -> dict[str, Any]:
        """Kind, size, delta, tombstones, LSN covered, last build (time, duration, recall probe)."""
        store = self._as_store()
        store._check_open()
        server = self._server()
        mgr = self._index
        assert mgr is not None
        out = server.status()
        path = mgr.dir / "main.faiss"
        out["file"] = str(path) if path.exists() else None
        out["file_bytes"] = path.stat().st_size if path.exists() else 0
        rb = mgr.rebuilder
        out["rebuilding"] = rb is not None and rb.building_since is not None
        out["last_error"] = rb.last_error if rb is not None else None
        out["last_reason"] = rb.last_reason if rb is not None else None
        out["auto_rebuild"] = store.config.index_auto_rebuild and not store.readonly
        out["readonly"] = store.readonly
        return out

    def rebuild_index(self, *, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Rebuild the index now, blue-green (queries keep being served); return the status.

        With ``wait=False`` it returns at once and the build runs in the background.
        """
        store = self._as_store()
        store._writable()
        self._server()
        mgr = self._index
        assert mgr is not None and mgr.rebuilder is not None
        done = mgr.rebuilder.request("manual")
        if wait:
            if not done.wait(timeout):
                raise XpStoreError(f"index rebuild did not finish within {timeout} s")
            if mgr.rebuilder.last_error is not None:
                raise XpStoreError(f"index rebuild failed: {mgr.rebuilder.last_error}")
        return self.index_status()

    # ------------------------------------------------------------------ internals
    def _as_store(self) -> Store:
        return cast("Store", self)

    def _server(self) -> IndexServer:
        """The attached server (attaching, or re-attaching a read-only store, when due)."""
        store = self._as_store()
        mgr = self._index
        if mgr is not None and mgr.server is not None and not self._stale(mgr):
            return mgr.server
        with _ATTACH_LOCK:
            mgr = self._index
            if mgr is not None and mgr.server is not None and not self._stale(mgr):
                return mgr.server
            if mgr is not None:
                mgr.close()
            from xpstore.index.manager import IndexManager

            tables = store._tables
            if tables is None:
                store._check_open()
                raise XpStoreError("store has no tables")
            mgr = IndexManager(
                root=store.path,
                tables=tables,
                config=store.config,
                store_id=store.store_id,
                embedding_dim=store.embedding_dim,
                overlay=None if store.readonly else store._overlay,
                readonly=store.readonly,
                flush=None if store.readonly else store._flush_for_index,
            )
            server = mgr.attach()
            self._index = mgr
            return server

    def _stale(self, mgr: IndexManager) -> bool:
        """A read-only store re-reads the index when LMDB moved and the refresh period passed."""
        store = self._as_store()
        if not store.readonly:
            return False
        if time.monotonic() - mgr.attached_at < store.config.index_refresh_s:
            return False
        tables = store._tables
        if tables is None:
            return False
        with tables.reading() as txn:
            return bool(tables.applied_lsn(txn) != mgr.attached_lsn)

    def _flush_for_index(self) -> None:
        """Apply every acknowledged operation to LMDB (before a build reads it)."""
        store = self._as_store()
        applier, wal = store._applier, store._wal
        if applier is None or wal is None or applier.hold or store._closed:
            return
        applier.apply_through(wal.acked_lsn)

    def _close_index(self) -> None:
        mgr = self._index
        self._index = None
        if mgr is not None:
            mgr.close()

    def _index_rows(self, records: Sequence[Any]) -> dict[int, Any]:
        mgr = self._index
        if mgr is None or mgr.server is None:
            return {}
        return mgr.precompute(list(records))

    def _track_vector(
        self, server: IndexServer, rid: int, weights: Mapping[str, float] | None
    ) -> npt.NDArray[np.float32]:
        if weights is None:
            vec = server.vector_of(rid)
            if vec is not None:
                return vec
        exp = self._as_store().get(rid)
        fp = exp.record
        assert isinstance(fp, Fingerprint)
        return server.embedder.embed_query(fp, weights)

    def _fingerprint_vector(
        self,
        server: IndexServer,
        fingerprint: Fingerprint | Mapping[str, Any],
        weights: Mapping[str, float] | None,
    ) -> tuple[npt.NDArray[np.float32], str | None]:
        if isinstance(fingerprint, Fingerprint):
            return server.embedder.embed_query(fingerprint, weights), fingerprint.track_id
        if not isinstance(fingerprint, Mapping):
            raise InvalidRecordError(
                "fingerprint must be a Fingerprint or a mapping of raw values by name, got "
                f"{type(fingerprint).__name__}",
                field="fingerprint",
            )
        if "track_id" in fingerprint or "batch" in fingerprint or "streaming" in fingerprint:
            fp = record_from_json({"kind": "fingerprint", **fingerprint})
            assert isinstance(fp, Fingerprint)
            return server.embedder.embed_query(fp, weights), fp.track_id
        values = dict(fingerprint)
        embedding = values.pop("embedding", None)
        unknown = sorted(set(values) - set(BATCH_FIELDS))
        if unknown:
            raise InvalidRecordError(
                f"fingerprint has unknown audio value {unknown[0]!r}", field=unknown[0]
            )
        vec = server.embedder.embed_parts(values or None, embedding, weights)
        if not np.any(vec):
            raise InvalidRecordError(
                "the fingerprint has no direction (no values, or every value at the library "
                "mean)",
                field="fingerprint",
            )
        return vec, None

    def _accept(self, predicate: Any) -> Any:
        store = self._as_store()

        def accept(rid: int) -> bool:
            exp = store._read_get(rid)
            return exp is not None and bool(predicate(exp))

        return accept

    def _neighbors(self, server: IndexServer, hits: list[tuple[int, float]]) -> list[Neighbor]:
        """Map (id, score) to Neighbors: track and metadata from the server's answer cache,
        else the overlay or LMDB (one read transaction for the misses)."""
        from xpstore.index.rows import envelope_track

        store = self._as_store()
        cache = server.answers
        found: dict[int, tuple[str, dict[str, Any] | None]] = {}
        misses = []
        for rid, _score in hits:
            hit = cache.get(rid)
            if hit is None:
                misses.append(rid)
            else:
                found[rid] = hit
        if misses:
            overlay = store._overlay
            tables = store._tables
            if tables is None:
                store._check_open()
                return []
            with tables.reading() as txn:
                for rid in misses:
                    eff = overlay.records.get(rid)
                    data = eff.value if eff is not None else tables.get_record(txn, rid)
                    if data is not None:  # None: deleted after the search, not live any more
                        found[rid] = server.remember(rid, envelope_track(data))
        return [
            Neighbor(found[rid][0], score, rid, found[rid][1])
            for rid, score in hits
            if rid in found
        ]

    def _precomputed(self, track_id: str, k: int, predicate: Any) -> list[Neighbor]:
        from xpstore.index import neighbors as nbrs

        store = self._as_store()
        tables = store._tables
        assert tables is not None
        if store._read_track(track_id) is None:
            raise RecordNotFoundError(f"no track {track_id!r}")
        with tables.reading() as txn:
            raw = tables.get_neighbors(txn, track_id)
        if raw is None:
            raise RecordNotFoundError(
                f"no precomputed neighbour list for track {track_id!r} (it arrived after the "
                "last index build, or no build has run): rebuild the index or use "
                "precomputed=False"
            )
        lst = nbrs.decode(raw, f"neighbour list of {track_id!r}")
        out: list[Neighbor] = []
        for track, rid, score in lst.items:
            if store._read_track(track) != rid:
                continue  # superseded or deleted since that build
            exp = store._read_get(rid)
            if exp is None or (predicate is not None and not predicate(exp)):
                continue
            data = exp.record
            assert isinstance(data, Fingerprint)
            out.append(
                Neighbor(track, score, rid, dict(data.metadata) if data.metadata else None,
                         lst.build_id)
            )  # fmt: skip
            if len(out) >= k:
                break
        return out


def _params(params: Mapping[str, int] | None) -> dict[str, int] | None:
    return dict(params) if params else None


def _check_vector(vector: Any, dim: int) -> npt.NDArray[np.float32]:
    try:
        arr = np.ascontiguousarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"vector must be numbers: {exc}", field="vector") from exc
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise InvalidRecordError(
            f"vector must have dimension {dim} (the index's), got shape {arr.shape}",
            field="vector",
        )
    if not np.isfinite(arr).all():
        raise InvalidRecordError("vector contains NaN or infinity", field="vector")
    if not arr.any():
        raise InvalidRecordError("vector is all zeros", field="vector")
    return arr
