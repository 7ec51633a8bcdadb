"""The Store facade (DESIGN §8): it opens the engine, builds one component per capability and
delegates every public method to one of them. It holds no logic of its own.

A record's path: ``put`` -> :class:`~xpstore.store.writer.Writer` (validate, encode, derive,
WAL group commit) -> the overlay, published to its subscribers (the k-NN index, the sampler)
before the writer returns -> the applier -> LMDB. Reads go overlay first, then LMDB
(:class:`~xpstore.store.reader.Reader`). docs/design.md draws the map.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy.typing as npt

from xpstore.config import StoreConfig, ValidationCalibration, dotted_items
from xpstore.errors import XpStoreError
from xpstore.index.neighbors import Neighbor
from xpstore.model.progress import ProgressFn
from xpstore.model.records import Experience, Fingerprint, Record
from xpstore.ops.compaction import CompactReport
from xpstore.ops.inspect import CheckReport, Progress
from xpstore.ops.replay import ReplayItem
from xpstore.ops.snapshots import SnapshotInfo
from xpstore.persistence.wal_recovery import RecoveryReport
from xpstore.store.batch import WriteBatch
from xpstore.store.engine import Engine, checked_changes, open_engine
from xpstore.store.parts import StoreParts, compose
from xpstore.store.sampling_service import SampleBatch
from xpstore.store.similarity import SimilarityReport
from xpstore.store.streaming_service import StreamingPut
from xpstore.store.validation_service import ValidationResult

__all__ = ["Store", "StoreParts"]

log = logging.getLogger(__name__)


class Store:
    """A persistent experience store. Open with :meth:`Store.open`; use as a context manager."""

    def __init__(self, engine: Engine) -> None:
        """Compose the components over an opened engine (use :meth:`Store.open`)."""
        self.path = engine.path
        self.readonly = engine.readonly
        self.store_id = engine.store_id
        self.recovery_report: RecoveryReport | None = engine.recovery_report
        self.parts = compose(engine)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = False,
        readonly: bool = False,
        durability: str | None = None,
        recovery_mode: str | None = None,
        config: StoreConfig | Mapping[str, Any] | None = None,
        to_lsn: int | None = None,
        progress: ProgressFn | None = None,
        **overrides: Any,
    ) -> Store:
        """Open (``create=True``: create) the store at ``path``. ``config``/keyword overrides
        (flat or dotted names) apply to this session and persist for a new store; ``to_lsn``
        goes with ``recovery_mode="point_in_time"``; ``progress(phase, done, total, unit)``
        follows the WAL replay. Raises StoreNotFoundError, FormatVersionError, StoreLockedError,
        WALCorruptionError, LmdbCorruptionError (docs/recovery.md)."""
        given = dotted_items(config or {})
        given.update(dotted_items(overrides))
        given.update(dotted_items({"durability": durability, "recovery_mode": recovery_mode}))
        session = {k: v for k, v in given.items() if v is not None}
        engine = open_engine(Path(path), create=create, readonly=readonly, overrides=session,
                             to_lsn=to_lsn, progress=progress)  # fmt: skip
        return cls(engine)

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Flush the WAL, apply what is pending to LMDB (unless the applier is held), release."""
        p = self.parts
        engine = p.engine
        if engine.closed:
            return
        try:
            p.sampling.close()  # logs pending retrieval counts: before writes are refused
        except XpStoreError:
            log.exception("could not save the sampler's state at close")
        with engine.write_lock:
            engine.closed = True
        p.index.close()
        p.validation.close()
        if engine.applier is not None:
            engine.applier.join_tasks(timeout=30.0)
        engine.shutdown()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        closed = self.parts.engine.closed
        state = "closed" if closed else ("read-only" if self.readonly else "open")
        return f"<Store {str(self.path)!r} {state}>"

    @property
    def config(self) -> StoreConfig:
        """The settings in force: the persisted ones with this session's overrides on top."""
        return self.parts.engine.config

    @property
    def embedding_dim(self) -> int | None:
        """The dimension of ``Fingerprint.embedding`` in this store, once fixed (else None)."""
        return self.parts.engine.embedding_dim

    def reconfigure(self, **changes: Any) -> StoreConfig:
        """Change persisted settings in :data:`xpstore.config.LIVE` through the WAL and apply
        them live; return the config in force (others raise InvalidArgumentError)."""
        engine = self.parts.engine
        engine.writable()
        if not changes:
            return engine.config
        return self.parts.writer.log_settings(checked_changes(engine, changes))

    # --------------------------------------------------------------- writes
    def put(self, record: Record | Mapping[str, Any]) -> int:
        """Store one record durably; return its id (the LSN of the put)."""
        return self.parts.writer.put_many([record])[0]

    def check_record(self, record: Record | Mapping[str, Any]) -> None:
        """Raise what ``put(record)`` would raise for an invalid record, writing nothing."""
        self.parts.writer.check(record)

    def put_many(self, records: Iterable[Record | Mapping[str, Any]]) -> list[int]:
        """Store records atomically (one WAL frame, one sync); return their ids in order."""
        return self.parts.writer.put_many(records)

    def put_fingerprints(
        self, track_ids: Sequence[str], batch: Any = None, **columns: Any
    ) -> list[int]:
        """Store fingerprints given in columns, one frame (docs/index.md#bulk-ingest)."""
        return self.parts.bulk.put(track_ids, batch, **columns)

    def batch(self) -> WriteBatch:
        """Several writes as one WAL frame (one fsync, all or nothing) when ``with`` ends."""
        self.parts.engine.writable()
        return WriteBatch(self.parts.writer)

    def update(self, id: int, **changes: Any) -> Experience:
        """Change the mutable fields of record ``id`` (same id, through the WAL); return it."""
        self.parts.writer.update(id, dict(changes))
        return self.parts.reader.get(id)

    def delete(self, id: int) -> None:
        """Delete record ``id``; a tombstone keeps its LSN. RecordNotFoundError if absent."""
        self.parts.writer.delete(id)

    def delete_track(self, track_id: str) -> None:
        """Remove ``track_id`` from fingerprint lookups; its fingerprint history stays."""
        self.parts.writer.delete_track(track_id)

    def flush(self) -> None:
        """Apply every acknowledged operation to LMDB now and checkpoint (tests, operators)."""
        engine = self.parts.engine
        wal = engine.writable()
        applier = engine.applier
        assert applier is not None
        if applier.hold:
            raise XpStoreError("the applier is held (hold_applier=True); nothing to flush into")
        applier.apply_through(wal.acked_lsn)
        applier.checkpoint()

    # ---------------------------------------------------------------- reads
    def get(self, id: int) -> Experience:
        """The experience envelope of record ``id``; RecordNotFoundError if absent or deleted."""
        return self.parts.reader.get(id)

    def get_fingerprint(self, track_id: str) -> Experience:
        """The current fingerprint envelope of ``track_id``."""
        return self.parts.reader.get_fingerprint(track_id)

    def scan(
        self,
        kind: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        where: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> Iterator[Experience]:
        """Experiences in (ts, id) order; ``since`` inclusive, ``until`` exclusive, on ``ts``."""
        return self.parts.reader.scan(kind, since=since, until=until, where=where, limit=limit)

    def changes(self, since_lsn: int = 0, *, until_lsn: int | None = None) -> Iterator[ReplayItem]:
        """Operations after ``since_lsn`` in LSN order, from the WAL (docs/scale-out.md)."""
        return self.parts.changes.changes(since_lsn, until_lsn)

    def count(self, kind: str | None = None) -> int:
        """Live records (of ``kind``), acknowledged writes included."""
        return self.parts.reader.count(kind)

    def stats(self) -> dict[str, Any]:
        """Counts, LSNs, WAL and LMDB sizes, durability settings: a dict for humans and --json."""
        return self.parts.reader.stats()

    def health(self) -> dict[str, Any]:
        """Overall status and one entry per check (docs/service.md, "Health")."""
        return self.parts.health.report()

    def metrics(self) -> dict[str, float]:
        """Every Prometheus sample by name (the text form: ``parts.metrics.text()``)."""
        return self.parts.metrics.as_dict()

    def check(self, *, progress: Progress | None = None) -> CheckReport:
        """Verify the WAL, every LMDB record, the indexes, counts and snapshots; modify nothing
        (``report.ok``, ``report.problems``; docs/recovery.md)."""
        return self.parts.checker.check(progress)

    def to_arrow(
        self, kind: str, *, where: Mapping[str, Any] | None = None, since: float | None = None,
        until: float | None = None,
    ) -> Any:  # fmt: skip
        """``kind``'s records as a ``pyarrow.Table``, one consistent read (docs/export.md)."""
        return self.parts.export.to_arrow(kind, where, since, until)

    # ------------------------------------------------------- similar tracks
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
        strategy: str | None = None,
    ) -> list[Neighbor]:
        """The ``k`` tracks most similar to ``track_id``, ``fingerprint`` or ``vector``, best
        first (the options: docs/index.md, docs/validation.md)."""
        if strategy is None:  # the index (or Milvus): straight to the configured path
            return self.parts.streaming.batch_search(
                track_id, fingerprint, vector, k=k, weights=weights, exclude_self=exclude_self,
                where=where, precomputed=precomputed, params=params,
            )  # fmt: skip
        return self.parts.streaming.similar(
            strategy, track_id, fingerprint, vector, k=k, weights=weights,
            exclude_self=exclude_self, where=where, precomputed=precomputed, params=params,
        )  # fmt: skip

    def similar_many(
        self, vectors: npt.ArrayLike, *, k: int = 10, params: Mapping[str, int] | None = None
    ) -> list[list[Neighbor]]:
        """``similar(vector=v)`` for each row of ``vectors`` (n, dim), searched as one batch."""
        return self.parts.index.similar_many(vectors, k=k, params=params)

    def track_vector(self, track_id: str) -> npt.NDArray[Any]:
        """The hybrid vector of ``track_id`` as the index embeds it (what ``similar`` uses)."""
        return self.parts.index.track_vector(track_id)

    def index_status(self) -> dict[str, Any]:
        """Kind, size, delta, tombstones, LSN covered, last build (time, duration, recall probe)."""
        return self.parts.index.status()

    def rebuild_index(self, *, wait: bool = True, timeout: float | None = None) -> dict[str, Any]:
        """Rebuild the index blue-green (queries keep being served); ``wait=False``: background."""
        return self.parts.index.rebuild(wait=wait, timeout=timeout)

    def fit_similarity(
        self, groups: Mapping[str, Hashable], *, folds: int = 5, use: bool = False, seed: int = 0
    ) -> SimilarityReport:
        """Learn per-dimension audio weights from ``groups`` (track id -> group label),
        cross-validated by group; logged as ``index.learned`` (docs/validation.md)."""
        return self.parts.similarity.fit(groups, folds, use, seed)

    # ----------------------------------------------------- streaming validation
    def calibrate_validation(
        self, *, target_far: float | None = None, tracks: Sequence[str] | None = None,
        seed: int = 0,
    ) -> ValidationCalibration:  # fmt: skip
        """Calibrate streaming-vs-batch validation to ``target_far`` (docs/validation.md)."""
        return self.parts.validation.calibrate(target_far, tracks, seed)

    def validate_streaming(
        self, track_id: str | None = None, *, streaming: Any = None,
        batch: Mapping[str, float] | None = None, record: bool | None = None,
    ) -> ValidationResult:  # fmt: skip
        """Can streaming values be trusted against batch values? (docs/validation.md)."""
        return self.parts.validation.validate(track_id, streaming, batch, record)

    def put_streaming(
        self, track_id: str, values: Mapping[str, float], confidence: Mapping[str, float],
        chunk_count: int, final: bool = False,
    ) -> StreamingPut:  # fmt: skip
        """Cache a player's streaming values; ``final=True`` writes the fingerprint."""
        return self.parts.streaming.put(track_id, values, confidence, chunk_count, final)

    def streaming_cache_stats(self) -> dict[str, Any]:
        """Entries, bytes and hit/miss/replace/evict counters of the streaming cache."""
        return self.parts.streaming.stats()

    def validate_all_streaming(self, *, only_unvalidated: bool = True) -> dict[str, int]:
        """Validate and record every fingerprint with both parts; counts by outcome."""
        return self.parts.validation.validate_all(only_unvalidated)

    # ------------------------------------------------------------- sampling
    def sample(
        self,
        n: int,
        kind: str | None = None,
        where: Mapping[str, Any] | None = None,
        beta: float | None = None,
        seed: int | None = None,
    ) -> SampleBatch:
        """Draw ``n`` experiences (with replacement) by priority in ``kind``/``where``
        (docs/sampling.md); EmptySampleError when there is nothing to draw from."""
        return self.parts.sampling.sample(n, kind, where, beta, seed)

    def batches(
        self, batch_size: int, *, kind: str = "prediction", where: Mapping[str, Any] | None = None,
        prioritized: bool = True, as_: str = "numpy", features: Sequence[str] | None = None,
        label_names: Sequence[str] | None = None, max_batches: int | None = None,
        seed: int | None = None, count_retrievals: bool = True,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        """Training batches as dicts of arrays (docs/sampling.md, "Batches for learners")."""
        return self.parts.batches.batches(batch_size, kind, where, prioritized, as_, features,
                                          label_names, max_batches, seed,
                                          count_retrievals)  # fmt: skip

    def update_priorities(self, ids: Iterable[int], priorities: Iterable[float]) -> None:
        """Set explicit priorities (finite, > 0; last wins) through the WAL, one sync."""
        self.parts.sampling.update_priorities(ids, priorities)

    def record_feedback(
        self, ids: Iterable[int], success: bool | Sequence[bool], *, count_retrieval: bool = False
    ) -> None:
        """``success_count += 1`` for each id whose use succeeded (through the WAL)."""
        self.parts.sampling.record_feedback(ids, success, count_retrieval)

    def sampling_probabilities(self, kind: str | None = None) -> dict[int, float]:
        """P(i) of every live item of ``kind`` (or the store): for checks and small stores."""
        return self.parts.sampling.probabilities(kind)

    # ------------------------------------------------------------ snapshots
    @property
    def snapshot_dir(self) -> Path:
        """Where this store's snapshots live (``snapshots.dir`` or <store>/snapshots)."""
        return self.parts.snapshots.snapshot_dir

    def snapshot(self, *, progress: ProgressFn | None = None) -> SnapshotInfo:
        """Take a snapshot now holding everything acknowledged before the call."""
        return self.parts.snapshots.snapshot(progress)

    def list_snapshots(self) -> list[SnapshotInfo]:
        """This store's complete snapshots, oldest first (damaged ones are logged, not listed)."""
        return self.parts.snapshots.list_snapshots()

    def verify_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        """Check the manifest and every file's size and sha256; SnapshotError names the file."""
        return self.parts.snapshots.verify_snapshot(snapshot_id)

    def check_snapshots(self, *, checksums: bool = True) -> list[str]:
        """One message per damaged snapshot directory (for ``verify``); empty when all is well."""
        return self.parts.snapshots.check_snapshots(checksums=checksums)

    def restore_snapshot(
        self,
        snapshot_id: str,
        into: str | os.PathLike[str],
        *,
        to_lsn: int | None = None,
        to_time: float | None = None,
        progress: ProgressFn | None = None,
    ) -> Path:
        """Write a new store at ``into`` from a verified snapshot, rolled forward through the
        retained WAL to ``to_lsn``/``to_time``; nothing appears at ``into`` unless it completes."""
        return self.parts.snapshots.restore_snapshot(snapshot_id, into, to_lsn=to_lsn,
                                                     to_time=to_time,
                                                     progress=progress)  # fmt: skip

    def prune_snapshots(self, keep: int) -> list[SnapshotInfo]:
        """Delete all but the newest ``keep`` snapshots of this store; return the removed ones."""
        return self.parts.snapshots.prune_snapshots(keep)

    # ---------------------------------------------------------- maintenance
    def apply_retention(self, now: float | None = None) -> dict[str, int]:
        """Evict what ``retention.rules`` no longer allows (deletes in the WAL); counts by kind."""
        return self.parts.maintenance.apply_retention(now)

    def compact(self, *, progress: ProgressFn | None = None) -> CompactReport:
        """Rewrite LMDB compactly and swap it in, crash-safely (docs/maintenance.md)."""
        return self.parts.maintenance.compact(progress)
