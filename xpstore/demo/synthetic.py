"""Realistic synthetic records for the demo, the tests and the benchmarks.

Everything is drawn from a ``numpy.random.Generator``, so a seed gives the same records on every
run and platform. Fingerprints come from per-style distributions in Auralis's real units (tempo in
BPM, LUFS, crest in dB, band shares that sum to 1), so that similarity search over them finds
tracks of the same style and the "scales differ by orders of magnitude" problem is really there.
Every value is clipped to the hard bounds of ``records``, so every generated record validates.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from xpstore.model.records import (
    BATCH_FIELDS,
    HARMONIC_FIELDS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    BatchFingerprint,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    StreamingFingerprint,
)

__all__ = [
    "AUDIO_FEATURES",
    "BAND_FIELDS",
    "CONTEXTS",
    "LAYERS",
    "PRESETS",
    "QUERY_TYPES",
    "STYLES",
    "Style",
    "make_fingerprint",
    "make_mixed",
    "make_prediction",
    "make_query_metric",
    "sample_batch_values",
]

FloatArray = npt.NDArray[np.float64]
T = TypeVar("T")

BAND_FIELDS: Final[tuple[str, ...]] = BATCH_FIELDS[:7]
_NON_BAND: Final[tuple[str, ...]] = BATCH_FIELDS[7:]
_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(BATCH_FIELDS)}

# Clip bounds: the records' hard bounds, narrowed to what real audio produces where a hard bound
# is open (a LUFS of -300 or a tempo of 999 BPM validates but would make silly demo data).
_LOW: Final = np.array(
    [0.0] * 7 + [-40.0, 0.0, -20.0, 30.0] + [0.0] * 10 + [0.0, 0.0, 0.0, -1.0],
    dtype=np.float64,
)
_HIGH: Final = np.array(
    [1.0] * 7 + [-1.0, 30.0, 25.0, 250.0] + [1.0] * 10 + [10.0, 1.0, 1.0, 1.0],
    dtype=np.float64,
)


@dataclass(frozen=True, slots=True)
class Style:
    """A music style as a distribution over the 25 batch values: mean and spread (std) per name.

    The band shares are drawn from a Dirichlet around their means (so they sum to 1); the other
    values from normals, clipped to plausible bounds.
    """

    name: str
    mean: Mapping[str, float]
    spread: Mapping[str, float]

    def mean_vector(self) -> FloatArray:
        """The 25 means in ``BATCH_FIELDS`` order."""
        return np.array([self.mean[n] for n in BATCH_FIELDS], dtype=np.float64)

    def spread_vector(self) -> FloatArray:
        """The 25 spreads in ``BATCH_FIELDS`` order."""
        return np.array([self.spread[n] for n in BATCH_FIELDS], dtype=np.float64)

    def band_concentration(self) -> float:
        """Dirichlet concentration whose per-band std matches the spreads on average."""
        m = np.array([self.mean[n] for n in BAND_FIELDS])
        s = np.array([self.spread[n] for n in BAND_FIELDS])
        return float(max(np.mean(m * (1 - m) / (s * s)) - 1.0, 10.0))


def _style(
    name: str,
    bands: Sequence[float],
    band_spread: float,
    values: Mapping[str, tuple[float, float]],
) -> Style:
    total = sum(bands)
    mean = {b: v / total for b, v in zip(BAND_FIELDS, bands, strict=True)}
    spread = dict.fromkeys(BAND_FIELDS, band_spread)
    for key, (mu, sd) in values.items():
        mean[key] = mu
        spread[key] = sd
    missing = set(BATCH_FIELDS) - mean.keys()
    if missing:  # pragma: no cover - a table typo, caught at import
        raise ValueError(f"style {name}: no distribution for {sorted(missing)}")
    return Style(name, MappingProxyType(mean), MappingProxyType(spread))


# Order of the value tuples below: (mean, std) for
#   lufs, crest_db, bass_mid_ratio, tempo_bpm, rhythm_stability, transient_density, silence_ratio,
#   spectral_centroid, spectral_rolloff, spectral_flatness, harmonic_ratio, pitch_stability,
#   chroma_energy, dynamic_range_variation, loudness_variation_std, peak_consistency,
#   stereo_width, phase_correlation
_TABLE: Final[dict[str, tuple[tuple[float, ...], float, tuple[tuple[float, float], ...]]]] = {
    "techno": (
        (0.14, 0.26, 0.16, 0.17, 0.12, 0.08, 0.07),
        0.025,
        ((-8.0, 1.5), (8.0, 1.5), (6.0, 2.5), (128.0, 4.0), (0.90, 0.05), (0.65, 0.10),
         (0.01, 0.01), (0.30, 0.06), (0.55, 0.08), (0.12, 0.04), (0.45, 0.10), (0.45, 0.10),
         (0.50, 0.10), (0.25, 0.08), (1.5, 0.6), (0.80, 0.08), (0.60, 0.12), (0.55, 0.15)),
    ),
    "ambient": (
        (0.08, 0.16, 0.18, 0.22, 0.16, 0.10, 0.10),
        0.035,
        ((-18.0, 3.0), (14.0, 2.5), (0.0, 3.0), (80.0, 18.0), (0.35, 0.15), (0.15, 0.08),
         (0.08, 0.06), (0.25, 0.07), (0.45, 0.10), (0.20, 0.07), (0.75, 0.10), (0.70, 0.10),
         (0.60, 0.10), (0.45, 0.12), (3.5, 1.2), (0.55, 0.12), (0.80, 0.10), (0.40, 0.20)),
    ),
    "metal": (
        (0.05, 0.15, 0.18, 0.24, 0.19, 0.11, 0.08),
        0.025,
        ((-7.0, 1.5), (9.0, 1.5), (-2.0, 2.5), (150.0, 25.0), (0.75, 0.10), (0.80, 0.08),
         (0.01, 0.01), (0.45, 0.07), (0.70, 0.08), (0.30, 0.07), (0.35, 0.10), (0.40, 0.10),
         (0.45, 0.10), (0.20, 0.07), (1.2, 0.5), (0.85, 0.06), (0.70, 0.10), (0.60, 0.15)),
    ),
    "jazz": (
        (0.04, 0.18, 0.22, 0.26, 0.16, 0.08, 0.06),
        0.03,
        ((-16.0, 2.5), (15.0, 2.5), (1.0, 3.0), (120.0, 30.0), (0.60, 0.12), (0.45, 0.12),
         (0.03, 0.02), (0.30, 0.06), (0.50, 0.08), (0.10, 0.04), (0.80, 0.08), (0.65, 0.10),
         (0.70, 0.10), (0.50, 0.12), (3.0, 1.0), (0.55, 0.12), (0.50, 0.15), (0.70, 0.15)),
    ),
    "classical": (
        (0.03, 0.13, 0.22, 0.30, 0.18, 0.08, 0.06),
        0.03,
        ((-20.0, 3.5), (18.0, 2.5), (-1.0, 3.0), (95.0, 25.0), (0.40, 0.15), (0.25, 0.10),
         (0.06, 0.05), (0.25, 0.06), (0.42, 0.08), (0.06, 0.03), (0.88, 0.06), (0.75, 0.10),
         (0.72, 0.10), (0.65, 0.12), (5.0, 1.5), (0.45, 0.12), (0.55, 0.15), (0.75, 0.12)),
    ),
    "hip_hop": (
        (0.16, 0.28, 0.16, 0.18, 0.11, 0.06, 0.05),
        0.025,
        ((-9.0, 1.5), (9.0, 1.5), (8.0, 3.0), (90.0, 10.0), (0.85, 0.07), (0.55, 0.10),
         (0.02, 0.02), (0.24, 0.05), (0.45, 0.08), (0.10, 0.04), (0.55, 0.10), (0.50, 0.12),
         (0.50, 0.10), (0.30, 0.08), (2.0, 0.7), (0.75, 0.10), (0.45, 0.12), (0.70, 0.12)),
    ),
    "folk": (
        (0.03, 0.14, 0.22, 0.28, 0.18, 0.09, 0.06),
        0.03,
        ((-14.0, 2.5), (13.0, 2.0), (0.0, 2.5), (105.0, 20.0), (0.60, 0.12), (0.40, 0.10),
         (0.03, 0.02), (0.32, 0.06), (0.55, 0.08), (0.08, 0.03), (0.80, 0.08), (0.72, 0.10),
         (0.68, 0.10), (0.45, 0.10), (2.8, 1.0), (0.60, 0.10), (0.45, 0.15), (0.75, 0.12)),
    ),
    "drum_and_bass": (
        (0.15, 0.24, 0.14, 0.17, 0.13, 0.09, 0.08),
        0.025,
        ((-7.5, 1.5), (8.5, 1.5), (5.0, 2.5), (174.0, 3.0), (0.85, 0.06), (0.80, 0.08),
         (0.01, 0.01), (0.35, 0.06), (0.62, 0.08), (0.18, 0.05), (0.40, 0.10), (0.40, 0.10),
         (0.45, 0.10), (0.25, 0.08), (1.4, 0.5), (0.82, 0.07), (0.65, 0.12), (0.50, 0.15)),
    ),
}  # fmt: skip

STYLES: Final[Mapping[str, Style]] = MappingProxyType(
    {
        name: _style(name, bands, band_sd, dict(zip(_NON_BAND, values, strict=True)))
        for name, (bands, band_sd, values) in _TABLE.items()
    }
)
"""Eight named styles; typical LUFS from -7 (metal) to -20 (classical), tempo 80 to 174 BPM."""

_STYLE_NAMES: Final[tuple[str, ...]] = tuple(STYLES)
_MEANS: Final[dict[str, FloatArray]] = {n: s.mean_vector() for n, s in STYLES.items()}
_SPREADS: Final[dict[str, FloatArray]] = {n: s.spread_vector() for n, s in STYLES.items()}
_ALPHAS: Final[dict[str, FloatArray]] = {
    n: s.mean_vector()[:7] * s.band_concentration() for n, s in STYLES.items()
}


def _pick_style(rng: np.random.Generator, style: str | None) -> str:
    if style is None:
        return _STYLE_NAMES[int(rng.integers(len(_STYLE_NAMES)))]
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(_STYLE_NAMES)}")
    return style


def sample_batch_values(rng: np.random.Generator, style: str, n: int = 1) -> FloatArray:
    """``n`` rows of the 25 batch values of ``style`` (``BATCH_FIELDS`` order), all valid."""
    style = _pick_style(rng, style)
    out = rng.normal(_MEANS[style], _SPREADS[style], size=(n, len(BATCH_FIELDS)))
    out[:, :7] = rng.dirichlet(_ALPHAS[style], size=n)
    np.clip(out, _LOW, _HIGH, out=out)
    return out


# --------------------------------------------------------------------------- fingerprints

_TITLE_WORDS: Final = (
    ("Midnight", "Silver", "Broken", "Electric", "Quiet", "Golden", "Hollow", "Neon", "Distant",
     "Velvet", "Iron", "Paper", "Crimson", "Frozen", "Wild", "Slow"),
    ("River", "Signal", "Garden", "Engine", "Horizon", "Machine", "Letter", "Storm", "Mirror",
     "Harbor", "Circuit", "Lantern", "Orbit", "Meadow", "Echo", "Tide"),
)  # fmt: skip
_ARTIST_WORDS: Final = (
    ("The", "DJ", "Ensemble", "Lil", "Orchestra of", "MC", "Quartet", "Sister"),
    ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Alvarez", "Novak", "Haddad", "Brennan",
     "Kowalski", "Santos", "Ivanova", "Osei"),
)  # fmt: skip
_ALGORITHM_VERSION: Final = "8"  # Auralis's fingerprint_algorithm_version


def _word(rng: np.random.Generator, words: Sequence[T]) -> T:
    return words[int(rng.integers(len(words)))]


def _style_centroid(style: str, dim: int) -> FloatArray:
    """A fixed unit vector per style and dimension, so embeddings cluster by style."""
    centroid = np.random.default_rng(zlib.crc32(f"{style}:{dim}".encode())).normal(size=dim)
    norm = float(np.linalg.norm(centroid))
    return centroid / norm if norm > 0 else centroid


def _make_streaming(rng: np.random.Generator, batch: Mapping[str, float]) -> StreamingFingerprint:
    """Streaming values as a streaming analyzer would see them: the batch ones plus noise."""
    names = STREAMING_FIELDS if rng.random() < 0.8 else STREAMING_FIELDS_NO_HARMONIC
    base = np.array([batch[n] for n in names])
    noise = rng.normal(0.0, 0.03, size=len(names))
    idx = {n: i for i, n in enumerate(names)}
    noise[idx["tempo_bpm"]] = base[idx["tempo_bpm"]] * rng.normal(0.0, 0.02)
    noise[idx["loudness_variation_std"]] = rng.normal(0.0, 0.3)
    low = np.array([_LOW[_INDEX[n]] for n in names])
    high = np.array([_HIGH[_INDEX[n]] for n in names])
    values = np.clip(base + noise, low, high)
    chunk_count = int(rng.integers(1, 31))
    fill = min(1.0, chunk_count / 5.0)  # Auralis: confidence is a per-metric fill ratio
    conf = np.clip(fill * rng.uniform(0.8, 1.0, size=len(names)), 0.0, 1.0)
    if names is STREAMING_FIELDS:  # harmonic metrics need more audio to settle
        for n in HARMONIC_FIELDS:
            conf[idx[n]] *= 0.9
    return StreamingFingerprint(
        values=dict(zip(names, values.tolist(), strict=True)),
        confidence=dict(zip(names, conf.tolist(), strict=True)),
        chunk_count=chunk_count,
    )


def make_fingerprint(
    rng: np.random.Generator,
    track_id: str,
    style: str | None = None,
    with_streaming: bool | None = None,
    embedding_dim: int | None = None,
    *,
    with_batch: bool = True,
    ts: float | None = None,
) -> Fingerprint:
    """A fingerprint of one synthetic track of ``style`` (random if None).

    ``with_streaming``: None adds a streaming fingerprint to about half the tracks. With
    ``with_batch=False`` the fingerprint is streaming-only (streaming is then always added).
    ``embedding_dim`` adds a unit embedding near the style's centroid.
    """
    style = _pick_style(rng, style)
    values = dict(zip(BATCH_FIELDS, sample_batch_values(rng, style)[0].tolist(), strict=True))
    if with_streaming is None:
        with_streaming = bool(rng.random() < 0.5)
    streaming = _make_streaming(rng, values) if (with_streaming or not with_batch) else None
    embedding: list[float] | None = None
    if embedding_dim is not None:
        vec = _style_centroid(style, embedding_dim) + rng.normal(
            0.0, 0.6 / np.sqrt(embedding_dim), size=embedding_dim
        )
        norm = float(np.linalg.norm(vec))
        embedding = (vec / norm if norm > 0 else vec).tolist()
    title = f"{_word(rng, _TITLE_WORDS[0])} {_word(rng, _TITLE_WORDS[1])}"
    artist = f"{_word(rng, _ARTIST_WORDS[0])} {_word(rng, _ARTIST_WORDS[1])}"
    metadata = {"title": title, "artist": artist, "style": style}
    if rng.random() < 0.3:
        metadata["collection"] = f"{style.replace('_', ' ').title()} Essentials"
    return Fingerprint(
        track_id=track_id,
        batch=BatchFingerprint(**values) if with_batch else None,
        streaming=streaming,
        embedding=embedding,
        metadata=metadata,
        algorithm_version=_ALGORITHM_VERSION,
        ts=ts,
    )


# --------------------------------------------------------------------------- predictions

PRESETS: Final[tuple[str, ...]] = ("adaptive", "gentle", "warm", "bright", "punchy", "live")
_PRESET_PRIOR: Final = np.array([0.45, 0.2, 0.15, 0.1, 0.05, 0.05])  # Auralis's, plus live
CONTEXTS: Final[tuple[str, ...]] = ("cold_start", "warm_start", "audio_guided")
AUDIO_FEATURES: Final[tuple[str, ...]] = (
    "energy",
    "brightness",
    "dynamics",
    "vocal_presence",
    "tempo_energy",
)
_USER_WEIGHTS: Final = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))  # 0.5 .. 0.9


def _preset(rng: np.random.Generator, exclude: str | None = None) -> str:
    p = _PRESET_PRIOR.copy()
    if exclude is not None:
        p[PRESETS.index(exclude)] = 0.0
    return PRESETS[int(rng.choice(len(PRESETS), p=p / p.sum()))]


def make_prediction(
    rng: np.random.Generator, track_id: str | None = None, *, ts: float | None = None
) -> PredictionOutcome:
    """An Auralis-like preset prediction; about 20% are still unresolved (``actual`` None).

    Outcomes are roughly calibrated (P(correct) = 0.3 + 0.6 * confidence), so the accuracy and
    calibration code has a signal to find.
    """
    context = CONTEXTS[int(rng.choice(3, p=[0.2, 0.5, 0.3]))]
    predicted = _preset(rng)
    confidence = float(rng.beta(4.0, 2.5))
    actual: str | None = None
    reward: float | None = None
    if rng.random() >= 0.2:
        correct = rng.random() < 0.3 + 0.6 * confidence
        actual = predicted if correct else _preset(rng, exclude=predicted)
        reward = 1.0 if correct else -0.5
    features: dict[str, float] | None = None
    if context == "audio_guided" or rng.random() < 0.3:
        features = dict(zip(AUDIO_FEATURES, rng.beta(2.0, 2.0, size=5).tolist(), strict=True))
    if track_id is None and rng.random() < 0.8:
        track_id = f"track-{int(rng.integers(10_000)):06d}"
    return PredictionOutcome(
        predicted=predicted,
        actual=actual,
        current=None if context == "cold_start" else _preset(rng),
        confidence=confidence,
        context=context,
        track_id=track_id,
        user_id=f"user-{int(rng.integers(1, 21)):02d}",
        chunk_idx=int(rng.integers(0, 200)) if rng.random() < 0.4 else None,
        audio_features=features,
        reward=reward,
        user_weight=None if context == "cold_start" else _word(rng, _USER_WEIGHTS),
        ts=ts,
    )


# --------------------------------------------------------------------------- query metrics

QUERY_TYPES: Final[tuple[str, ...]] = (
    "semantic",
    "episodic",
    "procedural",
    "graph",
    "temporal",
    "hybrid",
)
LAYERS: Final[tuple[str, ...]] = (
    "episodic",
    "semantic",
    "procedural",
    "prospective",
    "graph",
    "meta",
    "rag",
)
_LAYER_MEDIAN_MS: Final = {
    "episodic": 12.0,
    "semantic": 25.0,
    "procedural": 8.0,
    "prospective": 6.0,
    "graph": 40.0,
    "meta": 4.0,
    "rag": 80.0,
}
_QUERY_TEXTS: Final = (
    "what did I work on {when}",
    "how do I {task}",
    "find notes about {topic}",
    "who mentioned {topic} {when}",
    "summarize {topic}",
    "related concepts to {topic}",
)
_FILL: Final = {
    "when": ("yesterday", "last week", "this morning", "in March", "today"),
    "task": ("deploy the service", "rotate the keys", "run the benchmarks", "fix the index"),
    "topic": ("the WAL format", "priority replay", "FAISS HNSW", "group commit", "LMDB resize"),
}
_ERRORS: Final = (
    "timeout after 5000 ms",
    "layer unavailable: graph",
    "out of memory",
    "invalid query",
)


def make_query_metric(rng: np.random.Generator, *, ts: float | None = None) -> QueryMetric:
    """An Athena-like query metric with lognormal per-layer latencies."""
    query_type = _word(rng, QUERY_TYPES)
    n_layers = int(rng.integers(1, 5))
    layers = [LAYERS[int(i)] for i in rng.choice(len(LAYERS), size=n_layers, replace=False)]
    cache_hit = bool(rng.random() < 0.3)
    scale = 0.1 if cache_hit else 1.0
    latencies = {
        layer: float(scale * rng.lognormal(np.log(_LAYER_MEDIAN_MS[layer]), 0.6))
        for layer in layers
    }
    parallel = n_layers > 1 and bool(rng.random() < 0.5)
    overhead = float(rng.lognormal(np.log(2.0), 0.5))
    total = (max(latencies.values()) if parallel else sum(latencies.values())) + overhead
    success = bool(rng.random() < 0.96)
    template = _word(rng, _QUERY_TEXTS)
    text = template.format(**{k: _word(rng, v) for k, v in _FILL.items()})
    return QueryMetric(
        query_id=f"q-{int(rng.integers(0, 2**63)):016x}",
        query_text=text,
        query_type=query_type,
        latency_ms=total,
        memory_mb=float(rng.lognormal(np.log(40.0), 0.5)),
        cache_hit=cache_hit,
        result_count=int(rng.integers(0, 50)) if success else 0,
        layers=layers,
        layer_latencies_ms=latencies,
        success=success,
        error=None if success else _word(rng, _ERRORS),
        parallel=parallel,
        concurrency=n_layers if parallel else 1,
        accuracy=float(rng.beta(8.0, 2.0) if success else rng.beta(2.0, 5.0)),
        user_satisfaction=float(rng.beta(5.0, 2.0)) if rng.random() < 0.2 else None,
        ts=ts,
    )


# --------------------------------------------------------------------------- mixtures


def make_mixed(
    rng: np.random.Generator,
    n: int,
    *,
    proportions: tuple[float, float, float] = (0.5, 0.3, 0.2),
    n_tracks: int | None = None,
    embedding_dim: int | None = None,
    t0: float | None = None,
) -> list[Record]:
    """``n`` records of all three kinds (prediction, fingerprint, query_metric ``proportions``).

    Track ids come from a pool of ``n_tracks`` (default ``max(1, n // 4)``), so predictions refer
    to fingerprinted tracks and some tracks get a newer, superseding fingerprint. With ``t0``
    the records get increasing timestamps from ``t0`` (about one a second); otherwise ts is None.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    p = np.asarray(proportions, dtype=np.float64)
    if p.shape != (3,) or (p < 0).any() or p.sum() <= 0:
        raise ValueError("proportions must be three non-negative weights, not all 0")
    pool = max(1, n // 4) if n_tracks is None else n_tracks
    if pool < 1:
        raise ValueError("n_tracks must be >= 1")
    kinds = rng.choice(3, size=n, p=p / p.sum())
    times = None if t0 is None else t0 + np.cumsum(rng.exponential(1.0, size=n))
    out: list[Record] = []
    for i, kind in enumerate(kinds.tolist()):
        ts = None if times is None else float(times[i])
        track_id = f"track-{int(rng.integers(pool)):06d}"
        if kind == 0:
            out.append(make_prediction(rng, track_id, ts=ts))
        elif kind == 1:
            style = _STYLE_NAMES[zlib.crc32(track_id.encode()) % len(_STYLE_NAMES)]
            out.append(make_fingerprint(rng, track_id, style, embedding_dim=embedding_dim, ts=ts))
        else:
            out.append(make_query_metric(rng, ts=ts))
    return out
