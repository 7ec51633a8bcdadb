"""Salvage: build a new store from a damaged one, never writing into the damaged store.

The new store starts from a consistent copy of the damaged store's LMDB (``env.copy``, read in
one read transaction), then replays the damaged WAL in ``salvage`` mode: damaged frames and
segments are skipped, reading resumes at the next valid frame, and every unreadable LSN range is
reported (``RecoveryReport.gaps``). The damaged store is held under its writer lock while this
runs, so no live writer changes it underneath.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from xpstore.config import make_config
from xpstore.errors import InvalidRecordError
from xpstore.persistence import fs
from xpstore.persistence import layout as layout_mod
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.lock import WriterLock
from xpstore.persistence.wal_recovery import RecoveryReport
from xpstore.store.store import Store

log = logging.getLogger(__name__)


def salvage_store(path: str | os.PathLike[str], into: str | os.PathLike[str]) -> RecoveryReport:
    """Write what can be read of the store at ``path`` into a new store at ``into``."""
    src = Layout(Path(path))
    marker = layout_mod.read_marker(src)
    dst = Layout(Path(into))
    if dst.root.exists() and any(dst.root.iterdir()):
        raise InvalidRecordError(f"--into {dst.root} exists and is not empty", field="into")
    lock = WriterLock(src.lock)
    lock.acquire()  # StoreLockedError if a writer is alive: salvage a dead store only
    try:
        layout_mod.prepare_new(dst)
        tables = LmdbTables(src.data, readonly=True, map_size=make_config().map_size)
        try:
            tables.env.copy(str(dst.data), compact=True)
        finally:
            tables.close()
        for name in os.listdir(dst.data):  # env.copy wrote in C: make the copy durable here
            fd = fs.open_file(dst.data / name, os.O_RDONLY)
            try:
                fs.fdatasync(fd)
            finally:
                fs.close(fd)
        fs.fsync_dir(dst.data)
        layout_mod.write_marker(dst)
        store = Store(dst.root, make_config(), readonly=False)
        store._salvage_from = (src.wal, marker.store_id)
        try:
            store._open(False, {})
            report = store.recovery_report
        finally:
            store.close()
    finally:
        lock.release()
    assert report is not None
    log.info("salvaged %s into %s: %d operations, %d gaps", src.root, dst.root,
             report.replayed_ops, len(report.gaps))
    return report
