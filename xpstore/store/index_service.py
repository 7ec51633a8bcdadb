"""Similar-track lookup for a Store (issue 4): similar, similar_many, index_status,
rebuild_index.

The index is attached lazily, at the first call that needs it (``xpstore.index.manager``): a
store that never asks for similar tracks never imports FAISS, and a crash-test child stays light.
From then on the index subscribes to the overlay, so every acknowledged fingerprint change reaches
it before its writer returns, and the writer asks it (:meth:`IndexService.precompute`) for the
vectors of a put batch before taking any lock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from xpstore.config import StoreConfig
from xpstore.errors import (
    InvalidArgumentError,
    InvalidRecordError,
    RecordNotFoundError,
    StoreClosedError,
    XpStoreError,
)
from xpstore.index.neighbors import MetadataLoad, Neighbor, cached_answers
from xpstore.model.columns import FingerprintColumns
from xpstore.model.events import IndexRow, IndexRows
from xpstore.model.records import BATCH_FIELDS, Experience, Fingerprint, Record, record_from_json
from xpstore.model.where import compile_where
from xpstore.store.engine import Engine, timed
from xpstore.store.reader import Reader

if TYPE_CHECKING:
    from xpstore.index.manager import IndexManager
    from xpstore.index.serving import Found, IndexServer

__all__ = ["IndexService", "check_k"]

log = logging.getLogger(__name__)

_clock = time.perf_counter
_SHORT = 64  # a query vector this long or shorter is checked as Python floats

Predicate = Callable[[Experience], bool]


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k must be an int >= 1, got {k!r}", field="k")
    return k


class IndexService:
    """The k-NN index of one open store, attached on first use."""

    def __init__(self, engine: Engine, reader: Reader) -> None:
        self._engine = engine
        self._reader = reader
        self._lock = threading.Lock()
        self.manager: IndexManager | None = None
        """The attached index (None before the first similar-track call): a documented seam for
        tests and tools (``manager.server``, ``manager.rebuilder``)."""
        self.access_listeners: list[Callable[[str], None]] = []
        """Called with the track id of every ``similar(track_id)`` (the pattern detector's
        access counts); a listener must be cheap and must not raise."""
        self.on_rebuilt: list[Callable[[Any], None]] = []
        """Called with the BuildInfo after each rebuild (kept across re-attaches)."""
        self.lists_first = False
        """Memory pressure (level 2+): answer ``similar(track_id)`` from the track's
        precomputed neighbour list when it has one (no index search, no vector read)."""
        self._pending: weakref.WeakSet[MetadataLoad] = weakref.WeakSet()
        """Lazy metadata reads of answers still alive and not read: ``close`` runs them."""
        self._closing = False
        engine.settings.watch(self._configure)

    # ------------------------------------------------------------------ public
    def similar(
        self,
        track_id: str | None,
        fingerprint: Fingerprint | Mapping[str, Any] | None,
        vector: npt.ArrayLike | None,
        *,
        k: int,
        weights: Mapping[str, float] | None,
        exclude_self: bool,
        where: Mapping[str, Any] | None,
        precomputed: bool,
        params: Mapping[str, int] | None,
    ) -> list[Neighbor]:
        """See :meth:`xpstore.Store.similar`. Timed inline under "similar" (``@timed``'s
        ``*args, **kwargs`` forwarding cost every first ask a few µs)."""
        start = _clock()
        try:
            self._engine.check_open()
            k = check_k(k)
            if (track_id is not None) + (fingerprint is not None) + (vector is not None) != 1:
                raise InvalidArgumentError(
                    "give exactly one of track_id, fingerprint= or vector=", field="track_id"
                )
            predicate = None if where is None else compile_where(where, ("fingerprint",))
            if track_id is not None:
                for listener in self.access_listeners:
                    listener(str(track_id))
            if (
                self.lists_first and not precomputed and track_id is not None and weights is None
                and exclude_self and params is None
            ):  # fmt: skip
                listed = self._from_list(str(track_id), k, predicate)
                if listed is not None:
                    return listed
            if precomputed:
                if track_id is None:
                    raise InvalidArgumentError(
                        "precomputed=True needs a track_id (lists are stored per track)",
                        field="precomputed",
                    )
                return self._precomputed(str(track_id), k, predicate)
            server = self.serving()
            exclude: set[int] = set()
            if track_id is not None:
                rid = self._reader.read_track(str(track_id))
                if rid is None:
                    raise RecordNotFoundError(f"no track {track_id!r}")
                query = self._track_vector(server, rid, weights)
                if exclude_self:
                    exclude.add(rid)
            elif fingerprint is not None:
                query, own = _fingerprint_vector(server, fingerprint, weights)
                if exclude_self and own is not None:
                    mine = self._reader.read_track(own)
                    if mine is not None:
                        exclude.add(mine)
            else:
                if weights is not None:
                    raise InvalidArgumentError(
                        "weights apply to track or fingerprint queries; a vector is already "
                        "weighted",
                        field="weights",
                    )
                query = _check_vector(vector, server.embedder.dim)
            if predicate is None:
                # a checked vector is C-contiguous float32 already; the other queries are made so
                q = query[None, :] if vector is not None else np.ascontiguousarray(
                    query[None, :], dtype=np.float32)  # fmt: skip
                found = server.search_one(q, k, exclude, _params(params) if params else None)
                if found is not None:
                    return self._answers(server, found)
            accept = self._accept(predicate) if predicate is not None else None
            hits = server.search(
                query[None, :], k, exclude=[exclude], accept=accept, params=_params(params)
            )[0]
            return self._neighbors(server, hits)
        finally:
            self._engine.telemetry.observe("similar", _clock() - start)

    @timed("similar_many")
    def similar_many(
        self, vectors: npt.ArrayLike, *, k: int, params: Mapping[str, int] | None
    ) -> list[list[Neighbor]]:
        """``similar(vector=v)`` for each row of ``vectors`` (n, dim), searched as one batch."""
        self._engine.check_open()
        k = check_k(k)
        server = self.serving()
        arr = np.asarray(vectors, dtype=np.float32)
        if arr.ndim != 2:
            raise InvalidArgumentError(
                f"vectors must be 2-D (n, {server.embedder.dim}), got shape {arr.shape}",
                field="vector",
            )
        for row in arr:
            _check_vector(row, server.embedder.dim)
        hits = server.search(np.ascontiguousarray(arr), k, params=_params(params))
        load = self._metadata_load(server)  # one read for the metadata of every row's answers
        return [self._neighbors(server, h, load) for h in hits]

    def track_vector(self, track_id: str) -> npt.NDArray[np.float32]:
        """The hybrid vector ``similar(track_id)`` searches with (the index's embedding)."""
        self._engine.check_open()
        rid = self._reader.read_track(str(track_id))
        if rid is None:
            raise RecordNotFoundError(f"no track {track_id!r}")
        return self._track_vector(self.serving(), rid, None)

    def status(self) -> dict[str, Any]:
        """Kind, size, delta, tombstones, LSN covered, last build (time, duration, recall)."""
        engine = self._engine
        engine.check_open()
        server = self.server()
        mgr = self.manager
        assert mgr is not None
        out = server.status()
        path = mgr.dir / "main.faiss"
        out["file"] = str(path) if path.exists() else None
        out["file_bytes"] = path.stat().st_size if path.exists() else 0
        rb = mgr.rebuilder
        out["rebuilding"] = rb is not None and rb.building_since is not None
        out["last_error"] = rb.last_error if rb is not None else None
        out["last_reason"] = rb.last_reason if rb is not None else None
        out["auto_rebuild"] = engine.config.index.auto_rebuild and not engine.readonly
        out["readonly"] = engine.readonly
        return out

    def rebuild(self, *, wait: bool, timeout: float | None) -> dict[str, Any]:
        """Rebuild now, blue-green (queries keep being served); return the status."""
        self._engine.writable()
        self.server()
        mgr = self.manager
        assert mgr is not None and mgr.rebuilder is not None
        done = mgr.rebuilder.request("manual")
        if wait:
            if not done.wait(timeout):
                raise XpStoreError(f"index rebuild did not finish within {timeout} s")
            if mgr.rebuilder.last_error is not None:
                raise XpStoreError(f"index rebuild failed: {mgr.rebuilder.last_error}")
        return self.status()

    def prewarm(self, track_ids: Sequence[str], k: int = 10) -> dict[str, int]:
        """Fill the answer cache with the neighbours of ``track_ids`` (a search each, batched)
        and read their precomputed lists: the hot set after an open or a rebuild. Returns
        counts (tracks, cached answers); unknown tracks are skipped."""
        self._engine.check_open()
        server = self.serving()
        ids = [rid for t in track_ids if (rid := self._reader.read_track(str(t))) is not None]
        vecs = [v for rid in ids if (v := server.vector_of(rid)) is not None]
        if not vecs:
            return {"tracks": 0, "answers": 0}
        before = len(server.answers)
        hits = server.search(np.vstack(vecs), k + 1)
        wanted = {rid for row in hits for rid, _score in row} | set(ids)
        misses = [rid for rid in wanted if rid not in server.answers]
        if misses:
            from xpstore.index.rows import envelope_track

            for rid, data in self._reader.envelopes(misses).items():
                server.remember(rid, envelope_track(data))
        return {"tracks": len(vecs), "answers": len(server.answers) - before}

    def attached(self) -> bool:
        """Whether an index is attached now (:meth:`precompute` would compute rows)."""
        mgr = self.manager
        return mgr is not None and mgr.server is not None

    def precompute(self, records: Sequence[Record]) -> dict[int, IndexRow]:
        """Index rows of a put batch's fingerprints by position ({} before the first attach)."""
        mgr = self.manager
        if mgr is None or mgr.server is None:
            return {}
        return mgr.precompute(records)

    def precompute_columns(self, cols: FingerprintColumns) -> IndexRows | None:
        """Index rows of a ``put_fingerprints`` batch (None before the first attach)."""
        mgr = self.manager
        if mgr is None or mgr.server is None:
            return None
        return mgr.precompute_columns(cols)

    def close(self) -> None:
        """Read the metadata answers still hold pending (so they outlive the store), then
        detach the index. Called by ``Store.close`` while LMDB is still open."""
        self._closing = True
        try:
            self._finish_loads()
        finally:
            self._closing = False
        with self._lock:
            mgr, self.manager = self.manager, None
        if mgr is not None:
            mgr.close()

    def _finish_loads(self) -> None:
        while True:
            try:
                loads = list(self._pending)
                break
            except RuntimeError:  # a query added one meanwhile: copy again
                continue
        if loads:
            log.debug("reading the metadata of %d pending answer lists before closing",
                      len(loads))  # fmt: skip
        for load in loads:
            try:
                load.load()
            except Exception:  # close goes on; those answers raise StoreClosedError
                log.exception("could not read the metadata of pending answers at close")

    # ------------------------------------------------------------------ attach
    def serving(self) -> IndexServer:
        """The server, with library statistics in force (``IndexManager.ensure_library_stats``):
        what every answer is computed with."""
        server = self.server()
        mgr = self.manager
        if mgr is not None:
            mgr.ensure_library_stats()
            if mgr.server is not None:
                server = mgr.server
        return server

    def server(self) -> IndexServer:
        """The attached server (attaching, or re-attaching a read-only store, when due)."""
        mgr = self.manager
        if mgr is not None and mgr.server is not None and not self._stale(mgr):
            return mgr.server
        with self._lock:
            mgr = self.manager
            if mgr is not None and mgr.server is not None and not self._stale(mgr):
                return mgr.server
            if mgr is not None:
                mgr.close()
            self.manager = None
            engine = self._engine
            engine.check_open()
            from xpstore.index.manager import IndexManager

            mgr = IndexManager(
                root=engine.path,
                tables=engine.tables,
                settings=engine.config.index,
                store_id=engine.store_id,
                embedding_dim=engine.embedding_dim,
                overlay=None if engine.readonly else engine.overlay,
                readonly=engine.readonly,
                flush=None if engine.readonly else engine.apply_through_acked,
                telemetry=engine.telemetry,
            )
            mgr.on_rebuilt = self.on_rebuilt  # the same list: callbacks survive re-attaches
            server = mgr.attach()
            self.manager = mgr
            return server

    def _stale(self, mgr: IndexManager) -> bool:
        """A read-only store re-reads the index when LMDB moved and the refresh period passed."""
        engine = self._engine
        if not engine.readonly:
            return False
        if time.monotonic() - mgr.attached_at < engine.config.index.refresh_s:
            return False
        tables = engine.tables_or_none
        if tables is None:
            return False
        with tables.reading() as txn:
            return bool(tables.applied_lsn(txn) != mgr.attached_lsn)

    def _configure(self, config: StoreConfig) -> None:
        """A live reconfigure: search knobs at the next query, build knobs at the next build."""
        mgr = self.manager
        if mgr is not None:
            from xpstore.index.manager import configure_server

            mgr.settings = config.index
            if mgr.server is not None:
                configure_server(mgr.server, config.index)
            if mgr.rebuilder is not None:
                mgr.rebuilder.poke()

    # ------------------------------------------------------------------ queries
    def _track_vector(
        self, server: IndexServer, rid: int, weights: Mapping[str, float] | None
    ) -> npt.NDArray[np.float32]:
        if weights is None:
            vec = server.vector_of(rid)
            if vec is not None:
                return vec
        fp = self._reader.get(rid).record
        assert isinstance(fp, Fingerprint)
        return server.embedder.embed_query(fp, weights)

    def _accept(self, predicate: Predicate) -> Callable[[int], bool]:
        reader = self._reader

        def accept(rid: int) -> bool:
            exp = reader.read_get(rid)
            return exp is not None and bool(predicate(exp))

        return accept

    def neighbors(self, hits: list[tuple[int, float]]) -> list[Neighbor]:
        """(record id, score) pairs as Neighbors (track, metadata), live ones only."""
        return self._neighbors(self.serving(), hits)

    def _neighbors(
        self, server: IndexServer, hits: list[tuple[int, float]], load: MetadataLoad | None = None
    ) -> list[Neighbor]:
        """Map (id, score) to Neighbors: tracks from memory (the index's arrays, else the
        answer cache, else one read), metadata from the answer cache, else lazily (``load``:
        one read for every answer of the call, at the first access)."""
        rids = [rid for rid, _score in hits]
        return self._answers(server, (rids, [score for _rid, score in hits],
                                      server.track_ids(rids)), load)  # fmt: skip

    def _answers(self, server: IndexServer, found: Found, load: MetadataLoad | None = None
                 ) -> list[Neighbor]:  # fmt: skip
        """Neighbors of (ids, scores, tracks or None): all from the answer cache, metadata
        included, when it holds every one; else their metadata read lazily
        (:class:`MetadataLoad`: the answer cache first, then one store read for the rest, at
        the first access of any); the rare answer whose track memory does not know is read at
        once, with its metadata (and dropped if its record is gone: deleted after the
        search)."""
        rids, scores, tracks = found
        if not rids:
            return []
        cache = server.answers
        if rids[0] in cache:  # one lookup rules out most calls that are not all cached
            cached = [cache.get(rid) for rid in rids]
            if None not in cached:  # asked again: every answer cached, metadata included
                self._engine.telemetry.incr("answers.hits", len(rids))
                return cached_answers(rids, scores, cached)  # type: ignore[arg-type]
        if load is None:
            load = self._metadata_load(server)
        if None not in tracks:  # the usual case: every track known from memory
            return load.answers(rids, scores, tracks)  # type: ignore[arg-type]
        unknown = [rid for rid, t in zip(rids, tracks, strict=True) if t is None]
        known = {rid: cache[rid] for rid in unknown if rid in cache}
        if len(known) < len(unknown):
            known.update(self._lookup(server, [rid for rid in unknown if rid not in known]))
        out: list[Neighbor] = []
        for rid, score, track in zip(rids, scores, tracks, strict=True):
            if track is not None:
                out.append(load.neighbor(track, score, rid))
            elif (value := known.get(rid)) is not None:
                out.append(Neighbor.of(value[0], score, rid, value[1]))
        return out

    def _metadata_load(self, server: IndexServer) -> MetadataLoad:
        """A lazy metadata read for the answers of one call; ``close`` runs it if still due."""
        load = MetadataLoad(self._read_metadata, server)
        self._pending.add(load)
        return load

    def _read_metadata(self, server: IndexServer, rids: list[int]) -> dict[int, Any]:
        """What a :class:`MetadataLoad` reads: the metadata of the live ``rids``."""
        if self._engine.closed and not self._closing:
            raise StoreClosedError(
                f"store {self._engine.path} is closed: the metadata of these answers was not "
                "read before it closed"
            )
        cache = server.answers
        out = {rid: hit[1] for rid in rids if (hit := cache.get(rid)) is not None}
        if out:
            self._engine.telemetry.incr("answers.hits", len(out))
        if len(out) < len(rids):
            missing = [rid for rid in rids if rid not in out]
            out.update((rid, value[1]) for rid, value in self._lookup(server, missing).items())
        return out

    def _lookup(
        self, server: IndexServer, rids: list[int]
    ) -> dict[int, tuple[str, dict[str, Any] | None]]:
        """(track, metadata) of the live ``rids``: the overlay, then LMDB in one read
        transaction (a missing id: its record is gone), remembered in the answer cache unless
        an acknowledgement arrived during the read."""
        from xpstore.index.rows import envelope_track

        self._engine.telemetry.incr("answers.misses", len(rids))
        epoch = server.answers_epoch
        found = {rid: envelope_track(data) for rid, data in self._reader.envelopes(rids).items()}
        for rid, value in found.items():
            server.remember(rid, value)
        if server.answers_epoch != epoch:
            # an acknowledgement arrived meanwhile and may have changed what was read: take the
            # entries back (the batch's own forget runs after its epoch bump, so an entry
            # remembered before this check is dropped by it)
            for rid in found:
                server.answers.pop(rid, None)
        return found

    def _from_list(
        self, track_id: str, k: int, predicate: Predicate | None
    ) -> list[Neighbor] | None:
        """The precomputed answer when the track has a list holding ``k`` live entries (else
        None: the caller searches the index)."""
        if self._reader.read_track(track_id) is None:
            return None  # the index path raises the error that names it
        try:
            out = self._precomputed(track_id, k, predicate)
        except RecordNotFoundError:
            return None
        if len(out) < k:
            return None
        self._engine.telemetry.incr("similar.from_lists")
        return out

    def _precomputed(self, track_id: str, k: int, predicate: Predicate | None) -> list[Neighbor]:
        from xpstore.index import neighbors as nbrs

        reader = self._reader
        tables = self._engine.tables
        if reader.read_track(track_id) is None:
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
            if reader.read_track(track) != rid:
                continue  # superseded or deleted since that build
            exp = reader.read_get(rid)
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


def _fingerprint_vector(
    server: IndexServer,
    fingerprint: Fingerprint | Mapping[str, Any],
    weights: Mapping[str, float] | None,
) -> tuple[npt.NDArray[np.float32], str | None]:
    if isinstance(fingerprint, Fingerprint):
        return server.embedder.embed_query(fingerprint, weights), fingerprint.track_id
    if not isinstance(fingerprint, Mapping):
        raise InvalidArgumentError(
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
            "the fingerprint has no direction (no values, or every value at the library mean)",
            field="fingerprint",
        )
    return vec, None


def _params(params: Mapping[str, int] | None) -> dict[str, int] | None:
    return dict(params) if params else None


def _check_vector(vector: Any, dim: int) -> npt.NDArray[np.float32]:
    if (
        type(vector) is np.ndarray and vector.dtype == np.float32 and vector.ndim == 1
        and vector.flags.c_contiguous
    ):  # fmt: skip
        arr: npt.NDArray[np.float32] = vector
    else:
        try:
            arr = np.ascontiguousarray(vector, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"vector must be numbers: {exc}", field="vector") from exc
    if arr.ndim != 1 or arr.shape[0] != dim:
        raise InvalidArgumentError(
            f"vector must have dimension {dim} (the index's), got shape {arr.shape}",
            field="vector",
        )
    # one sum decides the common case; the checks below say what is wrong, if anything. A short
    # vector (the 25 audio values) is summed as Python floats: float64, which float32 values
    # cannot overflow, finite and nonzero only when every value is finite and one is nonzero
    # (a nonzero vector whose values cancel out falls through and passes below); no numpy call
    # and no floating-point warning (inf - inf is NaN here), ~1 µs less per query. A long one:
    # the sum of magnitudes, in one numpy reduction.
    if arr.shape[0] <= _SHORT:
        total = sum(arr.tolist())
        if total != 0.0 and math.isfinite(total):
            return arr
    elif 0.0 < float(np.abs(arr).sum(dtype=np.float64)) < math.inf:
        return arr
    if not np.isfinite(arr).all():
        raise InvalidArgumentError("vector contains NaN or infinity", field="vector")
    if not arr.any():
        raise InvalidArgumentError("vector is all zeros", field="vector")
    return arr
