"""The in-memory overlay of acknowledged-but-unapplied effects (and enqueued, unacknowledged ones).
The :class:`Overlay` holds effects in two layers:

- *pending*: enqueued in the WAL but not yet acknowledged; only writers (validating later
  operations under the store's write lock) look here;
- *durable*: acknowledged but not yet applied to LMDB; every reader looks here before LMDB.

An effect moves pending -> durable (WAL leader, after the sync) -> LMDB (applier). Each move adds
to the later layer before removing from the earlier one, and lookups go earlier layer first, so a
lookup never misses an entry that is in flight between layers. Dict reads are atomic under the
GIL; mutations happen under ``Overlay.lock``.

Retrieval effects (counts to add, no record state: see :mod:`xpstore.model.effects`) are also
listed apart, in LSN order (:attr:`Overlay.retrievals`, and the pending ones), so that a read
adds the unapplied counts logged after the state it read without walking the whole queue.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from itertools import islice
from operator import attrgetter
from typing import cast

from xpstore.model.effects import Effect
from xpstore.model.events import Acknowledged, IndexRow, IndexRows

log = logging.getLogger(__name__)

MISSING = object()
"""What :meth:`Overlay.writer_track` answers when neither layer knows the track."""


class Overlay:
    """Acknowledged-but-unapplied (and enqueued-but-unacknowledged) effects; see module doc."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.records: dict[int, Effect] = {}  # newest durable effect per record id
        self.tracks: dict[str, Effect] = {}  # newest durable effect per track (its track_to)
        self.queue: deque[Effect] = deque()  # durable, not applied, LSN order
        self._p_records: dict[int, Effect] = {}
        self._p_tracks: dict[str, Effect] = {}
        self._pending: deque[Effect] = deque()
        self.apply_threshold = 1 << 62  # queue length that wakes the applier (it sets this)
        self._p_rows: dict[int, IndexRow] = {}  # LSN -> index row, pending effects only
        self._p_bulk: dict[int, IndexRows] = {}  # first LSN -> a put_fingerprints batch's rows
        # the record and track dicts of the pending batches, when they cover every pending
        # effect (_p_indexed of them): make_durable enters them as they are
        self._p_index: list[tuple[dict[int, Effect], dict[str, Effect]]] = []
        self._p_indexed = 0
        self._subs: list[Subscription] = []
        self.retrievals: list[Effect] = []  # durable, unapplied retrieval effects, LSN order
        self._p_retrievals: list[Effect] = []

    # writer side (under the store's write lock)
    def writer_get(self, rid: int) -> Effect | None:
        """The newest effect on ``rid`` in either layer, or None if neither has one."""
        hit = self._p_records.get(rid)
        return hit if hit is not None else self.records.get(rid)

    def writer_track(self, track_id: str) -> object:
        hit = self._p_tracks.get(track_id)
        if hit is None:
            hit = self.tracks.get(track_id)
        return hit.track_to if hit is not None else MISSING

    def writer_tracks(self, track_ids: set[str]) -> tuple[dict[str, int | None], list[str]]:
        """:meth:`writer_track` of many tracks: the ids either layer knows, and the tracks
        neither knows (for LMDB). Set intersections find the hits, so a batch of new tracks
        costs no Python code per track."""
        known: dict[str, int | None] = {}
        with self.lock:  # a consistent view of both layers, and no dict resized mid-pass
            for layer in (self.tracks, self._p_tracks):  # pending last: it is newer
                if layer:
                    known.update((t, layer[t].track_to) for t in layer.keys() & track_ids)
        return known, list(track_ids.difference(known))

    def add_pending(self, eff: Effect, row: IndexRow | None = None) -> None:
        """Park ``eff`` (and the index row its writer computed) until the WAL acknowledges it."""
        with self.lock:
            self._pending.append(eff)
            if eff.record_id is not None:
                self._p_records[eff.record_id] = eff
            if eff.track is not None:
                self._p_tracks[eff.track] = eff
            if eff.retrievals is not None:
                self._p_retrievals = [*self._p_retrievals, eff]
            if row is not None:
                self._p_rows[eff.lsn] = row

    def add_pending_many(
        self,
        effects: list[Effect],
        bulk: IndexRows | None = None,
        rows: dict[int, IndexRow] | None = None,
    ) -> None:
        """:meth:`add_pending` of a batch under one lock acquisition; ``bulk`` holds the index
        rows of consecutive effects from the first one (``put_fingerprints``), ``rows`` the
        index rows of single effects by LSN."""
        if not effects:
            return
        with self.lock:
            self._pending.extend(effects)
            by_id, by_track = _index(effects)
            self._p_records.update(by_id)
            self._p_tracks.update(by_track)
            if self._p_indexed == len(self._pending) - len(effects):  # reused by make_durable
                self._p_index.append((by_id, by_track))
                self._p_indexed = len(self._pending)
            if any(map(_RETRIEVALS, effects)):  # a C-level pass: puts carry none
                self._p_retrievals = [*self._p_retrievals,
                                      *(e for e in effects if e.retrievals is not None)]
            if bulk is not None:
                self._p_bulk[effects[0].lsn] = bulk
            if rows:
                self._p_rows.update(rows)

    def drop_pending_from(self, lsn: int) -> None:
        """Forget pending effects at or after ``lsn`` (their WAL append was refused)."""
        with self.lock:
            self._p_index, self._p_indexed = [], -1  # no longer matches the pending effects
            while self._pending and self._pending[-1].lsn >= lsn:
                eff = self._pending.pop()
                if eff.record_id is not None and self._p_records.get(eff.record_id) is eff:
                    del self._p_records[eff.record_id]
                if eff.track is not None and self._p_tracks.get(eff.track) is eff:
                    del self._p_tracks[eff.track]
                self._p_rows.pop(eff.lsn, None)
                self._p_bulk.pop(eff.lsn, None)
            if self._p_retrievals:
                self._p_retrievals = [e for e in self._p_retrievals if e.lsn < lsn]

    def make_durable(self, last_lsn: int) -> None:
        """Move pending effects up to ``last_lsn`` into the durable layer, then publish them.

        Called by the WAL leader before any writer of these effects returns (read your writes).
        Only one leader runs at a time, so batches reach subscribers in LSN order. Subscribers
        run after the overlay lock is released: readers and the applier do not wait for them.
        """
        with self.lock:
            moved: list[Effect] = []
            rows: dict[int, IndexRow] = {}
            bulk: dict[int, IndexRows] = {}
            p_rows, p_bulk = self._p_rows, self._p_bulk
            pending = self._pending
            if pending and pending[-1].lsn <= last_lsn:
                # every pending effect moves (the usual case): in bulk, and the pending dicts
                # and rows hold nothing else
                moved = list(pending)
                pending.clear()
                self._p_records.clear()
                self._p_tracks.clear()
                self.queue.extend(moved)
                indexed = self._p_index if self._p_indexed == len(moved) else [_index(moved)]
                for by_id, by_track in indexed:
                    self.records.update(by_id)
                    self.tracks.update(by_track)
                self._p_index, self._p_indexed = [], 0
                rows, bulk = p_rows, p_bulk
                self._p_rows, self._p_bulk = {}, {}
                if self._p_retrievals:
                    self.retrievals = [*self.retrievals, *self._p_retrievals]
                    self._p_retrievals = []
            if pending and pending[0].lsn <= last_lsn:  # a partial move: the cache is stale
                self._p_index, self._p_indexed = [], -1
            while pending and pending[0].lsn <= last_lsn:
                eff = self._pending.popleft()
                self.add_durable_locked(eff)
                moved.append(eff)
                if eff.record_id is not None and self._p_records.get(eff.record_id) is eff:
                    del self._p_records[eff.record_id]
                if eff.track is not None and self._p_tracks.get(eff.track) is eff:
                    del self._p_tracks[eff.track]
                if p_rows:
                    row = p_rows.pop(eff.lsn, None)
                    if row is not None:
                        rows[eff.lsn] = row
                if p_bulk:
                    many = p_bulk.pop(eff.lsn, None)
                    if many is not None:
                        bulk[eff.lsn] = many
                if eff.retrievals is not None:
                    self._p_retrievals = [e for e in self._p_retrievals if e is not eff]
            subs = list(self._subs)  # a subscriber added after this point has these in its copy
            if len(self.queue) >= self.apply_threshold:
                self.changed.notify_all()  # a full batch for the applier; otherwise it waits
        if moved and subs:
            batch = Acknowledged(moved, rows, bulk)
            for sub in subs:
                sub.deliver(batch)

    def subscribe(
        self, listener: Callable[[Acknowledged], None]
    ) -> tuple[Subscription, list[Effect]]:
        """Register ``listener`` for every later acknowledged batch; return the subscription
        and the effects acknowledged before it and not yet applied (to catch up from).

        The subscription starts *held*: batches are buffered until :meth:`Subscription.start`,
        so a subscriber can load its state from LMDB, apply the returned effects, then start
        without missing or repeating one.
        """
        sub = Subscription(self, listener)
        with self.lock:
            self._subs.append(sub)
            unapplied = list(self.queue)
        return sub, unapplied

    def _unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def add_durable_locked(self, eff: Effect) -> None:
        self.queue.append(eff)
        if eff.record_id is not None:
            self.records[eff.record_id] = eff
        if eff.track is not None:
            self.tracks[eff.track] = eff
        if eff.retrievals is not None:
            self.retrievals = [*self.retrievals, eff]

    def unapplied_retrievals(self, pending: bool = False) -> list[Effect]:
        """The retrieval effects not yet in LMDB, in LSN order (``pending``: the enqueued ones
        too, for writers). Take this *before* reading the state the counts add to; the lists
        are replaced, never changed in place, so the answer is a snapshot."""
        if pending:
            with self.lock:
                return self.retrievals + self._p_retrievals
        return self.retrievals

    # applier side
    def take(self, limit: int) -> list[Effect]:
        with self.lock:
            return list(islice(self.queue, limit))

    def applied(self, effects: list[Effect]) -> None:
        """Drop ``effects`` (now committed to LMDB) unless a newer effect replaced an entry."""
        with self.lock:
            counted = False
            for eff in effects:
                self.queue.popleft()
                if eff.record_id is not None and self.records.get(eff.record_id) is eff:
                    del self.records[eff.record_id]
                if eff.track is not None and self.tracks.get(eff.track) is eff:
                    del self.tracks[eff.track]
                counted = counted or eff.retrievals is not None
            if counted:
                last = effects[-1].lsn
                self.retrievals = [e for e in self.retrievals if e.lsn > last]
            self.changed.notify_all()

    def count_deltas(self) -> list[tuple[int, str, int]]:
        """(lsn, kind, +1/-1) of every unapplied effect that changes a live count.

        Take this snapshot *before* reading LMDB's counts, then keep the entries with an LSN
        above that transaction's applied_lsn: an effect applied in between is then counted
        exactly once (the snapshot still has it, and the filter drops it).
        """
        with self.lock:
            effects = list(self.queue)
        out = []
        for eff in effects:
            delta = eff.count_delta()
            if delta is not None:
                out.append((eff.lsn, delta[0], delta[1]))
        return out

    def __len__(self) -> int:
        return len(self.queue)



_RECORD_ID = attrgetter("record_id")
_TRACK = attrgetter("track")
_RETRIEVALS = attrgetter("retrievals")


def _index(effects: list[Effect]) -> tuple[dict[int, Effect], dict[str, Effect]]:
    """The record and track entries of ``effects`` (LSN order: the newest per key wins), built
    with C-level passes (a bulk batch holds thousands): no Python code per effect. An effect
    without a record id or a track lands under the key None, dropped before the caller enters
    the dicts into a layer (lock-free readers never see it)."""
    by_id: dict[int | None, Effect] = dict(zip(map(_RECORD_ID, effects), effects, strict=True))
    by_id.pop(None, None)
    by_track: dict[str | None, Effect] = dict(zip(map(_TRACK, effects), effects, strict=True))
    by_track.pop(None, None)
    return cast("dict[int, Effect]", by_id), cast("dict[str, Effect]", by_track)


class Subscription:
    """One subscriber of the overlay (see :meth:`Overlay.subscribe`): held, then started.

    A listener must not raise (an exception is logged and the subscription is cancelled, so the
    subscriber can notice and rebuild) and must not block for long: it runs on the WAL leader's
    thread before the batch's writers are acknowledged.
    """

    def __init__(self, overlay: Overlay, listener: Callable[[Acknowledged], None]) -> None:
        self._overlay = overlay
        self._listener = listener
        self._lock = threading.Lock()
        self._held: list[Acknowledged] | None = []
        self.active = True

    def start(self) -> list[Acknowledged]:
        """Deliver the batches held so far to the listener, then deliver directly; return the
        batches that were held (for the caller's bookkeeping)."""
        with self._lock:
            held, self._held = self._held or [], None
            for batch in held:
                self._call(batch)
        return held

    def deliver(self, batch: Acknowledged) -> None:
        with self._lock:
            if not self.active:
                return
            if self._held is not None:
                self._held.append(batch)
            else:
                self._call(batch)

    def cancel(self) -> None:
        """Stop delivering (idempotent)."""
        with self._lock:
            self.active = False
            self._held = None
        self._overlay._unsubscribe(self)

    def _call(self, batch: Acknowledged) -> None:
        try:
            self._listener(batch)
        except Exception:
            log.exception("an overlay subscriber failed; it is unsubscribed")
            self.active = False
            self._held = None
