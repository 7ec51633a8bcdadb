"""The write path: prepare, encode, submit, back-pressure, and the state view writers derive
against.

Validation and encoding run outside any lock. Under the engine's write lock an operation is
derived against the newest state (pending, then durable overlay, then LMDB), parked in the
overlay's pending layer and appended to the WAL; then the writer waits, lock-free, for the group
commit that covers it. The WAL leader moves acknowledged effects into the overlay's durable layer
and publishes them to the overlay's subscribers before any waiter returns (read your writes); the
applier moves them into LMDB.

Settings changes go the same way: a :class:`~xpstore.model.codec.SettingsOp` carries the whole
new settings document, derived here from the last one logged (so two changes in flight compose),
and the session adopts it once the WAL acknowledged it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from xpstore.config import StoreConfig
from xpstore.errors import InvalidRecordError, RecordTooLargeError, StoreClosedError
from xpstore.model.codec import (
    DeleteOp,
    DeleteTrackOp,
    Op,
    PutOp,
    SettingsOp,
    UpdateOp,
    encode_op,
    envelopes_from_puts,
    field_sizes,
)
from xpstore.model.columns import FingerprintColumns
from xpstore.model.effects import (
    PutFacts,
    PutRun,
    StateView,
    derive,
    derive_all,
    derive_fingerprint_puts,
    derive_new_puts,
    put_facts,
    put_run,
)
from xpstore.model.events import IndexRow, IndexRows
from xpstore.model.fprows import encode_rows
from xpstore.model.priority_rows import fingerprint_inputs
from xpstore.model.records import (
    Decision,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    kind_of,
    record_from_json,
    validate_record,
)
from xpstore.persistence.overlay import MISSING
from xpstore.store.combiner import Combiner, Submission
from xpstore.store.engine import Engine, timed
from xpstore.store.reader import Reader, record_id

__all__ = ["RowSource", "Writer"]

_RECORD_TYPES = (PredictionOutcome, Fingerprint, QueryMetric, Decision)
_PLAIN = frozenset({PredictionOutcome, QueryMetric, Decision})  # exactly not fingerprints

COLUMNAR_PUTS = 32
"""The shortest run of puts in one submission that is derived in columns (and the shortest
``put_many`` that keeps no record model once each record is encoded)."""

RowSource = Callable[[Sequence[Record]], dict[int, IndexRow]]
"""Index rows of a put batch's fingerprints by position (the k-NN index's, once attached)."""


class Writer:
    """Every change of a store goes through here (records, counters, settings)."""

    def __init__(self, engine: Engine, reader: Reader) -> None:
        self._engine = engine
        self._reader = reader
        self.row_source: RowSource | None = None
        self.rows_wanted: Callable[[], bool] = _never
        """Whether :attr:`row_source` would compute rows now (the index is attached): a large
        ``put_many`` keeps its fingerprint models for it only then."""
        self._logged = engine.settings.persisted  # the newest settings document in the WAL
        self.combiner = Combiner(self._append_batch, self._wait_batch)
        """Batches concurrent submissions (``store/combiner.py``): a seam for tests and
        diagnostics (``batches``, ``submissions``)."""

    # ------------------------------------------------------------------ records
    @timed("put")
    def put_many(self, records: Iterable[Record | Mapping[str, Any]]) -> list[int]:
        """Store records atomically (one WAL frame, one sync); return their ids in order.

        A batch of at least ``COLUMNAR_PUTS`` is prepared as a :class:`PutRun`: each record's
        model is dropped once it is encoded and its facts taken, so a thousand fresh models are
        not kept alive through the commit (collector passes over them and cache misses cost
        about as much as the store's own work on the batch: docs/benchmarks.md)."""
        batch = records if type(records) is list else list(records)
        n = len(batch)
        if n < COLUMNAR_PUTS:
            ops, payloads, rows = self.prepare_puts(batch)
            if not ops:
                return []
            first, _last = self.submit(ops, payloads, rows)
        else:
            run, rows = self.prepare_run(batch)
            first, _last = self._submit(Submission([], run.payloads, rows, run), None)
        self._engine.telemetry.incr("put.records", n)
        return list(range(first, first + n))  # a settings operation may follow them

    def prepare_run(self, records: Sequence[Record | Mapping[str, Any]]
                    ) -> tuple[PutRun, dict[int, IndexRow]]:  # fmt: skip
        """:meth:`prepare_puts` as a :class:`PutRun` (at least one record): validated and
        encoded the same way, each model dropped once its facts are taken (the fingerprints'
        models are kept for :attr:`row_source` while the index is attached)."""
        cfg = self._engine.config.records
        if len(records) > cfg.max_batch_records:
            raise RecordTooLargeError(
                f"put_many got {len(records)} records, over max_batch_records="
                f"{cfg.max_batch_records}",
                field="records",
            )
        limit = cfg.max_record_bytes
        prepare, encode = self._prepare, self.encode
        keep = self.row_source is not None and self.rows_wanted()
        payloads: list[bytes] = []
        facts: list[PutFacts] = []
        kept: list[Record] = []
        where: list[int] = []
        for i, r in enumerate(records):
            rec = prepare(r, i)
            payload = encode_op(PutOp(rec))
            if len(payload) > limit:
                encode(PutOp(rec), i, limit)  # raises, naming the record's largest field
            payloads.append(payload)
            fact = put_facts(rec)
            facts.append(fact)
            if keep and fact[2] is not None:  # a fingerprint, for its index row
                kept.append(rec)
                where.append(i)
        rows: dict[int, IndexRow] = {}
        if kept and self.row_source is not None:
            rows = {where[j]: row for j, row in self.row_source(kept).items()}
        return PutRun.of(payloads, facts), rows

    def prepare_puts(
        self, records: Iterable[Record | Mapping[str, Any]]
    ) -> tuple[list[Op], list[bytes], dict[int, IndexRow]]:
        """Validated, encoded put operations and their index rows by position (nothing is
        written: :meth:`submit` logs them, alone or in a larger frame)."""
        cfg = self._engine.config.records
        limit = cfg.max_record_bytes
        prepare, encode = self._prepare, self.encode
        prepared: list[Record] = []
        ops: list[Op] = []
        payloads: list[bytes] = []
        for i, r in enumerate(records):
            # each record encoded right after its validation, while its model is in the CPU's
            # caches (a second pass over a thousand models measured ~30 % slower per record)
            rec = prepare(r, i)
            op = PutOp(rec)
            payload = encode_op(op)
            if len(payload) > limit:
                encode(op, i, limit)  # raises, naming the record's largest field
            payloads.append(payload)
            prepared.append(rec)
            ops.append(op)
        if len(prepared) > cfg.max_batch_records:
            raise RecordTooLargeError(
                f"put_many got {len(prepared)} records, over max_batch_records="
                f"{cfg.max_batch_records}",
                field="records",
            )
        rows = self.row_source(prepared) if self.row_source is not None and prepared else {}
        return ops, payloads, rows

    @property
    def embedding_dim(self) -> int | None:
        """The store's embedding dimension as logged so far (None: not fixed yet)."""
        return self._logged.records.embedding_dim

    def submit_fingerprints(
        self,
        payloads: list[bytes],
        cols: FingerprintColumns,
        rows: IndexRows | None,
        cuts: Sequence[int] | None = None,
    ) -> tuple[int, int]:
        """Log ``put_fingerprints``' encoded puts as one frame and wait for the acknowledgement;
        return their LSN span. Like :meth:`submit`, with the effects derived from the columns
        (no record model) and parked in the overlay with one lock acquisition. ``cuts``: where
        each payload's record map starts (the encoder's, so no payload is parsed back)."""
        engine = self._engine
        wal = engine.writable()
        n = len(payloads)
        dim = None if cols.embeddings is None else int(cols.embeddings.shape[1])
        adopt: StoreConfig | None = None
        with engine.write_lock:
            wal = engine.writable()
            fixed = None if dim is None else self._fixed_dim([(0, dim)])
            first: int = wal.next_lsn
            view = self._view_for(set(cols.track_ids), snapshot=True)
            prio = fingerprint_inputs(first, cols.ts, cols.confidence)
            values = envelopes_from_puts(payloads, kind="fingerprint", ts=cols.ts,
                                         first_lsn=first, cuts=cuts)  # fmt: skip
            fprows = encode_rows(range(first, first + n), cols.audio(), cols.embeddings)
            effects = derive_fingerprint_puts(first, values, cols.track_ids, cols.ts.tolist(),
                                              prio, view, fprows)  # fmt: skip
            if fixed is not None:
                op = SettingsOp({"records.embedding_dim": dim}, fixed.to_json())
                payload = encode_op(op)
                effects += derive_all(op, first + n, view, payload)
                payloads = [*payloads, payload]
            overlay = engine.overlay
            try:
                overlay.add_pending_many(effects, rows)
                span: tuple[int, int] = wal.append(payloads)
            except BaseException:
                overlay.drop_pending_from(first)
                raise
            if fixed is not None:
                self._logged = adopt = fixed
        wal.wait(span[1])
        if adopt is not None:
            engine.settings.replace_persisted(adopt)
        self._backpressure()
        return first, first + n - 1

    def check(self, record: Record | Mapping[str, Any]) -> None:
        """Refuse ``record`` exactly as :meth:`put_many` would, without writing anything: the
        model, the store's embedding dimension and ``records.max_record_bytes`` (what a whole
        file is validated against before ``xpstore ingest`` writes any of it)."""
        rec = self._prepare(record, None)
        self.encode(PutOp(rec), None)

    def update(self, rid: int, changes: dict[str, Any]) -> None:
        if not changes:
            raise InvalidRecordError("update needs at least one field to change", field="changes")
        self.submit_one(UpdateOp(record_id(rid), changes))

    def delete(self, rid: int) -> None:
        self.submit_one(DeleteOp(record_id(rid)))

    def delete_track(self, track_id: str) -> None:
        self.submit_one(DeleteTrackOp(str(track_id)))

    def submit_one(self, op: Op, *, timeout: float | None = None) -> tuple[int, int]:
        """Log one operation and wait for its acknowledgement (at most ``timeout`` s, if given:
        WALWriteError then)."""
        return self.submit([op], [self.encode(op, 0)], timeout=timeout)

    # ------------------------------------------------------------------ settings
    def log_settings(
        self, changes: Mapping[str, Any], records: Sequence[Record] = ()
    ) -> StoreConfig:
        """Log ``changes`` (dotted names, already checked) as one settings operation, with
        ``records`` in the same frame (a tuner's decision: both survive a crash or neither);
        return the config in force once it is acknowledged."""
        engine = self._engine
        ops, payloads, _rows = self.prepare_puts(records) if records else ([], [], {})
        wal = engine.writable()
        with engine.write_lock:
            wal = engine.writable()
            new = self._logged.changed(changes).persisted()
            op = SettingsOp(dict(changes), new.to_json())
            ops = [*ops, op]
            payloads = [*payloads, self.encode(op, len(payloads))]
            span = self._append(ops, payloads, {}, wal)
            self._logged = new
        wal.wait(span[1])
        return engine.settings.replace_persisted(new, changes)

    # ------------------------------------------------------------------ internals
    def _prepare(self, record: Record | Mapping[str, Any], index: int | None) -> Record:
        """A validated record with its ts filled in; InvalidRecordError names records[index]
        (``index`` None: a single record, named by its field alone)."""
        rec: Record
        if type(record) in _RECORD_TYPES:  # exact types first: isinstance on ABCs is slow
            rec = cast(Record, record)
        elif type(record) is dict or isinstance(record, Mapping):
            try:
                rec = record_from_json(record)
            except InvalidRecordError as exc:
                if index is None:
                    raise
                raise InvalidRecordError(f"records[{index}]: {exc}", field=exc.field) from exc
        elif isinstance(record, _RECORD_TYPES):
            # a subclass is stored as its kind: its fields validated again as that model (the
            # codec and the priority rows know the four models only; an added field is refused
            # by name, as in a mapping)
            try:
                rec = validate_record(kind_of(record), record.model_dump())
            except InvalidRecordError as exc:
                if index is None:
                    raise
                raise InvalidRecordError(f"records[{index}]: {exc}", field=exc.field) from exc
        else:
            where = "record" if index is None else f"records[{index}]"
            raise InvalidRecordError(
                f"{where}: expected a PredictionOutcome, Fingerprint, QueryMetric or Decision "
                f"(or a mapping with a 'kind'), got {type(record).__name__}",
                field="record",
            )
        if rec.ts is None:
            rec = rec.model_copy(update={"ts": time.time()})
        if type(rec) is Fingerprint and rec.embedding is not None:
            dim = self._logged.records.embedding_dim
            if dim is not None and len(rec.embedding) != dim:
                prefix = "" if index is None else f"records[{index}]."
                raise InvalidRecordError(
                    f"{prefix}embedding: dimension {len(rec.embedding)}, this store's "
                    f"embeddings have dimension {dim}",
                    field="embedding",
                )
        return rec

    def encode(self, op: Op, index: int | None, limit: int | None = None) -> bytes:
        """``op`` encoded; RecordTooLargeError over the size limit, naming ``records[index]``
        and the record's largest field (``index`` None: a single record or operation)."""
        payload = encode_op(op)
        if limit is None:
            limit = self._engine.config.records.max_record_bytes
        if len(payload) > limit:
            what, field, detail = "operation", "record", ""
            if isinstance(op, PutOp):
                what = "record"
                sizes = field_sizes(op.record)
                field = max(sizes, key=lambda name: sizes[name])
                detail = f"; its largest field is {field!r} ({sizes[field]:,} bytes)"
            where = "" if index is None else f"records[{index}]: "
            raise RecordTooLargeError(
                f"{where}{what} encodes to {len(payload):,} bytes, over this store's limit of "
                f"{limit:,} bytes (the records.max_record_bytes setting){detail}",
                field=field,
            )
        return payload

    def submit(
        self,
        ops: list[Op],
        payloads: list[bytes],
        rows: Mapping[int, IndexRow] | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[int, int]:
        """Derive, park and log ``ops`` (one frame), wait for the acknowledgement; return the
        LSN span. ``rows`` are index rows by position in ``ops``; ``timeout`` bounds the wait
        (close's own writes: a hung disk must not hang it)."""
        return self._submit(Submission(ops, payloads, rows or {}), timeout)

    def _submit(self, sub: Submission, timeout: float | None) -> tuple[int, int]:
        """:meth:`submit` of a built submission (operations, or a run of puts in columns)."""
        engine = self._engine
        engine.writable()
        if timeout is None:
            self.combiner.run(sub)  # alone, or in a batch with concurrent writers
        else:  # close's own writes: a bounded wait, never someone else's batch
            self._append_batch([sub])
            self._wait_batch([sub], timeout)
        if sub.error is not None:
            raise sub.error
        if sub.adopt is not None:
            engine.settings.replace_persisted(sub.adopt)
        self._backpressure()
        assert sub.span is not None
        return sub.span

    def _append_batch(self, batch: list[Submission]) -> None:
        """Derive, park and append each submission as its own WAL group under the write lock;
        a failure is its submission's own."""
        engine = self._engine
        with engine.write_lock:
            try:
                wal = engine.writable()
            except Exception as exc:  # closed or read-only: every submission's own error
                for sub in batch:
                    sub.error = exc
                return
            for sub in batch:
                try:
                    ops, payloads, run = sub.ops, sub.payloads, sub.run
                    if run is None:
                        fixed = self._fix_embedding_dim(ops)
                    else:
                        fixed = self._fixed_dim(run.dims) if run.dims else None
                    if fixed is not None:
                        op = SettingsOp({"records.embedding_dim": fixed.records.embedding_dim},
                                        fixed.to_json())  # fmt: skip
                        ops, payloads = [*ops, op], [*payloads, encode_op(op)]
                    sub.span = self._append(ops, payloads, sub.rows, wal, run)
                    if fixed is not None:
                        self._logged = sub.adopt = fixed
                except Exception as exc:
                    sub.error = exc

    def _wait_batch(self, batch: list[Submission], timeout: float | None = None) -> None:
        """Wait for the acknowledgement of the batch's last group (a WAL failure fails every
        appended submission)."""
        spans = [sub.span for sub in batch if sub.span is not None]
        if not spans:
            return
        wal = self._engine.wal
        if wal is None:  # closed between the append and the wait: nothing says it is durable
            closed = StoreClosedError(
                f"store {self._engine.path} closed before this write was acknowledged; a "
                "reopen recovers whatever reached the log"
            )
            for sub in batch:
                if sub.span is not None:
                    sub.span, sub.adopt, sub.error = None, None, closed
            return
        try:
            wal.wait(spans[-1][1], timeout=timeout)
        except Exception as exc:
            for sub in batch:
                if sub.span is not None:
                    sub.span, sub.adopt, sub.error = None, None, exc

    def _append(
        self,
        ops: list[Op],
        payloads: list[bytes],
        rows: Mapping[int, IndexRow],
        wal: Any,
        run: PutRun | None = None,
    ) -> tuple[int, int]:
        """Under the write lock: derive against the newest state, park, append to the WAL.
        With a ``run``, ``payloads`` start with the run's and ``ops`` are what follows it (the
        settings fixing the embedding dimension, if the run brings the first embedding)."""
        overlay = self._engine.overlay
        first: int = wal.next_lsn
        if run is not None:
            try:
                self._park_run(run, ops, payloads, rows, first)
                span: tuple[int, int] = wal.append(payloads)
            except BaseException:
                overlay.drop_pending_from(first)
                raise
            return span
        view = self._view(ops)
        try:
            if all(type(op) is PutOp for op in ops):
                self._park_puts(ops, payloads, rows, view, first)
            else:
                for i, op in enumerate(ops):
                    row = rows.get(i) if rows else None
                    for eff in derive_all(op, first + i, view, payloads[i]):
                        overlay.add_pending(eff, row)
            span = wal.append(payloads)
        except BaseException:
            overlay.drop_pending_from(first)
            raise
        return span

    def _park_run(self, run: PutRun, ops: list[Op], payloads: list[bytes],
                  rows: Mapping[int, IndexRow], first: int) -> None:  # fmt: skip
        """Derive a run of puts in columns, then ``ops`` after it, and park them with one
        overlay lock acquisition."""
        tracks = set(run.tracks)
        tracks.discard(None)
        view = self._view_for(cast("set[str]", tracks))
        effects = derive_new_puts(first, run, view)
        n = len(run)
        for i, op in enumerate(ops):
            effects += derive_all(op, first + n + i, view, payloads[n + i])
        by_lsn = {first + i: row for i, row in rows.items()} if rows else None
        self._engine.overlay.add_pending_many(effects, rows=by_lsn)

    def _park_puts(self, ops: list[Op], payloads: list[bytes], rows: Mapping[int, IndexRow],
                   view: StateView, first: int) -> None:  # fmt: skip
        """The batched put path: derive a run of puts (a track put twice in the batch is
        superseded by its later put, as the overlay would show it) and park them with one
        overlay lock acquisition. A run of at least ``COLUMNAR_PUTS`` is derived in columns
        (the same effects, about a third of the cost); a shorter one, a single put above all,
        record by record (the columns' numpy setup would cost it more than it saves)."""
        if len(ops) >= COLUMNAR_PUTS:
            records = [cast(PutOp, op).record for op in ops]
            effects = derive_new_puts(first, put_run(records, payloads), view)
            by_lsn = {first + i: row for i, row in rows.items()} if rows else None
            self._engine.overlay.add_pending_many(effects, rows=by_lsn)
            return
        latest: dict[str, int] = {}
        lookup = view.track

        def track(track_id: str) -> int | None:
            hit = latest.get(track_id)
            return lookup(track_id) if hit is None else hit

        local = StateView(view.get, track, view.get_raw_many)
        effects = []
        for i, op in enumerate(ops):
            eff = derive(op, first + i, local, payloads[i])
            if eff.track is not None and eff.track_to is not None:
                latest[eff.track] = eff.track_to
            effects.append(eff)
        by_lsn = {first + i: row for i, row in rows.items()} if rows else None
        self._engine.overlay.add_pending_many(effects, rows=by_lsn)

    def _fix_embedding_dim(self, ops: list[Op]) -> StoreConfig | None:
        """Under the write lock: check the batch's embeddings against the store's dimension
        (``_prepare`` checked before the lock, and another batch may have fixed it since); return
        the settings that fix the dimension when this batch brings the first embedding."""
        dims = [(i, len(fp.embedding)) for i, fp in _fingerprints(ops) if fp.embedding is not None]
        if not dims:
            return None
        return self._fixed_dim(dims)

    def _fixed_dim(self, dims: list[tuple[int, int]]) -> StoreConfig | None:
        """Under the write lock: refuse ``(position, dimension)`` pairs that differ from the
        store's (or each other's); the settings fixing it when none is logged yet."""
        known = self._logged.records.embedding_dim
        first = dims[0][1] if known is None else known
        bad = next((i for i, d in dims if d != first), None)
        if bad is not None:
            if known is None:
                msg = f"dimensions differ within the batch ({first} first)"
            else:
                msg = f"dimension {dict(dims)[bad]}, this store's embeddings have dimension {known}"
            raise InvalidRecordError(f"records[{bad}].embedding: {msg}", field="embedding")
        if known is not None:
            return None
        return self._logged.changed({"records.embedding_dim": first}).persisted()

    def _backpressure(self) -> None:
        engine = self._engine
        applier = engine.applier
        if applier is None or applier.hold:
            return
        limit = engine.config.apply.max_overlay_ops
        overlay = engine.overlay
        if len(overlay) <= limit:
            return
        with overlay.changed:
            while len(overlay) > limit and applier.error is None and not engine.closed:
                overlay.changed.wait(0.1)

    def _view(self, ops: list[Op]) -> StateView:
        """Newest state for derive(): pending, then durable overlay, then LMDB.

        The LMDB track lookups a batch of fingerprint puts needs are done up front in one read
        transaction (one per fingerprint cost a transaction each on the ingest path).
        """
        return self._view_for({fp.track_id for _i, fp in _fingerprints(ops)})

    def _view_for(self, tracks: set[str], *, snapshot: bool = False) -> StateView:
        """:meth:`_view` with the LMDB lookups of ``tracks`` done up front; ``snapshot``: their
        current ids resolved once (the caller derives a batch whose own changes it tracks)."""
        ov = self._engine.overlay
        reader = self._reader
        if snapshot:
            resolved, missing = ov.writer_tracks(tracks)
            resolved.update(reader.lmdb_tracks(missing))
            return StateView(lambda rid: None, resolved.get)
        known = reader.lmdb_tracks([t for t in tracks if ov.writer_track(t) is MISSING])

        def get(rid: int) -> Experience | None:
            return reader.read_get(rid, pending=True)

        def track(track_id: str) -> int | None:
            hit = ov.writer_track(track_id)
            if hit is not MISSING:
                return cast("int | None", hit)
            if track_id in known:
                return known[track_id]
            return reader.lmdb_track(track_id)

        return StateView(get, track,
                         lambda ids: reader.envelopes(ids, pending=True, counted=True))  # fmt: skip


def _never() -> bool:
    return False


def _fingerprints(ops: Sequence[Op]) -> list[tuple[int, Fingerprint]]:
    """(position, record) of the fingerprint puts among ``ops``: exact types first (a record
    model's isinstance goes through ABCMeta: a batch of a thousand paid for it twice)."""
    out: list[tuple[int, Fingerprint]] = []
    for i, op in enumerate(ops):
        if type(op) is PutOp or isinstance(op, PutOp):
            rec = op.record
            kind = type(rec)
            if kind is Fingerprint or (kind not in _PLAIN and isinstance(rec, Fingerprint)):
                out.append((i, cast(Fingerprint, rec)))
    return out
