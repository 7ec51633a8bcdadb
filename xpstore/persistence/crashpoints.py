"""Named crash points for the SIGKILL tests: ``XPSTORE_CRASH_AT=<name>`` kills the process there.

A crash test starts a child with the variable set; when the child reaches that point it sends
itself SIGKILL, so the parent can check that reopening loses nothing and finds no half-made
snapshot or compaction. Unset (always, outside tests) a crash point costs one dict lookup.
``XPSTORE_CRASH_SKIP=<n>`` lets the point pass n times before it fires.
"""

from __future__ import annotations

import os
import signal

_ENV = "XPSTORE_CRASH_AT"
_SKIP_ENV = "XPSTORE_CRASH_SKIP"
_hits: dict[str, int] = {}

POINTS = (
    "wal.rotate.after_create",  # new segment renamed, old one closed, directory synced
    "wal.preallocate.after_zeros",  # zeros written ahead of a frame, the frame not yet
    "replay.after_batch",  # a recovery replay committed one batch to LMDB, more to come
    "checkpoint.before_unlink",  # LMDB synced, WAL segments not yet deleted
    "checkpoint.after_unlink",  # some segments deleted, directory not yet synced
    "snapshot.after_copy",  # LMDB copied into the temporary snapshot directory
    "snapshot.before_rename",  # manifest written, temporary directory not yet renamed
    "restore.after_copy",  # files copied into the temporary restore directory
    "restore.before_rename",  # restore complete, not yet renamed into place
    "compact.after_copy",  # compacted copy written, not yet swapped in
    "compact.after_swap",  # new file in place, old one not yet removed
    "index.build.started",  # a rebuild began; nothing written yet
    "index.build.before_swap",  # new index file written and loaded, not yet swapped in
    "index.swap.after_swap",  # new index serving in memory, file not yet renamed to main
    "index.swap.after_rename",  # main.faiss replaced, neighbour lists not yet written
    "index.neighbors.partial",  # the first chunk of the new neighbour lists is in LMDB
    "milvus.sync.after_upsert",  # a follower batch's rows upserted, its deletes not yet sent
    "milvus.sync.before_hwm",  # a follower batch written to Milvus, high-water LSN not yet
)


def crash_point(name: str) -> None:
    """SIGKILL this process if ``XPSTORE_CRASH_AT`` names this point (tests only)."""
    target = os.environ.get(_ENV)
    if target is None or target != name:
        return
    seen = _hits.get(name, 0)
    _hits[name] = seen + 1
    if seen < int(os.environ.get(_SKIP_ENV, "0")):
        return
    os.kill(os.getpid(), signal.SIGKILL)
