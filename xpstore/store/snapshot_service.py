"""Snapshots for a Store (issue 3): snapshot, list, verify, restore (point in time), prune, and
the automatic-snapshot task the applier schedules.

Files and LMDB copies are :mod:`xpstore.ops.snapshots`' business; what lives here is what needs
the open store: the LSN a snapshot is taken at, and rolling a restored copy forward through this
store's WAL with the same :class:`~xpstore.persistence.replayer.Replayer` that recovery uses.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from xpstore.errors import InvalidArgumentError, SnapshotError
from xpstore.model.codec import KIND_BY_CODE
from xpstore.ops import snapshots as snap_mod
from xpstore.ops.snapshots import Snapshot, SnapshotInfo
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.replayer import Replayer
from xpstore.persistence.wal_format import Frame
from xpstore.store.engine import Engine

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

    def snapshot(self) -> SnapshotInfo:
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
        root = self.snapshot_dir
        listing = snap_mod.scan(root, self._engine.store_id)
        problems = [f"snapshot {name}: {reason}" for name, reason in listing.damaged]
        if checksums:
            for info in listing.snapshots + listing.foreign:
                try:
                    snap_mod.verify(snap_mod.load(root, info.id))
                except SnapshotError as exc:
                    problems.append(f"snapshot {info.id}: {exc}")
        return problems

    def restore_snapshot(
        self,
        snapshot_id: str,
        into: str | os.PathLike[str],
        *,
        to_lsn: int | None = None,
        to_time: float | None = None,
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
        self._engine.check_open()
        target = Path(into)
        if to_lsn is not None and to_time is not None:
            raise InvalidArgumentError("give to_lsn or to_time, not both", field="to_lsn")
        snap_mod.check_target(target)
        snap = snap_mod.load(self.snapshot_dir, snapshot_id)
        stop = self._pitr_stop(snap, _lsn_arg(to_lsn), _time_arg(to_time))
        after = snap.info.lsn

        def replay(tmp: Path) -> None:
            self._replay_into(tmp / "data", after, stop)

        return snap_mod.restore(snap, target, replay=replay if stop > after else None)

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

    # --------------------------------------------------------- point in time
    def _frames(self, from_lsn: int) -> Iterator[Frame]:
        engine = self._engine
        return snap_mod.wal_frames(
            engine.layout.wal,
            store_id=engine.store_id,
            from_lsn=from_lsn,
            max_frame_bytes=engine.config.wal.max_frame_bytes,
        )

    def _pitr_stop(self, snap: Snapshot, to_lsn: int | None, to_time: float | None) -> int:
        """The last LSN a restore replays to; checks the WAL holds all of it before any copy."""
        after = snap.info.lsn
        rolls = to_time is not None or (to_lsn is not None and to_lsn != after)
        own = self._engine.store_id
        if rolls and snap.info.store_id != own:
            raise SnapshotError(
                f"snapshot {snap.info.id} belongs to store {snap.info.store_id:#x}, not this one "
                f"({own:#x}): its WAL is not here, so it restores only as it is"
            )
        if to_lsn is not None:
            return self._stop_at_lsn(snap, to_lsn)
        if to_time is not None:
            return self._stop_at_time(snap, to_time)
        return after

    def _stop_at_lsn(self, snap: Snapshot, to_lsn: int) -> int:
        after = snap.info.lsn
        if to_lsn < after:
            raise InvalidArgumentError(
                f"to_lsn {to_lsn} is before snapshot {snap.info.id}'s LSN {after}; restore an "
                "older snapshot",
                field="to_lsn",
            )
        end = after
        if to_lsn > after:
            for frame in self._frames(after + 1):
                end = frame.last_lsn
                if end >= to_lsn:
                    break
        if end < to_lsn:
            raise InvalidArgumentError(
                f"to_lsn {to_lsn} is beyond the end of this store's WAL (last LSN {end})",
                field="to_lsn",
            )
        return to_lsn

    def _stop_at_time(self, snap: Snapshot, to_time: float) -> int:
        after = snap.info.lsn
        if after > 0 and to_time < snap.info.created:
            # the snapshot may already hold operations committed after to_time: check the frame
            # that holds its LSN
            try:
                first = next(iter(self._frames(after)), None)
            except SnapshotError as exc:
                raise SnapshotError(
                    f"snapshot {snap.info.id} was taken after to_time and the WAL around its LSN "
                    f"{after} is gone, so it cannot be shown to hold nothing newer; restore an "
                    f"older snapshot ({exc})"
                ) from exc
            if first is None or first.commit_time > to_time:
                raise InvalidArgumentError(
                    f"snapshot {snap.info.id} already holds operations committed after to_time "
                    f"{to_time} (LSN {after}); restore an older snapshot",
                    field="to_time",
                )
        stop = after
        for frame in self._frames(after + 1):
            if frame.commit_time > to_time:
                break
            stop = frame.last_lsn
        return stop

    def _replay_into(self, data_dir: Path, after: int, stop: int) -> None:
        """Roll the LMDB copy in ``data_dir`` forward through LSNs ``after+1 .. stop``."""
        tables = LmdbTables(data_dir, readonly=False, map_size=self._engine.config.apply.map_size)
        try:
            replayer = Replayer(tables)
            last = after
            for frame in self._frames(after + 1):
                if frame.first_lsn > stop:
                    break
                ops = frame.ops()
                skip = max(0, after + 1 - frame.first_lsn)
                keep = ops[skip : stop - frame.first_lsn + 1]
                if keep:
                    replayer.apply_frame(frame.first_lsn + skip, keep)
                    last = frame.first_lsn + skip + len(keep) - 1
            if last != stop:
                raise SnapshotError(f"the WAL ended at LSN {last} before the target LSN {stop}")
            replayer.flush(force=True)
            tables.sync()
        finally:
            tables.close()


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


def _lsn_arg(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"to_lsn must be an integer >= 0, got {value!r}", field="to_lsn")
    return value


def _time_arg(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(
            f"to_time must be a finite number of seconds since the epoch, got {value!r}",
            field="to_time",
        )
    return float(value)
