"""The resource monitor (issue 12; docs/tuning.md, "Memory pressure"): reads the machine's memory
every ``interval_s`` and sets the store's degradation level through ``store.parts.pressure``.

Readings come from a seam (``reader``, psutil by default) so tests can drive every level with
the real store actions behind it. Levels:

- 0 normal below ``WARNING_USED``;
- 1 warning above ``WARNING_USED`` (80 % used);
- 2 critical above ``CRITICAL_USED`` (90 %);
- 3 emergency: critical, and the background work is what grows (the process's RSS grew since
  the last reading while an index build or a snapshot was running).

A level is left only when usage falls ``HYSTERESIS`` points below its threshold, so a machine
hovering at 80 % does not flap. The cache budget follows the strategy's reserve
(``conservative`` / ``balanced`` / ``aggressive`` keep 60 / 40 / 20 % of memory free): the
answer cache may use what is available beyond the reserve, at ``ENTRY_BYTES`` an entry, within
``min_cache`` .. ``max_cache`` entries.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from xpstore.errors import InvalidArgumentError, XpStoreError
from xpstore.store.store import Store

__all__ = ["RESERVES", "MemoryReading", "ResourceMonitor", "psutil_reading"]

log = logging.getLogger(__name__)

RESERVES = {"conservative": 0.60, "balanced": 0.40, "aggressive": 0.20}
"""Share of the machine's memory each strategy keeps free (Minerva's CacheOptimizer's 60/40/20)."""
WARNING_USED = 80.0
CRITICAL_USED = 90.0
HYSTERESIS = 5.0
ENTRY_BYTES = 400
"""Memory of one answer-cache entry (id, track id string, metadata dict, dict slot): measured
with tracemalloc on the benchmark's tracks, rounded up."""


@dataclass(frozen=True)
class MemoryReading:
    """One reading: the machine's memory and this process's resident set."""

    total: int
    available: int
    rss: int

    @property
    def used_percent(self) -> float:
        return 100.0 * (1.0 - self.available / self.total) if self.total else 0.0


def psutil_reading() -> MemoryReading:
    vm = psutil.virtual_memory()
    return MemoryReading(int(vm.total), int(vm.available),
                         int(psutil.Process(os.getpid()).memory_info().rss))  # fmt: skip


class ResourceMonitor:
    """See the module docstring. ``level`` is the level in force."""

    def __init__(
        self,
        store: Store,
        *,
        strategy: str = "balanced",
        interval_s: float = 5.0,
        reader: Callable[[], MemoryReading] | None = None,
        hot: Callable[[], list[str]] | None = None,
        min_cache: int = 1_000,
        max_cache: int = 1_000_000,
        background: bool = True,
    ) -> None:
        if strategy not in RESERVES:
            raise InvalidArgumentError(f"unknown memory strategy {strategy!r}; use one of "
                                       f"{', '.join(RESERVES)}", field="strategy")  # fmt: skip
        if not (isinstance(interval_s, int | float) and interval_s > 0):
            raise InvalidArgumentError("interval_s must be > 0", field="interval_s")
        if not 0 <= min_cache <= max_cache:
            raise InvalidArgumentError("need 0 <= min_cache <= max_cache", field="min_cache")
        self.store = store
        self.strategy = strategy
        self.interval_s = float(interval_s)
        self.reader = reader or psutil_reading
        self.hot = hot or (lambda: [])
        self.min_cache, self.max_cache = min_cache, max_cache
        self.level = 0
        self.last: MemoryReading | None = None
        self.cache_budget: int | None = None
        self.changes: list[tuple[float, int, int]] = []  # (reading's used %, from, to)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="xpstore-monitor", daemon=True)
            self._thread.start()

    def budget(self, reading: MemoryReading) -> int:
        """Answer-cache entries the strategy allows: memory beyond the reserve, bounded."""
        spare = reading.available - RESERVES[self.strategy] * reading.total
        entries = int(spare // ENTRY_BYTES) if spare > 0 else 0
        return max(self.min_cache, min(self.max_cache, entries))

    def decide(self, reading: MemoryReading, previous: MemoryReading | None) -> int:
        """The level for ``reading`` (pure but for the current level: hysteresis)."""
        used = reading.used_percent
        cur = self.level
        if used > CRITICAL_USED or (cur >= 2 and used > CRITICAL_USED - HYSTERESIS):
            grew = previous is not None and reading.rss > previous.rss
            if grew and self._background_running():
                return 3
            if cur == 3 and self._background_paused_growth(reading, previous):
                return 3
            return 2
        if used > WARNING_USED or (cur >= 1 and used > WARNING_USED - HYSTERESIS):
            return 1
        return 0

    def check(self) -> int:
        """Take a reading and apply its level (and the cache budget); return the level."""
        reading = self.reader()
        level = self.decide(reading, self.last)
        self.cache_budget = self.budget(reading)
        if level != self.level:
            self.changes.append((reading.used_percent, self.level, level))
            log.warning("memory %.1f %% used (rss %d MiB): level %d -> %d", reading.used_percent,
                        reading.rss >> 20, self.level, level)  # fmt: skip
        self.level = level
        self.last = reading
        self.store.parts.pressure.set_level(level, cache_entries=self.cache_budget,
                                            hot_tracks=self.hot())  # fmt: skip
        return level

    def status(self) -> dict[str, Any]:
        r = self.last
        return {
            "level": self.level,
            "strategy": self.strategy,
            "reserve": RESERVES[self.strategy],
            "used_percent": r.used_percent if r else None,
            "rss_bytes": r.rss if r else None,
            "cache_budget": self.cache_budget,
            "store": self.store.parts.pressure.status(),
        }

    def _background_running(self) -> bool:
        """An index build or a snapshot is running now."""
        parts = self.store.parts
        mgr = parts.index.manager
        if mgr is not None and mgr.rebuilder is not None and mgr.rebuilder.building_since:
            return True
        applier = parts.engine.applier
        return applier is not None and applier.is_running("snapshot")

    def _background_paused_growth(
        self, reading: MemoryReading, previous: MemoryReading | None
    ) -> bool:
        """Stay in 3 while paused work would resume into growing memory: until the RSS fell."""
        return previous is not None and reading.rss >= previous.rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except XpStoreError as exc:
                log.info("resource monitor stops: %s", exc)
                return
            except Exception:
                log.exception("resource monitor reading failed")

    def close(self) -> None:
        """Stop reading and put the store back to level 0 (if it is still open)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if not self.store.parts.engine.closed and self.level:
            self.level = 0
            self.store.parts.pressure.set_level(0)
