"""Store methods for snapshots (issue 3): snapshot, list, verify, restore (point in time), prune,
and the automatic-snapshot check the applier calls.

A mixin of :class:`~xpstore.store.store.Store`, kept in its own module so the facade stays small.
Files and LMDB copies are :mod:`xpstore.ops.snapshots`' business; what lives here is
what needs the store's meaning of operations: rolling a restored copy forward through the WAL
with the same :func:`~xpstore.model.effects.derive` that writers and recovery use.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from xpstore.errors import InvalidRecordError, RecordNotFoundError, SnapshotError
from xpstore.model.codec import KIND_BY_CODE, PutOp, decode_envelope, decode_op
from xpstore.model.effects import Effect, StateView, derive_all
from xpstore.model.records import Experience, Fingerprint
from xpstore.ops import snapshots as snap_mod
from xpstore.ops.snapshots import Snapshot, SnapshotInfo
from xpstore.persistence.applier import to_changes
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.wal_format import Frame

if TYPE_CHECKING:
    from xpstore.config import StoreConfig
    from xpstore.persistence.applier import Applier
    from xpstore.persistence.layout import Layout
    from xpstore.persistence.wal import WalWriter

log = logging.getLogger(__name__)

_REPLAY_BATCH = 10_000


@dataclass(slots=True)
class _SnapshotState:
    """Per-store snapshot bookkeeping (the mixin cannot add to Store.__init__)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    last_lsn: int | None = None  # LSN of the newest snapshot (auto-snapshot baseline)
    last_time: float = 0.0


class SnapshotAPI:
    """Mixed into Store; see the module docstring."""

    if TYPE_CHECKING:  # provided by Store
        path: Path
        config: StoreConfig
        readonly: bool
        store_id: int
        _closed: bool
        _layout: Layout
        _tables: LmdbTables | None
        _wal: WalWriter | None
        _applier: Applier | None

        @property
        def embedding_dim(self) -> int | None: ...

        def _check_open(self) -> None: ...

        def _writable(self) -> WalWriter: ...

    # ------------------------------------------------------------------ public
    @property
    def snapshot_dir(self) -> Path:
        """Where this store's snapshots live (``config.snapshot_dir`` or <store>/snapshots)."""
        return snap_mod.snapshot_root(self.path, self.config.snapshot_dir)

    def snapshot(self) -> SnapshotInfo:
        """Take a snapshot now: a compacted LMDB copy at an exact LSN, with a manifest.

        Every acknowledged operation is applied first (unless the applier is held), so the
        snapshot holds everything acknowledged before the call; its ``lsn`` is read in the
        transaction the copy is made from. Raises OSError (e.g. ENOSPC) with no snapshot left
        behind, ReadOnlyStoreError on a read-only store.
        """
        self._writable()
        state = self._snapshot_state()
        with state.lock:
            tables = self._tables
            assert tables is not None
            root = self.snapshot_dir
            snap_mod.remove_temps(root, self.store_id)
            self._apply_through_acked(tables)
            info = snap_mod.create_snapshot(
                tables,
                root,
                store_id=self.store_id,
                embedding_dim=self.embedding_dim,
                config=self.config.persisted().model_dump(mode="json"),
                kind_names=KIND_BY_CODE,
            )
            state.last_lsn, state.last_time = info.lsn, info.created
        return info

    def _apply_through_acked(self, tables: LmdbTables) -> None:
        """Apply every operation acknowledged before this call (not ``apply_all``: under a
        steady stream of writes that would chase the writers forever)."""
        applier, wal = self._applier, self._wal
        if applier is None or wal is None or applier.hold:
            return
        target = wal.acked_lsn
        while True:
            with tables.reading() as txn:
                if tables.applied_lsn(txn) >= target:
                    return
            if not applier.apply_once():
                return

    def list_snapshots(self) -> list[SnapshotInfo]:
        """This store's complete snapshots, oldest first.

        Half-written ones are never listed. A damaged one (manifest missing or unparsable) is
        not listed either but logged as a warning; :meth:`check_snapshots` reports it.
        """
        self._check_open()
        listing = snap_mod.scan(self.snapshot_dir, self.store_id)
        for name, reason in listing.damaged:
            log.warning("damaged snapshot %s not listed: %s", name, reason)
        return listing.snapshots

    def verify_snapshot(self, snapshot_id: str) -> SnapshotInfo:
        """Check the manifest and every file's size and sha256; SnapshotError names the file."""
        self._check_open()
        snap = snap_mod.load(self.snapshot_dir, snapshot_id)
        snap_mod.verify(snap)
        return snap.info

    def check_snapshots(self, *, checksums: bool = True) -> list[str]:
        """One message per damaged snapshot directory (for ``verify``); empty when all is well."""
        self._check_open()
        root = self.snapshot_dir
        listing = snap_mod.scan(root, self.store_id)
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
        self._check_open()
        target = Path(into)
        if to_lsn is not None and to_time is not None:
            raise InvalidRecordError("give to_lsn or to_time, not both", field="to_lsn")
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
            raise InvalidRecordError(f"keep must be an integer >= 0, got {keep!r}", field="keep")
        self._writable()
        state = self._snapshot_state()
        with state.lock:
            root = self.snapshot_dir
            snap_mod.remove_temps(root, self.store_id)
            infos = snap_mod.scan(root, self.store_id).snapshots
            doomed = infos[: max(0, len(infos) - keep)]
            for info in doomed:
                snap_mod.remove(info, root)
                log.info("pruned snapshot %s (LSN %d)", info.id, info.lsn)
        return doomed

    # --------------------------------------------------------------- automatic
    def _maybe_auto_snapshot(self) -> SnapshotInfo | None:
        """Take a snapshot when ``snapshot_every_records`` / ``snapshot_every_seconds`` say so.

        Called by the applier thread after it applied a batch. A failure is logged and never
        propagates: an automatic snapshot must not stop the applier. After a failure the next
        attempt waits for another full period.
        """
        cfg = self.config
        every_n, every_s = cfg.snapshot_every_records, cfg.snapshot_every_seconds
        if (every_n is None and every_s is None) or self._closed or self._wal is None:
            return None
        state = self._snapshot_state()
        now = time.time()
        if state.last_lsn is None:
            self._init_auto_baseline(state, now)
        assert state.last_lsn is not None
        done = self._wal.acked_lsn
        if done <= state.last_lsn:
            return None
        due = (every_n is not None and done - state.last_lsn >= every_n) or (
            every_s is not None and now - state.last_time >= every_s
        )
        if not due:
            return None
        try:
            info = self.snapshot()
            if cfg.snapshot_keep is not None:
                self.prune_snapshots(cfg.snapshot_keep)
        except Exception:  # logged; an automatic snapshot must not kill the applier thread
            log.exception("automatic snapshot of %s failed; will retry after a period", self.path)
            state.last_lsn, state.last_time = done, now
            return None
        return info

    def _clean_snapshot_temps(self) -> None:
        """On a writer open: remove half-written snapshots a crash left (never fails the open)."""
        try:
            snap_mod.remove_temps(self.snapshot_dir, self.store_id)
        except OSError as exc:
            log.warning("could not remove leftover snapshot temporaries: %s", exc)

    def _init_auto_baseline(self, state: _SnapshotState, now: float) -> None:
        """Count from the newest existing snapshot (across restarts), else from now."""
        try:
            infos = snap_mod.scan(self.snapshot_dir, self.store_id).snapshots
        except OSError as exc:
            log.warning("cannot list snapshots in %s: %s", self.snapshot_dir, exc)
            infos = []
        if infos:
            state.last_lsn, state.last_time = infos[-1].lsn, infos[-1].created
        else:
            state.last_lsn, state.last_time = 0, now

    def _snapshot_state(self) -> _SnapshotState:
        state = self.__dict__.get("_snapshot_state_")
        if state is None:
            state = self.__dict__.setdefault("_snapshot_state_", _SnapshotState())
        assert isinstance(state, _SnapshotState)
        return state

    # --------------------------------------------------------- point in time
    def _frames(self, from_lsn: int) -> Iterator[Frame]:
        return snap_mod.wal_frames(
            self._layout.wal,
            store_id=self.store_id,
            from_lsn=from_lsn,
            max_frame_bytes=self.config.max_frame_bytes,
        )

    def _pitr_stop(self, snap: Snapshot, to_lsn: int | None, to_time: float | None) -> int:
        """The last LSN a restore replays to; checks the WAL holds all of it before any copy."""
        after = snap.info.lsn
        rolls = to_time is not None or (to_lsn is not None and to_lsn != after)
        if rolls and snap.info.store_id != self.store_id:
            raise SnapshotError(
                f"snapshot {snap.info.id} belongs to store {snap.info.store_id:#x}, not this one "
                f"({self.store_id:#x}): its WAL is not here, so it restores only as it is"
            )
        if to_lsn is not None:
            return self._stop_at_lsn(snap, to_lsn)
        if to_time is not None:
            return self._stop_at_time(snap, to_time)
        return after

    def _stop_at_lsn(self, snap: Snapshot, to_lsn: int) -> int:
        after = snap.info.lsn
        if to_lsn < after:
            raise InvalidRecordError(
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
            raise InvalidRecordError(
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
                raise InvalidRecordError(
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
        tables = LmdbTables(data_dir, readonly=False, map_size=self.config.map_size)
        try:
            _Replayer(tables).run(self._frames(after + 1), after, stop)
        finally:
            tables.close()


class _Replayer:
    """derive() + apply for a restored copy: the same meaning of operations as recovery."""

    def __init__(self, tables: LmdbTables) -> None:
        self.tables = tables
        self.records: dict[int, Effect] = {}  # effects not yet applied, newest per id
        self.tracks: dict[str, int | None] = {}
        self.effects: list[Effect] = []
        self.view = StateView(self._get, self._track)
        self.embedding_dim: int | None = None

    def run(self, frames: Iterator[Frame], after: int, stop: int) -> None:
        last = after
        for frame in frames:
            if frame.first_lsn > stop:
                break
            for i, raw in enumerate(frame.ops()):
                lsn = frame.first_lsn + i
                if lsn <= after:
                    continue
                if lsn > stop:
                    break
                self._one(raw, lsn)
                last = lsn
            if len(self.effects) >= _REPLAY_BATCH:
                self._flush(last)
        if last != stop:
            raise SnapshotError(f"the WAL ended at LSN {last} before the target LSN {stop}")
        self._flush(last, force=True)
        self._fix_embedding_dim()
        self.tables.sync()

    def _one(self, raw: bytes, lsn: int) -> None:
        op = decode_op(raw, validate=False)
        try:
            effects = derive_all(op, lsn, self.view, raw)
        except RecordNotFoundError:
            log.warning("restore replay: LSN %d targets a missing record (%r); skipped", lsn, op)
            return
        if (
            self.embedding_dim is None
            and isinstance(op, PutOp)
            and isinstance(op.record, Fingerprint)
            and op.record.embedding
        ):
            self.embedding_dim = len(op.record.embedding)
        for eff in effects:
            self.effects.append(eff)
            if eff.record_id is not None:
                self.records[eff.record_id] = eff
            if eff.track is not None:
                self.tracks[eff.track] = eff.track_to

    def _flush(self, last: int, force: bool = False) -> None:
        if self.effects or force:
            self.tables.apply(to_changes(self.effects), last)
        self.effects, self.records, self.tracks = [], {}, {}

    def _fix_embedding_dim(self) -> None:
        if self.embedding_dim is None:
            return
        with self.tables.reading() as txn:
            known = self.tables.get_meta(txn, "embedding_dim")
        if known is None:
            self.tables.put_meta("embedding_dim", str(self.embedding_dim).encode())

    def _get(self, rid: int) -> Experience | None:
        eff = self.records.get(rid)
        if eff is not None:
            return eff.experience()
        with self.tables.reading() as txn:
            raw = self.tables.get_record(txn, rid)
        return decode_envelope(rid, raw) if raw is not None else None

    def _track(self, track_id: str) -> int | None:
        if track_id in self.tracks:
            return self.tracks[track_id]
        with self.tables.reading() as txn:
            return self.tables.get_track(txn, track_id)


def _lsn_arg(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRecordError(f"to_lsn must be an integer >= 0, got {value!r}", field="to_lsn")
    return value


def _time_arg(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRecordError(
            f"to_time must be a finite number of seconds since the epoch, got {value!r}",
            field="to_time",
        )
    return float(value)
