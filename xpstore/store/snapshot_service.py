"""Snapshots for a Store (issue 3): snapshot, list, verify, restore (point in time), prune, and
the automatic-snapshot task the applier schedules.

Files and LMDB copies are :mod:`xpstore.ops.snapshots`' business; what lives here is what needs
the open store: the LSN a snapshot is taken at, and rolling a restored copy forward through this
store's WAL with the same :class:`~xpstore.persistence.replayer.Replayer` that recovery uses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from xpstore.errors import InvalidArgumentError
from xpstore.model.codec import KIND_BY_CODE
from xpstore.model.progress import ProgressFn
from xpstore.ops import snapshots as snap_mod
from xpstore.ops.snapshots import SnapshotInfo
from xpstore.store.engine import Engine, timed

__all__ = ["AutoSnapshotTask", "Snapshots"]

log = logging.getLogger(__name__)


class Snapshots:
    """Snapshots of one open store."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.lock = threading.Lock()  # one snapshot or prune at a time
        self.last_lsn: int | None = None  # LSN of the newest snapshot (auto-snapshot baseline)
        self.last_time = 0.0

    # ------------------------------------------------------------------ public
    @property
    def snapshot_dir(self) -> Path:
        """Where this store's snapshots live (``snapshots.dir`` or <store>/snapshots)."""
        engine = self._engine
        return snap_mod.snapshot_root(engine.path, engine.config.snapshots.dir)

    @timed("snapshot")
    def snapshot(self, progress: ProgressFn | None = None) -> SnapshotInfo:
        """Take a snapshot now: a compacted LMDB copy at an exact LSN, with a manifest.

        Every acknowledged operation is applied first (unless the applier is held), so the
        snapshot holds everything acknowledged before the call; its ``lsn`` is read in the
        transaction the copy is made from. Raises OSError (e.g. ENOSPC) with no snapshot left
        behind, ReadOnlyStoreError on a read-only store.
        """
        engine = self._engine
        engine.writable()
        with self.lock:
            root = self.snapshot_dir
            snap_mod.remove_temps(root, engine.store_id)
            engine.apply_through_acked()
            info = snap_mod.create_snapshot(
                engine.tables,
                root,
                store_id=engine.store_id,
                embedding_dim=engine.embedding_dim,
                config=engine.settings.persisted.model_dump(mode="json"),
                kind_names=KIND_BY_CODE,
                progress=progress,
            )
            self.last_lsn, self.last_time = info.lsn, info.created
        return info

    def list_snapshots(self) -> list[SnapshotInfo]:
        """This store's complete snapshots, oldest first.

        Half-written ones are never listed. A damaged one (manifest missing or unparsable) is
        not listed either but logged as a warning; :meth:`check_snapshots` reports it.
        """
        self._engine.check_open()
        listing = snap_mod.scan(self.snapshot_dir, self._engine.store_id)
        for name, reason in listing.damaged:
            log.warning("damaged snapshot %s not listed: %s", name, reason)
        return listing.snapshots

    def verify_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        """Check the manifest and every file's size and sha256; SnapshotError names the file."""
        self._engine.check_open()
        snap = snap_mod.load(self.snapshot_dir, snapshot_id)
        snap_mod.verify(snap)
        return snap.info

    def check_snapshots(self, *, checksums: bool = True) -> list[str]:
        """One message per damaged snapshot directory (for ``verify``); empty when all is well."""
        self._engine.check_open()
        return snap_mod.snapshot_problems(self.snapshot_dir, self._engine.store_id,
                                          checksums=checksums)  # fmt: skip

    def restore_snapshot(
        self,
        snapshot_id: str,
        into: str | os.PathLike[str],
        *,
        to_lsn: int | None = None,
        to_time: float | None = None,
        progress: ProgressFn | None = None,
    ) -> Path:
        """Write a new store at ``into`` holding snapshot ``snapshot_id``; return its path.

        With ``to_lsn`` the restored store is rolled forward through this store's retained WAL
        to exactly that LSN; with ``to_time`` through every frame committed at or before that
        time (seconds since the epoch). Every checksum is verified before any file is used;
        ``into`` must be new or an empty directory and nothing appears there unless the restore
        completes. The new store has a new store id (its own WAL history starts at the restored
        LSN + 1). Raises SnapshotError (damaged snapshot, WAL range no longer retained) and
        InvalidRecordError (bad arguments, ``into`` not empty, an LSN outside the WAL).
        """
        engine = self._engine
        engine.check_open()
        target = Path(into)
        if to_lsn is not None and to_time is not None:
            raise InvalidArgumentError("give to_lsn or to_time, not both", field="to_lsn")
        snap_mod.check_target(target)
        snap = snap_mod.load(self.snapshot_dir, snapshot_id)
        wal = snap_mod.WalSource(engine.layout.wal, engine.store_id,
                                 engine.config.wal.max_frame_bytes)  # fmt: skip
        return snap_mod.restore_at(snap, target, wal, to_lsn=to_lsn, to_time=to_time,
                                   map_size=engine.config.apply.map_size,
                                   progress=progress)  # fmt: skip

    def prune_snapshots(self, keep: int) -> list[SnapshotInfo]:
        """Delete all but the newest ``keep`` snapshots of this store; return the removed ones.

        Each is renamed to a hidden name before it is deleted, so a crash never leaves a
        half-deleted snapshot listed. Damaged directories are left for an operator to look at.
        """
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InvalidArgumentError(
                f"keep must be an integer >= 0, got {keep!r}", field="keep"
            )
        self._engine.writable()
        with self.lock:
            root = self.snapshot_dir
            snap_mod.remove_temps(root, self._engine.store_id)
            infos = snap_mod.scan(root, self._engine.store_id).snapshots
            doomed = infos[: max(0, len(infos) - keep)]
            for info in doomed:
                snap_mod.remove(info, root)
                log.info("pruned snapshot %s (LSN %d)", info.id, info.lsn)
        return doomed

    def clean_temps(self) -> None:
        """On a writer open: remove half-written snapshots a crash left (never fails the open)."""
        try:
            snap_mod.remove_temps(self.snapshot_dir, self._engine.store_id)
        except OSError as exc:
            log.warning("could not remove leftover snapshot temporaries: %s", exc)

    def init_baseline(self, now: float) -> None:
        """Count from the newest existing snapshot (across restarts), else from now."""
        try:
            infos = snap_mod.scan(self.snapshot_dir, self._engine.store_id).snapshots
        except OSError as exc:
            log.warning("cannot list snapshots in %s: %s", self.snapshot_dir, exc)
            infos = []
        if infos:
            self.last_lsn, self.last_time = infos[-1].lsn, infos[-1].created
        else:
            self.last_lsn, self.last_time = 0, now


class AutoSnapshotTask:
    """Automatic snapshots (a :class:`~xpstore.persistence.applier.MaintenanceTask`): due when
    ``snapshots.every_records`` operations were acknowledged, or ``snapshots.every_seconds``
    passed with something new, since the newest snapshot. A failed attempt is logged and the
    next one waits for another full period."""

    name = "snapshot"

    def __init__(self, engine: Engine, snapshots: Snapshots) -> None:
        self._engine = engine
        self._snapshots = snapshots

    def due(self, now: float | None = None) -> bool:
        """Cheap and non-blocking (the applier asks at every wake-up); ``now`` is wall time."""
        engine = self._engine
        cfg = engine.config.snapshots
        wal = engine.wal
        if (cfg.every_records is None and cfg.every_seconds is None) or engine.closed:
            return False
        if wal is None:
            return False
        snaps = self._snapshots
        clock = time.time() if now is None else now
        if snaps.last_lsn is None:
            snaps.init_baseline(clock)
        assert snaps.last_lsn is not None
        done = wal.acked_lsn
        if done <= snaps.last_lsn:
            return False
        return (cfg.every_records is not None and done - snaps.last_lsn >= cfg.every_records) or (
            cfg.every_seconds is not None and clock - snaps.last_time >= cfg.every_seconds
        )

    def run(self) -> SnapshotInfo | None:
        """Take the snapshot (and prune to ``snapshots.keep``); None when it failed (logged)."""
        engine = self._engine
        snaps = self._snapshots
        done = engine.wal.acked_lsn if engine.wal is not None else 0
        try:
            info = snaps.snapshot()
            keep = engine.config.snapshots.keep
            if keep is not None:
                snaps.prune_snapshots(keep)
        except Exception:  # logged; an automatic snapshot must not stop the store
            log.exception("automatic snapshot of %s failed; will retry after a period",
                          engine.path)  # fmt: skip
            snaps.last_lsn, snaps.last_time = done, time.time()
            return None
        return info
