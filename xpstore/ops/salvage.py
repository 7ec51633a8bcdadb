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
from xpstore.errors import InvalidArgumentError
from xpstore.persistence import fs
from xpstore.persistence import layout as layout_mod
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.lock import WriterLock
from xpstore.persistence.replayer import Replayer
from xpstore.persistence.wal_recovery import RecoveryReport, recover_wal

log = logging.getLogger(__name__)


def salvage_store(path: str | os.PathLike[str], into: str | os.PathLike[str]) -> RecoveryReport:
    """Write what can be read of the store at ``path`` into a new store at ``into``."""
    src = Layout(Path(path))
    marker = layout_mod.read_marker(src)
    dst = Layout(Path(into))
    if dst.root.exists() and any(dst.root.iterdir()):
        raise InvalidArgumentError(f"--into {dst.root} exists and is not empty", field="into")
    lock = WriterLock(src.lock)
    lock.acquire()  # StoreLockedError if a writer is alive: salvage a dead store only
    try:
        layout_mod.prepare_new(dst)
        tables = LmdbTables(src.data, readonly=True, map_size=make_config().apply.map_size)
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
        report = _replay_into(dst, src.wal, marker.store_id)
        layout_mod.write_marker(dst)  # last: the new store exists only once it is complete
    finally:
        lock.release()
    log.info("salvaged %s into %s: %d operations, %d gaps", src.root, dst.root,
             report.replayed_ops, len(report.gaps))
    return report


def _replay_into(dst: Layout, src_wal: Path, src_id: int) -> RecoveryReport:
    """Replay the damaged WAL (salvage mode: skip what is unreadable) into the copy's LMDB."""
    tables = LmdbTables(dst.data, readonly=False, map_size=make_config().apply.map_size)
    try:
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
        replayer = Replayer(tables)
        report = recover_wal(
            src_wal,
            store_id=src_id,
            applied_lsn=applied,
            mode="salvage",
            max_frame_bytes=make_config().wal.max_frame_bytes,
            apply=lambda first, ops, _commit_time: replayer.apply_frame(first, ops),
            modify=False,
        )
        replayer.flush()
        tables.sync()
    finally:
        tables.close()
    return report
