"""The binary codec: exact round trips in both decode modes, and every malformed input refused."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.strategies import experiences, fingerprints, ops, records
from xpstore.errors import CodecError, InvalidRecordError, StoreCorruptionError, XpStoreError
from xpstore.model.codec import (
    CODEC_VERSION,
    KIND_BY_CODE,
    KIND_CODES,
    DeleteOp,
    DeleteTrackOp,
    Op,
    PutOp,
    UpdateOp,
    decode_envelope,
    decode_op,
    encode_envelope,
    encode_op,
    envelope_at,
    envelope_from_put,
    peek_put,
    put_head,
)
from xpstore.model.priority_rows import inputs_for, inputs_from_map
from xpstore.model.records import (
    BATCH_FIELDS,
    KINDS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    BatchFingerprint,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    StreamingFingerprint,
    kind_of,
    record_to_json,
)

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BATCH = {name: 0.1 for name in BATCH_FIELDS} | {"lufs": -9.0, "tempo_bpm": 126.0}


def full_fingerprint() -> Fingerprint:
    return Fingerprint(
        track_id="track-1",
        batch=BatchFingerprint(**BATCH),
        streaming=StreamingFingerprint(
            values={n: BATCH[n] for n in STREAMING_FIELDS},
            confidence=dict.fromkeys(STREAMING_FIELDS, 0.9),
            chunk_count=5,
        ),
        embedding=[0.25, -0.5, 1e-300],
        metadata={"title": "Neon River"},
        algorithm_version="8",
        ts=1_700_000_000.25,
    )


def prediction() -> PredictionOutcome:
    return PredictionOutcome(
        predicted="punchy",
        actual="warm",
        confidence=0.75,
        context="audio_guided",
        audio_features={"energy": 0.6},
        reward=-0.5,
        ts=1.0,
    )


def metric() -> QueryMetric:
    return QueryMetric(
        query_id="q",
        query_text="t",
        query_type="semantic",
        latency_ms=3.5,
        memory_mb=1.0,
        cache_hit=True,
        result_count=2,
        layers=["a"],
        layer_latencies_ms={"a": 3.0},
        success=False,
        error="boom",
    )


def assert_same_record(a: Record, b: Record) -> None:
    """Equal, same types all the way down, and the same bytes when encoded again."""
    assert a == b
    assert type(a) is type(b)
    if isinstance(a, Fingerprint):
        assert isinstance(b, Fingerprint)
        assert type(a.batch) is type(b.batch)
        assert type(a.streaming) is type(b.streaming)
    assert record_to_json(a) == record_to_json(b)
    assert encode_op(PutOp(a)) == encode_op(PutOp(b))


# --------------------------------------------------------------------------- round trips


@FAST
@given(ops(), st.booleans())
def test_op_round_trip(op: Op, validate: bool) -> None:
    data = encode_op(op)
    back = decode_op(data, validate=validate)
    assert back == op
    assert type(back) is type(op)
    assert encode_op(back) == data  # bit for bit
    if isinstance(op, PutOp):
        assert isinstance(back, PutOp)
        assert_same_record(op.record, back.record)


@FAST
@given(st.integers(1, 64).flatmap(fingerprints), st.booleans())
def test_fingerprint_round_trip_any_embedding_dim(fp: Fingerprint, validate: bool) -> None:
    back = decode_op(encode_op(PutOp(fp)), validate=validate)
    assert isinstance(back, PutOp)
    assert_same_record(fp, back.record)


@FAST
@given(experiences(), st.booleans())
def test_envelope_round_trip(exp: Experience, validate: bool) -> None:
    data = encode_envelope(exp)
    back = decode_envelope(exp.id, data, validate=validate)
    assert back == exp
    assert_same_record(exp.record, back.record)
    assert encode_envelope(back) == data


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("make", [full_fingerprint, prediction, metric])
def test_fast_and_validated_decodes_agree(make: Any, validate: bool) -> None:
    record = make()
    back = decode_op(encode_op(PutOp(record)), validate=validate)
    assert isinstance(back, PutOp)
    assert_same_record(record, back.record)
    # a fast-path model is a real model: it dumps, copies and compares like a validated one
    assert back.record.model_dump() == record.model_dump()
    other = decode_op(encode_op(PutOp(record)), validate=not validate)
    assert isinstance(other, PutOp)
    assert back.record.model_fields_set == other.record.model_fields_set
    assert back.record.model_copy() == record


def test_fast_path_fills_defaults_and_nested_models() -> None:
    qm = QueryMetric(
        query_id="q",
        query_text="",
        query_type="t",
        latency_ms=0,
        memory_mb=0,
        cache_hit=False,
        result_count=0,
        success=True,
    )
    back = decode_op(encode_op(PutOp(qm)), validate=False)
    assert isinstance(back, PutOp) and isinstance(back.record, QueryMetric)
    assert back.record.layers == [] and back.record.layer_latencies_ms == {}
    assert back.record.user_satisfaction is None and back.record.concurrency == 1

    fp = Fingerprint(
        track_id="t",
        streaming=StreamingFingerprint(
            values={n: 0.5 for n in STREAMING_FIELDS_NO_HARMONIC},
            confidence={n: 0.5 for n in STREAMING_FIELDS_NO_HARMONIC},
        ),
    )
    back = decode_op(encode_op(PutOp(fp)), validate=False)
    assert isinstance(back, PutOp) and isinstance(back.record, Fingerprint)
    assert back.record.batch is None
    assert isinstance(back.record.streaming, StreamingFingerprint)
    assert list(back.record.streaming.values) == list(STREAMING_FIELDS_NO_HARMONIC)


def test_layout_is_the_documented_one() -> None:
    fp = full_fingerprint().model_copy(update={"ts": 12.25})
    raw = encode_op(PutOp(fp))
    obj = msgpack.unpackb(raw)
    assert obj[:5] == [CODEC_VERSION, 1, KIND_CODES["fingerprint"], 12.25, fp.track_id]
    # the fixed 13 bytes: fixarray(6), version 2, put, kind, float64 marker, ts big-endian
    assert raw[:5] == bytes((0x96, 2, 1, KIND_CODES["fingerprint"], 0xCB))
    assert struct.unpack(">d", raw[5:13]) == (12.25,)
    assert put_head(raw) == (KIND_CODES["fingerprint"], 12.25, fp.track_id,
                             len(raw) - len(msgpack.packb(obj[5])))
    m = obj[5]
    assert m["ts"] == 12.25 and m["track_id"] == fp.track_id  # the record map is whole
    assert m["batch"] == [BATCH[n] for n in BATCH_FIELDS]
    assert m["streaming"] == [[BATCH[n] for n in STREAMING_FIELDS], [0.9] * 13, 5]
    assert "kind" not in m
    p = msgpack.unpackb(
        encode_op(PutOp(PredictionOutcome(predicted="a", confidence=1, context="c")))
    )
    assert p == [1, 1, 1, {"predicted": "a", "confidence": 1.0, "context": "c"}]  # None omitted
    assert msgpack.unpackb(encode_op(UpdateOp(5, {"actual": "x"}))) == [1, 2, 5, {"actual": "x"}]
    assert msgpack.unpackb(encode_op(DeleteOp(6))) == [1, 3, 6]
    assert msgpack.unpackb(encode_op(DeleteTrackOp("t"))) == [1, 4, "t"]
    exp = Experience(3, "prediction", 2.0, prediction(), 4, 1, 0)
    env = msgpack.unpackb(encode_envelope(exp))
    assert env[:6] == [1, 1, 2.0, 4, 1, 0]
    assert KIND_BY_CODE == {1: "prediction", 2: "fingerprint", 3: "query_metric", 4: "decision"}
    assert set(KIND_CODES) == set(KINDS)


def test_floats_are_kept_bit_for_bit() -> None:
    tiny = 5e-324
    fp = full_fingerprint().model_copy(update={"embedding": [tiny, -0.0, 1 / 3]})
    back = decode_op(encode_op(PutOp(fp)), validate=False)
    assert isinstance(back, PutOp) and isinstance(back.record, Fingerprint)
    assert back.record.embedding is not None
    assert [x.hex() for x in back.record.embedding] == [tiny.hex(), (-0.0).hex(), (1 / 3).hex()]


def test_envelope_id_is_the_key_not_the_value() -> None:
    exp = Experience(3, "prediction", 2.0, prediction(), 4)
    data = encode_envelope(exp)
    assert decode_envelope(99, data).id == 99
    assert decode_envelope(99, memoryview(data)).record == exp.record  # LMDB hands out buffers


# --------------------------------------------------------------------------- refused input


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


MAKERS: dict[str, Callable[[], Record]] = {
    "prediction": prediction,
    "fingerprint": full_fingerprint,
    "query_metric": metric,
}


def good_map(kind: str) -> dict[str, Any]:
    m: dict[str, Any] = msgpack.unpackb(encode_op(PutOp(MAKERS[kind]())))[-1]
    return m


def fp_map(**over: Any) -> dict[str, Any]:
    m = good_map("fingerprint")
    m.update(over)
    return m


GARBAGE: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("reserved-byte", b"\xc1"),
    ("text", b"hello world"),
    ("truncated", encode_op(PutOp(full_fingerprint()))[:-7]),
    ("trailing-data", encode_op(DeleteOp(1)) + b"\x00"),
    ("not-an-array", pack({"v": 1})),
    ("empty-array", pack([])),
    ("scalar", pack(7)),
    ("version-0", pack([0, 3, 1])),
    ("version-str", pack(["1", 3, 1])),
    ("version-bool", pack([True, 3, 1])),
    ("unknown-op", pack([1, 9, 1])),
    ("no-op-code", pack([1])),
    ("op-wrong-length", pack([1, 3, 1, 2])),
    ("put-unknown-kind", pack([1, 1, 7, good_map("prediction")])),
    ("put-kind-as-str", pack([1, 1, "prediction", good_map("prediction")])),
    ("put-record-not-map", pack([1, 1, 1, [1, 2]])),
    ("put-missing-field", pack([1, 1, 1, {"predicted": "a"}])),
    ("put-unknown-field", pack([1, 1, 1, {**good_map("prediction"), "zzz": 1}])),
    ("put-bytes-key", pack([1, 1, 1, {**good_map("prediction"), b"k": 1}])),
    ("put-int-key", pack([1, 1, 1, {1: 2}])),
    ("batch-short", pack([1, 1, 2, fp_map(batch=[0.1] * 24)])),
    ("batch-map", pack([1, 1, 2, fp_map(batch=BATCH)])),
    ("streaming-11", pack([1, 1, 2, fp_map(streaming=[[0.1] * 11, [0.1] * 11, 0])])),
    ("streaming-mismatch", pack([1, 1, 2, fp_map(streaming=[[0.1] * 13, [0.1] * 10, 0])])),
    ("streaming-shape", pack([1, 1, 2, fp_map(streaming={"values": {}})])),
    ("update-negative-id", pack([1, 2, -1, {}])),
    ("update-bool-id", pack([1, 2, True, {}])),
    ("update-changes-list", pack([1, 2, 1, ["actual"]])),
    ("delete-float-id", pack([1, 3, 1.0])),
    ("delete-track-empty", pack([1, 4, ""])),
    ("delete-track-int", pack([1, 4, 5])),
    ("v2-delete", pack([2, 3, 1])),
    ("v2-put-short", pack([2, 1, 1, 5.0, None])),
    ("v2-put-ts-differs", pack([2, 1, 1, 5.0, None, {**good_map("prediction"), "ts": 6.0}])),
    ("v2-put-ts-int", pack([2, 1, 1, 5, None, {**good_map("prediction"), "ts": 5.0}])),
    ("v2-put-track-differs", pack([2, 1, 2, 5.0, "b", fp_map(ts=5.0, track_id="a")])),
    ("v2-put-track-on-prediction", pack([2, 1, 1, 5.0, "a", {**good_map("prediction"),
                                                              "ts": 5.0}])),
    ("v2-put-track-int", pack([2, 1, 2, 5.0, 7, fp_map(ts=5.0)])),
    ("v2-put-unknown-kind", pack([2, 1, 9, 5.0, None, {"ts": 5.0}])),
    ("v2-put-record-list", pack([2, 1, 1, 5.0, None, [1]])),
    ("v2-put-cut", encode_op(PutOp(PredictionOutcome(predicted="a", confidence=1, context="c",
                                                     ts=5.0)))[:14]),
    ("ext-type", pack(msgpack.ExtType(5, b"xx"))),
    ("deep-nesting", b"\x91" * 5000),
]


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("data", [g[1] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_malformed_ops_raise_codec_error(data: bytes, validate: bool) -> None:
    with pytest.raises(CodecError) as info:
        decode_op(data, validate=validate)
    err = info.value
    assert isinstance(err, InvalidRecordError) and isinstance(err, ValueError)
    assert isinstance(err, XpStoreError) and not isinstance(err, StoreCorruptionError)
    assert str(err)


def test_newer_codec_version_is_named() -> None:
    for data in (pack([CODEC_VERSION + 1, 3, 1]), pack([7, 1, 2, 3, 4, 5, 6])):
        with pytest.raises(CodecError, match=r"codec version \d+, newer") as info:
            decode_op(data)
        assert str(CODEC_VERSION + 1) in str(info.value) or "7" in str(info.value)
    with pytest.raises(CodecError, match="codec version 2"):
        decode_envelope(1, pack([2, 1, 0.0, 1, 0, 0, {}]))


def test_validated_decode_refuses_invalid_values() -> None:
    bad = pack([1, 1, 1, {**good_map("prediction"), "confidence": 1.5}])
    with pytest.raises(CodecError) as info:
        decode_op(bad, validate=True)
    assert info.value.field == "confidence"
    # the fast path trusts checksummed data and does not look at values
    fast = decode_op(bad, validate=False)
    assert isinstance(fast, PutOp) and fast.record.confidence == 1.5  # type: ignore[union-attr]

    bad_batch = pack(
        [1, 1, 2, fp_map(batch=[-5.0 if n == "tempo_bpm" else BATCH[n] for n in BATCH_FIELDS])]
    )
    with pytest.raises(CodecError) as info:
        decode_op(bad_batch)
    assert info.value.field == "batch.tempo_bpm"

    with pytest.raises(CodecError) as info:
        decode_op(pack([1, 2, 1, {"confidence": 0.5}]))
    assert info.value.field == "confidence"


@pytest.mark.parametrize(
    "data",
    [
        pack([1, 1, 0.0, 1, 0, 0]),  # too short
        pack([1, 1, "now", 1, 0, 0, good_map("prediction")]),
        pack([1, 1, 0.0, -1, 0, 0, good_map("prediction")]),
        pack([1, 1, 0.0, 1, 0.5, 0, good_map("prediction")]),
        pack([1, 9, 0.0, 1, 0, 0, good_map("prediction")]),
        pack([1, 2, 0.0, 1, 0, 0, good_map("prediction")]),  # a prediction map as a fingerprint
        b"\xff\xff",
    ],
)
def test_malformed_envelopes_raise_codec_error(data: bytes) -> None:
    for validate in (True, False):
        with pytest.raises(CodecError):
            decode_envelope(1, data, validate=validate)


def test_validated_envelope_refuses_negative_ts() -> None:
    data = pack([1, 1, -5.0, 1, 0, 0, good_map("prediction")])
    with pytest.raises(CodecError) as info:
        decode_envelope(1, data, validate=True)
    assert info.value.field == "ts"


def test_encode_refuses_what_it_cannot_represent() -> None:
    with pytest.raises(CodecError):
        encode_op(DeleteOp(-1))
    with pytest.raises(CodecError):
        encode_op(DeleteTrackOp(""))
    with pytest.raises(CodecError):
        encode_op(UpdateOp(1, {"metadata": object()}))
    with pytest.raises(CodecError):
        encode_op("put")  # type: ignore[arg-type]
    with pytest.raises(CodecError):
        encode_envelope(Experience(1, "fingerprint", 0.0, prediction(), 1))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.booleans())
def test_arbitrary_bytes_decode_or_raise_codec_error(data: bytes, validate: bool) -> None:
    try:
        op = decode_op(data, validate=validate)
    except CodecError:
        return
    assert isinstance(op, PutOp | UpdateOp | DeleteOp | DeleteTrackOp)
    assert decode_op(encode_op(op), validate=validate) == op


@FAST
@given(records(), st.booleans(), st.data())
def test_corrupted_encodings_never_escape_as_other_errors(
    record: Record, validate: bool, data: st.DataObject
) -> None:
    raw = bytearray(encode_op(PutOp(record)))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255))
    try:
        op = decode_op(bytes(raw), validate=validate)
    except CodecError:
        return
    assert isinstance(op, PutOp | UpdateOp | DeleteOp | DeleteTrackOp)


@given(records())
@settings(max_examples=100, deadline=None)
def test_envelope_from_put_equals_a_full_encode(record: Record) -> None:
    rec = record.model_copy(update={"ts": 12.5})
    exp = Experience(id=7, kind=kind_of(rec), ts=12.5, record=rec, updated_lsn=7)
    fast = envelope_from_put(encode_op(PutOp(rec)), kind=exp.kind, ts=12.5, updated_lsn=7)
    assert fast == encode_envelope(exp)
    with pytest.raises(CodecError):
        envelope_from_put(encode_op(DeleteOp(3)), kind=exp.kind, ts=1.0, updated_lsn=7)


@given(records(), st.integers(1, 2**40), st.integers(0, 2**33), st.integers(0, 3),
       st.one_of(st.none(), st.floats(0.0, 10.0)))  # fmt: skip
@settings(max_examples=150, deadline=None)
def test_priority_inputs_of_a_model_equal_those_of_its_encoded_map(
    record: Record, rid: int, rc: int, sc: int, override: float | None
) -> None:
    """``inputs_for`` (from the model: a put) and ``inputs_from_map`` (from the encoded record:
    the many-id operations) give the same row, the put's fast path for a new prediction
    included (``rc``, ``sc`` 0 and no override)."""
    kind = kind_of(record)
    m = msgpack.unpackb(encode_op(PutOp(record)), strict_map_key=True)[-1]
    for args in ((0, 0, None), (rc, sc, override)):
        assert inputs_for(record, rid, 12.5, *args) == inputs_from_map(kind, m, rid, 12.5, *args)


@given(records(), st.sampled_from([0.0, -0.0, 5.0, 6.5]), st.integers(0, 3), st.integers(0, 3))
@settings(max_examples=100, deadline=None)
def test_envelope_from_put_keeps_the_given_ts_and_counters(
    record: Record, ts: float, rc: int, sc: int
) -> None:
    """The envelope's header carries the ``ts`` and counters it is given, byte for byte, also
    when they differ from the put's (a zero of the other sign included): only an equal nonzero
    ts with zero counters may copy the put's own header bytes."""
    raw = encode_op(PutOp(record.model_copy(update={"ts": 5.0 if ts else -ts})))
    head = put_head(raw)
    assert head is not None
    env = envelope_from_put(raw, kind=kind_of(record), ts=ts, updated_lsn=300,
                            retrieval_count=rc, success_count=sc)  # fmt: skip
    layout = pack([1, head[0], ts, 300, rc, sc])
    assert env == b"\x97" + layout[1:] + raw[head[3] :]


@given(records())
@settings(max_examples=100, deadline=None)
def test_peek_put_reads_kind_ts_and_track_without_models(record: Record) -> None:
    rec = record.model_copy(update={"ts": 7.0})
    summary = peek_put(encode_op(PutOp(rec)))
    assert summary is not None
    assert (summary.kind, summary.ts) == (kind_of(rec), 7.0)
    assert summary.track_id == (rec.track_id if isinstance(rec, Fingerprint) else None)
    assert peek_put(encode_op(DeleteOp(3))) is None


def _v1_put(rec: Record) -> bytes:
    """A put as codec version 1 wrote it (stores written before version 2)."""
    return pack([1, 1, KIND_CODES[kind_of(rec)], msgpack.unpackb(encode_op(PutOp(rec)))[-1]])


@given(records(), st.integers(min_value=1, max_value=2**63))
@settings(max_examples=150, deadline=None)
def test_v2_put_header_and_envelope_agree_with_the_record(record: Record, lsn: int) -> None:
    ts0 = 1_700_000_000.125
    rec = record.model_copy(update={"ts": ts0})
    raw = encode_op(PutOp(rec))
    head = put_head(raw)
    assert head is not None
    kind_code, ts, track, offset = head
    assert (KIND_BY_CODE[kind_code], ts) == (kind_of(rec), rec.ts)
    assert track == (rec.track_id if isinstance(rec, Fingerprint) else None)
    assert msgpack.unpackb(raw[offset:]) == msgpack.unpackb(raw)[-1]
    exp = Experience(id=lsn, kind=kind_of(rec), ts=ts0, record=rec, updated_lsn=lsn)
    assert envelope_at(raw, kind_code, offset, lsn) == encode_envelope(exp)
    assert envelope_from_put(raw, kind=exp.kind, ts=ts0, updated_lsn=lsn) == encode_envelope(exp)
    # a store written with codec version 1 reads the same
    old = _v1_put(rec)
    assert put_head(old) is None
    back = decode_op(old, validate=True)
    new = decode_op(raw, validate=True)
    assert isinstance(back, PutOp) and isinstance(new, PutOp) and back.record == new.record
    summary = peek_put(old)
    assert summary is not None and (summary.kind, summary.ts) == (kind_of(rec), ts0)
    assert envelope_from_put(old, kind=exp.kind, ts=ts0, updated_lsn=lsn) == encode_envelope(exp)


def test_put_head_names_what_is_wrong_with_a_bad_fixed_header() -> None:
    rec = Fingerprint(track_id="a" * 40, batch=BATCH, ts=5.0)
    raw = encode_op(PutOp(rec))
    assert raw[13] == 0xD9  # a track of 40 bytes: str8
    cases = {
        "float marker": raw[:4] + b"\xca" + raw[5:],
        "kind": raw[:3] + b"\x09" + raw[4:],
        "track tag": raw[:13] + b"\xc3" + raw[14:],
        "track length": raw[:14] + b"\xff" + raw[15:],
        "track utf-8": raw[:15] + b"\xff" + raw[16:],
        "record": raw[:15 + 40] + b"\x93" + raw[16 + 40:],
        "cut": raw[:14],
    }
    for what, data in cases.items():
        with pytest.raises(CodecError):
            put_head(data)
            pytest.fail(f"put_head took a bad {what}")
        with pytest.raises(CodecError):
            decode_op(data, validate=False)
            pytest.fail(f"decode_op took a bad {what}")
