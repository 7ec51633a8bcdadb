"""Hybrid embeddings: the inner-product identity, unit norms, name-keyed streaming values,
standardization that keeps tempo from dominating, versioned, checksummed stats, and the committed
default statistics."""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from xpstore.demo.synthetic import STYLES, make_fingerprint, sample_batch_values
from xpstore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    InvalidRecordError,
    StoreCorruptionError,
)
from xpstore.index import default_stats
from xpstore.index.embedding import (
    AUDIO_DIM,
    AURALIS_DIM_WEIGHTS,
    AudioStats,
    HybridEmbedder,
    StatsCorruptionError,
    audio_matrix,
)
from xpstore.model.records import (
    BATCH_FIELDS,
    STREAMING_FIELDS,
    BatchFingerprint,
    Fingerprint,
    StreamingFingerprint,
)

EMB_DIM = 8
STYLE_NAMES = tuple(STYLES)


def _library(n_per_style: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.vstack([sample_batch_values(rng, s, n_per_style) for s in STYLE_NAMES])


LIBRARY = _library()
STATS = {mode: AudioStats.fit(LIBRARY, mode) for mode in ("zscore", "percentile", "logratio")}


def _ref_audio(stats: AudioStats, values: dict[str, float], dim_w: dict[str, float]) -> np.ndarray:
    """Standardized, weighted audio block computed here, independently of the embedder."""
    mean = np.array(stats.mean)
    if stats.mode in ("zscore", "logratio"):
        scale = np.array(stats.std)
    else:
        scale = np.array(stats.p95) - np.array(stats.p05)
    scale = np.where(scale > 1e-12, scale, 1.0)
    total = sum(dim_w.values())
    row = np.array([values.get(n, np.nan) for n in BATCH_FIELDS], dtype=np.float64)
    if stats.mode == "logratio":  # by hand: clr of the seven band shares, log flatness
        off = np.array(stats.log_offset)
        bands = [j for j, n in enumerate(BATCH_FIELDS) if n.endswith("_pct")]
        logs = np.log(row[bands] + off[bands])
        row[bands] = logs - logs.mean()
        f = BATCH_FIELDS.index("spectral_flatness")
        row[f] = math.log(row[f] + off[f])
    z = np.zeros(len(BATCH_FIELDS))
    for name in values:
        j = BATCH_FIELDS.index(name)
        z[j] = (row[j] - mean[j]) / scale[j] * math.sqrt(dim_w[name] / total)
    return z


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _uniform() -> dict[str, float]:
    return dict.fromkeys(BATCH_FIELDS, 1.0)


# --------------------------------------------------------------------------- the identity

block_weights = st.floats(0.01, 10.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    seed_a=st.integers(0, 2**32 - 1),
    seed_b=st.integers(0, 2**32 - 1),
    style_a=st.sampled_from(STYLE_NAMES),
    style_b=st.sampled_from(STYLE_NAMES),
    mode=st.sampled_from(["zscore", "percentile", "logratio"]),
    w_audio=block_weights,
    w_emb=block_weights,
    dim_w=st.none() | st.lists(st.floats(0.0, 5.0), min_size=25, max_size=25),
)
def test_inner_product_is_weighted_sum_of_block_cosines(
    seed_a: int,
    seed_b: int,
    style_a: str,
    style_b: str,
    mode: str,
    w_audio: float,
    w_emb: float,
    dim_w: list[float] | None,
) -> None:
    stats = STATS[mode]
    if dim_w is not None:
        assume(sum(dim_w) > 1e-3)
        dim_weights: dict[str, float] | None = dict(zip(BATCH_FIELDS, dim_w, strict=True))
    else:
        dim_weights = None
    emb = HybridEmbedder(
        stats,
        audio_weight=w_audio,
        embedding_weight=w_emb,
        embedding_dim=EMB_DIM,
        dim_weights=dim_weights,
    )
    ref_w = dim_weights or (dict(AURALIS_DIM_WEIGHTS) if mode != "zscore" else _uniform())
    fa = make_fingerprint(np.random.default_rng(seed_a), "a", style_a, embedding_dim=EMB_DIM)
    fb = make_fingerprint(np.random.default_rng(seed_b), "b", style_b, embedding_dim=EMB_DIM)
    assert fa.batch is not None and fb.batch is not None
    za = _ref_audio(stats, fa.batch.as_dict(), ref_w)
    zb = _ref_audio(stats, fb.batch.as_dict(), ref_w)
    assume(np.linalg.norm(za) > 1e-6 and np.linalg.norm(zb) > 1e-6)
    assert fa.embedding is not None and fb.embedding is not None
    cos_audio = _cos(za, zb)
    cos_emb = _cos(np.array(fa.embedding), np.array(fb.embedding))
    wa, we = w_audio / (w_audio + w_emb), w_emb / (w_audio + w_emb)

    va, vb = emb.embed(fa), emb.embed(fb)
    assert va.dtype == np.float32 and va.shape == (AUDIO_DIM + EMB_DIM,)
    got = float(va.astype(np.float64) @ vb.astype(np.float64))
    assert got == pytest.approx(wa * cos_audio + we * cos_emb, abs=1e-5)
    assert float(np.linalg.norm(va.astype(np.float64))) == pytest.approx(1.0, abs=1e-5)

    # per-query override: a unit vector built with other weights obeys the same identity
    qa = emb.embed(fa, weights={"audio": 1.0, "embedding": 3.0})
    qb = emb.embed(fb, weights={"audio": 1.0, "embedding": 3.0})
    got_q = float(qa.astype(np.float64) @ qb.astype(np.float64))
    assert got_q == pytest.approx(0.25 * cos_audio + 0.75 * cos_emb, abs=1e-5)

    # query-side reweighting against vectors stored with the embedder's own weights
    q = emb.embed_query(fa, weights={"audio": 2.0, "embedding": 1.0})
    got_qs = float(q.astype(np.float64) @ vb.astype(np.float64))
    assert got_qs == pytest.approx(2 / 3 * cos_audio + 1 / 3 * cos_emb, abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=25, max_size=25),
        min_size=2,
        max_size=2,
    ),
    emb=st.lists(
        st.lists(st.floats(-100, 100, allow_nan=False), min_size=EMB_DIM, max_size=EMB_DIM),
        min_size=2,
        max_size=2,
    ),
)
def test_identity_and_norm_on_arbitrary_values(
    values: list[list[float]], emb: list[list[float]]
) -> None:
    """Arbitrary (even out-of-range) raw values: exact identity, norm 1 or all zeros, no NaN."""
    stats = STATS["zscore"]
    e = HybridEmbedder(stats, embedding_dim=EMB_DIM)
    dicts = [dict(zip(BATCH_FIELDS, v, strict=True)) for v in values]
    vecs = [e.embed_parts(d, x).astype(np.float64) for d, x in zip(dicts, emb, strict=True)]
    for v in vecs:
        assert np.isfinite(v).all()
        n = float(np.linalg.norm(v))
        assert n == pytest.approx(1.0, abs=1e-5) or n == 0.0
    za = [_ref_audio(stats, d, _uniform()) for d in dicts]
    ea = [np.array(x) for x in emb]
    assume(all(np.linalg.norm(z) > 1e-6 for z in za))
    assume(all(np.linalg.norm(x) > 1e-6 for x in ea))
    expected = 0.7 * _cos(za[0], za[1]) + 0.3 * _cos(ea[0], ea[1])
    assert float(vecs[0] @ vecs[1]) == pytest.approx(expected, abs=1e-5)


# --------------------------------------------------------------------------- norms, missing blocks


def test_every_vector_has_unit_norm_and_missing_blocks_renormalize() -> None:
    rng = np.random.default_rng(3)
    e = HybridEmbedder(STATS["percentile"], embedding_dim=EMB_DIM)
    fps = [
        make_fingerprint(rng, f"t{i}", with_streaming=bool(i % 2), embedding_dim=EMB_DIM)
        for i in range(50)
    ]
    fps += [make_fingerprint(rng, f"n{i}", with_streaming=True) for i in range(50)]
    fps += [make_fingerprint(rng, f"s{i}", with_batch=False) for i in range(50)]
    mat = e.embed_many(fps)
    assert mat.shape == (150, AUDIO_DIM + EMB_DIM) and mat.dtype == np.float32
    assert np.isfinite(mat).all()
    np.testing.assert_allclose(np.linalg.norm(mat.astype(np.float64), axis=1), 1.0, atol=1e-5)
    # no embedding: the audio block alone carries the whole (renormalized) weight
    assert not mat[50:, AUDIO_DIM:].any()
    np.testing.assert_allclose(
        np.linalg.norm(mat[50:, :AUDIO_DIM].astype(np.float64), axis=1), 1.0, atol=1e-5
    )
    # with both blocks: the audio block holds exactly sqrt(0.7) of the norm
    np.testing.assert_allclose(
        np.linalg.norm(mat[:50, :AUDIO_DIM].astype(np.float64), axis=1), math.sqrt(0.7), atol=1e-5
    )
    assert e.embed_many([]).shape == (0, AUDIO_DIM + EMB_DIM)


def test_zero_audio_block_is_treated_as_missing() -> None:
    """A track exactly at the library mean has no audio direction: the embedding takes it all."""
    stats = STATS["zscore"]
    e = HybridEmbedder(stats, embedding_dim=4)
    mean = dict(zip(BATCH_FIELDS, stats.mean, strict=True))
    v = e.embed_parts(mean, [0.0, 3.0, 0.0, 4.0]).astype(np.float64)
    assert not v[:AUDIO_DIM].any()
    np.testing.assert_allclose(v[AUDIO_DIM:], [0.0, 0.6, 0.0, 0.8], atol=1e-6)
    # no block with signal at all: all zeros, never NaN
    z = e.embed_parts(mean, [0.0, 0.0, 0.0, 0.0])
    assert not z.any() and np.isfinite(z).all()
    # a present block whose weight is zero contributes nothing; no NaN either
    only_emb = e.embed_parts(mean, None, weights={"audio": 1.0, "embedding": 0.0})
    assert not only_emb.any()


def test_embedder_without_embedding_block_ignores_embeddings() -> None:
    rng = np.random.default_rng(4)
    fp = make_fingerprint(rng, "x", embedding_dim=16)
    e = HybridEmbedder(STATS["zscore"])
    v = e.embed(fp)
    assert v.shape == (AUDIO_DIM,)
    assert float(np.linalg.norm(v.astype(np.float64))) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- streaming by name


def _streaming(values: dict[str, float]) -> Fingerprint:
    return Fingerprint(
        track_id="s",
        streaming=StreamingFingerprint(
            values=values, confidence=dict.fromkeys(values, 1.0), chunk_count=5
        ),
    )


def test_streaming_values_land_in_the_dimension_of_their_name() -> None:
    stats = STATS["zscore"]
    e = HybridEmbedder(stats)
    mean = dict(zip(BATCH_FIELDS, stats.mean, strict=True))
    values = {name: mean[name] for name in STREAMING_FIELDS}
    values["tempo_bpm"] = mean["tempo_bpm"] + 30.0  # only tempo differs from the mean
    v = e.embed(_streaming(values))
    nonzero = [BATCH_FIELDS[j] for j in np.flatnonzero(np.abs(v) > 1e-6)]
    assert nonzero == ["tempo_bpm"]
    assert BATCH_FIELDS.index("tempo_bpm") != STREAMING_FIELDS.index("tempo_bpm")
    assert v[BATCH_FIELDS.index("tempo_bpm")] == pytest.approx(1.0, abs=1e-6)


def test_streaming_only_matches_reference_and_ignores_key_order() -> None:
    stats = STATS["percentile"]
    e = HybridEmbedder(stats)
    rng = np.random.default_rng(5)
    fp = make_fingerprint(rng, "s", with_batch=False)
    assert fp.streaming is not None and fp.batch is None
    values = dict(fp.streaming.values)
    v = e.embed(fp).astype(np.float64)
    ref = _ref_audio(stats, values, dict(AURALIS_DIM_WEIGHTS))
    np.testing.assert_allclose(v, ref / np.linalg.norm(ref), atol=1e-6)
    reversed_values = dict(reversed(list(values.items())))
    assert list(reversed_values) != list(values)
    np.testing.assert_array_equal(e.embed_parts(reversed_values), e.embed(fp))
    np.testing.assert_array_equal(e.embed(_streaming(reversed_values)), e.embed(fp))
    # the dimensions streaming lacks stay at 0 (the mean)
    lacking = [j for j, n in enumerate(BATCH_FIELDS) if n not in values]
    assert len(lacking) >= 12 and not v[lacking].any()


def test_streaming_embedding_is_close_to_the_batch_one() -> None:
    """Same track, streaming vs batch: the shared dimensions point the same way."""
    e = HybridEmbedder(STATS["percentile"])
    rng = np.random.default_rng(6)
    sims = []
    for i in range(50):
        fp = make_fingerprint(rng, f"t{i}", with_streaming=True)
        assert fp.batch is not None and fp.streaming is not None
        batch = fp.batch.as_dict()
        shared = e.embed_parts({n: batch[n] for n in fp.streaming.values})
        stream = e.embed_parts(fp.streaming.values)
        sims.append(float(shared.astype(np.float64) @ stream.astype(np.float64)))
    assert min(sims) > 0.5 and float(np.mean(sims)) > 0.9


# --------------------------------------------------------------------------- standardization


@pytest.mark.parametrize("mode", ["zscore", "percentile", "logratio"])
def test_tempo_does_not_dominate_after_standardization(mode: str) -> None:
    """Raw cosine: a 100 BPM tempo gap looks 'less similar' than large changes in six 0-1
    features. Standardized: the ordering flips."""
    base = dict(zip(BATCH_FIELDS, LIBRARY[0].tolist(), strict=True))  # a real library track
    a = {**base, "tempo_bpm": 80.0}
    b = {**base, "tempo_bpm": 180.0}
    c = {**base, "tempo_bpm": 120.0}
    d = dict(c)
    for name in (
        "rhythm_stability",
        "transient_density",
        "harmonic_ratio",
        "pitch_stability",
        "stereo_width",
        "dynamic_range_variation",
    ):
        d[name] = 0.95 if base[name] < 0.5 else 0.05

    def raw(x: dict[str, float]) -> np.ndarray:
        return np.array([x[n] for n in BATCH_FIELDS])

    raw_ab, raw_cd = _cos(raw(a), raw(b)), _cos(raw(c), raw(d))
    assert raw_ab < raw_cd  # raw: the tempo pair looks further apart

    e = HybridEmbedder(STATS[mode])
    va, vb, vc, vd = (e.embed_parts(x).astype(np.float64) for x in (a, b, c, d))
    assert float(va @ vb) > float(vc @ vd)  # standardized: the six-feature pair is further


def test_constant_dimension_gives_no_nan() -> None:
    lib = LIBRARY.copy()
    lib[:, BATCH_FIELDS.index("silence_ratio")] = 0.0
    for mode in ("zscore", "percentile", "logratio"):
        stats = AudioStats.fit(lib, mode)
        assert stats.scale()[BATCH_FIELDS.index("silence_ratio")] == 1.0
        e = HybridEmbedder(stats)
        v = e.embed_many(
            [
                make_fingerprint(np.random.default_rng(i), f"t{i}", with_streaming=True)
                for i in range(10)
            ]
        )
        assert np.isfinite(v).all()
    one = AudioStats.fit(LIBRARY[:1])  # a single track: every dimension constant
    assert np.isfinite(HybridEmbedder(one).embed_parts({"tempo_bpm": 100.0})).all()


def test_fit_skips_nan_and_streaming_rows_fill_their_columns() -> None:
    rng = np.random.default_rng(8)
    fps = [make_fingerprint(rng, f"s{i}", with_batch=False) for i in range(30)]
    mat = audio_matrix(fps)
    assert mat.shape == (30, AUDIO_DIM)
    assert np.isnan(mat[:, BATCH_FIELDS.index("lufs")]).all()
    stats = AudioStats.from_fingerprints(fps, "zscore")
    j = BATCH_FIELDS.index("tempo_bpm")
    assert stats.mean[j] == pytest.approx(float(np.mean(mat[:, j])))
    assert stats.mean[BATCH_FIELDS.index("lufs")] == 0.0  # no data: mean 0, scale 1
    with pytest.raises(InvalidArgumentError) as err:
        AudioStats.fit(np.full((2, AUDIO_DIM), np.inf))
    assert err.value.field == "values"
    with pytest.raises(InvalidArgumentError) as err:
        AudioStats.fit(np.zeros((3, 24)))
    assert err.value.field == "values"
    with pytest.raises(InvalidArgumentError) as err:
        AudioStats.fit(LIBRARY, "minmax")  # type: ignore[arg-type]
    assert err.value.field == "mode"


def test_drift_measures_mean_shift_in_scale_units() -> None:
    old = STATS["zscore"]
    shifted = LIBRARY.copy()
    j = BATCH_FIELDS.index("lufs")
    shifted[:, j] += 2 * old.std[j]
    assert old.drift(AudioStats.fit(shifted, "zscore")) == pytest.approx(2.0, rel=1e-9)
    assert old.drift(old) == 0.0


# --------------------------------------------------------------------------- stats persistence


@pytest.mark.parametrize("mode", ["zscore", "percentile", "logratio"])
def test_stats_round_trip_through_json(mode: str) -> None:
    stats = STATS[mode]
    d = stats.to_dict()
    assert d["version"] == 2 and isinstance(d["checksum"], str) and len(d["checksum"]) == 64
    assert set(d["log_offset"]) == set(BATCH_FIELDS)
    assert set(d["mean"]) == set(BATCH_FIELDS)
    loaded = AudioStats.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert loaded == stats
    fp = make_fingerprint(np.random.default_rng(1), "x")
    np.testing.assert_array_equal(HybridEmbedder(loaded).embed(fp), HybridEmbedder(stats).embed(fp))


def test_version_1_stats_still_load() -> None:
    """Index files written before the logratio mode hold version-1 stats (no log offsets)."""
    from xpstore.index.embedding import stats_checksum

    d = STATS["percentile"].to_dict()
    body = {k: v for k, v in d.items() if k not in ("checksum", "log_offset")}
    body["version"] = 1
    old = AudioStats.from_dict({**body, "checksum": stats_checksum(body)})
    assert old.version == 1 and old.log_offset == (0.0,) * AUDIO_DIM
    assert old.mean == STATS["percentile"].mean
    assert "log_offset" not in old.to_dict()  # written back as it was read
    lr = STATS["logratio"].to_dict()
    body = {k: v for k, v in lr.items() if k not in ("checksum", "log_offset")}
    body["version"] = 1  # a logratio stats dict cannot lack its offsets
    with pytest.raises(StatsCorruptionError) as err:
        AudioStats.from_dict({**body, "checksum": stats_checksum(body)})
    assert err.value.field == "log_offset"


def test_logratio_transform_by_name() -> None:
    """The centred log-ratio of the band shares sums to 0 per row and ignores the scale of the
    shares; a row missing any band share leaves all seven missing; flatness is logged."""
    from xpstore.index.audio_transform import BAND_NAMES, fit_log_offsets, log_ratio

    off = fit_log_offsets(LIBRARY)
    bands = [BATCH_FIELDS.index(n) for n in BAND_NAMES]
    assert all(off[j] > 0 for j in bands) and off[BATCH_FIELDS.index("lufs")] == 0.0
    t = log_ratio(LIBRARY[:5], off)
    np.testing.assert_allclose(t[:, bands].sum(axis=1), 0.0, atol=1e-9)
    lufs = BATCH_FIELDS.index("lufs")
    np.testing.assert_array_equal(t[:, lufs], LIBRARY[:5, lufs])
    partial = LIBRARY[:1].copy()
    partial[0, BATCH_FIELDS.index("air_pct")] = np.nan
    assert np.isnan(log_ratio(partial, off)[0, bands]).all()
    e = HybridEmbedder(STATS["logratio"])
    # a query with only some band shares: the shares count as missing, tempo still counts
    only = e.embed_parts({"bass_pct": 0.5, "tempo_bpm": 170.0}).astype(np.float64)
    tempo = e.embed_parts({"tempo_bpm": 170.0}).astype(np.float64)
    np.testing.assert_allclose(only, tempo, atol=1e-6)


def test_stats_tampering_is_detected() -> None:
    d = STATS["zscore"].to_dict()
    tampered = json.loads(json.dumps(d))
    tampered["mean"]["tempo_bpm"] += 1.0
    with pytest.raises(StoreCorruptionError) as err:
        AudioStats.from_dict(tampered)
    assert isinstance(err.value, StatsCorruptionError) and err.value.field == "checksum"
    assert "checksum" in str(err.value)

    bad_sum = dict(d, checksum="0" * 64)
    with pytest.raises(StatsCorruptionError, match="checksum"):
        AudioStats.from_dict(bad_sum)
    with pytest.raises(StatsCorruptionError, match="checksum"):
        AudioStats.from_dict({k: v for k, v in d.items() if k != "checksum"})
    with pytest.raises(FormatVersionError):
        AudioStats.from_dict(dict(d, version=99))

    # structurally wrong but correctly checksummed: still rejected, naming the field
    def resign(body: dict[str, object]) -> dict[str, object]:
        from xpstore.index.embedding import stats_checksum

        body = {k: v for k, v in body.items() if k != "checksum"}
        return {**body, "checksum": stats_checksum(body)}

    missing = json.loads(json.dumps(d))
    del missing["std"]["air_pct"]
    with pytest.raises(StatsCorruptionError) as err:
        AudioStats.from_dict(resign(missing))
    assert err.value.field == "std"
    bad_mode = resign(dict(d, mode="minmax"))
    with pytest.raises(StatsCorruptionError) as err:
        AudioStats.from_dict(bad_mode)
    assert err.value.field == "mode"


# --------------------------------------------------------------------------- default statistics

_ROOT = Path(__file__).resolve().parent.parent
_TABLES = {
    "mean": default_stats.MEAN,
    "std": default_stats.STD,
    "p05": default_stats.P05,
    "p95": default_stats.P95,
}
_LOGRATIO_TABLES = {
    "mean": default_stats.LOGRATIO_MEAN,
    "std": default_stats.LOGRATIO_STD,
    "p05": default_stats.LOGRATIO_P05,
    "p95": default_stats.LOGRATIO_P95,
    "log_offset": default_stats.LOG_OFFSET,
}


def _generator() -> ModuleType:
    """``scripts/make_default_stats.py``, loaded as a module (scripts/ is not a package)."""
    path = _ROOT / "scripts" / "make_default_stats.py"
    spec = importlib.util.spec_from_file_location("make_default_stats", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_stats_are_keyed_by_exactly_the_batch_names() -> None:
    for name, table in [*_TABLES.items(), *_LOGRATIO_TABLES.items()]:
        assert set(table) == set(BATCH_FIELDS), name
        assert len(table) == AUDIO_DIM, name
        assert all(type(v) is float and math.isfinite(v) for v in table.values()), name
    assert type(default_stats.COUNT) is int and default_stats.COUNT > 0


def test_default_stats_table_is_what_the_script_computes() -> None:
    """The committed numbers are exactly ``AudioStats.fit`` on the demo's reference library (400
    tracks per style, seed 0). If numpy's random stream or the generator changed, this fails:
    regenerate with ``python scripts/make_default_stats.py`` and review the diff."""
    gen = _generator()
    rows = gen.reference_rows()
    assert rows.shape == (400 * len(STYLES), AUDIO_DIM)
    fitted, logratio = gen.compute()
    assert fitted.count == default_stats.COUNT == logratio.count
    for name, table in _TABLES.items():
        expected = dict(zip(BATCH_FIELDS, getattr(fitted, name), strict=True))
        assert table == expected, name  # exact: the module holds full float reprs
    for name, table in _LOGRATIO_TABLES.items():
        expected = dict(zip(BATCH_FIELDS, getattr(logratio, name), strict=True))
        assert table == expected, name
    for mode in ("zscore", "percentile", "logratio"):
        assert AudioStats.prior(mode) == AudioStats.fit(rows, mode)
    committed = Path(default_stats.__file__).read_text()
    assert gen.render((fitted, logratio)) == committed, "run python scripts/make_default_stats.py"


def test_prior_reads_the_table_by_name() -> None:
    for mode in ("zscore", "percentile", "logratio"):
        prior = AudioStats.prior(mode)
        assert prior.mode == mode and prior.count == default_stats.COUNT
        tables = _LOGRATIO_TABLES if mode == "logratio" else _TABLES
        for name, table in tables.items():
            assert getattr(prior, name) == tuple(table[f] for f in BATCH_FIELDS), name


def test_the_index_never_imports_the_demo_package() -> None:
    """At run time: embedding with the prior statistics loads no ``xpstore.demo`` module."""
    code = (
        "import sys\n"
        "import xpstore.index.manager\n"
        "from xpstore.index.embedding import AudioStats, HybridEmbedder\n"
        "HybridEmbedder(AudioStats.prior()).embed_parts({'tempo_bpm': 120.0})\n"
        "print(sorted(m for m in sys.modules if m.startswith('xpstore.demo')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_the_index_imports_only_downward() -> None:
    """Statically, function-local imports included: xpstore/index imports nothing from the
    layers above it (store, ops, demo, cli)."""
    above = ("xpstore.store.", "xpstore.ops.", "xpstore.demo.", "xpstore.cli.")
    bad = []
    for path in sorted((_ROOT / "xpstore" / "index").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                package = ["xpstore", "index"][: 2 - node.level + 1] if node.level else []
                base = ".".join([*package, *([node.module] if node.module else [])])
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            bad += [f"{path.name}: {n}" for n in names if f"{n}.".startswith(above)]
    assert bad == []


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"audio_weight": -0.1}, "weights.audio"),
        ({"embedding_weight": float("nan")}, "weights.embedding"),
        ({"audio_weight": float("inf")}, "weights.audio"),
        ({"audio_weight": 0.0, "embedding_weight": 0.0}, "weights"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"dim_weights": {"tempo_bpm": 1.0}}, "dim_weights.sub_bass_pct"),
        ({"dim_weights": {**dict.fromkeys(BATCH_FIELDS, 1.0), "bpm": 1.0}}, "dim_weights.bpm"),
        ({"dim_weights": dict.fromkeys(BATCH_FIELDS, 0.0)}, "dim_weights"),
        ({"dim_weights": {**dict.fromkeys(BATCH_FIELDS, 1.0), "lufs": -1.0}}, "dim_weights.lufs"),
    ],
)
def test_bad_embedder_config_names_the_field(kwargs: dict[str, object], field: str) -> None:
    kwargs = {"embedding_dim": EMB_DIM, **kwargs}
    with pytest.raises(InvalidArgumentError) as err:
        HybridEmbedder(STATS["zscore"], **kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
    assert isinstance(err.value, ValueError)


def test_bad_query_weights_and_embedding_dimension_name_the_field() -> None:
    e = HybridEmbedder(STATS["zscore"], embedding_dim=EMB_DIM)
    fp = make_fingerprint(np.random.default_rng(2), "x", embedding_dim=EMB_DIM)
    cases: list[tuple[dict[str, float], str]] = [
        ({"audio": -1.0}, "weights.audio"),
        ({"embedding": float("nan")}, "weights.embedding"),
        ({"audio": 0.0, "embedding": 0.0}, "weights"),
        ({"lyrics": 1.0}, "weights.lyrics"),
    ]
    err: pytest.ExceptionInfo[InvalidArgumentError | InvalidRecordError]  # both kinds below
    for weights, field in cases:  # weights are a plain argument, not a record field
        with pytest.raises(InvalidArgumentError) as err:
            e.embed(fp, weights=weights)
        assert err.value.field == field
    # a missing key keeps the embedder's weight
    np.testing.assert_array_equal(e.embed(fp, weights={"audio": 0.7}), e.embed(fp))

    # a fingerprint's own values are record fields
    wrong = make_fingerprint(np.random.default_rng(2), "x", embedding_dim=EMB_DIM + 1)
    with pytest.raises(InvalidRecordError) as err:
        e.embed(wrong)
    assert err.value.field == "embedding"
    with pytest.raises(InvalidRecordError) as err:
        e.embed_parts(None, [float("nan")] * EMB_DIM)
    assert err.value.field == "embedding"
    with pytest.raises(InvalidRecordError) as err:
        e.embed_parts({"tempo": 120.0})
    assert err.value.field == "tempo"
    with pytest.raises(InvalidRecordError) as err:
        e.embed_parts({"lufs": float("inf")})
    assert err.value.field == "lufs"
    audio_only = HybridEmbedder(STATS["zscore"], embedding_weight=0.0, embedding_dim=EMB_DIM)
    with pytest.raises(InvalidArgumentError) as err:
        audio_only.embed_query(fp, weights={"embedding": 1.0})
    assert err.value.field == "weights.embedding"
    with pytest.raises(InvalidArgumentError) as err:
        e.embed_rows(np.zeros((2, AUDIO_DIM - 1)))
    assert err.value.field == "audio"


def test_bad_stats_values_name_the_field() -> None:
    good = STATS["zscore"]
    with pytest.raises(InvalidArgumentError) as err:
        AudioStats("minmax", good.mean, good.std, good.p05, good.p95, 1)  # type: ignore[arg-type]
    assert err.value.field == "mode"
    with pytest.raises(InvalidArgumentError) as err:
        AudioStats("zscore", good.mean[:-1], good.std, good.p05, good.p95, 1)
    assert err.value.field == "mean"
    with pytest.raises(InvalidArgumentError) as err:
        AudioStats("zscore", good.mean, (math.nan,) * AUDIO_DIM, good.p05, good.p95, 1)
    assert err.value.field == "std"


def test_batch_preferred_over_streaming() -> None:
    rng = np.random.default_rng(9)
    fp = make_fingerprint(rng, "x", with_streaming=True)
    assert fp.batch is not None
    e = HybridEmbedder(STATS["zscore"])
    batch_only = Fingerprint(track_id="x", batch=BatchFingerprint(**fp.batch.as_dict()))
    np.testing.assert_array_equal(e.embed(fp), e.embed(batch_only))


def test_embed_rows_in_blocks_equals_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many rows are embedded block by block (their temporaries stay in the CPU's cache); every
    step is per row, so the result is bitwise the one-piece result, embeddings and missing
    values included."""
    import xpstore.index.embedding as embedding_mod

    rng = np.random.default_rng(5)
    n = 103
    audio = rng.uniform(0.001, 1.0, size=(n, AUDIO_DIM))
    audio[rng.random(n) < 0.2, :7] = np.nan
    audio[3] = np.nan  # a row with no audio at all
    emb = rng.standard_normal((n, EMB_DIM)).astype(np.float32)
    has = rng.random(n) < 0.6
    for stats in (STATS["zscore"], STATS["logratio"]):
        e = HybridEmbedder(stats, embedding_dim=EMB_DIM)
        whole = e.embed_rows(audio, emb, has)
        monkeypatch.setattr(embedding_mod, "_EMBED_BLOCK", 10)
        blocks = e.embed_rows(audio, emb, has)
        monkeypatch.undo()
        np.testing.assert_array_equal(blocks, whole)
        assert blocks.dtype == np.float32 and blocks.shape == (n, e.dim)
