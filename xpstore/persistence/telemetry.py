"""In-memory telemetry of the store's own operations: the seam profilers and metrics read.

Every hot path (put, fsync, apply, similar, sample, rebuild, snapshot) calls
:meth:`Telemetry.observe` with its duration; nothing here touches the disk. Two views are kept:

- **totals**: counters and histograms since the store was opened (what a Prometheus scrape
  exports: monotonic counters, cumulative histograms);
- **interval**: the same since the last :meth:`Telemetry.take_interval`, which a profiler calls
  every N seconds to log one aggregated summary per operation type (never one record per call).

Cost: an observation is one dict lookup and one ``list.append`` (atomic under the GIL, so no
lock): about 0.2 us. The raw values are folded into the interval's histogram, vectorized, when
``FOLD_AT`` of them are waiting or when anything reads (docs/benchmarks.md: a per-value
histogram update under a lock cost about 1 us, and the ``@timed`` wrapper several). Names are
dotted strings (``put``, ``wal.fsync``); the list of names the store emits is in docs/design.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from xpstore.errors import InvalidArgumentError
from xpstore.model.sketch import LogHistogram

__all__ = ["FOLD_AT", "Telemetry"]

log = logging.getLogger(__name__)

FOLD_AT = 4096
"""Raw values kept per name before they are folded into its histogram (32 KiB of floats)."""


class Telemetry:
    """Histograms of operation latencies and plain counters, in totals and per interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: dict[str, list[float]] = {}
        self._totals: dict[str, LogHistogram] = {}
        self._interval: dict[str, LogHistogram] = {}
        self._counters: dict[str, float] = {}
        self._interval_started = time.time()
        self.opened_at = time.time()

    def observe(self, name: str, value: float) -> None:
        """Count one observation of ``name`` (seconds for latencies, items for sizes)."""
        buf = self._raw.get(name)
        if buf is None:
            with self._lock:
                buf = self._raw.setdefault(name, [])
        buf.append(value)
        if len(buf) >= FOLD_AT:
            with self._lock:
                self._fold(name, buf)

    def _fold(self, name: str, buf: list[float]) -> None:
        """Under the lock: move the raw values of ``name`` into its interval histogram. The list
        is cut in place (``del buf[:n]``), so appends racing with the fold are kept."""
        n = len(buf)
        if not n:
            return
        values = buf[:n]
        del buf[:n]
        h = self._interval.get(name)
        if h is None:
            h = self._interval[name] = LogHistogram()
        try:
            h.add_many(values)
        except InvalidArgumentError:
            log.exception("telemetry %s: %d values dropped", name, n)

    def _fold_all(self) -> None:
        for name, buf in list(self._raw.items()):
            self._fold(name, buf)

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
            self._fold_all()
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
            self._fold_all()
            taken, self._interval = self._interval, {}
            start, self._interval_started = self._interval_started, now
            for k, v in taken.items():
                total = self._totals.get(k)
                self._totals[k] = v.copy() if total is None else total.merge(v)
        return start, now, taken
