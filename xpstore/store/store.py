"""The Store facade: composes the WAL, the overlay, the applier and LMDB behind DESIGN §8's API.

Write path (``put``/``put_many``/``update``/``delete``/``delete_track``): validate and encode
outside any lock; under the write lock derive the effect against the newest state, park it in the
overlay's pending layer and append the encoded operation to the WAL; then wait, lock-free, for
the group commit that covers it. The WAL leader moves acknowledged effects into the overlay's
durable layer before any waiter returns (read your writes); the applier moves them into LMDB.

Read path: the overlay's durable layer first, then LMDB (short read transactions).
"""

from __future__ import annotations

import heapq
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from xpstore.config import StoreConfig, make_config
from xpstore.errors import (
    InvalidRecordError,
    ReadOnlyStoreError,
    RecordNotFoundError,
    RecordTooLargeError,
    StoreClosedError,
    XpStoreError,
)
from xpstore.model.codec import (
    KIND_CODES,
    DeleteOp,
    DeleteTrackOp,
    Op,
    PutOp,
    UpdateOp,
    decode_envelope,
    decode_op,
    encode_op,
    peek_put,
)
from xpstore.model.effects import Effect, StateView, derive_all, derive_put
from xpstore.model.records import (
    KINDS,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    record_from_json,
)
from xpstore.model.where import compile_where
from xpstore.ops import compaction
from xpstore.ops.snapshots import finish_in_place
from xpstore.persistence import layout as layout_mod
from xpstore.persistence.applier import Applier
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_tables import LmdbTables, from_u64, index_key
from xpstore.persistence.lock import WriterLock
from xpstore.persistence.overlay import MISSING, Overlay
from xpstore.persistence.wal import WalWriter
from xpstore.persistence.wal_recovery import RecoveryReport, recover_wal
from xpstore.store._check_api import CheckAPI
from xpstore.store._index_api import IndexAPI
from xpstore.store._maintenance_api import MaintenanceAPI
from xpstore.store._sample_api import SampleAPI
from xpstore.store._snapshot_api import SnapshotAPI

log = logging.getLogger(__name__)

_SCAN_CHUNK = 512
_RECORD_TYPES = (PredictionOutcome, Fingerprint, QueryMetric)


class Store(SnapshotAPI, MaintenanceAPI, CheckAPI, IndexAPI, SampleAPI):
    """A persistent experience store. Open with :meth:`Store.open`; use as a context manager."""

    def __init__(self, path: Path, config: StoreConfig, readonly: bool) -> None:
        # use Store.open(); __init__ only wires attributes
        self.path = path
        self.config = config
        self.readonly = readonly
        self._layout = Layout(path)
        self._closed = False
        self._wlock = threading.Lock()
        self._overlay = Overlay()
        self._lock: WriterLock | None = None
        self._tables: LmdbTables | None = None
        self._wal: WalWriter | None = None
        self._applier: Applier | None = None
        self._embedding_dim: int | None = None
        self.store_id = 0
        self.recovery_report: RecoveryReport | None = None
        self._to_lsn: int | None = None
        self._salvage_from: tuple[Path, int] | None = None  # (wal dir, store id) to salvage

    # ------------------------------------------------------------------ open
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
        **overrides: Any,
    ) -> Store:
        """Open (or with ``create=True`` create) the store at ``path``.

        ``config`` (or keyword overrides such as ``durability=``, ``hold_applier=``) applies to
        this session; a new store persists it. ``to_lsn`` (with
        ``recovery_mode="point_in_time"``) recovers only the WAL prefix up to that LSN and sets
        the rest aside as ``.broken`` copies. Raises StoreNotFoundError, FormatVersionError,
        StoreLockedError, WALCorruptionError (see ``recovery_mode``).
        """
        root = Path(path)
        lay = Layout(root)
        if not readonly:
            finish_in_place(root)  # an in-place snapshot restore cut off by a crash
        if readonly and create:
            raise InvalidRecordError(
                "create=True and readonly=True exclude each other", field="create"
            )
        is_new = create and not lay.marker.exists()
        if is_new:
            layout_mod.prepare_new(lay)
        else:
            layout_mod.read_marker(lay)
        given = config.model_dump() if isinstance(config, StoreConfig) else dict(config or {})
        given.update(overrides)
        given.update({"durability": durability, "recovery_mode": recovery_mode})
        if to_lsn is not None and (recovery_mode != "point_in_time" or readonly):
            raise InvalidRecordError(
                "to_lsn needs recovery_mode='point_in_time' on a writable open", field="to_lsn"
            )
        store = cls(root, make_config(), readonly)
        store._to_lsn = to_lsn
        try:
            store._open(is_new, {k: v for k, v in given.items() if v is not None})
        except BaseException:
            store._release()
            raise
        return store

    def _open(self, is_new: bool, overrides: dict[str, Any]) -> None:
        if not self.readonly:
            self._lock = WriterLock(self._layout.lock)
            self._lock.acquire()
            compaction.finish_interrupted(self._layout)  # a compaction cut off by a crash
        base = make_config(**overrides) if is_new else None
        map_size = (base or make_config()).map_size
        if "map_size" in overrides:
            map_size = overrides["map_size"]
        self._tables = LmdbTables(self._layout.data, readonly=self.readonly, map_size=map_size)
        if is_new:
            assert base is not None
            self._tables.put_meta("config", base.persisted().to_json().encode())
            self.config = base
            marker = layout_mod.write_marker(self._layout)
        else:
            marker = layout_mod.read_marker(self._layout)
            with self._tables.reading() as txn:
                raw = self._tables.get_meta(txn, "config")
            stored = StoreConfig.from_json(raw.decode()) if raw else make_config()
            self.config = stored.with_overrides(**overrides)
        self.store_id = marker.store_id
        with self._tables.reading() as txn:
            dim = self._tables.get_meta(txn, "embedding_dim")
        self._embedding_dim = int(dim) if dim else self.config.embedding_dim
        if self.readonly:
            return
        self._recover()

    def _recover(self) -> None:
        tables = self._tables
        assert tables is not None
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
        applier = Applier(
            self._overlay,
            tables,
            batch_ops=self.config.apply_batch_ops,
            interval_s=self.config.apply_interval_ms / 1000.0,
            checkpoint_interval_s=self.config.checkpoint_interval_s,
            retain_segments=self.config.wal_retain_segments,
            hold=self.config.hold_applier,
            retain_seconds=self.config.wal_retain_seconds,
        )
        if self._to_lsn is not None and self._to_lsn < applied:
            raise InvalidRecordError(
                f"to_lsn {self._to_lsn} is older than what LMDB already holds (applied_lsn "
                f"{applied}); the WAL cannot take it back: restore a snapshot instead",
                field="to_lsn",
            )
        if self._salvage_from is not None:
            src_wal, src_id = self._salvage_from
            salvaged = self._replay(applier, src_wal, src_id, applied, "salvage", modify=False)
            with tables.reading() as txn:
                applied = tables.applied_lsn(txn)
        report = self._replay(
            applier, self._layout.wal, self.store_id, applied, self.config.recovery_mode,
            modify=True, to_lsn=self._to_lsn,
        )
        if self._salvage_from is not None:
            report = salvaged
        self.recovery_report = report
        if report.replayed_ops or report.warnings:
            log.info(
                "recovered %s: replayed %d operations after LSN %d (%d warnings)",
                self.path,
                report.replayed_ops,
                applied,
                len(report.warnings),
            )
        if (self.path / "index").is_dir():
            from xpstore.index.manager import check_file_at_open

            with tables.reading() as txn:
                check_file_at_open(self.path, self.store_id, tables.applied_lsn(txn))
        next_lsn = max(applied, report.last_lsn) + 1
        self._wal = WalWriter(
            self._layout.wal,
            store_id=self.store_id,
            next_lsn=next_lsn,
            durability=self.config.durability,
            segment_max_bytes=self.config.segment_max_bytes,
            max_frame_bytes=self.config.max_frame_bytes,
            group_commit_ms=self.config.group_commit_ms,
            on_durable=lambda _first, last: self._overlay.make_durable(last),
        )
        self._applier = applier
        applier.attach_wal(self._wal)
        applier.on_wake = self._maybe_apply_retention
        applier.after_batch = self._maybe_auto_snapshot
        self._clean_snapshot_temps()
        applier.checkpoint()
        applier.start()

    def _replay(
        self,
        applier: Applier,
        wal_dir: Path,
        store_id: int,
        applied: int,
        mode: str,
        *,
        modify: bool,
        to_lsn: int | None = None,
    ) -> RecoveryReport:
        """Replay ``wal_dir`` beyond ``applied`` into LMDB through the overlay and ``applier``."""
        def apply(first_lsn: int, ops: list[bytes], _commit_time: float) -> None:
            summaries = [peek_put(raw) for raw in ops]
            view = self._reader_view(s.track_id for s in summaries if s and s.track_id)
            for i, (raw, summary) in enumerate(zip(ops, summaries, strict=True)):
                if summary is not None:
                    effects = [derive_put(
                        first_lsn + i, raw, summary.kind, summary.ts, summary.track_id, view
                    )]  # fmt: skip
                else:
                    effects = _replay_derive(
                        decode_op(raw, validate=False), first_lsn + i, view, raw
                    )
                with self._overlay.lock:
                    for eff in effects:
                        self._overlay.add_durable_locked(eff)
            if len(self._overlay) >= self.config.apply_batch_ops:
                applier.apply_all()

        report = recover_wal(
            wal_dir,
            store_id=store_id,
            applied_lsn=applied,
            mode=mode,
            max_frame_bytes=self.config.max_frame_bytes,
            apply=apply,
            modify=modify,
            to_lsn=to_lsn,
        )
        applier.apply_all()
        return report

    # ----------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Flush the WAL, apply what is pending to LMDB (unless the applier is held), release."""
        if self._closed:
            return
        try:
            self._close_sampler()  # logs pending retrieval counts: before writes are refused
        except XpStoreError:
            log.exception("could not save the sampler's state at close")
        with self._wlock:
            self._closed = True
        self._close_index()
        self._join_retention(timeout=30.0)
        try:
            if self._wal is not None:
                self._wal.close()
            if self._applier is not None:
                poisoned = self._wal is not None and self._wal.poisoned is not None
                self._applier.stop(drain=not poisoned)
        finally:
            self._release()

    def _release(self) -> None:
        self._closed = True
        if self._tables is not None:
            self._tables.close()
            self._tables = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("read-only" if self.readonly else "open")
        return f"<Store {str(self.path)!r} {state}>"

    # --------------------------------------------------------------- writes
    def put(self, record: Record | Mapping[str, Any]) -> int:
        """Store one record durably; return its id (the LSN of the put)."""
        return self.put_many([record])[0]

    def put_many(self, records: Iterable[Record | Mapping[str, Any]]) -> list[int]:
        """Store records atomically (one WAL frame, one sync); return their ids in order."""
        prepared = [self._prepare(r, i) for i, r in enumerate(records)]
        if not prepared:
            return []
        if len(prepared) > self.config.max_batch_records:
            raise RecordTooLargeError(
                f"put_many got {len(prepared)} records, over max_batch_records="
                f"{self.config.max_batch_records}",
                field="records",
            )
        ops: list[Op] = [PutOp(r) for r in prepared]
        payloads = [self._encode(op, i) for i, op in enumerate(ops)]
        first, last = self._submit(ops, payloads, self._index_rows(prepared))
        return list(range(first, last + 1))

    def update(self, id: int, **changes: Any) -> Experience:
        """Change the mutable fields of record ``id`` (same id, through the WAL); return it."""
        if not changes:
            raise InvalidRecordError("update needs at least one field to change", field="changes")
        op = UpdateOp(_record_id(id), dict(changes))
        self._submit([op], [self._encode(op, 0)])
        return self.get(id)

    def delete(self, id: int) -> None:
        """Delete record ``id``; a tombstone keeps its LSN. RecordNotFoundError if absent."""
        op = DeleteOp(_record_id(id))
        self._submit([op], [self._encode(op, 0)])

    def delete_track(self, track_id: str) -> None:
        """Remove ``track_id`` from fingerprint lookups; its fingerprint history stays."""
        op = DeleteTrackOp(str(track_id))
        self._submit([op], [self._encode(op, 0)])

    def _prepare(self, record: Record | Mapping[str, Any], index: int) -> Record:
        """A validated record with its ts filled in; InvalidRecordError names records[index]."""
        rec: Record
        if type(record) in _RECORD_TYPES:  # exact types first: isinstance on ABCs is slow
            rec = cast(Record, record)
        elif isinstance(record, _RECORD_TYPES):
            rec = record
        elif isinstance(record, Mapping):
            try:
                rec = record_from_json(record)
            except InvalidRecordError as exc:
                raise InvalidRecordError(f"records[{index}]: {exc}", field=exc.field) from exc
        else:
            raise InvalidRecordError(
                f"records[{index}]: expected a PredictionOutcome, Fingerprint or QueryMetric "
                f"(or a mapping with a 'kind'), got {type(record).__name__}",
                field="record",
            )
        if rec.ts is None:
            rec = rec.model_copy(update={"ts": time.time()})
        if type(rec) is Fingerprint and rec.embedding is not None:
            dim = self._embedding_dim
            if dim is not None and len(rec.embedding) != dim:
                raise InvalidRecordError(
                    f"records[{index}].embedding: dimension {len(rec.embedding)}, this store's "
                    f"embeddings have dimension {dim}",
                    field="embedding",
                )
        return rec

    def _encode(self, op: Op, index: int) -> bytes:
        payload = encode_op(op)
        if len(payload) > self.config.max_record_bytes:
            raise RecordTooLargeError(
                f"records[{index}] encodes to {len(payload)} bytes, over max_record_bytes="
                f"{self.config.max_record_bytes}",
                field="record",
            )
        return payload

    def _submit(
        self, ops: list[Op], payloads: list[bytes], index_rows: Mapping[int, Any] | None = None
    ) -> tuple[int, int]:
        wal = self._writable()
        with self._wlock:
            wal = self._writable()
            self._fix_embedding_dim(ops)
            view = self._writer_view(ops)
            first = wal.next_lsn
            try:
                for i, op in enumerate(ops):
                    for eff in derive_all(op, first + i, view, payloads[i]):
                        if index_rows:
                            eff.index_row = index_rows.get(i)
                        self._overlay.add_pending(eff)
                span = wal.append(payloads)
            except BaseException:
                self._overlay.drop_pending_from(first)
                raise
        wal.wait(span[1])
        self._backpressure()
        return span

    def _fix_embedding_dim(self, ops: list[Op]) -> None:
        if self._embedding_dim is not None:
            return
        for op in ops:
            if isinstance(op, PutOp) and isinstance(op.record, Fingerprint) and op.record.embedding:
                dim = len(op.record.embedding)
                bad = [
                    i
                    for i, o in enumerate(ops)
                    if isinstance(o, PutOp)
                    and isinstance(o.record, Fingerprint)
                    and o.record.embedding is not None
                    and len(o.record.embedding) != dim
                ]
                if bad:
                    raise InvalidRecordError(
                        f"records[{bad[0]}].embedding: dimensions differ within the batch "
                        f"({dim} first)",
                        field="embedding",
                    )
                assert self._tables is not None
                self._tables.put_meta("embedding_dim", str(dim).encode())
                self._embedding_dim = dim
                return

    def _backpressure(self) -> None:
        applier = self._applier
        if applier is None or applier.hold:
            return
        limit = self.config.max_overlay_ops
        if len(self._overlay) <= limit:
            return
        with self._overlay.changed:
            while len(self._overlay) > limit and applier.error is None and not self._closed:
                self._overlay.changed.wait(0.1)

    def _writable(self) -> WalWriter:
        self._check_open()
        if self.readonly or self._wal is None:
            raise ReadOnlyStoreError(f"store {self.path} is open read-only")
        if self._applier is not None and self._applier.error is not None:
            raise self._applier.error
        return self._wal

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"store {self.path} is closed")

    # --------------------------------------------------------------- views
    def _lmdb_get(self, rid: int) -> Experience | None:
        tables = self._tables
        if tables is None:
            raise StoreClosedError(f"store {self.path} is closed")
        with tables.reading() as txn:
            raw = tables.get_record(txn, rid)
        return decode_envelope(rid, raw) if raw is not None else None

    def _lmdb_track(self, track_id: str) -> int | None:
        tables = self._tables
        if tables is None:
            raise StoreClosedError(f"store {self.path} is closed")
        with tables.reading() as txn:
            return tables.get_track(txn, track_id)

    def _read_get(self, rid: int) -> Experience | None:
        hit = self._overlay.records.get(rid)
        if hit is not None:
            return hit.experience()
        return self._lmdb_get(rid)

    def _read_track(self, track_id: str) -> int | None:
        hit = self._overlay.tracks.get(track_id)
        if hit is not None:
            return hit[1]
        return self._lmdb_track(track_id)

    def _reader_view(self, track_ids: Iterable[str] = ()) -> StateView:
        """Acknowledged state (durable overlay, then LMDB), for replay.

        The LMDB lookups of ``track_ids`` (the tracks a frame's puts touch) are done up front in
        one read transaction instead of one transaction each.
        """
        tracks = self._overlay.tracks
        known = self._lmdb_tracks([t for t in set(track_ids) if t not in tracks])

        def track(track_id: str) -> int | None:
            hit = tracks.get(track_id)
            if hit is not None:
                return hit[1]
            if track_id in known:
                return known[track_id]
            return self._lmdb_track(track_id)

        return StateView(self._read_get, track, self._raw_many(writer=False))

    def _writer_view(self, ops: list[Op]) -> StateView:
        """Newest state for derive(): pending, then durable overlay, then LMDB.

        The LMDB track lookups a batch of fingerprint puts needs are done up front in one read
        transaction (one per fingerprint cost a transaction each on the ingest path).
        """
        ov = self._overlay
        tracks = {
            op.record.track_id
            for op in ops
            if isinstance(op, PutOp) and isinstance(op.record, Fingerprint)
        }
        known = self._lmdb_tracks([t for t in tracks if ov.writer_track(t) is MISSING])

        def get(rid: int) -> Experience | None:
            hit = ov.writer_get(rid)
            return self._lmdb_get(rid) if hit is None else hit.experience()

        def track(track_id: str) -> int | None:
            hit = ov.writer_track(track_id)
            if hit is not MISSING:
                return hit  # type: ignore[return-value]
            if track_id in known:
                return known[track_id]
            return self._lmdb_track(track_id)

        return StateView(get, track, self._raw_many(writer=True))

    def _raw_many(self, *, writer: bool) -> Any:
        """Encoded envelopes of many ids: overlay first (pending too for writers), then LMDB in
        one read transaction (the many-id operations' derive)."""
        ov = self._overlay

        def get_raw_many(ids: list[int]) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            rest: list[int] = []
            for rid in ids:
                eff = ov.writer_get(rid) if writer else ov.records.get(rid)
                if eff is None:
                    rest.append(rid)
                elif eff.value is not None:
                    out[rid] = eff.value
            tables = self._tables
            if rest and tables is not None:
                with tables.reading() as txn:
                    for rid in rest:
                        raw = tables.get_record(txn, rid)
                        if raw is not None:
                            out[rid] = raw
            return out

        return get_raw_many

    def _lmdb_tracks(self, track_ids: list[str]) -> dict[str, int | None]:
        tables = self._tables
        if not track_ids or tables is None:
            return {}
        with tables.reading() as txn:
            return {t: tables.get_track(txn, t) for t in track_ids}

    @property
    def embedding_dim(self) -> int | None:
        """The dimension of ``Fingerprint.embedding`` in this store, once fixed (else None)."""
        return self._embedding_dim

    # ---------------------------------------------------------------- reads
    def get(self, id: int) -> Experience:
        """The experience envelope of record ``id``; RecordNotFoundError if absent or deleted."""
        self._check_open()
        exp = self._read_get(_record_id(id))
        if exp is None:
            raise RecordNotFoundError(f"no record with id {id}")
        return exp

    def get_fingerprint(self, track_id: str) -> Experience:
        """The current fingerprint envelope of ``track_id``."""
        self._check_open()
        rid = self._read_track(track_id)
        if rid is None:
            raise RecordNotFoundError(f"no track {track_id!r}")
        return self.get(rid)

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
        self._check_open()
        kinds = self._kinds(kind)
        predicate = compile_where(where, kinds)
        if limit is not None and limit < 0:
            raise InvalidRecordError("limit must be >= 0", field="limit")
        streams = [self._scan_kind(k, since, until) for k in kinds]
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_order)
        produced = 0
        for exp in merged:
            if limit is not None and produced >= limit:
                return
            if predicate is None or predicate(exp):
                produced += 1
                yield exp

    def _scan_kind(
        self, kind: str, since: float | None, until: float | None
    ) -> Iterator[Experience]:
        code = KIND_CODES[kind]
        lo_ts = since if since is not None else float("-inf")
        hi_ts = until if until is not None else float("inf")
        snapshot = dict(self._overlay.records)  # before LMDB reads: see module docstring
        fresh = sorted(
            (
                eff
                for eff in snapshot.values()
                if eff.value is not None and eff.kind == kind and lo_ts <= eff.ts < hi_ts
            ),
            key=lambda eff: (eff.ts, eff.record_id),
        )
        decoded = (exp for eff in fresh if (exp := eff.experience()) is not None)
        lo = index_key(code, lo_ts, 0)
        hi = index_key(code, hi_ts, 0) if until is not None else bytes((code + 1,))
        yield from heapq.merge(decoded, self._scan_lmdb(code, lo, hi, snapshot), key=_order)

    def _scan_lmdb(
        self, code: int, lo: bytes, hi: bytes, skip: Mapping[int, object]
    ) -> Iterator[Experience]:
        tables = self._tables
        while tables is not None:
            chunk, _applied = tables.index_chunk(code, lo, hi, _SCAN_CHUNK)
            for key, value in chunk:
                rid = from_u64(key[9:])
                if rid not in skip:
                    yield decode_envelope(rid, value)
            if len(chunk) < _SCAN_CHUNK:
                return
            lo = chunk[-1][0] + b"\0"
            tables = self._tables

    def count(self, kind: str | None = None) -> int:
        """Live records (of ``kind``), acknowledged writes included."""
        self._check_open()
        kinds = self._kinds(kind)
        tables = self._tables
        assert tables is not None
        deltas = self._overlay.count_deltas()  # first: see Overlay.count_deltas
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
            counts = tables.counts(txn)
        total = sum(counts.get(KIND_CODES[k], 0) for k in kinds)
        return total + sum(d for lsn, k, d in deltas if lsn > applied and k in kinds)

    def stats(self) -> dict[str, Any]:
        """Counts, LSNs, WAL and LMDB sizes, durability settings: a dict for humans and --json."""
        self._check_open()
        tables = self._tables
        assert tables is not None
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
        wal_files = _sizes(self._layout.wal.glob("*.wal"))
        data_file = self._layout.data / "data.mdb"
        out: dict[str, Any] = {
            "path": str(self.path),
            "readonly": self.readonly,
            "counts": {k: self.count(k) for k in KINDS},
            "applied_lsn": applied,
            "durability": self.config.durability,
            "lmdb": {
                "file_bytes": data_file.stat().st_size if data_file.exists() else 0,
                **tables.stat(),
            },
            "wal": {"segments": len(wal_files), "bytes": sum(wal_files.values())},
        }
        out["lmdb"].update(compaction.lmdb_space(tables))
        out["total"] = sum(out["counts"].values())
        if self._wal is not None:
            st = self._wal.stats
            out["next_lsn"] = self._wal.next_lsn
            out["acked_lsn"] = self._wal.acked_lsn
            out["unapplied_ops"] = len(self._overlay)
            out["wal"].update(
                frames=st.frames,
                syncs=st.syncs,
                ops=st.ops,
                rotations=st.rotations,
                ops_per_sync=round(st.ops / st.syncs, 2) if st.syncs else None,
            )
        return out

    def flush(self) -> None:
        """Apply every acknowledged operation to LMDB now and checkpoint (tests, operators)."""
        self._writable()
        assert self._applier is not None
        if self._applier.hold:
            raise XpStoreError("the applier is held (hold_applier=True); nothing to flush into")
        assert self._wal is not None
        self._applier.apply_through(self._wal.acked_lsn)
        self._applier.checkpoint()

    def _kinds(self, kind: str | None) -> tuple[str, ...]:
        if kind is None:
            return KINDS
        if kind not in KINDS:
            raise InvalidRecordError(
                f"unknown kind {kind!r}; use one of {', '.join(KINDS)}", field="kind"
            )
        return (kind,)


def _sizes(paths: Iterable[Path]) -> dict[Path, int]:
    """File sizes, skipping files a concurrent checkpoint deleted after the listing."""
    out = {}
    for path in paths:
        try:
            out[path] = path.stat().st_size
        except FileNotFoundError:
            continue
    return out


def _record_id(value: object) -> int:
    """Check an id argument: an int; out-of-range ids simply do not exist."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRecordError(f"a record id is an int, got {value!r}", field="id")
    if not 0 < value < 1 << 63:
        raise RecordNotFoundError(f"no record with id {value}")
    return value


def _order(exp: Experience) -> tuple[float, int]:
    return (exp.ts, exp.id)


def _replay_derive(op: Op, lsn: int, view: StateView, payload: bytes) -> list[Effect]:
    """derive() for replay: an op that was valid when logged stays valid, but be tolerant."""
    try:
        return derive_all(op, lsn, view, payload)
    except RecordNotFoundError:
        log.warning("replay: LSN %d targets a missing record (%r); skipped", lsn, op)
        return []
