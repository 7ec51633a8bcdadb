"""Salvage: build a new store from a damaged one, never writing into the damaged store.

The new store starts from a consistent copy of the damaged store's LMDB (``env.copy``, read in
one read transaction), then replays the damaged WAL in ``salvage`` mode: damaged frames and
segments are skipped, reading resumes at the next valid frame, and every unreadable LSN range is
reported (``RecoveryReport.gaps``). The damaged store is held under its writer lock while this
runs, so no live writer changes it underneath.

When the store's LMDB data file itself is damaged (found before it is mapped:
:class:`~xpstore.errors.LmdbCorruptionError`), the copy comes from the newest snapshot whose
checksums hold instead, and the WAL is replayed from that snapshot's LSN on; with no usable
snapshot, from an empty LMDB. Either way the report says so, and what the WAL no longer covers
is reported as a gap.

The new store is assembled in a hidden sibling of ``into`` and renamed into place last, so a
salvage that fails (or is killed) leaves nothing half-built at ``into``.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from xpstore.config import make_config
from xpstore.errors import InvalidArgumentError, LmdbCorruptionError
from xpstore.model.progress import ProgressFn
from xpstore.ops import snapshots as snap_mod
from xpstore.persistence import fs
from xpstore.persistence import layout as layout_mod
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.lock import WriterLock
from xpstore.persistence.replayer import Replayer
from xpstore.persistence.wal_recovery import RecoveryReport, recover_wal

log = logging.getLogger(__name__)

_TMP = ".xpstore-salvage-"


def salvage_store(
    path: str | os.PathLike[str],
    into: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
) -> RecoveryReport:
    """Write what can be read of the store at ``path`` into a new store at ``into``.

    ``into`` must not exist or be an empty directory; nothing appears there unless the salvage
    completes. ``progress(phase, done, total, unit)`` follows the WAL replay (its bytes).
    """
    src = Layout(Path(path))
    marker = layout_mod.read_marker(src)
    target = Path(into)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InvalidArgumentError(f"--into {target} exists and is not empty", field="into")
    lock = WriterLock(src.lock)
    lock.acquire()  # StoreLockedError if a writer is alive: salvage a dead store only
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            dst = Layout(tmp)
            layout_mod.prepare_new(dst)
            notes = _base_copy(src, dst, marker.store_id)
            report = _replay_into(dst, src.wal, marker.store_id, progress)
            for note in notes:
                report.warn(note)
            layout_mod.write_marker(dst)  # the new store exists only once it is complete
            if target.exists():
                target.rmdir()  # empty, checked above
            fs.replace(tmp, target)
            fs.fsync_dir(target.parent)
        except BaseException:
            if tmp.exists():  # a failed salvage leaves nothing half-built behind
                fs.rmtree(tmp)
            raise
    finally:
        lock.release()
    log.info("salvaged %s into %s: %d operations, %d gaps", src.root, target,
             report.replayed_ops, len(report.gaps))  # fmt: skip
    return report


def _base_copy(src: Layout, dst: Layout, store_id: int) -> list[str]:
    """Fill ``dst/data`` with the LMDB the replay starts from; return what to tell the operator."""
    try:
        tables = LmdbTables(src.data, readonly=True, map_size=make_config().apply.map_size)
    except LmdbCorruptionError as exc:
        return _base_from_snapshot(src, dst, store_id, exc)
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
    return []


def _base_from_snapshot(
    src: Layout, dst: Layout, store_id: int, damage: LmdbCorruptionError
) -> list[str]:
    """The store's LMDB is unreadable: start from its newest good snapshot, else from nothing."""
    root = snap_mod.snapshot_root(src.root, None)
    snap = snap_mod.newest_verified(root, store_id)
    file = damage.path or src.data / "data.mdb"
    if snap is None:
        return [
            f"the store's LMDB data file {file} is damaged and {root} holds no usable snapshot: "
            "the new store holds only what the WAL still has (LSNs it no longer covers are "
            f"reported as a gap); {damage}"
        ]
    snap_mod.copy_data(snap, dst.data)
    return [
        f"the store's LMDB data file {file} is damaged and was not read: started from snapshot "
        f"{snap.info.id} (LSN {snap.info.lsn}) and replayed the WAL after it"
    ]


def _replay_into(
    dst: Layout, src_wal: Path, src_id: int, progress: ProgressFn | None
) -> RecoveryReport:
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
            progress=progress,
        )
        replayer.flush()
        tables.sync()
    finally:
        tables.close()
    return report
