"""Stores written before codec version 2: their version-1 puts open, recover and replay as before,
alone or mixed with version-2 puts in one log, through the same fast replay path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint, make_mixed
from xpstore.model.codec import KIND_CODES, DeleteOp, PutOp, UpdateOp, encode_op, put_head
from xpstore.model.records import Fingerprint, PredictionOutcome, Record, kind_of
from xpstore.ops.replay import replay
from xpstore.persistence.wal import WalWriter


def _v1_put(rec: Record) -> bytes:
    """A put exactly as codec version 1 wrote it: ``[1, 1, kind_code, record_map]``."""
    record_map = msgpack.unpackb(encode_op(PutOp(rec)))[-1]
    return msgpack.packb([1, 1, KIND_CODES[kind_of(rec)], record_map], use_bin_type=True)


def _append_frames(path: Path, frames: list[list[bytes]], next_lsn: int, **kw: Any) -> None:
    """Append frames to a closed store's log, as the xpstore that wrote them would have."""
    store_id = json.loads((path / "xpstore.json").read_text())["store_id"]
    writer = WalWriter(path / "wal", store_id=store_id, next_lsn=next_lsn, durability="commit",
                       segment_max_bytes=64 * 1024, max_frame_bytes=1 << 24, group_commit_ms=1,
                       on_durable=lambda a, b: None, **kw)
    for ops in frames:
        _first, last = writer.append(ops)
        writer.wait(last)
    writer.close()


def _stamped(records: list[Record], t0: float) -> list[Record]:
    return [r.model_copy(update={"ts": t0 + i}) for i, r in enumerate(records)]


def test_a_log_of_version_1_puts_recovers_and_replays(tmp_path: Path) -> None:
    path = tmp_path / "store"
    Store.open(path, create=True).close()
    records = _stamped(make_mixed(np.random.default_rng(4), 300, t0=10.0), 10.0)
    ops = [_v1_put(r) for r in records]
    assert all(put_head(op) is None for op in ops)
    # frames of 1 and of 50 puts, in an append-only log as the old writer made it
    frames = [ops[:1], *[ops[i : i + 50] for i in range(1, 300, 50)]]
    _append_frames(path, frames, next_lsn=1)
    streamed = [item for item in replay(path) if item.op == "put"]
    assert [i.lsn for i in streamed] == list(range(1, 301))
    assert [i.record for i in streamed] == records
    with Store.open(path) as store:
        report = store.recovery_report
        assert report is not None and report.replayed_ops == 300
        assert [store.get(i + 1).record for i in range(300)] == records
        assert store.count() == 300
        fps = [(i + 1, r) for i, r in enumerate(records) if isinstance(r, Fingerprint)]
        newest = {r.track_id: rid for rid, r in fps}
        for track, rid in newest.items():
            assert store.get_fingerprint(track).id == rid
    with Store.open(path, readonly=True) as again:
        assert again.check().ok


def test_version_1_and_2_puts_mixed_with_updates_and_deletes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    rng = np.random.default_rng(5)
    new = _stamped(make_mixed(rng, 40, t0=0.0), 1000.0)
    with Store.open(path, create=True, hold_applier=True) as store:
        ids = store.put_many(new)  # version 2, still in the WAL only
    old = _stamped([make_fingerprint(rng, "shared"), PredictionOutcome(
        predicted="warm", confidence=0.4, context="c")], 2000.0)
    first_old = ids[-1] + 1
    pred = next(i for i, r in zip(ids, new, strict=True) if isinstance(r, PredictionOutcome))
    frames = [
        [_v1_put(old[0]), _v1_put(old[1])],
        [encode_op(UpdateOp(first_old + 1, {"actual": "cold"})), encode_op(DeleteOp(ids[0]))],
        [encode_op(UpdateOp(pred, {"actual": "hot"}))],
    ]
    _append_frames(path, frames, next_lsn=first_old, preallocate_bytes=1 << 20)
    fresh = make_fingerprint(rng, "shared").model_copy(update={"ts": 3000.0})
    with Store.open(path, apply_batch_ops=7) as store:  # batches end inside the frames too
        assert store.count() == 40 - 1 + 2
        assert store.get(first_old).record == old[0]
        assert store.get(first_old + 1).record == old[1].model_copy(update={"actual": "cold"})
        assert store.get(pred).record.actual == "hot"  # type: ignore[union-attr]
        assert store.get_fingerprint("shared").id == first_old
        rid = store.put(fresh)  # a version-2 put supersedes the version-1 track
        assert store.get_fingerprint("shared").id == rid
    with Store.open(path) as reopened:
        assert reopened.get_fingerprint("shared").id == rid
        assert {e.id for e in reopened.scan()} == (set(ids) - {ids[0]}) | {first_old,
                                                                          first_old + 1, rid}
