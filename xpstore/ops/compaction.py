"""Compaction: rewrite LMDB compactly and swap it in so that a crash at any instant leaves a store
that opens with either the old or the new environment, complete (LMDB never shrinks by itself).

Procedure (``Store.compact`` has blocked writers and applies; see docs/maintenance.md)::

    1. data.compact/   <- env.copy(compact=True); fdatasync data.mdb; fsync data.compact/, <store>/
       crash point "compact.after_copy"
    2. compact.intent  <- atomic_write (fsynced): "data.compact is complete, roll forward"
    3. close the environment
       rename data -> data.old; rename data.compact -> data; fsync <store>/
       reopen the environment (the new file)
       crash point "compact.after_swap"
    4. rmtree data.old; unlink compact.intent; fsync <store>/

:func:`finish_interrupted` (called by a writer open, holding the writer lock, before LMDB is
opened) completes whatever a crash cut short: without the intent file the copy may be partial, so
it is removed (roll back); with it the copy is complete, so the renames are finished (roll
forward). Every state in between has ``data`` complete or recoverable from the intent.

Moving whole directories (rather than renaming ``data.mdb`` over the old file) gives the new file
a fresh ``lock.mdb``: a compacted copy restarts LMDB's transaction ids at 1, and an old lock file
still remembering the old ids must never be paired with it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xpstore.errors import XpStoreError
from xpstore.model.progress import ProgressFn
from xpstore.persistence import fs
from xpstore.persistence.crashpoints import crash_point
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_tables import LmdbTables

log = logging.getLogger(__name__)

COMPACT_DIR = "data.compact"
OLD_DIR = "data.old"
INTENT = "compact.intent"
_INTENT_FORMAT = "xpstore-compact"
_DATA_FILE = "data.mdb"


@dataclass(frozen=True, slots=True)
class CompactReport:
    """What a compaction did: ``data.mdb`` sizes before and after, and the time it took."""

    before_bytes: int
    after_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _paths(layout: Layout) -> tuple[Path, Path, Path]:
    return layout.root / COMPACT_DIR, layout.root / OLD_DIR, layout.root / INTENT


# ------------------------------------------------------------------------- compaction


def compact_tables(
    layout: Layout, tables: LmdbTables, progress: ProgressFn | None = None
) -> CompactReport:
    """Copy ``tables``' environment compactly and swap the copy in; return the sizes.

    The caller must keep every LMDB writer out (store write lock and the applier's apply lock)
    and hold the writer lock of the store. Readers of this process wait during the swap.
    ``progress`` follows the copy (bytes written against the live bytes).
    """
    started = time.monotonic()
    _check_sole_handle(tables)
    _clear_leftovers(layout)
    tmp, _old, intent = _paths(layout)
    before = _file_size(layout.data / _DATA_FILE)
    try:
        fs.mkdir(tmp)
        tables.copy_compact(tmp, progress=progress, phase="copying LMDB compactly")
        copy_bytes = _sync_copy(tmp, layout.root)
    except BaseException:
        _discard(tmp)
        raise
    crash_point("compact.after_copy")
    payload = {"format": _INTENT_FORMAT, "version": 1, "copy_bytes": copy_bytes}
    try:
        fs.atomic_write(intent, (json.dumps(payload) + "\n").encode())
        tables.reopen_around(lambda: _swap(layout))
    except BaseException:
        _undo_after_failure(layout)
        raise
    crash_point("compact.after_swap")
    _cleanup(layout)
    after = _file_size(layout.data / _DATA_FILE)
    report = CompactReport(before, after, time.monotonic() - started)
    log.info("compacted %s: %d -> %d bytes in %.3f s", layout.root, before, after, report.seconds)
    return report


def _check_sole_handle(tables: LmdbTables) -> None:
    """The environment is closed around the swap: no other handle of this process may share it."""
    refs = tables.shared_refs()
    if refs != 1:
        raise XpStoreError(
            f"cannot compact {tables.path}: {refs - 1} other Store object(s) of this process "
            "have it open (read-only opens included); close them first"
        )


def _clear_leftovers(layout: Layout) -> None:
    """Remove a partial copy of an earlier in-process failure; refuse if a swap is pending."""
    tmp, old, intent = _paths(layout)
    if intent.exists():
        raise XpStoreError(
            f"{intent} exists: a compaction of {layout.root} was interrupted; close and reopen "
            "the store for writing to finish it, then compact again"
        )
    if tmp.exists() or old.exists():
        _roll_back(layout)


def _undo_after_failure(layout: Layout) -> None:
    """An error (not a crash) during the swap: keep whichever complete environment ``data`` is."""
    try:
        _roll_back(layout)
    except OSError:
        log.exception("could not undo the failed compaction of %s; reopen the store", layout.root)


def _sync_copy(tmp: Path, root: Path) -> int:
    """fdatasync what LMDB wrote (in C, outside the fs seam), then the directories; its size."""
    data = tmp / _DATA_FILE
    fd = fs.open_file(data, os.O_RDONLY)
    try:
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
    fs.fsync_dir(tmp)
    fs.fsync_dir(root)
    return data.stat().st_size


def _swap(layout: Layout) -> None:
    """data -> data.old, data.compact -> data; undo the first rename if the second fails."""
    tmp, old, _intent = _paths(layout)
    fs.replace(layout.data, old)
    try:
        fs.replace(tmp, layout.data)
    except BaseException:
        fs.replace(old, layout.data)
        raise
    fs.fsync_dir(layout.root)


def _cleanup(layout: Layout) -> None:
    """Remove the old environment, then the intent (in that order: see finish_interrupted)."""
    _tmp, old, intent = _paths(layout)
    if old.exists():
        fs.rmtree(old)
    fs.unlink(intent, missing_ok=True)
    fs.fsync_dir(layout.root)


def _discard(tmp: Path) -> None:
    try:
        if tmp.exists():
            fs.rmtree(tmp)
    except OSError:
        log.warning("could not remove the partial compaction copy %s", tmp, exc_info=True)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# ----------------------------------------------------------- finish after a crash


def finish_interrupted(layout: Layout) -> str | None:
    """Complete or undo a compaction a crash interrupted; call before opening LMDB for writing.

    The caller must hold the store's writer lock. Returns ``"rolled_forward"``, ``"rolled_back"``
    or None (nothing to do). Idempotent: a crash inside it is finished by the next call.
    """
    tmp, old, intent = _paths(layout)
    if not intent.exists():
        if not tmp.exists() and not old.exists():
            return None
        _roll_back(layout)
        return "rolled_back"
    if tmp.exists() and not _copy_is_complete(intent, tmp):
        _roll_back(layout)
        return "rolled_back"
    if tmp.exists():
        if layout.data.exists():
            if old.exists():
                fs.rmtree(old)  # cannot be ours: data is still the old environment
            fs.replace(layout.data, old)
        fs.replace(tmp, layout.data)
        fs.fsync_dir(layout.root)
    elif not layout.data.exists() and old.exists():
        fs.replace(old, layout.data)  # impossible by the protocol; keep the old environment
        fs.fsync_dir(layout.root)
    _cleanup(layout)
    log.warning("finished an interrupted compaction of %s (new LMDB file in place)", layout.root)
    return "rolled_forward"


def _roll_back(layout: Layout) -> None:
    """Keep the old environment: drop a (possibly partial) copy, put data.old back if needed."""
    tmp, old, intent = _paths(layout)
    if tmp.exists():
        fs.rmtree(tmp)
    if old.exists():
        if layout.data.exists():
            fs.rmtree(old)
        else:
            fs.replace(old, layout.data)
    fs.unlink(intent.with_name(INTENT + ".tmp"), missing_ok=True)  # atomic_write cut short
    fs.unlink(intent, missing_ok=True)
    fs.fsync_dir(layout.root)
    log.warning("rolled back an interrupted compaction of %s (old LMDB file kept)", layout.root)


def _copy_is_complete(intent: Path, tmp: Path) -> bool:
    """The intent names the size of the synced copy; a mismatch means it cannot be trusted."""
    try:
        data = json.loads(fs.read_bytes(intent))
        expected = int(data["copy_bytes"]) if data.get("format") == _INTENT_FORMAT else -1
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s is unreadable (%s); rolling the compaction back", intent, exc)
        return False
    actual = _file_size(tmp / _DATA_FILE)
    if actual != expected:
        log.warning(
            "%s: the copy has %d bytes, the intent says %d; rolling the compaction back",
            intent,
            actual,
            expected,
        )
        return False
    return True


# ----------------------------------------------------------------------- space


def lmdb_space(tables: LmdbTables) -> dict[str, int]:
    """LMDB space for ``stats()``: file size vs pages in use (what compaction would reclaim).

    ``used_bytes`` is the high-water mark, ``(last_pgno + 1) * psize``; ``live_bytes`` counts the
    pages of every B-tree (plus the two meta pages), so free-list pages are the difference.
    """
    info = tables.env.info()
    psize = int(tables.env.stat()["psize"])
    file_bytes = _file_size(tables.path / _DATA_FILE)
    live = tables.live_bytes()
    return {
        "file_bytes": file_bytes,
        "used_bytes": (int(info["last_pgno"]) + 1) * psize,
        "live_bytes": live,
        "reclaimable_bytes": max(0, file_bytes - live),
    }

