"""The ``logratio`` transform of the 25 audio values, applied before standardization.

Why (measured on real music, docs/index.md "Embeddings: how and why"): the seven band shares are
*compositional* — fractions of one whole that sum to about 1 — and heavy-tailed (a band holds
0.02 % of the energy in one track and 40 % in another). Standardizing them linearly lets one
loud band decide the whole block and makes the seven shares mirror each other. The standard
treatment of compositional data is the **centred log-ratio**: ``clr(b)_i = log b_i - mean_k
log b_k``, which turns shares into relative (scale-free) log contrasts. ``spectral_flatness``
(0..1, a ratio of means spread over three orders of magnitude) is taken as a plain log. Every
other value is left as it is.

A zero share has no logarithm, so each log value gets an offset fitted on the library: 1 % of
the column's median (at least :data:`MIN_OFFSET`), kept with the statistics (``log_offset``), so
every process transforms the same way. A row that lacks any band share (a streaming-only
fingerprint, a partial query) gets NaN for all seven, i.e. "missing": standardized to 0.

Pure numpy over ``(n, 25)`` arrays in ``BATCH_FIELDS`` order, NaN = missing; no statistics of
its own beyond the offsets.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from xpstore.model.records import BATCH_FIELDS

__all__ = [
    "BAND_NAMES",
    "LOG_NAMES",
    "MIN_OFFSET",
    "OFFSET_FRACTION",
    "fit_log_offsets",
    "log_ratio",
]

FloatArray = npt.NDArray[np.float64]

BAND_NAMES: Final[tuple[str, ...]] = tuple(n for n in BATCH_FIELDS if n.endswith("_pct"))
"""The seven band shares: centred log-ratio."""
LOG_NAMES: Final[tuple[str, ...]] = ("spectral_flatness",)
"""Plain log."""
OFFSET_FRACTION: Final = 0.01
"""A log value's offset: this share of the column's library median."""
MIN_OFFSET: Final = 1e-6

_BANDS: Final = np.array([BATCH_FIELDS.index(n) for n in BAND_NAMES])
_LOGS: Final = np.array([BATCH_FIELDS.index(n) for n in LOG_NAMES])
_LOGGED: Final = np.concatenate([_BANDS, _LOGS])


def fit_log_offsets(values: npt.ArrayLike) -> FloatArray:
    """Per-dimension offsets (25, ``BATCH_FIELDS`` order): 0 for values not logged, else
    ``max(MIN_OFFSET, OFFSET_FRACTION * median)`` of the column's present values."""
    arr = np.asarray(values, dtype=np.float64)
    out = np.zeros(arr.shape[1])
    for j in _LOGGED.tolist():
        col = arr[:, j]
        col = col[~np.isnan(col)]
        median = float(np.median(col)) if col.size else 0.0
        out[j] = max(MIN_OFFSET, OFFSET_FRACTION * max(median, 0.0))
    return out


def log_ratio(values: npt.ArrayLike, offsets: npt.ArrayLike) -> FloatArray:
    """The transformed copy of ``values`` ``(n, 25)``: clr of the band shares, log flatness.

    Negative inputs (possible only in a hand-made query) are clamped to 0 before the log. A row
    missing any band share gets NaN for all seven.
    """
    arr = np.array(values, dtype=np.float64, copy=True)
    off = np.asarray(offsets, dtype=np.float64)
    logs = np.log(np.maximum(arr[:, _LOGGED], 0.0) + off[_LOGGED])
    nb = _BANDS.shape[0]
    bands = logs[:, :nb]
    with np.errstate(invalid="ignore"):
        arr[:, _BANDS] = bands - bands.mean(axis=1, keepdims=True)  # NaN row stays NaN
    arr[:, _LOGS] = logs[:, nb:]
    return arr


def log_ratio_columns(columns: FloatArray, offsets: npt.ArrayLike) -> None:
    """:func:`log_ratio` in place on a ``(25, n)`` array of columns (one contiguous row per
    dimension): only the eight logged columns are touched, no copy of the whole matrix (the
    statistics fit of a million rows)."""
    off = np.asarray(offsets, dtype=np.float64)
    for j in _LOGGED.tolist():
        col = columns[j]
        np.maximum(col, 0.0, out=col)
        col += off[j]
        np.log(col, out=col)
    bands = columns[_BANDS[0] : _BANDS[-1] + 1]
    if bands.shape[0] != _BANDS.shape[0]:  # the band shares are adjacent in BATCH_FIELDS
        raise AssertionError("band columns are not contiguous")
    with np.errstate(invalid="ignore"):
        bands -= bands.mean(axis=0)
