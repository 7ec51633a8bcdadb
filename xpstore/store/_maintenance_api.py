"""Store methods for retention and compaction (issue 3): apply_retention, compact.

A mixin of :class:`~xpstore.store.store.Store`, kept in its own module so the facade stays small.

Retention evicts through the WAL, exactly like ``delete``: each eviction is a logged
:class:`~xpstore.model.codec.DeleteOp`, so a crash before the applier reaches it replays it
instead of resurrecting the record. Compaction is in :mod:`xpstore.ops.compaction`; this
module only takes the store's locks around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from xpstore.config import RetentionRule
from xpstore.errors import RecordNotFoundError
from xpstore.model.codec import DeleteOp, Op, encode_op
from xpstore.model.records import Experience
from xpstore.ops import compaction
from xpstore.ops.compaction import CompactReport

if TYPE_CHECKING:
    from xpstore.store.store import Store

log = logging.getLogger(__name__)

EVICT_BATCH = 2048
"""Evictions per WAL frame: a DeleteOp is ~16 bytes logged, so a frame stays around 32 KiB."""

_STATE_LOCK = threading.Lock()  # guards the lazy creation of each store's _RetentionState


@dataclass(slots=True)
class _RetentionState:
    """Per-store retention bookkeeping (Store.__init__ is not ours, so it is created lazily)."""

    lock: threading.Lock
    last_start: float  # time.monotonic() of the last automatic pass (first: of the first check)
    thread: threading.Thread | None = None


class MaintenanceAPI:
    """Mixed into Store; see the module docstring."""

    _retention_state: _RetentionState | None = None

    # ------------------------------------------------------------------ retention
    def apply_retention(self, now: float | None = None) -> dict[str, int]:
        """Evict what ``config.retention`` no longer allows; return the evictions per kind.

        Per kind with a rule: the oldest records (in (ts, id) order) beyond ``max_count``, and
        every record with ``ts < now - max_age_s`` (``now`` defaults to the wall clock). Each
        eviction is a delete logged in the WAL, so it survives a crash; evicting a track's
        current fingerprint retires the track, as ``delete`` does.
        """
        store = _store(self)
        store._writable()
        when = time.time() if now is None else float(now)
        with _state(store).lock:  # two passes at once would both evict the same excess
            out: dict[str, int] = {}
            for kind, rule in store.config.retention.items():
                out[kind] = _enforce(store, kind, rule, when)
        if any(out.values()):
            log.info("retention evicted %s", ", ".join(f"{n} {k}" for k, n in out.items() if n))
        return out

    def _maybe_apply_retention(self) -> threading.Thread | None:
        """Start a retention pass on its own thread when one is due; return it (else None).

        Due: the store has retention rules and ``retention_interval_s`` has passed since the last
        pass started (or, for the first, since the first call). Cheap and non-blocking, so the
        applier loop may call it at every wake-up, even holding the overlay's lock: the pass
        itself must not run on the applier thread, since it writes through the WAL and may wait
        on back-pressure that only the applier relieves.
        """
        store = _store(self)
        if not store.config.retention or store.readonly or store._closed:
            return None
        state = _state(store)
        with _STATE_LOCK:
            if state.thread is not None and state.thread.is_alive():
                return None
            started = time.monotonic()
            if started - state.last_start < store.config.retention_interval_s:
                return None
            state.last_start = started
            thread = threading.Thread(
                target=_background_pass, args=(store,), name="xpstore-retention", daemon=True
            )
            state.thread = thread
            thread.start()
        return thread

    def _join_retention(self, timeout: float | None = None) -> None:
        """Wait for a running automatic pass to end (close(): after setting ``_closed``)."""
        state = self._retention_state
        thread = state.thread if state is not None else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ----------------------------------------------------------------- compaction
    def compact(self) -> CompactReport:
        """Rewrite LMDB compactly and swap it in, crash-safely (LMDB never shrinks by itself).

        Writers wait for the duration; readers of this process only during the swap. Reader
        processes must reopen the store afterwards (they keep reading the old file). See
        docs/maintenance.md for the procedure and why a crash at any point loses nothing.
        """
        store = _store(self)
        store._writable()
        with store._wlock:
            store._writable()
            applier, tables = store._applier, store._tables
            assert applier is not None and tables is not None
            if not applier.hold:
                applier.apply_all()  # the copy then holds everything acknowledged so far
            with applier._apply_lock:
                return compaction.compact_tables(store._layout, tables)


def _store(obj: MaintenanceAPI) -> Store:
    return cast("Store", obj)


def _state(store: Store) -> _RetentionState:
    with _STATE_LOCK:
        if store._retention_state is None:
            store._retention_state = _RetentionState(threading.Lock(), time.monotonic())
        return store._retention_state


def _background_pass(store: Store) -> None:
    """One automatic pass; its errors can only be logged (nobody waits for this thread)."""
    try:
        store.apply_retention()
    except Exception:
        if store._closed:
            log.debug("retention pass stopped: the store was closed", exc_info=True)
        else:
            log.exception("automatic retention pass on %s failed", store.path)


def _enforce(store: Store, kind: str, rule: RetentionRule, now: float) -> int:
    """Evict the records of ``kind`` that ``rule`` no longer allows; return how many."""
    excess = 0
    if rule.max_count is not None:
        excess = max(0, store.count(kind) - rule.max_count)
    cutoff = now - rule.max_age_s if rule.max_age_s is not None else None
    if not excess and cutoff is None:
        return 0
    evicted = 0
    for batch in _batches(_victims(store.scan(kind), excess, cutoff), EVICT_BATCH):
        if store._closed:
            break
        evicted += _evict(store, batch)
    return evicted


def _victims(scan: Iterator[Experience], excess: int, cutoff: float | None) -> Iterator[int]:
    """Ids from the oldest on, while a rule condemns them: the first ``excess``, or too old.

    The scan is in (ts, id) order, so both conditions select a prefix and the union is the longer
    one; the scan stops at the first record that survives.
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


def _evict(store: Store, ids: list[int]) -> int:
    """Log a DeleteOp per id as one WAL frame; skip ids someone else deleted meanwhile.

    A concurrent delete makes the whole batch fail validation (nothing is logged); the batch is
    then filtered and retried. Each failure drops at least one id, so this ends.
    """
    while ids:
        ops: list[Op] = [DeleteOp(rid) for rid in ids]
        try:
            store._submit(ops, [encode_op(op) for op in ops])
        except RecordNotFoundError:
            ids = [rid for rid in ids if _exists(store, rid)]
            continue
        return len(ids)
    return 0


def _exists(store: Store, rid: int) -> bool:
    try:
        store.get(rid)
    except RecordNotFoundError:
        return False
    return True
