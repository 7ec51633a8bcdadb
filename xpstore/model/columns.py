"""Fingerprints in columns: the bulk path's input, validated with numpy (``put_fingerprints``).

A batch of N fingerprints arrives as arrays: the 25 batch values as an ``(N, 25)`` matrix (or a
mapping of name -> column), optionally the streaming values and confidences as ``(N, 13)`` or
``(N, 10)`` matrices, an ``(N, D)`` embedding matrix, and per-row metadata. Validation is
vectorized: one finiteness and range check per column against the *same* bounds the pydantic
models enforce (read from :class:`~xpstore.model.records.BatchFingerprint`'s field metadata, so
the two cannot disagree), and the error names the row and the field of the first bad value in
row order, as ``put_many`` names ``records[i]``. Nothing here builds a model per row.

Column order: ``BATCH_FIELDS`` (DESIGN §3's table order) unless ``names`` gives the matrix's own
order; a mapping is keyed by name. Streaming columns: ``STREAMING_FIELDS`` (or the 10 without
the harmonic three) unless ``streaming_names`` says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from annotated_types import Ge, Gt, Le, Lt

from xpstore.errors import InvalidRecordError
from xpstore.model.records import (
    BATCH_FIELDS,
    EMBEDDING_MAX_DIM,
    INT64_MAX,
    METADATA_MAX_KEY_CHARS,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    TS_MAX,
    BatchFingerprint,
)

__all__ = ["FingerprintColumns", "fingerprint_columns"]

F64 = npt.NDArray[np.float64]


def _bounds(name: str) -> tuple[float, bool, float, bool]:
    """(low, low inclusive, high, high inclusive) of batch field ``name``, from the model."""
    low, low_inc, high, high_inc = -np.inf, True, np.inf, True
    for m in BatchFingerprint.model_fields[name].metadata:
        if isinstance(m, Ge):
            low, low_inc = float(m.ge), True  # type: ignore[arg-type]
        elif isinstance(m, Gt):
            low, low_inc = float(m.gt), False  # type: ignore[arg-type]
        elif isinstance(m, Le):
            high, high_inc = float(m.le), True  # type: ignore[arg-type]
        elif isinstance(m, Lt):
            high, high_inc = float(m.lt), False  # type: ignore[arg-type]
    return low, low_inc, high, high_inc


_BOUNDS: Final[dict[str, tuple[float, bool, float, bool]]] = {n: _bounds(n) for n in BATCH_FIELDS}


@dataclass(frozen=True)
class FingerprintColumns:
    """N validated fingerprints in columns (every array C-contiguous float64, rows aligned)."""

    track_ids: list[str]
    batch: F64 | None  # (N, 25), BATCH_FIELDS order
    streaming: F64 | None  # (N, 13 or 10), STREAMING_FIELDS(_NO_HARMONIC) order
    confidence: F64 | None  # same shape as streaming
    chunk_counts: list[int] | None  # with streaming
    embeddings: F64 | None  # (N, D)
    metadata: list[dict[str, str] | None] | None
    algorithm_version: str | None
    ts: F64  # (N,)

    def __len__(self) -> int:
        return len(self.track_ids)

    @property
    def streaming_names(self) -> tuple[str, ...]:
        assert self.streaming is not None
        n = self.streaming.shape[1]
        return STREAMING_FIELDS if n == len(STREAMING_FIELDS) else STREAMING_FIELDS_NO_HARMONIC

    def audio(self) -> F64:
        """The (N, 25) audio values by BATCH_FIELDS, NaN where missing (the index's rows)."""
        if self.batch is not None:
            return self.batch
        out = np.full((len(self), len(BATCH_FIELDS)), np.nan)
        if self.streaming is not None:
            for j, name in enumerate(self.streaming_names):
                out[:, BATCH_FIELDS.index(name)] = self.streaming[:, j]
        return out


def _bad(row: int, field: str, message: str) -> InvalidRecordError:
    return InvalidRecordError(f"records[{row}].{field}: {message}", field=field)


def _matrix(value: Any, n: int, what: str, names: Sequence[str] | None,
            canonical: Sequence[Sequence[str]]) -> tuple[F64, tuple[str, ...]]:  # fmt: skip
    """``value`` as an (n, len(names)) float64 matrix in a canonical column order."""
    if isinstance(value, Mapping):
        if names is not None:
            raise InvalidRecordError(
                f"{what}: give column names either as a mapping's keys or as names=, not both",
                field=what,
            )
        keys = [str(k) for k in value]
        order = _canonical(keys, what, canonical)
        cols = []
        for name in order:
            col = _as_float(value[name], f"{what}.{name}")
            if col.ndim != 1 or col.shape[0] != n:
                raise InvalidRecordError(
                    f"{what}.{name}: expected {n} values (one per track id), got shape "
                    f"{col.shape}",
                    field=f"{what}.{name}",
                )
            cols.append(col)
        return np.ascontiguousarray(np.column_stack(cols)), order
    arr = _as_float(value, what)
    if arr.ndim != 2 or arr.shape[0] != n:
        raise InvalidRecordError(
            f"{what}: expected a matrix of {n} rows (one per track id), got shape {arr.shape}",
            field=what,
        )
    if names is None:
        for names_in_order in canonical:
            if arr.shape[1] == len(names_in_order):
                return np.ascontiguousarray(arr), tuple(names_in_order)
        sizes = " or ".join(str(len(c)) for c in canonical)
        raise InvalidRecordError(
            f"{what}: expected {sizes} columns, got {arr.shape[1]}", field=what
        )
    given = [str(x) for x in names]
    if len(given) != arr.shape[1]:
        raise InvalidRecordError(
            f"{what}: {len(given)} names for {arr.shape[1]} columns", field=what
        )
    order = _canonical(given, what, canonical)
    index = [given.index(name) for name in order]
    return np.ascontiguousarray(arr[:, index]), order


def _canonical(keys: Sequence[str], what: str,
               canonical: Sequence[Sequence[str]]) -> tuple[str, ...]:  # fmt: skip
    """The canonical order matching the set ``keys``; an error naming the first culprit."""
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise InvalidRecordError(f"{what}: column {k!r} given twice", field=f"{what}.{k}")
        seen.add(k)
    for order in canonical:
        if seen == set(order):
            return tuple(order)
    known = set(canonical[0])
    unknown = [k for k in keys if k not in known]
    if unknown:
        return _raise(what, unknown[0], f"unknown {what} value {unknown[0]!r}")
    best = max(canonical, key=lambda order: len(seen & set(order)))
    missing = [name for name in best if name not in seen]
    return _raise(what, missing[0], f"missing {what} value {missing[0]!r}")


def _raise(what: str, name: str, message: str) -> tuple[str, ...]:
    raise InvalidRecordError(f"{what}: {message}", field=f"{what}.{name}")


def _as_float(value: Any, what: str) -> F64:
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise InvalidRecordError(f"{what}: expected numbers, got dtype {arr.dtype}", field=what)
    return arr.astype(np.float64, copy=False)


def _first_bad(bad: npt.NDArray[np.bool_]) -> tuple[int, int] | None:
    """(row, column) of the first True in row order, or None."""
    if not bad.any():
        return None
    flat = int(np.argmax(bad.ravel()))
    return divmod(flat, bad.shape[1]) if bad.ndim == 2 else (flat, 0)


def _check_batch(m: F64) -> None:
    finite = np.isfinite(m)
    bad = ~finite
    for j, name in enumerate(BATCH_FIELDS):
        low, low_inc, high, high_inc = _BOUNDS[name]
        col = m[:, j]
        if low > -np.inf:
            bad[:, j] |= (col < low) if low_inc else (col <= low)
        if high < np.inf:
            bad[:, j] |= (col > high) if high_inc else (col >= high)
    hit = _first_bad(bad)
    if hit is not None:
        row, j = hit
        name = BATCH_FIELDS[j]
        raise _bad(row, f"batch.{name}", _range_message(name, float(m[row, j])))


def _range_message(name: str, value: float) -> str:
    if not np.isfinite(value):
        return f"must be a finite number (got {value!r})"
    low, low_inc, high, high_inc = _BOUNDS[name]
    parts = []
    if low > -np.inf:
        parts.append(f"{'>=' if low_inc else '>'} {low:g}")
    if high < np.inf:
        parts.append(f"{'<=' if high_inc else '<'} {high:g}")
    return f"must be {' and '.join(parts)} (got {value!r})"


def _check_streaming(values: F64, conf: F64, names: tuple[str, ...]) -> None:
    bad = ~np.isfinite(values)
    for j, name in enumerate(names):
        low, low_inc, high, high_inc = _BOUNDS[name]
        col = values[:, j]
        if low > -np.inf:
            bad[:, j] |= (col < low) if low_inc else (col <= low)
        if high < np.inf:
            bad[:, j] |= (col > high) if high_inc else (col >= high)
    hit = _first_bad(bad)
    if hit is not None:
        row, j = hit
        raise _bad(row, f"streaming.values.{names[j]}",
                   _range_message(names[j], float(values[row, j])))  # fmt: skip
    cbad = ~np.isfinite(conf) | (conf < 0.0) | (conf > 1.0)
    hit = _first_bad(cbad)
    if hit is not None:
        row, j = hit
        raise _bad(row, f"streaming.confidence.{names[j]}",
                   f"must be in [0, 1] (got {float(conf[row, j])!r})")  # fmt: skip


def _check_metadata(metadata: Sequence[Any], n: int) -> list[dict[str, str] | None]:
    if isinstance(metadata, (str, bytes, Mapping)) or len(metadata) != n:
        raise InvalidRecordError(
            f"metadata: expected a list of {n} mappings or None (one per track id)",
            field="metadata",
        )
    out: list[dict[str, str] | None] = []
    for row, given in enumerate(metadata):
        if given is None:
            out.append(None)
            continue
        m = given
        if type(m) is not dict:
            if not isinstance(m, Mapping):
                raise _bad(row, "metadata", f"expected a mapping or None, got {type(m).__name__}")
            m = dict(m)
        if len(m) > METADATA_MAX_KEYS:
            raise _bad(row, "metadata", f"at most {METADATA_MAX_KEYS} keys, got {len(m)}")
        for key, value in m.items():
            if (type(key) is not str or type(value) is not str or not key
                    or len(key) > METADATA_MAX_KEY_CHARS or len(value) > METADATA_MAX_VALUE_CHARS):
                _metadata_error(row, key, value)
        out.append(m)
    return out


def _metadata_error(row: int, key: Any, value: Any) -> None:
    if type(key) is not str or not 1 <= len(key) <= METADATA_MAX_KEY_CHARS:
        raise _bad(row, "metadata", f"keys must be strings of 1 to {METADATA_MAX_KEY_CHARS} "
                                    f"characters, got {key!r}")  # fmt: skip
    raise _bad(row, f"metadata.{key}",
               f"must be a string of at most {METADATA_MAX_VALUE_CHARS} characters")


def fingerprint_columns(
    track_ids: Sequence[str],
    batch: Any = None,
    *,
    names: Sequence[str] | None = None,
    streaming: Any = None,
    confidence: Any = None,
    streaming_names: Sequence[str] | None = None,
    chunk_counts: Any = None,
    embeddings: Any = None,
    metadata: Sequence[Mapping[str, str] | None] | None = None,
    algorithm_version: str | int | None = None,
    ts: Any = None,
    embedding_dim: int | None = None,
) -> FingerprintColumns:
    """Validate a columnar batch; InvalidRecordError names ``records[row].field`` of the first
    bad value (row order), or the argument when its shape is wrong. See the module doc."""
    if isinstance(track_ids, (str, bytes)) or not isinstance(track_ids, Sequence | np.ndarray):
        raise InvalidRecordError("track_ids: expected a sequence of strings", field="track_id")
    tids = list(track_ids)
    n = len(tids)
    plain = set(map(type, tids)) == {str} and all(tids)  # the usual case, checked in C
    for row, t in enumerate(() if plain else tids):
        if type(t) is not str or not t:
            if isinstance(t, str) and t:
                tids[row] = str(t)  # a str subclass (numpy str_) as a plain str
                continue
            raise _bad(row, "track_id", f"must be a non-empty string, got {t!r}")
    if batch is None and streaming is None:
        raise InvalidRecordError(
            "a fingerprint needs batch or streaming values (or both)", field="batch"
        )
    bm: F64 | None = None
    if batch is not None:
        bm, _ = _matrix(batch, n, "batch", names, (BATCH_FIELDS,))
        _check_batch(bm)
    sv = sc = None
    counts: list[int] | None = None
    if streaming is not None:
        canonical = (STREAMING_FIELDS, STREAMING_FIELDS_NO_HARMONIC)
        sv, order = _matrix(streaming, n, "streaming", streaming_names, canonical)
        if confidence is None:
            raise InvalidRecordError(
                "streaming: confidence= is needed with streaming values", field="confidence"
            )
        cnames = None if isinstance(confidence, Mapping) else (
            order if streaming_names is not None else None)  # fmt: skip
        sc, corder = _matrix(confidence, n, "confidence", cnames, canonical)
        if corder != order:
            raise InvalidRecordError(
                "confidence: its columns must name the same values as streaming's",
                field="confidence",
            )
        _check_streaming(sv, sc, order)
        counts = _check_counts(chunk_counts, n)
    elif confidence is not None or chunk_counts is not None:
        raise InvalidRecordError(
            "confidence and chunk_counts go with streaming values", field="streaming"
        )
    emb: F64 | None = None
    if embeddings is not None:
        emb = _as_float(embeddings, "embedding")
        if emb.ndim != 2 or emb.shape[0] != n:
            raise InvalidRecordError(
                f"embedding: expected a matrix of {n} rows, got shape {emb.shape}",
                field="embedding",
            )
        dim = emb.shape[1]
        if not 1 <= dim <= EMBEDDING_MAX_DIM:
            raise InvalidRecordError(
                f"embedding: dimension must be 1 to {EMBEDDING_MAX_DIM}, got {dim}",
                field="embedding",
            )
        if embedding_dim is not None and dim != embedding_dim:
            raise InvalidRecordError(
                f"embedding: dimension {dim}, this store's embeddings have dimension "
                f"{embedding_dim}",
                field="embedding",
            )
        hit = _first_bad(~np.isfinite(emb))
        if hit is not None:
            raise _bad(hit[0], "embedding", f"must be finite (got {emb[hit]!r} at {hit[1]})")
        emb = np.ascontiguousarray(emb)
    meta = None if metadata is None else _check_metadata(metadata, n)
    version: str | None = None
    if algorithm_version is not None:
        if isinstance(algorithm_version, int) and not isinstance(algorithm_version, bool):
            version = str(algorithm_version)
        elif isinstance(algorithm_version, str):
            version = algorithm_version
        else:
            raise InvalidRecordError(
                f"algorithm_version: expected a string, got {type(algorithm_version).__name__}",
                field="algorithm_version",
            )
    ts_arr = _check_ts(ts, n)
    return FingerprintColumns(tids, bm, sv, sc, counts, emb, meta, version, ts_arr)


def _check_counts(chunk_counts: Any, n: int) -> list[int]:
    if chunk_counts is None:
        return [0] * n
    arr = np.asarray(chunk_counts)
    if arr.ndim == 0:
        arr = np.full(n, arr)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer) or arr.shape != (n,):
        raise InvalidRecordError(
            f"chunk_counts: expected {n} integers (or one for all rows)",
            field="streaming.chunk_count",
        )
    hit = _first_bad((arr < 0) | (arr > INT64_MAX))
    if hit is not None:
        raise _bad(hit[0], "streaming.chunk_count", f"must be >= 0 (got {int(arr[hit[0]])})")
    return [int(x) for x in arr.tolist()]


def _check_ts(ts: Any, n: int) -> F64:
    if ts is None:
        return np.full(n, time.time())
    arr = _as_float(ts, "ts")
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise InvalidRecordError(f"ts: expected {n} times (or one for all rows)", field="ts")
    hit = _first_bad(~np.isfinite(arr) | (arr < 0) | (arr >= TS_MAX))
    if hit is not None:
        raise _bad(hit[0], "ts", f"must be seconds since the epoch in [0, {TS_MAX:.0f}) "
                                 f"(got {float(arr[hit[0]])!r})")  # fmt: skip
    return np.ascontiguousarray(arr)
