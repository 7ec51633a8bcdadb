"""File-system helpers that carry the durability rules in one place.

Every fsync the persistence layer needs goes through :func:`fdatasync` and :func:`fsync_dir`, so
a test can inject a rare fault (EIO, ENOSPC) by patching one name, and so a reader of the code can
check the ordering rules (data synced before rename, directory synced after) in one module.
"""

from __future__ import annotations

import os
from pathlib import Path


def fdatasync(fd: int) -> None:
    """Flush a file's data (and the metadata needed to read it back) to stable storage."""
    os.fdatasync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make creates, renames and unlinks inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (a regular file may take a short write)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old file or the new one.

    Temp file in the same directory, fdatasync, rename over the target, fsync the directory.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        fdatasync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    fsync_dir(target.parent)
