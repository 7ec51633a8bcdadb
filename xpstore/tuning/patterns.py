"""Hot and cold tracks, and prewarming (issue 12; docs/tuning.md, "Hot tracks").

Accesses come from the store's seams: every ``similar(track_id)`` (``parts.index
.access_listeners``) and every sampled fingerprint (``parts.sampling.draw_listeners``). Per track
the detector keeps the count, the last access, the mean interval between accesses and two
exponentially decayed rates (a fast one, half-life ``half_life_s / 4``, and a slow one,
``half_life_s``) whose ratio is the trend: increasing above ``TREND_UP``, decreasing below
``TREND_DOWN``, stable between.

**Durable through retrieval counts.** A ``similar`` lookup is a retrieval of the track's
fingerprint: :meth:`PatternDetector.flush` logs the lookups counted since the last flush as one
``RetrievalOp`` (one WAL operation for any number of tracks), the same counter sampling bumps.
Opening seeds the counts from the stored ``retrieval_count`` of each track's current
fingerprint (read from the ``prio`` rows as arrays, not by decoding records), so the hot set
survives a restart, and the auto-tuner's recall probes are drawn by these counts.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from xpstore.errors import InvalidArgumentError
from xpstore.model.codec import KIND_CODES, RetrievalOp
from xpstore.model.priority_rows import INPUT_DTYPE
from xpstore.persistence.lmdb_tables import from_u64
from xpstore.store.sampling_service import SampleBatch
from xpstore.store.store import Store

__all__ = ["PatternDetector", "TrackPattern"]

log = logging.getLogger(__name__)

TREND_UP = 1.25
TREND_DOWN = 0.8
"""Fast-rate / slow-rate ratios that make a trend increasing / decreasing (a 25 % change)."""
MAX_TRACKS = 200_000
"""Tracks tracked in memory; beyond it the coldest are forgotten (their counts stay stored)."""


@dataclass
class TrackPattern:
    """What the detector knows of one track."""

    track_id: str
    count: int = 0
    last: float = 0.0
    mean_interval_s: float | None = None
    fast: float = 0.0  # decayed access counts at ``last``
    slow: float = 0.0
    unflushed: int = 0
    gaps: int = 0

    def trend(self, now: float, half_life_s: float) -> str:
        fast = self.fast * _decay(now - self.last, half_life_s / 4)
        slow = self.slow * _decay(now - self.last, half_life_s)
        if slow <= 0.0:
            return "stable"
        # the fast rate reacts 4x quicker; normalize by the half-lives to compare rates
        ratio = (fast / (half_life_s / 4)) / (slow / half_life_s)
        if ratio > TREND_UP:
            return "increasing"
        if ratio < TREND_DOWN:
            return "decreasing"
        return "stable"

    def as_dict(self, now: float, half_life_s: float) -> dict[str, Any]:
        return {"track_id": self.track_id, "count": self.count, "last": self.last,
                "mean_interval_s": self.mean_interval_s,
                "trend": self.trend(now, half_life_s)}  # fmt: skip


def _decay(dt: float, half_life: float) -> float:
    return math.exp(-math.log(2) * max(0.0, dt) / half_life)


class PatternDetector:
    """See the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        hot_threshold: int = 10,
        half_life_s: float = 3600.0,
        seed_from_store: bool = True,
    ) -> None:
        if isinstance(hot_threshold, bool) or not isinstance(hot_threshold, int) or (
            hot_threshold < 1
        ):
            raise InvalidArgumentError(f"hot_threshold must be an int >= 1, got {hot_threshold!r}",
                                       field="hot_threshold")  # fmt: skip
        if not (isinstance(half_life_s, int | float) and half_life_s > 0):
            raise InvalidArgumentError("half_life_s must be > 0", field="half_life_s")
        self.store = store
        self.hot_threshold = hot_threshold
        self.half_life_s = float(half_life_s)
        self._lock = threading.Lock()
        self.tracks: dict[str, TrackPattern] = {}
        if seed_from_store:
            self.seed()
        parts = store.parts
        parts.index.access_listeners.append(self.on_similar)
        parts.sampling.draw_listeners.append(self.on_sample)

    # ------------------------------------------------------------------ intake
    def on_similar(self, track_id: str) -> None:
        self.record(track_id, durable=True)

    def on_sample(self, batch: SampleBatch) -> None:
        for exp in batch.records:
            track = getattr(exp.record, "track_id", None)
            if exp.kind == "fingerprint" and isinstance(track, str):
                self.record(track)  # sampling logs its own retrieval counts

    def record(self, track_id: str, now: float | None = None, *, durable: bool = False) -> None:
        """Count one access of ``track_id`` (``durable``: to be logged at the next flush)."""
        t = time.time() if now is None else now
        with self._lock:
            p = self.tracks.get(track_id)
            if p is None:
                if len(self.tracks) >= MAX_TRACKS:
                    self._forget_coldest(t)
                p = self.tracks[track_id] = TrackPattern(track_id)
            if p.last:
                gap = max(0.0, t - p.last)
                p.gaps += 1
                prev = p.mean_interval_s or 0.0
                p.mean_interval_s = prev + (gap - prev) / p.gaps
            p.fast = p.fast * _decay(t - p.last, self.half_life_s / 4) + 1.0
            p.slow = p.slow * _decay(t - p.last, self.half_life_s) + 1.0
            p.count += 1
            p.last = max(p.last, t)
            if durable:
                p.unflushed += 1

    def _forget_coldest(self, now: float) -> None:
        keep = sorted(self.tracks.values(), key=lambda p: self._score(p, now), reverse=True)
        self.tracks = {p.track_id: p for p in keep[: MAX_TRACKS // 2]}

    def seed(self) -> int:
        """Counts from the stored retrieval counts of each track's current fingerprint."""
        counts = stored_retrievals(self.store)
        with self._lock:
            for track, c in counts.items():
                if c > 0 and track not in self.tracks:
                    self.tracks[track] = TrackPattern(track, count=c)
        return len(counts)

    def flush(self) -> int:
        """Log the ``similar`` lookups counted since the last flush as retrievals of the
        tracks' current fingerprints (one WAL operation); return the tracks logged."""
        with self._lock:
            pending = {t: p.unflushed for t, p in self.tracks.items() if p.unflushed}
        if not pending or self.store.readonly:
            return 0
        reader = self.store.parts.reader
        ids: dict[int, int] = {}
        for track, n in pending.items():
            rid = reader.read_track(track)
            if rid is not None:
                ids[rid] = ids.get(rid, 0) + n
        if ids:
            order = sorted(ids)
            self.store.parts.writer.submit_one(RetrievalOp(order, [ids[i] for i in order]))
        with self._lock:
            for track, n in pending.items():
                p = self.tracks.get(track)
                if p is not None:
                    p.unflushed = max(0, p.unflushed - n)
        return len(ids)

    # ------------------------------------------------------------------ reports
    def _score(self, p: TrackPattern, now: float) -> float:
        """Hotness: the decayed rate, or the stored count for tracks not seen this session."""
        return p.slow * _decay(now - p.last, self.half_life_s) if p.last else p.count * 1e-6

    def hot(self, n: int | None = None) -> list[str]:
        """Tracks with at least ``hot_threshold`` accesses, hottest first."""
        now = time.time()
        with self._lock:
            hot = [p for p in self.tracks.values() if p.count >= self.hot_threshold]
            hot.sort(key=lambda p: (self._score(p, now), p.count), reverse=True)
        return [p.track_id for p in (hot if n is None else hot[:n])]

    def pattern(self, track_id: str) -> dict[str, Any]:
        with self._lock:
            p = self.tracks.get(track_id)
            if p is None:
                raise InvalidArgumentError(f"no accesses of track {track_id!r} seen",
                                           field="track_id")  # fmt: skip
            return p.as_dict(time.time(), self.half_life_s)

    def recommendations(self, n: int = 20) -> list[dict[str, Any]]:
        """What to do about tracks: ``prewarm`` hot ones (priority by rate; ``high`` when the
        trend is increasing), ``release`` hot-by-count tracks whose use is decreasing."""
        now = time.time()
        out: list[dict[str, Any]] = []
        with self._lock:
            items = list(self.tracks.values())
        for p in items:
            if p.count < self.hot_threshold:
                continue
            trend = p.trend(now, self.half_life_s)
            score = self._score(p, now)
            if trend == "decreasing":
                why = f"{p.count} accesses, use decreasing"
                out.append({"track_id": p.track_id, "action": "release", "priority": "low",
                            "score": score, "reason": why})  # fmt: skip
            else:
                out.append({"track_id": p.track_id, "action": "prewarm",
                            "priority": "high" if trend == "increasing" else "normal",
                            "score": score,
                            "reason": f"{p.count} accesses (hot from {self.hot_threshold}), "
                                      f"trend {trend}"})  # fmt: skip
        out.sort(key=lambda r: (r["action"] == "prewarm", r["score"]), reverse=True)
        return out[:n]

    def prewarm(self, n: int = 1000, k: int = 10) -> dict[str, int]:
        """Answer-cache entries for the neighbours of the ``n`` hottest tracks."""
        hot = self.hot(n)
        if not hot:
            return {"tracks": 0, "answers": 0}
        done = self.store.parts.index.prewarm(hot, k)
        log.info("prewarmed %d hot tracks (%d answers cached)", done["tracks"], done["answers"])
        return done

    def close(self) -> None:
        parts = self.store.parts
        if self.on_similar in parts.index.access_listeners:
            parts.index.access_listeners.remove(self.on_similar)
        if self.on_sample in parts.sampling.draw_listeners:
            parts.sampling.draw_listeners.remove(self.on_sample)


def stored_retrievals(store: Store) -> dict[str, int]:
    """track id -> retrieval_count of its current fingerprint, from the ``prio`` rows (LMDB;
    what the overlay holds unapplied is counted at the next open)."""
    tables = store.parts.engine.tables
    values, _applied = tables.prio_rows()
    if not values:
        return {}
    rows = np.frombuffer(b"".join(values), dtype=INPUT_DTYPE)
    rows = rows[rows["kind"] == KIND_CODES["fingerprint"]]
    by_id = dict(zip(rows["id"].astype(np.int64).tolist(), rows["rc"].tolist(), strict=True))
    out: dict[str, int] = {}
    with tables.reading() as txn:
        for key, value in tables.iter_tracks(txn):
            rid = from_u64(value)
            out[key.decode()] = int(by_id.get(rid, 0))
    return out
