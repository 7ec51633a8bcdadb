"""The corruption table of docs/recovery.md: each kind of damage x each recovery mode.

A base store holds 120 frames of 5 records each (LSNs 1..600) across 3+ WAL segments, all
beyond ``applied_lsn`` (applier held), in append-only segments, and again in preallocated ones
(zero-filled ahead of the frames) for the rows that name them. Each case damages a copy; each
mode opens it (salvage: copies it into a new store) and the outcome is checked against
``TABLE``, which is also the table printed in docs/recovery.md (a test below keeps the two
equal).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import files_of
from xpstore import LmdbCorruptionError, Store, WALCorruptionError
from xpstore.demo.synthetic import make_mixed
from xpstore.ops.salvage import salvage_store
from xpstore.persistence.wal import WalWriter
from xpstore.persistence.wal_format import HEADER_SIZE, Frame
from xpstore.persistence.wal_reader import scan_segment
from xpstore.persistence.wal_recovery import RecoveryReport

MODES = ("tolerate_tail", "absolute", "point_in_time", "salvage")
OPENS = "opens; torn tail truncated (.broken copy kept)"
REFUSES = "refuses to open: WALCorruptionError naming segment, offset, expected LSN"
PREFIX = "opens the prefix before the damage; later LSNs set aside and reported"
GAP = "new store with every readable frame; the damaged range reported as a gap"
SKIP = "new store with every frame; the bad segment skipped with a warning"
LMDB_REFUSES = "refuses to open: LmdbCorruptionError naming data.mdb, checked before mapping it"
REBUILDS = "new store from the newest good snapshot (none here: empty) plus every WAL frame"
CLEAN = "clean: opens with every frame; nothing truncated, set aside or reported"
END = "end of the log: opens without the zeroed frames; nothing truncated or reported"
TABLE: dict[str, tuple[str, str, str, str]] = {
    "torn last frame": (OPENS, REFUSES, OPENS, GAP),
    "torn last frame, preallocated segment": (OPENS, REFUSES, OPENS, GAP),
    "zero-filled tail of preallocated segments": (CLEAN, CLEAN, CLEAN, CLEAN),
    "zeroed last 4 KiB sector": (OPENS, REFUSES, OPENS, GAP),
    "last frame zeroed, preallocated segment": (END, END, END, END),
    "bit flip in an earlier frame": (REFUSES, REFUSES, PREFIX, GAP),
    "zeroed 4 KiB sector mid-log": (REFUSES, REFUSES, PREFIX, GAP),
    "zeroed 4 KiB sector mid-log, preallocated segment": (REFUSES, REFUSES, PREFIX, GAP),
    "deleted middle segment": (REFUSES, REFUSES, PREFIX, GAP),
    "deleted middle segment, preallocated segments": (REFUSES, REFUSES, PREFIX, GAP),
    "duplicated segment": (REFUSES, REFUSES, PREFIX, SKIP),
    "segment from another store": (REFUSES, REFUSES, PREFIX, SKIP),
    "LMDB data.mdb truncated to half": (LMDB_REFUSES, LMDB_REFUSES, LMDB_REFUSES, REBUILDS),
}


def _make_base(path: Path, preallocate_bytes: int) -> Path:
    rng = np.random.default_rng(3)
    with Store.open(path, create=True, hold_applier=True, segment_max_bytes=64 * 1024,
                    preallocate_bytes=preallocate_bytes) as s:
        for _ in range(120):
            s.put_many(make_mixed(rng, 5))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Append-only segments: each file ends with its last frame."""
    return _make_base(tmp_path_factory.mktemp("base") / "store", 0)


@pytest.fixture(scope="module")
def prealloc_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preallocated segments: zeros after the last frame of each, up to 64 KiB."""
    path = _make_base(tmp_path_factory.mktemp("prealloc") / "store", 1 << 20)
    tails = []
    for seg in sorted((path / "wal").glob("*.wal")):
        scan = scan_segment(seg, seg.read_bytes(), 1 << 26)
        assert scan.header is not None and scan.header.preallocated and scan.error is None
        tails.append(scan.size - scan.frames[-1].offset - scan.frames[-1].size)
    assert tails[-1] > 0 and sum(t > 0 for t in tails) >= 3  # zero tails, read as no damage
    return path


def _frames(path: Path) -> list[tuple[Path, Frame]]:
    out: list[tuple[Path, Frame]] = []
    for seg in sorted((path / "wal").glob("*.wal")):
        out.extend((seg, f) for f in scan_segment(seg, seg.read_bytes(), 1 << 26).frames)
    return out


def _lsns(frames: list[tuple[Path, Frame]]) -> set[int]:
    return {lsn for _s, f in frames for lsn in range(f.first_lsn, f.last_lsn + 1)}


def _patch(seg: Path, offset: int, data: bytes) -> None:
    raw = bytearray(seg.read_bytes())
    raw[offset : offset + len(data)] = data
    seg.write_bytes(bytes(raw))


def _damage(case: str, path: Path) -> tuple[set[int], set[int]]:
    """Damage ``path``; return (LSNs a prefix-open keeps, LSNs a salvage keeps)."""
    frames = _frames(path)
    segs = sorted((path / "wal").glob("*.wal"))
    assert len(segs) >= 3
    every = _lsns(frames)
    if case == "torn last frame":
        seg, last = frames[-1]
        with seg.open("r+b") as fh:
            fh.truncate(last.offset + 40)
        kept = _lsns(frames[:-1])
        return kept, kept
    if case == "torn last frame, preallocated segment":
        seg, last = frames[-1]  # the frame's first 40 bytes reached the zero-filled space
        _patch(seg, last.offset + 40, bytes(seg.stat().st_size - last.offset - 40))
        kept = _lsns(frames[:-1])
        return kept, kept
    if case == "zero-filled tail of preallocated segments":
        return every, every
    if case == "last frame zeroed, preallocated segment":
        # zeros from a frame's start on are indistinguishable from unwritten space, so the log
        # ends there (zeros from inside a frame on make it a torn frame)
        seg, last = frames[-1]
        assert frames[-2][0] == seg
        _patch(seg, last.offset, bytes(last.size))
        kept = _lsns(frames[:-1])
        return kept, kept
    if case == "zeroed last 4 KiB sector":
        seg = segs[-1]
        size = seg.stat().st_size
        start = max(HEADER_SIZE, size - 4096)
        _patch(seg, start, bytes(size - start))
        kept = _lsns([(s, f) for s, f in frames if s != seg or f.offset + f.size <= start])
        return kept, kept
    if case.startswith(("bit flip in an earlier frame", "zeroed 4 KiB sector mid-log")):
        index = len(frames) // 3
        seg, frame = frames[index]
        if case.startswith("bit flip"):
            _patch(seg, frame.offset + 40, bytes([seg.read_bytes()[frame.offset + 40] ^ 0x08]))
            hit = [frame]
        else:
            _patch(seg, frame.offset, bytes(4096))
            end = frame.offset + 4096
            hit = [
                f for s, f in frames
                if s == seg and f.offset < end and f.offset + f.size > frame.offset
            ]
        return _lsns(frames[:index]), every - _lsns([(seg, f) for f in hit])
    if case.startswith("deleted middle segment"):
        victim = segs[1]
        victim.unlink()
        prefix = _lsns([(s, f) for s, f in frames if s == segs[0]])
        return prefix, every - _lsns([(s, f) for s, f in frames if s == victim])
    if case == "duplicated segment":
        # an older segment copied in again under the next name (a botched manual restore)
        nxt = max(every) + 1
        shutil.copyfile(segs[0], segs[0].with_name(f"{nxt:020d}.wal"))
        return every, every
    if case == "segment from another store":
        nxt = max(every) + 1
        other = path.parent / "other-wal"
        other.mkdir()
        w = WalWriter(other, store_id=12345, next_lsn=nxt, durability="none",
                      segment_max_bytes=1 << 20, max_frame_bytes=1 << 20, group_commit_ms=1,
                      on_durable=lambda a, b: None)
        _a, last_lsn = w.append([b"not ours"])
        w.wait(last_lsn)
        w.close()
        shutil.copyfile(next(other.glob("*.wal")), path / "wal" / f"{nxt:020d}.wal")
        return every, every
    if case == "LMDB data.mdb truncated to half":
        data = path / "data" / "data.mdb"
        os.truncate(data, data.stat().st_size // 2)
        return set(), every
    raise AssertionError(case)




@pytest.mark.parametrize("case", list(TABLE))
@pytest.mark.parametrize("mode", MODES)
def test_corruption_table(
    tmp_path: Path, base: Path, prealloc_base: Path, case: str, mode: str
) -> None:
    report: RecoveryReport | None
    path = tmp_path / "store"
    shutil.copytree(prealloc_base if "preallocated" in case else base, path)
    prefix_keeps, salvage_keeps = _damage(case, path)
    expected = TABLE[case][MODES.index(mode)]
    before = files_of(path)
    if expected == REFUSES:
        with pytest.raises(WALCorruptionError) as info:
            Store.open(path, recovery_mode=mode)
        err = info.value
        assert err.segment and err.offset is not None and err.expected_lsn and err.reason
        assert files_of(path) == before  # a refused open changes nothing
        return
    if expected == LMDB_REFUSES:  # in-process: the size check runs before LMDB maps the file
        for readonly in (False, True):
            with pytest.raises(LmdbCorruptionError, match=r"data\.mdb.*truncated") as lmdb_info:
                Store.open(path, recovery_mode=None if readonly else mode, readonly=readonly)
            assert lmdb_info.value.path == path / "data" / "data.mdb"
        assert files_of(path) == before
        return
    if mode == "salvage":
        report = salvage_store(path, tmp_path / "salvaged")
        assert files_of(path) == before  # salvage never writes into the damaged store
        with Store.open(tmp_path / "salvaged") as store:
            assert {e.id for e in store.scan()} == salvage_keeps
        if expected == GAP:
            assert report.gaps
        elif expected in (CLEAN, END):
            assert not report.gaps and not report.warnings
        else:
            assert not report.gaps and report.warnings
        if expected == REBUILDS:
            assert any("data.mdb" in w and "no usable snapshot" in w for w in report.warnings)
        return
    with Store.open(path, recovery_mode=mode) as store:
        ids = {e.id for e in store.scan()}
        report = store.recovery_report
    assert report is not None
    assert ids == prefix_keeps
    if expected == OPENS:
        assert report.truncated or report.removed_segments
        assert report.broken_copies
    elif expected in (CLEAN, END):
        assert not (report.truncated or report.removed_segments or report.broken_copies)
        assert not report.warnings and report.dropped_lsns is None
    else:
        assert report.dropped_lsns is not None
    with Store.open(path, recovery_mode="absolute") as again:  # what is left is clean now
        assert {e.id for e in again.scan()} == ids


def test_docs_recovery_md_has_this_table() -> None:
    text = (Path(__file__).parent.parent / "docs" / "recovery.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in TABLE:
            rows[cells[0]] = tuple(cells[1:])
    short = {OPENS: "opens", REFUSES: "refuses", PREFIX: "prefix", GAP: "gap", SKIP: "skip",
             LMDB_REFUSES: "refuses", REBUILDS: "rebuilds", CLEAN: "clean", END: "end"}
    expected = {case: tuple(short[o] for o in outcomes) for case, outcomes in TABLE.items()}
    assert {k: tuple(re.sub(r"\W.*", "", v) for v in vals) for k, vals in rows.items()} == expected
