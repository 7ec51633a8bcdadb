"""WAL framing, rotation, group commit, checkpoint truncation, and fsync/ENOSPC poisoning."""

from __future__ import annotations

import errno
import itertools
import struct
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpstore import RecordTooLargeError, Store, WALWriteError
from xpstore.demo.synthetic import make_mixed, make_prediction
from xpstore.persistence import fs
from xpstore.persistence.wal import WalWriter
from xpstore.persistence.wal_format import (
    HEADER_SIZE,
    HeaderError,
    decode_frame,
    decode_header,
    encode_frame,
    encode_header,
    frame_size,
)
from xpstore.persistence.wal_reader import scan_segment


def _writer(wal: Path, **kw: Any) -> WalWriter:
    wal.mkdir(exist_ok=True)
    args: dict[str, Any] = dict(
        store_id=1,
        next_lsn=1,
        durability="commit",
        segment_max_bytes=1 << 20,
        max_frame_bytes=1 << 20,
        group_commit_ms=1,
        on_durable=lambda a, b: None,
    )
    args.update(kw)
    return WalWriter(wal, **args)


def test_header_round_trip_and_damage() -> None:
    raw = encode_header(42, 7, 1000, 1.5)
    assert len(raw) == HEADER_SIZE
    hdr = decode_header(raw)
    assert (hdr.store_id, hdr.salt, hdr.first_lsn, hdr.created) == (42, 7, 1000, 1.5)
    bad = bytearray(raw)
    bad[20] ^= 1
    with pytest.raises(HeaderError) as info:
        decode_header(bytes(bad))
    assert info.value.reason == "header_crc_mismatch"
    with pytest.raises(HeaderError) as info:
        decode_header(raw[:30])
    assert info.value.reason == "truncated_header"


def test_frames_are_aligned_and_checksummed_with_the_salt(tmp_path: Path) -> None:
    salt = (9).to_bytes(4, "little")
    frame = encode_frame(salt, 5, [b"a", b"bcd"], 2.0)
    assert len(frame) % 8 == 0
    seg = tmp_path / "x.wal"
    seg.write_bytes(encode_header(1, 9, 5, 0.0) + frame)
    scan = scan_segment(seg, seg.read_bytes(), 1 << 20)
    assert scan.error is None
    assert [(f.first_lsn, f.count, f.ops()) for f in scan.frames] == [(5, 2, [b"a", b"bcd"])]
    # the same frame under another salt does not validate
    seg.write_bytes(encode_header(1, 10, 5, 0.0) + frame)
    scan = scan_segment(seg, seg.read_bytes(), 1 << 20)
    assert scan.frames == [] and scan.error is not None and scan.error.reason == "crc_mismatch"


def test_lsns_are_consecutive_and_rotation_creates_named_segments(tmp_path: Path) -> None:
    w = _writer(tmp_path / "wal", segment_max_bytes=64 * 1024)
    spans = []
    for i in range(200):
        first, last = w.append([bytes(600)] * (1 + i % 3))
        w.wait(last)
        spans.append((first, last))
    w.close()
    assert spans[0][0] == 1
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(spans))
    segs = sorted((tmp_path / "wal").glob("*.wal"))
    assert len(segs) > 3 and w.stats.rotations == len(segs) - 1
    expected: int | None = 1
    for seg in segs:
        scan = scan_segment(seg, seg.read_bytes(), 1 << 20)
        assert scan.error is None
        assert scan.header is not None and scan.header.first_lsn == expected == int(seg.stem)
        expected = scan.end_lsn
    assert expected == spans[-1][1] + 1


def test_group_commit_shares_syncs_between_threads(tmp_path: Path) -> None:
    w = _writer(tmp_path / "wal")
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(100):
            _f, last = w.append([b"x" * 200])
            w.wait(last)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    assert w.stats.ops == 800
    assert w.stats.syncs < 800  # concurrent writers shared fsyncs
    seg = next((tmp_path / "wal").glob("*.wal"))
    scan = scan_segment(seg, seg.read_bytes(), 1 << 20)
    assert sum(f.count for f in scan.frames) == 800


def test_oversized_batch_is_refused_before_anything_is_logged(store_path: Path) -> None:
    with Store.open(store_path, create=True, max_frame_bytes=64 * 1024) as store:
        rng = np.random.default_rng(0)
        records = [make_prediction(rng) for _ in range(2000)]
        with pytest.raises(RecordTooLargeError) as info:
            store.put_many(records)
        assert "max_frame_bytes" in str(info.value)
        assert store.count() == 0
        store.put(records[0])
        assert store.count() == 1


def test_checkpoint_removes_covered_segments(store_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Store.open(store_path, create=True, segment_max_bytes=64 * 1024) as store:
        for _ in range(20):
            store.put_many(make_mixed(rng, 200))
        before = len(list((store_path / "wal").glob("*.wal")))
        store.flush()
        after = len(list((store_path / "wal").glob("*.wal")))
        # the background checkpoint may already have removed some; flush removes the rest
        assert store.stats()["wal"]["rotations"] > 2 and before >= 2 and after == 1
        assert store.count() == 4000


def _failing_fdatasync(err: int) -> Callable[[int], None]:
    def fail(fd: int) -> None:
        raise OSError(err, "injected")

    return fail


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
def test_fsync_failure_poisons_the_log_and_reopen_recovers_acked(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    rng = np.random.default_rng(2)
    records = make_mixed(rng, 50)
    store = Store.open(store_path, create=True, hold_applier=True)
    acked = store.put_many(records[:40])
    monkeypatch.setattr(fs, "fdatasync", _failing_fdatasync(err))
    with pytest.raises(WALWriteError) as info:
        store.put(records[40])
    assert "fdatasync" in str(info.value) and "never retried" in str(info.value)
    monkeypatch.undo()  # the disk is fine again; the log must still refuse
    with pytest.raises(WALWriteError):
        store.put(records[41])
    store.close()
    with Store.open(store_path) as reopened:
        for rid, rec in zip(acked, records[:40], strict=True):
            assert reopened.get(rid).record == rec.model_copy(update={"ts": reopened.get(rid).ts})
        # the failed put may or may not have reached the disk, but nothing else did
        assert reopened.count() in (40, 41)
        new_id = reopened.put(records[42])
        assert new_id > max(acked)


@pytest.mark.parametrize("what", ["frame", "zero-fill", "append-only frame"])
def test_write_enospc_poisons_with_a_clear_error(
    store_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    rng = np.random.default_rng(3)
    prealloc = 0 if what == "append-only frame" else 1 << 20
    with Store.open(store_path, create=True, preallocate_bytes=prealloc) as store:
        first = store.put(make_prediction(rng))
    # reopened: a new segment, whose first put zero-fills its first window, then writes
    store = Store.open(store_path, preallocate_bytes=prealloc)
    real = fs.pwrite_all

    def full(fd: int, data: bytes | memoryview, offset: int) -> None:
        if (what == "zero-fill") == (not any(data)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(fs, "pwrite_all", full)
    with pytest.raises(WALWriteError) as info:
        store.put(make_prediction(rng))
    msg = str(info.value)
    assert "ENOSPC" in msg and "free disk space" in msg and "reopen" in msg
    monkeypatch.undo()
    assert store.count() == 1
    store.close()
    with Store.open(store_path) as reopened:
        assert reopened.count() == 1 and reopened.get(first).id == first


def test_lmdb_failure_in_the_applier_refuses_writes_and_reopen_replays(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lmdb

    from xpstore.persistence.lmdb_changes import Change
    from xpstore.persistence.lmdb_tables import LmdbTables

    rng = np.random.default_rng(4)
    records = make_mixed(rng, 30)
    store = Store.open(store_path, create=True, apply_interval_ms=1)
    real_apply = LmdbTables.apply
    failed = threading.Event()

    def broken_apply(self: LmdbTables, changes: Sequence[Change], applied_lsn: int) -> None:
        failed.set()
        raise lmdb_env.translate(lmdb.DiskError("mdb_txn_commit: No space left on device"), "x")

    from xpstore.persistence import lmdb_env

    monkeypatch.setattr(LmdbTables, "apply", broken_apply)
    acked = store.put_many(records[:20])  # acknowledged by the WAL; the apply fails behind it
    assert failed.wait(10)
    assert store.parts.engine.applier is not None and store.parts.engine.applier.join(10)
    with pytest.raises(WALWriteError) as info:
        store.put(records[20])
    assert "No space left" in str(info.value)
    assert store.get(acked[0]).id == acked[0]  # reads still served from the overlay
    monkeypatch.setattr(LmdbTables, "apply", real_apply)
    store.close()
    with Store.open(store_path) as reopened:
        assert reopened.count() == 20
        assert [reopened.get(i).id for i in acked] == acked


def test_background_checkpoint_bounds_the_wal_under_steady_writes(store_path: Path) -> None:
    rng = np.random.default_rng(9)
    with Store.open(
        store_path, create=True, segment_max_bytes=64 * 1024, apply_interval_ms=5,
        checkpoint_interval_s=0.01,
    ) as store:
        most = 0
        for _ in range(60):
            store.put_many(make_mixed(rng, 100))
            most = max(most, len(list((store_path / "wal").glob("*.wal"))))
        written = store.stats()["wal"]["rotations"] + 1
        assert written > 20  # the workload produced many segments...
        assert most < written // 2  # ...but checkpoints deleted them as it went


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.binary(max_size=300), min_size=1, max_size=40),
       first=st.integers(1, 2**40), salt=st.binary(min_size=4, max_size=4))  # fmt: skip
def test_frame_layout_is_the_documented_one(ops: list[bytes], first: int, salt: bytes) -> None:
    """``encode_frame`` (one C-level join) writes exactly docs/formats.md's layout: a length
    per operation, the CRC over salt + header + payload, zero pad to 8; it decodes back."""
    frame = encode_frame(salt, first, ops, 12.5)
    payload = b"".join(struct.pack("<I", len(op)) + op for op in ops)
    head = struct.pack("<IQIBBHd", len(payload), first, len(ops), 1, 0, 0, 12.5)
    crc = int(google_crc32c.extend(google_crc32c.extend(google_crc32c.value(salt), head),
                                   payload))  # fmt: skip
    body = struct.pack("<I", crc) + head + payload
    assert frame == body + bytes(-len(body) % 8)
    assert frame_size(ops) == len(frame)
    got = decode_frame(memoryview(frame), 0, salt, 1 << 30)
    assert got.first_lsn == first and got.ops() == ops
