"""The write-ahead log writer: LSN assignment, group commit, rotation, poisoning, truncation.

Segments may be preallocated: zeros are written ahead of the write position
(``wal.preallocate_bytes``), so a commit's fdatasync overwrites blocks the file already has and
skips the file-size and extent update an append pays (see :meth:`WalWriter._extend`). A frame
of ``_APPEND_FRAME`` bytes or more is appended instead, no zeros ahead of it.

One store has one :class:`WalWriter`. Callers (already serialized by the store's write lock)
``append`` a group of encoded operations and get its LSN range back at once; then, without any
lock held, they ``wait`` until that range is acknowledged. The first waiter that finds no flush in
progress becomes the *leader*: it takes every pending group, writes them as frames with one
``write`` and, in ``commit`` mode, one ``fdatasync``, so concurrent writers share a sync (group
commit). Followers sleep on an event of their own; the leader wakes exactly the writers its flush
covered, and, if more work queued up meanwhile, the oldest remaining waiter to lead next.

Any write or sync error poisons the log: the error is kept and every later ``append`` or ``wait``
raises :class:`~xpstore.errors.WALWriteError`. A failed fsync is never retried, because Linux may
already have dropped the dirty pages and a retry could report success for data that is gone.

The leader is also safe against asynchronous exceptions (a KeyboardInterrupt from Ctrl-C lands
in whatever the main thread runs, the leader's flush included). Interrupted before any byte of
its frame reached the file (the segment did not grow, or its zero-filled space is still zero at
the frame's offset), the leader puts its
groups back at the head of the queue and wakes the oldest waiter to lead instead: nothing
happened. Interrupted later, the frame may be whole,
partial or synced or not, so the log is poisoned as for a failed write: every waiter is woken
with a WALWriteError at once, and a reopen recovers exactly what the file holds. Either way the
leader flag is cleared, so no ``wait`` (``close``'s included) sleeps on a flush that will never
finish; and ``close`` waits at most ``CLOSE_TIMEOUT_S`` for the last flush.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import threading
import time
from _thread import LockType as _Gate
from _thread import allocate_lock as _new_gate
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xpstore.errors import RecordTooLargeError, WALWriteError
from xpstore.persistence import fs
from xpstore.persistence.crashpoints import crash_point
from xpstore.persistence.telemetry import Telemetry
from xpstore.persistence.wal_format import (
    FLAG_PREALLOCATED,
    FRAME_HEADER_SIZE,
    SEGMENT_NAME_RE,
    encode_frame,
    encode_header,
    frame_size,
    segment_name,
)

log = logging.getLogger(__name__)

DurableCallback = Callable[[int, int], None]

_MIN_PREALLOC = 64 * 1024  # the first zero-filled window of a segment; it doubles from there
_APPEND_FRAME = 64 * 1024
"""A write at least this large that reaches past the zeros is appended, no zeros written ahead:
zero-filling costs a second write of every byte, which a small commit's cheaper overwrite sync
repays and a large frame's does not (``put_many`` of 1000 records, 339 KB frames: 1.5 us a
record slower with zeros; 34 KB frames: about even; docs/benchmarks.md)."""
_PAGE = 4096

CLOSE_TIMEOUT_S = 60.0
"""The longest ``close`` waits for the last flush (a hung disk), then fails with WALWriteError."""


@dataclass(slots=True)
class _Group:
    first_lsn: int
    ops: list[bytes]
    nbytes: int


@dataclass(slots=True)
class WalStats:
    frames: int = 0
    ops: int = 0
    syncs: int = 0
    bytes: int = 0
    rotations: int = 0
    sync_seconds: float = 0.0
    groups_per_frame: list[int] = field(default_factory=list)


class WalWriter:
    """Appends frames to the newest segment of ``wal_dir``; see the module docstring."""

    def __init__(
        self,
        wal_dir: Path,
        *,
        store_id: int,
        next_lsn: int,
        durability: str,
        segment_max_bytes: int,
        max_frame_bytes: int,
        group_commit_ms: float,
        on_durable: DurableCallback,
        telemetry: Telemetry | None = None,
        preallocate_bytes: int = 0,
    ) -> None:
        self._dir = wal_dir
        self._store_id = store_id
        self._durability = durability
        self._segment_max = segment_max_bytes
        self._max_frame = max_frame_bytes
        self._group_delay = group_commit_ms / 1000.0
        self._prealloc = preallocate_bytes
        self._on_durable = on_durable
        self._mu = threading.Lock()  # queue, LSN bookkeeping, leader flag, waiter gates
        self._gates: dict[int, list[_Gate]] = {}
        """Waiters by the LSN they wait for: each sleeps on its own gate, a lock taken when it
        registers and released to wake it (an Event costs a Condition and a lock to make and
        several lock operations to set: a tenth of an 8-thread put's CPU went to them)."""
        self._io_lock = threading.Lock()  # the file descriptor, rotation and segment list
        self._pending: list[_Group] = []
        self._next_lsn = next_lsn
        self._acked_lsn = next_lsn - 1  # visible to waiters: written (and synced in commit mode)
        self._synced_lsn = next_lsn - 1
        self._written_lsn = next_lsn - 1
        self._leader = False
        self._frame_started = False  # the leader began writing its frame (under _io_lock)
        self._frame_offset = 0  # where that frame starts in the segment
        self._poison: WALWriteError | None = None
        self._closed = False
        self.stats = WalStats()
        self._telemetry = telemetry or Telemetry()
        self._fd = -1
        self._seg_path = Path()
        self._seg_size = 0  # where the next frame goes
        self._alloc_end = 0  # the file's size: [_seg_size, _alloc_end) is zero-filled
        self._salt = b""
        self._segments: list[tuple[int, Path]] = list_segments(wal_dir)
        self._open_segment(next_lsn)
        self._syncer: threading.Thread | None = None
        self._stop = threading.Event()
        if durability == "group":
            self._syncer = threading.Thread(
                target=self._sync_loop, name="xpstore-wal-sync", daemon=True
            )
            self._syncer.start()

    # ------------------------------------------------------------------ public
    @property
    def next_lsn(self) -> int:
        return self._next_lsn

    @property
    def acked_lsn(self) -> int:
        return self._acked_lsn

    @property
    def poisoned(self) -> WALWriteError | None:
        return self._poison

    def append(self, ops: list[bytes]) -> tuple[int, int]:
        """Queue ``ops`` as one atomic group; return its (first, last) LSN. Not yet durable."""
        nbytes = frame_size(ops)
        if nbytes > self._max_frame:
            raise RecordTooLargeError(
                f"a batch of {len(ops)} operations encodes to {nbytes} bytes, over "
                f"max_frame_bytes={self._max_frame}; split it into smaller put_many calls",
                field="records",
            )
        with self._mu:
            self._check_usable()
            first = self._next_lsn
            self._next_lsn += len(ops)
            self._pending.append(_Group(first, ops, nbytes))
        return first, first + len(ops) - 1

    def wait(self, lsn: int, timeout: float | None = None) -> None:
        """Block until ``lsn`` is acknowledged (per the durability mode); lead a flush if idle.

        Each waiter sleeps on its own gate: a finished flush wakes only the writers it covered
        and, when more work is queued, the oldest remaining waiter to lead the next flush, so
        writers whose records are not yet written are not woken in vain. With ``timeout`` (in
        seconds) a wait that outlasts it raises WALWriteError (``close`` uses that).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._mu:
                if self._acked_lsn >= lsn:
                    return
                if self._poison is not None:
                    raise self._poison
                if not self._leader and self._pending:
                    self._leader = True
                    groups, self._pending = self._pending, []
                    gate = None
                else:
                    gate = _new_gate()
                    gate.acquire()
                    waiting = self._gates.get(lsn)
                    if waiting is None:
                        self._gates[lsn] = [gate]
                    else:
                        waiting.append(gate)
            if gate is None:
                self._lead(groups)
            elif deadline is None:
                gate.acquire()
            elif not gate.acquire(timeout=max(0.0, deadline - time.monotonic())):
                with self._mu:
                    waiting = self._gates.get(lsn)
                    if waiting is not None and gate in waiting:
                        waiting.remove(gate)
                        if not waiting:
                            del self._gates[lsn]
                raise WALWriteError(
                    f"timed out after {timeout:g} s waiting for the WAL to acknowledge LSN {lsn} "
                    f"(acknowledged up to {self._acked_lsn}): a flush has not finished, the disk "
                    f"may be hung ({self._seg_path.name}). Operations not acknowledged are not "
                    "lost if they reached the file: a reopen recovers whatever the log holds."
                )

    def sync(self) -> None:
        """fdatasync everything written so far (close, checkpoint, group-mode timer)."""
        with self._io_lock:
            self._sync_locked()

    def close(self, timeout: float | None = None) -> None:
        """Flush what is pending, sync, stop the timer thread, close the segment.

        Waits at most ``timeout`` seconds (default ``CLOSE_TIMEOUT_S``) for the last flush; if
        it does not finish (a hung disk), the log is poisoned, the writer is closed as far as it
        can be, and WALWriteError says so: a close never waits forever.
        """
        if self._closed:
            return
        limit = CLOSE_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._mu:
            last = self._next_lsn - 1
        stuck: WALWriteError | None = None
        try:
            if self._poison is None:
                try:
                    self.wait(last, timeout=limit)
                    if self._durability != "none":
                        self.sync()
                except WALWriteError as exc:
                    if self._poison is None:  # timed out: nothing may be written after this
                        stuck = exc
                        with self._mu:
                            self._poison = exc
                            self._wake_all_locked()
                    else:
                        log.exception("WAL flush at close failed; acknowledged data is still safe")
        finally:
            self._stop.set()
            if self._syncer is not None:
                self._syncer.join(max(0.0, deadline - time.monotonic()))
            if self._io_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                try:
                    if self._fd >= 0:
                        fs.close(self._fd)
                        self._fd = -1
                finally:
                    self._io_lock.release()
            else:
                log.error("WAL segment %s left open: a flush still holds it", self._seg_path)
            self._closed = True
        if stuck is not None:
            raise stuck

    def segments(self) -> list[tuple[int, Path]]:
        """(first_lsn, path) of every live segment, oldest first; the last one is active."""
        with self._io_lock:
            return list(self._segments)

    def remove_segments_through(
        self, applied_lsn: int, keep: int = 0, retain_seconds: float = 0.0
    ) -> list[Path]:
        """Delete segments whose every LSN is <= ``applied_lsn``, keeping the newest ``keep``.

        The caller must have synced LMDB first: after this, those LSNs live only in LMDB.
        """
        removed: list[Path] = []
        with self._io_lock:
            closed = self._segments[:-1]  # never the active segment
            deletable = [
                seg
                for seg, nxt in zip(closed, self._segments[1:], strict=False)
                if nxt[0] - 1 <= applied_lsn
            ]
            if keep:
                deletable = deletable[:-keep] if len(deletable) > keep else []
            if retain_seconds > 0:  # keep what a point-in-time restore may still need
                cutoff = time.time() - retain_seconds
                old = 0  # a prefix only: never leave a gap in the log
                while old < len(deletable) and _mtime(deletable[old][1]) < cutoff:
                    old += 1
                deletable = deletable[:old]
            if deletable:
                crash_point("checkpoint.before_unlink")
            for _first, path in deletable:
                fs.unlink(path, missing_ok=True)
                removed.append(path)
                crash_point("checkpoint.after_unlink")
            if removed:
                fs.fsync_dir(self._dir)
                self._segments = [s for s in self._segments if s[1] not in removed]
        return removed

    # ----------------------------------------------------------------- leader
    def _lead(self, groups: list[_Group]) -> None:
        first = groups[0].first_lsn
        last = groups[-1].first_lsn + len(groups[-1].ops) - 1
        error: WALWriteError | None = None
        try:
            with self._io_lock:
                self._frame_started = False
                self._write_groups(groups)
                self._written_lsn = last
                if self._durability == "commit":
                    self._sync_locked()
                if self._seg_size >= self._segment_max:
                    self._rotate(last + 1)
        except WALWriteError as exc:
            error = exc
        except BaseException as exc:  # KeyboardInterrupt, SystemExit, MemoryError, a bug
            self._interrupted(groups, exc, started=self._frame_reached_file())
            raise
        if error is None:
            # publish to the in-memory state before any waiter returns (read your writes)
            try:
                self._on_durable(first, last)
            except BaseException as exc:
                self._interrupted(groups, exc, started=True)
                raise
        with self._mu:
            self._leader = False
            if error is not None:
                self._poison = error
                self._wake_all_locked()
                return
            self._acked_lsn = last
            gates = self._gates
            for key in [k for k in gates if k <= last]:
                for gate in gates.pop(key):
                    gate.release()
            if self._pending and gates:
                self._wake_oldest_locked()  # it leads the next flush

    def _frame_reached_file(self) -> bool:
        """After an interrupted flush: whether any byte of its frame may be in the segment.

        Frames are written at the write position: in an append-only segment a write that got
        anything in moved the file's end past it; in a preallocated one it changed the zeros
        there.
        """
        if not self._frame_started:
            return False
        try:
            if self._prealloc <= 0:
                return os.fstat(self._fd).st_size != self._frame_offset
            # preallocated: the space was zeros, and a frame's first 8 bytes (crc, length) never
            # are, since the length is at least 4; a write that got in wrote them first
            return any(fs.pread(self._fd, 8, self._frame_offset))
        except OSError:
            return True

    def _interrupted(self, groups: list[_Group], exc: BaseException, *, started: bool) -> None:
        """The leader's flush was cut short by ``exc``: hand it on, or poison the log."""
        first = groups[0].first_lsn
        last = groups[-1].first_lsn + len(groups[-1].ops) - 1
        with self._mu:
            self._leader = False
            if not started:  # nothing reached the file: the next waiter writes these groups
                self._pending[:0] = groups
                if self._gates:
                    self._wake_oldest_locked()
                log.warning("WAL flush of LSNs %d..%d interrupted (%s) before writing; handed on",
                            first, last, type(exc).__name__)  # fmt: skip
                return
            if self._poison is None:
                self._poison = WALWriteError(
                    f"the WAL flush of LSNs {first}..{last} was interrupted "
                    f"({type(exc).__name__}) after its frame began to reach "
                    f"{self._seg_path.name}; the log refuses further writes, since that frame may "
                    "be whole or torn. Operations acknowledged before are safe; reopen the store "
                    "to recover them (the interrupted ones are recovered if they reached the file)."
                )
            self._wake_all_locked()

    def _write_groups(self, groups: list[_Group]) -> None:
        now = time.time()
        frames: list[bytes] = []
        batch: list[bytes] = []
        batch_first = groups[0].first_lsn
        batch_bytes = FRAME_HEADER_SIZE
        for group in groups:
            if batch and batch_bytes + group.nbytes > self._max_frame:
                frames.append(encode_frame(self._salt, batch_first, batch, now))
                batch, batch_first, batch_bytes = [], group.first_lsn, FRAME_HEADER_SIZE
            batch.extend(group.ops)
            batch_bytes += group.nbytes
        frames.append(encode_frame(self._salt, batch_first, batch, now))
        data = b"".join(frames) if len(frames) > 1 else frames[0]
        offset = self._seg_size
        try:
            end = offset + len(data)
            if end > self._alloc_end:
                if len(data) >= _APPEND_FRAME:  # a large frame extends the file itself
                    self._alloc_end = end
                else:
                    self._extend(end)
            self._frame_started, self._frame_offset = True, offset  # see _frame_reached_file
            fs.pwrite_all(self._fd, data, offset)
        except OSError as exc:
            raise self._write_error("write", exc, offset) from exc
        self._seg_size += len(data)
        self.stats.frames += len(frames)
        self.stats.ops += sum(len(g.ops) for g in groups)
        self.stats.bytes += len(data)
        self._telemetry.observe("wal.commit_writers", len(groups))  # writers sharing this write
        self._telemetry.incr("wal.bytes", len(data))

    def _extend(self, end: int) -> None:
        """Grow the segment to hold a frame ending at ``end``.

        Without preallocation the frame itself extends the file (an append). With it, zeros are
        written ahead of the frame up to a window of ``preallocate_bytes`` (growing from 64 KiB
        with the segment, never past ``segment_max_bytes`` unless the frame needs it), so the
        commits that follow overwrite allocated, already-written blocks and their fdatasync has
        no file size or extent to update. The zeros ride on the next commit's sync; a crash
        before it leaves zeros or a shorter file, both the end of the log (docs/formats.md).
        """
        if self._prealloc <= 0:
            return
        step = min(self._prealloc, max(_MIN_PREALLOC, self._alloc_end))
        target = max(end, min(self._alloc_end + step, self._segment_max))
        target = (target + _PAGE - 1) // _PAGE * _PAGE
        zero_from = max(self._alloc_end, end)
        if target > zero_from:
            fs.pwrite_all(self._fd, bytes(target - zero_from), zero_from)
            crash_point("wal.preallocate.after_zeros")
        self._alloc_end = target

    def _sync_locked(self) -> None:
        if self._synced_lsn >= self._written_lsn or self._fd < 0:
            return
        target = self._written_lsn
        start = time.perf_counter()
        try:
            fs.fdatasync(self._fd)
        except OSError as exc:
            err = self._write_error("fdatasync", exc, self._seg_size)
            with self._mu:
                self._poison = err
                self._wake_all_locked()
            raise err from exc
        elapsed = time.perf_counter() - start
        self.stats.syncs += 1
        self.stats.sync_seconds += elapsed
        self._telemetry.observe("wal.fsync", elapsed)
        self._synced_lsn = target

    def _write_error(self, what: str, exc: OSError, offset: int) -> WALWriteError:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        hint = "free disk space, then " if exc.errno == errno.ENOSPC else ""
        return WALWriteError(
            f"WAL {what} failed ({name}: {exc.strerror}) on segment {self._seg_path.name} near "
            f"offset {offset}; the log is poisoned and refuses further writes (a failed sync is "
            f"never retried). Nothing of the failed batch was acknowledged; {hint}reopen the "
            "store to recover every acknowledged record."
        )

    # ------------------------------------------------------------ segments
    def _open_segment(self, first_lsn: int) -> None:
        """Create ``<first_lsn>.wal`` atomically: temp file, header, sync, rename, dir sync."""
        name = segment_name(first_lsn)
        final = self._dir / name
        tmp = self._dir / (name + ".tmp")
        salt = secrets.randbits(32)
        flags = FLAG_PREALLOCATED if self._prealloc > 0 else 0
        header = encode_header(self._store_id, salt, first_lsn, time.time(), flags)
        try:
            fs.write_file(tmp, header)  # fdatasynced before the rename makes it visible
            fs.replace(tmp, final)
            fs.fsync_dir(self._dir)
        except OSError as exc:
            raise self._write_error("segment create", exc, 0) from exc
        self._fd = fs.open_file(final, os.O_RDWR)
        self._seg_path = final
        self._seg_size = self._alloc_end = len(header)
        self._salt = salt.to_bytes(4, "little")
        self._segments.append((first_lsn, final))

    def _rotate(self, next_first: int) -> None:
        if self._durability != "none":
            self._sync_locked()
        fs.close(self._fd)
        self._fd = -1
        self._open_segment(next_first)
        crash_point("wal.rotate.after_create")
        self.stats.rotations += 1
        log.debug("WAL rotated to %s", self._seg_path.name)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self._group_delay):
            if self._poison is not None:
                return
            try:
                self.sync()
            except WALWriteError:
                log.exception("background WAL sync failed; the log is poisoned")
                return

    def _wake_all_locked(self) -> None:
        for waiting in self._gates.values():
            for gate in waiting:
                gate.release()
        self._gates.clear()

    def _wake_oldest_locked(self) -> None:
        """Wake one waiter of the lowest LSN waited for (it leads, or waits again)."""
        key = min(self._gates)
        waiting = self._gates[key]
        waiting.pop(0).release()
        if not waiting:
            del self._gates[key]

    def _check_usable(self) -> None:
        if self._poison is not None:
            raise self._poison
        if self._closed:
            raise WALWriteError("the WAL is closed")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")


def list_segments(wal_dir: Path) -> list[tuple[int, Path]]:
    """``(first_lsn, path)`` of every segment in ``wal_dir``, oldest first.

    The first LSN comes from the file name (``<first_lsn:020d>.wal``); temporaries and
    ``.broken`` copies do not match and are left out. The writer and every reader list the log
    the same way through this one function.
    """
    out = []
    for entry in wal_dir.iterdir():
        m = SEGMENT_NAME_RE.match(entry.name)
        if m:
            out.append((int(m.group(1)), entry))
    out.sort()
    return out
