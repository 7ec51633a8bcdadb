"""``put_many``'s prepared puts: each model is dropped once encoded, and the effects derived
from the summaries (one at a time, or a whole run with its envelopes built at once) must be the
ones ``derive`` gives the puts themselves: bytes, priority row, track changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpstore import Store
from xpstore.demo.synthetic import make_mixed
from xpstore.errors import InvalidRecordError, RecordTooLargeError
from xpstore.model.codec import KIND_CODES, PutOp, encode_op, envelopes_from_puts
from xpstore.model.effects import Effect, StateView, derive, derive_puts
from xpstore.model.priority_rows import with_id
from xpstore.model.records import Decision, Fingerprint, Record, record_to_json
from xpstore.store.writer import _derive_prepared, _prepared


def _records(seed: int) -> list[Record]:
    rng = np.random.default_rng(seed)
    records = make_mixed(rng, 150, n_tracks=20, embedding_dim=8 if seed else None, t0=1.7e9)
    records.append(Decision(component="tuner", action="weight", target="w", old=1.0, new=2.0,
                            ts=1.7e9))  # not sampled: no priority row  # fmt: skip
    return records


def _reference(records: list[Record], first: int, known: dict[str, int]) -> list[Effect]:
    """derive() of each put in turn, against a view that sees the batch's earlier puts."""
    latest = dict(known)
    out = []
    for i, rec in enumerate(records):
        eff = derive(PutOp(rec), first + i, StateView(lambda rid: None, latest.get),
                     encode_op(PutOp(rec)))  # fmt: skip
        if isinstance(rec, Fingerprint):
            latest[rec.track_id] = first + i
        out.append(eff)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_prepared_puts_derive_the_puts_effects(seed: int) -> None:
    records = _records(seed)
    known = {"track-000001": 3, "track-000002": 5}
    view = StateView(lambda rid: None, known.get)
    payloads = [encode_op(PutOp(rec)) for rec in records]
    puts = [_prepared(rec, p) for rec, p in zip(records, payloads, strict=True)]
    for first in (1000, 2**33):
        expected = _reference(records, first, known)
        kinds, ts, tracks, _dims, prios, cuts = zip(*puts, strict=True)
        values = envelopes_from_puts(payloads, kind=[KIND_CODES[k] for k in kinds],
                                     ts=np.array(ts), first_lsn=first, cuts=cuts)  # fmt: skip
        prio = [None if p is None else with_id(p, first + i) for i, p in enumerate(prios)]
        assert derive_puts(first, values, kinds, ts, tracks, prio, view) == expected
        alone = [_derive_prepared(put, first + i, view, p)
                 for i, (put, p) in enumerate(zip(puts, payloads, strict=True))]  # fmt: skip
        assert [e for e in alone if e.track is None] == [e for e in expected if e.track is None]


def test_put_many_names_the_first_bad_record_in_order(store_path: Path) -> None:
    good = {"kind": "prediction", "predicted": "a", "confidence": 0.5, "context": "c", "ts": 1.7e9}
    big = {**good, "predicted": "x" * (2 << 20)}
    bad = {**good, "confidence": 2.0}
    with Store.open(store_path, create=True, max_batch_records=5) as s:
        with pytest.raises(RecordTooLargeError, match=r"^records\[1\]: "):
            s.put_many([good, big, good, bad])
        with pytest.raises(InvalidRecordError, match=r"^records\[1\]: ") as err:
            s.put_many([good, bad, big])
        assert err.value.field == "confidence"
        with pytest.raises(RecordTooLargeError) as err2:
            s.put_many(good for _ in range(6))
        assert err2.value.field == "records" and "max_batch_records=5" in str(err2.value)
        assert s.count() == 0
        ids = s.put_many([good] * 5)
        assert [s.get(i).record for i in ids] == [s.get(ids[0]).record] * 5


def test_put_many_stores_what_a_mixed_batch_stores(tmp_path: Path) -> None:
    """put_many of dicts (a run of prepared puts) and the same records as models in a
    WriteBatch with a feedback in the frame (puts derived one at a time) store the same
    envelopes, tracks and priority rows; the index serves both alike."""
    records = _records(4)
    with Store.open(tmp_path / "a", create=True, index_auto_rebuild=False) as a, \
            Store.open(tmp_path / "b", create=True, index_auto_rebuild=False) as b:  # fmt: skip
        ids_a = a.put_many([record_to_json(r) for r in records[:40]])
        b.put_many(records[:40])
        a.similar("track-000003", k=3)  # attached: the next puts carry index rows
        b.similar("track-000003", k=3)
        ids_a += a.put_many([record_to_json(r) for r in records[40:]])
        with b.batch() as batch:
            batch.put_many(records[40:])
            batch.record_feedback([ids_a[0]], True)
        assert batch.ids == ids_a[40:]
        a.record_feedback([ids_a[0]], True)
        tracks = {r.track_id for r in records if isinstance(r, Fingerprint)}
        for t in sorted(tracks)[:5]:
            assert [h.record_id for h in a.similar(t, k=5)] == [
                h.record_id for h in b.similar(t, k=5)
            ]
        a.flush()
        b.flush()
        ta, tb = a.parts.engine.tables, b.parts.engine.tables
        with ta.reading() as xa, tb.reading() as xb:
            for rid in ids_a[1:]:  # ids_a[0] got its feedback at another LSN in each store
                assert ta.get_record(xa, rid) == tb.get_record(xb, rid)
            for t in tracks:
                assert ta.get_track(xa, t) == tb.get_track(xb, t)
        fa, fb = a.get(ids_a[0]), b.get(ids_a[0])
        assert (fa.record, fa.success_count) == (fb.record, fb.success_count)
        assert ta.prio_rows()[0] == tb.prio_rows()[0]
