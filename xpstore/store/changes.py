"""The change feed (issue 16): ``Store.changes(since_lsn)``, the store's operations in LSN order
for followers (the Milvus mirror, a downstream pipeline), read from the WAL.

The contract (docs/scale-out.md, "The change feed"):

- It yields :class:`~xpstore.ops.replay.ReplayItem` s with ``lsn > since_lsn``, strictly
  increasing, up to the LSN LMDB had applied when the call started (``upto``): what a reader of
  LMDB can already see, so a follower that reads state from LMDB never runs ahead of it. In a
  writer process every acknowledged operation is applied first (so ``upto`` is the acknowledged
  LSN); in a read-only process it is the writer's last apply batch (about 200 ms behind).
- One item per operation: ``put`` (``kind``, ``id`` = ``lsn``, ``data`` = the record's JSON, a
  fingerprint's ``track_id`` in it: a put for an existing ``track_id`` *supersedes* the track's
  fingerprint), ``update`` (``id`` of the target, ``data`` = the changed fields), ``delete``
  (``id``; ``kind`` when the target's put is still in the WAL, else None: a delete of a track's
  current fingerprint also retires the track), ``delete_track`` (``track_id``), ``priority`` /
  ``feedback`` / ``retrieval`` (ids and their values), ``settings`` (the changed knobs by
  dotted name; an index-settings change shows the local index will re-embed at its next build).
- Every LSN in range comes from the WAL. When a checkpoint already removed the segments holding
  LSNs after ``since_lsn`` (the WAL keeps only what ``wal.retain_segments`` /
  ``wal.retain_seconds`` ask for beyond LMDB), the feed cannot say what happened there (a
  deleted record leaves no trace but a tombstone): it raises
  :class:`~xpstore.errors.ChangesTruncatedError` *before* yielding anything, naming the oldest
  LSN the WAL still holds; if a checkpoint races the read, the error comes at that point, after
  every item before it. A follower then resynchronizes from one LMDB read of the current state
  (its LSN is ``applied_lsn``) and resumes the feed from there; the Milvus follower does.
"""

from __future__ import annotations

from collections.abc import Iterator

from xpstore.errors import ChangesTruncatedError, InvalidArgumentError
from xpstore.ops.replay import ReplayItem, replay
from xpstore.persistence.layout import Layout
from xpstore.persistence.wal import list_segments
from xpstore.store.engine import Engine

__all__ = ["ChangeFeed"]


class ChangeFeed:
    """``Store.changes`` over one open store (writer or read-only)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def upto(self) -> int:
        """The last LSN the feed serves now (LMDB's ``applied_lsn``, after a writer applied
        everything acknowledged)."""
        engine = self._engine
        engine.check_open()
        engine.apply_through_acked()
        tables = engine.tables
        with tables.reading() as txn:
            return tables.applied_lsn(txn)

    def wal_first_lsn(self) -> int | None:
        """The oldest LSN the WAL holds (None: no segment)."""
        segments = list_segments(Layout(self._engine.path).wal)
        return segments[0][0] if segments else None

    def changes(self, since_lsn: int, until_lsn: int | None = None) -> Iterator[ReplayItem]:
        """Check the range now; iterate lazily (see the module doc)."""
        if isinstance(since_lsn, bool) or not isinstance(since_lsn, int) or since_lsn < 0:
            raise InvalidArgumentError(
                f"since_lsn must be an int >= 0, got {since_lsn!r}", field="since_lsn"
            )
        upto = self.upto()
        if until_lsn is not None:
            if isinstance(until_lsn, bool) or not isinstance(until_lsn, int):
                raise InvalidArgumentError(
                    f"until_lsn must be an int or None, got {until_lsn!r}", field="until_lsn"
                )
            upto = min(upto, until_lsn)
        if upto <= since_lsn:
            return iter(())
        first = self.wal_first_lsn()
        if first is None or first > since_lsn + 1:
            raise self._truncated(since_lsn, first)
        return self._iterate(since_lsn, upto)

    def _iterate(self, since_lsn: int, upto: int) -> Iterator[ReplayItem]:
        with replay(self._engine.path, from_lsn=since_lsn + 1, to_lsn=upto) as stream:
            expected = since_lsn + 1
            for item in stream:
                if item.source != "wal" or stream.gaps:
                    raise self._truncated(expected - 1, self.wal_first_lsn())
                expected = item.lsn + 1
                yield item
            if stream.gaps:
                raise self._truncated(expected - 1, self.wal_first_lsn())

    @staticmethod
    def _truncated(since_lsn: int, first: int | None) -> ChangesTruncatedError:
        held = f"the WAL now starts at LSN {first}" if first is not None else "the WAL is empty"
        return ChangesTruncatedError(
            f"the change feed cannot serve the operations after LSN {since_lsn}: {held} (a "
            "checkpoint removed the older segments). Resynchronize from the current state (one "
            "LMDB read, at its applied_lsn) and resume the feed from there; keep more WAL for "
            "followers with wal.retain_segments / wal.retain_seconds",
            since_lsn=since_lsn,
            first_lsn=first,
        )
