"""The single entry point of self-tuning (issue 12; docs/tuning.md): ``Tuning(store)`` attaches
the profiler, the pattern detector, the auto-tuner and the resource monitor to an open store.

The store cannot import this layer, so it is attached by its user right after ``Store.open``
(the CLI does so for ``xpstore profile`` and ``xpstore tune``); "at open" in docs/tuning.md means
this moment. Attaching registers the tuner's metrics and (with ``monitor``) the resource
monitor's ``memory`` health check on the store's seams (:mod:`xpstore.tuning.observe`),
rebuilds the profiler's window and the tuner's state from the stored records, seeds the hot
tracks from the stored retrieval counts and, when some are hot, prewarms the answer cache with
their neighbours; each later index rebuild prewarms again.
Close it before the store: ``with Tuning(store) as tuning: ...``.
"""

from __future__ import annotations

import logging
from types import TracebackType

from xpstore.store.store import Store
from xpstore.tuning.monitor import ResourceMonitor
from xpstore.tuning.observe import claim_tuning, unwatch_tuning, watch_tuning
from xpstore.tuning.patterns import PatternDetector
from xpstore.tuning.profiler import Profiler
from xpstore.tuning.tuner import AutoTuner

__all__ = ["Tuning"]

log = logging.getLogger(__name__)

PREWARM_TRACKS = 1_000
"""Hot tracks whose neighbours are prewarmed at attach and after each rebuild."""


class Tuning:
    """``profiler``, ``patterns``, ``tuner`` and ``monitor`` of one open store."""

    def __init__(
        self,
        store: Store,
        *,
        strategy: str | None = None,
        memory_strategy: str = "balanced",
        recall_floor: float = 0.95,
        background: bool = True,
        monitor: bool = True,
        prewarm: bool = True,
        window_s: float = 24 * 3600.0,
        flush_s: float = 60.0,
        monitor_interval_s: float = 5.0,
        tune_interval_s: float = 300.0,
        hot_threshold: int = 10,
        seed: int = 0,
    ) -> None:
        self.store = store
        claim_tuning(store, lambda: self.tuner)  # before any thread starts: one per store
        try:
            self.patterns = PatternDetector(store, hot_threshold=hot_threshold)
            self.profiler = Profiler(store, window_s=window_s, flush_s=flush_s,
                                     background=background,
                                     on_flush=[self.patterns.flush])  # fmt: skip
            self.tuner = AutoTuner(store, self.profiler, self.patterns, strategy=strategy,
                                   recall_floor=recall_floor, interval_s=tune_interval_s,
                                   seed=seed,
                                   background=background and not store.readonly)  # fmt: skip
            self.monitor = ResourceMonitor(store, strategy=memory_strategy,
                                           interval_s=monitor_interval_s,
                                           hot=lambda: self.patterns.hot(PREWARM_TRACKS),
                                           background=background and monitor)  # fmt: skip
        except BaseException:
            unwatch_tuning(store, monitor=False)
            raise
        self._prewarm = prewarm
        self._watch_memory = monitor
        watch_tuning(store, self.monitor if monitor else None)
        store.parts.index.on_rebuilt.append(self._after_rebuild)
        if prewarm and self.patterns.hot(1):
            self.prewarm()

    def prewarm(self) -> dict[str, int]:
        """Prewarm the answer cache with the neighbours of the hottest tracks."""
        return self.patterns.prewarm(PREWARM_TRACKS)

    def _after_rebuild(self, _info: object) -> None:
        if self._prewarm and self.patterns.hot(1):
            self.prewarm()

    def close(self) -> None:
        """Stop the threads, log the last summaries and lookups, back to memory level 0."""
        lst = self.store.parts.index.on_rebuilt
        if self._after_rebuild in lst:
            lst.remove(self._after_rebuild)
        unwatch_tuning(self.store, monitor=self._watch_memory)
        self.monitor.close()
        self.tuner.close()
        writable = not self.store.readonly and not self.store.parts.engine.closed
        if writable:
            self.patterns.flush()
        self.patterns.close()
        self.profiler.close()

    def __enter__(self) -> Tuning:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
