"""The export's columnar reader (``model/envelope_columns.py``): wherever it takes a chunk, its
table equals the one msgpack + pyarrow's inference build (the reference path, still the
fallback), for arbitrary record maps and for every record kind; what it refuses goes the slow
way and still exports equal to ``scan``; a failed export leaves no half-written file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_export import _compare, _fill
from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint, make_prediction
from xpstore.model.codec import KIND_CODES, encode_envelope
from xpstore.model.envelope_columns import EnvelopeDecoder
from xpstore.model.records import Decision, Experience, Fingerprint, PredictionOutcome
from xpstore.store import export as ex

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'arrow' extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet")


def _both(kind: str, items: list[tuple[bytes, bytes]]) -> tuple[Any, Any]:
    """(the columnar reader's table or None, the reference table or the error it raised)."""
    keys = [k for k, _ in items]
    raws = [v for _, v in items]
    cols = EnvelopeDecoder(KIND_CODES[kind]).decode(raws)
    fast = None if cols is None else ex._columns_table(pa, keys, cols)
    try:
        slow = ex._dict_chunk(pa, kind, keys, raws)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError, ValueError) as exc:
        slow = exc
    return fast, slow


def _same(a: Any, b: Any) -> bool:
    """Equal schemas (names, order, types) and equal columns; a null-typed column is all null
    either way (pyarrow's flatten leaves a stray validity buffer on one that ``equals`` sees)."""
    if a.schema != b.schema:
        return False
    return all(
        x.equals(y) or (x.type == pa.null() and x.null_count == y.null_count == len(x))
        for x, y in zip(a.columns, b.columns, strict=True)
    )


def _records_table(store: Store, kind: str) -> list[tuple[bytes, bytes]]:
    tables = store.parts.engine.tables
    with tables.reading() as txn:
        cur = txn.cursor(db=tables.db(b"records"))
        return [(bytes(k), bytes(v)) for k, v in cur.iternext(keys=True, values=True)
                if v[2] == KIND_CODES[kind]]  # fmt: skip


# ----------------------------------------------------------------------------- arbitrary maps

_KEYS = st.sampled_from(["a", "b", "c", "ts", "é", "", "k" * 15, "k" * 16, "kk" * 12,
                         "long_" + "x" * 30])  # fmt: skip
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.integers(-10, 10)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.text(min_size=256, max_size=300)
)
_LEAVES = _SCALARS | st.lists(_SCALARS, max_size=4)
_VALUES = _LEAVES | st.dictionaries(_KEYS, _LEAVES | st.dictionaries(_KEYS, _SCALARS, max_size=2),
                                    max_size=3)  # fmt: skip
_MAPS = st.dictionaries(_KEYS, _VALUES, max_size=6)


def _envelope(i: int, m: dict[str, Any], priority: float | None, code: int = 1) -> bytes:
    env = [1, code, 1000.0 + i, 10 + i, i % 3, i % 2, m]
    if priority is not None:
        env.append(priority)
    return msgpack.packb(env, use_bin_type=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_MAPS, st.none() | st.floats(0.0, 10.0)), min_size=1, max_size=8))
def test_reader_equals_pyarrow_inference_on_arbitrary_maps(
    rows: list[tuple[dict[str, Any], float | None]],
) -> None:
    items = [(i.to_bytes(8, "big"), _envelope(i, m, p)) for i, (m, p) in enumerate(rows)]
    fast, slow = _both("prediction", items)
    if isinstance(slow, Exception):  # what pyarrow cannot infer, the reader must refuse too
        assert fast is None, slow
    elif fast is not None:
        assert fast.schema == slow.schema
        assert _same(fast, slow)


def test_reader_takes_the_codec_shapes_and_refuses_the_rest() -> None:
    """Types, nulls, nested maps and lists are taken; what is outside its subset is refused
    (None), never guessed at."""
    taken = [
        {"s": "x" * 40, "i": -5, "u": 2**40, "f": 1.5, "b": True, "n": None, "l": [1, 2.5],
         "m": {"x": {"y": 1}}, "e": {}, "ls": ["a", None]},
        {"s": "é", "i": 2**62, "f": 2, "l": [], "m": None, "ts": 3.0},
    ]  # fmt: skip
    items = [(i.to_bytes(8, "big"), _envelope(i, m, None)) for i, m in enumerate(taken)]
    fast, slow = _both("prediction", items)
    assert fast is not None and _same(fast, slow)
    assert fast.column_names[6:] == ["s", "i", "u", "f", "b", "n", "l", "m.x.y", "ls"]
    assert fast.schema.field("f").type == pa.float64()  # an int beside floats
    assert fast.schema.field("n").type == pa.null()
    refused: list[dict[str, Any]] = [
        {"k" * 40: 1},  # a key over 31 bytes
        {"b": b"bytes"},  # binary
        {"x": 1}, {"x": "one"},  # a column of mixed types (two records)
        {"l": [[1]]},  # an array inside an array
        {"u": 2**64 - 1},  # beyond int64
    ]  # fmt: skip
    for case in ([refused[0]], [refused[1]], refused[2:4], [refused[4]], [refused[5]]):
        raws = [_envelope(i, m, None) for i, m in enumerate(case)]
        assert EnvelopeDecoder(1).decode(raws) is None, case
    bad_utf8 = msgpack.packb([1, 1, 1.0, 1, 0, 0, {"s": b"\xff"}], use_bin_type=False)
    cols = EnvelopeDecoder(1).decode([bad_utf8])
    assert cols is not None and ex._columns_table(pa, [bytes(8)], cols) is None
    odd = msgpack.packb([1, 2, 1.0, 1, 0, 0, {}])  # another kind's envelope in the chunk
    assert EnvelopeDecoder(1).decode([_envelope(0, {}, None), odd]) is None


# ----------------------------------------------------------------------------- records


def test_every_kind_is_read_by_the_reader_and_equals_the_reference(tmp_path: Path) -> None:
    with _fill(tmp_path / "s") as store:
        store.put(Decision(component="tuner", action="weight", target="user_weight/u1",
                           old=0.5, new=0.7, reason="r", evidence={"n": 12.0, "p": 0.01},
                           ts=7000.0))  # fmt: skip
        store.put(Decision(component="learner", action="reset", target="t", ts=7001.0))
        store.flush()
        for kind in ("prediction", "fingerprint", "query_metric", "decision"):
            items = _records_table(store, kind)
            assert items, kind
            fast, slow = _both(kind, items)
            assert fast is not None, f"the reader refused the {kind} records"
            assert _same(fast, slow), kind
            _compare(store.to_arrow(kind).to_pylist(), store, kind)


def _prediction_strategy() -> st.SearchStrategy[PredictionOutcome]:
    fraction = st.floats(0.0, 1.0)
    words = st.text(min_size=1, max_size=12)
    return st.builds(
        PredictionOutcome,
        predicted=words,
        actual=st.none() | st.text(max_size=40),
        current=st.none() | words,
        confidence=fraction,
        context=words,
        track_id=st.none() | words,
        user_id=st.none() | words,
        chunk_idx=st.none() | st.integers(0, 2**63 - 1),
        audio_features=st.none()
        | st.dictionaries(st.text(min_size=1, max_size=40), fraction, max_size=4),
        reward=st.none() | st.floats(allow_nan=False, allow_infinity=False),
        user_weight=st.none() | fraction,
        score=st.none() | fraction,
        ts=st.floats(0.0, 1e10),
    )


def _fingerprint_strategy() -> st.SearchStrategy[Fingerprint]:
    @st.composite
    def build(draw: st.DrawFn) -> Fingerprint:
        rng = np.random.default_rng(draw(st.integers(0, 2**32)))
        fp = make_fingerprint(rng, draw(st.text(min_size=1, max_size=10)),
                              with_streaming=draw(st.booleans()),
                              with_batch=draw(st.booleans()),
                              embedding_dim=draw(st.sampled_from([None, 3])),
                              ts=draw(st.floats(0.0, 1e10)))  # fmt: skip
        meta = draw(st.none() | st.dictionaries(st.text(min_size=1, max_size=40),
                                                st.text(max_size=300), max_size=3))  # fmt: skip
        return fp.model_copy(update={"metadata": meta})

    return build()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    preds=st.lists(_prediction_strategy(), max_size=12),
    fps=st.lists(_fingerprint_strategy(), max_size=6),
    chunk=st.sampled_from([3, 5, 16_384]),
)
def test_export_of_generated_records_equals_scan(
    tmp_path_factory: pytest.TempPathFactory,
    preds: list[PredictionOutcome],
    fps: list[Fingerprint],
    chunk: int,
) -> None:
    """Optional fields present or not, long keys and strings, several chunks (the reader per
    chunk, concatenated): every value equals ``scan``'s, and the table equals the reference
    path's exactly (schema and column order included)."""
    path = tmp_path_factory.mktemp("gen") / "s"
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(ex, "CHUNK", chunk)
        with Store.open(path, create=True, durability="none") as store:
            if preds:
                store.put_many(preds)
            if fps:
                store.put_many(fps)
            for kind in ("prediction", "fingerprint"):
                table = store.to_arrow(kind)
                _compare(table.to_pylist(), store, kind)
                mp.setattr(EnvelopeDecoder, "decode", lambda self, raws: None)
                reference = store.to_arrow(kind)
                mp.undo()
                mp.setattr(ex, "CHUNK", chunk)
                assert _same(table, reference), kind
    finally:
        mp.undo()


def test_filters_and_the_empty_store_on_the_columnar_path(tmp_path: Path) -> None:
    with Store.open(tmp_path / "empty", create=True, durability="none") as empty:
        for kind in ("prediction", "fingerprint"):
            table = empty.to_arrow(kind)
            assert table.num_rows == 0 and table.column_names == list(ex._ENVELOPE)
    with _fill(tmp_path / "s") as store:
        where = {"context": "warm_start"}
        got = store.to_arrow("prediction", where=where, since=1050.0, until=1400.0)
        want = sorted(store.scan("prediction", where=where, since=1050.0, until=1400.0),
                      key=lambda e: e.id)  # fmt: skip
        assert got.column("id").to_pylist() == [e.id for e in want] and want
        _compare_subset(got.to_pylist(), [e.id for e in want], store)


def _compare_subset(rows: list[dict[str, Any]], ids: list[int], store: Store) -> None:
    by_id = {e.id: e for e in store.scan("prediction")}
    for row, rid in zip(rows, ids, strict=True):
        rec = by_id[rid].record.model_dump(exclude_none=True)
        assert row["confidence"] == rec["confidence"] and row["context"] == rec["context"]
        features = rec.get("audio_features") or {}
        for name, value in features.items():
            assert math.isclose(row[f"audio_features.{name}"], value, rel_tol=0, abs_tol=0)


def test_a_long_metadata_key_takes_the_slow_path_and_still_equals_scan(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        fp = make_fingerprint(rng, "t1", embedding_dim=3, ts=1.0)
        store.put(fp.model_copy(update={"metadata": {"a_key_of_more_than_31_bytes_long": "v"}}))
        store.put(make_fingerprint(rng, "t2", embedding_dim=3, ts=2.0))
        store.flush()
        items = _records_table(store, "fingerprint")
        assert EnvelopeDecoder(KIND_CODES["fingerprint"]).decode([v for _, v in items]) is None
        _compare(store.to_arrow("fingerprint").to_pylist(), store, "fingerprint")


def test_a_failed_export_leaves_no_half_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file being written when the export fails is removed; files of kinds already done
    stay whole, and there is no ``export.json`` (the mark of a complete export)."""
    out = tmp_path / "out"
    with _fill(tmp_path / "s") as store:
        real = ex._write

        def failing(pa_: Any, table: Any, path: Path, fmt: str, rows: int) -> None:
            if path.name.startswith("fingerprint"):
                path.write_bytes(b"PAR1 partial")
                raise OSError(28, "No space left on device")
            real(pa_, table, path, fmt, rows)

        monkeypatch.setattr(ex, "_write", failing)
        with pytest.raises(OSError, match="No space"):
            store.parts.export.export(out, "parquet", None, None, None, None, 100, None)
        assert sorted(p.name for p in out.iterdir()) == ["prediction.parquet"]
        assert pq.read_table(out / "prediction.parquet").num_rows == 499
        monkeypatch.setattr(ex, "_write", real)
        report = store.parts.export.export(out, "parquet", None, None, None, None, 100, None)
        assert json.loads((out / "export.json").read_text())["lsn"] == report["lsn"]


def test_progress_counts_every_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ex, "CHUNK", 64)
    seen: list[tuple[int, int]] = []
    with _fill(tmp_path / "s") as store:
        store.parts.export.export(tmp_path / "o", "arrow", ["prediction"], None, None, None,
                                  1000, lambda what, done, total, unit: seen.append(
                                      (done, total)))  # fmt: skip
    assert [d for d, _ in seen] == [64 * i for i in range(1, 8)] + [499]
    assert seen[-1] == (499, 499)


def test_prediction_kind_of_a_mixed_store_skips_the_other_kinds(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        for i in range(30):
            store.put(make_prediction(rng, f"t{i}", ts=float(i)))
            store.put(make_fingerprint(rng, f"t{i}", embedding_dim=2, ts=float(i)))
        table = store.to_arrow("prediction")
        assert table.num_rows == 30
        _compare(table.to_pylist(), store, "prediction")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_envelopes_are_refused_never_misread(data: st.DataObject) -> None:
    """Truncated or bit-flipped envelopes: the reader refuses them (the slow path then raises
    what msgpack says) or, where the bytes still decode, agrees with the reference."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32)))
    recs = [make_prediction(rng, f"t{i}", ts=float(i)) for i in range(3)]
    raws = [encode_envelope(Experience(i + 1, "prediction", float(i), r, i + 1))
            for i, r in enumerate(recs)]  # fmt: skip
    victim = data.draw(st.integers(0, 2))
    raw = bytearray(raws[victim])
    if data.draw(st.booleans()):
        raws[victim] = bytes(raw[: data.draw(st.integers(1, len(raw) - 1))])
    else:
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
        raws[victim] = bytes(raw)
    items = [(i.to_bytes(8, "big"), v) for i, v in enumerate(raws)]
    keys = [k for k, _ in items]
    cols = EnvelopeDecoder(KIND_CODES["prediction"]).decode(raws)
    fast = None if cols is None else ex._columns_table(pa, keys, cols)
    try:
        slow = ex._dict_chunk(pa, "prediction", keys, raws)
    except Exception:  # whatever msgpack or pyarrow says about the damage
        assert fast is None
        return
    if fast is not None:
        assert _same(fast, slow)


def test_an_error_in_a_decoding_thread_reaches_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ex, "CHUNK", 50)
    monkeypatch.setattr(ex, "THREADS", 2)
    monkeypatch.setattr(EnvelopeDecoder, "decode", lambda self, raws: None)

    def broken(*args: Any) -> Any:
        raise ValueError("a damaged envelope")

    monkeypatch.setattr(ex, "_dict_chunk", broken)
    with _fill(tmp_path / "s") as store, pytest.raises(ValueError, match="damaged"):
        store.to_arrow("prediction")
