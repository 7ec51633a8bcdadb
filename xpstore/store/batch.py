"""Several writes as one WAL frame: ``with store.batch() as b: ...``.

A learner's step writes its decisions, the feedback and the new priorities of the batch it
replayed; as three calls that is three synced commits. A ``WriteBatch`` collects the checked
operations and logs them together when the block ends: one frame, one fsync, all or nothing
(recovery replays a frame whole or not at all). Operations are derived in the order they were
added, so a later one sees the effects of the earlier ones. An exception inside the block
discards everything; nothing is logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from xpstore.errors import InvalidArgumentError
from xpstore.model.codec import Op
from xpstore.model.events import IndexRow
from xpstore.model.records import Record
from xpstore.store.sampling_service import feedback_op, priority_op
from xpstore.store.writer import Writer

__all__ = ["WriteBatch"]


class WriteBatch:
    """Collects writes; see the module docstring. ``ids`` holds the new records' ids after the
    block."""

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        self._ops: list[Op] = []
        self._payloads: list[bytes] = []
        self._rows: dict[int, IndexRow] = {}
        self._puts: list[int] = []  # positions of the puts in _ops
        self._done = False
        self.ids: list[int] = []

    def put_many(self, records: Iterable[Record | Mapping[str, Any]]) -> None:
        """Add records (checked now, logged at the end of the block)."""
        self._check_open()
        ops, payloads, rows = self._writer.prepare_puts(records)
        base = len(self._ops)
        self._puts.extend(range(base, base + len(ops)))
        self._rows.update({base + i: row for i, row in rows.items()})
        self._ops.extend(ops)
        self._payloads.extend(payloads)

    def record_feedback(
        self, ids: Iterable[int], success: bool | Sequence[bool], *, count_retrieval: bool = False
    ) -> None:
        """As :meth:`xpstore.Store.record_feedback`, logged at the end of the block."""
        self._add(feedback_op(ids, success, count_retrieval))

    def update_priorities(self, ids: Iterable[int], priorities: Iterable[float]) -> None:
        """As :meth:`xpstore.Store.update_priorities`, logged at the end of the block."""
        self._add(priority_op(ids, priorities))

    def __enter__(self) -> WriteBatch:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done = True
        if et is not None or not self._ops:
            return
        first, _last = self._writer.submit(self._ops, self._payloads, self._rows)
        self.ids = [first + i for i in self._puts]

    def _add(self, op: Op | None) -> None:
        self._check_open()
        if op is not None:
            self._ops.append(op)
            self._payloads.append(self._writer.encode(op, len(self._ops) - 1))

    def _check_open(self) -> None:
        if self._done:
            raise InvalidArgumentError("this batch was already written", field="batch")
