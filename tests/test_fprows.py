"""The ``fprows`` table (issue 15, item 5): one fixed-width row per fingerprint record, kept by the
applier, from which the index attaches without decoding envelopes.

The table must equal the rows recomputed from the records after puts (single and columnar),
updates, deletes, a reopen and a SIGKILL recovery; a store written before it is filled at the
first attach; a damaged row is detected by its check word, by ``check`` and at attach (which
then reads the record's envelope and rewrites the row); the cached statistics are used only
for the exact live set they were fitted on. Real LMDB, real processes, small sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import lmdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.index_support import index_manager, library
from xpstore import InvalidArgumentError, Store
from xpstore.index.embedding import AudioStats, ScalingMode
from xpstore.index.live import read_library
from xpstore.model.fprows import (
    FP_CODE,
    decode_rows,
    encode_rows,
    rows_for_envelopes,
    set_digest,
)
from xpstore.model.records import BATCH_FIELDS, STREAMING_FIELDS
from xpstore.persistence.lmdb_tables import LmdbTables, from_u64, u64

N = 120
EMB = 4


def _tables(store: Store) -> LmdbTables:
    return store.parts.engine.tables


def _fingerprint_records(tables: LmdbTables) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    with tables.reading() as txn:
        for key, value in txn.cursor(db=tables.db(b"records")).iternext():
            if bytes(value)[2] == FP_CODE:
                out[from_u64(bytes(key))] = bytes(value)
    return out


def _table(tables: LmdbTables) -> dict[int, bytes]:
    with tables.reading() as txn:
        return {from_u64(bytes(k)): bytes(v)
                for k, v in txn.cursor(db=tables.db(b"fprows")).iternext()}  # fmt: skip


def assert_consistent(store: Store) -> None:
    """The table holds exactly one row per fingerprint record, equal to its recomputation."""
    store.flush()
    tables = _tables(store)
    records = _fingerprint_records(tables)
    table = _table(tables)
    assert sorted(table) == sorted(records)
    ids = sorted(records)
    assert [table[r] for r in ids] == rows_for_envelopes(ids, [records[r] for r in ids])
    with tables.reading() as txn:
        assert tables.fprows_complete(txn)
    report = store.check()
    assert report.ok, report.problems
    assert report.stats["fprows"] == len(records)


def _fill(store: Store, rng: np.random.Generator) -> None:
    for fp in library(rng, N // 2, "a", embedding_dim=EMB):
        store.put(fp)
    store.put_many(library(rng, 10, "s", with_batch=False, with_streaming=True))  # streaming only
    values = np.array([[getattr(fp.batch, name) for name in BATCH_FIELDS]
                       for fp in library(rng, N // 2, "x", with_streaming=False)])  # fmt: skip
    store.put_fingerprints([f"b{i}" for i in range(N // 2)], values)


def _mutate(store: Store, rng: np.random.Generator) -> None:
    a3 = store.get_fingerprint("a3").id
    store.update(a3, metadata={"edited": "yes"})
    store.delete(store.get_fingerprint("a4").id)
    store.delete_track("b5")
    store.put(library(rng, 1, "a", embedding_dim=EMB)[0])  # a0 again: a new current fingerprint


# ----------------------------------------------------------------------------- row format


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=12),
    st.integers(0, 10_000),
    st.data(),
)
def test_rows_round_trip_and_any_flipped_byte_is_detected(
    emb_lens: list[int], seed: int, data: st.DataObject
) -> None:
    rng = np.random.default_rng(seed)
    n = len(emb_lens)
    audio = rng.normal(size=(n, 25))
    audio[rng.random((n, 25)) < 0.2] = np.nan
    embs = [None if k == 0 else rng.normal(size=k).astype(np.float32) for k in emb_lens]
    ids = list(range(10, 10 + n))
    rows = encode_rows(ids, audio, embs)
    cols = decode_rows(rows, 3)
    assert cols.bad == [] and cols.ids.tolist() == ids
    np.testing.assert_array_equal(cols.audio, audio)
    for i, k in enumerate(emb_lens):
        assert bool(cols.has_embedding[i]) == (k == 3)
        if k == 3:
            np.testing.assert_array_equal(cols.embedding[i], embs[i])  # type: ignore[index]
    victim = data.draw(st.integers(0, n - 1))
    at = data.draw(st.integers(0, len(rows[victim]) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(rows[victim])
    damaged[at] ^= 1 << bit
    got = decode_rows([*rows[:victim], bytes(damaged), *rows[victim + 1 :]], 3)
    assert len(got) == n - 1 and len(got.bad) == 1
    assert decode_rows([bytes(len(rows[0]))], None).bad  # an all-zero row fails too
    assert set_digest(cols.check) == set_digest(cols.check[::-1].copy())


def test_a_damaged_header_claiming_the_embedding_dimension_is_a_bad_row() -> None:
    """Hypothesis found it: a row with one embedding value whose header is flipped to claim
    the store's three is a bad row, not a ValueError from copying three values out of one."""
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(3, 25))
    embs = [rng.normal(size=k).astype(np.float32) if k else None for k in (1, 3, 0)]
    rows = encode_rows([10, 11, 12], audio, embs)
    damaged = bytearray(rows[0])
    damaged[8] ^= 0b10  # the low byte of the row's embedding length: 1 -> 3
    got = decode_rows([bytes(damaged), *rows[1:]], 3)
    assert got.ids.tolist() == [11, 12] and len(got.bad) == 1
    np.testing.assert_array_equal(got.embedding[0], embs[1])  # type: ignore[index]


def test_rows_of_mixed_widths_that_add_up_like_one_width_decode_right() -> None:
    """The reader takes a chunk as one block when its bytes add up to n rows of the first
    row's width; rows of 8 bytes more, less and more again add up that way, misalign, fail
    their check words, and the rows are decoded by their own widths instead."""
    rng = np.random.default_rng(1)
    emb_lens = [2, 0, 4, 2, 2]  # widths w, w - 8, w + 8, w, w: five rows of width w in all
    audio = rng.normal(size=(len(emb_lens), 25))
    embs = [None if k == 0 else rng.normal(size=k).astype(np.float32) for k in emb_lens]
    rows = encode_rows(list(range(5)), audio, embs)
    assert sum(map(len, rows)) == len(rows) * len(rows[0])
    cols = decode_rows(rows, 4)
    assert cols.bad == [] and cols.ids.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(cols.audio, audio)
    assert cols.has_embedding.tolist() == [False, False, True, False, False]
    assert cols.embedding is not None
    np.testing.assert_array_equal(cols.embedding[2], embs[2])


def test_rows_without_embeddings_are_the_rows_the_per_width_path_gives() -> None:
    """No row has an embedding (the usual put): one block; the same bytes the per-width path
    gives those rows in a batch where another row has one."""
    rng = np.random.default_rng(2)
    audio = rng.normal(size=(7, 25))
    ids = [3, 1, 2**40, 5, 9, 0, 11]
    plain = encode_rows(ids, audio)
    assert plain == encode_rows(ids, audio, [None] * 7) == encode_rows(np.asarray(ids), audio)
    mixed = encode_rows(ids, audio, [None] * 6 + [rng.normal(size=3).astype(np.float32)])
    assert plain[:6] == mixed[:6] and plain[6] != mixed[6]
    cols = decode_rows(plain, 0)
    assert cols.bad == [] and cols.ids.tolist() == ids
    np.testing.assert_array_equal(cols.audio, audio)
    assert encode_rows([], np.zeros((0, 25))) == []


def test_fit_with_ids_does_not_depend_on_row_order() -> None:
    rng = np.random.default_rng(3)
    values = rng.uniform(0.01, 1.0, size=(500, 25))
    values[rng.random(500) < 0.3, :7] = np.nan
    ids = rng.permutation(10_000)[:500]
    modes: tuple[ScalingMode, ...] = ("logratio", "zscore", "percentile")
    for mode in modes:
        one = AudioStats.fit(values, mode, ids=ids)
        perm = rng.permutation(500)
        assert AudioStats.fit(values[perm], mode, ids=ids[perm]) == one
        slow = AudioStats.fit(values, mode)
        np.testing.assert_allclose(one.mean, slow.mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(one.std, slow.std, rtol=1e-12, atol=1e-12)
        assert one.p05 == slow.p05 and one.p95 == slow.p95


def test_a_library_over_the_fit_size_is_fitted_on_every_kth_row_in_id_order() -> None:
    """Above ``sample`` rows the fit reads every k-th row in id order: the same statistics for
    any row order, equal to a fit of exactly those rows, with ``count`` the library's size;
    and close to the fit of every row (here 1,000 of 5,000 rows: within 10 % of the spread)."""
    rng = np.random.default_rng(4)
    n = 5_000
    values = rng.uniform(0.01, 1.0, size=(n, 25))
    values[rng.random(n) < 0.2, :7] = np.nan
    ids = rng.permutation(50_000)[:n]
    order = np.argsort(ids)
    chosen = order[:: -(-n // 1_000)]  # k = 5: rows 0, 5, 10, ... in id order
    modes: tuple[ScalingMode, ...] = ("logratio", "zscore", "percentile")
    for mode in modes:
        part = AudioStats.fit(values, mode, ids=ids, sample=1_000)
        perm = rng.permutation(n)
        assert AudioStats.fit(values[perm], mode, ids=ids[perm], sample=1_000) == part
        exact = AudioStats.fit(values[chosen], mode, ids=ids[chosen])
        assert replace(exact, count=n) == part and part.count == n
        full = AudioStats.fit(values, mode, ids=ids)
        spread = np.asarray(full.p95) - np.asarray(full.p05)
        for name in ("mean", "p05", "p95"):
            gap = np.abs(np.asarray(getattr(part, name)) - np.asarray(getattr(full, name)))
            assert (gap <= 0.1 * spread).all(), (mode, name)
    with pytest.raises(InvalidArgumentError, match="sample"):
        AudioStats.fit(values, ids=ids, sample=0)


# ----------------------------------------------------------------------------- the table


def test_table_follows_puts_updates_deletes_and_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "s"
    with Store.open(path, create=True, embedding_dim=EMB) as store:
        _fill(store, rng)
        assert_consistent(store)
        _mutate(store, rng)
        assert_consistent(store)
        store.compact()
        assert_consistent(store)
    with Store.open(path) as store:
        assert_consistent(store)
        store.similar("a1", k=5)  # attaches from the table
        assert index_manager(store).server is not None


def test_columnar_puts_give_the_rows_the_envelopes_give(tmp_path: Path) -> None:
    """``put_fingerprints`` hands the applier rows computed from its columns (float64
    embeddings, streaming-only rows): they must equal the rows of the envelopes it logged."""
    rng = np.random.default_rng(8)
    fps = library(rng, 40, "c", with_streaming=False)
    values = np.array([[getattr(fp.batch, n) for n in BATCH_FIELDS] for fp in fps])
    stream = values[:, [BATCH_FIELDS.index(n) for n in STREAMING_FIELDS]]
    conf = np.full(stream.shape, 0.8)
    with Store.open(tmp_path / "s", create=True, embedding_dim=EMB) as store:
        store.put_fingerprints([f"c{i}" for i in range(40)], values,
                               embeddings=rng.normal(size=(40, EMB)))  # fmt: skip
        store.put_fingerprints([f"d{i}" for i in range(40)], streaming=stream, confidence=conf)
        store.put_fingerprints(["c1", "c1"], values[:2])  # a track twice in one batch
        assert_consistent(store)


def test_embedding_value_beyond_float32_range_never_stops_the_applier(tmp_path: Path) -> None:
    """A finite float64 above float32's largest value (found by the stateful test) is inf in
    the row, as in the index's own decode; the applier must neither fail nor warn."""
    rng = np.random.default_rng(9)
    fp = library(rng, 1, "big", embedding_dim=EMB)[0]
    huge = fp.model_copy(update={"embedding": [0.0, 0.0, 3.4028235677973366e38, 0.0]})
    with Store.open(tmp_path / "s", create=True, embedding_dim=EMB) as store:
        store.put(huge)
        row = np.array([[getattr(fp.batch, n) for n in BATCH_FIELDS]])
        store.put_fingerprints(["big2"], row, embeddings=np.array([huge.embedding]))
        assert_consistent(store)


CHILD = r"""
import os, signal, sys
import numpy as np
from tests.index_support import library
from tests.test_fprows import _fill, _mutate
from xpstore import InvalidArgumentError, Store
store = Store.open(sys.argv[1], create=True, embedding_dim=4, hold_applier=True)
rng = np.random.default_rng(1)
_fill(store, rng)
_mutate(store, rng)
print("written", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_before_apply_recovery_rebuilds_the_table(tmp_path: Path) -> None:
    path = tmp_path / "s"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                          text=True, timeout=120, cwd=root, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    assert "written" in proc.stdout
    # killed again in the middle of the recovery's replay, after its first LMDB batch
    env = {**os.environ, "XPSTORE_CRASH_AT": "replay.after_batch", "XPSTORE_CRASH_SKIP": "0"}
    reopen = "import sys; from xpstore import Store; Store.open(sys.argv[1], apply_batch_ops=50)"
    proc = subprocess.run([sys.executable, "-c", reopen, str(path)], capture_output=True,
                          text=True, timeout=120, cwd=root, env=env, check=False)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    with Store.open(path, readonly=True) as half:  # part of the replay is in LMDB, rows with it
        assert half.parts.engine.applied_lsn() > 0
        tables = _tables(half)
        records = _fingerprint_records(tables)
        assert sorted(_table(tables)) == sorted(records)
    with Store.open(path) as store:  # recovery replays every operation from the WAL
        assert store.count("fingerprint") > N
        assert_consistent(store)
        reference = store.similar("a1", k=8)
    with Store.open(tmp_path / "fresh", create=True, embedding_dim=EMB) as fresh:
        rng = np.random.default_rng(1)
        _fill(fresh, rng)
        _mutate(fresh, rng)
        assert [(m.track_id, m.score) for m in fresh.similar("a1", k=8)] == [
            (m.track_id, m.score) for m in reference
        ]


def _make_old(path: Path) -> None:
    """Turn a store into one written before the table existed: no rows, no ``fprows`` mark."""
    env = lmdb.open(str(path / "data"), max_dbs=16, subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.drop(env.open_db(b"fprows", txn=txn), delete=True)
            meta = env.open_db(b"meta", txn=txn)
            txn.delete(b"fprows", db=meta)
            txn.delete(b"fpstats", db=meta)
    finally:
        env.close()


def test_store_written_before_the_table_is_filled_at_the_first_attach(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "s"
    with Store.open(path, create=True, embedding_dim=EMB, index_auto_rebuild=False) as store:
        _fill(store, rng)
        _mutate(store, rng)
        want = [(m.track_id, m.score) for m in store.similar("a2", k=6)]
    _make_old(path)
    with Store.open(path, readonly=True) as ro:  # read-only: served from the envelopes
        assert [(m.track_id, m.score) for m in ro.similar("a2", k=6)] == want
    with Store.open(path, index_auto_rebuild=False) as store:
        with _tables(store).reading() as txn:
            assert not _tables(store).fprows_complete(txn)
        assert [(m.track_id, m.score) for m in store.similar("a2", k=6)] == want
        assert_consistent(store)  # filled at the attach, then kept


def test_damaged_row_is_reported_and_repaired_at_attach(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    path = tmp_path / "s"
    with Store.open(path, create=True, embedding_dim=EMB, index_auto_rebuild=False) as store:
        _fill(store, rng)
        want = [(m.track_id, m.score) for m in store.similar("a7", k=6)]
        rid = store.get_fingerprint("a9").id
        store.flush()
        tables = _tables(store)
        with tables.reading() as txn:
            stored = txn.get(u64(rid), db=tables.db(b"fprows"))
        assert stored is not None
        row = bytearray(stored)
        row[40] ^= 0x10  # one bit of one audio value
        tables._write(lambda txn: txn.put(u64(rid), bytes(row), db=tables.db(b"fprows")))
        report = store.check()
        assert [p.where for p in report.problems] == [f"lmdb fprows id={rid}"]
        assert "check word" in report.problems[0].what
    shutil.rmtree(path / "index", ignore_errors=True)
    with Store.open(path, index_auto_rebuild=False) as store:
        assert [(m.track_id, m.score) for m in store.similar("a7", k=6)] == want
        assert_consistent(store)  # the attach read a9's envelope and rewrote its row


def test_row_that_disagrees_with_its_record_is_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with Store.open(tmp_path / "s", create=True) as store:
        _fill(store, rng)
        store.flush()
        tables = _tables(store)
        a, b = store.get_fingerprint("a1").id, store.get_fingerprint("a2").id
        with tables.reading() as txn:
            other = txn.get(u64(b), db=tables.db(b"fprows"))
        assert other is not None
        cols = decode_rows([bytes(other)], None)
        forged = encode_rows([a], cols.audio)[0]  # a valid row, with a2's values
        tables._write(lambda txn: txn.put(u64(a), forged, db=tables.db(b"fprows")))
        tables._write(lambda txn: txn.delete(u64(b), db=tables.db(b"fprows")))
        problems = {(p.where, p.what) for p in store.check().problems}
        assert (f"lmdb fprows id={a}", "row differs from its record's values") in problems
        assert any(w == "lmdb fprows" and "rows but" in what for w, what in problems)


def test_statistics_are_cached_for_exactly_the_live_set(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    path = tmp_path / "s"
    with Store.open(path, create=True, index_auto_rebuild=False) as store:
        _fill(store, rng)
        store.similar("a1", k=3)  # fits and caches the statistics
        store.flush()
        tables = _tables(store)
        lib = read_library(tables, None, lambda live: live)
        cached = lib.cached_stats("logratio")
        assert cached is not None
        assert cached == AudioStats.fit(lib.rows.audio, "logratio", ids=lib.rows.ids)
        assert lib.cached_stats("zscore") is None
        store.put(library(rng, 1, "new")[0])
        store.flush()
        assert read_library(tables, None, lambda live: live).cached_stats("logratio") is None
        entry = json.loads(lib.stats_entry or b"{}")
        entry["stats"]["mean"]["lufs"] += 1.0  # damaged: its checksum fails, so it is ignored
        tables.put_meta("fpstats", json.dumps(entry).encode())
        assert read_library(tables, None, lambda live: live).cached_stats("logratio") is None


def test_applier_keeps_records_whose_envelope_is_not_a_fingerprint(tmp_path: Path) -> None:
    from xpstore.persistence.lmdb_changes import RecordPut

    tables = LmdbTables(tmp_path / "db", readonly=False, map_size=1 << 24)
    try:
        tables.apply([RecordPut(1, FP_CODE, 1.0, b"not an envelope", True)], 1)
        with tables.reading() as txn:
            assert tables.get_record(txn, 1) == b"not an envelope"
            assert txn.get(u64(1), db=tables.db(b"fprows")) is None
    finally:
        tables.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_empty_store_attaches(tmp_path: Path, readonly: bool) -> None:
    path = tmp_path / "s"
    Store.open(path, create=True).close()
    with Store.open(path, readonly=readonly) as store:
        assert store.index_status()["delta"] == 0
