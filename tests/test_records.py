"""Record validation: what is accepted, what is refused, and which field the error names."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings

from tests.strategies import records
from xpstore.errors import InvalidRecordError, XpStoreError
from xpstore.model.records import (
    BATCH_FIELDS,
    HARMONIC_FIELDS,
    KINDS,
    MODEL_BY_KIND,
    MUTABLE_FIELDS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    BatchFingerprint,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    StreamingFingerprint,
    apply_changes,
    kind_of,
    record_from_json,
    record_to_json,
    validate_record,
    with_ts,
)

# --------------------------------------------------------------------------- valid examples

BATCH: dict[str, float] = {
    "sub_bass_pct": 0.12,
    "bass_pct": 0.25,
    "low_mid_pct": 0.16,
    "mid_pct": 0.18,
    "upper_mid_pct": 0.13,
    "presence_pct": 0.09,
    "air_pct": 0.07,
    "lufs": -8.2,
    "crest_db": 8.5,
    "bass_mid_ratio": 5.5,
    "tempo_bpm": 128.0,
    "rhythm_stability": 0.9,
    "transient_density": 0.66,
    "silence_ratio": 0.01,
    "spectral_centroid": 0.31,
    "spectral_rolloff": 0.55,
    "spectral_flatness": 0.12,
    "harmonic_ratio": 0.45,
    "pitch_stability": 0.44,
    "chroma_energy": 0.5,
    "dynamic_range_variation": 0.25,
    "loudness_variation_std": 1.4,
    "peak_consistency": 0.8,
    "stereo_width": 0.6,
    "phase_correlation": -0.2,
}


def streaming(names: tuple[str, ...] = STREAMING_FIELDS) -> dict[str, Any]:
    return {
        "values": {n: BATCH[n] for n in names},
        "confidence": dict.fromkeys(names, 0.8),
        "chunk_count": 4,
    }


def prediction_data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "predicted": "punchy",
        "actual": "warm",
        "current": "gentle",
        "confidence": 0.8,
        "context": "warm_start",
        "track_id": "track-42",
        "user_id": "u1",
        "chunk_idx": 3,
        "audio_features": {"energy": 0.7, "brightness": 0.4},
        "reward": -0.5,
        "user_weight": 0.7,
        "ts": 1_700_000_000.5,
    }
    data.update(over)
    return data


def fingerprint_data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "track_id": "track-42",
        "batch": dict(BATCH),
        "streaming": streaming(),
        "embedding": [0.1, -0.2, 0.3],
        "metadata": {"title": "Neon River", "artist": "DJ Novak"},
        "algorithm_version": "8",
        "ts": 1_700_000_000.0,
    }
    data.update(over)
    return data


def metric_data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "query_id": "q-1",
        "query_text": "what did I do yesterday",
        "query_type": "episodic",
        "latency_ms": 42.0,
        "memory_mb": 12.5,
        "cache_hit": False,
        "result_count": 7,
        "layers": ["episodic", "semantic"],
        "layer_latencies_ms": {"episodic": 20.0, "semantic": 18.0},
        "success": True,
        "ts": 1_700_000_000.0,
    }
    data.update(over)
    return data


def decision_data(**over: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "component": "learner", "action": "weight", "target": "user_weight/u1", "old": 0.7,
        "new": 0.65, "reason": "audio-enhanced accuracy leads by 8 points",
        "evidence": {"window": 100.0, "user_only": 0.52, "audio_enhanced": 0.6},
        "user_id": "u1", "policy": "seed", "ts": 1_700_000_000.0,
    }  # fmt: skip
    data.update(over)
    return data


DATA: dict[str, Callable[..., dict[str, Any]]] = {
    "prediction": prediction_data,
    "fingerprint": fingerprint_data,
    "query_metric": metric_data,
    "decision": decision_data,
}


def with_batch(**over: Any) -> dict[str, Any]:
    batch = dict(BATCH)
    batch.update(over)
    return fingerprint_data(batch=batch, streaming=None)


def with_stream_values(**over: Any) -> dict[str, Any]:
    s = streaming()
    s["values"].update(over)
    return fingerprint_data(streaming=s)


def refuse(kind: str, data: dict[str, Any]) -> InvalidRecordError:
    with pytest.raises(InvalidRecordError) as info:
        validate_record(kind, data)
    return info.value


# --------------------------------------------------------------------------- accepted


def test_field_name_tables() -> None:
    assert len(BATCH_FIELDS) == 25 and len(set(BATCH_FIELDS)) == 25
    assert BATCH_FIELDS[0] == "sub_bass_pct" and BATCH_FIELDS[-1] == "phase_correlation"
    assert tuple(BatchFingerprint.model_fields) == BATCH_FIELDS
    assert len(STREAMING_FIELDS) == 13 and set(STREAMING_FIELDS) <= set(BATCH_FIELDS)
    assert set(HARMONIC_FIELDS) <= set(STREAMING_FIELDS)
    no_harmonic = tuple(f for f in STREAMING_FIELDS if f not in HARMONIC_FIELDS)
    assert no_harmonic == STREAMING_FIELDS_NO_HARMONIC
    assert len(STREAMING_FIELDS_NO_HARMONIC) == 10
    assert tuple(MODEL_BY_KIND) == KINDS == tuple(MUTABLE_FIELDS)


@pytest.mark.parametrize("kind", KINDS)
def test_valid_records_validate_and_know_their_kind(kind: str) -> None:
    record = validate_record(kind, DATA[kind]())
    assert isinstance(record, MODEL_BY_KIND[kind])
    assert kind_of(record) == kind


def test_batch_as_dict_is_in_canonical_order() -> None:
    shuffled = dict(reversed(list(BATCH.items())))
    batch = BatchFingerprint(**shuffled)
    assert list(batch.as_dict()) == list(BATCH_FIELDS)
    assert batch.as_dict() == BATCH


def test_batch_accepts_any_mapping_and_ints_for_floats() -> None:
    data = fingerprint_data(batch=MappingProxyType({**BATCH, "tempo_bpm": 120}))
    fp = validate_record("fingerprint", data)
    assert isinstance(fp, Fingerprint) and isinstance(fp.batch, BatchFingerprint)
    assert fp.batch.tempo_bpm == 120.0 and isinstance(fp.batch.tempo_bpm, float)


def test_batch_band_sum_is_not_enforced() -> None:
    fp = validate_record("fingerprint", with_batch(sub_bass_pct=1.0, bass_pct=1.0))
    assert isinstance(fp, Fingerprint) and fp.batch is not None
    assert sum(fp.batch.as_dict()[n] for n in BATCH_FIELDS[:7]) > 1.5


def test_batch_edge_values_are_valid() -> None:
    edges = with_batch(
        lufs=0.0,
        crest_db=0.0,
        bass_mid_ratio=-1e9,
        tempo_bpm=1000.0,
        loudness_variation_std=0.0,
        phase_correlation=-1.0,
        silence_ratio=1.0,
        air_pct=0.0,
    )
    fp = validate_record("fingerprint", edges)
    assert isinstance(fp, Fingerprint) and fp.batch is not None
    assert fp.batch.phase_correlation == -1.0 and fp.batch.tempo_bpm == 1000.0


def test_streaming_10_values_without_harmonics() -> None:
    fp = validate_record(
        "fingerprint",
        fingerprint_data(batch=None, streaming=streaming(STREAMING_FIELDS_NO_HARMONIC)),
    )
    assert isinstance(fp, Fingerprint) and fp.streaming is not None and fp.batch is None
    assert set(fp.streaming.values) == set(STREAMING_FIELDS_NO_HARMONIC)
    assert fp.streaming.mean_confidence() == pytest.approx(0.8)


def test_streaming_keys_come_out_in_canonical_order() -> None:
    s = streaming()
    s["values"] = dict(reversed(list(s["values"].items())))
    sf = StreamingFingerprint(**s)
    assert list(sf.values) == list(STREAMING_FIELDS)
    assert list(sf.confidence) == list(STREAMING_FIELDS)


def test_algorithm_version_int_becomes_str() -> None:
    fp = validate_record("fingerprint", fingerprint_data(algorithm_version=8))
    assert isinstance(fp, Fingerprint) and fp.algorithm_version == "8"


def test_was_correct_is_derived_and_not_dumped() -> None:
    right = PredictionOutcome(**prediction_data(actual="punchy"))
    wrong = PredictionOutcome(**prediction_data(actual="warm"))
    open_ = PredictionOutcome(**prediction_data(actual=None))
    assert (right.was_correct, wrong.was_correct, open_.was_correct) == (True, False, None)
    assert "was_correct" not in right.model_dump()
    assert "was_correct" not in record_to_json(right)


def test_query_metric_defaults() -> None:
    qm = validate_record("query_metric", metric_data(layers=[], layer_latencies_ms={}))
    assert isinstance(qm, QueryMetric)
    assert (qm.parallel, qm.concurrency, qm.accuracy, qm.error) == (False, 1, 1.0, None)
    assert qm.user_satisfaction is None
    failed = validate_record("query_metric", metric_data(success=False, error="timeout"))
    assert isinstance(failed, QueryMetric) and failed.error == "timeout"


def test_records_are_frozen() -> None:
    p = PredictionOutcome(**prediction_data())
    with pytest.raises(ValueError, match="frozen"):
        p.actual = "bright"


# --------------------------------------------------------------------------- refused

NAN, INF = math.nan, math.inf

REFUSED = [
    # pytest.param(kind, data, the field the error must name, id=...)
    pytest.param("prediction", prediction_data(confidence=NAN), "confidence", id="nan-confidence"),
    pytest.param("prediction", prediction_data(reward=INF), "reward", id="inf-reward"),
    pytest.param("prediction", prediction_data(ts=-INF), "ts", id="neg-inf-ts"),
    pytest.param(
        "prediction",
        prediction_data(audio_features={"energy": NAN}),
        "audio_features.energy",
        id="nan-in-dict",
    ),
    pytest.param(
        "fingerprint", fingerprint_data(embedding=[0.1, NAN]), "embedding.1", id="nan-in-list"
    ),
    pytest.param(
        "fingerprint", with_batch(bass_mid_ratio=INF), "batch.bass_mid_ratio", id="inf-in-batch"
    ),
    pytest.param(
        "fingerprint",
        with_stream_values(tempo_bpm=NAN),
        "streaming.values.tempo_bpm",
        id="nan-in-streaming",
    ),
    pytest.param(
        "query_metric",
        metric_data(layer_latencies_ms={"episodic": INF}),
        "layer_latencies_ms.episodic",
        id="inf-latency-in-dict",
    ),
    # out of range, one per group and per kind
    pytest.param("prediction", prediction_data(confidence=1.01), "confidence", id="confidence>1"),
    pytest.param(
        "prediction",
        prediction_data(audio_features={"energy": -0.1}),
        "audio_features.energy",
        id="feature<0",
    ),
    pytest.param("prediction", prediction_data(user_weight=1.5), "user_weight", id="user_weight>1"),
    pytest.param("prediction", prediction_data(chunk_idx=-1), "chunk_idx", id="chunk_idx<0"),
    pytest.param("prediction", prediction_data(ts=-1.0), "ts", id="ts<0"),
    pytest.param("fingerprint", with_batch(mid_pct=1.2), "batch.mid_pct", id="frequency"),
    pytest.param("fingerprint", with_batch(lufs=0.5), "batch.lufs", id="lufs>0"),
    pytest.param("fingerprint", with_batch(crest_db=-1.0), "batch.crest_db", id="crest<0"),
    pytest.param("fingerprint", with_batch(tempo_bpm=0.0), "batch.tempo_bpm", id="tempo=0"),
    pytest.param("fingerprint", with_batch(tempo_bpm=1200.0), "batch.tempo_bpm", id="tempo>1000"),
    pytest.param(
        "fingerprint", with_batch(rhythm_stability=-0.01), "batch.rhythm_stability", id="rhythm"
    ),
    pytest.param(
        "fingerprint", with_batch(spectral_rolloff=1.5), "batch.spectral_rolloff", id="spectral"
    ),
    pytest.param(
        "fingerprint", with_batch(chroma_energy=2.0), "batch.chroma_energy", id="harmonic"
    ),
    pytest.param(
        "fingerprint",
        with_batch(loudness_variation_std=-0.5),
        "batch.loudness_variation_std",
        id="variation",
    ),
    pytest.param("fingerprint", with_batch(stereo_width=1.1), "batch.stereo_width", id="stereo"),
    pytest.param(
        "fingerprint", with_batch(phase_correlation=-1.5), "batch.phase_correlation", id="phase<-1"
    ),
    pytest.param(
        "fingerprint",
        with_stream_values(tempo_bpm=-120.0),
        "streaming.values.tempo_bpm",
        id="streaming-bound",
    ),
    pytest.param(
        "fingerprint",
        with_stream_values(silence_ratio=3.0),
        "streaming.values.silence_ratio",
        id="streaming-fraction",
    ),
    pytest.param("query_metric", metric_data(latency_ms=-1.0), "latency_ms", id="latency<0"),
    pytest.param("query_metric", metric_data(memory_mb=-0.1), "memory_mb", id="memory<0"),
    pytest.param("query_metric", metric_data(result_count=-1), "result_count", id="result_count<0"),
    pytest.param("query_metric", metric_data(concurrency=0), "concurrency", id="concurrency=0"),
    pytest.param("query_metric", metric_data(accuracy=1.5), "accuracy", id="accuracy>1"),
    pytest.param(
        "query_metric",
        metric_data(user_satisfaction=-0.2),
        "user_satisfaction",
        id="satisfaction<0",
    ),
    pytest.param(
        "query_metric",
        metric_data(layer_latencies_ms={"episodic": -3.0}),
        "layer_latencies_ms.episodic",
        id="layer-latency<0",
    ),
    # unknown fields, anywhere
    pytest.param("prediction", prediction_data(surprise=1), "surprise", id="unknown-top"),
    pytest.param("fingerprint", with_batch(loudness=1.0), "batch.loudness", id="unknown-batch"),
    pytest.param(
        "fingerprint",
        fingerprint_data(streaming={**streaming(), "frames": 3}),
        "streaming.frames",
        id="unknown-streaming",
    ),
    pytest.param(
        "prediction", prediction_data(was_correct=True), "was_correct", id="was_correct-is-derived"
    ),
    # wrong types, no lax coercion
    pytest.param("prediction", prediction_data(confidence="0.5"), "confidence", id="str-for-float"),
    pytest.param("prediction", prediction_data(confidence=True), "confidence", id="bool-for-float"),
    pytest.param("prediction", prediction_data(predicted=3), "predicted", id="int-for-str"),
    pytest.param("query_metric", metric_data(result_count=2.0), "result_count", id="float-for-int"),
    pytest.param("query_metric", metric_data(cache_hit="no"), "cache_hit", id="str-for-bool"),
    pytest.param("fingerprint", fingerprint_data(batch=[1.0] * 25), "batch", id="batch-not-a-map"),
    # required / non-empty
    pytest.param(
        "fingerprint",
        fingerprint_data(batch={k: v for k, v in BATCH.items() if k != "lufs"}),
        "batch.lufs",
        id="missing-batch-value",
    ),
    pytest.param(
        "prediction",
        {k: v for k, v in prediction_data().items() if k != "confidence"},
        "confidence",
        id="missing-confidence",
    ),
    pytest.param("prediction", prediction_data(predicted=""), "predicted", id="empty-predicted"),
    pytest.param("fingerprint", fingerprint_data(track_id=""), "track_id", id="empty-track-id"),
    pytest.param("fingerprint", fingerprint_data(embedding=[]), "embedding", id="empty-embedding"),
    pytest.param(
        "fingerprint",
        fingerprint_data(batch=None, streaming=None),
        "batch",
        id="no-batch-no-streaming",
    ),
    # streaming key sets
    pytest.param(
        "fingerprint",
        with_stream_values(lufs=-8.0),
        "streaming.values.lufs",
        id="streaming-unknown-key",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(
            streaming={**streaming(), "values": {n: BATCH[n] for n in STREAMING_FIELDS[:-1]}}
        ),
        "streaming.values.chroma_energy",
        id="streaming-12-keys",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(
            streaming={
                **streaming(),
                "values": {n: BATCH[n] for n in STREAMING_FIELDS_NO_HARMONIC[1:]},
            }
        ),
        "streaming.values.dynamic_range_variation",
        id="streaming-9-keys",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(
            streaming={
                **streaming(STREAMING_FIELDS_NO_HARMONIC),
                "confidence": dict.fromkeys(STREAMING_FIELDS, 0.5),
            }
        ),
        "streaming.confidence.harmonic_ratio",
        id="confidence-key-extra",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(
            streaming={**streaming(), "confidence": dict.fromkeys(STREAMING_FIELDS[1:], 0.5)}
        ),
        "streaming.confidence.dynamic_range_variation",
        id="confidence-key-missing",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(
            streaming={**streaming(), "confidence": dict.fromkeys(STREAMING_FIELDS, 1.5)}
        ),
        "streaming.confidence.dynamic_range_variation",
        id="confidence>1",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(streaming={**streaming(), "chunk_count": -1}),
        "streaming.chunk_count",
        id="chunk_count<0",
    ),
    # metadata limits
    pytest.param(
        "fingerprint",
        fingerprint_data(metadata={f"k{i}": "v" for i in range(65)}),
        "metadata",
        id="metadata-too-many",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(metadata={"title": "x" * 4097}),
        "metadata.title",
        id="metadata-long-value",
    ),
    pytest.param(
        "fingerprint",
        fingerprint_data(metadata={"year": 1999}),
        "metadata.year",
        id="metadata-non-str",
    ),
    # cross-field rules
    pytest.param(
        "query_metric", metric_data(error="timeout", success=True), "error", id="error-but-success"
    ),
    pytest.param(
        "query_metric",
        metric_data(layer_latencies_ms={"graph": 3.0}),
        "layer_latencies_ms.graph",
        id="latency-for-unknown-layer",
    ),
]


@pytest.mark.parametrize(("kind", "data", "field"), REFUSED)
def test_refused_with_the_field_named(kind: str, data: dict[str, Any], field: str) -> None:
    err = refuse(kind, data)
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert isinstance(err, ValueError) and isinstance(err, XpStoreError)
    assert err.__cause__ is not None  # chained to pydantic's error


def test_message_names_the_bound_and_the_value() -> None:
    err = refuse("fingerprint", with_batch(tempo_bpm=-3.0))
    assert str(err).startswith("batch.tempo_bpm: Input should be greater than 0")
    assert "-3.0" in str(err)


def test_streaming_key_error_explains_the_rule() -> None:
    err = refuse("fingerprint", with_stream_values(lufs=-8.0))
    assert "13" in str(err) and "harmonic_ratio" in str(err)


def test_constructors_raise_invalid_record_error_too() -> None:
    with pytest.raises(InvalidRecordError) as info:
        PredictionOutcome(**prediction_data(confidence=2.0))
    assert info.value.field == "confidence"
    with pytest.raises(InvalidRecordError) as info:
        Fingerprint(**with_batch(tempo_bpm=0.0))
    assert info.value.field == "batch.tempo_bpm"


@pytest.mark.parametrize("bad_kind", ["nope", "", 3, None, "Prediction"])
def test_unknown_kind(bad_kind: Any) -> None:
    with pytest.raises(InvalidRecordError) as info:
        record_from_json({"kind": bad_kind, **prediction_data()})
    assert info.value.field == "kind"
    with pytest.raises(InvalidRecordError) as info:
        validate_record(bad_kind, prediction_data())
    assert info.value.field == "kind"


def test_record_from_json_needs_an_object_with_a_kind() -> None:
    with pytest.raises(InvalidRecordError) as info:
        record_from_json(prediction_data())
    assert info.value.field == "kind"
    with pytest.raises(InvalidRecordError, match="JSON object"):
        record_from_json([1, 2])  # type: ignore[arg-type]


def test_kind_of_refuses_non_records() -> None:
    with pytest.raises(InvalidRecordError) as info:
        kind_of(BatchFingerprint(**BATCH))  # type: ignore[arg-type]
    assert info.value.field == "kind"


# --------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("kind", KINDS)
def test_json_round_trip_through_text(kind: str) -> None:
    record = validate_record(kind, DATA[kind]())
    out = record_to_json(record)
    assert next(iter(out)) == "kind" and out["kind"] == kind
    text = json.dumps(out, allow_nan=False)  # JSON-safe: no NaN, no custom types
    assert record_from_json(json.loads(text)) == record


def test_record_to_json_omits_none() -> None:
    p = PredictionOutcome(predicted="warm", confidence=0.5, context="cold_start")
    assert record_to_json(p) == {
        "kind": "prediction",
        "predicted": "warm",
        "confidence": 0.5,
        "context": "cold_start",
    }


@settings(max_examples=60, deadline=None)
@given(records())
def test_json_round_trip_property(record: Record) -> None:
    out = record_to_json(record)
    assert None not in out.values()
    back = record_from_json(json.loads(json.dumps(out, allow_nan=False)))
    assert back == record
    assert type(back) is type(record)


# --------------------------------------------------------------------------- apply_changes


def test_apply_changes_resolves_a_prediction() -> None:
    p = PredictionOutcome(**prediction_data(actual=None, reward=None))
    q = apply_changes(p, {"actual": "punchy", "reward": 1.0})
    assert isinstance(q, PredictionOutcome)
    assert (q.actual, q.reward, q.was_correct) == ("punchy", 1.0, True)
    assert q.model_dump(exclude={"actual", "reward"}) == p.model_dump(exclude={"actual", "reward"})
    assert p.actual is None  # the original is untouched


@pytest.mark.parametrize(
    ("kind", "changes"),
    [
        ("fingerprint", {"metadata": {"title": "Renamed"}}),
        ("fingerprint", {"metadata": None}),
        ("query_metric", {"user_satisfaction": 0.9}),
        ("prediction", {"actual": None}),
    ],
)
def test_apply_changes_accepted(kind: str, changes: dict[str, Any]) -> None:
    record = validate_record(kind, DATA[kind]())
    new = apply_changes(record, changes)
    for key, value in changes.items():
        assert getattr(new, key) == value
    assert kind_of(new) == kind


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("prediction", "confidence"),
        ("prediction", "predicted"),
        ("prediction", "ts"),
        ("fingerprint", "batch"),
        ("fingerprint", "track_id"),
        ("query_metric", "latency_ms"),
        ("query_metric", "success"),
        ("prediction", "metadata"),  # mutable on fingerprints only
        ("prediction", "nonexistent"),
    ],
)
def test_apply_changes_refuses_fixed_fields(kind: str, key: str) -> None:
    record = validate_record(kind, DATA[kind]())
    with pytest.raises(InvalidRecordError) as info:
        apply_changes(record, {key: None})
    assert info.value.field == key
    for allowed in MUTABLE_FIELDS[kind]:
        assert allowed in str(info.value)


@pytest.mark.parametrize(
    ("kind", "changes", "field"),
    [
        ("prediction", {"reward": NAN}, "reward"),
        ("prediction", {"actual": 3}, "actual"),
        ("fingerprint", {"metadata": {"title": 1}}, "metadata.title"),
        ("query_metric", {"user_satisfaction": 1.5}, "user_satisfaction"),
    ],
)
def test_apply_changes_revalidates(kind: str, changes: dict[str, Any], field: str) -> None:
    record = validate_record(kind, DATA[kind]())
    with pytest.raises(InvalidRecordError) as info:
        apply_changes(record, changes)
    assert info.value.field == field


# --------------------------------------------------------------------------- ts and envelope


def test_with_ts_fills_only_a_missing_time() -> None:
    p = PredictionOutcome(**prediction_data(ts=None))
    stamped = with_ts(p, 1234.5)
    assert stamped.ts == 1234.5 and p.ts is None
    assert with_ts(stamped, 99.0) is stamped
    for bad in (-1.0, NAN, INF):
        with pytest.raises(InvalidRecordError):
            with_ts(p, bad)


def test_experience_envelope() -> None:
    record = PredictionOutcome(**prediction_data(ts=None, user_id=None))
    exp = Experience(7, "prediction", 1_700_000_000.0, record, updated_lsn=9)
    assert exp.success_rate is None
    assert Experience(7, "prediction", 1.0, record, 9, 4, 3).success_rate == 0.75
    with pytest.raises(AttributeError):
        exp.id = 8  # type: ignore[misc]
    assert not hasattr(exp, "__dict__")  # slotted

    line = exp.to_json()
    assert next(iter(line)) == "kind" and line["ts"] == 1_700_000_000.0
    assert "user_id" not in line
    again = record_from_json(json.loads(json.dumps(line)))
    assert again == with_ts(record, 1_700_000_000.0)

    env = exp.envelope_json()
    assert list(env) == [
        "id",
        "kind",
        "ts",
        "updated_lsn",
        "retrieval_count",
        "success_count",
        "record",
    ]
    assert env["id"] == 7 and env["record"]["predicted"] == "punchy"
    assert "kind" not in env["record"]
    json.dumps(env, allow_nan=False)
