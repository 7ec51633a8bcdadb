"""Opening LMDB environments: one per path per process, shared by reference count (LMDB
forbids a second ``Environment`` on one path in a process), each data file checked before it is
mapped, and LMDB's errors translated into xpstore's (the single boundary for them)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import lmdb

from xpstore.errors import StoreCorruptionError, WALWriteError, XpStoreError
from xpstore.persistence.lmdb_datafile import check_data_file

__all__ = ["REGISTRY", "translate"]

log = logging.getLogger(__name__)


class _Registry:
    """One Environment per path per process, shared by reference count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._envs: dict[str, tuple[lmdb.Environment, int, bool]] = {}

    def open(
        self, path: Path, *, readonly: bool, map_size: int, max_dbs: int, lock: bool = True
    ) -> lmdb.Environment:
        key = str(path.resolve())
        with self._lock:
            if key in self._envs:
                env, refs, ro = self._envs[key]
                if ro and not readonly:
                    raise XpStoreError(
                        f"{path} is already open read-only in this process; close it before "
                        "opening it for writing (LMDB allows one environment per path per process)"
                    )
                self._envs[key] = (env, refs + 1, ro)
                return env
            env = _open_env(path, readonly=readonly, map_size=map_size, lock=lock, max_dbs=max_dbs)
            self._envs[key] = (env, 1, readonly)
            return env

    def refs(self, path: Path) -> int:
        with self._lock:
            entry = self._envs.get(str(path.resolve()))
            return entry[1] if entry is not None else 0

    def close(self, path: Path) -> None:
        key = str(path.resolve())
        with self._lock:
            env, refs, ro = self._envs[key]
            if refs > 1:
                self._envs[key] = (env, refs - 1, ro)
                return
            del self._envs[key]
        env.close()


REGISTRY = _Registry()
"""The process's environments (LMDB: one Environment per path per process)."""


def _open_env(
    path: Path, *, readonly: bool, map_size: int, lock: bool, max_dbs: int
) -> lmdb.Environment:
    check_data_file(path)  # before mapping it: a truncated file means SIGBUS, not an error
    if not lock and not readonly:
        raise ValueError("only a read-only LMDB environment may be opened without its lock file")
    try:
        env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=max_dbs,
            subdir=True,
            readonly=readonly,
            create=not readonly,
            sync=True,
            metasync=False,
            writemap=False,
            map_async=False,
            lock=lock,
        )
    except lmdb.Error as exc:
        raise translate(exc, f"opening LMDB at {path}") from exc
    if not readonly:
        stale = env.reader_check()
        if stale:
            log.info("cleared %d stale LMDB reader slots at %s", stale, path)
    return env


def translate(exc: lmdb.Error, context: str) -> XpStoreError:
    """Map an LMDB error to the xpstore tree (the single boundary for LMDB errors)."""
    if isinstance(exc, lmdb.CorruptedError | lmdb.PageNotFoundError | lmdb.InvalidError):
        return StoreCorruptionError(f"LMDB is damaged ({context}): {exc}")
    if isinstance(exc, lmdb.DiskError):
        return WALWriteError(f"disk error in LMDB ({context}): {exc}")
    if isinstance(exc, lmdb.VersionMismatchError):
        return StoreCorruptionError(f"LMDB version mismatch ({context}): {exc}")
    return XpStoreError(f"LMDB error ({context}): {type(exc).__name__}: {exc}")
