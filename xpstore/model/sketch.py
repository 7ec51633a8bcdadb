"""A fixed-relative-error, mergeable histogram of positive values (latencies, sizes).

Why log buckets and not a t-digest: a value's bucket is a pure function of the value
(``floor(log(v) / log(gamma))``), so two sketches merge by adding counts, exactly, in any order,
across threads, intervals and processes; a quantile is within a factor ``gamma`` of the true
order statistic (``gamma`` = 1.02 by default, i.e. +-1 %), whatever the distribution, and the
size is bounded by the dynamic range (at most ~1600 buckets from 1 ns to 1 day at 1.02, far
fewer in practice, since only touched buckets are kept). A t-digest is smaller at the tails'
extremes but its merges depend on order and it needs a third-party package on the write path.

A sketch serializes to a plain dict (``to_dict``/``from_dict``) of numbers: no pickling, safe to
log through the WAL and to rebuild on open.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from xpstore.errors import InvalidArgumentError

__all__ = ["LogHistogram"]


class LogHistogram:
    """Counts of values in geometric buckets ``[gamma**i, gamma**(i+1))``, plus exact count,
    sum, min and max. Zero is counted apart; negative or non-finite values are refused."""

    __slots__ = ("_inv_log_gamma", "buckets", "count", "gamma", "max", "min", "sum", "zeros")

    def __init__(self, gamma: float = 1.02) -> None:
        if not (1.0 < gamma <= 2.0):
            raise InvalidArgumentError(f"gamma must be in (1, 2], got {gamma!r}")
        self.gamma = gamma
        self._inv_log_gamma = 1.0 / math.log(gamma)
        self.buckets: dict[int, int] = {}
        self.zeros = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float, n: int = 1) -> None:
        """Count ``value`` ``n`` times."""
        if value > 0.0 and value < math.inf:
            i = math.floor(math.log(value) * self._inv_log_gamma)
            b = self.buckets
            b[i] = b.get(i, 0) + n
        elif value == 0.0:
            self.zeros += n
        else:
            raise InvalidArgumentError(f"a histogram value must be finite and >= 0, got {value!r}")
        self.count += n
        self.sum += value * n
        if value < self.min:  # noqa: PLR1730 (a branch is cheaper than min() on the hot path)
            self.min = value
        if value > self.max:  # noqa: PLR1730
            self.max = value

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.add(v)

    def add_many(self, values: npt.ArrayLike) -> None:
        """Count every value of an array at once (vectorized; the same buckets as ``add``)."""
        arr = np.asarray(values, dtype=np.float64).ravel()
        if not arr.size:
            return
        if not np.isfinite(arr).all() or (arr < 0).any():
            bad = arr[~np.isfinite(arr) | (arr < 0)][0]
            raise InvalidArgumentError(f"a histogram value must be finite and >= 0, got {bad!r}")
        pos = arr[arr > 0]
        if pos.size:
            idx = np.floor(np.log(pos) * self._inv_log_gamma).astype(np.int64)
            keys, counts = np.unique(idx, return_counts=True)
            b = self.buckets
            for i, c in zip(keys.tolist(), counts.tolist(), strict=True):
                b[i] = b.get(i, 0) + c
        self.zeros += int(arr.size - pos.size)
        self.count += int(arr.size)
        self.sum += float(arr.sum())
        self.min = min(self.min, float(arr.min()))
        self.max = max(self.max, float(arr.max()))

    def merge(self, other: LogHistogram) -> LogHistogram:
        """Add ``other``'s counts to this one (same gamma); return self."""
        if other.gamma != self.gamma:
            raise InvalidArgumentError(
                f"cannot merge histograms of gamma {other.gamma} into {self.gamma}"
            )
        for i, c in other.buckets.items():
            self.buckets[i] = self.buckets.get(i, 0) + c
        self.zeros += other.zeros
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def copy(self) -> LogHistogram:
        return LogHistogram(self.gamma).merge(self)

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The value at rank ``q`` (0..1): within a factor ``gamma`` of the exact order
        statistic, clamped to the observed min/max. NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise InvalidArgumentError(f"q must be in [0, 1], got {q!r}")
        if self.count == 0:
            return math.nan
        rank = q * (self.count - 1)  # the same rank numpy's "linear" method interpolates at
        seen = self.zeros
        if rank < seen:
            return 0.0
        for i in sorted(self.buckets):
            seen += self.buckets[i]
            if rank < seen:
                mid: float = self.gamma ** (i + 0.5)
                return min(max(mid, self.min), self.max)
        return self.max

    def count_above(self, threshold: float) -> int:
        """How many values fall in buckets wholly above ``threshold`` (slow-query counts)."""
        if threshold <= 0.0:
            return self.count - (self.zeros if threshold == 0.0 else 0)
        edge = math.floor(math.log(threshold) * self._inv_log_gamma)
        return sum(c for i, c in self.buckets.items() if i > edge)

    def to_dict(self) -> dict[str, Any]:
        """A plain-number form for the WAL or JSON (bucket keys as strings for JSON)."""
        return {
            "gamma": self.gamma,
            "buckets": {str(i): c for i, c in sorted(self.buckets.items())},
            "zeros": self.zeros,
            "count": self.count,
            "sum": self.sum,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> LogHistogram:
        """The inverse of :meth:`to_dict`; InvalidArgumentError naming the field when malformed."""
        try:
            h = cls(float(doc["gamma"]))
            h.buckets = {int(k): int(v) for k, v in dict(doc["buckets"]).items()}
            h.zeros = int(doc["zeros"])
            h.count = int(doc["count"])
            h.sum = float(doc["sum"])
            if h.count:
                h.min, h.max = float(doc["min"]), float(doc["max"])
        except KeyError as exc:
            raise InvalidArgumentError(f"histogram document lacks field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed histogram document: {exc}") from None
        total = h.zeros + sum(h.buckets.values())
        if total != h.count or any(c < 0 for c in h.buckets.values()):
            raise InvalidArgumentError(
                f"histogram document: bucket counts sum to {total}, field 'count' says {h.count}"
            )
        return h

    def __repr__(self) -> str:
        return f"<LogHistogram n={self.count} p50={self.quantile(0.5):.3g}>"
