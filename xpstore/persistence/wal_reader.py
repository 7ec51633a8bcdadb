"""The one reader of the WAL: valid frames in LSN order, and typed damage events.

Recovery (every mode), ``wal inspect`` and ``verify``, ``replay`` and point-in-time restore all
read the log through this module, and each puts its own policy on what it yields: stop at the
first damage, truncate a torn tail, skip damage (salvage), or collect it as problems. The reader
has no policy of its own: it never raises for damage it can describe, never writes, and never
decides what damage means for the store.

What :class:`WalReader` yields, in log order:

- a :class:`~xpstore.persistence.wal_format.Frame`: a valid frame that continues the log. LSNs
  only grow: a frame whose LSNs were already read is reported (:class:`LsnOverlap`), not yielded.
  ``reader.segment`` is the file the frame is in.
- a :class:`Damage` event: a segment header that does not decode (:class:`BadHeader`), a segment
  of another store (:class:`ForeignSegment`) or whose header contradicts its file name
  (:class:`NameMismatch`), LSNs that nothing holds (:class:`MissingLsns`), LSNs read twice
  (:class:`LsnOverlap`), a frame that fails validation (:class:`BadFrame`). Each names the
  segment file, the byte offset, the LSN the log was to continue with there, and the LSNs it
  hides, so every caller can word its own message.

Reading goes on past damage as long as anything valid is left: after a bad frame at the next
valid frame of that segment (an 8-byte aligned offset whose LSN is not below the expected one,
:func:`~xpstore.persistence.wal_format.find_valid_frame`); a segment whose header is unreadable
or not this log's is skipped whole. So a damage event is yielded once the LSNs it hides are
known: just before the next valid frame, or at the end of the log (``last_lsn`` None: up to the
end). At the end, ``torn`` marks a bad frame or header in the newest segment with nothing valid
after it: what a crash in the middle of a write leaves, holding nothing that was acknowledged.

:func:`scan_segment` reads one file on its own up to its first bad spot (``wal inspect``'s view
of a segment or a ``.broken`` copy).
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from xpstore.persistence import fs
from xpstore.persistence.wal import list_segments
from xpstore.persistence.wal_format import (
    HEADER_SIZE,
    Frame,
    FrameError,
    HeaderError,
    SegmentHeader,
    decode_frame,
    decode_header,
    find_valid_frame,
    zero_tail,
)

_MAX_RELISTS = 1000  # a writer rotating faster than segments can be read: stop somewhere


# ============================================================================ damage events


@dataclass(frozen=True, slots=True, kw_only=True)
class Damage:
    """A damaged spot of the log; the base of every damage event.

    ``reason`` is a short stable tag, ``detail`` a sentence for people. ``expected_lsn``: the LSN
    the log was to continue with at this spot (None: nothing read yet). ``first_lsn..last_lsn``:
    the LSNs the damage hides (``first_lsn`` None: none; ``last_lsn`` None: up to the end of the
    log). ``torn``: at the end of the newest segment with nothing valid after it.
    """

    segment: Path
    offset: int
    reason: str
    detail: str
    expected_lsn: int | None
    first_lsn: int | None = None
    last_lsn: int | None = None
    torn: bool = False

    @property
    def where(self) -> str:
        """``wal/<segment>+<offset>``: how every report names the spot."""
        return f"wal/{self.segment.name}+{self.offset}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BadHeader(Damage):
    """A segment header that does not decode (truncated, bad magic, checksum, newer version)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForeignSegment(Damage):
    """A segment whose header names another store: it belongs to another log."""

    store_id: int  # the segment's


@dataclass(frozen=True, slots=True, kw_only=True)
class NameMismatch(Damage):
    """A segment whose header's first LSN is not its file name's (e.g. a copy of another)."""

    header_lsn: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MissingLsns(Damage):
    """LSNs that no segment holds and no other damage explains: a segment starting after the
    end of the log before it (offset 0, reason ``missing_segment``: e.g. a deleted segment), or
    a valid frame skipping LSNs (its offset, reason ``lsn_gap``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LsnOverlap(Damage):
    """LSNs read a second time: a segment starting before the end of the log read so far
    (offset 0), or a valid frame holding LSNs already read (skipped; once per segment)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BadFrame(Damage):
    """A frame that fails validation (torn, zeroed, checksum, length, payload).

    ``resume_offset``/``resume_lsn``: the next valid frame of this segment, where reading goes
    on; None when nothing valid follows in this segment.
    """

    resume_offset: int | None
    resume_lsn: int | None


def _open(event: Damage) -> bool:
    """Whether the LSNs this damage hides are found later (the next valid frame closes them)."""
    return not isinstance(event, MissingLsns | LsnOverlap)


def _can_tear(event: Damage) -> bool:
    """A crash mid-write leaves a bad frame or a half-created header, never a newer format."""
    return isinstance(event, BadFrame) or (
        isinstance(event, BadHeader) and event.reason != "newer_version"
    )


def header_damage(
    path: Path,
    header: SegmentHeader,
    *,
    store_id: int | None,
    name_lsn: int | None,
    expected_lsn: int | None = None,
) -> list[Damage]:
    """Why a segment whose header decodes is still not part of this log (empty: it is).

    ``store_id`` / ``name_lsn`` None: that check is not made (a WAL whose store is unknown, a
    file whose name carries no LSN).
    """
    found: list[Damage] = []
    if store_id is not None and header.store_id != store_id:
        found.append(ForeignSegment(
            segment=path, offset=0, reason="foreign_segment", expected_lsn=expected_lsn,
            detail=f"segment belongs to store {header.store_id:#x}, not this store "
                   f"({store_id:#x})",
            store_id=header.store_id,
        ))
    if name_lsn is not None and header.first_lsn != name_lsn:
        found.append(NameMismatch(
            segment=path, offset=0, reason="name_mismatch", expected_lsn=expected_lsn,
            detail=f"header says first LSN {header.first_lsn}, file name says {name_lsn}",
            header_lsn=header.first_lsn,
        ))
    return found


def _bad_header(path: Path, exc: HeaderError, expected_lsn: int | None) -> BadHeader:
    """The event for a header :func:`decode_header` refused, keeping its reason tag."""
    return BadHeader(segment=path, offset=0, reason=exc.reason, detail=str(exc),
                     expected_lsn=expected_lsn)


# ============================================================================ gaps


@dataclass(frozen=True, slots=True)
class Gap:
    """A stretch of history that could not be read from the WAL, and what became of it.

    Salvage (``RecoveryReport.gaps``) and ``replay`` report these. ``where``: the damaged spot
    (``wal/<segment>+<offset>``, or the LMDB record replay could not read). ``first_lsn..last_lsn``:
    the LSNs it hides (``last_lsn`` None: up to the end; ``first_lsn`` None: none).
    ``from_lmdb``: the part LMDB holds (its current state of those records). ``lost``:
    operations that no source holds (not for a torn tail, which was never acknowledged, nor for
    the frame a live writer is writing).
    """

    where: str
    reason: str
    detail: str
    first_lsn: int | None
    last_lsn: int | None
    from_lmdb: tuple[int, int] | None = None
    lost: bool = False
    torn: bool = False
    concurrent: bool = False

    @classmethod
    def of(
        cls, damage: Damage, *, applied_lsn: int, lmdb: bool = True, concurrent: bool = False
    ) -> Gap:
        """The gap ``damage`` leaves when LMDB holds the LSNs up to ``applied_lsn`` (``lmdb``
        False: LMDB cannot be read, so it supplies nothing)."""
        first, last = damage.first_lsn, damage.last_lsn
        from_lmdb: tuple[int, int] | None = None
        lost = False
        if first is not None:
            if lmdb and first <= applied_lsn:
                from_lmdb = (first, applied_lsn if last is None else min(last, applied_lsn))
            lost = (last is None or last > applied_lsn) and not (damage.torn or concurrent)
        return cls(damage.where, damage.reason, damage.detail, first, last, from_lmdb, lost,
                   damage.torn, concurrent)

    def describe(self) -> str:
        """One line for people: what kind of gap, where, which LSNs, what LMDB supplied."""
        if self.first_lsn is None:
            span = "no operation lost"
        elif self.last_lsn is None:
            span = f"LSNs from {self.first_lsn} on"
        else:
            span = f"LSNs {self.first_lsn}..{self.last_lsn}"
        kind = "tail being written by the live writer" if self.concurrent else (
            "torn tail (never acknowledged)" if self.torn else "gap"
        )
        text = f"{kind} at {self.where}: {self.reason}: {self.detail}; {span}"
        if self.from_lmdb is not None:
            a, b = self.from_lmdb
            text += f"; LSNs {a}..{b} taken from LMDB (current state of live records)"
        if self.lost:
            text += "; operations lost"
        return text

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``recover --json``, ``replay --json``)."""
        return {
            "where": self.where,
            "reason": self.reason,
            "detail": self.detail,
            "first_lsn": self.first_lsn,
            "last_lsn": self.last_lsn,
            "from_lmdb": list(self.from_lmdb) if self.from_lmdb else None,
            "lost": self.lost,
            "torn": self.torn,
            "concurrent": self.concurrent,
        }


# ============================================================================ one file


def _read_frames(
    path: Path, data: bytes, header: SegmentHeader, offset: int, expected: int, max_frame: int
) -> Iterator[Frame | BadFrame]:
    """Every valid frame of ``data`` from ``offset``, and a :class:`BadFrame` at each bad spot.

    After a bad spot reading resumes at the next valid frame whose LSN is not below
    ``expected`` (which follows each frame that continues the log): an older frame there would
    be a stale one, and the search must not stop at it. In a preallocated segment, nothing but
    zeros from a frame's offset on is the end of its log, not damage.
    """
    view = memoryview(data)
    salt = header.salt_bytes
    while offset < len(data):
        frame: Frame | None
        try:
            frame = decode_frame(view, offset, salt, max_frame)
        except FrameError as exc:
            if header.preallocated and zero_tail(data, offset):
                return
            frame = find_valid_frame(data, offset, salt, expected, max_frame)
            yield BadFrame(
                segment=path, offset=offset, reason=exc.reason, detail=str(exc),
                expected_lsn=expected,
                resume_offset=frame.offset if frame is not None else None,
                resume_lsn=frame.first_lsn if frame is not None else None,
            )
            if frame is None:
                return
        yield frame
        if frame.first_lsn >= expected:
            expected = frame.last_lsn + 1
        offset = frame.offset + frame.size


@dataclass(slots=True)
class SegmentScan:
    """One WAL file read on its own: its header, its valid frames up to the first bad spot."""

    path: Path
    size: int
    header: SegmentHeader | None
    frames: list[Frame]
    error: BadHeader | BadFrame | None = None  # the first bad spot (offset 0: the header)

    @property
    def end_lsn(self) -> int | None:
        """The LSN after the last valid frame, or the header's first LSN if none."""
        if self.frames:
            return self.frames[-1].last_lsn + 1
        return self.header.first_lsn if self.header else None


def scan_segment(path: Path, data: bytes, max_frame_bytes: int) -> SegmentScan:
    """Read ``data`` (the bytes of ``path``: a segment or a copy of one) up to its end or its
    first bad frame, whose ``resume_offset`` says where valid frames start again."""
    try:
        header = decode_header(data)
    except HeaderError as exc:
        return SegmentScan(path, len(data), None, [], _bad_header(path, exc, None))
    frames: list[Frame] = []
    for item in _read_frames(path, data, header, HEADER_SIZE, header.first_lsn, max_frame_bytes):
        if isinstance(item, BadFrame):
            return SegmentScan(path, len(data), header, frames, item)
        frames.append(item)
    return SegmentScan(path, len(data), header, frames)


# ============================================================================ the log


@dataclass(slots=True)
class _Tail:
    """Where the scan of the newest segment stopped (a live writer may append after it)."""

    path: Path
    header: SegmentHeader
    offset: int
    stop: BadFrame | None  # the damage the scan stopped at, if it stopped early


class WalReader:
    """Iterate the log in ``wal_dir``: :class:`Frame` items and :class:`Damage` events.

    ``store_id``: a segment of another store is :class:`ForeignSegment` (None: not checked).
    ``start_lsn``: the LSN the log must reach back to (LSNs before it are held elsewhere, e.g.
    in LMDB): a log starting after it begins with :class:`MissingLsns`. ``skip_older``: do not
    read the segments that hold only LSNs below ``start_lsn``.

    ``follow``: a live writer owns the directory, so the log moves while it is read: after each
    pass the directory is listed again, the segment that was newest is read on from where its
    scan stopped, and the new segments follow (a checkpoint may delete old ones meanwhile: they
    are listed in ``vanished``).

    While iterating, ``segment`` is the file the last frame came from. Afterwards ``first_lsn``
    and ``end_lsn`` are the first and last LSN the log covers (None: no segment), ``listed`` the
    segments listed (``(first_lsn, path)``) and ``segments_read`` how many were read.
    """

    def __init__(
        self,
        wal_dir: Path,
        *,
        store_id: int | None,
        max_frame_bytes: int,
        start_lsn: int | None = None,
        skip_older: bool = False,
        follow: bool = False,
    ) -> None:
        self.wal_dir = wal_dir
        self.store_id = store_id
        self.max_frame = max_frame_bytes
        self.start_lsn = start_lsn
        self.skip_older = skip_older
        self.follow = follow
        self.segment: Path | None = None
        self.listed: list[tuple[int, Path]] = []
        self.segments_read = 0
        self.vanished: list[str] = []
        self.first_lsn: int | None = None
        self.end_lsn: int | None = None
        self._expected: int | None = None
        self._pending: list[Damage] = []  # damage waiting for the LSNs it hides to be known
        self._valid_after_pending = False  # a valid segment header came after pending damage
        self._last_read: Path | None = None
        self._overlap_in: Path | None = None  # the segment whose overlap was reported
        self._tail: _Tail | None = None

    def __iter__(self) -> Iterator[Frame | Damage]:
        for _ in range(_MAX_RELISTS):
            segs = self._new_segments()
            if not segs:
                break
            yield from self._reread_tail()
            for name_lsn, path in segs:
                yield from self._segment(name_lsn, path)
            if not self.follow:
                break
        yield from self._finish()

    def _new_segments(self) -> list[tuple[int, Path]]:
        """Segments not listed yet: all of them at first (less the older ones with
        ``skip_older``), then, following a live writer, the ones it created since."""
        if not self.wal_dir.is_dir():
            return []
        segs = list_segments(self.wal_dir)
        if self.listed:
            segs = [s for s in segs if s[0] > self.listed[-1][0]]
        elif self.skip_older and self.start_lsn is not None:
            segs = segs[_holding(segs, self.start_lsn) :]
        self.listed += segs
        return segs

    def _reread_tail(self) -> Iterator[Frame | Damage]:
        """Read the previously newest segment on from where its scan stopped."""
        tail, self._tail = self._tail, None
        if tail is None:
            return
        try:
            data = fs.read_bytes(tail.path)
        except FileNotFoundError:
            self.vanished.append(tail.path.name)
            return
        if tail.stop is not None and tail.stop in self._pending:
            self._pending.remove(tail.stop)  # looked at again below
        yield from self._frames(tail.path, data, tail.header, tail.offset)

    def _segment(self, name_lsn: int, path: Path) -> Iterator[Frame | Damage]:
        """Read one listed segment whole (a live writer's later appends: ``_reread_tail``)."""
        try:
            data = fs.read_bytes(path)
        except FileNotFoundError:  # a live writer's checkpoint removed it: LMDB has it
            self.vanished.append(path.name)
            return
        self.segments_read += 1
        self._last_read = path
        self._tail = None
        header = yield from self._header(path, name_lsn, data)
        if header is not None:
            yield from self._frames(path, data, header, HEADER_SIZE)

    def _header(
        self, path: Path, name_lsn: int, data: bytes
    ) -> Generator[Damage, None, SegmentHeader | None]:
        """Decode the header and place the segment in the log; None: it is not part of it."""
        expected = self._expected if self._expected is not None else self.start_lsn
        try:
            header = decode_header(data)
        except HeaderError as exc:
            fallback = expected if expected is not None else name_lsn
            self._pending.append(_bad_header(path, exc, fallback))
            return None
        problems = header_damage(path, header, store_id=self.store_id, name_lsn=name_lsn,
                                 expected_lsn=expected)
        if problems:
            self._pending.append(problems[0])
            return None
        if self._pending:
            self._valid_after_pending = True
        yield from self._place(path, header.first_lsn)
        return header

    def _place(self, path: Path, first: int) -> Iterator[Damage]:
        """Continuity at a segment's start: LSNs missing before it, or already read."""
        if self.first_lsn is None:
            self.first_lsn = first
        expected = self._expected
        if expected is None:
            expected = first if self.start_lsn is None else min(first, self.start_lsn)
        if first > expected and not any(_open(p) for p in self._pending):
            yield from self._emit(MissingLsns(
                segment=path, offset=0, reason="missing_segment", expected_lsn=expected,
                detail=f"LSNs {expected}..{first - 1} are in no segment (this one starts at "
                       f"LSN {first})",
                first_lsn=expected, last_lsn=first - 1,
            ))
            expected = first
        elif first < expected:
            self._overlap_in = path
            yield from self._emit(LsnOverlap(
                segment=path, offset=0, reason="lsn_overlap", expected_lsn=expected,
                detail=f"segment starts at LSN {first} but LSNs up to {expected - 1} were "
                       "already read (a duplicated or stale segment)",
            ))
        self._expected = expected

    def _frames(
        self, path: Path, data: bytes, header: SegmentHeader, offset: int
    ) -> Iterator[Frame | Damage]:
        """The segment's frames from ``offset``; bad frames wait until their LSNs are known."""
        expected = self._expected
        assert expected is not None  # placed by _header
        end, stop = offset, None
        for item in _read_frames(path, data, header, offset, expected, self.max_frame):
            if isinstance(item, BadFrame):
                self._pending.append(item)
                end, stop = item.offset, item
                continue
            end, stop = item.offset + item.size, None
            yield from self._frame(path, item)
        if self.follow:
            self._tail = _Tail(path, header, end, stop)

    def _frame(self, path: Path, frame: Frame) -> Iterator[Frame | Damage]:
        """Yield ``frame`` if it continues the log, after the damage it closes."""
        expected = self._expected
        assert expected is not None
        if frame.first_lsn < expected:
            if self._overlap_in != path:
                self._overlap_in = path
                yield from self._emit(LsnOverlap(
                    segment=path, offset=frame.offset, reason="lsn_overlap",
                    expected_lsn=expected,
                    detail=f"frame has LSNs {frame.first_lsn}..{frame.last_lsn}, already read "
                           f"up to {expected - 1} (a duplicated or stale segment); skipped",
                ))
            return
        if frame.first_lsn > expected and not any(_open(p) for p in self._pending):
            self._pending.append(MissingLsns(
                segment=path, offset=frame.offset, reason="lsn_gap", expected_lsn=expected,
                detail=f"frame starts at LSN {frame.first_lsn}, expected {expected}",
                first_lsn=expected, last_lsn=frame.first_lsn - 1,
            ))
        hidden = (expected, frame.first_lsn - 1) if frame.first_lsn > expected else None
        yield from self._release(hidden, torn=False)
        self._expected = frame.last_lsn + 1
        self.segment = path
        yield frame

    def _emit(self, event: Damage) -> Iterator[Damage]:
        """Yield ``event`` now, or after the damage still waiting for its LSNs (log order)."""
        if self._pending:
            self._pending.append(event)
        else:
            yield event

    def _release(self, hidden: tuple[int, int | None] | None, *, torn: bool) -> Iterator[Damage]:
        """Yield the pending damage, the first open one hiding ``hidden`` (the others: none).

        At the end of the log (``torn`` asked) damage in the newest segment with no valid
        segment after it is torn if it can be.
        """
        pending, self._pending = self._pending, []
        last_read, valid_after = self._last_read, self._valid_after_pending
        self._valid_after_pending = False
        for event in pending:
            if not _open(event):
                yield event
                continue
            first, last = hidden if hidden is not None else (None, None)
            hidden = None
            tears = torn and not valid_after and _can_tear(event) and event.segment == last_read
            yield replace(event, first_lsn=first, last_lsn=last, torn=tears)

    def _finish(self) -> Iterator[Damage]:
        """At the end of the log: pending damage hides everything from where it was found."""
        first_open = next((p for p in self._pending if _open(p)), None)
        hidden = None
        if first_open is not None and first_open.expected_lsn is not None:
            hidden = (first_open.expected_lsn, None)
        yield from self._release(hidden, torn=True)
        if self._expected is not None:
            self.end_lsn = self._expected - 1


def _holding(segs: list[tuple[int, Path]], lsn: int) -> int:
    """Index of the segment that holds ``lsn``: each one before it is followed by a segment
    starting at or below ``lsn``, so it holds only lower LSNs."""
    index = 0
    while index + 1 < len(segs) and segs[index + 1][0] <= lsn:
        index += 1
    return index
