"""Streaming-vs-batch validation: can a track's streaming values be trusted? (issue 11)

A player computes the 13 streaming values from the first seconds of a track; the 25 batch values
come later, from the whole track. The two are compared **by name** (the 13 streaming names are
not the first 13 batch names) in standardized units, and the verdict comes from a per-metric
model calibrated on pairs known to be the same track and pairs known not to be:

* **standardization**: each of the 13 names (10 without the harmonic three) is centred and scaled
  by the library's *batch* values of that name (flatness through a log first, as in the index's
  ``logratio`` mode); ``d_j = z(streaming_j) - z(batch_j)``;
* **per-metric model**: for true pairs (a fingerprint's own streaming and batch values) each
  ``d_j`` has a location and a robust scale (median, 1.4826·MAD, floored); so does each ``d_j``
  of *different-track* pairs. The pair's raw score is the log-likelihood ratio
  ``sum_j log t(d_j; true) - log t(d_j; false)`` with Student-t densities (3 degrees of freedom:
  a metric that
  went wrong — a tempo octave error, a quiet intro — costs a bounded amount instead of
  dominating, which a Gaussian would let it do). Metrics absent from either side are skipped;
* **score normalization** against a cohort: the raw score of the streaming values against the
  batch values of a fixed sample of other library tracks gives a mean and spread; the score is
  ``(raw - mean) / spread`` (Z-norm, as in speaker verification): how far this batch stands out
  from other tracks *for these streaming values*. This makes one threshold fit queries whose
  raw scores sit at different levels;
* **calibrated threshold**: the ``1 - target_far`` quantile of the scores of different-track
  pairs in the calibration set, so that a share ``target_far`` of them would be accepted. The
  calibration keeps its sample sizes. With no cohort (the prior) the raw score and its own
  threshold are used.

:func:`metric_checks` reports per-metric accuracy (relative error for ``tempo_bpm`` and
``loudness_variation_std``, absolute for the 0..1 values) and :func:`confidence_quality` grades
the streaming confidences. Pure numpy over ``(n, 13)`` arrays in ``STREAMING_FIELDS`` order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from xpstore.model.records import STREAMING_FIELDS

__all__ = [
    "FLOOR",
    "NU",
    "RELATIVE",
    "CalibrationFit",
    "MetricCheck",
    "ValidationModel",
    "auc",
    "confidence_quality",
    "fit_model",
    "metric_checks",
    "streaming_row",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
Quality = Literal["high", "medium", "low"]

NAMES: Final[tuple[str, ...]] = STREAMING_FIELDS
NU: Final = 3.0
"""Degrees of freedom of the per-metric Student-t densities."""
FLOOR: Final = 0.05
"""Smallest per-metric scale, in standardized units (a metric never looks perfectly precise)."""
RELATIVE: Final = frozenset({"tempo_bpm", "loudness_variation_std"})
"""Metrics whose accuracy is a relative error; every other one is a 0..1 value (absolute)."""
TYPICAL: Final = 2.5
"""A metric is ``typical`` when its difference is within this many true-pair scales."""
HIGH_CONFIDENCE: Final = 0.85
MEDIUM_CONFIDENCE: Final = 0.6
"""Mean streaming confidence grades (Auralis's strategy thresholds): high, medium, else low."""
FALSE_PER_ROW: Final = 1000
"""Different-track pairs drawn per calibration row (every pair below 1001 rows)."""
MIN_COHORT: Final = 20
"""Below this many cohort rows scores are not normalized (the raw threshold applies)."""
COHORT_SIZE: Final = 100
"""Batch fingerprints of the library drawn as the cohort."""
_FLAT: Final = NAMES.index("spectral_flatness")


def streaming_row(values: Mapping[str, float]) -> FloatArray:
    """13 values in ``STREAMING_FIELDS`` order from a by-name mapping; NaN for absent names."""
    return np.array([float(values[n]) if n in values else np.nan for n in NAMES])


@dataclass(frozen=True)
class ValidationModel:
    """Everything scoring needs; JSON-able by name (``to_json``/``from_json``)."""

    center: FloatArray
    scale: FloatArray
    flat_offset: float
    true_loc: FloatArray
    true_scale: FloatArray
    false_loc: FloatArray
    false_scale: FloatArray

    def standardize(self, rows: FloatArray) -> FloatArray:
        t = np.array(rows, dtype=np.float64, copy=True)
        t[:, _FLAT] = np.log(np.maximum(t[:, _FLAT], 0.0) + self.flat_offset)
        out: FloatArray = (t - self.center) / self.scale
        return out

    def raw_scores(self, stream: FloatArray, batch: FloatArray) -> FloatArray:
        """The log-likelihood ratio of each (streaming row, batch row) pair."""
        d = self.standardize(stream) - self.standardize(batch)
        out: FloatArray = np.nansum(self._per_metric(d), axis=1)
        return out

    def _per_metric(self, d: FloatArray) -> FloatArray:
        def logt(x: FloatArray, loc: FloatArray, scale: FloatArray) -> FloatArray:
            u = (x - loc) / scale
            out: FloatArray = -(NU + 1) / 2 * np.log1p(u * u / NU) - np.log(scale)
            return out

        return logt(d, self.true_loc, self.true_scale) - logt(d, self.false_loc, self.false_scale)

    def cohort_scores(self, stream: FloatArray, cohort: FloatArray) -> FloatArray:
        """Raw scores of each streaming row against every cohort batch row: ``(n, m)``."""
        zs = self.standardize(stream)
        zc = self.standardize(cohort)
        d = zs[:, None, :] - zc[None, :, :]
        out: FloatArray = np.nansum(self._per_metric(d), axis=2)
        return out

    def cohort_stats(
        self, stream: FloatArray, cohort: FloatArray, exclude: IntArray | None
    ) -> tuple[FloatArray, FloatArray]:
        """Mean and spread of each streaming row's raw scores against the cohort's batch rows
        (``exclude[i]``: the cohort row to leave out for row ``i``, its own batch; -1: none)."""
        c = self.cohort_scores(stream, cohort)
        if exclude is not None:
            rows = np.flatnonzero(exclude >= 0)
            c[rows, exclude[rows]] = np.nan
        mean: FloatArray = np.nanmean(c, axis=1)
        spread: FloatArray = np.maximum(np.nanstd(c, axis=1), 1e-9)
        return mean, spread

    def to_json(self) -> dict[str, Any]:
        def named(a: FloatArray) -> dict[str, float]:
            return {n: float(v) for n, v in zip(NAMES, a.tolist(), strict=True)}

        return {
            "center": named(self.center),
            "scale": named(self.scale),
            "flat_offset": self.flat_offset,
            "true_loc": named(self.true_loc),
            "true_scale": named(self.true_scale),
            "false_loc": named(self.false_loc),
            "false_scale": named(self.false_scale),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ValidationModel:
        def arr(key: str) -> FloatArray:
            return np.array([float(data[key][n]) for n in NAMES])

        return cls(
            arr("center"), arr("scale"), float(data["flat_offset"]), arr("true_loc"),
            arr("true_scale"), arr("false_loc"), arr("false_scale"),
        )  # fmt: skip


def _robust(d: FloatArray) -> tuple[FloatArray, FloatArray]:
    loc = np.nanmedian(d, axis=0)
    scale = 1.4826 * np.nanmedian(np.abs(d - loc), axis=0)
    loc = np.nan_to_num(loc, nan=0.0)
    return loc, np.maximum(np.nan_to_num(scale, nan=1.0), FLOOR)


def auc(positive: FloatArray, negative: FloatArray) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties half."""
    if positive.size == 0 or negative.size == 0:
        return float("nan")
    values = np.concatenate([positive, negative])
    order = values.argsort(kind="stable")
    ranks = np.empty(values.shape[0])
    sorted_v = values[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    n_pos = positive.size
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * negative.size))


@dataclass(frozen=True)
class CalibrationFit:
    """What :func:`fit_model` produced from one calibration set."""

    model: ValidationModel
    threshold: float
    raw_threshold: float
    true_pairs: int
    false_pairs: int
    auc: float
    accept_rate: float
    """Share of the calibration's true pairs at or above ``threshold``."""
    false_accept_rate: float


def fit_model(
    stream: FloatArray,
    batch: FloatArray,
    library_batch: FloatArray,
    cohort: FloatArray,
    own: IntArray,
    *,
    target_far: float,
    seed: int = 0,
    same: npt.NDArray[np.bool_] | None = None,
) -> CalibrationFit:
    """Calibrate on ``n`` fingerprints with both parts (row ``i`` of ``stream`` and ``batch`` is
    one fingerprint; different rows are different tracks unless ``same[i, j]`` says otherwise).

    ``library_batch`` (batch values of the 13 names over the library) gives the
    standardization; ``cohort`` ``(m, 13)`` are the batch rows of the score normalization and
    ``own[i]`` the cohort row of fingerprint ``i``'s own batch (-1: not in the cohort).
    Different-track pairs: every pair, or :data:`FALSE_PER_ROW` per row drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = stream.shape[0]
    flat = library_batch[:, _FLAT]
    flat = flat[~np.isnan(flat)]
    flat_offset = max(1e-6, 0.01 * float(np.median(flat))) if flat.size else 1e-6
    t = np.array(library_batch, dtype=np.float64, copy=True)
    t[:, _FLAT] = np.log(np.maximum(t[:, _FLAT], 0.0) + flat_offset)
    center = np.nan_to_num(np.nanmean(t, axis=0), nan=0.0)
    scale = np.nan_to_num(np.nanstd(t, axis=0), nan=1.0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    zero = np.zeros(len(NAMES))
    one = np.ones(len(NAMES))
    pre = ValidationModel(center, scale, flat_offset, zero, one, zero, one)
    zs, zb = pre.standardize(stream), pre.standardize(batch)
    fi, fj = _false_pairs(n, rng, same)
    true_loc, true_scale = _robust(zs - zb)
    false_loc, false_scale = _robust(zs[fi] - zb[fj])
    model = ValidationModel(center, scale, flat_offset, true_loc, true_scale, false_loc,
                            false_scale)  # fmt: skip
    raw_true = model.raw_scores(stream, batch)
    raw_false = model.raw_scores(stream[fi], batch[fj])
    raw_threshold = float(np.quantile(raw_false, 1 - target_far))
    if cohort.shape[0] >= MIN_COHORT:
        mean, spread = model.cohort_stats(stream, cohort, own)
        norm_true = (raw_true - mean) / spread
        norm_false = (raw_false - mean[fi]) / spread[fi]
        threshold = float(np.quantile(norm_false, 1 - target_far))
    else:
        norm_true, norm_false, threshold = raw_true, raw_false, raw_threshold
    return CalibrationFit(
        model=model,
        threshold=threshold,
        raw_threshold=raw_threshold,
        true_pairs=n,
        false_pairs=int(fi.shape[0]),
        auc=auc(norm_true, norm_false),
        accept_rate=float(np.mean(norm_true >= threshold)),
        false_accept_rate=float(np.mean(norm_false >= threshold)),
    )


def _false_pairs(
    n: int, rng: np.random.Generator, same: npt.NDArray[np.bool_] | None
) -> tuple[IntArray, IntArray]:
    if n * (n - 1) <= n * FALSE_PER_ROW:
        grid_i, grid_j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        i, j = grid_i.ravel(), grid_j.ravel()
    else:
        i = np.repeat(np.arange(n), FALSE_PER_ROW)
        j = rng.integers(0, n - 1, size=i.shape[0])
        j = np.where(j >= i, j + 1, j)  # never the row itself
    keep = i != j
    if same is not None:
        keep &= ~same[i, j]
    return i[keep].astype(np.int64), j[keep].astype(np.int64)


@dataclass(frozen=True)
class MetricCheck:
    """One streaming metric against its batch value."""

    streaming: float
    batch: float
    error: float
    """``|s - b| / |b|`` for the relative metrics (:data:`RELATIVE`), ``|s - b|`` otherwise."""
    relative: bool
    z: float
    """The standardized difference less its true-pair location, in true-pair scales."""
    typical: bool
    """``|z| <= TYPICAL``: within what true pairs show."""

    def to_json(self) -> dict[str, Any]:
        return {
            "streaming": self.streaming, "batch": self.batch, "error": self.error,
            "relative": self.relative, "z": self.z, "typical": self.typical,
        }  # fmt: skip


def metric_checks(
    model: ValidationModel, stream: Mapping[str, float], batch: Mapping[str, float]
) -> dict[str, MetricCheck]:
    """Per-metric accuracy, by name, for the names both sides have."""
    s = streaming_row(stream)
    b = streaming_row(batch)
    d = (model.standardize(s[None, :]) - model.standardize(b[None, :]))[0]
    out: dict[str, MetricCheck] = {}
    for j, name in enumerate(NAMES):
        if name not in stream or name not in batch:
            continue
        sv, bv = float(s[j]), float(b[j])
        rel = name in RELATIVE
        err = abs(sv - bv) / abs(bv) if rel and bv != 0 else abs(sv - bv)
        z = float((d[j] - model.true_loc[j]) / model.true_scale[j])
        out[name] = MetricCheck(sv, bv, err, rel, z, abs(z) <= TYPICAL)
    return out


def confidence_quality(confidence: Mapping[str, float]) -> tuple[Quality, float]:
    """(grade, mean confidence) of a streaming fingerprint's per-metric confidences."""
    if not confidence:
        return "low", 0.0
    mean = math.fsum(confidence.values()) / len(confidence)
    if mean >= HIGH_CONFIDENCE:
        return "high", mean
    if mean >= MEDIUM_CONFIDENCE:
        return "medium", mean
    return "low", mean


def cosine(model: ValidationModel, stream: FloatArray, batch: FloatArray) -> float:
    """Cosine of the standardized values over the names both have (the published measure)."""
    zs = model.standardize(stream[None, :])[0]
    zb = model.standardize(batch[None, :])[0]
    ok = ~(np.isnan(zs) | np.isnan(zb))
    a, b = zs[ok], zb[ok]
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na < 1e-12 or nb < 1e-12:
        return 0.0
    return float(a @ b / (na * nb))


def rows_of(values: Sequence[Mapping[str, float]]) -> FloatArray:
    """``streaming_row`` of each mapping, stacked ``(n, 13)``."""
    if not values:
        return np.zeros((0, len(NAMES)))
    return np.vstack([streaming_row(v) for v in values])
