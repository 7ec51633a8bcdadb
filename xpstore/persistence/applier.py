"""The applier: moves acknowledged effects from the overlay into LMDB, off the writers' path,
and checkpoints (sync LMDB, then delete WAL segments it fully covers).

One synced LMDB transaction per batch; the batch's last LSN is written as ``applied_lsn`` in the
same transaction, so a crash between batches only means the WAL replays a little more.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from xpstore.config import ApplySettings, WalSettings
from xpstore.errors import XpStoreError
from xpstore.model.codec import KIND_CODES
from xpstore.model.effects import Effect
from xpstore.persistence.lmdb_changes import (
    Change,
    MetaSet,
    NewRecords,
    RecordDelete,
    RecordPut,
    RetrievalCounts,
    TrackDelete,
    TrackSet,
)
from xpstore.persistence.lmdb_tables import LmdbTables, u64_keys
from xpstore.persistence.overlay import Overlay
from xpstore.persistence.telemetry import Telemetry
from xpstore.persistence.wal import WalWriter

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 60.0
"""The longest ``stop`` waits for the applier thread to finish its transaction."""


def to_changes(effects: list[Effect]) -> list[Change]:
    """Translate store effects into LMDB table changes (the values are already encoded)."""
    out: list[Change] = []
    for eff in effects:
        if eff.record_id is not None:
            code = KIND_CODES[eff.kind]
            if eff.value is not None:
                out.append(RecordPut(eff.record_id, code, eff.ts, eff.value, eff.is_new, eff.prio))
            else:
                out.append(RecordDelete(eff.record_id, code, eff.ts, eff.lsn))
        if eff.meta is not None:
            out.append(MetaSet(*eff.meta))
        if eff.retrievals is not None:
            out.append(RetrievalCounts(eff.lsn, eff.retrievals))
        if eff.track is not None:
            if eff.track_to is not None:
                out.append(TrackSet(eff.track, eff.track_to))
            else:
                out.append(TrackDelete(eff.track, eff.lsn, eff.track_from or 0))
    return out


def _new_put(eff: Effect) -> bool:
    return (eff.is_new and eff.value is not None and eff.record_id is not None
            and eff.meta is None and (eff.track is None or eff.track_to is not None))  # fmt: skip


def _track_sets(run: list[Effect]) -> list[tuple[bytes, bytes]]:
    sets = [e for e in run if e.track is not None]
    keys = u64_keys([e.track_to for e in sets])  # type: ignore[misc]
    return [(e.track.encode(), key) for e, key in zip(sets, keys, strict=True)]  # type: ignore[union-attr]


def batch_changes(effects: list[Effect]) -> list[Change]:
    """:func:`to_changes`, with each run of new records as one columnar :class:`NewRecords`
    (an ingest batch of N puts is then one change, not 2N)."""
    out: list[Change] = []
    start = 0
    n = len(effects)
    while start < n:
        end = start
        while end < n and _new_put(effects[end]):
            end += 1
        if end == start:
            out += to_changes([effects[start]])
            start += 1
            continue
        run = effects[start:end]
        codes = KIND_CODES
        out.append(NewRecords(
            [e.record_id for e in run],  # type: ignore[misc]
            [codes[e.kind] for e in run],
            [e.ts for e in run],
            [e.value for e in run],  # type: ignore[misc]
            [e.prio for e in run],
            _track_sets(run),
            [e.fprow for e in run],
        ))  # fmt: skip
        start = end
    return out


class MaintenanceTask(Protocol):
    """Background work the applier schedules (automatic snapshots, retention passes).

    ``due()`` is called on the applier thread at every wake-up and must be cheap and never
    block; when it says yes, ``run()`` runs on a thread of its own (it may write through the
    WAL and wait on back-pressure that only the applier relieves), one run of a task at a time.
    """

    name: str

    def due(self) -> bool: ...

    def run(self) -> object: ...  # what it returns is for callers who run it by hand


class Applier:
    """Background thread: overlay -> LMDB in batches, periodic checkpoints, maintenance tasks."""

    def __init__(
        self, overlay: Overlay, tables: LmdbTables, apply: ApplySettings, wal: WalSettings,
        telemetry: Telemetry | None = None,
    ) -> None:  # fmt: skip
        self._overlay = overlay
        self._telemetry = telemetry or Telemetry()
        self._tables = tables
        self._wal: WalWriter | None = None
        self._apply_lock = threading.Lock()  # the thread, close() and flush() may all apply
        self.hold = apply.hold
        self.configure(apply, wal)
        self._stop = False
        self._last_ckpt = time.monotonic()
        self._applied_since_ckpt = 0
        self.error: XpStoreError | None = None
        self._tasks: list[MaintenanceTask] = []
        self._running: dict[str, threading.Thread] = {}
        self.paused_tasks: frozenset[str] = frozenset()
        """Task names not started while listed (memory emergency: ``"snapshot"``; the store's
        compaction reads ``"compaction"`` here too). Cleared, they run at the next wake-up."""
        self._tasks_lock = threading.Lock()  # task threads: start + listing vs join_tasks
        self.batches = 0
        self._thread = threading.Thread(target=self._run, name="xpstore-applier", daemon=True)

    def configure(self, apply: ApplySettings, wal: WalSettings) -> None:
        """Take new batching and checkpoint knobs (a live reconfigure); ``hold`` stays."""
        self._batch = apply.batch_ops
        self._interval = apply.interval_ms / 1000.0
        self._ckpt_interval = wal.checkpoint_interval_s
        self._retain = wal.retain_segments
        self._retain_seconds = wal.retain_seconds
        self._overlay.apply_threshold = self._batch if self._thread_started() else 1 << 62

    def _thread_started(self) -> bool:
        thread = getattr(self, "_thread", None)
        return thread is not None and thread.ident is not None

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off every apply for the duration (compaction swaps the LMDB file underneath)."""
        with self._apply_lock:
            yield

    def add_task(self, task: MaintenanceTask) -> None:
        """Schedule ``task`` (see :class:`MaintenanceTask`) from the next wake-up on."""
        self._tasks.append(task)

    def is_running(self, name: str) -> bool:
        """Whether a run of task ``name`` is in progress now."""
        thread = self._running.get(name)
        return thread is not None and thread.is_alive()

    def join_tasks(self, timeout: float | None = None) -> None:
        """Wait for running maintenance tasks (close, after the store refuses new writes)."""
        with self._tasks_lock:  # a task thread is listed only once started (see below)
            threads = list(self._running.values())
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def attach_wal(self, wal: WalWriter) -> None:
        """Give the applier the WAL whose segments its checkpoints may delete."""
        self._wal = wal

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: bool, timeout: float | None = None) -> None:
        """Stop the thread; with ``drain`` apply everything first and checkpoint.

        Waits at most ``timeout`` seconds (default ``STOP_TIMEOUT_S``) for the thread, which
        finishes the LMDB transaction it is in; XpStoreError if it does not (nothing is drained
        then: the WAL still holds every acknowledged operation).
        """
        with self._overlay.changed:
            self._stop = True
            self._overlay.changed.notify_all()
        if self._thread_started():
            limit = STOP_TIMEOUT_S if timeout is None else timeout
            self._thread.join(limit)
            if self._thread.is_alive():
                raise XpStoreError(
                    f"the applier did not stop within {limit:g} s (an LMDB transaction is still "
                    "running); nothing more was applied, and the WAL keeps every acknowledged "
                    "operation for the next open to replay"
                )
        if drain and self.error is None and not self.hold:
            self.apply_all()
            with self._apply_lock:
                self._tables.fold_retrievals()
            self.checkpoint()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end (it ends when stopped, or after an LMDB failure); True if
        it has, or never started)."""
        if not self._thread_started():
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def apply_all(self) -> None:
        """Apply every queued effect now, in this thread (close, recovery, tests)."""
        while self.apply_once():
            pass

    def apply_through(self, lsn: int) -> None:
        """Apply every queued effect up to ``lsn`` (not later ones: under a steady stream of
        writes "apply everything" would never finish)."""
        while True:
            with self._overlay.lock:
                if not self._overlay.queue or self._overlay.queue[0].lsn > lsn:
                    return
            self.apply_once()

    def apply_once(self) -> bool:
        with self._apply_lock:
            return self._apply_locked()

    def try_apply_through(self, lsn: int) -> bool:
        """:meth:`apply_through` in the caller's thread, unless another apply, a compaction or
        a snapshot holds the apply lock now (then the applier's thread gets to it later and
        this returns False at once: the caller does not wait)."""
        if not self._apply_lock.acquire(blocking=False):
            return False
        try:
            while True:
                with self._overlay.lock:
                    if not self._overlay.queue or self._overlay.queue[0].lsn > lsn:
                        return True
                self._apply_locked()
        finally:
            self._apply_lock.release()

    def _apply_locked(self) -> bool:
        effects = self._overlay.take(self._batch)
        if not effects:
            return False
        start = time.perf_counter()
        self._tables.apply(batch_changes(effects), effects[-1].lsn)
        self._overlay.applied(effects)
        self._telemetry.observe("apply", time.perf_counter() - start)
        self._telemetry.observe("apply.batch_ops", len(effects))
        self.batches += 1
        self._applied_since_ckpt += len(effects)
        return True

    def checkpoint(self) -> list[str]:
        """Sync LMDB, then delete WAL segments wholly at or below applied_lsn."""
        with self._apply_lock:
            self._tables.sync()
            with self._tables.reading() as txn:
                applied = self._tables.applied_lsn(txn)
        if self._wal is None:
            return []
        removed = self._wal.remove_segments_through(
            applied, keep=self._retain, retain_seconds=self._retain_seconds
        )
        self._last_ckpt = time.monotonic()
        self._applied_since_ckpt = 0
        if removed:
            log.debug("checkpoint at LSN %d removed %d WAL segments", applied, len(removed))
        return [p.name for p in removed]

    def _checkpoint_due(self) -> bool:
        """Every checkpoint_interval_s, or sooner once closed segments pile up."""
        if self._wal is None or not self._applied_since_ckpt:
            return False
        segments = len(self._wal.segments())
        if segments <= 1:
            return False
        return segments > 4 or time.monotonic() - self._last_ckpt >= self._ckpt_interval

    def _run(self) -> None:
        """Apply when a full batch is waiting or the interval since the last apply is over.

        Waking on every WAL commit would mean one synced LMDB transaction per commit, competing
        with the WAL's own fdatasync for the disk; batching here is what keeps LMDB off the
        acknowledgement path in practice, not just in principle.
        """
        cond = self._overlay.changed
        self._overlay.apply_threshold = self._batch
        last = looked = time.monotonic()
        while True:
            with cond:
                while not self._stop:
                    if time.monotonic() - looked >= self._interval:
                        # tasks are looked at once per interval, not at every notification (an
                        # apply by flush() or a snapshot wakes this thread too)
                        self._start_due_tasks()
                        looked = time.monotonic()
                    waiting = len(self._overlay)
                    left = last + self._interval - time.monotonic()
                    if not self.hold and (waiting >= self._batch or (waiting and left <= 0)):
                        break
                    cond.wait(left if left > 0 else self._interval)
                if self._stop:
                    return
            try:
                while self.apply_once() and not self._stop and len(self._overlay) >= self._batch:
                    pass
                last = time.monotonic()
                if self._checkpoint_due():
                    self.checkpoint()
                self._start_due_tasks()
                looked = time.monotonic()
            except XpStoreError as exc:
                log.exception("applier failed; writes are refused until the store is reopened")
                self.error = exc
                return

    def _start_due_tasks(self) -> None:
        """Start each due task that is not already running, on its own thread."""
        paused = self.paused_tasks
        for task in self._tasks:
            if task.name in paused:
                continue
            running = self._running.get(task.name)
            if running is not None and running.is_alive():
                continue
            try:
                due = task.due()
            except Exception:
                log.exception("maintenance task %s: due() failed", task.name)
                continue
            if due and not self._stop:
                thread = threading.Thread(target=_run_task, args=(task,),
                                          name=f"xpstore-{task.name}", daemon=True)  # fmt: skip
                # started before it is listed, under the lock join_tasks reads with: a close
                # that listed it before its start got "cannot join thread before it is started"
                with self._tasks_lock:
                    thread.start()
                    self._running[task.name] = thread


def _run_task(task: MaintenanceTask) -> None:
    """One run of a task; its errors can only be logged (nobody waits for this thread)."""
    try:
        task.run()
    except Exception:
        log.exception("maintenance task %s failed", task.name)
