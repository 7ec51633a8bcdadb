"""The engine of one open store: its lock, LMDB tables, overlay, WAL, applier and settings.

:func:`open_engine` is the open sequence (finish an interrupted in-place restore or compaction,
take the writer lock, open LMDB, read the persisted settings, replay the WAL beyond
``applied_lsn``, start the WAL writer and the applier). The components of the Store facade are
handed the parts of the engine they need; none of them opens or closes anything itself.

Settings live in :class:`Settings`: the persisted document, the session's overrides, and the
effective config every component reads through it (so a live ``reconfigure`` reaches all of them
at once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from xpstore.config import LIVE, MANAGED, SESSION_ONLY, StoreConfig, dotted, make_config
from xpstore.errors import (
    InvalidArgumentError,
    ReadOnlyStoreError,
    StoreClosedError,
)
from xpstore.model.progress import ProgressFn
from xpstore.ops import compaction
from xpstore.ops.snapshots import finish_in_place
from xpstore.persistence import layout as layout_mod
from xpstore.persistence.applier import Applier
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.lock import WriterLock
from xpstore.persistence.overlay import Overlay
from xpstore.persistence.replayer import Replayer
from xpstore.persistence.telemetry import Telemetry
from xpstore.persistence.wal import WalWriter
from xpstore.persistence.wal_recovery import RecoveryReport, recover_wal

__all__ = ["Engine", "Settings", "checked_changes", "open_engine", "timed"]

log = logging.getLogger(__name__)


class Settings:
    """The persisted settings document, this session's overrides, and the config in force."""

    def __init__(self, persisted: StoreConfig, overrides: Mapping[str, Any]) -> None:
        self.persisted = persisted
        self.overrides = {dotted(k): v for k, v in overrides.items()}
        self.current = persisted.changed(self.overrides)
        self._watchers: list[Callable[[StoreConfig], None]] = []

    def watch(self, callback: Callable[[StoreConfig], None]) -> None:
        """Call ``callback(new_config)`` after every live change (components re-read knobs)."""
        self._watchers.append(callback)

    def replace_persisted(
        self, persisted: StoreConfig, changed: Iterable[str] = ()
    ) -> StoreConfig:
        """Adopt a new persisted document (acknowledged through the WAL); return the config in
        force: the session's overrides stay on top, except for the knobs just ``changed``."""
        self.persisted = persisted
        for key in changed:
            self.overrides.pop(key, None)
        self.current = persisted.changed(self.overrides)
        for callback in self._watchers:
            callback(self.current)
        return self.current


class Engine:
    """What an open store is made of; see the module docstring. Built by :func:`open_engine`."""

    def __init__(self, path: Path, readonly: bool) -> None:
        self.path = path
        self.layout = Layout(path)
        self.readonly = readonly
        self.closed = False
        self.settings = Settings(make_config(), {})
        self.overlay = Overlay()
        self.write_lock = threading.Lock()
        """Held while an operation is derived and appended (and to close): the LSN order."""
        self.store_id = 0
        self.lock: WriterLock | None = None
        self.tables_or_none: LmdbTables | None = None
        self.wal: WalWriter | None = None
        self.applier: Applier | None = None
        self.recovery_report: RecoveryReport | None = None
        self.telemetry = Telemetry()
        """Operation latencies and counters in memory (docs/design.md, "Telemetry")."""

    @property
    def config(self) -> StoreConfig:
        return self.settings.current

    @property
    def tables(self) -> LmdbTables:
        tables = self.tables_or_none
        if tables is None:
            raise StoreClosedError(f"store {self.path} is closed")
        return tables

    @property
    def embedding_dim(self) -> int | None:
        return self.config.records.embedding_dim

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosedError(f"store {self.path} is closed")

    def writable(self) -> WalWriter:
        """The WAL, after checking the store is open for writing and the applier is healthy."""
        self.check_open()
        if self.readonly or self.wal is None:
            raise ReadOnlyStoreError(f"store {self.path} is open read-only")
        if self.applier is not None and self.applier.error is not None:
            raise self.applier.error
        return self.wal

    def applied_lsn(self) -> int:
        tables = self.tables
        with tables.reading() as txn:
            return tables.applied_lsn(txn)

    def apply_through_acked(self) -> None:
        """Apply every operation acknowledged before this call to LMDB (not later ones: under a
        steady stream of writes, "everything" would chase the writers forever)."""
        applier, wal = self.applier, self.wal
        if applier is None or wal is None or applier.hold or self.closed:
            return
        applier.apply_through(wal.acked_lsn)

    def shutdown(self) -> None:
        """Flush and close the WAL, drain the applier (unless poisoned or held), release.

        Every step runs even when an earlier one failed or was interrupted (a KeyboardInterrupt
        during close), and none waits without a bound: the WAL's close is bounded by
        ``wal.CLOSE_TIMEOUT_S``, the applier's stop by ``applier.STOP_TIMEOUT_S``.
        """
        errors: list[BaseException] = []
        try:
            try:
                if self.wal is not None:
                    self.wal.close()
            except BaseException as exc:  # KeyboardInterrupt included: stop the applier first
                errors.append(exc)
            if self.applier is not None:
                poisoned = self.wal is not None and self.wal.poisoned is not None
                try:
                    self.applier.stop(drain=not errors and not poisoned)
                except BaseException as exc:
                    errors.append(exc)
        finally:
            self.release()
        for later in errors[1:]:
            log.error("closing %s: %s", self.path, later)
        if errors:
            raise errors[0]

    def release(self) -> None:
        """Close LMDB and release the writer lock. LMDB stays open (and is logged) if the
        applier thread is still inside a transaction: closing it under that thread would crash
        the process; the process's exit frees it."""
        self.closed = True
        applier = self.applier
        busy = applier is not None and not applier.join(0)
        if self.tables_or_none is not None and not busy:
            self.tables_or_none.close()
            self.tables_or_none = None
        elif busy:
            log.error("the applier of %s did not stop; its LMDB environment stays open", self.path)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def open_engine(
    path: Path,
    *,
    create: bool,
    readonly: bool,
    overrides: Mapping[str, Any],
    to_lsn: int | None = None,
    progress: ProgressFn | None = None,
) -> Engine:
    """Open (or create) the store at ``path``: the open sequence of the module docstring."""
    lay = Layout(path)
    if not readonly:
        finish_in_place(path)  # an in-place snapshot restore cut off by a crash
    if readonly and create:
        raise InvalidArgumentError("create=True and readonly=True exclude each other",
                                   field="create")  # fmt: skip
    session = {dotted(k): v for k, v in overrides.items()}
    if to_lsn is not None and (session.get("wal.recovery_mode") != "point_in_time" or readonly):
        raise InvalidArgumentError(
            "to_lsn needs recovery_mode='point_in_time' on a writable open", field="to_lsn"
        )
    is_new = create and not lay.marker.exists()
    if is_new:
        layout_mod.prepare_new(lay)
    else:
        layout_mod.read_marker(lay)
    engine = Engine(path, readonly)
    try:
        _open(engine, is_new, session, to_lsn, progress)
    except BaseException:
        engine.release()
        raise
    return engine


def _open(
    engine: Engine, is_new: bool, session: dict[str, Any], to_lsn: int | None,
    progress: ProgressFn | None,
) -> None:
    lay = engine.layout
    if not engine.readonly:
        engine.lock = WriterLock(lay.lock)
        engine.lock.acquire()
        compaction.finish_interrupted(lay)  # a compaction cut off by a crash
    base = make_config().changed(session) if is_new else None
    map_size = session.get("apply.map_size", (base or make_config()).apply.map_size)
    engine.tables_or_none = LmdbTables(lay.data, readonly=engine.readonly, map_size=map_size)
    if is_new:
        assert base is not None
        engine.tables.put_meta("config", base.persisted().to_json().encode())
        marker = layout_mod.write_marker(lay)
    else:
        marker = layout_mod.read_marker(lay)
    engine.store_id = marker.store_id
    engine.settings = Settings(_read_persisted(engine.tables), session)
    if engine.readonly:
        return
    _recover(engine, to_lsn, progress)
    engine.settings = Settings(_read_persisted(engine.tables), session)  # replay may change it
    cfg = engine.config
    with engine.tables.reading() as txn:
        applied = engine.tables.applied_lsn(txn)
    report = engine.recovery_report
    assert report is not None
    next_lsn = max(applied, report.last_lsn) + 1
    overlay = engine.overlay
    engine.wal = WalWriter(
        lay.wal,
        store_id=engine.store_id,
        next_lsn=next_lsn,
        durability=cfg.wal.durability,
        segment_max_bytes=cfg.wal.segment_max_bytes,
        max_frame_bytes=cfg.wal.max_frame_bytes,
        group_commit_ms=cfg.wal.group_commit_ms,
        preallocate_bytes=cfg.wal.preallocate_bytes,
        on_durable=lambda _first, last: overlay.make_durable(last),
        telemetry=engine.telemetry,
    )
    applier = Applier(overlay, engine.tables, cfg.apply, cfg.wal, engine.telemetry)
    engine.settings.watch(lambda new: applier.configure(new.apply, new.wal))
    engine.applier = applier
    applier.attach_wal(engine.wal)
    applier.checkpoint()
    applier.start()


def _read_persisted(tables: LmdbTables) -> StoreConfig:
    """The persisted settings; stores made before settings were logged kept the embedding
    dimension in its own ``meta`` key, read here as the same setting."""
    with tables.reading() as txn:
        raw = tables.get_meta(txn, "config")
        legacy_dim = tables.get_meta(txn, "embedding_dim")
    cfg = StoreConfig.from_json(raw.decode()) if raw else make_config()
    if legacy_dim and cfg.records.embedding_dim is None:
        cfg = cfg.changed({"records.embedding_dim": int(legacy_dim)})
    return cfg


def _recover(engine: Engine, to_lsn: int | None, progress: ProgressFn | None) -> None:
    """Replay the WAL beyond ``applied_lsn`` into LMDB under the session's recovery mode."""
    tables = engine.tables
    cfg = engine.config
    with tables.reading() as txn:
        applied = tables.applied_lsn(txn)
    if to_lsn is not None and to_lsn < applied:
        raise InvalidArgumentError(
            f"to_lsn {to_lsn} is older than what LMDB already holds (applied_lsn {applied}); "
            "the WAL cannot take it back: restore a snapshot instead",
            field="to_lsn",
        )
    replayer = Replayer(tables, batch=cfg.apply.batch_ops)
    report = recover_wal(
        engine.layout.wal,
        store_id=engine.store_id,
        applied_lsn=applied,
        mode=cfg.wal.recovery_mode,
        max_frame_bytes=cfg.wal.max_frame_bytes,
        apply=lambda first, ops, _commit_time: replayer.apply_frame(first, ops),
        modify=True,
        to_lsn=to_lsn,
        progress=progress,
    )
    replayer.flush()
    engine.recovery_report = report
    if report.replayed_ops or report.warnings:
        log.info("recovered %s: replayed %d operations after LSN %d (%d warnings)",
                 engine.path, report.replayed_ops, applied, len(report.warnings))  # fmt: skip
    if (engine.path / "index").is_dir():
        from xpstore.index.manager import check_file_at_open  # FAISS only where there is one

        check_file_at_open(engine.path, engine.store_id, engine.applied_lsn())


def checked_changes(engine: Engine, changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` by dotted name, validated against the persisted document; refuses unknown,
    session-only and reopen-only knobs and bad values (InvalidArgumentError naming the knob)."""
    named: dict[str, Any] = {}
    for name, value in changes.items():
        key = dotted(name)
        if key in MANAGED:
            raise InvalidArgumentError(
                f"{name} is written by the store (fit_similarity, calibrate_validation), not "
                "set by hand",
                field=name,
            )
        if key in SESSION_ONLY:
            raise InvalidArgumentError(
                f"{name} applies to one session only: pass it to Store.open instead", field=name
            )
        if key not in LIVE:
            raise InvalidArgumentError(
                f"{name} cannot change while the store is open: close it and reopen with "
                f"Store.open(path, {name}=...) for this session (it is not persisted that way)",
                field=name,
            )
        named[key] = value
    engine.settings.persisted.changed(named)  # validates every value, changes nothing
    return named


P = ParamSpec("P")
R = TypeVar("R")


class _Component(Protocol):
    _engine: Engine


def timed(
    name: str,
) -> Callable[[Callable[Concatenate[Any, P], R]], Callable[Concatenate[Any, P], R]]:
    """Decorate a component method (one with ``self._engine``) so each call's wall time is
    observed under ``name`` in ``engine.telemetry``, also when it raises."""

    clock = time.perf_counter

    def wrap(fn: Callable[Concatenate[Any, P], R]) -> Callable[Concatenate[Any, P], R]:
        def call(self: _Component, /, *args: P.args, **kwargs: P.kwargs) -> R:
            start = clock()
            try:
                return fn(self, *args, **kwargs)
            finally:
                self._engine.telemetry.observe(name, clock() - start)

        call.__name__, call.__qualname__, call.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        return call

    return wrap
