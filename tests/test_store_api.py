"""The Store API of DESIGN §8 against real LMDB files and WAL segments on tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import xpstore
from tests.helpers import record_as
from xpstore import (
    Fingerprint,
    FormatVersionError,
    InvalidArgumentError,
    InvalidRecordError,
    PredictionOutcome,
    QueryMetric,
    ReadOnlyStoreError,
    RecordNotFoundError,
    Store,
    StoreClosedError,
    StoreLockedError,
    StoreNotFoundError,
    XpStoreError,
)
from xpstore.demo.synthetic import make_fingerprint, make_mixed, make_prediction, make_query_metric
from xpstore.model.records import Record


def _pred(**kw: Any) -> PredictionOutcome:
    base: dict[str, Any] = dict(predicted="punchy", confidence=0.8, context="warm_start")
    base.update(kw)
    return PredictionOutcome(**base)


@pytest.fixture(params=[False, True], ids=["applied", "held"])
def any_store(request: pytest.FixtureRequest, store_path: Path) -> Iterator[Store]:
    """The same tests with LMDB apply running and with everything served from the overlay."""
    with Store.open(store_path, create=True, hold_applier=request.param) as s:
        yield s


def test_put_get_round_trip_all_kinds(any_store: Store) -> None:
    rng = np.random.default_rng(0)
    records: list[Record] = [
        make_prediction(rng), make_fingerprint(rng, "trk-1"), make_query_metric(rng)
    ]
    ids = [any_store.put(r) for r in records]
    assert ids == sorted(ids) and len(set(ids)) == 3
    for rid, rec in zip(ids, records, strict=True):
        exp = any_store.get(rid)
        assert exp.id == rid and exp.updated_lsn == rid
        assert (
            exp.kind
            == {
                PredictionOutcome: "prediction",
                Fingerprint: "fingerprint",
                QueryMetric: "query_metric",
            }[type(rec)]
        )
        assert exp.record == rec.model_copy(update={"ts": exp.ts})
        assert exp.retrieval_count == 0 and exp.success_rate is None


def test_ts_defaults_to_put_time_and_is_kept_when_given(any_store: Store) -> None:
    import time

    before = time.time()
    rid = any_store.put(_pred())
    assert before <= any_store.get(rid).ts <= time.time()
    rid2 = any_store.put(_pred(ts=123.5))
    assert any_store.get(rid2).ts == 123.5


def test_put_accepts_json_mappings(any_store: Store) -> None:
    rid = any_store.put(
        {"kind": "prediction", "predicted": "warm", "confidence": 0.5, "context": "cold_start"}
    )
    assert record_as(any_store.get(rid), PredictionOutcome).predicted == "warm"


def test_update_resolves_an_outcome_through_the_wal(any_store: Store, store_path: Path) -> None:
    rid = any_store.put(_pred())
    exp = any_store.update(rid, actual="warm", reward=1.0)
    assert exp.id == rid and exp.updated_lsn > rid
    updated = record_as(exp, PredictionOutcome)
    assert updated.actual == "warm" and updated.was_correct is False
    with pytest.raises(InvalidRecordError) as info:
        any_store.update(rid, confidence=0.1)
    assert info.value.field == "confidence"
    with pytest.raises(InvalidRecordError):
        any_store.update(rid, reward=float("nan"))
    with pytest.raises(RecordNotFoundError):
        any_store.update(10**9, actual="warm")
    assert record_as(any_store.get(rid), PredictionOutcome).actual == "warm"


def test_delete_keeps_ids_unique(any_store: Store) -> None:
    a = any_store.put(_pred())
    any_store.delete(a)
    with pytest.raises(RecordNotFoundError):
        any_store.get(a)
    with pytest.raises(RecordNotFoundError):
        any_store.delete(a)
    with pytest.raises(KeyError):  # RecordNotFoundError is a KeyError too
        any_store.get(a)
    b = any_store.put(_pred())
    assert b > a and any_store.count() == 1


def test_fingerprints_supersede_and_delete_track_keeps_history(any_store: Store) -> None:
    rng = np.random.default_rng(1)
    old = any_store.put(make_fingerprint(rng, "trk-9"))
    new = any_store.put(make_fingerprint(rng, "trk-9"))
    assert any_store.get_fingerprint("trk-9").id == new
    any_store.delete_track("trk-9")
    with pytest.raises(RecordNotFoundError):
        any_store.get_fingerprint("trk-9")
    with pytest.raises(RecordNotFoundError):
        any_store.delete_track("trk-9")
    assert any_store.get(old).id == old and any_store.get(new).id == new  # history stays
    again = any_store.put(make_fingerprint(rng, "trk-9"))
    assert any_store.get_fingerprint("trk-9").id == again


def test_put_many_supersedes_within_one_batch(any_store: Store) -> None:
    rng = np.random.default_rng(2)
    ids = any_store.put_many([make_fingerprint(rng, "t"), make_fingerprint(rng, "t")])
    assert any_store.get_fingerprint("t").id == ids[1]


def test_scan_orders_filters_and_merges_overlay_with_lmdb(store_path: Path) -> None:
    rng = np.random.default_rng(3)
    with Store.open(store_path, create=True) as store:
        applied = store.put_many(make_mixed(rng, 300, t0=1000.0))
        store.flush()
        assert store.parts.engine.applier is not None
        store.parts.engine.applier.hold = True  # the rest stays in the overlay
        fresh = store.put_many(make_mixed(rng, 100, t0=1100.5))
        victim = applied[10]
        store.delete(victim)
        every = list(store.scan())
        assert [(e.ts, e.id) for e in every] == sorted((e.ts, e.id) for e in every)
        assert {e.id for e in every} == (set(applied) | set(fresh)) - {victim}
        preds = list(store.scan(kind="prediction", since=1050.0, until=1150.0))
        assert preds and all(p.kind == "prediction" and 1050.0 <= p.ts < 1150.0 for p in preds)
        warm = list(
            store.scan(
                kind="prediction", where={"context": "warm_start", "audio_features.energy__gt": 0.6}
            )
        )
        warm_preds = [record_as(e, PredictionOutcome) for e in warm]
        assert all(
            p.context == "warm_start"
            and p.audio_features is not None
            and p.audio_features["energy"] > 0.6
            for p in warm_preds
        )
        everything_warm = [
            e
            for e in store.scan(kind="prediction")
            if (p := record_as(e, PredictionOutcome)).context == "warm_start"
            and p.audio_features
            and p.audio_features.get("energy", 0) > 0.6
        ]
        assert [e.id for e in warm] == [e.id for e in everything_warm]
        assert len(list(store.scan(limit=7))) == 7
        assert store.count() == len(every)
        assert store.count("fingerprint") == sum(1 for e in every if e.kind == "fingerprint")


def test_where_rejects_bad_keys(store: Store) -> None:
    with pytest.raises(InvalidRecordError) as info:
        list(store.scan(kind="prediction", where={"context__like": "x"}))
    assert info.value.field == "context__like"
    with pytest.raises(InvalidRecordError):
        list(store.scan(kind="prediction", where={"nonexistent": 1}))
    with pytest.raises(InvalidArgumentError):
        list(store.scan(kind="nope"))


def test_bad_input_names_the_field_and_leaves_the_store_unchanged(store: Store) -> None:
    store.put(_pred())
    bad = [
        ({"kind": "prediction", "predicted": "x", "confidence": 1.5, "context": "c"}, "confidence"),
        (
            {"kind": "prediction", "predicted": "x", "confidence": 0.5, "context": "c", "bogus": 1},
            "bogus",
        ),
        (
            {
                "kind": "query_metric",
                "query_id": "q",
                "query_text": "t",
                "query_type": "s",
                "latency_ms": -1,
                "memory_mb": 1,
                "cache_hit": True,
                "result_count": 1,
                "success": True,
            },
            "latency_ms",
        ),
    ]
    for payload, field in bad:
        with pytest.raises(InvalidRecordError) as info:
            store.put(payload)
        assert field in str(info.value)
    good = _pred()
    with pytest.raises(InvalidRecordError) as info:
        store.put_many([good, good, bad[0][0]])
    assert "records[2]" in str(info.value)
    assert store.count() == 1  # nothing of the failed batch was written


def test_embedding_dimension_is_fixed_per_store(store_path: Path) -> None:
    rng = np.random.default_rng(4)
    with Store.open(store_path, create=True) as store:
        store.put(make_fingerprint(rng, "a", embedding_dim=8))
        with pytest.raises(InvalidRecordError) as info:
            store.put(make_fingerprint(rng, "b", embedding_dim=4))
        assert info.value.field == "embedding"
    with Store.open(store_path) as store:  # persisted across reopen
        with pytest.raises(InvalidRecordError):
            store.put(make_fingerprint(rng, "b", embedding_dim=4))
        store.put(make_fingerprint(rng, "b", embedding_dim=8))


def test_lmdb_map_grows_on_map_full(store_path: Path) -> None:
    rng = np.random.default_rng(5)
    with Store.open(store_path, create=True, map_size=1 << 20) as store:
        for _ in range(10):
            store.put_many(make_mixed(rng, 500))
        store.flush()
        assert store.stats()["lmdb"]["map_size"] > 1 << 20
        assert store.count() == 5000


def test_concurrent_writers_get_unique_ids_and_read_their_writes(store: Store) -> None:
    rng_seeds = range(6)
    out: dict[int, list[int]] = {}
    barrier = threading.Barrier(6)

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait()
        mine = []
        for _ in range(60):
            rid = store.put(make_prediction(rng))
            assert store.get(rid).id == rid  # read your writes, before any apply
            mine.append(rid)
        out[seed] = mine

    threads = [threading.Thread(target=work, args=(s,)) for s in rng_seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for v in out.values() for i in v]
    assert len(ids) == len(set(ids)) == 360 and store.count() == 360


def test_lifecycle_errors(store_path: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "nothing")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("hi")
    with pytest.raises(StoreNotFoundError):
        Store.open(tmp_path / "foreign", create=True)
    store = Store.open(store_path, create=True)
    rid = store.put(_pred())
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreClosedError):
        store.get(rid)
    with pytest.raises(StoreClosedError):
        store.put(_pred())
    marker = store_path / "xpstore.json"
    data = json.loads(marker.read_text())
    data["format_version"] = 99
    marker.write_text(json.dumps(data))
    with pytest.raises(FormatVersionError) as info:
        Store.open(store_path)
    assert "99" in str(info.value)


def test_second_writer_is_refused_naming_the_holder(store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        store.put(_pred())
        with pytest.raises(StoreLockedError) as info:
            Store.open(store_path)
        assert info.value.pid == os.getpid() and str(os.getpid()) in str(info.value)
        code = (
            "import sys; from xpstore import Store, StoreLockedError\n"
            "try:\n    Store.open(sys.argv[1])\nexcept StoreLockedError as e:\n"
            "    print(e.pid); sys.exit(3)\n"
        )
        proc = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
            [sys.executable, "-c", code, str(store_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 3 and proc.stdout.strip() == str(os.getpid())


def test_readonly_open_in_another_process_sees_applied_data(store_path: Path) -> None:
    rng = np.random.default_rng(6)
    with Store.open(store_path, create=True) as store:
        ids = store.put_many(make_mixed(rng, 200))
        store.flush()
        code = (
            "import sys; from xpstore import Store, ReadOnlyStoreError\n"
            "s = Store.open(sys.argv[1], readonly=True)\n"
            "print(s.count(), s.get(int(sys.argv[2])).id)\n"
            "try:\n    s.put({'kind': 'prediction', 'predicted': 'a', 'confidence': 0.1,"
            " 'context': 'c'})\nexcept ReadOnlyStoreError:\n    print('refused')\n"
        )
        proc = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
            [sys.executable, "-c", code, str(store_path), str(ids[-1])],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["200", str(ids[-1]), "refused"]


def test_readonly_in_process_refuses_writes(store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        store.put(_pred())
    with Store.open(store_path, readonly=True) as ro:
        assert ro.count() == 1
        with pytest.raises(ReadOnlyStoreError):
            ro.put(_pred())


def test_stats_reports_counts_and_wal(store: Store) -> None:
    rng = np.random.default_rng(7)
    store.put_many(make_mixed(rng, 100))
    st = store.stats()
    assert st["total"] == 100 == sum(st["counts"].values())
    assert st["wal"]["segments"] >= 1 and st["next_lsn"] == 101


def test_public_api_is_exactly_all() -> None:
    public = {n for n in dir(xpstore) if not n.startswith("_")}
    modules = {
        "config",
        "errors",
        "model",
        "persistence",
        "ops",
        "sampling",
        "store",
        "index",
        "tuning",
        "cli",
        "demo",
        "service",
    }
    assert public - modules == set(xpstore.__all__) - {"__version__"}
    for name in xpstore.__all__:
        assert getattr(xpstore, name) is not None


def test_every_error_derives_from_the_base() -> None:
    errors = [getattr(xpstore, n) for n in xpstore.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, XpStoreError) for e in errors)
    assert issubclass(xpstore.InvalidRecordError, ValueError)
    assert issubclass(xpstore.RecordNotFoundError, KeyError)
    assert issubclass(xpstore.WALCorruptionError, xpstore.StoreCorruptionError)


def test_lmdb_errors_are_translated(store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lmdb

    from xpstore.persistence import lmdb_env

    for exc, expected in [
        (lmdb.CorruptedError("x"), xpstore.StoreCorruptionError),
        (lmdb.DiskError("x"), xpstore.WALWriteError),
        (lmdb.BadTxnError("x"), XpStoreError),
    ]:
        mapped = lmdb_env.translate(exc, "ctx")
        assert isinstance(mapped, expected) and "ctx" in str(mapped)


@pytest.mark.parametrize("durability", ["commit", "group", "none"])
def test_durability_modes_round_trip(store_path: Path, durability: str) -> None:
    rng = np.random.default_rng(8)
    records = make_mixed(rng, 50)
    with Store.open(store_path, create=True, durability=durability) as store:
        ids = [store.put(r) for r in records]
        syncs = store.stats()["wal"]["syncs"]
        if durability == "commit":
            assert syncs >= 1
        if durability == "none":
            assert syncs == 0
    with Store.open(store_path) as store:
        assert store.config.wal.durability == durability  # persisted with the store
        assert [store.get(i).record for i in ids] == [
            r.model_copy(update={"ts": store.get(i).ts}) for i, r in zip(ids, records, strict=True)
        ]


def test_session_only_knobs_are_not_persisted(store_path: Path) -> None:
    with Store.open(store_path, create=True, hold_applier=True, segment_max_bytes=65536) as s:
        assert s.config.apply.hold
    with Store.open(store_path) as s:
        assert not s.config.apply.hold and s.config.wal.segment_max_bytes == 65536


def test_out_of_range_and_non_int_ids(store: Store) -> None:
    for bad in (-1, 0, 2**64):
        with pytest.raises(RecordNotFoundError):
            store.get(bad)
        with pytest.raises(RecordNotFoundError):
            store.delete(bad)
    with pytest.raises(InvalidArgumentError):
        store.get("1")  # type: ignore[arg-type]


def test_where_none_finds_unresolved_outcomes(store: Store) -> None:
    open_id = store.put(_pred())
    done_id = store.put(_pred(actual="warm"))
    assert [e.id for e in store.scan(kind="prediction", where={"actual": None})] == [open_id]
    assert [e.id for e in store.scan(kind="prediction", where={"actual__ne": None})] == [done_id]
    assert [e.id for e in store.scan(kind="prediction", where={"actual__ne": "warm"})] == [open_id]
    assert store.embedding_dim is None


def test_put_of_a_non_record_names_the_position(store: Store) -> None:
    with pytest.raises(InvalidRecordError) as info:
        store.put_many([_pred(), object()])  # type: ignore[list-item]
    assert "records[1]" in str(info.value) and info.value.field == "record"
    assert store.count() == 0


def test_a_batch_is_one_frame_and_all_or_nothing(store: Store) -> None:
    ids = store.put_many([_pred() for _ in range(3)])
    frames = store.stats()["wal"]["frames"]
    with store.batch() as b:
        b.put_many([_pred(), _pred()])
        b.record_feedback(ids, [True, False, True])
        b.update_priorities(ids, [2.0, 3.0, 4.0])
    assert store.stats()["wal"]["frames"] == frames + 1  # one frame, one sync
    assert b.ids == [ids[-1] + 1, ids[-1] + 2] and store.get(b.ids[0]).id == b.ids[0]
    assert [store.get(i).priority for i in ids] == [2.0, 3.0, 4.0]
    assert [store.get(i).success_count for i in ids] == [1, 0, 1]
    before = store.stats()["next_lsn"]
    with pytest.raises(RuntimeError), store.batch() as b2:
        b2.put_many([_pred()])
        raise RuntimeError("the caller changed its mind")
    with pytest.raises(InvalidArgumentError) as err, store.batch() as b3:
        b3.put_many([_pred()])
        b3.update_priorities(ids, [1.0, -1.0, 1.0])
    assert err.value.field == "priorities[1]"
    assert store.stats()["next_lsn"] == before  # nothing logged by either
    with pytest.raises(InvalidArgumentError):
        b.put_many([_pred()])  # a finished batch takes nothing more


def test_a_record_subclass_is_stored_as_its_kind(store: Store) -> None:
    """A subclass of a record model is validated again from its fields as its kind (the codec
    and the priority rows know the four models only); a field it adds is refused by name."""
    rng = np.random.default_rng(12)

    class MyPrediction(PredictionOutcome):
        def label(self) -> str:
            return self.predicted

    class MyFingerprint(Fingerprint):
        pass

    class Extended(PredictionOutcome):
        note: str = "x"

    pred = MyPrediction(predicted="warm", confidence=0.5, context="c", ts=1.0)
    fp = MyFingerprint.model_validate(make_fingerprint(rng, "sub").model_dump())
    rid = store.put(pred)
    assert store.get(rid).record == PredictionOutcome(predicted="warm", confidence=0.5,
                                                      context="c", ts=1.0)  # fmt: skip
    ids = store.put_many([pred, fp] * 20)  # a put run, as the models are dropped once encoded
    assert type(store.get(ids[0]).record) is PredictionOutcome
    assert store.get_fingerprint("sub").id == ids[-1]
    got = store.get(ids[-1])
    assert got.record == Fingerprint.model_validate({**fp.model_dump(), "ts": got.ts})
    for batch in ([Extended(predicted="a", confidence=0.5, context="c")],
                  [pred] * 40 + [Extended(predicted="a", confidence=0.5, context="c")]):
        with pytest.raises(InvalidRecordError) as info:
            store.put_many(batch)
        assert info.value.field == "note" and f"records[{len(batch) - 1}]" in str(info.value)
    assert store.count() == 41
