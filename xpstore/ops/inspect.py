"""Read-only inspection of a store: the WAL segment by segment, a salvage walk over the log, and
the integrity checks behind ``xpstore verify`` and ``Store.check()``.

Everything here takes paths (or an already open :class:`LmdbTables`), not a ``Store``, so it
works on a store that does not open (a damaged WAL, a newer config) and while another process
holds the writer lock. Nothing is ever written: WAL files are read whole through the fs seam,
LMDB only through read transactions (``lock=True``: a reader slot, never a page).

Three layers:

- :func:`inspect_wal`: per segment (and per ``.broken`` copy) what
  :func:`~xpstore.persistence.wal_format.scan_segment` finds: LSN range, frames, commit times,
  the first bad frame and where valid frames resume.
- :class:`WalWalk`: the whole log in LSN order in salvage fashion: valid frames, and a
  :class:`WalDamage` for every unreadable stretch (resynchronizing at the next valid frame with
  :func:`~xpstore.persistence.wal_format.find_valid_frame`), each naming its segment, offset and
  the LSNs it hides. ``verify`` reports the damage; ``replay`` streams around it.
- :func:`check_store`: every check of DESIGN §4 (WAL, LMDB records, indexes, counts,
  ``applied_lsn``, snapshot manifests), collected as :class:`Problem` entries.

Concurrency with a live writer: record checks run in short read transactions of
``CHECK_BATCH`` records, each consistent in itself; the cross-table checks (index <-> records,
counts, tracks, tombstones) run in one read transaction, so a writer applying meanwhile cannot
produce a false report. A bad tail of the last segment while a writer is live is the frame being
written, not damage, and is reported as a note.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from xpstore.config import StoreConfig
from xpstore.errors import (
    FormatVersionError,
    InvalidRecordError,
    SnapshotError,
    XpStoreError,
)
from xpstore.model.codec import KIND_BY_CODE, decode_envelope, decode_op
from xpstore.model.records import Fingerprint
from xpstore.ops import snapshots as snap_mod
from xpstore.persistence import fs
from xpstore.persistence.layout import Layout, read_marker
from xpstore.persistence.lmdb_tables import LmdbTables, from_u64, index_key, u64
from xpstore.persistence.wal import list_segments
from xpstore.persistence.wal_format import (
    HEADER_SIZE,
    SEGMENT_NAME_RE,
    Frame,
    FrameError,
    HeaderError,
    SegmentHeader,
    decode_frame,
    decode_header,
    find_valid_frame,
    scan_segment,
)

log = logging.getLogger(__name__)

FRAME_CAP = 1024 * 1024 * 1024
"""The largest ``max_frame_bytes`` a config may set: the frame limit when the config is unknown."""
CHECK_BATCH = 5000
"""Records decoded per read transaction by the record check (short transactions)."""
_BROKEN_RE = re.compile(r"^(\d{20})\.wal\.\d+\.broken$")
_TMP_RE = re.compile(r"^(\d{20})\.wal\.tmp$")
_STRUCTURAL = frozenset(
    {"foreign_segment", "name_mismatch", "missing_segment", "lsn_overlap", "lsn_gap",
     "newer_version"}
)
_TS = struct.Struct(">d")
_MAX_RELISTS = 1000  # a writer rotating faster than segments can be read: stop somewhere


# ============================================================================ wal inspect


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """One valid frame as ``wal inspect --frames`` lists it."""

    offset: int
    first_lsn: int
    count: int
    size: int
    commit_time: float

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + self.count - 1


@dataclass(slots=True)
class SegmentReport:
    """What one WAL file holds; ``role`` is ``segment``, ``broken`` (a recovery copy) or ``tmp``."""

    name: str
    role: str
    size: int
    first_lsn: int | None  # from the header (the file name when the header is unreadable)
    last_lsn: int | None  # of the last valid frame; None without frames
    frames: int
    first_commit: float | None
    last_commit: float | None
    store_id: int | None = None
    salt: int | None = None
    created: float | None = None
    version: int | None = None
    bad_offset: int | None = None  # the first bad frame (or 0: the header)
    bad_reason: str | None = None
    bad_detail: str | None = None
    resumes_at: int | None = None  # next valid frame after the bad one, if any
    problems: list[str] = field(default_factory=list)  # foreign store, LSN discontinuity, ...
    frame_list: list[FrameInfo] | None = None

    @property
    def ok(self) -> bool:
        return self.bad_reason is None and not self.problems

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        if self.frame_list is None:
            del out["frame_list"]
        return out


def inspect_wal(
    wal_dir: Path,
    *,
    store_id: int | None = None,
    with_frames: bool = False,
    max_frame_bytes: int = FRAME_CAP,
) -> list[SegmentReport]:
    """Report every segment of ``wal_dir`` in LSN order, then ``.broken`` and ``.tmp`` files.

    Read-only. ``store_id`` (from the store marker) flags segments of another store. Segments
    are also checked for LSN continuity with the segment before them.
    """
    files = _wal_files(wal_dir)
    reports: list[SegmentReport] = []
    expected: int | None = None
    for role, path in files:
        try:
            data = fs.read_bytes(path)
        except FileNotFoundError:  # removed by a live writer's checkpoint since the listing
            continue
        rep = _segment_report(path, role, data, with_frames, max_frame_bytes)
        if store_id is not None and rep.store_id is not None and rep.store_id != store_id:
            rep.problems.append(
                f"belongs to store {rep.store_id:#x}, not this store ({store_id:#x})"
            )
        if role == "segment":
            expected = _continuity(rep, expected)
        reports.append(rep)
    return reports


def _wal_files(wal_dir: Path) -> list[tuple[str, Path]]:
    if not wal_dir.is_dir():
        return []
    segs = [("segment", p) for _first, p in list_segments(wal_dir)]
    others = sorted(wal_dir.iterdir())
    broken = [("broken", p) for p in others if _BROKEN_RE.match(p.name)]
    tmp = [("tmp", p) for p in others if _TMP_RE.match(p.name)]
    return segs + broken + tmp


def _segment_report(
    path: Path, role: str, data: bytes, with_frames: bool, max_frame: int
) -> SegmentReport:
    scan = scan_segment(path, data, max_frame)
    frames = scan.frames
    name_lsn = _name_lsn(path.name)
    header = scan.header
    rep = SegmentReport(
        name=path.name,
        role=role,
        size=len(data),
        first_lsn=header.first_lsn if header else name_lsn,
        last_lsn=frames[-1].last_lsn if frames else None,
        frames=len(frames),
        first_commit=frames[0].commit_time if frames else None,
        last_commit=frames[-1].commit_time if frames else None,
    )
    if header is not None:
        rep.store_id, rep.salt = header.store_id, header.salt
        rep.created, rep.version = header.created, header.version
        if name_lsn is not None and header.first_lsn != name_lsn:
            rep.problems.append(
                f"header says first LSN {header.first_lsn}, file name says {name_lsn}"
            )
    if scan.error is not None:
        rep.bad_offset = scan.error_offset
        rep.bad_reason = scan.error.reason
        rep.bad_detail = str(scan.error)
        if header is not None and scan.error_offset is not None:
            start = frames[-1].last_lsn + 1 if frames else header.first_lsn
            nxt = find_valid_frame(data, scan.error_offset, header.salt_bytes, start, max_frame)
            rep.resumes_at = nxt.offset if nxt is not None else None
    if with_frames:
        rep.frame_list = [
            FrameInfo(f.offset, f.first_lsn, f.count, f.size, f.commit_time) for f in frames
        ]
    return rep


def _continuity(rep: SegmentReport, expected: int | None) -> int | None:
    """Note an LSN jump or overlap against the previous segment; return the next expected LSN."""
    first = rep.first_lsn
    if rep.store_id is None or first is None:  # unreadable header: nothing to compare
        return expected
    if expected is not None and first > expected:
        rep.problems.append(f"LSNs {expected}..{first - 1} are missing before this segment")
    elif expected is not None and first < expected:
        rep.problems.append(
            f"starts at LSN {first} but the segments before it reach LSN {expected - 1} "
            "(a duplicated or stale segment)"
        )
    return rep.last_lsn + 1 if rep.last_lsn is not None else first


def _name_lsn(name: str) -> int | None:
    m = SEGMENT_NAME_RE.match(name) or _BROKEN_RE.match(name) or _TMP_RE.match(name)
    return int(m.group(1)) if m else None


# ============================================================================ salvage walk


@dataclass(frozen=True, slots=True)
class WalDamage:
    """An unreadable stretch of the log: where, why, and which LSNs it hides.

    ``first_lsn..last_lsn`` are the operations lost there (``last_lsn`` None: up to the end,
    nothing valid follows; ``first_lsn`` None: no operation lost, e.g. garbage between two
    frames that are in sequence). ``torn``: at the very end of the log with nothing valid after
    it. ``concurrent``: explained by a live writer (the frame it is writing right now).
    """

    segment: str
    offset: int
    reason: str
    detail: str
    first_lsn: int | None
    last_lsn: int | None
    torn: bool = False
    concurrent: bool = False

    @property
    def where(self) -> str:
        return f"wal/{self.segment}+{self.offset}"

    def lsn_text(self) -> str:
        if self.first_lsn is None:
            return "no operation lost"
        if self.last_lsn is None:
            return f"LSNs from {self.first_lsn} on unreadable"
        if self.last_lsn < self.first_lsn:
            return "no operation lost"
        return f"LSNs {self.first_lsn}..{self.last_lsn} unreadable"

    def describe(self) -> str:
        if self.concurrent:
            return f"tail being written by the live writer ({self.reason})"
        what = "torn tail: " if self.torn else ""
        return f"{what}{self.reason}: {self.detail}; {self.lsn_text()}"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["where"] = self.where
        return out


@dataclass(frozen=True, slots=True)
class WalFrame:
    """A valid frame found by the walk, with the segment it is in."""

    segment: str
    frame: Frame


@dataclass(slots=True)
class _Pending:
    segment: str
    offset: int
    reason: str
    detail: str
    first_lsn: int | None


@dataclass(slots=True)
class _Tail:
    """Where the scan of the newest segment read so far stopped (a live writer may append)."""

    name: str
    path: Path
    header: SegmentHeader
    offset: int
    stop: _Pending | None  # the damage the scan stopped at, if it stopped early


class WalWalk:
    """Iterate the log in LSN order: :class:`WalFrame` items and :class:`WalDamage` items.

    Damage is yielded when the LSNs it hides are known, i.e. just before the next valid frame
    (or at the end). After the iteration ``first_lsn``/``end_lsn`` are the first and last LSN
    the log covers (None when it holds no segment).

    Beside a live writer (``writer_live``) the log moves while it is read: the newest segment
    grows, new segments appear, checkpoints delete old ones. So after each pass the directory is
    listed again, the segment that was newest is read again from where its scan stopped, and
    the new segments follow; LSNs missing between segments are then marked ``concurrent``
    (checkpointed into LMDB meanwhile), as is a bad tail of the newest segment (being written).
    """

    def __init__(
        self,
        wal_dir: Path,
        *,
        store_id: int | None,
        max_frame_bytes: int = FRAME_CAP,
        writer_live: bool = False,
    ) -> None:
        self.wal_dir = wal_dir
        self.store_id = store_id
        self.max_frame = max_frame_bytes
        self.writer_live = writer_live
        self.first_lsn: int | None = None
        self.end_lsn: int | None = None
        self.segments = 0
        self.frames = 0
        self.vanished: list[str] = []
        self._expected: int | None = None
        self._pending: list[_Pending] = []
        self._valid_after_pending = False
        self._last_listed: int | None = None
        self._last_name: str | None = None
        self._tail: _Tail | None = None

    def __iter__(self) -> Iterator[WalFrame | WalDamage]:
        for _ in range(_MAX_RELISTS):
            segs = self._new_segments()
            if not segs:
                break
            yield from self._reread_tail()
            for name_lsn, path in segs:
                self._last_listed = name_lsn
                try:
                    data = fs.read_bytes(path)
                except FileNotFoundError:  # a live writer's checkpoint removed it: LMDB has it
                    self.vanished.append(path.name)
                    continue
                self.segments += 1
                self._last_name = path.name
                self._tail = None
                yield from self._segment(path, name_lsn, data)
            if not self.writer_live:
                break
        yield from self._finish()

    def _new_segments(self) -> list[tuple[int, Path]]:
        """Segments not listed yet (after the first pass: only with a live writer)."""
        if not self.wal_dir.is_dir():
            return []
        segs = list_segments(self.wal_dir)
        if self._last_listed is None:
            return segs
        return [s for s in segs if s[0] > self._last_listed]

    def _reread_tail(self) -> Iterator[WalFrame | WalDamage]:
        """Continue the previously newest segment from where its scan stopped."""
        tail = self._tail
        if tail is None:
            return
        self._tail = None
        try:
            data = fs.read_bytes(tail.path)
        except FileNotFoundError:
            self.vanished.append(tail.name)
            return
        if tail.stop is not None and tail.stop in self._pending:
            self._pending.remove(tail.stop)  # looked again below
        yield from self._frames(tail.name, tail.path, data, tail.header, tail.offset)

    def _segment(self, path: Path, name_lsn: int, data: bytes) -> Iterator[WalFrame | WalDamage]:
        name = path.name
        try:
            header = decode_header(data)
        except HeaderError as exc:
            self._damage(name, 0, exc.reason, str(exc), name_lsn)
            return
        problem = self._header_problem(header, name_lsn)
        if problem is not None:
            self._damage(name, 0, *problem, None)
            return
        if self._pending:
            self._valid_after_pending = True
        if self.first_lsn is None:
            self.first_lsn = header.first_lsn
        if self._expected is None:
            self._expected = header.first_lsn
        elif header.first_lsn > self._expected and not self._pending:
            yield WalDamage(
                name, 0, "missing_segment",
                f"segment starts at LSN {header.first_lsn}, the log before it ends at LSN "
                f"{self._expected - 1}",
                self._expected, header.first_lsn - 1,
                concurrent=self.writer_live,  # checkpointed while being read: LMDB holds them
            )
            self._expected = header.first_lsn
        yield from self._frames(name, path, data, header, HEADER_SIZE)

    def _header_problem(self, header: SegmentHeader, name_lsn: int) -> tuple[str, str] | None:
        if self.store_id is not None and header.store_id != self.store_id:
            return "foreign_segment", (
                f"segment belongs to store {header.store_id:#x}, not this store "
                f"({self.store_id:#x})"
            )
        if header.first_lsn != name_lsn:
            return "name_mismatch", (
                f"header says first LSN {header.first_lsn}, file name says {name_lsn}"
            )
        return None

    def _frames(
        self, name: str, path: Path, data: bytes, header: SegmentHeader, offset: int
    ) -> Iterator[WalFrame | WalDamage]:
        view = memoryview(data)
        salt = header.salt_bytes
        overlap_reported = False
        stop: _Pending | None = None
        while offset < len(data):
            expected = self._expected
            assert expected is not None
            try:
                frame = decode_frame(view, offset, salt, self.max_frame)
            except FrameError as exc:
                pending = self._damage(name, offset, exc.reason, str(exc), expected)
                nxt = find_valid_frame(data, offset, salt, expected, self.max_frame)
                if nxt is None:
                    stop = pending
                    break
                offset = nxt.offset
                continue
            if frame.first_lsn < expected:
                if not overlap_reported:
                    overlap_reported = True
                    yield WalDamage(
                        name, offset, "lsn_overlap",
                        f"frame has LSNs {frame.first_lsn}..{frame.last_lsn}, already read up "
                        f"to {expected - 1} (a duplicated or stale segment); skipped",
                        None, None,
                    )
                offset += frame.size
                continue
            yield from self._resolve(name, offset, frame.first_lsn)
            self.frames += 1
            self._expected = frame.last_lsn + 1
            yield WalFrame(name, frame)
            offset += frame.size
        self._tail = _Tail(name, path, header, offset, stop)

    def _resolve(self, name: str, offset: int, first_lsn: int) -> Iterator[WalDamage]:
        """Pending damage ends before this frame: now its LSN range is known."""
        expected = self._expected
        assert expected is not None
        if not self._pending:
            if first_lsn > expected:
                yield WalDamage(
                    name, offset, "lsn_gap",
                    f"frame starts at LSN {first_lsn}, expected {expected}",
                    expected, first_lsn - 1,
                )
            return
        for i, p in enumerate(self._pending):
            lost = i == 0 and first_lsn > expected
            yield WalDamage(
                p.segment, p.offset, p.reason, p.detail,
                expected if lost else None, first_lsn - 1 if lost else None,
            )
        self._pending.clear()
        self._valid_after_pending = False

    def _damage(
        self, name: str, offset: int, reason: str, detail: str, first_lsn: int | None
    ) -> _Pending:
        start = self._expected if self._expected is not None else first_lsn
        pending = _Pending(name, offset, reason, detail, start)
        self._pending.append(pending)
        return pending

    def _finish(self) -> Iterator[WalDamage]:
        last_name = self._last_name
        for i, p in enumerate(self._pending):
            torn = (
                not self._valid_after_pending
                and p.reason not in _STRUCTURAL
                and p.segment == last_name
            )
            yield WalDamage(
                p.segment, p.offset, p.reason, p.detail,
                p.first_lsn if i == 0 else None, None,
                torn=torn, concurrent=torn and self.writer_live,
            )
        self._pending.clear()
        if self._expected is not None:
            self.end_lsn = self._expected - 1


# ============================================================================ checks


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding of a check: ``where`` (segment+offset, table and key, file) and ``what``."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass(slots=True)
class CheckReport:
    """The outcome of ``verify`` / ``Store.check()``: problems (not ok) and notes (fine)."""

    path: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, what: str) -> None:
        self.problems.append(Problem(where, what))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckReport:
        """Inverse of :meth:`as_dict` (``xpstore verify`` reads its child's report)."""
        problems = [Problem(str(p["where"]), str(p["what"])) for p in data["problems"]]
        return cls(str(data["path"]), problems, [str(n) for n in data["notes"]],
                   dict(data["stats"]))

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "problems": [{"where": p.where, "what": p.what} for p in self.problems],
            "notes": self.notes,
            "stats": self.stats,
        }


Progress = Callable[[int], None]


def writer_pid(root: Path) -> int | None:
    """The pid of the process holding the store's writer lock, or None when nobody holds it.

    Read-only: taking the lock, even for a moment, could make a starting writer fail. On Linux
    ``/proc/locks`` names the holder of the ``flock`` on the LOCK file's inode exactly; elsewhere
    the pid written in LOCK is checked for being alive (a stale or reused pid can fool that).
    """
    lock = Layout(root).lock
    try:
        st = lock.stat()
    except OSError:
        return None
    try:
        table = fs.read_bytes("/proc/locks").decode("ascii", "replace")
    except OSError:
        return _pid_from_lock_file(lock)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        parts = line.split()
        # "3: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (blocked waiters have a "->" field)
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
            return int(parts[4]) if parts[4].isdigit() else None
    return None


def _pid_from_lock_file(lock: Path) -> int | None:
    try:
        text = fs.read_bytes(lock).decode().strip()
        pid = int(text) if text else 0
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def verify_store(root: Path, *, progress: Progress | None = None,
                 total: Callable[[int], None] | None = None) -> CheckReport:
    """Every check on the store at ``root``, opened read-only; see :func:`check_store`.

    Raises StoreNotFoundError / FormatVersionError when ``root`` is not a readable store.
    """
    lay = Layout(root)
    marker = read_marker(lay)
    report = CheckReport(str(root))
    tables: LmdbTables | None = None
    try:
        tables = LmdbTables(lay.data, readonly=True, map_size=StoreConfig().map_size)
    except (XpStoreError, lmdb.Error) as exc:
        report.add(f"lmdb {lay.data}", f"cannot be opened read-only: {exc}")
    try:
        pid = writer_pid(root)
        check_store(
            root, tables=tables, store_id=marker.store_id, writer_live=pid is not None,
            report=report, progress=progress, total=total,
        )
    finally:
        if tables is not None:
            tables.close()
    return report


def check_store(
    root: Path,
    *,
    tables: LmdbTables | None,
    store_id: int,
    writer_live: bool,
    config: StoreConfig | None = None,
    report: CheckReport | None = None,
    progress: Progress | None = None,
    total: Callable[[int], None] | None = None,
) -> CheckReport:
    """Run the WAL, LMDB and snapshot checks; never writes anything.

    ``tables``: the store's LMDB (None when it could not be opened; its checks are skipped).
    ``total(n)`` is called once with the number of records, ``progress(k)`` after each batch.
    """
    report = report or CheckReport(str(root))
    lay = Layout(root)
    if writer_live:
        report.notes.append("a live writer holds the lock; checked what it has written so far")
    applied_before: int | None = None
    if tables is not None:
        config = config or _stored_config(tables, report)
        applied_before = _applied(tables)
    max_frame = config.max_frame_bytes if config is not None else FRAME_CAP
    walk = check_wal(lay.wal, store_id=store_id, max_frame_bytes=max_frame,
                     writer_live=writer_live, report=report)
    if tables is not None:
        assert applied_before is not None
        try:
            _check_applied(walk, applied_before, _applied(tables), report)
            check_lmdb(tables, report, progress=progress, total=total)
        except (lmdb.Error, XpStoreError) as exc:  # a damaged page: report, go on with the rest
            report.add(f"lmdb {lay.data}", f"reading failed: {type(exc).__name__}: {exc}")
    snap_dir = snap_mod.snapshot_root(root, config.snapshot_dir if config else None)
    check_snapshots(snap_dir, store_id, report)
    return report


def _applied(tables: LmdbTables) -> int:
    with tables.reading() as txn:
        return tables.applied_lsn(txn)


def _stored_config(tables: LmdbTables, report: CheckReport) -> StoreConfig | None:
    with tables.reading() as txn:
        raw = tables.get_meta(txn, "config")
    if raw is None:
        report.add("lmdb meta config", "missing (every store persists its config at creation)")
        return None
    try:
        return StoreConfig.from_json(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        report.add("lmdb meta config", f"does not parse as a StoreConfig: {exc}")
        return None


# ---------------------------------------------------------------------------- WAL


def check_wal(
    wal_dir: Path,
    *,
    store_id: int,
    max_frame_bytes: int,
    writer_live: bool,
    report: CheckReport,
) -> WalWalk:
    """Checksums and LSN continuity of every segment; every operation decodes (shape check)."""
    walk = WalWalk(wal_dir, store_id=store_id, max_frame_bytes=max_frame_bytes,
                   writer_live=writer_live)
    ops = 0
    for item in walk:
        if isinstance(item, WalDamage):
            if item.concurrent:
                report.notes.append(f"{item.where}: {item.describe()}")
            else:
                report.add(item.where, item.describe())
            continue
        for i, raw in enumerate(item.frame.ops()):
            ops += 1
            try:
                decode_op(raw, validate=False)
            except (ValueError, TypeError, KeyError) as exc:  # CodecError is a ValueError
                lsn = item.frame.first_lsn + i
                report.add(
                    f"wal/{item.segment}+{item.frame.offset}",
                    f"LSN {lsn}: operation does not decode: {exc}",
                )
    if walk.vanished:
        report.notes.append(
            f"{len(walk.vanished)} segments were removed by a checkpoint while being checked"
        )
    for name in sorted(p.name for p in wal_dir.glob("*.broken")) if wal_dir.is_dir() else []:
        report.notes.append(f"wal/{name}: a copy kept by an earlier recovery")
    report.stats["wal"] = {
        "segments": walk.segments, "frames": walk.frames, "ops": ops,
        "first_lsn": walk.first_lsn, "end_lsn": walk.end_lsn,
    }
    return walk


def _check_applied(walk: WalWalk, before: int, after: int, report: CheckReport) -> None:
    """applied_lsn <= the WAL's end, and no LSN in neither LMDB nor the WAL.

    ``before`` was read before the WAL and ``after`` after it: applied_lsn only grows, and a
    live writer's checkpoint deletes segments only below it, so neither check can misfire.
    """
    report.stats["applied_lsn"] = after
    if walk.end_lsn is not None and before > walk.end_lsn:
        report.add(
            "lmdb meta applied_lsn",
            f"{before} is beyond the end of the WAL (LSN {walk.end_lsn}): the WAL lost "
            "operations LMDB has, or a segment is missing",
        )
    if walk.first_lsn is not None and walk.first_lsn > after + 1:
        report.add(
            "wal",
            f"LSNs {after + 1}..{walk.first_lsn - 1} are in neither LMDB (applied_lsn {after}) "
            f"nor the WAL (first segment starts at LSN {walk.first_lsn})",
        )


# ---------------------------------------------------------------------------- LMDB


def check_lmdb(
    tables: LmdbTables,
    report: CheckReport,
    *,
    progress: Progress | None = None,
    total: Callable[[int], None] | None = None,
) -> None:
    """Every record decodes and validates; indexes, tracks, tombstones and counts agree."""
    with tables.reading() as txn:
        n_records = txn.stat(tables.db(b"records"))["entries"]
    if total is not None:
        total(n_records)
    bad_ids = _check_records(tables, report, progress)
    _check_cross_tables(tables, report, bad_ids)


def _check_records(tables: LmdbTables, report: CheckReport, progress: Progress | None) -> set[int]:
    """Decode every record with full validation, in batches of short read transactions."""
    bad: set[int] = set()
    start = b""
    checked = 0
    while True:
        with tables.reading() as txn:
            count, last_key = _record_batch(tables, txn, start, report, bad)
        checked += count
        if progress is not None and count:
            progress(count)
        if count < CHECK_BATCH or last_key is None:
            break
        start = last_key + b"\0"  # the smallest key after it
    report.stats["records"] = checked
    return bad


def _record_batch(
    tables: LmdbTables, txn: Any, start: bytes, report: CheckReport, bad: set[int]
) -> tuple[int, bytes | None]:
    """Check up to CHECK_BATCH records with key >= start; (count, last key checked)."""
    applied = tables.applied_lsn(txn)
    cur = txn.cursor(db=tables.db(b"records"))
    if not cur.set_range(start):
        return 0, None
    count = 0
    last: bytes | None = None
    for key, value in cur.iternext():
        if count >= CHECK_BATCH:
            break
        count += 1
        last = bytes(key)
        if len(last) != 8:
            report.add(f"lmdb records key={last.hex()}", "key is not a u64 id")
            continue
        _check_record(tables, txn, from_u64(last), value, applied, report, bad)
    return count, last


def _check_record(
    tables: LmdbTables, txn: Any, rid: int, value: bytes, applied: int, report: CheckReport,
    bad: set[int],
) -> None:
    where = f"lmdb records id={rid}"
    try:
        exp = decode_envelope(rid, value, validate=True)
    except (ValueError, TypeError, KeyError) as exc:  # CodecError is a ValueError
        bad.add(rid)
        report.add(where, f"does not decode: {exc}")
        return
    if rid > applied:
        report.add(where, f"id is above applied_lsn {applied}")
    if not rid <= exp.updated_lsn <= applied:
        report.add(where, f"updated_lsn {exp.updated_lsn} is not in {rid}..{applied}")
    if exp.record.ts is not None and exp.record.ts != exp.ts:
        report.add(where, f"envelope ts {exp.ts!r} differs from the record's ts {exp.record.ts!r}")
    code = _KIND_CODE[exp.kind]
    if txn.get(index_key(code, exp.ts, rid), db=tables.db(b"by_kind_ts")) is None:
        report.add(where, f"no by_kind_ts entry for ({exp.kind}, ts={exp.ts!r}, id={rid})")
    if isinstance(exp.record, Fingerprint):
        track = exp.record.track_id.encode()
        if (
            txn.get(track, db=tables.db(b"tracks")) is None
            and txn.get(track, db=tables.db(b"track_tombs")) is None
        ):
            report.add(
                where,
                f"fingerprint of track {exp.record.track_id!r}, which is neither in tracks "
                "nor in track_tombs",
            )


_KIND_CODE = {kind: code for code, kind in KIND_BY_CODE.items()}


def _check_cross_tables(tables: LmdbTables, report: CheckReport, bad_ids: set[int]) -> None:
    """Index -> records, counts, tracks, tombstones: in one read transaction (consistent)."""
    with tables.reading() as txn:
        per_kind = _check_index(tables, txn, report, bad_ids)
        _check_counts(tables, txn, report, per_kind)
        _check_tracks(tables, txn, report, bad_ids)
        _check_tombstones(tables, txn, report)


def _check_index(
    tables: LmdbTables, txn: Any, report: CheckReport, bad_ids: set[int]
) -> Counter[int]:
    records = tables.db(b"records")
    per_kind: Counter[int] = Counter()
    cur = txn.cursor(db=tables.db(b"by_kind_ts"))
    for raw_key in cur.iternext(keys=True, values=False):
        key = bytes(raw_key)
        if len(key) != 17:
            report.add(f"lmdb by_kind_ts key={key.hex()}", "key is not kind|ts|id (17 bytes)")
            continue
        kind, rid = key[0], from_u64(key[9:])
        per_kind[kind] += 1
        where = f"lmdb by_kind_ts kind={KIND_BY_CODE.get(kind, kind)} id={rid}"
        value = txn.get(key[9:], db=records)
        if value is None:
            report.add(where, "index entry without a record")
            continue
        if rid in bad_ids:
            continue  # the record itself is already reported
        head = _envelope_head(bytes(value[:12]))
        if head is None or index_key(head[0], head[1], rid) != key:
            report.add(where, "index entry disagrees with the record's kind or ts")
    return per_kind


def _envelope_head(raw: bytes) -> tuple[int, float] | None:
    """(kind_code, ts) from an envelope's first bytes: ``0x97 1 kind 0xcb <f64 BE>``."""
    if len(raw) < 12 or raw[0] != 0x97 or raw[1] != 1 or raw[3] != 0xCB:
        return None
    return raw[2], _TS.unpack_from(raw, 4)[0]


def _check_counts(
    tables: LmdbTables, txn: Any, report: CheckReport, per_kind: Counter[int]
) -> None:
    try:
        meta = tables.counts(txn)
    except (ValueError, TypeError) as exc:
        report.add("lmdb meta counts", f"does not parse: {exc}")
        meta = {}
    for code in sorted(set(meta) | set(per_kind)):
        name = KIND_BY_CODE.get(code, str(code))
        if meta.get(code, 0) != per_kind.get(code, 0):
            report.add(
                f"lmdb meta counts {name}",
                f"says {meta.get(code, 0)}, the index holds {per_kind.get(code, 0)}",
            )
    n_records = txn.stat(tables.db(b"records"))["entries"]
    n_index = sum(per_kind.values())
    if n_records != n_index:
        report.add("lmdb records", f"{n_records} records but {n_index} by_kind_ts entries")
    report.stats["counts"] = {KIND_BY_CODE.get(k, str(k)): v for k, v in sorted(per_kind.items())}


def _check_tracks(tables: LmdbTables, txn: Any, report: CheckReport, bad_ids: set[int]) -> None:
    records = tables.db(b"records")
    n = 0
    for raw_key, raw_val in txn.cursor(db=tables.db(b"tracks")).iternext():
        n += 1
        track = bytes(raw_key).decode("utf-8", "replace")
        where = f"lmdb tracks {track!r}"
        if len(raw_val) != 8:
            report.add(where, "value is not a u64 id")
            continue
        rid = from_u64(bytes(raw_val))
        value = txn.get(u64(rid), db=records)
        if value is None:
            report.add(where, f"points at id {rid}, which is not a live record")
            continue
        if rid in bad_ids:
            continue
        try:
            obj = msgpack.unpackb(value, raw=False)
            owner = obj[6].get("track_id") if obj[1] == _KIND_CODE["fingerprint"] else None
        except (ValueError, TypeError, IndexError, AttributeError):
            owner = None
        if owner != track:
            report.add(where, f"points at id {rid}, which is not a fingerprint of this track")
    report.stats["tracks"] = n


def _check_tombstones(tables: LmdbTables, txn: Any, report: CheckReport) -> None:
    records = tables.db(b"records")
    for raw_key, raw_val in txn.cursor(db=tables.db(b"tombstones")).iternext():
        if len(raw_key) != 8 or len(raw_val) != 9:
            report.add(f"lmdb tombstones key={bytes(raw_key).hex()}", "malformed entry")
            continue
        if txn.get(raw_key, db=records) is not None:
            report.add(
                f"lmdb tombstones id={from_u64(bytes(raw_key))}", "id is both deleted and live"
            )


# ---------------------------------------------------------------------------- snapshots


def check_snapshots(snap_dir: Path, store_id: int, report: CheckReport) -> None:
    """Every snapshot's manifest parses and every file matches its size and sha256.

    The manifest layout and its checks are :mod:`xpstore.ops.snapshots`' (``scan``,
    ``load``, ``verify``); this only turns their verdicts into problems and notes.
    """
    listing = snap_mod.scan(snap_dir, store_id)
    for name, reason in listing.damaged:
        report.add(f"snapshot {name}", reason)
    for info in listing.snapshots + listing.foreign:
        try:
            snap_mod.verify(snap_mod.load(snap_dir, info.id))
        except (SnapshotError, FormatVersionError, InvalidRecordError) as exc:
            report.add(f"snapshot {info.id}", str(exc))
    for info in listing.foreign:
        report.notes.append(f"snapshot {info.id}: belongs to store {info.store_id:#x}")
    if snap_dir.is_dir():
        for entry in sorted(snap_dir.iterdir()):
            if entry.name.startswith(".") and entry.is_dir():
                report.notes.append(
                    f"{entry}: a snapshot being written or pruned (or left by a crash; never "
                    "listed, removed by the next snapshot)"
                )
    report.stats["snapshots"] = len(listing.snapshots)
