"""The in-memory overlay of acknowledged-but-unapplied effects (and enqueued, unacknowledged ones).
The :class:`Overlay` holds effects in two layers:

- *pending*: enqueued in the WAL but not yet acknowledged; only writers (validating later
  operations under the store's write lock) look here;
- *durable*: acknowledged but not yet applied to LMDB; every reader looks here before LMDB.

An effect moves pending -> durable (WAL leader, after the sync) -> LMDB (applier). Each move adds
to the later layer before removing from the earlier one, and lookups go earlier layer first, so a
lookup never misses an entry that is in flight between layers. Dict reads are atomic under the
GIL; mutations happen under ``Overlay.lock``.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from xpstore.model.effects import Effect

MISSING = object()
"""What :meth:`Overlay.writer_track` answers when neither layer knows the track."""


class Overlay:
    """Acknowledged-but-unapplied (and enqueued-but-unacknowledged) effects; see module doc."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.records: dict[int, Effect] = {}  # newest durable effect per record id
        self.tracks: dict[str, tuple[int, int | None]] = {}
        self.queue: deque[Effect] = deque()  # durable, not applied, LSN order
        self._p_records: dict[int, Effect] = {}
        self._p_tracks: dict[str, tuple[int, int | None]] = {}
        self._pending: deque[Effect] = deque()
        self.apply_threshold = 1 << 62  # queue length that wakes the applier (it sets this)
        self.listeners: list[Callable[[list[Effect]], None]] = []
        """Called under ``lock`` with the effects each ``make_durable`` moved, in LSN order,
        before any of their writers returns (the k-NN index's and the sampler's
        acknowledgement-path hooks); they must not raise or block for long."""

    # writer side (under the store's write lock)
    def writer_get(self, rid: int) -> Effect | None:
        """The newest effect on ``rid`` in either layer, or None if neither has one."""
        hit = self._p_records.get(rid)
        return hit if hit is not None else self.records.get(rid)

    def writer_track(self, track_id: str) -> object:
        hit = self._p_tracks.get(track_id)
        if hit is None:
            hit = self.tracks.get(track_id)
        return hit[1] if hit is not None else MISSING

    def add_pending(self, eff: Effect) -> None:
        with self.lock:
            self._pending.append(eff)
            if eff.record_id is not None:
                self._p_records[eff.record_id] = eff
            if eff.track is not None:
                self._p_tracks[eff.track] = (eff.lsn, eff.track_to)

    def drop_pending_from(self, lsn: int) -> None:
        """Forget pending effects at or after ``lsn`` (their WAL append was refused)."""
        with self.lock:
            while self._pending and self._pending[-1].lsn >= lsn:
                eff = self._pending.pop()
                if eff.record_id is not None and self._p_records.get(eff.record_id) is eff:
                    del self._p_records[eff.record_id]
                if eff.track is not None and self._p_tracks.get(eff.track, (0,))[0] == eff.lsn:
                    del self._p_tracks[eff.track]

    def make_durable(self, last_lsn: int) -> None:
        """Move pending effects up to ``last_lsn`` into the durable layer (WAL leader)."""
        with self.lock:
            listeners = self.listeners
            moved: list[Effect] = []
            while self._pending and self._pending[0].lsn <= last_lsn:
                eff = self._pending.popleft()
                self.add_durable_locked(eff)
                if listeners:
                    moved.append(eff)
                if eff.record_id is not None and self._p_records.get(eff.record_id) is eff:
                    del self._p_records[eff.record_id]
                if eff.track is not None and self._p_tracks.get(eff.track, (0,))[0] == eff.lsn:
                    del self._p_tracks[eff.track]
            for listener in listeners:
                listener(moved)  # before any writer of these effects returns
            if len(self.queue) >= self.apply_threshold:
                self.changed.notify_all()  # a full batch for the applier; otherwise it waits

    def add_durable_locked(self, eff: Effect) -> None:
        self.queue.append(eff)
        if eff.record_id is not None:
            self.records[eff.record_id] = eff
        if eff.track is not None:
            self.tracks[eff.track] = (eff.lsn, eff.track_to)

    # applier side
    def take(self, limit: int) -> list[Effect]:
        with self.lock:
            n = min(limit, len(self.queue))
            return [self.queue[i] for i in range(n)]

    def applied(self, effects: list[Effect]) -> None:
        """Drop ``effects`` (now committed to LMDB) unless a newer effect replaced an entry."""
        with self.lock:
            for eff in effects:
                self.queue.popleft()
                if eff.record_id is not None and self.records.get(eff.record_id) is eff:
                    del self.records[eff.record_id]
                if eff.track is not None and self.tracks.get(eff.track, (0,))[0] == eff.lsn:
                    del self.tracks[eff.track]
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

