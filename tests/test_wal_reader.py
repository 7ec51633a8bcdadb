"""The WAL reader on its own: each damage event, with its segment, offset and LSNs, on real WAL
files damaged the way test_torn_tail.py and test_corruption_table.py damage them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import files_of
from xpstore.persistence.wal import WalWriter
from xpstore.persistence.wal_format import (
    HEADER_SIZE,
    Frame,
    HeaderError,
    crc32c,
    decode_header,
    encode_frame,
    encode_header,
    segment_name,
)
from xpstore.persistence.wal_reader import (
    BadFrame,
    BadHeader,
    Damage,
    ForeignSegment,
    Gap,
    LsnOverlap,
    MissingLsns,
    NameMismatch,
    WalReader,
    header_damage,
    scan_segment,
)

STORE_ID = 0x5EED
OTHER_ID = 0xBAD
MAX_FRAME = 1 << 20
N_FRAMES = 150  # one LSN each; ~1 KiB frames in 64 KiB segments: 3 segments


def _write(wal: Path, n: int, *, store_id: int = STORE_ID, next_lsn: int = 1,
           segment_max_bytes: int = 64 * 1024, preallocate: int = 0) -> None:
    """``n`` frames of one 1000-byte operation each, LSNs from ``next_lsn``."""
    wal.mkdir(parents=True, exist_ok=True)
    writer = WalWriter(wal, store_id=store_id, next_lsn=next_lsn, durability="none",
                       segment_max_bytes=segment_max_bytes, max_frame_bytes=MAX_FRAME,
                       group_commit_ms=1, on_durable=lambda a, b: None,
                       preallocate_bytes=preallocate)
    for i in range(n):
        _first, last = writer.append([bytes([i % 251]) * 1000])
        writer.wait(last)  # one frame per append
    writer.close()


def _segs(wal: Path) -> list[Path]:
    return sorted(wal.glob("*.wal"))


def _frames(seg: Path) -> list[Frame]:
    scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    assert scan.error is None
    return scan.frames


def _patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _flip(path: Path, offset: int) -> None:
    _patch(path, offset, bytes([path.read_bytes()[offset] ^ 0x10]))


def _craft(wal: Path, name_lsn: int, frame_lsns: list[int], gap: bytes = b"") -> list[int]:
    """A segment of hand-made frames (one op each, LSNs as given; ``gap`` between the first two:
    bytes no frame is in); returns the frame offsets."""
    salt = 7
    out, offsets = [encode_header(STORE_ID, salt, name_lsn, 0.0)], []
    pos = HEADER_SIZE
    for i, lsn in enumerate(frame_lsns):
        if i == 1 and gap:
            out.append(gap)
            pos += len(gap)
        frame = encode_frame(salt.to_bytes(4, "little"), lsn, [b"op"], float(lsn))
        offsets.append(pos)
        out.append(frame)
        pos += len(frame)
    wal.mkdir(parents=True, exist_ok=True)
    (wal / segment_name(name_lsn)).write_bytes(b"".join(out))
    return offsets


def _read(
    wal: Path, *, store_id: int | None = STORE_ID, **kw: Any
) -> tuple[list[Frame | Damage], WalReader]:
    reader = WalReader(wal, store_id=store_id, max_frame_bytes=MAX_FRAME, **kw)
    return list(reader), reader


def _damage(items: list[Frame | Damage]) -> list[Damage]:
    return [i for i in items if isinstance(i, Damage)]


def _lsns(items: list[Frame | Damage]) -> list[int]:
    return [lsn for i in items if isinstance(i, Frame)
            for lsn in range(i.first_lsn, i.last_lsn + 1)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wal = tmp_path_factory.mktemp("pristine") / "wal"
    _write(wal, N_FRAMES)
    assert len(_segs(wal)) >= 3
    return wal


@pytest.fixture
def wal(tmp_path: Path, pristine: Path) -> Path:
    copy = tmp_path / "wal"
    shutil.copytree(pristine, copy)
    return copy


# ------------------------------------------------------------------------ a clean log


def test_a_clean_log_is_every_frame_in_lsn_order(wal: Path) -> None:
    reader = WalReader(wal, store_id=STORE_ID, max_frame_bytes=MAX_FRAME)
    seen: list[tuple[Path | None, int]] = []
    for item in reader:
        assert isinstance(item, Frame)
        seen.append((reader.segment, item.first_lsn))
    assert [lsn for _seg, lsn in seen] == list(range(1, N_FRAMES + 1))
    by_segment = {f.first_lsn: seg for seg in _segs(wal) for f in _frames(seg)}
    assert all(by_segment[lsn] == seg for seg, lsn in seen)
    assert (reader.first_lsn, reader.end_lsn) == (1, N_FRAMES)
    assert reader.segments_read == len(reader.listed) == len(_segs(wal))


def test_skip_older_reads_from_the_segment_holding_start_lsn(wal: Path) -> None:
    third = _segs(wal)[2]
    start = _frames(third)[3].first_lsn
    items, reader = _read(wal, start_lsn=start, skip_older=True)
    assert not _damage(items) and reader.segments_read == len(_segs(wal)) - 2
    assert _lsns(items)[0] == _frames(third)[0].first_lsn


# ------------------------------------------------------------------------ bad frames


def test_a_bad_frame_mid_segment_names_its_lsns_and_where_reading_resumes(wal: Path) -> None:
    seg = _segs(wal)[1]
    frames = _frames(seg)
    hit, nxt = frames[4], frames[5]
    _flip(seg, hit.offset + 40)  # the payload
    items, reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, BadFrame)
    assert (bad.segment, bad.offset, bad.reason) == (seg, hit.offset, "crc_mismatch")
    assert bad.where == f"wal/{seg.name}+{hit.offset}"
    assert bad.expected_lsn == hit.first_lsn
    assert (bad.first_lsn, bad.last_lsn) == (hit.first_lsn, hit.last_lsn)
    assert (bad.resume_offset, bad.resume_lsn) == (nxt.offset, nxt.first_lsn)
    assert not bad.torn
    index = items.index(bad)  # yielded just before the frame reading resumed at
    assert isinstance(items[index + 1], Frame) and items[index + 1].offset == nxt.offset
    assert _lsns(items) == [n for n in range(1, N_FRAMES + 1) if n != hit.first_lsn]
    assert reader.end_lsn == N_FRAMES


def test_bytes_between_two_frames_in_sequence_hide_no_lsn(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    offsets = _craft(wal, 1, [1, 2, 3], gap=b"\xff" * 8)
    items, _reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, BadFrame)
    assert (bad.offset, bad.reason, bad.expected_lsn) == (offsets[1] - 8, "bad_length", 2)
    assert (bad.first_lsn, bad.last_lsn) == (None, None)
    assert (bad.resume_offset, bad.resume_lsn) == (offsets[1], 2)
    assert _lsns(items) == [1, 2, 3]


@pytest.mark.parametrize("keep", [20, 40, 100])
def test_a_torn_last_frame_is_torn_and_hides_lsns_to_the_end(wal: Path, keep: int) -> None:
    seg = _segs(wal)[-1]
    last = _frames(seg)[-1]
    with seg.open("r+b") as fh:
        fh.truncate(last.offset + keep)
    items, reader = _read(wal)
    (bad,) = _damage(items)
    assert items[-1] is bad
    assert isinstance(bad, BadFrame) and bad.torn
    assert (bad.segment, bad.offset, bad.expected_lsn) == (seg, last.offset, last.first_lsn)
    assert (bad.first_lsn, bad.last_lsn) == (last.first_lsn, None)
    assert bad.resume_offset is None and bad.resume_lsn is None
    assert reader.end_lsn == last.first_lsn - 1


def test_a_bad_tail_of_an_older_segment_is_closed_by_the_next_one(wal: Path) -> None:
    first, second = _segs(wal)[:2]
    last = _frames(first)[-1]
    _patch(first, last.offset, bytes(first.stat().st_size - last.offset))  # zeroed sector
    items, _reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, BadFrame) and not bad.torn
    assert (bad.segment, bad.offset, bad.reason) == (first, last.offset, "zeroed")
    assert (bad.first_lsn, bad.last_lsn) == (last.first_lsn, _frames(second)[0].first_lsn - 1)
    assert bad.resume_offset is None


def test_the_first_of_several_damages_carries_the_lsns_they_hide(wal: Path) -> None:
    first, second, third = _segs(wal)[:3]
    last = _frames(first)[-1]
    with first.open("r+b") as fh:  # the tail of the first segment, nothing valid after it
        fh.truncate(last.offset + 20)
    _flip(second, 20)  # and the whole next segment
    items, _reader = _read(wal)
    bad, header = _damage(items)
    assert isinstance(bad, BadFrame) and isinstance(header, BadHeader)
    assert (bad.first_lsn, bad.last_lsn) == (last.first_lsn, _frames(third)[0].first_lsn - 1)
    assert (header.first_lsn, header.last_lsn) == (None, None)  # already counted
    assert not bad.torn and not header.torn


# ------------------------------------------------------------------------ segment headers


def test_a_bad_header_skips_the_segment_and_hides_its_lsns(wal: Path) -> None:
    _first, middle, after = _segs(wal)[:3]
    lsns = _frames(middle)
    _flip(middle, 20)  # inside the store id: the header checksum fails
    items, reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, BadHeader)
    assert (bad.segment, bad.offset, bad.reason) == (middle, 0, "header_crc_mismatch")
    assert bad.expected_lsn == lsns[0].first_lsn and not bad.torn
    assert (bad.first_lsn, bad.last_lsn) == (lsns[0].first_lsn, _frames(after)[0].first_lsn - 1)
    assert reader.segments_read == len(_segs(wal))


def test_a_half_created_last_segment_is_a_torn_header(wal: Path) -> None:
    _write(wal, 0, next_lsn=N_FRAMES + 1)  # an open that created a segment, nothing written
    newest = _segs(wal)[-1]
    with newest.open("r+b") as fh:
        fh.truncate(20)
    items, _reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, BadHeader) and bad.torn
    assert (bad.segment, bad.offset, bad.reason) == (newest, 0, "truncated_header")
    assert (bad.expected_lsn, bad.first_lsn, bad.last_lsn) == (N_FRAMES + 1, N_FRAMES + 1, None)
    assert _lsns(items) == list(range(1, N_FRAMES + 1))


def test_a_segment_of_another_store(tmp_path: Path, wal: Path) -> None:
    other = tmp_path / "other"
    _write(other, 3, store_id=OTHER_ID, next_lsn=N_FRAMES + 1)
    shutil.copy(_segs(other)[0], wal / segment_name(N_FRAMES + 1))
    items, _reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, ForeignSegment) and bad.store_id == OTHER_ID
    assert (bad.segment.name, bad.offset, bad.reason) == (
        segment_name(N_FRAMES + 1), 0, "foreign_segment")
    assert (bad.expected_lsn, bad.first_lsn, bad.last_lsn) == (N_FRAMES + 1, N_FRAMES + 1, None)
    assert not bad.torn  # a whole segment, not a write cut short
    assert f"{OTHER_ID:#x}" in bad.detail and f"{STORE_ID:#x}" in bad.detail
    unchecked, _reader = _read(wal, store_id=None)  # no store id: nothing to compare
    assert not _damage(unchecked) and _lsns(unchecked)[-1] == N_FRAMES + 3


def test_a_segment_copied_under_another_name(wal: Path) -> None:
    name = segment_name(N_FRAMES + 1)
    shutil.copy(_segs(wal)[0], wal / name)
    items, _reader = _read(wal)
    (bad,) = _damage(items)
    assert isinstance(bad, NameMismatch) and bad.header_lsn == 1
    assert (bad.segment.name, bad.offset, bad.reason) == (name, 0, "name_mismatch")
    assert (bad.first_lsn, bad.last_lsn, bad.torn) == (N_FRAMES + 1, None, False)
    assert "header says first LSN 1" in bad.detail
    assert _lsns(items) == list(range(1, N_FRAMES + 1))


def test_header_damage_lists_every_reason_a_segment_is_not_ours(tmp_path: Path) -> None:
    other = tmp_path / "other"
    _write(other, 1, store_id=OTHER_ID, next_lsn=5)
    seg = _segs(other)[0]
    header = scan_segment(seg, seg.read_bytes(), MAX_FRAME).header
    assert header is not None
    found = header_damage(seg, header, store_id=STORE_ID, name_lsn=9)
    assert [type(d).__name__ for d in found] == ["ForeignSegment", "NameMismatch"]
    assert header_damage(seg, header, store_id=None, name_lsn=None) == []


# ------------------------------------------------------------------------ LSN continuity


def test_a_deleted_segment_is_missing_lsns_before_the_next(wal: Path) -> None:
    _first, victim, after = _segs(wal)[:3]
    lost = _frames(victim)
    victim.unlink()
    items, _reader = _read(wal)
    (gap,) = _damage(items)
    assert isinstance(gap, MissingLsns)
    assert (gap.segment, gap.offset, gap.reason) == (after, 0, "missing_segment")
    assert (gap.expected_lsn, gap.first_lsn, gap.last_lsn) == (
        lost[0].first_lsn, lost[0].first_lsn, lost[-1].last_lsn)
    assert not gap.torn


def test_start_lsn_the_log_must_reach_back_to(wal: Path) -> None:
    oldest, second = _segs(wal)[:2]
    oldest.unlink()
    start = _frames(second)[0].first_lsn
    items, reader = _read(wal)  # on its own the log just starts later
    assert not _damage(items) and reader.first_lsn == start
    items, _reader = _read(wal, start_lsn=1)  # LMDB holds nothing: LSNs 1.. are missing
    gap = items[0]
    assert isinstance(gap, MissingLsns)
    assert (gap.segment, gap.offset, gap.first_lsn, gap.last_lsn) == (second, 0, 1, start - 1)


def test_a_segment_starting_inside_the_log_read_so_far(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    _write(wal, 10, segment_max_bytes=1 << 30)  # one segment, LSNs 1..10
    stale = tmp_path / "stale"
    _write(stale, 8, next_lsn=5, segment_max_bytes=1 << 30)  # LSNs 5..12 under name 5
    shutil.copy(_segs(stale)[0], wal / segment_name(5))
    items, reader = _read(wal)
    (over,) = _damage(items)
    assert isinstance(over, LsnOverlap)
    assert (over.segment.name, over.offset, over.reason) == (segment_name(5), 0, "lsn_overlap")
    assert over.expected_lsn == 11 and (over.first_lsn, over.last_lsn) == (None, None)
    assert _lsns(items) == list(range(1, 13))  # 11 and 12 come from the later segment
    assert reader.end_lsn == 12


def test_a_frame_repeating_lsns_is_skipped(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    offsets = _craft(wal, 1, [1, 2, 2, 3])
    items, _reader = _read(wal)
    (over,) = _damage(items)
    assert isinstance(over, LsnOverlap)
    assert (over.offset, over.expected_lsn, over.first_lsn) == (offsets[2], 3, None)
    assert _lsns(items) == [1, 2, 3]


def test_a_frame_skipping_lsns(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    offsets = _craft(wal, 1, [1, 2, 5, 6])
    items, _reader = _read(wal)
    (gap,) = _damage(items)
    assert isinstance(gap, MissingLsns)
    assert (gap.offset, gap.reason, gap.first_lsn, gap.last_lsn) == (offsets[2], "lsn_gap", 3, 4)
    assert _lsns(items) == [1, 2, 5, 6]


# ------------------------------------------------------------------------ one file, gaps


def test_scan_segment_stops_at_the_first_bad_frame(wal: Path) -> None:
    seg = _segs(wal)[0]
    frames = _frames(seg)
    _flip(seg, frames[2].offset + 36)
    scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    assert [f.offset for f in scan.frames] == [f.offset for f in frames[:2]]
    assert isinstance(scan.error, BadFrame) and scan.error.offset == frames[2].offset
    assert scan.error.resume_offset == frames[3].offset
    assert scan.end_lsn == frames[2].first_lsn
    _flip(seg, 0)
    broken = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    assert isinstance(broken.error, BadHeader) and broken.error.reason == "bad_magic"
    assert broken.frames == [] and broken.header is None


def test_gap_of_a_damage_says_what_lmdb_supplies_and_what_is_lost(wal: Path) -> None:
    seg = _segs(wal)[0]
    hit = _frames(seg)[3]
    _flip(seg, hit.offset + 40)
    (bad,) = _damage(_read(wal)[0])
    lost = Gap.of(bad, applied_lsn=0)
    assert (lost.where, lost.first_lsn, lost.last_lsn) == (bad.where, hit.first_lsn, hit.last_lsn)
    assert lost.lost and lost.from_lmdb is None
    kept = Gap.of(bad, applied_lsn=hit.last_lsn)
    assert not kept.lost and kept.from_lmdb == (hit.first_lsn, hit.last_lsn)
    assert not Gap.of(bad, applied_lsn=hit.last_lsn, lmdb=False).from_lmdb
    assert "LSNs" in lost.describe() and lost.as_dict()["where"] == bad.where


def test_a_torn_tail_is_no_lost_operation(wal: Path) -> None:
    seg = _segs(wal)[-1]
    with seg.open("r+b") as fh:
        fh.truncate(_frames(seg)[-1].offset + 10)
    (bad,) = _damage(_read(wal)[0])
    gap = Gap.of(bad, applied_lsn=0)
    assert gap.torn and not gap.lost and gap.last_lsn is None


def test_reading_changes_nothing(wal: Path) -> None:
    _flip(_segs(wal)[0], _frames(_segs(wal)[0])[1].offset + 40)
    _segs(wal)[1].unlink()
    before = files_of(wal)
    items, _reader = _read(wal, start_lsn=1)
    assert len(_damage(items)) == 2
    assert files_of(wal) == before


def test_zero_tails_of_preallocated_segments_are_the_end_not_damage(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    _write(wal, N_FRAMES, preallocate=1 << 20)
    segs = _segs(wal)
    assert len(segs) >= 3
    for seg in segs:
        scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
        assert scan.header is not None and scan.header.preallocated and scan.header.version == 2
        assert scan.error is None and scan.size % 4096 == 0
    assert scan.size > scan.frames[-1].offset + scan.frames[-1].size  # the newest: zeros after
    items, reader = _read(wal)
    assert _damage(items) == []
    assert _lsns(items) == list(range(1, N_FRAMES + 1)) and reader.end_lsn == N_FRAMES


def test_zeros_are_damage_in_an_append_only_segment_or_before_valid_bytes(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "plain"
    _write(plain, 3)
    seg = _segs(plain)[0]
    assert scan_segment(seg, seg.read_bytes(), MAX_FRAME).header.version == 1  # type: ignore[union-attr]
    seg.write_bytes(seg.read_bytes() + bytes(4096))  # zeros after an append-only segment
    (bad,) = _damage(_read(plain)[0])
    assert isinstance(bad, BadFrame) and bad.reason == "zeroed" and bad.torn
    pre = tmp_path / "pre"
    _write(pre, 3, preallocate=1 << 20)
    seg = _segs(pre)[0]
    first, second, _third = _frames(seg)
    _patch(seg, first.offset, bytes(first.size))  # zeros with valid frames after them
    (bad,) = _damage(_read(pre)[0])
    assert isinstance(bad, BadFrame) and bad.reason == "zeroed" and not bad.torn
    assert (bad.offset, bad.resume_offset) == (first.offset, second.offset)


def test_a_zero_tail_before_a_hole_is_still_a_missing_segment(tmp_path: Path) -> None:
    wal = tmp_path / "wal"
    _write(wal, N_FRAMES, preallocate=1 << 20)
    first, second, third = _segs(wal)[:3]
    second.unlink()
    items, _reader = _read(wal)
    (hole,) = _damage(items)
    assert isinstance(hole, MissingLsns) and hole.reason == "missing_segment"
    assert (hole.segment, hole.first_lsn) == (third, _frames(first)[-1].last_lsn + 1)


def test_unknown_segment_flags_are_a_newer_format(tmp_path: Path) -> None:
    for version_flags in (encode_header(STORE_ID, 1, 1, 0.0, flags=2),):
        with pytest.raises(HeaderError) as info:
            decode_header(version_flags)
        assert info.value.reason == "newer_version"
    v1 = bytearray(encode_header(STORE_ID, 1, 1, 0.0))
    v1[12] = 1  # the preallocated flag in a version-1 header: never written, so refused
    v1[48:52] = crc32c(bytes(v1[:48])).to_bytes(4, "little")
    with pytest.raises(HeaderError) as info:
        decode_header(bytes(v1))
    assert info.value.reason == "newer_version"
