"""LMDB tables directly: key encodings, idempotent batched apply, tombstones, counts."""

from __future__ import annotations

import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from xpstore.persistence.lmdb_changes import (
    Change,
    RecordDelete,
    RecordPut,
    TrackDelete,
    TrackSet,
)
from xpstore.persistence.lmdb_tables import (
    LmdbTables,
    from_u64,
    index_key,
    ts_key,
    u64,
)

finite = st.floats(allow_nan=False, allow_infinity=False)


@given(finite, finite)
@settings(max_examples=300)
def test_ts_key_preserves_float_order(a: float, b: float) -> None:
    if a < b:
        assert ts_key(a) < ts_key(b)
    elif a > b:
        assert ts_key(a) > ts_key(b)
    else:
        assert a == b


@given(st.integers(1, 3), finite, st.integers(0, 2**63 - 1))
def test_index_key_layout(kind: int, ts: float, rid: int) -> None:
    key = index_key(kind, ts, rid)
    assert len(key) == 17 and key[0] == kind and from_u64(key[9:]) == rid


def _tables(tmp_path: Path) -> LmdbTables:
    path = tmp_path / "data"
    path.mkdir()
    return LmdbTables(path, readonly=False, map_size=1 << 20)


def test_apply_is_idempotent_and_keeps_counts(tmp_path: Path) -> None:
    t = _tables(tmp_path)
    try:
        batch: list[Change] = [RecordPut(1, 1, 10.0, b"a", True), RecordPut(2, 2, 11.0, b"b", True),
                 TrackSet("trk", 2)]
        t.apply(batch, 2)
        t.apply(batch, 2)  # a replay of the same batch changes nothing
        with t.reading() as txn:
            assert t.applied_lsn(txn) == 2
            assert t.counts(txn) == {1: 1, 2: 1}
            assert t.get_record(txn, 1) == b"a" and t.get_track(txn, "trk") == 2
        t.apply([RecordPut(1, 1, 10.0, b"a2", False), RecordDelete(2, 2, 11.0, 4),
                 TrackDelete("trk", 4, 2)], 4)
        with t.reading() as txn:
            assert t.counts(txn) == {1: 1, 2: 0}
            assert t.get_record(txn, 1) == b"a2" and t.get_record(txn, 2) is None
            assert t.get_track(txn, "trk") is None
            tomb = txn.get(u64(2), db=t.db(b"tombstones"))
            assert tomb is not None
            assert struct.unpack(">QB", tomb) == (4, 2)
            ttomb = txn.get(b"trk", db=t.db(b"track_tombs"))
            assert ttomb is not None
            assert struct.unpack(">QQ", ttomb) == (4, 2)
        chunk, applied = t.index_chunk(1, bytes((1,)), bytes((2,)), 10)
        assert applied == 4 and [from_u64(k[9:]) for k, _v in chunk] == [1]
    finally:
        t.close()


def test_map_grows_when_full(tmp_path: Path) -> None:
    t = _tables(tmp_path)
    try:
        big = bytes(200_000)
        for i in range(1, 20):
            t.apply([RecordPut(i, 1, float(i), big, True)], i)
        assert t.env.info()["map_size"] > 1 << 20
        with t.reading() as txn:
            assert t.counts(txn) == {1: 19}
    finally:
        t.close()
