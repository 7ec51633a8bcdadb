"""The preset predictor's model (docs/learning.md): feature conditions, affinity rules, the
listener's habits, and the blended score.

    score(label) = w_user · P_user(label) + (1 - w_user) · A(features, label)

``P_user`` is the listener's recency-weighted, smoothed distribution of actual choices;
``A`` is the mean affinity of the track's active feature conditions for each label, normalized
over the labels so that both terms are distributions. Plain dicts and floats: ``predict`` runs
on every track a player opens, so it must stay in the tens of microseconds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from xpstore.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_RULES",
    "FEATURES",
    "Active",
    "AffinityTable",
    "Habits",
    "active",
    "blend",
    "conditions",
    "default_affinities",
    "weights_of",
]

FEATURES: Final[tuple[str, ...]] = (
    "energy", "brightness", "dynamics", "vocal_presence", "tempo_energy"
)  # fmt: skip
"""The audio features a prediction uses (``PredictionOutcome.audio_features``, each in [0, 1])."""

DEFAULT_LABELS: Final[tuple[str, ...]] = ("adaptive", "gentle", "warm", "bright", "punchy", "live")
"""Auralis's mastering presets; any label set works (labels seen in outcomes join it)."""

DEFAULT_RULES: Final[dict[str, str]] = {
    "high_energy": "punchy",
    "low_energy": "gentle",
    "high_brightness": "bright",
    "low_brightness": "warm",
    "high_dynamics": "live",
    "low_dynamics": "punchy",
    "high_vocal_presence": "warm",
    "low_vocal_presence": "adaptive",
    "high_tempo_energy": "punchy",
    "low_tempo_energy": "gentle",
}
"""Condition -> the label practitioners' hard-coded rules favour ("high energy -> punchy")."""

SHARPNESS: Final = 4
"""Exponent of a condition's strength in its share of A (4: the feature furthest from neutral
dominates, as in listeners' choices; measured in docs/learning.md)."""

RULE_AFFINITY: Final = 0.8
"""Affinity of a rule's label for its condition; every other label starts at OTHER_AFFINITY."""
OTHER_AFFINITY: Final = 0.2


Active = tuple[tuple[str, float], ...]
"""Active conditions with their strength (how far past 0.5 the value is), strongest first."""


def active(features: Mapping[str, float] | None, high: float = 0.6, low: float = 0.4) -> Active:
    """The active conditions, ``high_<f>`` when the value > ``high`` and ``low_<f>`` when <
    ``low``, each with its strength ``|value - 0.5|``, strongest first.

    Raises InvalidArgumentError naming a value that is not a number in [0, 1].
    """
    if not features:
        return ()
    out = []
    for name, value in features.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            0.0 <= value <= 1.0
        ):
            raise InvalidArgumentError(
                f"audio_features.{name} must be a number in [0, 1], got {value!r}",
                field=f"audio_features.{name}",
            )
        if name not in FEATURES:
            continue  # other features are stored, not used by the rules
        if value > high:
            out.append((f"high_{name}", value - 0.5))
        elif value < low:
            out.append((f"low_{name}", 0.5 - value))
    out.sort(key=lambda c: -c[1])
    return tuple(out)


def conditions(
    features: Mapping[str, float] | None, high: float = 0.6, low: float = 0.4
) -> tuple[str, ...]:
    """The names of the active conditions (see :func:`active`)."""
    return tuple(c for c, _s in active(features, high, low))


def weights_of(conds: Active) -> list[float]:
    """How much each active condition counts in A: its strength to the power SHARPNESS,
    normalized (the feature furthest from neutral dominates)."""
    sq = [s**SHARPNESS for _c, s in conds]
    total = sum(sq)
    return [x / total for x in sq] if total > 0 else [1.0 / len(conds)] * len(conds)


def default_affinities(labels: Iterable[str]) -> dict[str, dict[str, float]]:
    """The documented default rules as a full table: condition -> label -> affinity."""
    names = list(labels)
    return {
        cond: {lab: RULE_AFFINITY if lab == favoured else OTHER_AFFINITY for lab in names}
        for cond, favoured in DEFAULT_RULES.items()
    }


@dataclass
class AffinityTable:
    """condition -> label -> affinity in [0, 1]; missing cells read as OTHER_AFFINITY."""

    cells: dict[str, dict[str, float]] = field(default_factory=dict)

    def get(self, cond: str, label: str) -> float:
        row = self.cells.get(cond)
        if row is None:
            return OTHER_AFFINITY
        return row.get(label, OTHER_AFFINITY)

    def set(self, cond: str, label: str, value: float) -> None:
        self.cells.setdefault(cond, {})[label] = value

    def distribution(self, conds: Active, labels: Sequence[str]) -> dict[str, float]:
        """A(features, ·): the strength-weighted mean affinity of the active conditions,
        normalized over labels (uniform when no condition is active)."""
        n = len(labels)
        if not conds:
            return dict.fromkeys(labels, 1.0 / n)
        raw = dict.fromkeys(labels, 0.0)
        cells = self.cells
        for (c, _s), wt in zip(conds, weights_of(conds), strict=True):
            row = cells.get(c)
            for lab in labels:
                raw[lab] += wt * (OTHER_AFFINITY if row is None else row.get(lab, OTHER_AFFINITY))
        s = sum(raw.values())
        if s <= 0:
            return dict.fromkeys(labels, 1.0 / n)
        return {lab: v / s for lab, v in raw.items()}


@dataclass
class Habits:
    """One listener's recency-weighted choice counts: each new choice multiplies the old counts
    by ``decay`` (so about ``1/(1-decay)`` recent choices carry the weight) and adds 1."""

    decay: float
    counts: dict[str, float] = field(default_factory=dict)
    n: int = 0  # resolved outcomes seen (not decayed)

    def add(self, label: str) -> None:
        d = self.decay
        for key in self.counts:
            self.counts[key] *= d
        self.counts[label] = self.counts.get(label, 0.0) + 1.0
        self.n += 1

    def distribution(
        self, labels: Sequence[str], prior: Mapping[str, float], strength: float
    ) -> dict[str, float]:
        """P_user: the decayed counts smoothed toward ``prior`` with ``strength`` pseudo-counts."""
        total = sum(self.counts.values()) + strength
        counts = self.counts
        return {lab: (counts.get(lab, 0.0) + strength * prior[lab]) / total for lab in labels}


def blend(
    user: Mapping[str, float], audio: Mapping[str, float], w_user: float
) -> dict[str, float]:
    """score(label) = w·P_user + (1 - w)·A."""
    w_audio = 1.0 - w_user
    return {lab: w_user * p + w_audio * audio[lab] for lab, p in user.items()}


def argmax(scores: Mapping[str, float]) -> tuple[str, float]:
    """The best label and its score; ties go to the label listed first (deterministic)."""
    best, top = "", -math.inf
    for lab, v in scores.items():
        if v > top:
            best, top = lab, v
    return best, top
