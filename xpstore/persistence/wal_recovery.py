"""Reading the WAL back on open: the recovery modes, each a policy on :class:`WalReader`'s events.

The modes (DESIGN §4, modelled on RocksDB's) concern the log beyond ``applied_lsn``:

==============  =====================================  ======================================
mode            torn tail (bad last frame, nothing      damage before the tail
                valid after it)
==============  =====================================  ======================================
tolerate_tail   truncate, keep a ``.broken`` copy, warn  refuse to open (WALCorruptionError)
absolute        refuse                                   refuse
point_in_time   truncate                                 stop there, open the prefix, report
                                                         the dropped LSN range
salvage         skip                                     skip, read on at the next valid frame,
                                                         report every gap (never writes)
==============  =====================================  ======================================

The first three stop at the first damage; the reader still reads the rest of the log, because
what follows the damage decides what it is (a torn tail has nothing valid after it) and what
``point_in_time`` drops. Damage found entirely inside LSNs that LMDB already holds
(``<= applied_lsn``) is skipped with a warning when the segment resynchronizes past it: those
operations are not at risk.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

from xpstore.errors import WALCorruptionError
from xpstore.model.progress import ProgressFn
from xpstore.persistence import fs
from xpstore.persistence.wal import list_segments
from xpstore.persistence.wal_format import (
    HEADER_SIZE,
    Frame,
    HeaderError,
    decode_header,
    zero_tail,
)
from xpstore.persistence.wal_reader import (
    BadFrame,
    BadHeader,
    Damage,
    ForeignSegment,
    Gap,
    LsnOverlap,
    NameMismatch,
    WalReader,
)

log = logging.getLogger(__name__)

RECOVERY_MODES = ("tolerate_tail", "absolute", "point_in_time", "salvage")
ApplyFn = Callable[[int, list[bytes], float], None]


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

    def warn(self, msg: str) -> None:
        """Log ``msg`` and keep it for the caller (``recover`` prints the warnings)."""
        log.warning(msg)
        self.warnings.append(msg)


@dataclass
class _Stop:
    """Where a strict mode stopped reading, and what the log holds after that spot."""

    path: Path
    offset: int
    expected_lsn: int
    reason: str
    detail: str
    torn: bool = False
    frames_after: int = 0
    max_lsn_after: int | None = None

    def note(self, frame: Frame) -> None:
        """A valid frame after the stop: what ``point_in_time`` would set aside."""
        self.frames_after += 1
        self.max_lsn_after = max(self.max_lsn_after or 0, frame.last_lsn)


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
    progress: ProgressFn | None = None,
) -> RecoveryReport:
    """Replay every operation after ``applied_lsn`` through ``apply`` under ``mode``'s policy.

    ``apply(first_lsn, ops, commit_time)`` receives each frame's operations beyond
    ``applied_lsn``. With ``modify=False`` nothing on disk changes (torn tails are reported, not
    truncated). Raises :class:`WALCorruptionError` where the mode refuses to open.

    ``salvage`` never modifies anything (``modify`` must be False): it skips damaged frames and
    segments, resynchronizes at the next valid frame, and lists every unreadable LSN range in
    ``report.gaps``. ``to_lsn`` (``point_in_time`` only) stops before the first frame that
    reaches past it, as if the log were damaged there: later frames are set aside and reported.
    ``progress("replaying WAL", bytes_read, wal_bytes, "bytes")`` follows the reading.
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
    reader = WalReader(wal_dir, store_id=store_id, max_frame_bytes=max_frame_bytes,
                       start_lsn=applied_lsn + 1)
    report = RecoveryReport(mode=mode, applied_lsn=applied_lsn)
    if progress is not None:
        apply = _ReadProgress(reader, apply, progress)
    stop: _Stop | None = None
    if mode == "salvage":
        _salvage(reader, report, apply)
    else:
        stop = _strict(reader, report, apply, to_lsn)
    if isinstance(apply, _ReadProgress):
        apply.done()
    report.segments = len(reader.listed)
    end = stop.expected_lsn - 1 if stop is not None else reader.end_lsn
    report.last_lsn = max(applied_lsn, end or 0)
    if stop is not None:
        later = [path for _first, path in reader.listed if path.name > stop.path.name]
        _handle_damage(stop, mode, later, report, modify)
    if modify:
        _remove_trailing_empty(wal_dir, report)
    return report


class _ReadProgress:
    """An ApplyFn that also reports how far the reader is through the WAL's bytes."""

    def __init__(self, reader: WalReader, apply: ApplyFn, progress: ProgressFn) -> None:
        self._reader = reader
        self._apply = apply
        self._progress = progress
        self._sizes: dict[Path, int] = {}
        self._before: dict[Path, int] = {}
        self._frame: Frame | None = None

    def frame(self, frame: Frame) -> None:
        """The frame whose operations the next call applies (for its offset)."""
        self._frame = frame

    def __call__(self, first: int, ops: list[bytes], commit_time: float) -> None:
        self._apply(first, ops, commit_time)
        seg, frame = self._reader.segment, self._frame
        if seg is None or frame is None:
            return
        if seg not in self._before:
            self._measure()
        self._progress("replaying WAL", self._before.get(seg, 0) + frame.offset + frame.size,
                       sum(self._sizes.values()), "bytes")  # fmt: skip

    def done(self) -> None:
        """Every segment was read to its end: a preallocated one's zeros after its last frame
        count as read (they are the end of its log), so the bar ends at its total."""
        if self._sizes:
            total = sum(self._sizes.values())
            self._progress("replaying WAL", total, total, "bytes")

    def _measure(self) -> None:
        """Sizes of the segments listed so far (a live log's new ones are added as they come)."""
        total = 0
        for _first, path in self._reader.listed:
            if path not in self._sizes:
                try:
                    self._sizes[path] = path.stat().st_size
                except OSError:
                    self._sizes[path] = 0
            self._before[path] = total
            total += self._sizes[path]


def _apply(frame: Frame, report: RecoveryReport, apply: ApplyFn) -> None:
    """Hand ``apply`` the frame's operations that LMDB does not hold yet."""
    report.frames += 1
    skip = max(0, report.applied_lsn + 1 - frame.first_lsn)
    if skip < frame.count:
        if isinstance(apply, _ReadProgress):
            apply.frame(frame)
        ops = frame.ops()[skip:]
        apply(frame.first_lsn + skip, ops, frame.commit_time)
        report.replayed_ops += len(ops)


def _inside_applied(event: Damage, applied: int) -> TypeGuard[BadFrame]:
    """A bad frame whose segment resynchronizes past it, with every LSN it hides in LMDB."""
    return (
        isinstance(event, BadFrame)
        and event.resume_lsn is not None
        and event.expected_lsn is not None
        and event.expected_lsn <= applied
        and event.resume_lsn <= applied + 1
    )


def _skip_applied(event: BadFrame, report: RecoveryReport) -> None:
    """Damage LMDB already covers is not at risk: say so and read on (DESIGN §4)."""
    assert event.resume_lsn is not None
    report.warn(
        f"skipped WAL damage at offset {event.offset} covering LSNs {event.expected_lsn}.."
        f"{event.resume_lsn - 1}, all already applied to LMDB"
    )


def _strict(
    reader: WalReader, report: RecoveryReport, apply: ApplyFn, to_lsn: int | None
) -> _Stop | None:
    """Apply frames up to the first damage (or the first frame past ``to_lsn``), then read on
    only to see what lies after it."""
    stop: _Stop | None = None
    for item in reader:
        if stop is not None:
            if isinstance(item, Frame):
                stop.note(item)
        elif isinstance(item, Frame):
            if to_lsn is not None and item.last_lsn > to_lsn:
                stop = _past_to_lsn(reader, item, to_lsn)
            else:
                _apply(item, report, apply)
        elif _inside_applied(item, report.applied_lsn):
            _skip_applied(item, report)
        else:
            assert item.expected_lsn is not None  # the reader starts at applied_lsn + 1
            stop = _Stop(item.segment, item.offset, item.expected_lsn, item.reason, item.detail,
                         item.torn)
    return stop


def _past_to_lsn(reader: WalReader, frame: Frame, to_lsn: int) -> _Stop:
    """``to_lsn`` stops recovery as damage would, at the first frame reaching past it."""
    assert reader.segment is not None
    return _Stop(
        reader.segment, frame.offset, frame.first_lsn, "to_lsn",
        f"recovery asked to stop at LSN {to_lsn}; this frame holds LSNs "
        f"{frame.first_lsn}..{frame.last_lsn}",
        max_lsn_after=frame.last_lsn,
    )


def _salvage(reader: WalReader, report: RecoveryReport, apply: ApplyFn) -> None:
    """Apply every valid frame; report what each damage hides as a gap, skipped segments as
    warnings (a segment that is not this log's, at the end, hides no LSN of it)."""
    for item in reader:
        if isinstance(item, Frame):
            _apply(item, report, apply)
        elif _inside_applied(item, report.applied_lsn):
            _skip_applied(item, report)
        elif isinstance(item, BadHeader | ForeignSegment | NameMismatch | LsnOverlap):
            what = f"segment {item.segment.name}" if item.offset == 0 else item.where
            report.warn(f"salvage: skipped {what}: {item.reason}: {item.detail}")
            if item.first_lsn is not None and item.last_lsn is not None:
                _gap(item, report)
        elif item.first_lsn is not None:
            _gap(item, report)


def _gap(event: Damage, report: RecoveryReport) -> None:
    """Salvage reports what it could not read; the new store goes on without it."""
    gap = Gap.of(event, applied_lsn=report.applied_lsn)
    report.gaps.append(gap)
    log.warning("salvage: LSNs %s..%s unreadable (%s at %s)", gap.first_lsn,
                "end" if gap.last_lsn is None else gap.last_lsn, gap.reason, gap.where)


def _handle_damage(
    stop: _Stop, mode: str, later: list[Path], report: RecoveryReport, modify: bool
) -> None:
    """Put ``mode``'s policy on the damage reading stopped at (``later``: the segments after it)."""
    if stop.torn and mode in ("tolerate_tail", "point_in_time"):
        report.warn(
            f"torn WAL tail at {_where(stop)} (expected LSN {stop.expected_lsn}): {stop.reason}; "
            "truncated (these bytes were never acknowledged)"
        )
        if modify:
            _truncate(stop.path, stop.offset, report)
    elif mode == "point_in_time":
        _keep_prefix(stop, later, report, modify)
    else:
        raise _refusal(stop, mode, stop.frames_after + len(later))


def _where(stop: _Stop) -> str:
    """``<segment>+<offset>``, as recovery's messages name a spot."""
    return f"{stop.path.name}+{stop.offset}"


def _keep_prefix(stop: _Stop, later: list[Path], report: RecoveryReport, modify: bool) -> None:
    """point_in_time: keep the log before the damage, set the rest aside as ``.broken`` copies
    (never deleted) and report the LSN range that drops."""
    lo = stop.expected_lsn
    hi = max(stop.max_lsn_after or lo, lo)
    report.dropped_lsns = (lo, hi)
    if stop.reason == "to_lsn":
        msg = (
            f"recovered up to LSN {lo - 1} as asked; LSNs {lo}..{hi} from {_where(stop)} on "
            "were set aside as .broken copies"
        )
        log.warning(msg)
    else:
        msg = (
            f"WAL damaged at {_where(stop)} (expected LSN {lo}): {stop.reason}; opened the "
            f"consistent prefix and dropped LSNs {lo}..{hi} ({stop.frames_after + len(later)} "
            "valid frames or segments after the damage were set aside as .broken copies)"
        )
        log.error(msg)
    report.warnings.append(msg)
    if modify:
        _truncate(stop.path, stop.offset, report)
        for path in later:
            _set_aside(path, report)
        fs.fsync_dir(stop.path.parent)


def _refusal(stop: _Stop, mode: str, valid_after: int) -> WALCorruptionError:
    """The error a mode that will not open the store raises: where, why, and what would."""
    if stop.torn:
        advice = "reopen with recovery_mode='tolerate_tail' (the default) to truncate the torn tail"
        what = "torn tail"
    else:
        advice = (
            f"reopen with recovery_mode='point_in_time' to open the consistent prefix (drops LSN "
            f">= {stop.expected_lsn})"
        )
        what = f"{valid_after} valid frames or segments follow, so this is not a torn tail"
    return WALCorruptionError(
        f"WAL corrupt at {_where(stop)} (expected LSN {stop.expected_lsn}): {stop.reason}: "
        f"{stop.detail}; {what}; store not opened under recovery_mode='{mode}'. To open it "
        f"anyway, {advice}.",
        segment=stop.path.name,
        offset=stop.offset,
        expected_lsn=stop.expected_lsn,
        reason=stop.reason,
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


def _only_zeros_after_header(path: Path) -> bool:
    """A preallocated segment that no frame reached (an append-only one never has zeros there)."""
    data = fs.read_bytes(path)
    try:
        preallocated = decode_header(data).preallocated
    except HeaderError:
        return False
    return preallocated and zero_tail(data, HEADER_SIZE)


def _remove_trailing_empty(wal_dir: Path, report: RecoveryReport) -> None:
    """Delete segments without a frame at the end (crash right after a create or rotation):
    header only, or header and the zeros of preallocated space."""
    segs = list_segments(wal_dir)
    removed = False
    while segs:
        _first, path = segs[-1]
        if path.stat().st_size > HEADER_SIZE and not _only_zeros_after_header(path):
            break
        fs.unlink(path)
        report.removed_segments.append(path.name)
        segs.pop()
        removed = True
    if removed:
        fs.fsync_dir(wal_dir)
