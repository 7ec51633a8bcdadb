"""Power-loss crash images: after every write, fsync and rename of a workload that writes,
rotates segments, checkpoints and snapshots, build the image a power loss could leave
(tests/crashfs.py); every
image must open, and every record acknowledged before the image must be in it, unchanged."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.crashfs import CrashFS
from xpstore import Store
from xpstore.demo.synthetic import make_mixed
from xpstore.model.records import Record
from xpstore.persistence import fs
from xpstore.persistence.wal_reader import scan_segment


class _Workload:
    def __init__(self, root: Path, images: Path) -> None:
        self.root = root
        self.images = images
        self.store: Store | None = None
        self.acked: dict[int, Record] = {}
        self.deleted: set[int] = set()
        self.in_flight: set[int] = set()  # a delete being logged: either outcome is right
        self.taken: list[tuple[Path, dict[int, Record], set[int], str]] = []
        self.crashfs: CrashFS | None = None
        self.torn_images = 0
        self.appended_ends = 0  # images whose newest segment ends in a large appended frame

    def point(self, kind: str) -> None:
        """Called by CrashFS after each sync or rename: take an image of that instant."""
        if self.store is None or self.crashfs is None:
            return  # the store's own open (nothing acknowledged yet)
        dest = self.images / f"{len(self.taken):04d}-{kind}"
        self.crashfs.write_image(dest)
        tables = self.store.parts.engine.tables
        assert tables is not None
        (dest / "data").mkdir(parents=True, exist_ok=True)
        tables.env.copy(str(dest / "data"))
        acked = {i: r for i, r in self.acked.items() if i not in self.in_flight}
        self.taken.append((dest, acked, set(self.deleted), kind))
        segs = sorted((dest / "wal").glob("*.wal"))
        if segs:
            data = segs[-1].read_bytes()
            scan = scan_segment(segs[-1], data, 1 << 26)
            if scan.error is not None:
                self.torn_images += 1
            elif scan.frames and scan.frames[-1].size >= 64 * 1024:
                last = scan.frames[-1]
                self.appended_ends += last.offset + last.size == len(data)


def _run_workload(tmp_path: Path, preallocate: int, large: bool = False) -> _Workload:
    """``large``: every tenth step writes a frame over 64 KiB (200 records), which a
    preallocated segment takes as an append between its zero-filled windows (1 MiB segments)."""
    root = tmp_path / "store"
    Store.open(root, create=True).close()
    work = _Workload(root, tmp_path / "images")
    rng = np.random.default_rng(5)
    records = make_mixed(rng, 3000 if large else 1000, t0=1000.0)
    work.crashfs = CrashFS(root, work.point)
    with fs.use(work.crashfs):
        store = Store.open(root, segment_max_bytes=(1 << 20) if large else 64 * 1024,
                           apply_batch_ops=50, checkpoint_interval_s=3600,
                           preallocate_bytes=preallocate)  # fmt: skip
        work.store = store
        try:
            pos = 0
            for step in range(100):
                if large and step % 10 == 4:
                    batch = records[pos : pos + 200]
                    ids = store.put_many(batch)
                    work.acked.update(zip(ids, batch, strict=True))
                    pos += 200
                elif step % 3 == 0:
                    batch = records[pos : pos + 25]
                    ids = store.put_many(batch)
                    work.acked.update(zip(ids, batch, strict=True))
                    pos += 25
                else:
                    rid = store.put(records[pos])
                    work.acked[rid] = records[pos]
                    pos += 1
                if step % 7 == 6:
                    victim = sorted(set(work.acked) - work.deleted)[step]
                    work.in_flight.add(victim)
                    store.delete(victim)
                    work.deleted.add(victim)
                    work.in_flight.discard(victim)
                if step % 10 == 9:
                    store.flush()  # apply + checkpoint: deletes covered segments
                if step % 25 == 12:
                    store.snapshot()
        finally:
            store.close()
    return work


@pytest.mark.parametrize(
    ("preallocate", "large"),
    [(0, False), (1 << 20, False), (1 << 20, True)],
    ids=["append-only", "preallocated", "preallocated-large-frames"],
)
def test_every_crash_image_opens_with_every_acknowledged_record(
    tmp_path: Path, preallocate: int, large: bool
) -> None:
    """Append-only segments, and preallocated ones: there a power loss mid-write leaves a torn
    frame over the synced zeros (or zeros not yet synced), which must read as a torn tail or the
    end of the log, never as data and never as damage to an acknowledged frame. With large
    frames, a preallocated segment also ends in an appended frame (a torn one is a torn tail)."""
    work = _run_workload(tmp_path, preallocate, large)
    kinds = {k for *_rest, k in work.taken}
    assert {"write", "fdatasync", "fsync_dir", "rename"} <= kinds
    assert len(work.taken) > 200
    assert work.torn_images > 20  # power losses mid-write: torn tails that recovery must cut
    if large:
        assert work.appended_ends > 0  # a preallocated segment ending in an appended frame
    listed = half = 0
    for dest, acked, deleted, kind in work.taken:
        snaps = dest / "snapshots"  # counted before the open, which clears half-made ones
        on_disk = sum(1 for p in snaps.iterdir() if p.is_dir()) if snaps.exists() else 0
        with Store.open(dest) as store:
            live = {e.id: e for e in store.scan()}
            for rid, record in acked.items():
                if rid in deleted:
                    assert rid not in live, f"{dest.name}: deleted id {rid} came back"
                    continue
                assert rid in live, f"{dest.name} ({kind}): acknowledged id {rid} lost"
                assert live[rid].record == record.model_copy(update={"ts": live[rid].ts})
            # a snapshot is listed only when complete, and then it verifies
            infos = store.list_snapshots()
            for info in infos:
                store.verify_snapshot(info.id)
            listed += len(infos)
            half += on_disk - len(infos)
            # nothing was invented: every id present was written by the workload
            # (an image may hold the batch in flight: up to 200 records, and a delete's LSN)
            assert set(live) <= set(range(1, max(acked, default=0) + (400 if large else 200)))
        shutil.rmtree(dest)
    assert listed > 0 and half > 0  # images caught complete snapshots and half-made ones


def test_crashfs_undoes_unsynced_renames_and_data(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    points: list[str] = []
    cfs = CrashFS(root, points.append)
    with fs.use(cfs):
        fs.write_file(root / "a.tmp", b"hello")  # synced data, name not yet durable
        fs.replace(root / "a.tmp", root / "a")
        img1 = tmp_path / "img1"
        cfs.write_image(img1)
        fs.fsync_dir(root)
        fd = fs.open_file(root / "a", os.O_WRONLY | os.O_APPEND)
        fs.write_all(fd, b"x" * 1000)  # unsynced: survives only torn at a sector edge
        img2 = tmp_path / "img2"
        cfs.write_image(img2)
        fs.close(fd)
    assert not (img1 / "a").exists()  # the rename was not covered by a directory sync
    assert (img2 / "a").read_bytes() == b"hello" + b"x" * (512 - 5)
    assert points == ["write", "fdatasync", "rename", "fsync_dir", "write"]
