"""The priority model (DESIGN §6, docs/sampling.md): priority inputs -> priorities.

The inputs are the 40-byte rows of :mod:`xpstore.model.priority_rows` (one per sampleable
record, in the LMDB table ``prio``).

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

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["PriorityModel"]


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
