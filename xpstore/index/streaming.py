"""The streaming side of similar-track lookup (issue 11): the in-memory cache of the streaming
values a player sends while a track plays, and the exact search over streaming values behind
``similar(strategy="fast")``.

**Cache.** One entry per track: the latest streaming values, their per-value confidence, the
chunk count, when it was last offered. An entry is replaced when a new offer's mean confidence is
at least the cached one's (a player's values settle as chunks accumulate; a stale or noisier
offer never overwrites a better one), dropped ``ttl_s`` after its last update, and the least
recently used entries go first when the cache holds more than ``max_bytes`` (an estimate per
entry: :func:`entry_bytes`). Counters: hits, misses, offers kept, replaced, ignored, expired,
evicted. Thread-safe (one lock; every operation is a few dict moves). The clock is injectable
for tests.

**Streaming space.** Every vector is the index's own audio block (the embedder that serves the
index) of a track's *streaming* values only: the 13 names by name, the other 12 missing
(standardized to 0), L2-normalized. Exact inner-product search over a matrix rebuilt when the
library or the cache changed: meant for libraries up to ~100k tracks with streaming values.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["CacheEntry", "StreamingCache", "entry_bytes", "top_k"]

_ENTRY_OVERHEAD: Final = 400
_PER_VALUE: Final = 120


def entry_bytes(track_id: str, n_values: int) -> int:
    """An estimate of one entry's memory: two small dicts of floats and the bookkeeping."""
    return _ENTRY_OVERHEAD + _PER_VALUE * n_values + len(track_id.encode())


@dataclass
class CacheEntry:
    track_id: str
    values: dict[str, float]
    confidence: dict[str, float]
    chunk_count: int
    mean_confidence: float
    updated: float
    size: int


@dataclass
class StreamingCache:
    """TTL + LRU-by-bytes cache of streaming values by track id (see the module doc)."""

    max_bytes: int
    ttl_s: float
    clock: Callable[[], float] = time.monotonic
    counters: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("hits", "misses", "stored", "replaced", "ignored", "expired", "evicted"), 0
        )
    )
    version: int = 0
    """Bumps when the cached set of values changes (the streaming space is rebuilt)."""

    def __post_init__(self) -> None:
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()  # least recently used first
        self._updated: OrderedDict[str, float] = OrderedDict()  # least recently updated first
        self._bytes = 0
        self._lock = threading.Lock()

    def offer(
        self,
        track_id: str,
        values: Mapping[str, float],
        confidence: Mapping[str, float],
        chunk_count: int,
    ) -> tuple[bool, CacheEntry]:
        """Cache the values unless a cached entry has a higher mean confidence; returns
        (whether they are cached now, the entry in force)."""
        mean = sum(confidence.values()) / len(confidence) if confidence else 0.0
        now = self.clock()
        with self._lock:
            self._expire(now)
            old = self._entries.get(track_id)
            if old is not None and mean < old.mean_confidence:
                self.counters["ignored"] += 1
                self._entries.move_to_end(track_id)
                return False, old
            entry = CacheEntry(track_id, dict(values), dict(confidence), chunk_count, mean, now,
                               entry_bytes(track_id, len(values)))  # fmt: skip
            if old is not None:
                self._bytes -= old.size
                self.counters["replaced"] += 1
            else:
                self.counters["stored"] += 1
            self._entries[track_id] = entry
            self._entries.move_to_end(track_id)
            self._updated[track_id] = now
            self._updated.move_to_end(track_id)
            self._bytes += entry.size
            self._evict()
            self.version += 1
            return track_id in self._entries, entry

    def get(self, track_id: str) -> CacheEntry | None:
        """The live entry (a hit moves it to most recently used), or None (a miss)."""
        with self._lock:
            self._expire(self.clock())
            entry = self._entries.get(track_id)
            if entry is None:
                self.counters["misses"] += 1
                return None
            self.counters["hits"] += 1
            self._entries.move_to_end(track_id)
            return entry

    def pop(self, track_id: str) -> CacheEntry | None:
        with self._lock:
            entry = self._entries.pop(track_id, None)
            if entry is not None:
                del self._updated[track_id]
                self._bytes -= entry.size
                self.version += 1
            return entry

    def entries(self) -> list[CacheEntry]:
        """The live entries, least recently used first (no counters touched)."""
        with self._lock:
            self._expire(self.clock())
            return list(self._entries.values())

    def resize(self, max_bytes: int, ttl_s: float) -> None:
        with self._lock:
            self.max_bytes, self.ttl_s = max_bytes, ttl_s
            self._expire(self.clock())
            self._evict()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._expire(self.clock())
            return {**self.counters, "entries": len(self._entries), "bytes": self._bytes,
                    "max_bytes": self.max_bytes, "ttl_s": self.ttl_s}  # fmt: skip

    def _expire(self, now: float) -> None:
        """Drop entries not updated for ``ttl_s`` (oldest update first: O(expired))."""
        changed = False
        while self._updated:
            track, updated = next(iter(self._updated.items()))
            if now - updated < self.ttl_s:
                break
            del self._updated[track]
            entry = self._entries.pop(track)
            self._bytes -= entry.size
            self.counters["expired"] += 1
            changed = True
        if changed:
            self.version += 1

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            track, entry = self._entries.popitem(last=False)
            del self._updated[track]
            self._bytes -= entry.size
            self.counters["evicted"] += 1
            self.version += 1


def top_k(
    query: npt.NDArray[np.float64], matrix: npt.NDArray[np.float64], k: int, exclude: int | None
) -> list[tuple[int, float]]:
    """(row, score) of the ``k`` best rows of ``matrix`` by inner product, ``exclude`` left out."""
    if matrix.shape[0] == 0:
        return []
    scores = matrix @ query
    if exclude is not None:
        scores[exclude] = -np.inf
    kk = min(k, scores.shape[0])
    part = np.argpartition(-scores, kk - 1)[:kk]
    order = part[np.argsort(-scores[part], kind="stable")]
    return [(int(r), float(scores[r])) for r in order if np.isfinite(scores[r])]
