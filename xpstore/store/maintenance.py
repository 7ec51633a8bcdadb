"""Retention and compaction for a Store (issue 3): apply_retention, compact, and the automatic
retention task the applier schedules.

Retention evicts through the WAL, exactly like ``delete``: each eviction is a logged
:class:`~xpstore.model.codec.DeleteOp`, so a crash before the applier reaches it replays it
instead of resurrecting the record. Compaction is :mod:`xpstore.ops.compaction`; this module
only takes the store's locks around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator

from xpstore.config import RetentionRule
from xpstore.errors import RecordNotFoundError, XpStoreError
from xpstore.model.codec import DeleteOp, Op, encode_op
from xpstore.model.progress import ProgressFn
from xpstore.model.records import Experience
from xpstore.ops import compaction
from xpstore.ops.compaction import CompactReport
from xpstore.store.engine import Engine
from xpstore.store.reader import Reader
from xpstore.store.writer import Writer

__all__ = ["EVICT_BATCH", "Maintenance", "RetentionTask"]

log = logging.getLogger(__name__)

EVICT_BATCH = 2048
"""Evictions per WAL frame: a DeleteOp is ~16 bytes logged, so a frame stays around 32 KiB."""


class Maintenance:
    """Retention passes and compaction of one open store."""

    def __init__(self, engine: Engine, reader: Reader, writer: Writer) -> None:
        self._engine = engine
        self._reader = reader
        self._writer = writer
        self._pass_lock = threading.Lock()  # two passes at once would evict the same excess

    def apply_retention(self, now: float | None = None) -> dict[str, int]:
        """See :meth:`xpstore.Store.apply_retention`."""
        engine = self._engine
        engine.writable()
        when = time.time() if now is None else float(now)
        with self._pass_lock:
            out: dict[str, int] = {}
            for kind, rule in engine.config.retention.rules.items():
                out[kind] = self._enforce(kind, rule, when)
        if any(out.values()):
            log.info("retention evicted %s", ", ".join(f"{n} {k}" for k, n in out.items() if n))
        return out

    def compact(self, progress: ProgressFn | None = None) -> CompactReport:
        """See :meth:`xpstore.Store.compact`."""
        engine = self._engine
        engine.writable()
        with engine.write_lock:
            engine.writable()
            applier = engine.applier
            assert applier is not None
            if "compaction" in applier.paused_tasks:
                raise XpStoreError(
                    "compaction is paused: the store is in a memory emergency (level 3, "
                    "docs/tuning.md); it resumes when memory pressure falls"
                )
            if not applier.hold:
                applier.apply_all()  # the copy then holds everything acknowledged so far
            with applier.exclusive():
                return compaction.compact_tables(engine.layout, engine.tables, progress)

    def evict(self, ids: list[int]) -> int:
        """Log a DeleteOp per id as one WAL frame; skip ids someone else deleted meanwhile.

        A concurrent delete makes the whole batch fail validation (nothing is logged); the batch
        is then filtered and retried. Each failure drops at least one id, so this ends.
        """
        while ids:
            ops: list[Op] = [DeleteOp(rid) for rid in ids]
            try:
                self._writer.submit(ops, [encode_op(op) for op in ops])
            except RecordNotFoundError:
                ids = [rid for rid in ids if self._reader.read_get(rid) is not None]
                continue
            return len(ids)
        return 0

    def _enforce(self, kind: str, rule: RetentionRule, now: float) -> int:
        """Evict the records of ``kind`` that ``rule`` no longer allows; return how many."""
        excess = 0
        if rule.max_count is not None:
            excess = max(0, self._reader.count(kind) - rule.max_count)
        cutoff = now - rule.max_age_s if rule.max_age_s is not None else None
        if not excess and cutoff is None:
            return 0
        evicted = 0
        for batch in _batches(_victims(self._reader.scan(kind), excess, cutoff), EVICT_BATCH):
            if self._engine.closed:
                break
            evicted += self.evict(batch)
        return evicted


class RetentionTask:
    """The automatic retention pass (a :class:`~xpstore.persistence.applier.MaintenanceTask`):
    due when the store has rules and ``retention.interval_s`` has passed since the last pass
    started (the first: an interval after the store opened)."""

    name = "retention"

    def __init__(self, engine: Engine, maintenance: Maintenance) -> None:
        self._engine = engine
        self._maintenance = maintenance
        self.last_start = time.monotonic()

    def due(self, now: float | None = None) -> bool:
        """Cheap and non-blocking (the applier asks at every wake-up); ``now`` is monotonic."""
        engine = self._engine
        cfg = engine.config.retention
        if not cfg.rules or engine.readonly or engine.closed:
            return False
        clock = time.monotonic() if now is None else now
        return clock - self.last_start >= cfg.interval_s

    def run(self) -> None:
        self.last_start = time.monotonic()
        try:
            self._maintenance.apply_retention()
        except Exception:
            if self._engine.closed:
                log.debug("retention pass stopped: the store was closed", exc_info=True)
                return
            raise


def _victims(scan: Iterator[Experience], excess: int, cutoff: float | None) -> Iterator[int]:
    """Ids from the oldest on, while a rule condemns them: the first ``excess``, or too old.

    The scan is in (ts, id) order, so both conditions select a prefix and the union is the
    longer one; the scan stops at the first record that survives.
    """
    for taken, exp in enumerate(scan):
        if taken < excess or (cutoff is not None and exp.ts < cutoff):
            yield exp.id
        else:
            return


def _batches(ids: Iterable[int], size: int) -> Iterator[list[int]]:
    batch: list[int] = []
    for rid in ids:
        batch.append(rid)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
