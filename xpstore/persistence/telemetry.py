"""In-memory telemetry of the store's own operations: the seam profilers and metrics read.

Every hot path (put, fsync, apply, similar, sample, rebuild, snapshot) calls
:meth:`Telemetry.observe` with its duration; nothing here touches the disk. Two views are kept:

- **totals**: counters and histograms since the store was opened (what a Prometheus scrape
  exports: monotonic counters, cumulative histograms);
- **interval**: the same since the last :meth:`Telemetry.take_interval`, which a profiler calls
  every N seconds to log one aggregated summary per operation type (never one record per call).

Cost: one lock, one dict lookup and one ``math.log`` per observation (about 1 us here; see
docs/benchmarks.md). Names are dotted strings (``put``, ``wal.fsync``); the list of names the
store emits is in docs/design.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from xpstore.model.sketch import LogHistogram

__all__ = ["Telemetry"]


class Telemetry:
    """Histograms of operation latencies and plain counters, in totals and per interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, LogHistogram] = {}
        self._interval: dict[str, LogHistogram] = {}
        self._counters: dict[str, float] = {}
        self._interval_started = time.time()
        self.opened_at = time.time()

    def observe(self, name: str, value: float) -> None:
        """Count one observation of ``name`` (seconds for latencies, items for sizes)."""
        with self._lock:  # only the interval is touched here; totals absorb it when it is taken
            h = self._interval.get(name)
            if h is None:
                h = self._interval[name] = LogHistogram()
            h.add(value)

    def incr(self, name: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the monotonic counter ``name`` (records, bytes, hits)."""
        with self._lock:
            self._counters[name] = self._counters.get(name, 0.0) + amount

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Observe the wall time of the ``with`` block under ``name`` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - start)

    def histograms(self) -> dict[str, LogHistogram]:
        """Copies of the histograms since open."""
        with self._lock:
            out = {k: v.copy() for k, v in self._totals.items()}
            for k, v in self._interval.items():
                if k in out:
                    out[k].merge(v)
                else:
                    out[k] = v.copy()
            return out

    def counters(self) -> dict[str, float]:
        """The counters since open."""
        with self._lock:
            return dict(self._counters)

    def take_interval(self) -> tuple[float, float, dict[str, LogHistogram]]:
        """``(start, end, histograms)`` of the interval since the last call, and start anew."""
        now = time.time()
        with self._lock:
            taken, self._interval = self._interval, {}
            start, self._interval_started = self._interval_started, now
            for k, v in taken.items():
                total = self._totals.get(k)
                self._totals[k] = v.copy() if total is None else total.merge(v)
        return start, now, taken
