"""Replaying logged operations into LMDB: the one place where frames become state again.

Recovery at open, salvage into a new store and a point-in-time restore all do the same thing:
derive each operation's effect (:func:`~xpstore.model.effects.derive_all`, the definition the
live write path uses too) against LMDB plus the effects replayed but not yet written, and
write the effects to LMDB in batches, each with its last LSN as ``applied_lsn``. Batches end at
frame boundaries, so a crash during a replay leaves LMDB at a frame boundary that the next
replay continues from.

Puts are replayed from their bytes, without an Effect or a record model: a version-2 put's
fixed header (:func:`~xpstore.model.codec.put_head`) gives kind, ts and track with ``struct``, and
its LMDB envelope is the header's bytes around the record map (version-1 puts, from stores
written before, go through :func:`~xpstore.model.codec.peek_put`). A put's effect needs no state:
a new id, indexed and counted, and for a fingerprint its track pointing at it; so runs of puts go
straight into LMDB changes (one columnar :class:`NewRecords` per run, whose keys the tables build
with numpy), and only the other operations are derived against the state (the
changes replayed but not yet written, then LMDB). A ``RetrievalOp``'s counts are added to the
``prio`` rows when its batch is written; until then the view adds them to what it reads (the
counts replayed since the record's state was last written or rewritten), so a later feedback
or priority update derives from the same total as the live path did.
"""

from __future__ import annotations

import logging

from xpstore.errors import RecordNotFoundError
from xpstore.model.codec import (
    KIND_CODES,
    decode_envelope,
    decode_op,
    envelope_at,
    envelope_from_put,
    peek_put,
    put_head,
)
from xpstore.model.effects import Effect, StateView, counted_envelope, derive_all
from xpstore.model.records import Experience
from xpstore.persistence.applier import to_changes
from xpstore.persistence.crashpoints import crash_point
from xpstore.persistence.lmdb_changes import Change, NewRecords
from xpstore.persistence.lmdb_tables import LmdbTables, u64

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
        self._values: dict[int, bytes | None] = {}  # replayed, not yet written: id -> envelope
        self._tracks: dict[str, int | None] = {}
        self._extra: dict[int, int] = {}  # retrievals replayed since the id's state was read
        self._changes: list[Change] = []
        self._pending = 0  # operations replayed since the last write
        self._view: StateView | None = None

    def apply_frame(self, first_lsn: int, ops: list[bytes]) -> None:
        """Replay one frame's operations (LSNs ``first_lsn`` ...); write a batch when full."""
        changes, values, tracks = self._changes, self._values, self._tracks
        lsn = first_lsn
        ids: list[int] = []  # the current run of puts, in columns
        codes: list[int] = []
        stamps: list[float] = []
        envelopes: list[bytes] = []
        sets: list[tuple[bytes, bytes]] = []
        for raw in ops:
            head = put_head(raw)
            if head is not None:
                kind_code, ts, track, offset = head
                value = envelope_at(raw, kind_code, offset, lsn)
            else:
                summary = peek_put(raw)
                if summary is None:
                    if ids:  # the run before it goes first: changes stay in LSN order
                        changes.append(_run(ids, codes, stamps, envelopes, sets))
                        ids, codes, stamps, envelopes, sets = [], [], [], [], []
                    self._add(self._derive(raw, lsn))
                    lsn += 1
                    continue
                kind_code, ts, track = KIND_CODES[summary.kind], summary.ts, summary.track_id
                value = envelope_from_put(raw, kind=summary.kind, ts=ts, updated_lsn=lsn)
            ids.append(lsn)
            codes.append(kind_code)
            stamps.append(ts)
            envelopes.append(value)
            values[lsn] = value
            if track is not None:
                sets.append((track.encode(), u64(lsn)))
                tracks[track] = lsn
            lsn += 1
        if ids:
            changes.append(_run(ids, codes, stamps, envelopes, sets))
        self.last_lsn = lsn - 1
        self.replayed += len(ops)
        self._pending += len(ops)
        if self._pending >= self.batch:
            self.flush()
            crash_point("replay.after_batch")

    def flush(self, *, force: bool = False) -> None:
        """Write the replayed changes to LMDB (``force``: even none, to record ``last_lsn``)."""
        if self._changes or (force and self.last_lsn):
            self.tables.apply(self._changes, self.last_lsn)
        self._changes, self._values, self._tracks, self._extra = [], {}, {}, {}
        self._pending = 0

    # ------------------------------------------------------------------ internals
    def _derive(self, raw: bytes, lsn: int) -> list[Effect]:
        """An operation that was valid when logged stays valid; still, be tolerant."""
        op = decode_op(raw, validate=False)
        if self._view is None:
            self._view = StateView(self._get, self._track, self._raw_many)
        try:
            return derive_all(op, lsn, self._view, raw)
        except RecordNotFoundError:
            log.warning("replay: LSN %d targets a missing record (%r); skipped", lsn, op)
            return []

    def _add(self, effects: list[Effect]) -> None:
        self._changes.extend(to_changes(effects))
        extra = self._extra
        for eff in effects:
            if eff.record_id is not None:
                self._values[eff.record_id] = eff.value
                extra.pop(eff.record_id, None)  # a rewrite's envelope holds the total
            if eff.retrievals is not None:
                for rid, n in eff.retrievals.items():
                    extra[rid] = extra.get(rid, 0) + n
            if eff.track is not None:
                self._tracks[eff.track] = eff.track_to

    def _track(self, track_id: str) -> int | None:
        """Replayed changes first, then LMDB."""
        if track_id in self._tracks:
            return self._tracks[track_id]
        with self.tables.reading() as txn:
            return self.tables.get_track(txn, track_id)

    def _get(self, rid: int) -> Experience | None:
        """Replayed changes first, then LMDB; with the total retrieval count (StateView)."""
        raw = self._raw_many([rid]).get(rid)
        return decode_envelope(rid, raw) if raw is not None else None

    def _raw_many(self, ids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        rest: list[int] = []
        extra = self._extra
        for rid in ids:
            if rid not in self._values:
                rest.append(rid)
            elif (value := self._values[rid]) is not None:
                out[rid] = counted_envelope(value, 0, extra.get(rid, 0))
        if rest:
            with self.tables.reading() as txn:
                stored = self.tables.retrieval_counts(txn, rest)
                for rid in rest:
                    raw = self.tables.get_record(txn, rid)
                    if raw is not None:
                        out[rid] = counted_envelope(raw, stored.get(rid, 0), extra.get(rid, 0))
        return out


def _run(ids: list[int], codes: list[int], stamps: list[float], envelopes: list[bytes],
         sets: list[tuple[bytes, bytes]]) -> NewRecords:  # fmt: skip
    """A run of replayed puts as one change: new records and the track entries they set, with
    no priority rows (as replayed puts always had: the sampler fills missing rows when it
    loads, ``sampling/sampler.py``)."""
    return NewRecords(ids, codes, stamps, envelopes, [None] * len(ids), sets)
