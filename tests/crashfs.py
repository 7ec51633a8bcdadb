"""CrashFS: a file-system double that knows what a power loss would keep.

It wraps the real file system (every call still happens on disk) and keeps a model of what is
*durable*: the content of each file as of its last ``fdatasync``, and the entries of each
directory as of its last ``fsync_dir``. From that model it writes a "crash image": files created,
renamed or unlinked since their directory's last sync are undone, unsynced data is dropped, and
the first unsynced change of the last written file (an append, or an overwrite of the zeros
of a preallocated WAL segment) is kept torn at a 512-byte sector boundary.

LMDB does its own I/O in C, below this seam, so the store's ``data/`` directory is not modelled:
the image gets LMDB through ``env.copy`` (its newest committed transaction). That is what LMDB
promises after a crash with ``sync=True`` (a committed transaction survives; with
``metasync=False`` possibly minus the last one, which the WAL replays; see docs/design.md).
Directories made with ``mkdir`` count as durable at once (a simplification: the store's
directories are created and synced before any record is acknowledged); a directory's rename or
removal (snapshots are directories renamed into place) becomes durable with its parent's sync.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xpstore.persistence.fs import OsFS, PathLike

SECTOR = 512


class CrashFS(OsFS):
    """Real I/O plus a durability model; ``on_point(kind)`` runs after each write, sync, rename."""

    def __init__(self, root: Path, on_point: Callable[[str], None]) -> None:
        self.root = root
        self.on_point = on_point
        self._inode = 0
        self.durable_content: dict[int, bytes] = {}
        self.current: dict[str, int] = {}  # path -> inode, what the namespace says now
        self.durable: dict[str, int] = {}  # path -> inode, what survives a power loss
        self.live_path: dict[int, str] = {}
        self.fds: dict[int, int] = {}
        self.last_written: int | None = None
        # directory renames and removals become durable with their parent's fsync
        self._dir_moves: dict[str, list[tuple[str, str | None]]] = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and not self._untracked(str(path)):
                ino = self._new_inode(str(path))
                self.durable_content[ino] = path.read_bytes()
                self.durable[str(path)] = ino

    def _untracked(self, path: str) -> bool:
        rel = os.path.relpath(path, self.root)
        return rel.startswith("data" + os.sep) or rel == "LOCK"

    def _new_inode(self, path: str) -> int:
        self._inode += 1
        self.current[path] = self._inode
        self.live_path[self._inode] = path
        self.durable_content.setdefault(self._inode, b"")
        return self._inode

    # ------------------------------------------------------------- the seam
    def open(self, path: PathLike, flags: int, mode: int = 0o644) -> int:
        fd = super().open(path, flags, mode)
        p = str(path)
        if not self._untracked(p):
            ino = self.current.get(p)
            if ino is None:
                ino = self._new_inode(p)
            self.fds[fd] = ino
        return fd

    def close(self, fd: int) -> None:
        super().close(fd)
        self.fds.pop(fd, None)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        n = super().write(fd, data)
        if fd in self.fds:
            self.last_written = self.fds[fd]
            self.on_point("write")  # power loss before the sync: the tail may be torn
        return n

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        n = super().pwrite(fd, data, offset)
        if fd in self.fds:
            self.last_written = self.fds[fd]
            self.on_point("write")
        return n

    def fdatasync(self, fd: int) -> None:
        super().fdatasync(fd)
        ino = self.fds.get(fd)
        if ino is not None:
            self.durable_content[ino] = Path(self.live_path[ino]).read_bytes()
            self.on_point("fdatasync")

    def fsync_dir(self, path: PathLike) -> None:
        super().fsync_dir(path)
        d = str(path)
        for src, dst in self._dir_moves.pop(d, []):
            for p in [p for p in self.durable if p.startswith(src + os.sep)]:
                ino = self.durable.pop(p)
                if dst is not None:
                    self.durable[dst + p[len(src) :]] = ino
        for p in [p for p in self.durable if os.path.dirname(p) == d and p not in self.current]:
            del self.durable[p]
        for p, ino in self.current.items():
            if os.path.dirname(p) == d:
                self.durable[p] = ino
        self.on_point("fsync_dir")

    def replace(self, src: PathLike, dst: PathLike) -> None:
        super().replace(src, dst)
        s, d = str(src), str(dst)
        if os.path.isdir(d):  # a directory: every file below it moves
            for p in [p for p in self.current if p.startswith(s + os.sep)]:
                ino = self.current.pop(p)
                self.current[d + p[len(s) :]] = ino
                self.live_path[ino] = d + p[len(s) :]
            self._dir_moves.setdefault(os.path.dirname(d), []).append((s, d))
            self.on_point("rename")
            return
        moved = self.current.pop(s, None)
        if moved is not None:
            self.current[d] = moved
            self.live_path[moved] = d
            self.on_point("rename")

    def unlink(self, path: PathLike) -> None:
        super().unlink(path)
        self.current.pop(str(path), None)

    def rmtree(self, path: PathLike) -> None:
        super().rmtree(path)
        prefix = str(path) + os.sep
        for p in [p for p in self.current if p.startswith(prefix)]:
            del self.current[p]
        self._dir_moves.setdefault(os.path.dirname(str(path)), []).append((str(path), None))

    # ------------------------------------------------------------ the image
    def write_image(self, dest: Path) -> None:
        """Write what a power loss right now could leave of the tracked files into ``dest``."""
        for p, ino in self.durable.items():
            data = self.durable_content.get(ino, b"")
            if ino == self.last_written:
                data = self._torn(ino, data)
            target = dest / os.path.relpath(p, self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    def _torn(self, ino: int, durable: bytes) -> bytes:
        """The durable bytes plus what a torn write kept of the unsynced change: from the first
        byte that differs (an append, or an overwrite of preallocated zeros) up to a sector edge.
        """
        try:
            live = Path(self.live_path[ino]).read_bytes()
        except FileNotFoundError:
            return durable
        common = min(len(live), len(durable))
        differs = np.flatnonzero(
            np.frombuffer(live, np.uint8, common) != np.frombuffer(durable, np.uint8, common)
        )
        diff = int(differs[0]) if differs.size else common
        if diff == common and len(live) <= len(durable):
            return durable
        end = min(len(live), diff + SECTOR - diff % SECTOR)
        return durable[:diff] + live[diff:end] + durable[end:]
