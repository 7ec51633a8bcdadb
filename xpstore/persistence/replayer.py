"""Replaying logged operations into LMDB: the one place where frames become state again.

Recovery at open, salvage into a new store and a point-in-time restore all do the same thing:
derive each operation's effect (:func:`~xpstore.model.effects.derive_all`, the definition the
live write path uses too) against LMDB plus the effects replayed but not yet written, and
write the effects to LMDB in batches, each with its last LSN as ``applied_lsn``. Batches end at
frame boundaries, so a crash during a replay leaves LMDB at a frame boundary that the next
replay continues from.

Puts are replayed from their bytes (:func:`~xpstore.model.codec.peek_put`): building a record
model only to re-derive kind, ts and track made recovery slower than ingest.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from xpstore.errors import RecordNotFoundError
from xpstore.model.codec import decode_envelope, decode_op, peek_put
from xpstore.model.effects import Effect, StateView, derive_all, derive_put
from xpstore.model.records import Experience
from xpstore.persistence.applier import to_changes
from xpstore.persistence.lmdb_tables import LmdbTables

__all__ = ["REPLAY_BATCH", "Replayer"]

log = logging.getLogger(__name__)

REPLAY_BATCH = 10_000
"""Effects per LMDB transaction while replaying (the applier's default batch)."""


class Replayer:
    """Derive and apply frames of operations, in LSN order, into ``tables``."""

    def __init__(self, tables: LmdbTables, *, batch: int = REPLAY_BATCH) -> None:
        self.tables = tables
        self.batch = batch
        self.replayed = 0
        self.last_lsn = 0
        self._records: dict[int, Effect] = {}  # replayed, not yet written: newest per id
        self._tracks: dict[str, int | None] = {}
        self._effects: list[Effect] = []

    def apply_frame(self, first_lsn: int, ops: list[bytes]) -> None:
        """Replay one frame's operations (LSNs ``first_lsn`` ...); write a batch when full."""
        summaries = [peek_put(raw) for raw in ops]
        view = self._view(s.track_id for s in summaries if s is not None and s.track_id)
        for i, (raw, summary) in enumerate(zip(ops, summaries, strict=True)):
            lsn = first_lsn + i
            if summary is not None:
                self._add([derive_put(lsn, raw, summary.kind, summary.ts, summary.track_id, view)])
            else:
                self._add(self._derive(raw, lsn, view))
            self.last_lsn = lsn
        self.replayed += len(ops)
        if len(self._effects) >= self.batch:
            self.flush()

    def flush(self, *, force: bool = False) -> None:
        """Write the replayed effects to LMDB (``force``: even none, to record ``last_lsn``)."""
        if self._effects or (force and self.last_lsn):
            self.tables.apply(to_changes(self._effects), self.last_lsn)
        self._effects, self._records, self._tracks = [], {}, {}

    # ------------------------------------------------------------------ internals
    def _derive(self, raw: bytes, lsn: int, view: StateView) -> list[Effect]:
        """An operation that was valid when logged stays valid; still, be tolerant."""
        op = decode_op(raw, validate=False)
        try:
            return derive_all(op, lsn, view, raw)
        except RecordNotFoundError:
            log.warning("replay: LSN %d targets a missing record (%r); skipped", lsn, op)
            return []

    def _add(self, effects: list[Effect]) -> None:
        for eff in effects:
            self._effects.append(eff)
            if eff.record_id is not None:
                self._records[eff.record_id] = eff
            if eff.track is not None:
                self._tracks[eff.track] = eff.track_to

    def _view(self, track_ids: Iterable[str]) -> StateView:
        """Replayed effects first, then LMDB; a frame's track lookups in one read transaction."""
        wanted = [t for t in set(track_ids) if t not in self._tracks]
        known: dict[str, int | None] = {}
        if wanted:
            with self.tables.reading() as txn:
                known = {t: self.tables.get_track(txn, t) for t in wanted}

        def track(track_id: str) -> int | None:
            if track_id in self._tracks:
                return self._tracks[track_id]
            if track_id in known:
                return known[track_id]
            with self.tables.reading() as txn:
                return self.tables.get_track(txn, track_id)

        return StateView(self._get, track, self._raw_many)

    def _get(self, rid: int) -> Experience | None:
        eff = self._records.get(rid)
        if eff is not None:
            return eff.experience()
        with self.tables.reading() as txn:
            raw = self.tables.get_record(txn, rid)
        return decode_envelope(rid, raw) if raw is not None else None

    def _raw_many(self, ids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        rest: list[int] = []
        for rid in ids:
            eff = self._records.get(rid)
            if eff is None:
                rest.append(rid)
            elif eff.value is not None:
                out[rid] = eff.value
        if rest:
            with self.tables.reading() as txn:
                for rid in rest:
                    raw = self.tables.get_record(txn, rid)
                    if raw is not None:
                        out[rid] = raw
        return out
