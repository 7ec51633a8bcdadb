"""Reading the WAL back on open: continuity checks, torn-tail detection, recovery policies.

The modes (DESIGN §4, modelled on RocksDB's) concern the log beyond ``applied_lsn``:

==============  =====================================  ======================================
mode            torn tail (bad last frame, nothing      damage before the tail
                valid after it)
==============  =====================================  ======================================
tolerate_tail   truncate, keep a ``.broken`` copy, warn  refuse to open (WALCorruptionError)
absolute        refuse                                   refuse
point_in_time   truncate                                 stop there, open the prefix, report
                                                         the dropped LSN range
==============  =====================================  ======================================

Damage found entirely inside LSNs that LMDB already holds (``<= applied_lsn``) is skipped with a
warning when the log can be resynchronized past it: those operations are not at risk.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from xpstore.errors import WALCorruptionError
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
    scan_segment,
)

log = logging.getLogger(__name__)

RECOVERY_MODES = ("tolerate_tail", "absolute", "point_in_time", "salvage")
ApplyFn = Callable[[int, list[bytes], float], None]


@dataclass(frozen=True)
class Gap:
    """LSNs that salvage could not read: ``first..last`` (last None: to the end of the log)."""

    first: int
    last: int | None
    segment: str
    offset: int
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"first_lsn": self.first, "last_lsn": self.last, "segment": self.segment,
                "offset": self.offset, "reason": self.reason}


@dataclass
class RecoveryReport:
    """What recovery found and did; ``Store.recovery_report`` and the CLI show it."""

    mode: str
    applied_lsn: int
    segments: int = 0
    frames: int = 0
    replayed_ops: int = 0
    last_lsn: int = 0
    truncated: list[tuple[str, int]] = field(default_factory=list)
    broken_copies: list[str] = field(default_factory=list)
    removed_segments: list[str] = field(default_factory=list)
    dropped_lsns: tuple[int, int] | None = None
    gaps: list[Gap] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "applied_lsn": self.applied_lsn,
            "segments": self.segments,
            "frames": self.frames,
            "replayed_ops": self.replayed_ops,
            "last_lsn": self.last_lsn,
            "truncated": [{"segment": s, "offset": o} for s, o in self.truncated],
            "broken_copies": self.broken_copies,
            "removed_segments": self.removed_segments,
            "dropped_lsns": list(self.dropped_lsns) if self.dropped_lsns else None,
            "gaps": [g.as_dict() for g in self.gaps],
            "warnings": self.warnings,
        }


@dataclass
class _Damage:
    index: int  # segment index
    path: Path
    offset: int
    expected_lsn: int
    reason: str
    detail: str
    torn: bool
    valid_after: int  # valid frames found after the damage (in any segment)
    max_lsn_after: int | None


def recover_wal(
    wal_dir: Path,
    *,
    store_id: int,
    applied_lsn: int,
    mode: str,
    max_frame_bytes: int,
    apply: ApplyFn,
    modify: bool = True,
    to_lsn: int | None = None,
) -> RecoveryReport:
    """Replay every operation after ``applied_lsn`` through ``apply`` under ``mode``'s policy.

    ``apply(first_lsn, ops, commit_time)`` receives each frame's operations beyond
    ``applied_lsn``. With ``modify=False`` nothing on disk changes (torn tails are reported, not
    truncated). Raises :class:`WALCorruptionError` where the mode refuses to open.

    ``salvage`` never modifies anything (``modify`` must be False): it skips damaged frames and
    segments, resynchronizes at the next valid frame, and lists every unreadable LSN range in
    ``report.gaps``. ``to_lsn`` (``point_in_time`` only) stops before the first frame that
    reaches past it, as if the log were damaged there: later frames are set aside and reported.
    """
    if mode == "salvage" and modify:
        raise ValueError("salvage never modifies the damaged store: pass modify=False")
    if to_lsn is not None and mode != "point_in_time":
        raise ValueError("to_lsn needs recovery_mode='point_in_time'")
    if mode not in RECOVERY_MODES:
        raise ValueError(
            f"unknown recovery mode {mode!r}; choose one of {', '.join(RECOVERY_MODES)}"
        )
    if modify:
        for tmp in wal_dir.glob("*.wal.tmp"):  # a segment create that never reached its rename
            fs.unlink(tmp)
    segs = list_segments(wal_dir)
    report = RecoveryReport(mode=mode, applied_lsn=applied_lsn, segments=len(segs))
    reader = _Reader(segs, store_id, applied_lsn, max_frame_bytes, apply, report)
    reader.salvage = mode == "salvage"
    reader.to_lsn = to_lsn
    damage = reader.run()
    report.last_lsn = max(applied_lsn, reader.expected - 1 if reader.expected is not None else 0)
    if damage is not None:
        _handle_damage(damage, mode, segs, report, modify)
    if modify:
        _remove_trailing_empty(wal_dir, report)
    return report


class _Reader:
    def __init__(
        self,
        segs: list[tuple[int, Path]],
        store_id: int,
        applied_lsn: int,
        max_frame: int,
        apply: ApplyFn,
        report: RecoveryReport,
    ) -> None:
        self.segs = segs
        self.store_id = store_id
        self.applied = applied_lsn
        self.max_frame = max_frame
        self.apply = apply
        self.report = report
        self.expected: int | None = None
        self.salvage = False
        self.to_lsn: int | None = None
        # salvage: damage with nothing valid after it in its segment; the next segment's first
        # LSN (or the end of the log) closes the gap
        self._pending_gap: tuple[int, Path, int, str] | None = None

    def run(self) -> _Damage | None:
        for index, (first, path) in enumerate(self.segs):
            data = fs.read_bytes(path)
            try:
                header = decode_header(data)
            except HeaderError as exc:
                if self.salvage:
                    self._skip_segment(path, exc.reason, str(exc))
                    continue
                return self._damage(index, path, data, None, 0, exc.reason, str(exc))
            problem = self._check_header(header, first)
            if problem is not None and self.salvage:
                if problem[0] == "missing_segment":
                    lo = self.expected if self.expected is not None else self.applied + 1
                    where, off, why = path, 0, "missing_segment"
                    if self._pending_gap is not None:
                        lo, where, off, why = self._pending_gap
                        self._pending_gap = None
                    self._gap(lo, header.first_lsn - 1, where, off, why)
                    self.expected = header.first_lsn
                else:
                    self._skip_segment(path, *problem)
                    continue
            elif problem is not None:
                return self._damage(index, path, data, header, 0, *problem)
            self._pending_gap = None  # the segment continues exactly where the damage stopped
            damage = self._read_frames(index, path, data, header)
            if damage is not None:
                return damage
        if self._pending_gap is not None:
            lo, where, off, why = self._pending_gap
            self._gap(lo, None, where, off, why)
        return None

    def _check_header(self, header: SegmentHeader, first: int) -> tuple[str, str] | None:
        if header.store_id != self.store_id:
            return "foreign_segment", (
                f"segment belongs to store {header.store_id:#x}, "
                f"not this store ({self.store_id:#x})"
            )
        if header.first_lsn != first:
            return (
                "name_mismatch",
                f"header says first LSN {header.first_lsn}, file name says {first}",
            )
        if self.expected is None:
            if header.first_lsn > self.applied + 1:
                return "missing_segment", (
                    f"LSNs {self.applied + 1}..{header.first_lsn - 1} are in neither LMDB "
                    "nor the WAL"
                )
            self.expected = header.first_lsn
        elif header.first_lsn > self.expected:
            return "missing_segment", f"LSNs {self.expected}..{header.first_lsn - 1} are missing"
        elif header.first_lsn < self.expected:
            return "lsn_overlap", (
                f"segment starts at LSN {header.first_lsn} but LSNs up to {self.expected - 1} "
                "were already read (a duplicated or stale segment)"
            )
        return None

    def _read_frames(
        self, index: int, path: Path, data: bytes, header: SegmentHeader
    ) -> _Damage | None:
        view = memoryview(data)
        salt = header.salt_bytes
        offset = HEADER_SIZE
        while offset < len(data):
            assert self.expected is not None
            try:
                frame = _decode_expected(view, offset, salt, self.max_frame, self.expected)
            except FrameError as exc:
                resync = self._resync(data, offset, salt)
                if resync is None and self.salvage:
                    resync = self._salvage_resync(data, offset, salt, path, exc.reason)
                    if resync is None:
                        return None  # nothing valid left in this segment; the next one decides
                if resync is None:
                    return self._damage(index, path, data, header, offset, exc.reason, str(exc))
                offset = resync
                continue
            if self.to_lsn is not None and frame.last_lsn > self.to_lsn:
                return self._damage(
                    index, path, data, header, offset, "to_lsn",
                    f"recovery asked to stop at LSN {self.to_lsn}; this frame holds LSNs "
                    f"{frame.first_lsn}..{frame.last_lsn}",
                )
            self.report.frames += 1
            skip = max(0, self.applied + 1 - frame.first_lsn)
            if skip < frame.count:
                ops = frame.ops()[skip:]
                self.apply(frame.first_lsn + skip, ops, frame.commit_time)
                self.report.replayed_ops += len(ops)
            self.expected = frame.last_lsn + 1
            offset += frame.size
        return None

    def _gap(self, first: int, last: int | None, path: Path, offset: int, reason: str) -> None:
        gap = Gap(first, last, path.name, offset, reason)
        self.report.gaps.append(gap)
        log.warning("salvage: LSNs %s..%s unreadable (%s at %s+%d)",
                    first, "end" if last is None else last, reason, path.name, offset)

    def _skip_segment(self, path: Path, reason: str, detail: str) -> None:
        msg = f"salvage: skipped segment {path.name}: {reason}: {detail}"
        log.warning(msg)
        self.report.warnings.append(msg)

    def _salvage_resync(
        self, data: bytes, offset: int, salt: bytes, path: Path, reason: str
    ) -> int | None:
        """Jump to the next valid frame after damage, recording the LSNs skipped over."""
        expected = self.expected if self.expected is not None else self.applied + 1
        nxt = find_valid_frame(data, offset, salt, expected, self.max_frame)
        if nxt is None:
            self._pending_gap = (expected, path, offset, reason)
            return None
        if nxt.first_lsn > expected:
            self._gap(expected, nxt.first_lsn - 1, path, offset, reason)
        self.expected = nxt.first_lsn
        return nxt.offset

    def _resync(self, data: bytes, offset: int, salt: bytes) -> int | None:
        """Skip damage that lies wholly inside already-applied LSNs; None if it does not."""
        if self.expected is None or self.expected > self.applied:
            return None
        nxt = find_valid_frame(data, offset, salt, self.expected, self.max_frame)
        if nxt is None or nxt.first_lsn > self.applied + 1:
            return None
        msg = (
            f"skipped WAL damage at offset {offset} covering LSNs {self.expected}.."
            f"{nxt.first_lsn - 1}, all already applied to LMDB"
        )
        log.warning(msg)
        self.report.warnings.append(msg)
        self.expected = nxt.first_lsn
        return nxt.offset

    def _damage(
        self,
        index: int,
        path: Path,
        data: bytes,
        header: SegmentHeader | None,
        offset: int,
        reason: str,
        detail: str,
    ) -> _Damage:
        expected = self.expected if self.expected is not None else self.applied + 1
        valid_after = 0
        max_after: int | None = None
        if header is not None and offset >= HEADER_SIZE:
            pos = offset
            while True:
                frame = find_valid_frame(data, pos, header.salt_bytes, expected, self.max_frame)
                if frame is None:
                    break
                valid_after += 1
                max_after = frame.last_lsn
                pos = frame.offset + frame.size - 1
        for _first, later in self.segs[index + 1 :]:
            scan = scan_segment(later, fs.read_bytes(later), self.max_frame)
            valid_after += len(scan.frames) + (1 if scan.header else 0)
            if scan.frames:
                max_after = max(max_after or 0, scan.frames[-1].last_lsn)
        torn = (
            valid_after == 0
            and index == len(self.segs) - 1
            and reason
            not in (
                "foreign_segment",
                "name_mismatch",
                "missing_segment",
                "lsn_overlap",
                "newer_version",
            )
        )
        return _Damage(index, path, offset, expected, reason, detail, torn, valid_after, max_after)


def _decode_expected(
    view: memoryview, offset: int, salt: bytes, max_frame: int, expected: int
) -> Frame:
    """decode_frame plus the continuity check: the frame must start at ``expected``."""
    frame = decode_frame(view, offset, salt, max_frame)
    if frame.first_lsn != expected:
        raise FrameError(
            offset, "lsn_mismatch", f"frame has first LSN {frame.first_lsn}, expected {expected}"
        )
    return frame


def _handle_damage(
    damage: _Damage, mode: str, segs: list[tuple[int, Path]], report: RecoveryReport, modify: bool
) -> None:
    where = f"{damage.path.name}+{damage.offset}"
    if damage.torn and mode in ("tolerate_tail", "point_in_time"):
        msg = (
            f"torn WAL tail at {where} (expected LSN {damage.expected_lsn}): {damage.reason}; "
            "truncated (these bytes were never acknowledged)"
        )
        log.warning(msg)
        report.warnings.append(msg)
        if modify:
            _truncate(damage.path, damage.offset, report)
        return
    if mode == "point_in_time" and not damage.torn:
        hi = damage.max_lsn_after if damage.max_lsn_after is not None else damage.expected_lsn
        lo, hi = damage.expected_lsn, max(hi, damage.expected_lsn)
        report.dropped_lsns = (lo, hi)
        if damage.reason == "to_lsn":
            msg = (
                f"recovered up to LSN {lo - 1} as asked; LSNs {lo}..{hi} from {where} on were "
                "set aside as .broken copies"
            )
            log.warning(msg)
        else:
            msg = (
                f"WAL damaged at {where} (expected LSN {lo}): {damage.reason}; opened the "
                f"consistent prefix and dropped LSNs {lo}..{hi} ({damage.valid_after} valid "
                "frames or segments after the damage were set aside as .broken copies)"
            )
            log.error(msg)
        report.warnings.append(msg)
        if modify:
            _truncate(damage.path, damage.offset, report)
            for _first, later in segs[damage.index + 1 :]:
                _set_aside(later, report)
            fs.fsync_dir(damage.path.parent)
        return
    if damage.torn:
        advice = "reopen with recovery_mode='tolerate_tail' (the default) to truncate the torn tail"
        what = "torn tail"
    else:
        advice = (
            f"reopen with recovery_mode='point_in_time' to open the consistent prefix (drops LSN "
            f">= {damage.expected_lsn})"
        )
        what = f"{damage.valid_after} valid frames or segments follow, so this is not a torn tail"
    raise WALCorruptionError(
        f"WAL corrupt at {where} (expected LSN {damage.expected_lsn}): {damage.reason}: "
        f"{damage.detail}; {what}; store not opened under recovery_mode='{mode}'. To open it "
        f"anyway, {advice}.",
        segment=damage.path.name,
        offset=damage.offset,
        expected_lsn=damage.expected_lsn,
        reason=damage.reason,
    )


def _broken_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{time.time_ns()}.broken")


def _truncate(path: Path, offset: int, report: RecoveryReport) -> None:
    copy = _broken_name(path)
    fs.copy_file(path, copy)
    report.broken_copies.append(copy.name)
    if offset <= HEADER_SIZE:
        fs.unlink(path)
        report.removed_segments.append(path.name)
    else:
        fs.truncate(path, offset)
        fd = fs.open_file(path, os.O_WRONLY)
        try:
            fs.fdatasync(fd)
        finally:
            fs.close(fd)
        report.truncated.append((path.name, offset))
    fs.fsync_dir(path.parent)


def _set_aside(path: Path, report: RecoveryReport) -> None:
    dest = _broken_name(path)
    fs.replace(path, dest)
    report.broken_copies.append(dest.name)
    report.removed_segments.append(path.name)


def _remove_trailing_empty(wal_dir: Path, report: RecoveryReport) -> None:
    """Delete header-only segments at the end (crash right after a create or rotation)."""
    segs = list_segments(wal_dir)
    removed = False
    while segs:
        _first, path = segs[-1]
        if path.stat().st_size > HEADER_SIZE:
            break
        fs.unlink(path)
        report.removed_segments.append(path.name)
        segs.pop()
        removed = True
    if removed:
        fs.fsync_dir(wal_dir)
