"""Read-only inspection of a store: the WAL segment by segment, and the integrity checks behind
``xpstore verify`` and ``Store.check()``.

Everything here takes paths (or an already open :class:`LmdbTables`), not a ``Store``, so it
works on a store that does not open (a damaged WAL, a newer config) and while another process
holds the writer lock. Nothing is ever written: WAL files are read whole through the fs seam,
LMDB only through read transactions (``lock=True``: a reader slot, never a page).

Two layers:

- :func:`inspect_wal`: per segment (and per ``.broken`` copy) what
  :func:`~xpstore.persistence.wal_reader.scan_segment` finds: LSN range, frames, commit times,
  the first bad frame and where valid frames resume.
- :func:`check_store`: every check of DESIGN §4 (WAL, LMDB records, indexes, counts,
  ``applied_lsn``, snapshot manifests), collected as :class:`Problem` entries. The WAL part
  walks the log with :class:`~xpstore.persistence.wal_reader.WalReader` and reports each damage
  event it yields, with the LSNs it hides; ``replay`` streams around the same events.

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
from collections import Counter
from collections.abc import Callable
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
from xpstore.model.codec import KIND_BY_CODE, decode_envelope, decode_op, envelope_head
from xpstore.model.fprows import FP_CODE, decode_rows, rows_for_envelopes
from xpstore.model.records import Fingerprint
from xpstore.ops import snapshots as snap_mod
from xpstore.persistence import fs
from xpstore.persistence.layout import Layout, read_marker
from xpstore.persistence.lmdb_tables import LmdbTables, from_u64, index_key, u64
from xpstore.persistence.wal import list_segments
from xpstore.persistence.wal_format import SEGMENT_NAME_RE, Frame
from xpstore.persistence.wal_reader import (
    BadFrame,
    Damage,
    MissingLsns,
    WalReader,
    header_damage,
    scan_segment,
)

log = logging.getLogger(__name__)

FRAME_CAP = 1024 * 1024 * 1024
"""The largest ``max_frame_bytes`` a config may set: the frame limit when the config is unknown."""
CHECK_BATCH = 5000
"""Records decoded per read transaction by the record check (short transactions)."""
_BROKEN_RE = re.compile(r"^(\d{20})\.wal\.\d+\.broken$")
_TMP_RE = re.compile(r"^(\d{20})\.wal\.tmp$")


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
        rep = _segment_report(path, role, data, store_id, with_frames, max_frame_bytes)
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
    path: Path, role: str, data: bytes, store_id: int | None, with_frames: bool, max_frame: int
) -> SegmentReport:
    """One file on its own, up to its first bad spot; header problems (another store, a name
    that contradicts the header) are listed, not enforced: this is a report, not a reader."""
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
        found = header_damage(path, header, store_id=store_id, name_lsn=name_lsn)
        rep.problems.extend(d.detail for d in found)
    if scan.error is not None:
        rep.bad_offset = scan.error.offset
        rep.bad_reason = scan.error.reason
        rep.bad_detail = scan.error.detail
        if isinstance(scan.error, BadFrame):
            rep.resumes_at = scan.error.resume_offset
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

    Changes nothing, LMDB's lock file included: with no live writer, LMDB is opened without
    ``lock.mdb`` (a read-only open with the lock writes a reader slot into it). If a writer took
    the store while that check ran, its pages may have been reused under the check, so it runs
    again with the lock, as it does beside a live writer from the start.

    Raises StoreNotFoundError / FormatVersionError when ``root`` is not a readable store.
    """
    marker = read_marker(Layout(root))
    writer_live = writer_pid(root) is not None
    report = _verify_once(root, marker.store_id, writer_live, progress, total)
    if not writer_live and writer_pid(root) is not None:
        log.info("a writer opened %s during verify; checking again with LMDB's lock", root)
        report = _verify_once(root, marker.store_id, True, progress, total)
    return report


def _verify_once(
    root: Path, store_id: int, writer_live: bool, progress: Progress | None,
    total: Callable[[int], None] | None,
) -> CheckReport:
    lay = Layout(root)
    report = CheckReport(str(root))
    tables: LmdbTables | None = None
    try:
        tables = LmdbTables(lay.data, readonly=True, map_size=StoreConfig().apply.map_size,
                            lock=writer_live)  # fmt: skip
    except (XpStoreError, lmdb.Error) as exc:
        report.add(f"lmdb {lay.data}", f"cannot be opened read-only: {exc}")
    try:
        check_store(
            root, tables=tables, store_id=store_id, writer_live=writer_live,
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
    max_frame = config.wal.max_frame_bytes if config is not None else FRAME_CAP
    reader = check_wal(lay.wal, store_id=store_id, max_frame_bytes=max_frame,
                       writer_live=writer_live, report=report)
    if tables is not None:
        assert applied_before is not None
        try:
            _check_applied(reader, applied_before, _applied(tables), report)
            check_lmdb(tables, report, progress=progress, total=total)
        except (lmdb.Error, XpStoreError) as exc:  # a damaged page: report, go on with the rest
            report.add(f"lmdb {lay.data}", f"reading failed: {type(exc).__name__}: {exc}")
    snap_dir = snap_mod.snapshot_root(root, config.snapshots.dir if config else None)
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
) -> WalReader:
    """Checksums and LSN continuity of every segment; every operation decodes (shape check).

    Returns the reader, which knows the LSN range the log covers.
    """
    reader = WalReader(wal_dir, store_id=store_id, max_frame_bytes=max_frame_bytes,
                       follow=writer_live)
    frames = ops = 0
    for item in reader:
        if isinstance(item, Damage):
            if concurrent_damage(item, writer_live):
                report.notes.append(f"{item.where}: {damage_text(item, concurrent=True)}")
            else:
                report.add(item.where, damage_text(item))
            continue
        assert reader.segment is not None
        frames += 1
        ops += item.count
        _check_ops(item, f"wal/{reader.segment.name}+{item.offset}", report)
    if reader.vanished:
        report.notes.append(
            f"{len(reader.vanished)} segments were removed by a checkpoint while being checked"
        )
    for name in sorted(p.name for p in wal_dir.glob("*.broken")) if wal_dir.is_dir() else []:
        report.notes.append(f"wal/{name}: a copy kept by an earlier recovery")
    report.stats["wal"] = {
        "segments": reader.segments_read, "frames": frames, "ops": ops,
        "first_lsn": reader.first_lsn, "end_lsn": reader.end_lsn,
    }
    return reader


def concurrent_damage(damage: Damage, writer_live: bool) -> bool:
    """Whether a live writer explains ``damage``: the frame it is writing right now (a torn
    tail), or LSNs its checkpoint moved into LMDB while the log was being read."""
    checkpointed = isinstance(damage, MissingLsns) and damage.offset == 0
    return writer_live and (damage.torn or checkpointed)


def damage_text(damage: Damage, *, concurrent: bool = False) -> str:
    """What ``verify`` says about a damage event: why, and which LSNs it hides."""
    if concurrent:
        return f"tail being written by the live writer ({damage.reason})"
    first, last = damage.first_lsn, damage.last_lsn
    if first is None or (last is not None and last < first):
        lsns = "no operation lost"
    elif last is None:
        lsns = f"LSNs from {first} on unreadable"
    else:
        lsns = f"LSNs {first}..{last} unreadable"
    torn = "torn tail: " if damage.torn else ""
    return f"{torn}{damage.reason}: {damage.detail}; {lsns}"


def _check_ops(frame: Frame, where: str, report: CheckReport) -> None:
    """Every operation of a checksummed frame decodes (its shape; no model validation)."""
    for i, raw in enumerate(frame.ops()):
        try:
            decode_op(raw, validate=False)
        except (ValueError, TypeError, KeyError) as exc:  # CodecError is a ValueError
            report.add(where, f"LSN {frame.first_lsn + i}: operation does not decode: {exc}")


def _check_applied(reader: WalReader, before: int, after: int, report: CheckReport) -> None:
    """applied_lsn <= the WAL's end, and no LSN in neither LMDB nor the WAL.

    ``before`` was read before the WAL and ``after`` after it: applied_lsn only grows, and a
    live writer's checkpoint deletes segments only below it, so neither check can misfire.
    """
    report.stats["applied_lsn"] = after
    if reader.end_lsn is not None and before > reader.end_lsn:
        report.add(
            "lmdb meta applied_lsn",
            f"{before} is beyond the end of the WAL (LSN {reader.end_lsn}): the WAL lost "
            "operations LMDB has, or a segment is missing",
        )
    if reader.first_lsn is not None and reader.first_lsn > after + 1:
        report.add(
            "wal",
            f"LSNs {after + 1}..{reader.first_lsn - 1} are in neither LMDB (applied_lsn "
            f"{after}) nor the WAL (first segment starts at LSN {reader.first_lsn})",
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
        _check_fprows(tables, txn, report, bad_ids, per_kind[FP_CODE])
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
        head = envelope_head(bytes(value[:12]))
        if head is None or index_key(head[0], head[1], rid) != key:
            report.add(where, "index entry disagrees with the record's kind or ts")
    return per_kind


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


def _check_fprows(
    tables: LmdbTables, txn: Any, report: CheckReport, bad_ids: set[int], fingerprints: int
) -> None:
    """Each ``fprows`` row passes its check word and equals the row recomputed from its
    record's envelope; a complete table has one row per fingerprint record. The table is
    derived data: the next attach of a writer rewrites rows that fail their check, and fills
    the whole table again when its row count disagrees with the fingerprint count."""
    try:
        db = tables.db(b"fprows")
    except KeyError:
        return  # an older store opened read-only: no table yet
    records = tables.db(b"records")
    n = 0
    cur = txn.cursor(db=db)
    batch: list[tuple[bytes, bytes]] = []
    for key, value in cur.iternext(keys=True, values=True):
        n += 1
        batch.append((bytes(key), bytes(value)))
        if len(batch) >= CHECK_BATCH:
            _fprows_batch(txn, records, batch, report, bad_ids)
            batch = []
    _fprows_batch(txn, records, batch, report, bad_ids)
    if tables.fprows_complete(txn) and n != fingerprints:
        report.add("lmdb fprows", f"{n} rows but {fingerprints} fingerprint records")
    report.stats["fprows"] = n


def _fprows_batch(
    txn: Any, records: Any, batch: list[tuple[bytes, bytes]], report: CheckReport,
    bad_ids: set[int],
) -> None:  # fmt: skip
    if not batch:
        return
    decoded = decode_rows([v for _k, v in batch], None)
    for rid in decoded.bad:
        report.add(f"lmdb fprows id={rid}", "row fails its check word (damaged)")
    good = set(decoded.ids.tolist())
    ids: list[int] = []
    datas: list[bytes] = []
    stored: list[bytes] = []
    for key, value in batch:
        rid = from_u64(key) if len(key) == 8 else -1
        where = f"lmdb fprows id={rid}"
        if int.from_bytes(value[:8], "little") != rid:
            if int.from_bytes(value[:8], "little") in good:
                report.add(where, "row names another id than its key")
            continue
        record = txn.get(key, db=records)
        if record is None:
            report.add(where, "row of a record that does not exist")
            continue
        if rid in bad_ids:
            continue  # the record itself is already reported
        if not _is_fp(bytes(record)):
            report.add(where, "row of a record that is not a fingerprint")
            continue
        if rid in good:
            ids.append(rid)
            datas.append(bytes(record))
            stored.append(value)
    try:
        fresh = rows_for_envelopes(ids, datas)
    except ValueError as exc:
        report.add("lmdb fprows", f"rows not recomputable: {exc}")
        return
    for rid, want, have in zip(ids, fresh, stored, strict=True):
        if want != have:
            report.add(f"lmdb fprows id={rid}", "row differs from its record's values")


def _is_fp(record: bytes) -> bool:
    head = envelope_head(record[:12])
    return head is not None and head[0] == FP_CODE


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
