"""Commit combining: concurrent writers of one store hand their operations to one leader.

With eight threads putting records one by one, each put took the engine's write lock, then
waited for the WAL's group commit: two places to queue, each a lock handoff under the GIL (a
thread woken by the lock's release must then win the GIL from the one that released it). The
measured cost: 8 threads put 2.5x slower than one thread with no sync at all, every extra
microsecond spent in handoffs, not in the put (docs/benchmarks.md, issue 15).

Here a writer queues its submission and, unless a leader is running, becomes the leader: it
takes the whole queue as one batch, appends it (``append``: each submission derived, parked and
appended under the write lock as its own atomic WAL group), waits (``wait``: one wait for the
WAL acknowledgement of the batch's last group) and wakes every writer of the batch. A follower
sleeps once, on its own gate (a held lock, released to wake it), and returns with its result or
its own error. A leader runs one batch only: when submissions queued meanwhile, it wakes the
oldest of them to lead the next, so no thread works for others for long.

Nothing about atomicity or durability changes: each submission is still its own WAL group
(one frame unless the WAL merges neighbours, which it already did), acknowledged exactly when
its LSNs are, and a submission that fails (bad state, a closed store, a WAL error) gets its
exception in its own thread; the others of the batch are unaffected unless the failure is
the WAL's, which poisons every write anyway.
"""

from __future__ import annotations

import threading
from _thread import LockType, allocate_lock
from collections.abc import Callable, Mapping
from typing import Any

from xpstore.errors import XpStoreError
from xpstore.model.effects import PutRun

__all__ = ["Combiner", "Submission"]


class Submission:
    """One writer's operations and, once its batch ran, its LSN span or its error."""

    __slots__ = ("adopt", "error", "gate", "lead", "ops", "payloads", "rows", "run", "span")

    def __init__(
        self,
        ops: list[Any],
        payloads: list[bytes],
        rows: Mapping[int, Any],
        run: PutRun | None = None,
    ) -> None:
        self.ops = ops
        self.payloads = payloads
        self.rows = rows
        self.run = run  # a run of puts in columns (then ``ops`` is empty), or None
        self.span: tuple[int, int] | None = None
        self.error: BaseException | None = None
        self.adopt: Any = None  # settings the submission fixed (the writer's to adopt)
        self.lead = False  # woken to lead the next batch, not because it is done
        self.gate: LockType = allocate_lock()
        self.gate.acquire()


class Combiner:
    """Batches concurrent :class:`Submission`\\ s: see the module docstring."""

    def __init__(
        self,
        append: Callable[[list[Submission]], None],
        wait: Callable[[list[Submission]], None],
    ) -> None:
        self._append = append
        self._wait = wait
        self._mu = threading.Lock()
        self._queue: list[Submission] = []
        self._leading = False
        self.batches = 0  # diagnostics: batches run, submissions in them
        self.submissions = 0

    def run(self, sub: Submission) -> None:
        """Return once ``sub`` ran (its ``span`` or ``error`` set), having led a batch or not."""
        with self._mu:
            self._queue.append(sub)
            lead = not self._leading
            if lead:
                self._leading = True
        if not lead:
            sub.gate.acquire()
            if not sub.lead:
                return
        self._lead()

    def _lead(self) -> None:
        with self._mu:
            batch, self._queue = self._queue, []
        self.batches += 1
        self.submissions += len(batch)
        try:
            self._append(batch)
            self._wait(batch)
        except BaseException as exc:
            # a bug or an interrupt cut the batch short: no writer of it may hang, and none may
            # return as if acknowledged (its group may be appended and not yet durable)
            unknown = XpStoreError(
                f"the writer running this write's batch was interrupted ({type(exc).__name__}: "
                f"{exc}): whether the write is durable is unknown; a reopen recovers whatever "
                "reached the log"
            )
            for sub in batch:
                if sub.error is None:
                    sub.span, sub.adopt = None, None
                    sub.error = unknown
            raise
        finally:
            # the lead passes on after the wait: handing it on before (so that the next batch
            # is appended during this one's sync) measured no faster and often slower, the
            # next leader then sleeping in the WAL's own group commit (docs/design.md)
            self._hand_off()
            for sub in batch:  # every gate is held: by its creator, or by the wait it woke
                sub.gate.release()

    def _hand_off(self) -> None:
        """Wake the oldest queued writer to lead the next batch, or mark the combiner idle."""
        with self._mu:
            nxt = self._queue[0] if self._queue else None
            if nxt is None:
                self._leading = False
            else:
                nxt.lead = True
        if nxt is not None:
            nxt.gate.release()
