"""The index of one open store: attach (load + catch up), the ack-path hook, blue-green rebuilds.

Files, in ``<store>/index/``::

    main.faiss              the current main index (backends' checksummed container); its meta
                            carries the BuildInfo (build id, LSN covered, store id, recall probe)
    build-<id>.faiss        a build in progress or not yet swapped in (removed on attach)
    neighbors-<id>.bin      a build's neighbour lists on their way into LMDB (removed on attach)

**Attach** (lazily, at the first ``similar``/index call of a session): register the overlay
listener in *queue* mode under the overlay lock and copy the overlay's unapplied track changes;
load ``main.faiss`` if its checksums verify, it belongs to this store and it covers no LSN beyond
what LMDB holds; read the track map from LMDB and overlay it with the copied changes (the live
set); tombstone the index's ids that are not live and put the live ids it lacks into the delta
(decoded from LMDB or the overlay); then, under the backlog lock, apply the queued events in
LSN order and switch the listener to direct mode. Every later acknowledged change reaches the
server before its writer returns.

**Blue-green rebuild** (:class:`Rebuilder`, one daemon thread; Qdrant's optimizer is the
model): triggered by the delta's size, the tombstone ratio, drift of the statistics (fitted on
the delta and compared with the index's), a missing index, or by hand. Steps:

1. flush the applier (the build then covers every acknowledged fingerprint), forget the
   retirements LMDB already holds (``server.prune_retired``: every later one stays remembered
   with its LSN, since the build may read LMDB at an ``A`` older than it), ``server.begin_build``
   (``index_status`` reports the build);
2. the build (``index.build.run_build``) reads LMDB at ``applied_lsn = A`` in one read
   transaction, with no store lock held, in this thread (small libraries) or in a child process
   (large ones: no GIL contention with queries, ``index_build_threads`` FAISS threads);
3. the new file's checksums are verified and it is loaded (child builds);
4. ``server.swap`` under the server lock: tombstones = retirements after ``A`` of ids in the new
   index; delta = entries newer than ``A``, re-embedded under the new statistics;
5. ``build-<id>.faiss`` is renamed to ``main.faiss`` (atomic, directory synced);
6. the neighbour lists are written to LMDB in chunks, then lists of older builds are swept;
7. the old index is dropped (after the lock, so no query waits for its memory to be freed).

A crash anywhere leaves either the old ``main.faiss`` or the new one, both valid; the next attach
catches either up from LMDB, so results are correct whichever survived.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from xpstore.errors import StoreCorruptionError, XpStoreError
from xpstore.index import neighbors as nbrs
from xpstore.index.backends import faiss_threads
from xpstore.index.build import MIN_FIT_ROWS, BuildPlan, embedder_from_record, run_build
from xpstore.index.delta import Delta
from xpstore.index.embedding import AudioStats, HybridEmbedder
from xpstore.index.history import append_build
from xpstore.index.index_file import load, read_meta
from xpstore.index.live import Library, LiveSet, aligned_names, read_library, stats_entry
from xpstore.index.rows import (
    RawFingerprint,
    parse_fingerprint,
    raw_from_model,
)
from xpstore.index.serving import BuildInfo, IndexServer, MainIndex
from xpstore.model.columns import FingerprintColumns
from xpstore.model.events import Acknowledged, BulkEvent, IndexRow, IndexRows
from xpstore.model.records import Fingerprint, Record
from xpstore.persistence import fs
from xpstore.persistence.crashpoints import crash_point
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.telemetry import Telemetry

if TYPE_CHECKING:
    from xpstore.config import IndexSettings
    from xpstore.persistence.overlay import Overlay, Subscription

__all__ = ["MAIN_FILE", "IndexManager", "check_file_at_open"]

log = logging.getLogger(__name__)

MAIN_FILE = "main.faiss"
_DRIFT_CHECK_S = 5.0
_CATCH_UP_CHUNK = 65_536


def index_dir(root: Path) -> Path:
    return root / "index"


def check_file_at_open(root: Path, store_id: int, applied_lsn: int) -> None:
    """At a writer's open, after recovery: drop an index file that cannot be caught up.

    A file from another store (an in-place restore gave this one a new id) or covering LSNs
    beyond what LMDB holds (a damaged WAL tail was cut off, so those LSNs will be reused by new
    records) would serve vectors of records that no longer exist under those ids. Leftovers of
    an interrupted build are removed as well. Reads only the file's header and meta.
    """
    folder = index_dir(root)
    if not folder.is_dir():
        return
    for leftover in list(folder.glob("build-*")) + list(folder.glob("neighbors-*")) + list(
        folder.glob("*.tmp")
    ):
        fs.unlink(leftover, missing_ok=True)
    main = folder / MAIN_FILE
    if not main.exists():
        return
    reason = None
    try:
        meta = read_meta(main)
        build = meta.build or {}
        if build.get("store_id") != store_id:
            reason = f"it belongs to store {build.get('store_id')}, not {store_id}"
        elif meta.lsn > applied_lsn:
            reason = f"it covers LSN {meta.lsn}, beyond the store's {applied_lsn}"
    except XpStoreError as exc:
        reason = str(exc)
    if reason is not None:
        log.warning("removing index file %s: %s; it will be rebuilt", main, reason)
        fs.unlink(main, missing_ok=True)
        fs.fsync_dir(folder)


class IndexManager:
    """Owns the :class:`IndexServer` of one open store and its :class:`Rebuilder`."""

    def __init__(
        self,
        *,
        root: Path,
        tables: LmdbTables,
        settings: IndexSettings,
        store_id: int,
        embedding_dim: int | None,
        overlay: Overlay | None,
        readonly: bool,
        flush: Callable[[], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.root = root
        self.telemetry = telemetry or Telemetry()
        self.dir = index_dir(root)
        self.tables = tables
        self.settings = settings
        self.store_id = store_id
        self.embedding_dim = embedding_dim
        self.overlay = overlay
        self.readonly = readonly
        self.flush = flush  # applies every acknowledged operation to LMDB (None: cannot)
        self.server: IndexServer | None = None
        self._sub: Subscription | None = None
        self.rebuilder: Rebuilder | None = None
        self.listener_errors = 0
        self.attached_lsn = 0  # read-only: LMDB applied_lsn at the last catch-up
        self.attached_at = 0.0
        self._refit_lock = threading.Lock()
        self._fitted_version = -1  # server.version at the last ensure_library_stats refit
        self._fitted_at_attach = False
        self.on_rebuilt: list[Callable[[BuildInfo], None]] = []
        """Called after each rebuild is swapped in and its neighbour lists stored (the
        rebuilder's thread; a callback must not raise): prewarming, memory-pressure re-apply."""
        self.rebuilds_paused = False
        """Set under memory pressure (``store.parts.pressure``): no build starts, requested
        or triggered, until it is cleared."""

    # ---------------------------------------------------------------- attach
    def attach(self) -> IndexServer:
        """Load, catch up and start serving (see the module doc)."""
        ov = self.overlay
        ov_tracks: dict[str, tuple[int, int | None]] = {}
        ov_values: dict[int, bytes] = {}
        sub = None
        if ov is not None:
            sub, unapplied = ov.subscribe(self._on_durable)
            for eff in unapplied:
                if eff.track is not None:
                    ov_tracks[eff.track] = (eff.lsn, eff.track_to)
                if eff.record_id is not None and eff.kind == "fingerprint":
                    if eff.value is None:
                        ov_values.pop(eff.record_id, None)
                    else:
                        ov_values[eff.record_id] = eff.value
        try:
            server = self._build_server(ov_tracks, ov_values)
        except BaseException:
            if sub is not None:
                sub.cancel()
            raise
        self.server = server
        self._sub = sub
        if sub is not None:
            sub.start()  # the batches acknowledged since subscribe, then every later one
        if not self.readonly:
            self.rebuilder = Rebuilder(self)
            server.on_change = self.rebuilder.poke
            auto = self.settings.auto_rebuild
            if auto and server.main.backend is None and server.live_count() > 0:
                self.rebuilder.request("no index yet")  # before start: one build, not two
            self.rebuilder.start()
        return server

    def _build_server(
        self, ov_tracks: dict[str, tuple[int, int | None]], ov_values: dict[int, bytes]
    ) -> IndexServer:
        main = self._load_main()
        main_ids = main.ids

        def wanted(live_ids: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
            if not main_ids.size:
                return live_ids
            return np.setdiff1d(live_ids, main_ids, assume_unique=True)

        lib = read_library(self.tables, main.embedder.embedding_dim, wanted,
                           overlay_values=ov_values, overlay_tracks=ov_tracks,
                           writable=not self.readonly)  # fmt: skip
        live = lib.live
        tombs = {int(r) for r in np.setdiff1d(main.ids, live.rids, assume_unique=True)}
        delta = Delta(main.embedder.dim, self.embedding_dim)
        if len(lib.rows):
            if len(lib.rows) > 10_000:
                log.warning(
                    "index catch-up: %d live fingerprints are not in the index file; serving "
                    "them exactly from the delta until the rebuild that was scheduled",
                    len(lib.rows),
                )
            main, delta = self._catch_up(main, lib)
        self.attached_lsn = lib.applied_lsn
        self.attached_at = time.monotonic()
        log.info(
            "index attached: main %d vectors (build %s), delta %d, tombstones %d",
            len(main),
            main.build.build_id if main.build else None,
            len(delta),
            len(tombs),
        )
        main = replace(main, tracks=aligned_names(main.ids, live))
        server = IndexServer(main, delta, tombs)
        configure_server(server, self.settings)
        if self._fitted_at_attach:
            self._fitted_version = server.version  # the statistics are the library's already
        return server

    def _catch_up(self, main: MainIndex, lib: Library) -> tuple[MainIndex, Delta]:
        """The live fingerprints the index file lacks (``lib.rows``, read from the ``fprows``
        table in columns: ``index.live``) as an exact delta.

        With no main index at all (no file, or an unusable one) the library's statistics are
        fitted here, as :meth:`ensure_library_stats` would before the first answer, so the
        first ``similar`` after opening a large store without an index file costs one exact
        search, not a refit of the whole delta; statistics cached for exactly this live set
        (``fpstats``) are used instead of a fit, and a fit is cached."""
        rows = lib.rows
        embedder = main.embedder
        if main.backend is None and len(rows) >= MIN_FIT_ROWS:
            mode = self.settings.mode
            stats = lib.cached_stats(mode)
            if stats is None:
                stats = AudioStats.fit(rows.audio, mode, ids=rows.ids)
                if not self.readonly:
                    try:
                        self.tables.put_meta("fpstats", stats_entry(stats, lib.digest, len(rows)))
                    except XpStoreError as exc:  # a cache: the answer does not depend on it
                        log.warning("could not cache the library statistics: %s", exc)
            embedder = self.plan(0).embedder(stats)
            main = replace(main, embedder=embedder, generation=main.generation + 1)
            self._fitted_at_attach = True
        vecs = embedder.embed_rows(rows.audio, rows.embedding, rows.has_embedding)
        delta = Delta(embedder.dim, self.embedding_dim)
        delta.add_many(rows.ids, rows.track_ids, rows.audio, rows.embedding, rows.has_embedding,
                       vecs, owned=True)  # the library was read for this delta alone
        return main, delta

    def _load_main(self) -> MainIndex:
        path = self.dir / MAIN_FILE
        embedder = self.plan(0).embedder(AudioStats.prior(self.settings.mode))
        empty = MainIndex(None, embedder, np.zeros(0, dtype=np.int64), None, 0)
        if not path.exists():
            return empty
        try:
            backend, meta = load(path)
            if meta.build is None or meta.stats is None:
                raise StoreCorruptionError(f"index file {path} lacks its build or statistics")
            info = BuildInfo.from_json(_without(meta.build, "store_id"))
            if meta.build.get("store_id") != self.store_id:
                raise StoreCorruptionError(f"index file {path} belongs to another store")
            stats = AudioStats.from_dict(meta.stats)
            if info.embedder is not None:
                embedder = embedder_from_record(info.embedder, stats, self.embedding_dim)
            else:
                embedder = self.plan(0).embedder(stats)
            if embedder.dim != backend.dim:
                raise StoreCorruptionError(
                    f"index file {path} has dimension {backend.dim}, the store embeds to "
                    f"{embedder.dim}"
                )
        except XpStoreError as exc:
            log.warning("index file not usable (%s); serving from LMDB and rebuilding", exc)
            return empty
        return MainIndex(backend, embedder, backend.ids(), info, 1)

    # ---------------------------------------------------------------- statistics
    def ensure_library_stats(self) -> None:
        """Before an answer: statistics fitted on the library, whatever the background timing.

        Until a build has fitted statistics (no main index, or one built from fewer than
        ``MIN_FIT_ROWS`` fingerprints on the prior statistics), a library of at least
        ``MIN_FIT_ROWS`` fingerprints is served from the exact delta embedded with statistics
        fitted on every live fingerprint, refitted whenever the live set changed. A build of the
        same library fits the same statistics (the fit does not depend on row order), so answers
        before and after the first build agree. A main index on the prior statistics is folded
        into the delta (its few raw values are read back from LMDB) and a build is requested.
        """
        server = self.server
        if server is None or server.version == self._fitted_version:
            return
        build = server.main.build
        if build is not None and build.count >= MIN_FIT_ROWS:
            return
        if server.live_count() < MIN_FIT_ROWS:
            return
        with self._refit_lock:
            server = self.server
            if server is None or server.version == self._fitted_version:
                return
            main = server.main
            generation = main.generation
            extra = self._main_raws(server) if main.backend is not None else []
            with server.lock:
                rows = server.delta.rows()
            audio = np.vstack([rows.audio, *[raw.audio[None, :] for _rid, raw in extra]])
            ids = np.concatenate([rows.ids, np.array([rid for rid, _raw in extra], np.int64)])
            stats = AudioStats.fit(audio, self.settings.mode, ids=ids)
            if server.refit(self.plan(0).embedder(stats), extra, generation):
                self._fitted_version = server.version
                if extra and self.rebuilder is not None and self.settings.auto_rebuild:
                    self.rebuilder.request("library statistics replace the prior")

    def _main_raws(self, server: IndexServer) -> list[tuple[int, RawFingerprint]]:
        """The raw values of the live ids of a (small) main index, read from LMDB."""
        tombs = set(server.tombs)
        out: list[tuple[int, RawFingerprint]] = []
        with self.tables.reading() as txn:
            for rid in server.main.ids.tolist():
                if rid in tombs:
                    continue
                data = self.tables.get_record(txn, rid)
                if data is None:
                    raise StoreCorruptionError(f"index holds record {rid}, missing from LMDB")
                out.append((rid, parse_fingerprint(data, f"record {rid}")))
        return out

    # ---------------------------------------------------------------- ack path
    def _on_durable(self, batch: Acknowledged) -> None:
        """Overlay subscriber (WAL leader, before the batch's writers return): never raises."""
        try:
            server = self.server
            if server is None:
                return
            server.touch()  # first: see IndexService._lookup
            if server.answers:
                server.forget(batch.record_ids())
            for segment in batch.track_segments():
                if isinstance(segment, BulkEvent):
                    server.apply_bulk(segment)
                    self.telemetry.incr("index.track_events", len(segment.rows.track_ids))
                elif segment:
                    server.apply_events(segment)
                    self.telemetry.incr("index.track_events", len(segment))
        except Exception:
            self.listener_errors += 1
            log.exception("index update on the acknowledgement path failed; re-attaching")
            self.server = None  # the next query re-attaches from LMDB and the overlay

    def precompute(self, records: Sequence[Record]) -> dict[int, IndexRow]:
        """Index rows of the fingerprints in a put batch, by position (writer thread, no lock)."""
        server = self.server
        if server is None:
            return {}
        pos = [i for i, r in enumerate(records) if type(r) is Fingerprint]
        if not pos:
            return {}
        raws = [raw_from_model(cast(Fingerprint, records[i])) for i in pos]
        gen = server.generation
        vecs = _embed_raws(server.embedder, raws)
        return {i: IndexRow(raws[j], vecs[j], gen) for j, i in enumerate(pos)}

    def precompute_columns(self, cols: FingerprintColumns) -> IndexRows | None:
        """:meth:`precompute` of a ``put_fingerprints`` batch, vectorized (writer thread)."""
        server = self.server
        if server is None:
            return None
        embedder = server.embedder
        n = len(cols)
        emb = has = None
        if embedder.embedding_dim is not None:
            emb = np.zeros((n, embedder.embedding_dim), dtype=np.float32)
            has = np.zeros(n, dtype=bool)
            if cols.embeddings is not None and cols.embeddings.shape[1] == embedder.embedding_dim:
                emb[:] = cols.embeddings
                has[:] = True
        gen = server.generation
        audio = cols.audio()
        vecs = embedder.embed_rows(audio, emb, has)
        return IndexRows(cols.track_ids, audio, emb, has, vecs, gen)

    # ---------------------------------------------------------------- config
    def plan(self, build_id: int) -> BuildPlan:
        cfg = self.settings
        dim_weights: dict[str, float] | None = None
        source = "default"
        if cfg.dim_weights == "learned":
            assert cfg.learned is not None  # the config refuses "learned" without weights
            dim_weights = dict(cfg.learned.weights)
            source = f"learned v{cfg.learned.version}"
        elif cfg.dim_weights:
            dim_weights = dict(cfg.dim_weights)
            source = "custom"
        return BuildPlan(
            build_id=build_id,
            mode=cfg.mode,
            audio_weight=cfg.audio_weight,
            embedding_weight=cfg.embedding_weight,
            dim_weights=dim_weights,
            dim_weights_source=source,
            embedding_dim=self.embedding_dim,
            exact_below=cfg.exact_below,
            hnsw_below=cfg.hnsw_below,
            hnsw={
                "m": cfg.hnsw_m,
                "ef_construction": cfg.ef_construction,
                "ef_search": cfg.ef_search,
            },
            nprobe=cfg.nprobe,
            threads=cfg.build_threads,
            neighbors_k=cfg.neighbors_k,
            store_id=self.store_id,
        )

    def close(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None
        if self.rebuilder is not None:
            self.rebuilder.stop()
            self.rebuilder = None
        self.server = None


def aligned_tracks(ids: np.ndarray[Any, Any], live: dict[str, int]) -> np.ndarray[Any, Any]:
    """The track of each of ``ids`` by the live map track -> id; None where an id is not live
    (an object array aligned with ``ids``: the main index's answers need no LMDB)."""
    names = np.empty(len(live), dtype=object)
    names[:] = list(live)
    rids = np.fromiter(live.values(), dtype=np.int64, count=len(live))
    order = np.argsort(rids, kind="stable")
    return aligned_names(ids, LiveSet(rids[order], names[order]))


def configure_server(server: IndexServer, cfg: IndexSettings) -> None:
    """The live serving knobs of ``cfg``: query threads, search defaults, answer cache size."""
    server.query_threads = cfg.query_threads
    server.search_defaults = {"ef_search": cfg.ef_search, "nprobe": cfg.nprobe}
    server.answers_max = cfg.answer_cache
    server.shrink_answers(cfg.answer_cache)


def _without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def _embed_raws(embedder: HybridEmbedder, raws: list[RawFingerprint]) -> np.ndarray[Any, Any]:
    n = len(raws)
    audio = np.vstack([r.audio for r in raws]) if n else np.zeros((0, 25))
    emb = None
    has = None
    if embedder.embedding_dim is not None:
        emb = np.zeros((n, embedder.embedding_dim), dtype=np.float32)
        has = np.zeros(n, dtype=bool)
        for i, r in enumerate(raws):
            if r.embedding is not None and r.embedding.shape[0] == embedder.embedding_dim:
                emb[i] = r.embedding
                has[i] = True
    return embedder.embed_rows(audio, emb, has)


# --------------------------------------------------------------------------- rebuilds


class Rebuilder:
    """The background thread that decides when to rebuild and runs the blue-green protocol."""

    def __init__(self, manager: IndexManager) -> None:
        self.m = manager
        self._cond = threading.Condition()
        self._stop = False
        self._requested: str | None = None
        self._waiters: list[threading.Event] = []
        self._proc: subprocess.Popen[str] | None = None
        self._last_drift_check = 0.0
        self._failures = 0
        self._next_try = 0.0
        self.last_error: str | None = None
        self.last_reason: str | None = None
        self.building_since: float | None = None
        self.builds = 0
        self._thread = threading.Thread(target=self._run, name="xpstore-index", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self._thread.join(timeout=60)

    def poke(self) -> None:
        """Called after every change (ack path): wake the thread only when a trigger holds."""
        if self._trigger() is not None:
            with self._cond:
                self._cond.notify_all()

    def wake(self) -> None:
        """Re-check now (rebuilds were resumed, or the settings changed)."""
        with self._cond:
            self._cond.notify_all()

    def request(self, reason: str) -> threading.Event:
        """Ask for a build now; the event is set when it is done (or failed: see last_error)."""
        done = threading.Event()
        with self._cond:
            self._requested = reason
            self._waiters.append(done)
            self._cond.notify_all()
        return done

    def _applied(self) -> int:
        tables = self.m.tables
        with tables.reading() as txn:
            return tables.applied_lsn(txn)

    def _trigger(self) -> str | None:
        server = self.m.server
        cfg = self.m.settings
        if server is None or not cfg.auto_rebuild:
            return None
        main_n = len(server.main)
        delta_n = len(server.delta)
        scaled = max(cfg.delta_min, int(cfg.delta_ratio * main_n))
        limit = min(cfg.delta_max, scaled)
        if delta_n >= limit:
            return f"delta holds {delta_n} vectors (limit {limit})"
        tombs = len(server.tombs)
        if main_n and tombs >= 64 and tombs >= cfg.tombstone_ratio * main_n:
            return f"{tombs} tombstones in an index of {main_n}"
        return None

    def _drift(self) -> str | None:
        server = self.m.server
        now = time.monotonic()
        if server is None or now - self._last_drift_check < _DRIFT_CHECK_S:
            return None
        if not self.m.settings.auto_rebuild:
            return None
        self._last_drift_check = now
        if len(server.delta) < max(MIN_FIT_ROWS, 256):
            return None
        with server.lock:
            rows = server.delta.rows()
        current = server.embedder.stats
        fresh = AudioStats.fit(rows.audio, current.mode, ids=rows.ids)
        drift = current.drift(fresh)
        if drift > self.m.settings.drift_max:
            return f"statistics drifted by {drift:.2f} scale units"
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                reason: str | None = None
                while not self._stop:
                    reason = None if self.m.rebuilds_paused else self._requested
                    due = time.monotonic() >= self._next_try and not self.m.rebuilds_paused
                    if reason is None and due:
                        reason = self._trigger() or self._drift()
                    if reason is not None:
                        break
                    self._cond.wait(1.0)
                    if self.m.server is not None:
                        self.m.server.prune_retired(self._applied())
                if self._stop:
                    for w in self._waiters:
                        w.set()
                    return
                assert reason is not None
                self._requested = None
                waiters, self._waiters = self._waiters, []
            try:
                self.rebuild(reason)
                self._failures = 0
                self.last_error = None
            except Exception as exc:
                self._failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._next_try = time.monotonic() + min(300.0, 2.0**self._failures)
                log.exception("index rebuild failed (%s); retrying later", reason)
            finally:
                for w in waiters:
                    w.set()

    # ---------------------------------------------------------------- the protocol
    def rebuild(self, reason: str) -> BuildInfo:
        m = self.m
        server = m.server
        if server is None:
            raise XpStoreError("the index is not attached")
        self.last_reason = reason
        build_id = self._next_build_id(server)
        plan = m.plan(build_id)
        folder = m.dir
        fs.mkdir(folder, exist_ok=True)
        out = folder / f"build-{build_id}.faiss"
        nb_path = folder / f"neighbors-{build_id}.bin" if plan.neighbors_k > 0 else None
        if m.flush is not None:
            m.flush()  # the build then covers every acknowledged fingerprint
        with m.tables.reading() as txn:
            n_tracks = txn.stat(m.tables.db(b"tracks"))["entries"]
        cfg = m.settings
        in_process = cfg.build_in == "process" or (
            cfg.build_in == "auto" and n_tracks >= cfg.process_above
        )
        log.info("index rebuild %d started (%s), %d tracks, %s", build_id, reason, n_tracks,
                 "child process" if in_process else "thread")  # fmt: skip
        server.prune_retired(self._applied())  # before: the build reads at A >= this
        server.begin_build()
        self.building_since = time.time()
        try:
            crash_point("index.build.started")
            if in_process:
                backend, info, stats = self._build_in_child(plan, out, nb_path)
            else:
                with faiss_threads(plan.threads):
                    outcome = run_build(m.tables, plan, out, nb_path)
                assert outcome.backend is not None
                backend, info, stats = outcome.backend, outcome.info, outcome.stats
            ids = backend.ids()
            tracks = aligned_names(np.sort(ids), self._live_tracks())
            crash_point("index.build.before_swap")
            old = server.swap(backend, plan.embedder(stats), info, ids, tracks)
            crash_point("index.swap.after_swap")
            fs.replace(out, folder / MAIN_FILE)
            fs.fsync_dir(folder)
            crash_point("index.swap.after_rename")
        except BaseException:
            server.abort_build()
            fs.unlink(out, missing_ok=True)
            if nb_path is not None:
                fs.unlink(nb_path, missing_ok=True)
            raise
        finally:
            self.building_since = None
        del old  # the previous main index is freed here, outside every lock
        if nb_path is not None:
            self._store_neighbors(nb_path, build_id)
        self.builds += 1
        self.m.telemetry.observe("index.rebuild", info.duration_s)
        append_build(folder, info, self.last_reason)
        for callback in list(self.m.on_rebuilt):
            try:
                callback(info)
            except Exception:
                log.exception("an after-rebuild callback failed")
        log.info("index rebuild %d done: %s, %d vectors, %.2f s, recall@10 %s", build_id,
                 info.kind, info.count, info.duration_s, info.recall_at_10)  # fmt: skip
        return info

    def _live_tracks(self) -> LiveSet:
        """The LMDB track map (a build's ids that are not in it are retired: tombstones)."""
        tables = self.m.tables
        with tables.reading() as txn:
            db = tables.db(b"tracks")
            names = [str(k, "utf-8") for k in txn.cursor(db=db).iternext(keys=True, values=False)]
            ids = b"".join(txn.cursor(db=db).iternext(keys=False, values=True))
        return LiveSet.from_table(names, ids)

    def _next_build_id(self, server: IndexServer) -> int:
        current = server.main.build.build_id if server.main.build is not None else 0
        return max(current, self.builds) + 1

    def _build_in_child(
        self, plan: BuildPlan, out: Path, nb_path: Path | None
    ) -> tuple[Any, BuildInfo, AudioStats]:
        m = self.m
        plan_json = json.dumps(asdict(plan))
        cmd = [
            sys.executable, "-m", "xpstore.index.build",
            "--data", str(m.tables.path), "--plan", plan_json, "--out", str(out),
            "--parent", str(os.getpid()),
            "--map-size", str(int(m.tables.env.info()["map_size"])),
        ]  # fmt: skip
        if nb_path is not None:
            cmd += ["--neighbors", str(nb_path)]
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(plan.threads)
        env.pop("XPSTORE_CRASH_AT", None)  # crash points are the parent's
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        try:
            stdout, stderr = self._proc.communicate()
        finally:
            rc = self._proc.returncode
            self._proc = None
        if rc != 0:
            tail = (stderr or "").strip().splitlines()[-5:]
            raise XpStoreError(f"index build process failed (exit {rc}): {' | '.join(tail)}")
        if not stdout.strip():
            raise XpStoreError("index build process printed no result")
        backend, meta = load(out)  # verifies both checksums before FAISS reads a byte
        if meta.build is None or meta.stats is None:
            raise StoreCorruptionError(f"index file {out} lacks its build or statistics")
        info = BuildInfo.from_json(_without(meta.build, "store_id"))
        return backend, info, AudioStats.from_dict(meta.stats)

    def _store_neighbors(self, path: Path, build_id: int) -> None:
        tables = self.m.tables
        try:
            for n, chunk in enumerate(nbrs.read_file(path)):
                tables.put_neighbors(chunk)
                if n == 0:
                    crash_point("index.neighbors.partial")
            removed = tables.sweep_neighbors(lambda v: nbrs.build_of(v) == build_id)
            log.debug("neighbour lists of build %d stored; %d stale removed", build_id, removed)
        finally:
            fs.unlink(path, missing_ok=True)
