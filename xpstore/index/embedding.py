"""Hybrid embeddings: one unit vector per fingerprint, searchable by inner product (DESIGN §5).

Why this shape:

* The 25 audio values have units that differ by orders of magnitude (tempo ~120 BPM, flatness
  ~0.01), so a raw cosine is a tempo-and-loudness detector. Each value is standardized per
  dimension with statistics fitted on the library (``AudioStats``), kept and versioned with the
  index, so a restart or a read-only process embeds exactly as the builder did.
* Each block (the 25 audio values; the optional ``embedding`` from another model) is
  L2-normalized and scaled by the square root of its weight, then the blocks are concatenated.
  For two vectors ``u, v`` with the **same blocks present**::

      dot(u, v) = w_audio * cos(audio_u, audio_v) + w_embedding * cos(emb_u, emb_v)

  exactly, and every vector has norm 1, so an inner-product (or cosine) index ranks by the
  weighted sum of per-block cosines.
* A missing block (no ``embedding``; an audio block with no signal) is all zeros and the weights
  of the present blocks are renormalized to sum 1, so the norm stays 1. Between vectors with
  *different* blocks present the identity above is then only approximate: the renormalization
  changes the scale of the shared block on one side only.
* A streaming-only fingerprint fills the audio block from its 13 (or 10) values **by name**; the
  dimensions it lacks are set to the library mean, i.e. standardized to 0, so they add nothing to
  the cosine.

Standardization modes:

* ``"logratio"`` (the default; ``DEFAULT_MODE`` says why): the centred log-ratio of the seven band
  shares and the log of spectral flatness (``index.audio_transform``), then ``(t - mean) / std``
  of the transformed values, with Auralis's per-dimension weights.
* ``"zscore"``: ``(x - mean) / std``; uniform per-dimension weights unless given.
* ``"percentile"``: Auralis's scaling,
  ``(x - mean) / (p95 - p05)`` with Auralis's per-dimension weights (renormalized to sum 1).
  Auralis min-max scales to [0, 1] by the 5th/95th percentiles and compares by weighted
  Euclidean distance, which is shift-invariant; a cosine is not, so the values are centred on
  the mean (which changes no Euclidean distance) rather than on p05.

Per-dimension weights multiply the standardized value by ``sqrt(weight)``, so the squared
Euclidean distance between two (unnormalized) audio blocks is Auralis's ``Σ wᵢ(xᵢ-yᵢ)²``.

A constant dimension (std or percentile range 0) gets scale 1: it then standardizes to 0 for
every track in the library, never to NaN or infinity.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import numpy as np
import numpy.typing as npt

from xpstore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    InvalidRecordError,
    StatsCorruptionError,
)
from xpstore.index import default_stats
from xpstore.index.audio_transform import fit_log_offsets, log_ratio, log_ratio_columns
from xpstore.model.records import BATCH_FIELDS, Fingerprint

__all__ = [
    "AUDIO_DIM",
    "AURALIS_DIM_WEIGHTS",
    "DEFAULT_AUDIO_WEIGHT",
    "DEFAULT_EMBEDDING_WEIGHT",
    "DEFAULT_MODE",
    "FIT_ROWS",
    "MODES",
    "STATS_VERSION",
    "AudioStats",
    "HybridEmbedder",
    "ScalingMode",
    "StatsCorruptionError",
    "audio_matrix",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
F32Array = npt.NDArray[np.float32]
ScalingMode = Literal["logratio", "zscore", "percentile"]

MODES: Final[tuple[ScalingMode, ...]] = ("logratio", "zscore", "percentile")
DEFAULT_MODE: Final[ScalingMode] = "logratio"
"""Chosen by measurement on real music (``benchmarks/music.py``, docs/index.md): same-track top-1
over 450 segments of 85 real tracks was 0.647 for logratio + Auralis weights against 0.569 for
z-scores and 0.562 for percentile + Auralis weights; on generated tracks (style precision@10,
the second opinion) logratio stays level with percentile (0.872 / 0.868 against 0.876 / 0.870)."""
STATS_VERSION: Final = 2
_EMBED_BLOCK: Final = 8192
"""Rows :meth:`HybridEmbedder.embed_rows` embeds at a time (temporaries of ~1.6 MB)."""
FIT_ROWS: Final = 1 << 17
"""The most rows a fit with ids reads: a larger library is fitted on every k-th row in id
order (k = ceil(n / FIT_ROWS)). Its quantiles move by well under 1 % of a column's spread
(a p05 from 131,072 draws has a standard error of ~0.0006 in probability), and the fit of a
million rows costs what this many does (~0.1 s instead of ~1.3 s: the first answer after
attaching a 1M store without an index file fits them)."""
"""2 added ``log_offset`` (the ``logratio`` mode's offsets); version 1 dicts are still read."""
AUDIO_DIM: Final = len(BATCH_FIELDS)
DEFAULT_AUDIO_WEIGHT: Final = 0.7
DEFAULT_EMBEDDING_WEIGHT: Final = 0.3
BLOCKS: Final[tuple[str, ...]] = ("audio", "embedding")

_INDEX: Final[dict[str, int]] = {name: i for i, name in enumerate(BATCH_FIELDS)}
_MIN_SCALE: Final = 1e-12
"""A std or percentile range below this is treated as a constant dimension (scale 1)."""
_MIN_NORM: Final = 1e-12
"""A block whose norm is below this carries no direction and is treated as missing."""

_AURALIS_RAW_WEIGHTS: Final[dict[str, float]] = {
    "sub_bass_pct": 0.04,
    "bass_pct": 0.06,
    "low_mid_pct": 0.05,
    "mid_pct": 0.06,
    "upper_mid_pct": 0.05,
    "presence_pct": 0.04,
    "air_pct": 0.03,
    "lufs": 0.10,
    "crest_db": 0.08,
    "bass_mid_ratio": 0.05,
    "tempo_bpm": 0.08,
    "rhythm_stability": 0.04,
    "transient_density": 0.04,
    "silence_ratio": 0.02,
    "spectral_centroid": 0.05,
    "spectral_rolloff": 0.04,
    "spectral_flatness": 0.03,
    "harmonic_ratio": 0.04,
    "pitch_stability": 0.03,
    "chroma_energy": 0.02,
    "dynamic_range_variation": 0.02,
    "loudness_variation_std": 0.02,
    "peak_consistency": 0.01,
    "stereo_width": 0.02,
    "phase_correlation": 0.01,
}
_AURALIS_SUM: Final = math.fsum(_AURALIS_RAW_WEIGHTS.values())
AURALIS_DIM_WEIGHTS: Final[Mapping[str, float]] = {
    name: _AURALIS_RAW_WEIGHTS[name] / _AURALIS_SUM for name in BATCH_FIELDS
}
"""Auralis's per-dimension similarity weights (origins.md "Similarity"), renormalized to sum 1."""


# --------------------------------------------------------------------------- statistics


def audio_matrix(fingerprints: Sequence[Fingerprint]) -> FloatArray:
    """Rows of the 25 audio values (``BATCH_FIELDS`` order) for fitting ``AudioStats``.

    A batch fingerprint gives a full row; a streaming-only one gives its values by name and NaN
    for the dimensions it lacks (``AudioStats.fit`` skips NaN per column).
    """
    out = np.full((len(fingerprints), AUDIO_DIM), np.nan)
    for row, fp in enumerate(fingerprints):
        values = _raw_audio(fp)
        if values is None:
            continue
        for name, value in values.items():
            out[row, _INDEX[name]] = value
    return out


def stats_checksum(payload: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``payload`` (sorted keys, no whitespace, no NaN)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _safe_scale(raw: FloatArray) -> FloatArray:
    """Replace a zero, tiny or non-finite scale with 1, so standardization never divides by 0."""
    return np.where(np.isfinite(raw) & (raw > _MIN_SCALE), raw, 1.0)


@dataclass(frozen=True)
class AudioStats:
    """Per-dimension statistics of the 25 audio values, and the mode that uses them.

    Tuples are in ``BATCH_FIELDS`` order; the serialized form keys every value by name.
    ``count`` is the number of rows fitted (streaming-only rows count once even though they fill
    only 13 columns).
    """

    mode: ScalingMode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    p05: tuple[float, ...]
    p95: tuple[float, ...]
    count: int
    version: int = STATS_VERSION
    log_offset: tuple[float, ...] = ()
    """The ``logratio`` mode's offsets (``audio_transform``); empty: all 0 (other modes)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgumentError(
                f"unknown standardization mode {self.mode!r}; expected one of {MODES}",
                field="mode",
            )
        if not self.log_offset:
            object.__setattr__(self, "log_offset", (0.0,) * AUDIO_DIM)
        if self.mode == "logratio" and not any(self.log_offset):
            raise InvalidArgumentError(
                "the logratio mode needs its log offsets", field="log_offset"
            )
        for name in ("mean", "std", "p05", "p95", "log_offset"):
            values = getattr(self, name)
            if len(values) != AUDIO_DIM or not all(math.isfinite(v) for v in values):
                raise InvalidArgumentError(
                    f"{name} must hold {AUDIO_DIM} finite values", field=name
                )

    @classmethod
    def fit(
        cls,
        values: npt.ArrayLike,
        mode: ScalingMode = DEFAULT_MODE,
        *,
        ids: npt.ArrayLike | None = None,
        sample: int = FIT_ROWS,
    ) -> AudioStats:
        """Fit from a 2-D array, one row per track in ``BATCH_FIELDS`` order; NaN = missing.

        Infinity is rejected. A column with no values at all gets mean 0 and scale 1 (logged):
        it standardizes nothing rather than failing, since a library of streaming-only tracks
        legitimately has no band shares.

        The result never depends on the order of the rows, so that a build and an attach that
        read the same library in different orders fit the same statistics. With ``ids`` (the
        rows' distinct record ids) the means are summed in id order: O(n), no sort of the
        values (a million rows: ~0.3 s instead of ~3 s of 25 sorts), and a library larger than
        ``sample`` rows (default :data:`FIT_ROWS`) is fitted on every k-th row in id order
        (``count`` stays the library's size). Without ids, each column is sorted first and every
        row is read (a library without ids: the committed prior, tests). Percentiles and medians
        are order statistics, the same in any order.
        """
        if ids is not None:
            return cls._fit_by_id(values, mode, ids, sample)
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != AUDIO_DIM:
            raise InvalidArgumentError(
                f"stats need a 2-D array with {AUDIO_DIM} columns, got shape {arr.shape}",
                field="values",
            )
        if np.isinf(arr).any():
            raise InvalidArgumentError("stats input contains infinity", field="values")
        if mode not in MODES:
            raise InvalidArgumentError(
                f"unknown standardization mode {mode!r}; expected one of {MODES}", field="mode"
            )
        offsets = fit_log_offsets(arr) if mode == "logratio" else np.zeros(AUDIO_DIM)
        if mode == "logratio":
            arr = log_ratio(arr, offsets)
        present = ~np.isnan(arr)
        mean = np.zeros(AUDIO_DIM)
        std = np.ones(AUDIO_DIM)
        p05 = np.zeros(AUDIO_DIM)
        p95 = np.ones(AUDIO_DIM)
        for j, name in enumerate(BATCH_FIELDS):
            col = np.sort(arr[present[:, j], j])  # sorted: the same sums whatever the row order
            if col.size == 0:
                log.warning("audio stats: no values for %s; using mean 0, scale 1", name)
                continue
            mean[j] = float(np.mean(col))
            std[j] = float(np.std(col))
            p05[j], p95[j] = (float(q) for q in np.percentile(col, [5.0, 95.0]))
        log.debug("fitted audio stats (%s) over %d rows", mode, arr.shape[0])
        return cls._of(mode, mean, std, p05, p95, int(arr.shape[0]), offsets)

    @classmethod
    def _of(cls, mode: ScalingMode, mean: npt.NDArray[np.float64], std: npt.NDArray[np.float64],
            p05: npt.NDArray[np.float64], p95: npt.NDArray[np.float64], count: int,
            offsets: npt.NDArray[np.float64]) -> AudioStats:  # fmt: skip
        """The statistics from a fit's per-value arrays."""
        return cls(mode=mode, mean=tuple(mean.tolist()), std=tuple(std.tolist()),
                   p05=tuple(p05.tolist()), p95=tuple(p95.tolist()), count=count,
                   log_offset=tuple(offsets.tolist()))  # fmt: skip

    @classmethod
    def _fit_by_id(
        cls, values: npt.ArrayLike, mode: ScalingMode, ids: npt.ArrayLike, sample: int
    ) -> AudioStats:
        """:meth:`fit` with the sums in record-id order, on at most ``sample`` rows (see there)."""
        arr = np.asarray(values, dtype=np.float64)
        key = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.ndim != 2 or arr.shape[1] != AUDIO_DIM or key.shape[0] != arr.shape[0]:
            raise InvalidArgumentError(
                f"stats need a 2-D array with {AUDIO_DIM} columns and one id per row, got "
                f"shape {arr.shape} and {key.shape[0]} ids",
                field="values",
            )
        if mode not in MODES:
            raise InvalidArgumentError(
                f"unknown standardization mode {mode!r}; expected one of {MODES}", field="mode"
            )
        if sample < 1:
            raise InvalidArgumentError(f"sample must be >= 1, got {sample}", field="sample")
        # (25, m), each column one contiguous row in id order: one summation order per column;
        # every k-th row in that order when the library is larger than ``sample``
        n = key.shape[0]
        step = -(-n // sample) if n > sample else 1
        if n > 1 and not bool((key[1:] > key[:-1]).all()):
            cols = np.ascontiguousarray(arr[np.argsort(key, kind="stable")[::step]].T)
        else:
            cols = np.ascontiguousarray(arr[::step].T)
        if np.isinf(cols).any():
            raise InvalidArgumentError("stats input contains infinity", field="values")
        offsets = fit_log_offsets(cols.T) if mode == "logratio" else np.zeros(AUDIO_DIM)
        if mode == "logratio":
            log_ratio_columns(cols, offsets)
        mean = np.zeros(AUDIO_DIM)
        std = np.ones(AUDIO_DIM)
        p05 = np.zeros(AUDIO_DIM)
        p95 = np.ones(AUDIO_DIM)
        for j, name in enumerate(BATCH_FIELDS):
            col = cols[j]
            present = ~np.isnan(col)
            if not present.all():
                col = col[present]
            if col.size == 0:
                log.warning("audio stats: no values for %s; using mean 0, scale 1", name)
                continue
            mean[j] = float(np.mean(col))
            std[j] = float(np.std(col))
            # cols is this fit's own copy: the quantiles may reorder it (no copy per column)
            p05[j], p95[j] = (float(q) for q in np.percentile(col, [5.0, 95.0],
                                                              overwrite_input=True))
        return cls._of(mode, mean, std, p05, p95, int(arr.shape[0]), offsets)

    @classmethod
    def from_fingerprints(
        cls, fingerprints: Sequence[Fingerprint], mode: ScalingMode = DEFAULT_MODE
    ) -> AudioStats:
        """Fit from fingerprints (batch rows, and streaming-only rows for their 13 columns)."""
        return cls.fit(audio_matrix(fingerprints), mode)

    @classmethod
    def prior(cls, mode: ScalingMode = DEFAULT_MODE) -> AudioStats:
        """Statistics to embed with before a store has fingerprints of its own.

        The committed table in ``index.default_stats``: fitted once on the generated reference
        library (400 tracks of each style, seed 0; ``scripts/make_default_stats.py`` regenerates
        it), i.e. on plausible ranges of the 25 values. The first index build replaces them with
        the library's own. A table of numbers, so every process and every numpy agrees.
        """
        return _prior(mode)

    def transform(self, values: FloatArray) -> FloatArray:
        """Raw rows ``(n, 25)`` -> the values the mode standardizes (``logratio``: clr of the
        band shares and log flatness; otherwise unchanged)."""
        if self.mode == "logratio":
            return log_ratio(values, self.log_offset)
        return values

    def standardize(self, values: FloatArray) -> FloatArray:
        """Raw rows ``(n, 25)`` (NaN = missing) -> standardized, unweighted, missing = 0."""
        return np.nan_to_num((self.transform(values) - self.center()) / self.scale(), nan=0.0)

    def scale(self) -> FloatArray:
        """The per-dimension divisor of the current mode (1 where the dimension is constant)."""
        if self.mode in ("zscore", "logratio"):
            raw = np.asarray(self.std, dtype=np.float64)
        else:
            raw = np.asarray(self.p95, dtype=np.float64) - np.asarray(self.p05, dtype=np.float64)
        return _safe_scale(raw)

    def center(self) -> FloatArray:
        """The per-dimension value that standardizes to 0 (the mean, in both modes)."""
        return np.asarray(self.mean, dtype=np.float64)

    def drift(self, other: AudioStats) -> float:
        """Largest shift of a dimension's mean between ``self`` and ``other``, in ``self``'s scale.

        A cheap trigger for a rebuild: the index was embedded with ``self``; if the library's
        current statistics have moved by more than a fraction of a scale unit, re-embed.
        """
        shift = np.abs(other.center() - self.center()) / self.scale()
        return float(np.max(shift))

    # ------------------------------------------------------------------ serialization

    def _payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "mode": self.mode,
            "count": self.count,
            "fields": list(BATCH_FIELDS),
            "mean": dict(zip(BATCH_FIELDS, self.mean, strict=True)),
            "std": dict(zip(BATCH_FIELDS, self.std, strict=True)),
            "p05": dict(zip(BATCH_FIELDS, self.p05, strict=True)),
            "p95": dict(zip(BATCH_FIELDS, self.p95, strict=True)),
        }
        if self.version >= 2:
            out["log_offset"] = dict(zip(BATCH_FIELDS, self.log_offset, strict=True))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict with ``version`` and a sha256 ``checksum`` over the rest."""
        payload = self._payload()
        payload["checksum"] = stats_checksum(payload)
        return payload

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AudioStats:
        """Load ``to_dict`` output; verifies version, structure and checksum.

        A newer ``version`` raises ``FormatVersionError``; anything else wrong raises
        ``StatsCorruptionError`` (a ``StoreCorruptionError``) naming the field.
        """
        if not isinstance(data, Mapping):
            raise StatsCorruptionError("audio stats are not a JSON object", field="stats")
        version = data.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise StatsCorruptionError(
                f"audio stats field 'version' is invalid: {version!r}", field="version"
            )
        if version > STATS_VERSION:
            raise FormatVersionError(
                f"audio stats version {version} is newer than this xpstore reads ({STATS_VERSION})"
            )
        stored = data.get("checksum")
        if not isinstance(stored, str):
            raise StatsCorruptionError("audio stats field 'checksum' is missing", field="checksum")
        body = {k: v for k, v in data.items() if k != "checksum"}
        try:
            actual = stats_checksum(body)
        except (TypeError, ValueError) as exc:
            raise StatsCorruptionError(
                f"audio stats are not canonical JSON: {exc}", field="checksum"
            ) from exc
        if actual != stored:
            raise StatsCorruptionError(
                f"audio stats field 'checksum' mismatch: stored {stored[:16]}..., "
                f"computed {actual[:16]}...",
                field="checksum",
            )
        expected_keys = {"version", "mode", "count", "fields", "mean", "std", "p05", "p95"}
        if version >= 2:
            expected_keys.add("log_offset")
        extra = sorted(set(body) - expected_keys)
        if extra:
            raise StatsCorruptionError(f"audio stats field {extra[0]!r} is unknown", field=extra[0])
        mode = body.get("mode")
        if mode not in MODES:
            raise StatsCorruptionError(
                f"audio stats field 'mode' is invalid: {mode!r}", field="mode"
            )
        count = body.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise StatsCorruptionError(
                f"audio stats field 'count' is invalid: {count!r}", field="count"
            )
        if body.get("fields") != list(BATCH_FIELDS):
            raise StatsCorruptionError(
                "audio stats field 'fields' does not list the 25 batch names", field="fields"
            )
        columns: dict[str, tuple[float, ...]] = {}
        keys = ("mean", "std", "p05", "p95") + (("log_offset",) if version >= 2 else ())
        for key in keys:
            columns[key] = _read_column(body.get(key), key)
        if mode == "logratio" and not any(columns.get("log_offset", ())):
            raise StatsCorruptionError(
                "audio stats field 'log_offset' is missing for the logratio mode",
                field="log_offset",
            )
        return cls(
            mode=cast(ScalingMode, mode),
            mean=columns["mean"],
            std=columns["std"],
            p05=columns["p05"],
            p95=columns["p95"],
            count=count,
            version=version,
            log_offset=columns.get("log_offset", ()),
        )


def _read_column(raw: object, key: str) -> tuple[float, ...]:
    """One name-keyed column of a stats dict, checked: all 25 names, finite numbers."""
    if not isinstance(raw, Mapping) or set(raw) != set(BATCH_FIELDS):
        raise StatsCorruptionError(
            f"audio stats field {key!r} must map exactly the 25 batch names", field=key
        )
    out: list[float] = []
    for name in BATCH_FIELDS:
        value = raw[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise StatsCorruptionError(
                f"audio stats field '{key}.{name}' is not a finite number: {value!r}",
                field=f"{key}.{name}",
            )
        out.append(float(value))
    return tuple(out)


# --------------------------------------------------------------------------- embedder


def _raw_audio(fp: Fingerprint) -> dict[str, float] | None:
    """The audio values of ``fp`` by name: batch if present, else streaming, else None."""
    if fp.batch is not None:
        return fp.batch.as_dict()
    if fp.streaming is not None:
        return dict(fp.streaming.values)
    return None


def _check_weight(value: object, field: str) -> float:
    """A block or dimension weight: a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise InvalidArgumentError(f"{field} must be a number, got {value!r}", field=field)
    out = float(value)
    if not math.isfinite(out) or out < 0:
        raise InvalidArgumentError(f"{field} must be finite and >= 0, got {value!r}", field=field)
    return out


def _unit(block: FloatArray) -> FloatArray | None:
    """``block`` scaled to norm 1, or None when it has no direction (zero or non-finite)."""
    norm = float(np.linalg.norm(block))
    if not math.isfinite(norm) or norm < _MIN_NORM:
        return None
    return block / norm


class HybridEmbedder:
    """Turns fingerprints into unit vectors whose inner product is a weighted sum of cosines.

    ``embedding_dim`` fixes the dimension of the optional embedding block (None: the store has no
    embedding block, and fingerprints' ``embedding`` fields are ignored). ``dim_weights`` maps
    each of the 25 batch names to a weight >= 0 (renormalized to sum 1); None picks the mode's
    default (Auralis's weights for ``"percentile"``, uniform for ``"zscore"``).

    Output layout: ``[audio (25) | embedding (embedding_dim)]``, float32.
    """

    def __init__(
        self,
        stats: AudioStats,
        *,
        audio_weight: float = DEFAULT_AUDIO_WEIGHT,
        embedding_weight: float = DEFAULT_EMBEDDING_WEIGHT,
        embedding_dim: int | None = None,
        dim_weights: Mapping[str, float] | None = None,
    ) -> None:
        if embedding_dim is not None and (
            isinstance(embedding_dim, bool)
            or not isinstance(embedding_dim, int)
            or embedding_dim < 1
        ):
            raise InvalidArgumentError(
                f"embedding_dim must be a positive int or None, got {embedding_dim!r}",
                field="embedding_dim",
            )
        self.stats = stats
        self.embedding_dim = embedding_dim
        self._center = stats.center()
        self._scale = stats.scale()
        self._sqrt_dim_w = np.sqrt(self.resolve_dim_weights(stats.mode, dim_weights))
        self.weights = self._resolve_weights(
            {"audio": audio_weight, "embedding": embedding_weight}, None
        )

    # ------------------------------------------------------------------ configuration

    @property
    def dim(self) -> int:
        """Length of every output vector."""
        return AUDIO_DIM + (self.embedding_dim or 0)

    @property
    def dim_weights(self) -> dict[str, float]:
        """The per-dimension audio weights in use, by name (sum 1)."""
        w = self._sqrt_dim_w**2
        return dict(zip(BATCH_FIELDS, w.tolist(), strict=True))

    @staticmethod
    def resolve_dim_weights(
        mode: ScalingMode, dim_weights: Mapping[str, float] | None
    ) -> FloatArray:
        if dim_weights is None:
            if mode in ("percentile", "logratio"):
                return np.array([AURALIS_DIM_WEIGHTS[n] for n in BATCH_FIELDS])
            return np.full(AUDIO_DIM, 1.0 / AUDIO_DIM)
        unknown = sorted(set(dim_weights) - set(BATCH_FIELDS))
        if unknown:
            raise InvalidArgumentError(
                f"dim_weights has unknown name {unknown[0]!r}", field=f"dim_weights.{unknown[0]}"
            )
        missing = [n for n in BATCH_FIELDS if n not in dim_weights]
        if missing:
            raise InvalidArgumentError(
                f"dim_weights must give all 25 batch names; {missing[0]!r} is missing",
                field=f"dim_weights.{missing[0]}",
            )
        w = np.array([_check_weight(dim_weights[n], f"dim_weights.{n}") for n in BATCH_FIELDS])
        total = float(w.sum())
        if not total > 0:
            raise InvalidArgumentError("dim_weights are all zero", field="dim_weights")
        return w / total

    def _resolve_weights(
        self, weights: Mapping[str, float], base: Mapping[str, float] | None
    ) -> dict[str, float]:
        """Validate block weights; keys missing from ``weights`` keep ``base``'s value."""
        unknown = sorted(set(weights) - set(BLOCKS))
        if unknown:
            raise InvalidArgumentError(
                f"unknown weight {unknown[0]!r}; blocks are {BLOCKS}", field=f"weights.{unknown[0]}"
            )
        out: dict[str, float] = {}
        for block in BLOCKS:
            if block in weights:
                out[block] = _check_weight(weights[block], f"weights.{block}")
            else:
                out[block] = base[block] if base is not None else 0.0
        if self.embedding_dim is None:
            if not out["audio"] > 0:
                raise InvalidArgumentError(
                    "weights.audio must be > 0 when there is no embedding block",
                    field="weights.audio",
                )
        elif not out["audio"] + out["embedding"] > 0:
            raise InvalidArgumentError("weights are both zero", field="weights")
        return out

    # ------------------------------------------------------------------ blocks

    def audio_block(self, values: Mapping[str, float]) -> FloatArray | None:
        """The unit audio block from values keyed by batch name (any subset), or None.

        Names not given are taken as the library mean (standardized 0); in the ``logratio``
        mode the band shares count only when all seven are given. None when the block has no
        direction (every given value equals the mean, or every weight on them is 0).
        """
        row = np.full((1, AUDIO_DIM), np.nan)
        for name, value in values.items():
            j = _INDEX.get(name)
            if j is None:
                raise InvalidRecordError(f"unknown audio value {name!r}", field=name)
            if isinstance(value, bool) or not isinstance(
                value, int | float | np.floating | np.integer
            ):
                raise InvalidRecordError(f"{name} must be a number, got {value!r}", field=name)
            x = float(value)
            if not math.isfinite(x):
                raise InvalidRecordError(f"{name} must be finite, got {value!r}", field=name)
            row[0, j] = x
        return _unit(self.standardize(row)[0])

    def standardize(self, audio: FloatArray) -> FloatArray:
        """Raw rows ``(n, 25)`` (NaN = missing) -> weighted standardized values, missing = 0."""
        t = self.stats.transform(audio)
        if t is audio or not t.flags.writeable:
            t = np.array(t, dtype=np.float64)
        # in place on one copy: a million rows are 200 MB per temporary (same values as
        # ``nan_to_num((t - center) / scale) * sqrt_w``)
        t -= self._center
        t /= self._scale
        np.nan_to_num(t, copy=False, nan=0.0)
        t *= self._sqrt_dim_w
        return t

    def embedding_block(self, embedding: Sequence[float] | npt.ArrayLike) -> FloatArray | None:
        """The unit embedding block, or None when it is all zeros (or there is no block)."""
        if self.embedding_dim is None:
            return None
        arr = np.asarray(embedding, dtype=np.float64)
        if arr.ndim != 1 or arr.shape[0] != self.embedding_dim:
            raise InvalidRecordError(
                f"embedding must have dimension {self.embedding_dim}, got shape {arr.shape}",
                field="embedding",
            )
        if not np.isfinite(arr).all():
            raise InvalidRecordError("embedding contains NaN or infinity", field="embedding")
        return _unit(arr)

    # ------------------------------------------------------------------ vectors

    def embed_parts(
        self,
        audio: Mapping[str, float] | None,
        embedding: Sequence[float] | npt.ArrayLike | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> F32Array:
        """A vector from raw parts (for ``similar(fingerprint=...)`` with bare values).

        Norm 1, or all zeros when no present block has a positive weight.
        """
        w = self.weights if weights is None else self._resolve_weights(weights, self.weights)
        a = self.audio_block(audio) if audio is not None else None
        e = self.embedding_block(embedding) if embedding is not None else None
        return self._combine(a, e, w, query_scale=None)

    def embed(self, fp: Fingerprint, weights: Mapping[str, float] | None = None) -> F32Array:
        """The hybrid vector of ``fp`` (audio from batch, else streaming by name; embedding)."""
        return self.embed_parts(_raw_audio(fp), fp.embedding, weights)

    def embed_many(
        self, fps: Sequence[Fingerprint], weights: Mapping[str, float] | None = None
    ) -> F32Array:
        """``embed`` for each fingerprint, stacked into an ``(n, dim)`` float32 array."""
        out = np.zeros((len(fps), self.dim), dtype=np.float32)
        for i, fp in enumerate(fps):
            out[i] = self.embed(fp, weights)
        return out

    def embed_rows(
        self,
        audio: npt.ArrayLike,
        embedding: npt.ArrayLike | None = None,
        has_embedding: npt.ArrayLike | None = None,
    ) -> F32Array:
        """``embed`` of many rows at once, vectorized (index builds, the delta's re-embedding).

        ``audio`` is ``(n, 25)`` raw values in ``BATCH_FIELDS`` order with NaN for missing ones
        (``index.rows`` reads them); ``embedding`` is ``(n, embedding_dim)`` and
        ``has_embedding`` says which rows carry one. Equal to ``embed`` row by row.
        """
        a = np.asarray(audio, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != AUDIO_DIM:
            raise InvalidArgumentError(
                f"audio rows must be (n, {AUDIO_DIM}), got shape {a.shape}", field="audio"
            )
        n = a.shape[0]
        e = None
        if self.embedding_dim is not None and embedding is not None:
            e = np.asarray(embedding, dtype=np.float64)
            if e.shape != (n, self.embedding_dim):
                raise InvalidArgumentError(
                    f"embedding rows must be ({n}, {self.embedding_dim}), got shape {e.shape}",
                    field="embedding",
                )
        has = None if has_embedding is None else np.asarray(has_embedding, dtype=bool)
        if n <= _EMBED_BLOCK:
            return self._embed_block(a, e, has)
        # block by block: every step is per row, and a block's temporaries stay in the CPU's
        # cache (a million rows are 200 MB per temporary: ~2x slower in one piece)
        out = np.empty((n, self.dim), dtype=np.float32)
        for lo in range(0, n, _EMBED_BLOCK):
            hi = min(n, lo + _EMBED_BLOCK)
            out[lo:hi] = self._embed_block(a[lo:hi], None if e is None else e[lo:hi],
                                           None if has is None else has[lo:hi])  # fmt: skip
        return out

    def _embed_block(
        self, a: FloatArray, e: FloatArray | None, has: npt.NDArray[np.bool_] | None
    ) -> F32Array:
        """:meth:`embed_rows` of one block of rows (checked by the caller)."""
        n = a.shape[0]
        z = self.standardize(a)
        a_norm = np.linalg.norm(z, axis=1)
        a_ok = np.isfinite(a_norm) & (a_norm >= _MIN_NORM)
        z /= np.where(a_ok, a_norm, 1.0)[:, None]  # in place: z is standardize's own copy
        z[~a_ok] = 0.0
        a_unit = z
        e_ok = np.zeros(n, dtype=bool)
        e_unit: FloatArray | None = None
        if e is not None:
            if has is None:
                has = np.ones(n, dtype=bool)
            e_norm = np.linalg.norm(e, axis=1)
            e_ok = has & np.isfinite(e_norm) & (e_norm >= _MIN_NORM)
            e_unit = np.where(e_ok[:, None], e / np.where(e_ok, e_norm, 1.0)[:, None], 0.0)
        wa, we = self.weights["audio"], self.weights["embedding"]
        total = np.where(a_ok, wa, 0.0) + np.where(e_ok, we, 0.0)
        safe = np.where(total > 0, total, 1.0)
        out = np.zeros((n, self.dim), dtype=np.float32)  # float64 products, rounded once
        fa = np.where(a_ok & (total > 0), np.sqrt(wa / safe), 0.0)
        a_unit *= fa[:, None]
        out[:, :AUDIO_DIM] = a_unit
        if e_unit is not None:
            fe = np.where(e_ok & (total > 0), np.sqrt(we / safe), 0.0)
            out[:, AUDIO_DIM:] = e_unit * fe[:, None]
        return out

    def embed_query(self, fp: Fingerprint, weights: Mapping[str, float] | None = None) -> F32Array:
        """A query vector that reweights blocks against vectors stored with ``self.weights``.

        Stored vectors carry block ``b`` scaled by ``sqrt(w_b)``; the query's block is scaled by
        ``q_b / sqrt(w_b)`` (``q`` = ``weights`` renormalized over the query's present blocks),
        so ``dot(query, stored) = Σ q_b cos_b`` exactly when both have the same blocks present
        and the stored vector needed no renormalization (both blocks present, or only the audio
        block with no embedding block in the store). The query is not unit-norm. A block the
        store weights 0 cannot be brought back by a query: asking for it raises.
        """
        if weights is None:
            return self.embed(fp)
        q = self._resolve_weights(weights, self.weights)
        for block in BLOCKS:
            if q[block] > 0 and self.weights[block] == 0:
                raise InvalidArgumentError(
                    f"the index stores the {block} block with weight 0; a query cannot weight it",
                    field=f"weights.{block}",
                )
        raw = _raw_audio(fp)
        a = self.audio_block(raw) if raw is not None else None
        e = self.embedding_block(fp.embedding) if fp.embedding is not None else None
        return self._combine(a, e, q, query_scale=self.weights)

    def _combine(
        self,
        audio: FloatArray | None,
        embedding: FloatArray | None,
        weights: Mapping[str, float],
        *,
        query_scale: Mapping[str, float] | None,
    ) -> F32Array:
        """Concatenate the present blocks with their renormalized sqrt-weights."""
        blocks = {"audio": audio, "embedding": embedding}
        total = sum(weights[b] for b, v in blocks.items() if v is not None)
        stored_total = (
            sum(query_scale[b] for b, v in blocks.items() if v is not None)
            if query_scale is not None
            else 0.0
        )
        out = np.zeros(self.dim, dtype=np.float64)
        if not total > 0:
            log.debug("no block with signal and weight > 0; embedding is all zeros")
            return out.astype(np.float32)
        spans = {"audio": slice(0, AUDIO_DIM), "embedding": slice(AUDIO_DIM, self.dim)}
        for block, vec in blocks.items():
            if vec is None or weights[block] == 0:
                continue
            share = weights[block] / total
            if query_scale is None:
                factor = math.sqrt(share)
            else:
                # the stored vector's share of this block, given the same blocks present
                factor = share / math.sqrt(query_scale[block] / stored_total)
            out[spans[block]] = factor * vec
        return out.astype(np.float32)


@functools.cache
def _prior(mode: ScalingMode) -> AudioStats:
    """``AudioStats.prior``: the committed table, read by name."""

    def column(table: Mapping[str, float]) -> tuple[float, ...]:
        return tuple(float(table[name]) for name in BATCH_FIELDS)

    if mode == "logratio":
        return AudioStats(
            mode=mode,
            mean=column(default_stats.LOGRATIO_MEAN),
            std=column(default_stats.LOGRATIO_STD),
            p05=column(default_stats.LOGRATIO_P05),
            p95=column(default_stats.LOGRATIO_P95),
            count=default_stats.COUNT,
            log_offset=column(default_stats.LOG_OFFSET),
        )
    return AudioStats(
        mode=mode,
        mean=column(default_stats.MEAN),
        std=column(default_stats.STD),
        p05=column(default_stats.P05),
        p95=column(default_stats.P95),
        count=default_stats.COUNT,
    )
