"""Priority inputs: the 40-byte columnar row every sampleable record has (docs/sampling.md).

The row is written to the LMDB table ``prio`` in the same transaction as the record, so that
opening a store rebuilds the sampling trees from arrays (``np.frombuffer`` over the table's
values, which repeat the id so that only values need reading) instead of decoding every record::

    id u64 | ts f64 | confidence f32 | |reward| f32 | explicit priority f32 (NaN: none)
    | retrieval_count u32 | success_count u32 | kind code u8 | 3 bytes padding    (little-endian)

Per kind: a prediction's ``confidence`` and ``|reward|`` (0 while unknown); a query metric's
``accuracy`` stands in for confidence and its reward is 0; a fingerprint's confidence is the mean
of its streaming confidences (1.0 for a batch-only fingerprint) and its reward is 0.

It is part of the vocabulary (``model/``) because deriving an operation's effect computes it;
the model that turns rows into priorities is :mod:`xpstore.sampling.priority`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from xpstore.model.codec import KIND_CODES
from xpstore.model.records import (
    SAMPLEABLE_KINDS,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    kind_of,
)

__all__ = [
    "INPUTS", "INPUT_DTYPE", "fingerprint_confidence", "fingerprint_inputs", "inputs_for",
    "inputs_from_map", "new_inputs",
]  # fmt: skip

INPUTS: Final = struct.Struct("<QdfffIIB3x")
INPUT_DTYPE: Final = np.dtype(
    [("id", "<u8"), ("ts", "<f8"), ("conf", "<f4"), ("absreward", "<f4"), ("override", "<f4"),
     ("rc", "<u4"), ("sc", "<u4"), ("kind", "u1"), ("pad", "V3")]
)  # fmt: skip
assert INPUT_DTYPE.itemsize == INPUTS.size == 40
_U32: Final = (1 << 32) - 1
_PREDICTION: Final = KIND_CODES["prediction"]
_SAMPLEABLE: Final = frozenset(SAMPLEABLE_KINDS)


def _confidence_and_reward(record: Record) -> tuple[float, float]:
    if type(record) is PredictionOutcome:
        reward = record.reward
        return record.confidence, abs(reward) if reward is not None else 0.0
    if type(record) is QueryMetric:
        return record.accuracy, 0.0
    assert type(record) is Fingerprint
    return fingerprint_confidence(record), 0.0


def fingerprint_confidence(record: Fingerprint) -> float:
    """A fingerprint's priority confidence: the mean of its streaming confidences (1.0 without
    any)."""
    s = record.streaming
    if s is None or not s.confidence:
        return 1.0
    return math.fsum(s.confidence.values()) / len(s.confidence)


def inputs_for(
    record: Record,
    rid: int,
    ts: float,
    rc: int = 0,
    sc: int = 0,
    override: float | None = None,
) -> bytes | None:
    """The 40-byte priority-input row of record ``rid`` with these counters (None for a kind
    that is not sampled: a decision)."""
    if type(record) is PredictionOutcome and not rc and not sc and override is None:
        # the most common new record, packed without the generic path's lookups and clamps
        reward = record.reward
        return INPUTS.pack(rid, ts, record.confidence,
                           0.0 if reward is None else min(abs(reward), 3.0e38), math.nan, 0, 0,
                           _PREDICTION)  # fmt: skip
    name = kind_of(record)
    if name not in SAMPLEABLE_KINDS:
        return None
    conf, reward = _confidence_and_reward(record)
    kind = KIND_CODES[name]
    return INPUTS.pack(
        rid, ts, conf, min(reward, 3.0e38), math.nan if override is None else override,
        min(rc, _U32), min(sc, _U32), kind,
    )  # fmt: skip


def inputs_from_map(
    kind: str, m: dict[str, Any], rid: int, ts: float, rc: int, sc: int, override: float | None
) -> bytes | None:
    """:func:`inputs_for` from an encoded record map (many-id operations build no model)."""
    if kind not in SAMPLEABLE_KINDS:
        return None
    if kind == "prediction":
        reward = m.get("reward")
        conf, r = float(m["confidence"]), abs(float(reward)) if reward is not None else 0.0
    elif kind == "query_metric":
        conf, r = float(m.get("accuracy", 1.0)), 0.0
    else:
        streaming = m.get("streaming")
        confs = streaming[1] if streaming else None
        conf, r = (math.fsum(confs) / len(confs) if confs else 1.0), 0.0
    return INPUTS.pack(
        rid, ts, conf, min(r, 3.0e38), math.nan if override is None else override,
        min(rc, _U32), min(sc, _U32), KIND_CODES[kind],
    )  # fmt: skip




def new_inputs(
    first_lsn: int,
    kinds: Sequence[str],
    ts: Sequence[float],
    conf: Sequence[float],
    reward: Sequence[float],
) -> list[bytes | None]:
    """:func:`inputs_for` of consecutive new records (ids from ``first_lsn``, no counters) in
    columns: the same bytes, row for row (None for a decision). ``kinds``: each record's kind
    name; ``ts``: each record's ts (the store filled them in); ``conf`` and ``reward``: each
    record's priority confidence and capped absolute reward (0.0 for a decision)."""
    n = len(kinds)
    arr = np.zeros(n, dtype=INPUT_DTYPE)
    arr["id"] = np.arange(first_lsn, first_lsn + n, dtype=np.uint64)
    arr["ts"] = ts
    arr["conf"] = conf
    arr["absreward"] = reward
    arr["override"] = math.nan
    arr["kind"] = [KIND_CODES[k] for k in kinds]
    raw = arr.tobytes()
    size = INPUTS.size
    out: list[bytes | None] = [raw[i : i + size] for i in range(0, n * size, size)]
    if not _SAMPLEABLE.issuperset(kinds):
        for i, kind in enumerate(kinds):
            if kind not in _SAMPLEABLE:
                out[i] = None
    return out


def fingerprint_inputs(
    first_lsn: int, ts: npt.NDArray[np.float64], confidence: npt.NDArray[np.float64] | None
) -> list[bytes]:
    """:func:`inputs_for` of consecutive new fingerprints (ids from ``first_lsn``), in columns:
    the same bytes, row for row (``confidence``: the streaming confidences, None without)."""
    n = ts.shape[0]
    arr = np.zeros(n, dtype=INPUT_DTYPE)
    arr["id"] = np.arange(first_lsn, first_lsn + n, dtype=np.uint64)
    arr["ts"] = ts
    if confidence is None:
        arr["conf"] = 1.0
    else:  # math.fsum per row, exactly as inputs_for averages them
        width = confidence.shape[1]
        arr["conf"] = [math.fsum(row) / width for row in confidence.tolist()]
    arr["override"] = math.nan
    arr["kind"] = KIND_CODES["fingerprint"]
    raw = arr.tobytes()
    size = INPUTS.size
    return [raw[i : i + size] for i in range(0, n * size, size)]
