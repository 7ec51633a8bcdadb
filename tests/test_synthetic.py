"""Synthetic data: deterministic, always valid, and statistically like the styles it claims."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from xpstore.demo.synthetic import (
    AUDIO_FEATURES,
    BAND_FIELDS,
    CONTEXTS,
    LAYERS,
    PRESETS,
    STYLES,
    make_fingerprint,
    make_mixed,
    make_prediction,
    make_query_metric,
    sample_batch_values,
)
from xpstore.model.codec import PutOp, decode_op, encode_op
from xpstore.model.records import (
    BATCH_FIELDS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    kind_of,
    record_from_json,
    record_to_json,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_same_seed_same_records() -> None:
    a = make_mixed(rng(42), 60, embedding_dim=8, t0=1e9)
    b = make_mixed(rng(42), 60, embedding_dim=8, t0=1e9)
    c = make_mixed(rng(43), 60, embedding_dim=8, t0=1e9)
    assert [encode_op(PutOp(r)) for r in a] == [encode_op(PutOp(r)) for r in b]
    assert a != c


def test_every_generated_record_revalidates_and_round_trips() -> None:
    recs = make_mixed(rng(1), 600, embedding_dim=4)
    for r in recs:
        assert record_from_json(record_to_json(r)) == r  # full validation again
        back = decode_op(encode_op(PutOp(r)), validate=True)
        assert isinstance(back, PutOp) and back.record == r


def test_styles_cover_the_named_ones_with_all_25_values() -> None:
    expected = {"techno", "ambient", "metal", "jazz", "classical", "hip_hop", "folk"}
    assert expected <= set(STYLES) and len(STYLES) >= 8
    for style in STYLES.values():
        assert set(style.mean) == set(BATCH_FIELDS) == set(style.spread)
        assert sum(style.mean[b] for b in BAND_FIELDS) == pytest.approx(1.0)
        assert all(v >= 0 for v in style.spread.values())


@pytest.mark.parametrize("style", sorted(STYLES))
def test_sampled_values_follow_the_style(style: str) -> None:
    values = sample_batch_values(rng(2), style, 2000)
    assert values.shape == (2000, 25)
    assert np.isfinite(values).all()
    bands = values[:, :7]
    np.testing.assert_allclose(bands.sum(axis=1), 1.0, atol=1e-9)
    means = values.mean(axis=0)
    target = STYLES[style].mean_vector()
    spread = STYLES[style].spread_vector()
    # within a third of a spread of the style's mean (clipping shifts near-bound values a little)
    for i, name in enumerate(BATCH_FIELDS):
        assert abs(means[i] - target[i]) <= spread[i] / 3 + 0.01, name


def test_styles_differ_where_music_does() -> None:
    def mean_of(style: str, name: str) -> float:
        return float(sample_batch_values(rng(3), style, 500)[:, BATCH_FIELDS.index(name)].mean())

    assert mean_of("techno", "lufs") == pytest.approx(-8.0, abs=0.5)
    assert mean_of("classical", "lufs") == pytest.approx(-20.0, abs=1.0)
    assert mean_of("drum_and_bass", "tempo_bpm") == pytest.approx(174.0, abs=1.0)
    assert mean_of("classical", "crest_db") > mean_of("metal", "crest_db") + 5
    assert mean_of("hip_hop", "bass_pct") > mean_of("classical", "bass_pct")
    assert mean_of("classical", "harmonic_ratio") > mean_of("techno", "harmonic_ratio")


def test_fingerprint_contents() -> None:
    fp = make_fingerprint(rng(4), "track-9", "jazz", with_streaming=True, embedding_dim=32)
    assert fp.track_id == "track-9" and fp.batch is not None and fp.streaming is not None
    assert fp.metadata is not None
    assert fp.metadata["style"] == "jazz"
    assert fp.metadata["title"] and fp.metadata["artist"]
    assert fp.embedding is not None and len(fp.embedding) == 32
    assert np.linalg.norm(fp.embedding) == pytest.approx(1.0)
    # streaming values track the batch ones by name
    s, b = fp.streaming.values, fp.batch.as_dict()
    assert set(s) in (set(STREAMING_FIELDS), set(STREAMING_FIELDS_NO_HARMONIC))
    assert s["tempo_bpm"] == pytest.approx(b["tempo_bpm"], rel=0.1)
    for name in s:
        if name not in ("tempo_bpm", "loudness_variation_std"):
            assert abs(s[name] - b[name]) < 0.2, name
    assert all(0.0 <= c <= 1.0 for c in fp.streaming.confidence.values())
    assert fp.streaming.chunk_count >= 1


def test_fingerprint_options() -> None:
    r = rng(5)
    assert make_fingerprint(r, "t", with_streaming=False).streaming is None
    only = make_fingerprint(r, "t", with_batch=False)
    assert only.batch is None and only.streaming is not None
    assert make_fingerprint(r, "t").embedding is None
    assert make_fingerprint(r, "t", ts=12.5).ts == 12.5
    with pytest.raises(ValueError, match="unknown style"):
        make_fingerprint(r, "t", "polka")
    kinds = Counter(make_fingerprint(r, "t").streaming is not None for _ in range(200))
    assert 60 < kinds[True] < 140  # about half by default
    sizes = Counter(
        len(fp.streaming.values)
        for fp in (make_fingerprint(r, "t", with_streaming=True) for _ in range(200))
        if fp.streaming is not None
    )
    ten = sizes[10]
    assert sizes[13] + ten == 200
    assert 10 < ten < 80  # some streaming analyzers run without the harmonic three


def test_embeddings_cluster_by_style() -> None:
    r = rng(6)
    a = [make_fingerprint(r, "a", "metal", embedding_dim=64).embedding for _ in range(20)]
    b = [make_fingerprint(r, "b", "ambient", embedding_dim=64).embedding for _ in range(20)]
    ea, eb = np.array(a), np.array(b)
    same = float((ea[:10] @ ea[10:].T).mean())
    cross = float((ea @ eb.T).mean())
    assert same > cross + 0.3


def test_predictions() -> None:
    r = rng(7)
    preds = [make_prediction(r) for _ in range(2000)]
    assert {p.predicted for p in preds} <= set(PRESETS)
    assert {p.context for p in preds} == set(CONTEXTS)
    assert Counter(p.predicted for p in preds).most_common(1)[0][0] == "adaptive"
    unresolved = sum(p.actual is None for p in preds)
    assert 250 < unresolved < 550  # about 20%
    for p in preds:
        assert (p.reward is None) == (p.actual is None)
        if p.context == "audio_guided":
            assert p.audio_features is not None
        if p.audio_features is not None:
            assert set(p.audio_features) == set(AUDIO_FEATURES)
        if p.user_weight is not None:
            assert 0.5 <= p.user_weight <= 0.9
    # roughly calibrated: confident predictions are right more often
    resolved = [p for p in preds if p.actual is not None]
    hi = [p.actual == p.predicted for p in resolved if p.confidence > 0.75]
    lo = [p.actual == p.predicted for p in resolved if p.confidence < 0.45]
    assert np.mean(hi) > np.mean(lo) + 0.1
    assert make_prediction(r, "track-1").track_id == "track-1"


def test_query_metrics() -> None:
    r = rng(8)
    qms = [make_query_metric(r) for _ in range(1000)]
    for q in qms:
        assert set(q.layers) <= set(LAYERS) and len(q.layers) == len(set(q.layers))
        assert set(q.layer_latencies_ms) == set(q.layers)
        assert q.latency_ms >= max(q.layer_latencies_ms.values())
        if q.error is not None:
            assert not q.success
        if q.parallel:
            assert q.concurrency == len(q.layers) > 1
    failures = sum(not q.success for q in qms)
    assert 10 < failures < 80
    lat = np.array([q.latency_ms for q in qms if not q.cache_hit])
    hit = np.array([q.latency_ms for q in qms if q.cache_hit])
    assert np.median(hit) < np.median(lat) / 2  # cache hits are cheap
    assert np.percentile(lat, 99) > 3 * np.median(lat)  # a lognormal tail


def test_make_mixed() -> None:
    recs = make_mixed(rng(9), 1000, n_tracks=50, t0=1_700_000_000.0)
    kinds = Counter(kind_of(r) for r in recs)
    assert 420 < kinds["prediction"] < 580
    assert 230 < kinds["fingerprint"] < 370
    assert 130 < kinds["query_metric"] < 270
    ts = [r.ts for r in recs if r.ts is not None]
    assert len(ts) == len(recs)
    assert ts == sorted(ts) and ts[0] > 1_700_000_000.0
    fps = [r for r in recs if isinstance(r, Fingerprint)]
    tracks = Counter(fp.track_id for fp in fps)
    assert len(tracks) <= 50 and max(tracks.values()) > 1  # some fingerprints supersede others
    # a track keeps its style across its fingerprints
    styles: dict[str, set[str]] = {}
    for fp in fps:
        assert fp.metadata is not None
        styles.setdefault(fp.track_id, set()).add(fp.metadata["style"])
    assert all(len(s) == 1 for s in styles.values())
    preds = [r for r in recs if isinstance(r, PredictionOutcome)]
    assert all(p.track_id is not None and p.track_id.startswith("track-") for p in preds)
    assert all(isinstance(r, PredictionOutcome | Fingerprint | QueryMetric) for r in recs)
    assert make_mixed(rng(9), 0) == []
    assert all(r.ts is None for r in make_mixed(rng(9), 20))
    with pytest.raises(ValueError):
        make_mixed(rng(9), 5, proportions=(0.0, 0.0, 0.0))
