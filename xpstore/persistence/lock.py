"""The one-writer-per-store lock: an ``flock`` on ``<store>/LOCK`` holding the owner's pid.

``flock`` locks belong to an open file description, so they are released by the kernel when the
process dies (SIGKILL included): a stale LOCK file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from xpstore.errors import StoreLockedError


class WriterLock:
    """Exclusive, non-blocking writer lock; raises StoreLockedError naming the holder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise StoreLockedError(
                f"store {self.path.parent} is locked for writing by {who}; "
                "open it with readonly=True, or stop that process",
                pid=holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the description drops the flock
            self._fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
