"""The file-system seam: every file operation of the persistence layer goes through here.

Why: durability bugs hide in the ordering of writes, syncs and renames. Routing them through one
small interface lets a test double (``tests/crashfs.py``) record what was synced and what was
not, and build the "crash image" a power loss could leave behind; it also lets a test inject a
rare fault (EIO, ENOSPC) by replacing one method. LMDB's own I/O happens inside its C library and
does not pass through here (see docs/design.md for how crash images treat it).

Use the module-level functions (``fs.write_all``, ``fs.fdatasync``, ...): they call the current
implementation, :class:`OsFS` unless a test installed another with :func:`use`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

PathLike = str | os.PathLike[str]


class OsFS:
    """The real file system (POSIX calls, no buffering)."""

    def open(self, path: PathLike, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fsync_dir(self, path: PathLike) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, src: PathLike, dst: PathLike) -> None:
        os.replace(src, dst)

    def unlink(self, path: PathLike) -> None:
        os.unlink(path)

    def truncate(self, path: PathLike, size: int) -> None:
        os.truncate(path, size)

    def read_bytes(self, path: PathLike) -> bytes:
        return Path(path).read_bytes()

    def mkdir(self, path: PathLike) -> None:
        os.mkdir(path)

    def rmtree(self, path: PathLike) -> None:
        shutil.rmtree(path)


_current: OsFS = OsFS()


def current() -> OsFS:
    return _current


@contextlib.contextmanager
def use(impl: OsFS) -> Iterator[OsFS]:
    """Install ``impl`` (a subclass of OsFS) for the duration of the block (tests)."""
    global _current
    previous, _current = _current, impl
    try:
        yield impl
    finally:
        _current = previous


def open_file(path: PathLike, flags: int, mode: int = 0o644) -> int:
    return _current.open(path, flags, mode)


def close(fd: int) -> None:
    _current.close(fd)


def fdatasync(fd: int) -> None:
    """Flush a file's data (and the metadata needed to read it back) to stable storage."""
    _current.fdatasync(fd)


def fsync_dir(path: PathLike) -> None:
    """Make creates, renames and unlinks inside ``path`` durable."""
    _current.fsync_dir(path)


def replace(src: PathLike, dst: PathLike) -> None:
    _current.replace(src, dst)


def unlink(path: PathLike, missing_ok: bool = False) -> None:
    try:
        _current.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def truncate(path: PathLike, size: int) -> None:
    _current.truncate(path, size)


def read_bytes(path: PathLike) -> bytes:
    return _current.read_bytes(path)


def mkdir(path: PathLike, exist_ok: bool = False) -> None:
    try:
        _current.mkdir(path)
    except FileExistsError:
        if not exist_ok:
            raise


def rmtree(path: PathLike) -> None:
    _current.rmtree(path)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``write`` until every byte is written (a regular file may take a short write)."""
    view = memoryview(data)
    while view:
        written = _current.write(fd, view)
        view = view[written:]


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` every byte of ``data`` at ``offset`` (overwrites: a preallocated WAL segment)."""
    view = memoryview(data)
    while view:
        written = _current.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes at ``offset`` (fewer at the end of the file)."""
    return _current.pread(fd, n, offset)


def write_file(path: PathLike, data: bytes, *, sync: bool = True) -> None:
    """Create or overwrite ``path`` with ``data`` (fdatasynced unless ``sync=False``)."""
    fd = open_file(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        write_all(fd, data)
        if sync:
            fdatasync(fd)
    finally:
        close(fd)


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy ``src`` to ``dst`` and fdatasync the copy (the directory is the caller's to sync)."""
    write_file(dst, read_bytes(src))


def atomic_write(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one.

    Temp file in the same directory, fdatasync, rename over the target, fsync the directory.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    write_file(tmp, data)
    replace(tmp, target)
    fsync_dir(target.parent)
