"""The torn-tail and corruption table, run in-process against the WAL reader (fast), plus a
sampled version through Store.open with the applier held back (frames beyond applied_lsn)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from xpstore import Store, WALCorruptionError
from xpstore.demo.synthetic import make_mixed
from xpstore.persistence.wal import WalWriter
from xpstore.persistence.wal_format import FRAME_HEADER_SIZE, HEADER_SIZE
from xpstore.persistence.wal_reader import scan_segment
from xpstore.persistence.wal_recovery import RecoveryReport, recover_wal

STORE_ID = 0x5EED
MAX_FRAME = 1 << 20

# the pristine segment, its ops per frame, frame offsets (+ the size), checksummed ends
Pristine = tuple[Path, list[list[bytes]], list[int], list[int]]


def _write_wal(wal_dir: Path, n_frames: int, preallocate: int = 0) -> list[list[bytes]]:
    """n_frames frames of 1-3 small ops each; returns the ops per frame."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    writer = WalWriter(
        wal_dir,
        store_id=STORE_ID,
        next_lsn=1,
        durability="none",
        segment_max_bytes=1 << 30,
        max_frame_bytes=MAX_FRAME,
        group_commit_ms=1,
        on_durable=lambda a, b: None,
        preallocate_bytes=preallocate,
    )
    frames = []
    for i in range(n_frames):
        ops = [f"op-{i}-{j}".encode() * (1 + j) for j in range(1 + i % 3)]
        _first, last = writer.append(ops)
        writer.wait(last)  # one frame per append: no concurrent writers here
        frames.append(ops)
    writer.close()
    return frames


def _recover(
    wal_dir: Path, mode: str, applied: int = 0
) -> tuple[list[tuple[int, bytes]], RecoveryReport]:
    got: list[tuple[int, bytes]] = []

    def apply(first: int, ops: list[bytes], _t: float) -> None:
        got.extend((first + i, op) for i, op in enumerate(ops))

    report = recover_wal(
        wal_dir,
        store_id=STORE_ID,
        applied_lsn=applied,
        mode=mode,
        max_frame_bytes=MAX_FRAME,
        apply=apply,
    )
    return got, report


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    wal = tmp_path_factory.mktemp("pristine") / "wal"
    frames = _write_wal(wal, 8)
    seg = next(wal.glob("*.wal"))
    scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    assert scan.error is None and len(scan.frames) == 8
    bounds = [f.offset for f in scan.frames] + [scan.size]
    data_ends = [f.offset + FRAME_HEADER_SIZE + len(f.payload) for f in scan.frames]
    return seg, frames, bounds, data_ends


def _expected_ops(frames: list[list[bytes]], n_complete: int) -> list[tuple[int, bytes]]:
    out, lsn = [], 1
    for ops in frames[:n_complete]:
        for op in ops:
            out.append((lsn, op))
            lsn += 1
    return out


@pytest.mark.parametrize("mode", ["tolerate_tail", "point_in_time", "absolute"])
def test_truncation_at_every_offset_of_the_last_three_frames(
    tmp_path: Path, pristine: Pristine, mode: str
) -> None:
    seg, frames, bounds, data_ends = pristine
    data = seg.read_bytes()
    start = bounds[-4]  # first byte of the third frame from the end
    for cut in range(start, len(data)):
        wal = tmp_path / f"{mode}-{cut}"
        wal.mkdir()
        (wal / seg.name).write_bytes(data[:cut])
        # a frame is complete when its checksummed bytes are all there (padding may be cut)
        complete = sum(1 for end in data_ends if end <= cut)
        at_boundary = complete == len(data_ends) or cut <= bounds[complete]
        if mode == "absolute" and not at_boundary:
            with pytest.raises(WALCorruptionError) as info:
                _recover(wal, mode)
            assert info.value.segment == seg.name
            assert info.value.offset == bounds[complete]
            assert "tolerate_tail" in str(info.value)
            assert (wal / seg.name).stat().st_size == cut  # refused: nothing modified
            continue
        got, report = _recover(wal, mode)
        assert got == _expected_ops(frames, complete), f"cut at {cut}"
        if at_boundary:
            assert not report.truncated and not report.broken_copies
        else:
            assert report.truncated == [(seg.name, bounds[complete])]
            assert (wal / seg.name).stat().st_size == bounds[complete]
            assert len(list(wal.glob("*.broken"))) == 1
            # recovering again finds a clean log with the same content
            again, report2 = _recover(wal, mode)
            assert again == got and not report2.truncated
        shutil.rmtree(wal)


@pytest.mark.parametrize("mode", ["tolerate_tail", "point_in_time", "absolute"])
def test_torn_write_into_preallocated_space_at_every_offset(tmp_path: Path, mode: str) -> None:
    """A preallocated segment: a power loss mid-write leaves the frame's first bytes and the
    zeros after them. Zeros at a frame boundary are the end of the log (nothing truncated, even
    in ``absolute``); zeros inside a frame make it a torn frame."""
    wal0 = tmp_path / "pristine"
    frames = _write_wal(wal0, 8, preallocate=1 << 20)
    seg = next(wal0.glob("*.wal"))
    data = seg.read_bytes()
    scan = scan_segment(seg, data, MAX_FRAME)
    assert scan.header is not None and scan.header.preallocated and scan.error is None
    assert len(scan.frames) == 8 and len(data) >= 64 * 1024 and len(data) % 4096 == 0
    bounds = [f.offset for f in scan.frames]
    data_ends = [f.offset + FRAME_HEADER_SIZE + len(f.payload) for f in scan.frames]
    bounds.append(scan.frames[-1].offset + scan.frames[-1].size)
    for cut in range(bounds[-4], bounds[-1] + 1):
        wal = tmp_path / f"{mode}-{cut}"
        wal.mkdir()
        (wal / seg.name).write_bytes(data[:cut] + bytes(len(data) - cut))
        complete = sum(1 for end in data_ends if end <= cut)
        at_boundary = complete == len(data_ends) or cut <= bounds[complete]
        if mode == "absolute" and not at_boundary:
            with pytest.raises(WALCorruptionError) as info:
                _recover(wal, mode)
            assert info.value.offset == bounds[complete]
            continue
        got, report = _recover(wal, mode)
        assert got == _expected_ops(frames, complete), f"cut at {cut}"
        if at_boundary:
            assert not report.truncated and not report.broken_copies and not report.warnings
            assert (wal / seg.name).stat().st_size == len(data)  # the zeros stay: not damage
        else:
            assert report.truncated == [(seg.name, bounds[complete])]
            again, report2 = _recover(wal, mode)
            assert again == got and not report2.truncated
        shutil.rmtree(wal)


def _write_sized(wal_dir: Path, sizes: list[int]) -> tuple[list[list[bytes]], list[int]]:
    """One frame of one op per size, preallocated (1 MiB windows); returns the ops per frame
    and the file's size after each frame."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    writer = WalWriter(wal_dir, store_id=STORE_ID, next_lsn=1, durability="none",
                       segment_max_bytes=1 << 30, max_frame_bytes=MAX_FRAME, group_commit_ms=1,
                       on_durable=lambda a, b: None, preallocate_bytes=1 << 20)  # fmt: skip
    frames, file_sizes = [], []
    for i, size in enumerate(sizes):
        ops = [bytes([65 + i % 26]) * size]
        _first, last = writer.append(ops)
        writer.wait(last)
        frames.append(ops)
        file_sizes.append(next(wal_dir.glob("*.wal")).stat().st_size)
    writer.close()
    return frames, file_sizes


@pytest.mark.parametrize("mode", ["tolerate_tail", "point_in_time", "absolute"])
def test_a_large_frame_is_appended_to_a_preallocated_segment(tmp_path: Path, mode: str) -> None:
    """A frame of 64 KiB or more that passes the zeros is appended (no zeros written ahead of
    it); small frames after it zero-fill the next window. The segment reads whole, and a power
    loss in the appended frame is a torn tail like an append-only segment's."""
    wal0 = tmp_path / "pristine"
    sizes = [100, 200, 70_000, 300, 150_000]
    frames, file_sizes = _write_sized(wal0, sizes)
    seg = next(wal0.glob("*.wal"))
    data = seg.read_bytes()
    scan = scan_segment(seg, data, MAX_FRAME)
    assert scan.header is not None and scan.header.preallocated and scan.error is None
    assert [f.ops() for f in scan.frames] == frames
    ends = [f.offset + f.size for f in scan.frames]
    assert file_sizes[0] == file_sizes[1] >= 64 * 1024  # small frames: the first zero window
    assert ends[1] < file_sizes[1] < ends[2]  # which the large frame passes
    assert file_sizes[2] == ends[2]  # the large frame extended the file itself, no zeros
    assert file_sizes[3] > ends[3] and file_sizes[3] % 4096 == 0  # zeros again after it
    assert file_sizes[4] == ends[4] == len(data)
    got, report = _recover(wal0, mode)
    assert got == _expected_ops(frames, 5) and not report.truncated
    start = scan.frames[4].offset
    data_end = start + FRAME_HEADER_SIZE + len(scan.frames[4].payload)
    cuts = sorted({start, start + 1, start + 7, start + 8, data_end - 1, data_end, len(data),
                   *range(start, len(data), 9_973)})  # fmt: skip
    for cut in cuts:
        wal = tmp_path / f"{mode}-{cut}"
        wal.mkdir()
        (wal / seg.name).write_bytes(data[:cut])  # a crash in the append: the file is shorter
        complete = 5 if cut >= data_end else 4
        at_boundary = complete == 5 or cut == start
        if mode == "absolute" and not at_boundary:
            with pytest.raises(WALCorruptionError) as info:
                _recover(wal, mode)
            assert info.value.offset == start
            continue
        got, report = _recover(wal, mode)
        assert got == _expected_ops(frames, complete), f"cut at {cut}"
        if at_boundary:
            assert not report.truncated
        else:
            assert report.truncated == [(seg.name, start)]
            assert (wal / seg.name).stat().st_size == start
        shutil.rmtree(wal)


def test_a_frameless_preallocated_segment_at_the_end_is_removed(tmp_path: Path) -> None:
    """A crash after a segment's zeros reached the disk but before any frame did."""
    wal = tmp_path / "wal"
    frames = _write_wal(wal, 3, preallocate=1 << 20)
    seg = next(wal.glob("*.wal"))
    empty = wal / f"{len(_expected_ops(frames, 3)) + 1:020d}.wal"
    head = seg.read_bytes()[:HEADER_SIZE]
    writer = WalWriter(wal, store_id=STORE_ID, next_lsn=7, durability="none",
                       segment_max_bytes=1 << 30, max_frame_bytes=MAX_FRAME, group_commit_ms=1,
                       on_durable=lambda a, b: None, preallocate_bytes=1 << 20)
    writer.close()
    empty.write_bytes(empty.read_bytes() + bytes(8192))  # zeros, no frame
    got, report = _recover(wal, "absolute")
    assert got == _expected_ops(frames, 3)
    assert report.removed_segments == [empty.name] and not empty.exists()
    assert seg.read_bytes()[:HEADER_SIZE] == head


FLIP_POSITIONS = {
    "crc": 0,
    "length": 5,
    "lsn": 9,
    "count": 16,
    "commit_time": 27,
    "payload": 36,
}


@pytest.mark.parametrize("where", sorted(FLIP_POSITIONS))
def test_bit_flip_in_an_earlier_frame(tmp_path: Path, pristine: Pristine, where: str) -> None:
    seg, frames, bounds, _ends = pristine
    damaged_frame = 2
    offset = bounds[damaged_frame]
    data = bytearray(seg.read_bytes())
    data[offset + FLIP_POSITIONS[where]] ^= 0x10
    for mode in ("tolerate_tail", "absolute", "point_in_time"):
        wal = tmp_path / mode
        wal.mkdir()
        (wal / seg.name).write_bytes(bytes(data))
        if mode == "point_in_time":
            got, report = _recover(wal, mode)
            assert got == _expected_ops(frames, damaged_frame)
            first_dropped = len(_expected_ops(frames, damaged_frame)) + 1
            assert report.dropped_lsns == (first_dropped, len(_expected_ops(frames, 8)))
            assert report.broken_copies
            assert (wal / seg.name).stat().st_size == offset
        else:
            with pytest.raises(WALCorruptionError) as info:
                _recover(wal, mode)
            err = info.value
            assert err.segment == seg.name and err.offset == offset
            assert err.expected_lsn == len(_expected_ops(frames, damaged_frame)) + 1
            assert "not a torn tail" in str(err) and "point_in_time" in str(err)
            assert (wal / seg.name).read_bytes() == bytes(data)  # refused: untouched
        shutil.rmtree(wal)


def test_zeroed_sector_mid_log_is_not_a_torn_tail(tmp_path: Path, pristine: Pristine) -> None:
    seg, _frames, bounds, _ends = pristine
    data = bytearray(seg.read_bytes())
    data[bounds[1] : bounds[1] + 64] = bytes(64)
    wal = tmp_path / "wal"
    wal.mkdir()
    (wal / seg.name).write_bytes(bytes(data))
    with pytest.raises(WALCorruptionError) as info:
        _recover(wal, "tolerate_tail")
    assert info.value.offset == bounds[1]


def test_damage_inside_applied_lsns_is_skipped(tmp_path: Path, pristine: Pristine) -> None:
    seg, frames, bounds, _ends = pristine
    data = bytearray(seg.read_bytes())
    data[bounds[1] + 40] ^= 0xFF  # frame 2 (LSNs 2..3) is damaged, but LMDB already has them
    wal = tmp_path / "wal"
    wal.mkdir()
    (wal / seg.name).write_bytes(bytes(data))
    applied = len(_expected_ops(frames, 3))
    got, report = _recover(wal, "absolute", applied=applied)
    assert got == _expected_ops(frames, 8)[applied:]
    assert report.warnings and "already applied" in report.warnings[0]


def test_missing_and_foreign_segments_refuse_to_open(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    WalWriter_kwargs: dict[str, Any] = dict(
        store_id=STORE_ID,
        durability="none",
        segment_max_bytes=64 * 1024,
        max_frame_bytes=MAX_FRAME,
        group_commit_ms=1,
        on_durable=lambda a, b: None,
    )
    wal.mkdir()
    w = WalWriter(wal, next_lsn=1, **WalWriter_kwargs)
    for _ in range(300):
        _a, last = w.append([b"x" * 1000])
        w.wait(last)
    w.close()
    segs = sorted(wal.glob("*.wal"))
    assert len(segs) >= 3
    # a deleted middle segment
    gap = tmp_path / "gap"
    shutil.copytree(wal, gap)
    (gap / segs[1].name).unlink()
    with pytest.raises(WALCorruptionError) as info:
        _recover(gap, "tolerate_tail")
    assert info.value.reason == "missing_segment"
    # a segment from another store
    other = tmp_path / "other"
    other.mkdir()
    w2 = WalWriter(other, next_lsn=1, **{**WalWriter_kwargs, "store_id": 0xBAD})
    _a, last = w2.append([b"y"])
    w2.wait(last)
    w2.close()
    with pytest.raises(WALCorruptionError) as info:
        _recover(other, "tolerate_tail")
    assert info.value.reason == "foreign_segment"


def _store_with_held_frames(path: Path, n: int) -> None:
    records = make_mixed(__import__("numpy").random.default_rng(7), n)
    with Store.open(path, create=True, hold_applier=True) as store:
        for r in records:
            store.put(r)  # one frame per put


def test_store_opens_with_exactly_the_complete_frames(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _store_with_held_frames(base, 12)
    seg = sorted((base / "wal").glob("*.wal"))[-1]
    data = seg.read_bytes()
    scan = scan_segment(seg, data, MAX_FRAME)
    assert len(scan.frames) == 12
    end = scan.frames[-1].offset + scan.frames[-1].size  # the zeros after it are not frames
    bounds = [f.offset for f in scan.frames] + [end]
    ends = [f.offset + FRAME_HEADER_SIZE + len(f.payload) for f in scan.frames]
    for cut in range(bounds[-4], end, 13):
        complete = sum(1 for end in ends if end <= cut)
        clean = complete == len(ends) or cut <= bounds[complete]
        for mode in ("tolerate_tail", "absolute"):
            work = tmp_path / f"{mode}{cut}"
            shutil.copytree(base, work)
            with (work / "wal" / seg.name).open("r+b") as fh:
                fh.truncate(cut)
            if mode == "absolute" and not clean:
                with pytest.raises(WALCorruptionError):
                    Store.open(work, recovery_mode=mode)
            else:
                with Store.open(work, recovery_mode=mode) as store:
                    assert store.count() == complete
                    assert sorted(e.id for e in store.scan()) == list(range(1, complete + 1))
            shutil.rmtree(work)
    assert bounds[0] == HEADER_SIZE
