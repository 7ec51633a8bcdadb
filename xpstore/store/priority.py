"""Priority inputs (the compact columnar form) and the priority model (DESIGN §6, docs/sampling.md).

Every sampleable record has a 40-byte row of *priority inputs* in the LMDB table ``prio``,
written in the same transaction as the record, so that opening a store rebuilds the sampling
trees from arrays (``np.frombuffer`` over the table's values, which repeat the id so that only
values need reading) instead of decoding every record::

    id u64 | ts f64 | confidence f32 | |reward| f32 | explicit priority f32 (NaN: none)
    | retrieval_count u32 | success_count u32 | kind code u8 | 3 bytes padding    (little-endian)

Per kind: a prediction's ``confidence`` and ``|reward|`` (0 while unknown); a query metric's
``accuracy`` stands in for confidence and its reward is 0; a fingerprint's confidence is the mean
of its streaming confidences (1.0 for a batch-only fingerprint) and its reward is 0.

The model (all knobs in ``StoreConfig``, validated there)::

    age_term = 0.5 ** (max(0, t_ref - ts) / priority_age_half_life_s)
    base     = w_c * (1 - confidence) + w_r * min(|reward|, 1) + w_a * age_term
    rate     = (success_count + 1) / (retrieval_count + 2)          (Laplace-smoothed)
    value    = 1 + priority_value_weight * (2 * rate - 1)
    p        = max(priority_floor, base * value)
    p        = max(p, new_item_priority) while retrieval_count == 0   (never sampled)
    p        = the explicit priority instead, when ``update_priorities`` set one (final)

``t_ref`` is the newest ``ts`` in the store when the priorities were last refreshed (data time,
not the wall clock, so a seeded run is reproducible). The defaults are DESIGN's:
``max(0.01, 0.4*(1 - confidence) + 0.4*|reward| + 0.2*age_term)``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from xpstore.store.codec import KIND_CODES
from xpstore.store.records import Fingerprint, PredictionOutcome, QueryMetric, Record, kind_of

__all__ = ["INPUTS", "INPUT_DTYPE", "PriorityModel", "inputs_for", "inputs_from_map"]

INPUTS: Final = struct.Struct("<QdfffIIB3x")
INPUT_DTYPE: Final = np.dtype(
    [("id", "<u8"), ("ts", "<f8"), ("conf", "<f4"), ("absreward", "<f4"), ("override", "<f4"),
     ("rc", "<u4"), ("sc", "<u4"), ("kind", "u1"), ("pad", "V3")]
)  # fmt: skip
assert INPUT_DTYPE.itemsize == INPUTS.size == 40
_U32: Final = (1 << 32) - 1


def _confidence_and_reward(record: Record) -> tuple[float, float]:
    if type(record) is PredictionOutcome:
        reward = record.reward
        return record.confidence, abs(reward) if reward is not None else 0.0
    if type(record) is QueryMetric:
        return record.accuracy, 0.0
    assert type(record) is Fingerprint
    s = record.streaming
    if s is None or not s.confidence:
        return 1.0, 0.0
    return math.fsum(s.confidence.values()) / len(s.confidence), 0.0


def inputs_for(
    record: Record,
    rid: int,
    ts: float,
    rc: int = 0,
    sc: int = 0,
    override: float | None = None,
) -> bytes:
    """The 40-byte priority-input row of record ``rid`` with these counters."""
    conf, reward = _confidence_and_reward(record)
    kind = KIND_CODES[kind_of(record)]
    return INPUTS.pack(
        rid, ts, conf, min(reward, 3.0e38), math.nan if override is None else override,
        min(rc, _U32), min(sc, _U32), kind,
    )  # fmt: skip


def inputs_from_map(
    kind: str, m: dict[str, Any], rid: int, ts: float, rc: int, sc: int, override: float | None
) -> bytes:
    """:func:`inputs_for` from an encoded record map (many-id operations build no model)."""
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


@dataclass(frozen=True)
class PriorityModel:
    """The formula of the module doc, vectorized over input columns."""

    w_confidence: float = 0.4
    w_reward: float = 0.4
    w_age: float = 0.2
    floor: float = 0.01
    age_half_life_s: float = 7 * 86400.0
    value_weight: float = 0.5
    new_item_priority: float = 1.0
    alpha: float = 0.6

    def priorities(self, cols: npt.NDArray[Any], t_ref: float) -> npt.NDArray[np.float64]:
        """``p`` for each input row (before ``** alpha``)."""
        age = np.maximum(0.0, t_ref - cols["ts"])
        age_term = np.exp2(-age / self.age_half_life_s)
        conf = cols["conf"].astype(np.float64)
        reward = np.minimum(cols["absreward"].astype(np.float64), 1.0)
        base = self.w_confidence * (1.0 - conf) + self.w_reward * reward + self.w_age * age_term
        rc = cols["rc"].astype(np.float64)
        rate = (cols["sc"].astype(np.float64) + 1.0) / (rc + 2.0)
        p = np.maximum(self.floor, base * (1.0 + self.value_weight * (2.0 * rate - 1.0)))
        p = np.where(rc == 0, np.maximum(p, self.new_item_priority), p)
        override = cols["override"].astype(np.float64)
        return np.where(np.isnan(override), p, override)

    def weights(self, cols: npt.NDArray[Any], t_ref: float) -> npt.NDArray[np.float64]:
        """What the sum-tree stores: ``p ** alpha``."""
        return np.power(self.priorities(cols, t_ref), self.alpha)
