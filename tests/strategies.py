"""Hypothesis strategies for valid records, envelopes and WAL operations.

Values reach the hard bounds (0 and 1 for fractions, -1/1 for phase, tiny positive tempos, huge
negative LUFS, -0.0), so round-trip tests cover the edges, not just typical audio.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from xpstore.model.codec import DeleteOp, DeleteTrackOp, Op, PutOp, UpdateOp
from xpstore.model.records import (
    BATCH_FIELDS,
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
    kind_of,
)

INT64_MAX = 2**63 - 1


def finite(
    min_value: float | None = None, max_value: float | None = None, **kw: Any
) -> st.SearchStrategy[float]:
    """Finite floats (NaN and ±inf are invalid everywhere in a record)."""
    return st.floats(
        min_value=min_value, max_value=max_value, allow_nan=False, allow_infinity=False, **kw
    )


fractions = finite(0.0, 1.0)
non_negative = finite(min_value=0.0)
timestamps = st.none() | finite(0.0, 4e9) | st.just(0.0)
labels = st.sampled_from(["adaptive", "gentle", "warm", "bright", "punchy", "live"]) | st.text(
    min_size=1, max_size=12
)
short_text = st.text(max_size=16)
ids = st.integers(min_value=0, max_value=INT64_MAX)

VALUE_STRATEGY: dict[str, st.SearchStrategy[float]] = dict.fromkeys(BATCH_FIELDS, fractions)
VALUE_STRATEGY.update(
    lufs=finite(max_value=0.0),
    crest_db=non_negative,
    bass_mid_ratio=finite(),
    tempo_bpm=finite(0.0, 1000.0, exclude_min=True),
    loudness_variation_std=non_negative,
    phase_correlation=finite(-1.0, 1.0),
)
"""Per batch name, floats spanning exactly its hard bounds."""


def batch_dicts() -> st.SearchStrategy[dict[str, float]]:
    return st.fixed_dictionaries({name: VALUE_STRATEGY[name] for name in BATCH_FIELDS})


def batch_fingerprints() -> st.SearchStrategy[BatchFingerprint]:
    return batch_dicts().map(lambda d: BatchFingerprint(**d))


@st.composite
def streaming_fingerprints(draw: st.DrawFn) -> StreamingFingerprint:
    names = draw(st.sampled_from([STREAMING_FIELDS, STREAMING_FIELDS_NO_HARMONIC]))
    values = {n: draw(VALUE_STRATEGY[n]) for n in names}
    confidence = {n: draw(fractions) for n in names}
    chunk_count = draw(st.integers(0, INT64_MAX))
    return StreamingFingerprint(values=values, confidence=confidence, chunk_count=chunk_count)


EMBEDDING_DIM = 4
"""A store fixes its embedding dimension, so every drawn embedding has this one by default."""


@st.composite
def fingerprints(draw: st.DrawFn, embedding_dim: int = EMBEDDING_DIM) -> Fingerprint:
    has = draw(st.sampled_from(["batch", "streaming", "both"]))
    return Fingerprint(
        track_id=draw(st.text(min_size=1, max_size=20)),
        batch=draw(batch_fingerprints()) if has != "streaming" else None,
        streaming=draw(streaming_fingerprints()) if has != "batch" else None,
        embedding=draw(
            st.none() | st.lists(finite(), min_size=embedding_dim, max_size=embedding_dim)
        ),
        metadata=draw(
            st.none() | st.dictionaries(st.text(min_size=1, max_size=12), short_text, max_size=4)
        ),
        algorithm_version=draw(st.none() | st.text(max_size=6)),
        ts=draw(timestamps),
    )


def predictions() -> st.SearchStrategy[PredictionOutcome]:
    return st.builds(
        PredictionOutcome,
        predicted=labels,
        actual=st.none() | labels,
        current=st.none() | labels,
        confidence=fractions,
        context=st.sampled_from(["cold_start", "warm_start", "audio_guided"])
        | st.text(min_size=1, max_size=12),
        track_id=st.none() | st.text(min_size=1, max_size=12),
        user_id=st.none() | st.text(min_size=1, max_size=12),
        chunk_idx=st.none() | st.integers(0, INT64_MAX),
        audio_features=st.none()
        | st.dictionaries(
            st.sampled_from(["energy", "brightness", "dynamics", "vocal_presence", "tempo_energy"])
            | st.text(max_size=8),
            fractions,
            max_size=5,
        ),
        reward=st.none() | finite(),
        user_weight=st.none() | fractions,
        ts=timestamps,
    )


@st.composite
def query_metrics(draw: st.DrawFn) -> QueryMetric:
    layers = draw(st.lists(st.text(min_size=1, max_size=8), max_size=5))
    keys = draw(st.lists(st.sampled_from(layers), unique=True)) if layers else []
    success = draw(st.booleans())
    return QueryMetric(
        query_id=draw(st.text(min_size=1, max_size=12)),
        query_text=draw(st.text(max_size=40)),
        query_type=draw(st.text(min_size=1, max_size=10)),
        latency_ms=draw(non_negative),
        memory_mb=draw(non_negative),
        cache_hit=draw(st.booleans()),
        result_count=draw(st.integers(0, INT64_MAX)),
        layers=layers,
        layer_latencies_ms={k: draw(non_negative) for k in keys},
        success=success,
        error=None if success else draw(st.none() | st.text(max_size=20)),
        parallel=draw(st.booleans()),
        concurrency=draw(st.integers(1, INT64_MAX)),
        accuracy=draw(fractions),
        user_satisfaction=draw(st.none() | fractions),
        ts=draw(timestamps),
    )


def records(embedding_dim: int = EMBEDDING_DIM) -> st.SearchStrategy[Record]:
    """Records of every kind, fit to put into one store (one embedding dimension)."""
    return st.one_of(predictions(), fingerprints(embedding_dim), query_metrics())


_UPDATABLE = sorted(set().union(*MUTABLE_FIELDS.values()))
change_values = (
    st.none()
    | st.text(max_size=10)
    | finite()
    | st.dictionaries(st.text(min_size=1, max_size=6), st.text(max_size=6), max_size=3)
)


def update_ops() -> st.SearchStrategy[UpdateOp]:
    return st.builds(
        UpdateOp,
        id=ids,
        changes=st.dictionaries(st.sampled_from(_UPDATABLE), change_values, max_size=3),
    )


def ops() -> st.SearchStrategy[Op]:
    """Every operation type; updates only name fields some kind may change."""
    return st.one_of(
        records().map(PutOp),
        update_ops(),
        st.builds(DeleteOp, id=ids),
        st.builds(DeleteTrackOp, track_id=st.text(min_size=1, max_size=20)),
    )


@st.composite
def experiences(draw: st.DrawFn) -> Experience:
    record = draw(records())
    return Experience(
        id=draw(ids),
        kind=kind_of(record),
        ts=draw(finite(0.0, 4e9)),
        record=record,
        updated_lsn=draw(ids),
        retrieval_count=draw(st.integers(0, INT64_MAX)),
        success_count=draw(st.integers(0, INT64_MAX)),
    )
