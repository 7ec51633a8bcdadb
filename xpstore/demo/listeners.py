"""Simulated listeners for the learner's benchmark, tests and ``xpstore learn simulate``
(docs/learning.md): listeners whose preset choice depends on their habits and on the track's
audio features in listener-specific ways, whose taste drifts once mid-run, and who answer with
noise.

Each listener has:

- a **habit**: a preference distribution over the presets (one favourite carries most of it);
- a **follow rate**: the probability that a choice follows the habit (0.9 for habit listeners,
  0.25 for audio listeners); otherwise the choice follows the audio;
- an **audio mapping**: condition -> preset; half the listeners use the published rules
  (``xpstore.tuning.model.DEFAULT_RULES``), half a permutation of their presets (a listener who
  wants "warm" for energetic tracks), so one global rule table cannot fit everyone;
- **noise**: with this probability the choice is uniform over the presets;
- a **drift** point: from there the habit's favourite changes (taste moved); with
  ``audio_drift=True`` the audio mapping moves too, by one permutation of the presets shared by
  the whole population (a trend: what everyone wants for energetic tracks changes), which is what
  a global affinity table can follow and the replay race measures.

The audio choice takes the strongest active condition (largest distance from 0.5) through the
listener's mapping; with no active condition it falls back to the habit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from xpstore.store.store import Store
from xpstore.tuning.learner import Learner
from xpstore.tuning.model import DEFAULT_LABELS, DEFAULT_RULES, FEATURES

__all__ = ["Listener", "SimulationResult", "make_listeners", "simulate", "track_features"]


@dataclass(frozen=True)
class Listener:
    """One simulated listener (see the module docstring)."""

    user_id: str
    habit: dict[str, float]
    drifted_habit: dict[str, float]
    follow: float
    mapping: dict[str, str]
    noise: float
    drift_at: int
    drifted_mapping: dict[str, str] | None = None

    def distribution(self, features: Mapping[str, float], t: int) -> dict[str, float]:
        """The exact probability of each preset for this track at interaction ``t`` (what the
        oracle predicts from)."""
        drifted = t >= self.drift_at
        habit = self.drifted_habit if drifted else self.habit
        mapping = self.drifted_mapping if drifted and self.drifted_mapping else self.mapping
        labels = list(habit)
        audio = _audio_label(mapping, features)
        out = dict.fromkeys(labels, self.noise / len(labels))
        rest = 1.0 - self.noise
        for lab, p in habit.items():
            out[lab] += rest * (self.follow if audio is not None else 1.0) * p
        if audio is not None:
            out[audio] += rest * (1.0 - self.follow)
        return out

    def choose(self, features: Mapping[str, float], t: int, rng: np.random.Generator) -> str:
        dist = self.distribution(features, t)
        labels = list(dist)
        return labels[int(rng.choice(len(labels), p=np.array(list(dist.values()))))]


def _audio_label(mapping: Mapping[str, str], features: Mapping[str, float]) -> str | None:
    best, strength = None, 0.1  # only conditions past the 0.6 / 0.4 thresholds count
    for name in FEATURES:
        value = features.get(name)
        if value is None:
            continue
        d = abs(value - 0.5)
        if d > strength:
            cond = f"high_{name}" if value > 0.5 else f"low_{name}"
            best, strength = mapping.get(cond), d
    return best


def _habit(rng: np.random.Generator, favourite: str) -> dict[str, float]:
    labels = list(DEFAULT_LABELS)
    base = rng.dirichlet(np.ones(len(labels))) * 0.3
    out = {lab: float(b) for lab, b in zip(labels, base, strict=True)}
    out[favourite] += 0.7
    return out


def make_listeners(
    n: int, rng: np.random.Generator, interactions: int, noise: float = 0.1,
    audio_drift: bool = False,
) -> list[Listener]:  # fmt: skip
    """``n`` listeners, alternating habit-driven and audio-driven, half with permuted audio
    mappings; each drifts once, somewhere in the middle half of ``interactions`` (the audio
    mapping too with ``audio_drift``: one permutation for everyone)."""
    labels = list(DEFAULT_LABELS)
    trend = dict(zip(labels, rng.permutation(labels), strict=True)) if audio_drift else None
    out = []
    for i in range(n):
        fav, later = rng.choice(len(labels), size=2, replace=False)
        mapping = dict(DEFAULT_RULES)
        if i % 4 >= 2:  # a listener with taste of their own: presets permuted
            perm = rng.permutation(labels)
            swap = dict(zip(labels, perm, strict=True))
            mapping = {c: str(swap[lab]) for c, lab in DEFAULT_RULES.items()}
        out.append(Listener(
            user_id=f"u{i:02d}",
            habit=_habit(rng, labels[int(fav)]),
            drifted_habit=_habit(rng, labels[int(later)]),
            follow=0.9 if i % 2 == 0 else 0.25,
            mapping=mapping,
            noise=noise,
            drift_at=int(rng.integers(interactions // 4, 3 * interactions // 4 + 1)),
            drifted_mapping=None if trend is None else {
                c: str(trend[lab]) for c, lab in mapping.items()},
        ))  # fmt: skip
    return out


def track_features(rng: np.random.Generator) -> dict[str, float]:
    """A track's five audio features, each uniform in [0, 1] (rounded to 3 decimals)."""
    return {name: round(float(v), 3) for name, v in zip(FEATURES, rng.random(len(FEATURES)),
                                                        strict=True)}  # fmt: skip


@dataclass
class SimulationResult:
    """Accuracy of a policy on simulated listeners (``last`` interactions of each listener)."""

    policy: str
    accuracy_last: float
    accuracy_all: float
    ece: float | None
    interactions: int
    curve: list[float]  # accuracy per block of interactions (learning curve)


def simulate(
    store: Store,
    policy: str,
    *,
    listeners: int = 20,
    interactions: int = 5000,
    seed: int = 0,
    last: int = 1000,
    block: int = 250,
    learner: Learner | None = None,
) -> SimulationResult:
    """Run ``listeners`` x ``interactions`` predict -> record -> resolve rounds against ``store``
    (``policy="oracle"`` predicts from the simulator itself and writes nothing)."""
    rng = np.random.default_rng(seed)
    people = make_listeners(listeners, rng, interactions)
    lrn = None if policy == "oracle" else learner or Learner(store, policy=policy, seed=seed)
    hits = np.zeros((listeners, interactions), dtype=bool)
    for t in range(interactions):
        for i, person in enumerate(people):
            features = track_features(rng)
            if lrn is None:
                dist = person.distribution(features, t)
                label = max(dist, key=dist.__getitem__)
                actual = person.choose(features, t, rng)
            else:
                pred = lrn.predict(person.user_id, features, "warm_start")
                rid = lrn.record(pred)
                actual = person.choose(features, t, rng)
                lrn.resolve(rid, actual)
                label = pred.label
            hits[i, t] = label == actual
    tail = hits[:, -min(last, interactions) :]
    curve = [float(hits[:, s : s + block].mean()) for s in range(0, interactions, block)]
    ece = lrn.calibration()["ece"] if lrn is not None else None
    return SimulationResult(policy, float(tail.mean()), float(hits.mean()),
                            ece if isinstance(ece, float) else None, interactions,
                            curve)  # fmt: skip
