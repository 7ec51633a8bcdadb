"""The change feed (issue 16): ``Store.changes(since_lsn)`` in LSN order, its item shapes, and
what it does when checkpoints removed the WAL it needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpstore import ChangesTruncatedError, Store
from xpstore.demo.synthetic import make_fingerprint, make_prediction
from xpstore.errors import InvalidArgumentError


def test_items_in_lsn_order_with_their_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        ids = store.put_many([make_fingerprint(rng, f"t{i}") for i in range(4)])
        newer = store.put(make_fingerprint(rng, "t1"))  # supersedes t1
        pid = store.put(make_prediction(rng, "t0"))
        store.update(pid, actual="warm")
        store.update(ids[3], metadata={"artist": "x"})
        store.delete(ids[2])
        store.delete_track("t0")
        store.reconfigure(**{"index.ef_search": 80})
        items = list(store.changes(0))
        lsns = [i.lsn for i in items]
        assert lsns == list(range(1, len(items) + 1))
        ops = [(i.op, i.kind) for i in items]
        assert ops == [("put", "fingerprint")] * 5 + [
            ("put", "prediction"), ("update", "prediction"), ("update", "fingerprint"),
            ("delete", "fingerprint"), ("delete_track", "fingerprint"), ("settings", None),
        ]  # fmt: skip
        assert items[4].id == newer and items[4].data is not None
        assert items[4].data["track_id"] == "t1"
        assert items[7].data == {"metadata": {"artist": "x"}}
        assert items[8].id == ids[2]
        assert items[9].track_id == "t0"
        assert items[10].data == {"changes": {"index.ef_search": 80}}
        # since is exclusive, until inclusive
        assert [i.lsn for i in store.changes(5, until_lsn=7)] == [6, 7]
        assert list(store.changes(lsns[-1])) == []


def test_a_read_only_process_sees_what_lmdb_applied(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = tmp_path / "s"
    with Store.open(path, create=True, durability="none") as store:
        store.put_many([make_fingerprint(rng, f"t{i}") for i in range(3)])
        store.flush()
        with Store.open(path, readonly=True) as ro:
            assert [i.lsn for i in ro.changes(0)] == [1, 2, 3]
            assert ro.parts.changes.upto() == 3


def test_truncated_wal_raises_naming_the_first_lsn(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "s"
    cfg = {"wal.segment_max_bytes": 64 * 1024}
    with Store.open(path, create=True, durability="none", config=cfg) as store:
        for _ in range(6):
            store.put_many([make_fingerprint(rng, f"t{i}") for i in range(60)])
        store.flush()  # applies and checkpoints: the old segments go
        first = store.parts.changes.wal_first_lsn()
        assert first is not None and first > 1
        with pytest.raises(ChangesTruncatedError) as info:
            store.changes(0)
        assert info.value.first_lsn == first
        assert info.value.since_lsn == 0
        assert f"LSN {first}" in str(info.value)
        # from the WAL's start on, the feed serves again
        new = store.put(make_fingerprint(rng, "late"))
        assert [i.lsn for i in store.changes(first - 1)][-1] == new


def test_bad_since(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        with pytest.raises(InvalidArgumentError, match="since_lsn"):
            store.changes(-1)
        with pytest.raises(InvalidArgumentError, match="until_lsn"):
            store.changes(0, until_lsn="x")  # type: ignore[arg-type]
        assert list(store.changes(0)) == []
