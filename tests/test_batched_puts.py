"""``put_many``'s batched derive (issue 15): a run of puts derived in columns must give exactly
the effects the record-by-record :func:`derive` gives (envelopes and priority rows byte for
byte, tracks superseded within the batch), and a store fed by it must hold what single puts
would have stored."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import records
from xpstore import InvalidRecordError, RecordTooLargeError, Store
from xpstore.demo.synthetic import STYLES, make_fingerprint, make_mixed, sample_batch_values
from xpstore.model.codec import KIND_CODES, PutOp, encode_op, envelope_from_put, new_put_envelopes
from xpstore.model.effects import Effect, StateView, derive, derive_new_puts, put_facts, put_run
from xpstore.model.priority_rows import inputs_for, new_inputs
from xpstore.model.records import (
    BATCH_FIELDS,
    STREAMING_FIELDS,
    Decision,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    kind_of,
    record_to_json,
    with_ts,
)
from xpstore.store.writer import COLUMNAR_PUTS


def _one_by_one(first: int, recs: list[Record], payloads: list[bytes],
                known: dict[str, int]) -> list[Effect]:  # fmt: skip
    """The record-by-record derive of a batch (what ``Writer._park_puts`` does for a short
    run): a track put earlier in the batch is looked up in the batch first."""
    latest: dict[str, int] = {}

    def track(tid: str) -> int | None:
        return latest.get(tid, known.get(tid))

    view = StateView(lambda rid: None, track)
    out = []
    for i, (rec, payload) in enumerate(zip(recs, payloads, strict=True)):
        eff = derive(PutOp(rec), first + i, view, payload)
        if eff.track is not None and eff.track_to is not None:
            latest[eff.track] = eff.track_to
        out.append(eff)
    return out


def _decision(i: int) -> Decision:
    return Decision(component="tuner", action="weight", target=f"w/{i}", old=0.5, new=0.6,
                    reason="test", evidence={"n": 3.0})  # fmt: skip


_LONG_TRACKS = ["t" * 31, "t" * 32, "ü" * 16, "é" * 200, "x" * 255, "y" * 256, "z" * 70_000, "🎵"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    recs=st.lists(records(), min_size=1, max_size=40),
    decisions=st.lists(st.integers(0, 40), max_size=3),
    repeat_tracks=st.booleans(),
    long_track=st.none() | st.sampled_from(_LONG_TRACKS),
    first=st.sampled_from([1, 100, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 5, 2**40]),
    ts=st.sampled_from([1.7e9, 0.0, -0.0, 1e-300, 2.5e11]),
)  # fmt: skip
def test_columnar_derive_equals_record_by_record(
    recs: list[Record], decisions: list[int], repeat_tracks: bool, long_track: str | None,
    first: int, ts: float,
) -> None:  # fmt: skip
    batch: list[Record] = [with_ts(r, ts) for r in recs]
    for pos in decisions:
        batch.insert(min(pos, len(batch)), with_ts(_decision(pos), ts))
    fps = [i for i, r in enumerate(batch) if isinstance(r, Fingerprint)]
    if repeat_tracks and len(fps) > 1:  # the same track twice in one batch
        tid = cast(Fingerprint, batch[fps[0]]).track_id
        batch[fps[-1]] = batch[fps[-1]].model_copy(update={"track_id": tid})
    if long_track is not None and fps:
        batch[fps[0]] = batch[fps[0]].model_copy(update={"track_id": long_track})
    known = {r.track_id: 7 for r in batch[:3] if isinstance(r, Fingerprint)}
    payloads = [encode_op(PutOp(r)) for r in batch]
    view = StateView(lambda rid: None, known.get)
    got = derive_new_puts(first, put_run(batch, payloads), view)
    assert got == _one_by_one(first, batch, payloads, known)


def _fingerprint(track_id: str, i: int, *, streaming: bool = False) -> Fingerprint:
    values = sample_batch_values(np.random.default_rng(i), list(STYLES)[i % len(STYLES)])
    batch = dict(zip(BATCH_FIELDS, np.asarray(values).reshape(-1).tolist(), strict=True))
    stream = None
    if streaming:
        stream = {"values": {k: batch[k] for k in STREAMING_FIELDS},
                  "confidence": dict.fromkeys(STREAMING_FIELDS, 0.25 + (i % 4) / 8)}  # fmt: skip
    return Fingerprint.model_validate({"track_id": track_id, "batch": batch,
                                       "streaming": stream, "ts": 1.7e9 + i})  # fmt: skip


@pytest.mark.parametrize("first", [0, 1, 200, 70_000, 2**33])
def test_envelopes_match_the_parsing_builder(first: int) -> None:
    tracks: list[str | None] = [*_LONG_TRACKS, None]
    recs: list[Record] = [_fingerprint(t, i) for i, t in enumerate(_LONG_TRACKS)]
    recs.append(PredictionOutcome(predicted="a", confidence=0.5, context="c", ts=1.7e9))
    payloads = [encode_op(PutOp(r)) for r in recs]
    codes = [KIND_CODES[kind_of(r)] for r in recs]
    ts = [cast(float, r.ts) for r in recs]
    assert new_put_envelopes(payloads, codes, ts, tracks, first) == [
        envelope_from_put(p, kind=kind_of(r), ts=cast(float, r.ts), updated_lsn=first + i)
        for i, (p, r) in enumerate(zip(payloads, recs, strict=True))
    ]


def test_a_large_batch_stores_what_single_puts_store(tmp_path: Path) -> None:
    n = COLUMNAR_PUTS * 3
    batch: list[Record] = []
    for i in range(n):
        ts = 1.7e9 + i
        match i % 4:
            case 0:
                batch.append(PredictionOutcome(predicted="warm", confidence=(i % 10) / 10,
                                               context="c", reward=(-1.0) ** i * i, ts=ts))
            case 1:  # seven tracks, each put several times in the batch
                batch.append(_fingerprint(f"tr{i % 7}", i, streaming=i % 8 == 1))
            case 2:
                batch.append(_decision(i).model_copy(update={"ts": ts}))
            case _:
                batch.append(QueryMetric(query_id=f"q{i}", query_text="", query_type="knn",
                                         latency_ms=1.5, memory_mb=2.0, cache_hit=False,
                                         result_count=3, success=True, accuracy=0.75, ts=ts))
    with Store.open(tmp_path / "a", create=True) as a, \
            Store.open(tmp_path / "b", create=True) as b:  # fmt: skip
        ids = a.put_many(batch)
        assert ids == [b.put(r) for r in batch]
        for rid in ids:
            assert a.get(rid) == b.get(rid)
        for t in range(7):
            assert a.get_fingerprint(f"tr{t}") == b.get_fingerprint(f"tr{t}")
        assert a.sampling_probabilities() == b.sampling_probabilities()
        assert a.count("fingerprint") == b.count("fingerprint") == n // 4
        a.flush()
        assert a.check().ok


# --------------------------------------------------------------------- put_many as a put run


def _dicts(n: int, seed: int = 3) -> list[dict[str, object]]:
    return [record_to_json(r) for r in make_mixed(np.random.default_rng(seed), n, t0=1.7e9)]


def test_a_large_batch_of_dicts_refuses_a_bad_record_and_writes_nothing(tmp_path: Path) -> None:
    """A batch long enough for the put run keeps each model only until its facts are taken;
    a bad record is still named by its position, and nothing of the batch is written."""
    with Store.open(tmp_path / "s", create=True) as st:
        st.put_many(_dicts(COLUMNAR_PUTS))
        before = st.count()
        batch = _dicts(COLUMNAR_PUTS * 2, seed=4)
        batch[50] = {**batch[50], "ts": float("nan")}
        with pytest.raises(InvalidRecordError) as info:
            st.put_many(batch)
        assert "records[50]" in str(info.value) and info.value.field == "ts"
        batch = _dicts(COLUMNAR_PUTS * 2, seed=5)
        big = next(i for i, d in enumerate(batch) if d["kind"] == "prediction")
        batch[big] = {**batch[big], "context": "x" * 2_000_000}
        with pytest.raises(RecordTooLargeError) as too_large:
            st.put_many(batch)
        assert f"records[{big}]" in str(too_large.value) and too_large.value.field == "context"
        assert st.count() == before
        st.flush()
        assert st.count() == before and st.check().ok


def test_a_large_batch_over_max_batch_records_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, max_batch_records=COLUMNAR_PUTS + 5) as st:
        with pytest.raises(RecordTooLargeError) as info:
            st.put_many(_dicts(COLUMNAR_PUTS + 6))
        assert info.value.field == "records" and st.count() == 0
        assert len(st.put_many(_dicts(COLUMNAR_PUTS + 5))) == COLUMNAR_PUTS + 5


def test_a_large_batch_fixes_the_embedding_dimension_after_its_records(tmp_path: Path) -> None:
    """The first embeddings arrive in a put run: the settings operation fixing the dimension
    follows the run's records in the same frame, and the ids returned are the records' only."""
    rng = np.random.default_rng(6)
    n = COLUMNAR_PUTS + 8
    fps = [make_fingerprint(rng, f"e{i}", embedding_dim=8 if i % 2 else None) for i in range(n)]
    with Store.open(tmp_path / "s", create=True) as st:
        ids = st.put_many(fps)
        assert ids == list(range(ids[0], ids[0] + n)) and st.count() == n
        assert st.config.records.embedding_dim == 8
        wrong = [make_fingerprint(rng, f"w{i}", embedding_dim=4 if i == 35 else None)
                 for i in range(n)]  # fmt: skip
        with pytest.raises(InvalidRecordError) as info:
            st.put_many(wrong)
        assert "records[35]" in str(info.value) and info.value.field == "embedding"
        after = st.put(make_fingerprint(rng, "next"))
        assert after == ids[-1] + 2  # the settings operation took the LSN after the run
    with Store.open(tmp_path / "s") as st:
        assert st.config.records.embedding_dim == 8 and st.count() == n + 1
        for rid, fp in zip(ids, fps, strict=True):
            got = st.get(rid)
            assert got.record == fp.model_copy(update={"ts": got.ts})


def test_dimensions_that_differ_within_a_large_batch_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    fps = [make_fingerprint(rng, f"d{i}", embedding_dim=6 if i == 40 else 8)
           for i in range(COLUMNAR_PUTS * 2)]  # fmt: skip
    with Store.open(tmp_path / "s", create=True) as st:
        with pytest.raises(InvalidRecordError) as info:
            st.put_many(fps)
        assert "records[40].embedding" in str(info.value) and st.count() == 0
        assert st.config.records.embedding_dim is None


def test_a_large_batch_is_findable_at_once_with_the_index_attached(tmp_path: Path) -> None:
    """With the index attached, a put run keeps its fingerprints' models for their index rows
    (``Writer.rows_wanted``); each new track is its own best match as soon as put_many returns."""
    rng = np.random.default_rng(8)
    with Store.open(tmp_path / "s", create=True, index_auto_rebuild=False) as st:
        assert not st.parts.writer.rows_wanted()
        st.put_many([make_fingerprint(rng, f"t{i}") for i in range(200)])
        st.rebuild_index()
        assert st.parts.writer.rows_wanted()
        fresh = [make_fingerprint(rng, f"new{i}") for i in range(COLUMNAR_PUTS + 3)]
        ids = st.put_many(fresh)
        assert st.index_status()["delta"] == len(fresh)
        for rid, fp in zip(ids, fresh, strict=True):
            hit = st.similar(fingerprint=fp, k=1, exclude_self=False)[0]
            assert (hit.record_id, hit.track_id) == (rid, fp.track_id)


def test_put_facts_match_the_record_by_record_priority_rows() -> None:
    """The facts a put run keeps give the priority row :func:`inputs_for` gives the model."""
    mixed = make_mixed(np.random.default_rng(9), 200, t0=1.0)
    recs: list[Record] = [with_ts(r, 1.7e9 + i) for i, r in enumerate(mixed)]
    recs.append(with_ts(_decision(0), 5.0))
    recs.append(PredictionOutcome(predicted="a", confidence=0.5, context="c", reward=-1e39,
                                  ts=2.0))  # fmt: skip
    run = put_run(recs, [encode_op(PutOp(r)) for r in recs])
    rows = new_inputs(10, run.kinds, run.ts, run.conf, run.reward)
    assert rows == [inputs_for(r, 10 + i, cast(float, r.ts)) for i, r in enumerate(recs)]
    assert run.dims == [(i, len(r.embedding)) for i, r in enumerate(recs)
                        if isinstance(r, Fingerprint) and r.embedding is not None]  # fmt: skip


def test_a_write_batch_of_many_puts_stores_what_put_many_stores(tmp_path: Path) -> None:
    """A ``WriteBatch`` keeps its puts as operations (they share a frame with other writes),
    and derives a run of 32 or more through ``put_run``: the same records and fingerprint
    lookups as ``put_many``'s run."""
    recs = make_mixed(np.random.default_rng(10), COLUMNAR_PUTS * 2, t0=1.7e9)
    with Store.open(tmp_path / "a", create=True) as a, \
            Store.open(tmp_path / "b", create=True) as b:  # fmt: skip
        ids = a.put_many(recs)
        with b.batch() as wb:
            wb.put_many(recs)
        assert wb.ids == ids
        for rid in ids:
            assert a.get(rid) == b.get(rid)
        tracks = {r.track_id for r in recs if isinstance(r, Fingerprint)}
        assert tracks and all(a.get_fingerprint(t) == b.get_fingerprint(t) for t in tracks)
        a.flush()
        b.flush()
        assert a.check().ok and b.check().ok


def test_put_facts_take_the_four_models_only() -> None:
    """The writer stores a subclass as its kind first; put_facts refuses anything else."""

    class Sub(PredictionOutcome):
        pass

    with pytest.raises(TypeError, match="Sub"):
        put_facts(Sub(predicted="a", confidence=0.5, context="c", ts=1.0))
