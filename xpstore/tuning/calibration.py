"""Confidence calibration: a raw score -> the probability that the prediction is right.

Histogram binning with monotone smoothing: resolved outcomes are sorted by their raw score into
equal-count bins, each bin's Laplace-smoothed hit rate is its calibrated value, and a
pool-adjacent-violators pass makes the map non-decreasing (a higher score never means a lower
probability). Between bin centres the map is interpolated linearly. Chosen over isotonic
regression on single points (noisy with few outcomes per listener) and over Platt scaling (the
raw scores of a blend of two distributions are not logistic); it needs no dependency.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Calibrator", "reliability"]

MIN_OUTCOMES = 50
"""Below this many resolved outcomes the calibrator keeps the raw score (documented prior)."""


@dataclass
class Calibrator:
    """A monotone map from raw score to P(correct), fitted on (score, correct) pairs."""

    centres: tuple[float, ...] = ()
    values: tuple[float, ...] = ()
    n: int = 0

    @classmethod
    def fit(cls, scores: Sequence[float], correct: Sequence[bool], bins: int = 10) -> Calibrator:
        n = len(scores)
        if n < MIN_OUTCOMES:
            return cls(n=n)
        order = sorted(range(n), key=scores.__getitem__)
        k = max(1, min(bins, n // 20))
        groups: list[list[int]] = [order[i * n // k : (i + 1) * n // k] for i in range(k)]
        centres = [sum(scores[i] for i in g) / len(g) for g in groups]
        rates = [(sum(1 for i in g if correct[i]) + 1) / (len(g) + 2) for g in groups]
        weights = [float(len(g)) for g in groups]
        return cls(tuple(centres), tuple(_pav(rates, weights)), n)

    def __call__(self, score: float) -> float:
        if not self.centres:
            return min(1.0, max(0.0, score))
        c, v = self.centres, self.values
        if score <= c[0]:
            return v[0]
        if score >= c[-1]:
            return v[-1]
        j = bisect.bisect_right(c, score)
        lo, hi = c[j - 1], c[j]
        t = (score - lo) / (hi - lo) if hi > lo else 0.0
        return v[j - 1] + t * (v[j] - v[j - 1])


def _pav(values: list[float], weights: list[float]) -> list[float]:
    """Pool adjacent violators: the closest non-decreasing sequence (weighted least squares)."""
    blocks: list[list[float]] = []  # [value, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            b = blocks.pop()
            a = blocks[-1]
            total = a[1] + b[1]
            a[0] = (a[0] * a[1] + b[0] * b[1]) / total
            a[1], a[2] = total, a[2] + b[2]
    out: list[float] = []
    for v, _w, count in blocks:
        out.extend([v] * int(count))
    return out


def reliability(
    confidence: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> dict[str, object]:
    """ECE (expected calibration error over equal-width bins), Brier score and the bins
    (range, count, mean confidence, accuracy) of recorded confidences against outcomes."""
    n = len(confidence)
    rows = []
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if not idx:
            rows.append({"lo": lo, "hi": hi, "count": 0, "confidence": None, "accuracy": None})
            continue
        conf = sum(confidence[i] for i in idx) / len(idx)
        acc = sum(1 for i in idx if correct[i]) / len(idx)
        ece += len(idx) / n * abs(acc - conf)
        rows.append({"lo": lo, "hi": hi, "count": len(idx), "confidence": conf, "accuracy": acc})
    brier = sum((c - (1.0 if ok else 0.0)) ** 2 for c, ok in zip(confidence, correct, strict=True))
    return {
        "n": n,
        "ece": ece if n else None,
        "brier": brier / n if n else None,
        "bins": rows,
    }
