"""The learner's policies (docs/learning.md): ``fixed`` (the baseline), ``seed`` (the rules
practitioners published for this job) and ``default`` (ours).

A policy decides the audio term ``A`` and how weights and affinities change. It never changes
state itself: it returns ``Decision`` records, which the learner logs through the WAL and only
then applies (so the state after a crash is the state of the last acknowledged decision).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from xpstore.model.records import Decision, PredictionOutcome
from xpstore.tuning.model import (
    Active,
    AffinityTable,
    Habits,
    active,
    argmax,
    blend,
    weights_of,
)

__all__ = [
    "POLICIES", "DefaultPolicy", "FixedPolicy", "LearnerState", "Policy", "SeedPolicy", "Window"
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Window:
    """One resolved outcome as the learner keeps it: who, what was predicted and chosen, the
    active conditions, P_user as it was *before* this outcome (for counterfactual replay)."""

    user: str
    predicted: str
    actual: str
    context: str
    correct: bool
    conds: Active
    p_user: dict[str, float]
    score: float
    confidence: float
    shares: tuple[tuple[str, float], ...] = ()
    """Each active condition with its share of A (``weights_of``), computed once."""

    def __post_init__(self) -> None:
        if self.conds and not self.shares:
            shares = tuple(zip((c for c, _s in self.conds), weights_of(self.conds), strict=True))
            object.__setattr__(self, "shares", shares)


class LearnerState(Protocol):
    """What a policy reads of the learner (``xpstore.tuning.learner.Learner`` provides it)."""

    labels: list[str]
    table: AffinityTable
    high: float
    low: float
    global_weight: float
    user_weight: dict[str, float]
    habits: dict[str, Habits]
    recent: deque[Window]
    user_recent: dict[str, deque[Window]]

    def decision(
        self, action: str, target: str, old: float | None, new: float | None, reason: str,
        evidence: Mapping[str, float] | None = None, user_id: str | None = None,
    ) -> Decision: ...  # fmt: skip


class Policy:
    """``fixed``: 70/30 and the default rules, never changed (every figure's baseline)."""

    name: ClassVar[str] = "fixed"
    replays: ClassVar[bool] = False  # does learning include a prioritized replay step?

    def __init__(self, learner: LearnerState) -> None:
        self.learner = learner

    def reset_tallies(self) -> None:
        """Forget derived counters (the learner rebuilds them from the outcomes)."""

    def tally(self, win: Window) -> None:
        """A newly resolved outcome (after the learner's own tallies)."""

    def audio(self, user_id: str, conds: Active) -> dict[str, float]:
        """A(features, ·) for this listener."""
        return self.learner.table.distribution(conds, self.learner.labels)

    def learn(self) -> list[Decision]:
        """The periodic learning step's decisions (none: fixed)."""
        return []

    def replay(self, items: Sequence[tuple[PredictionOutcome, float]]) -> list[Decision]:
        """Decisions from a prioritized batch of (outcome, importance weight) (none: fixed)."""
        return []

    def loss(self, rec: PredictionOutcome) -> float:
        """The current audio model's loss on an outcome: 1 - A(actual)."""
        lrn = self.learner
        conds = active(rec.audio_features, lrn.high, lrn.low)
        dist = lrn.table.distribution(conds, lrn.labels)
        return 1.0 - dist.get(rec.actual or "", 0.0)

    def window_accuracy(
        self, wins: Sequence[Window], w_user: float, user: str | None = None
    ) -> tuple[float, float]:
        """(user-only accuracy, blended accuracy at ``w_user``) over ``wins``, replaying the
        logged outcomes counterfactually with the current audio model."""
        user_ok = blend_ok = 0
        for win in wins:
            if argmax(win.p_user)[0] == win.actual:
                user_ok += 1
            audio = self.audio(user or win.user, win.conds)
            if argmax(blend(win.p_user, audio, w_user))[0] == win.actual:
                blend_ok += 1
        n = max(1, len(wins))
        return user_ok / n, blend_ok / n


FixedPolicy = Policy


class SeedPolicy(Policy):
    """The published rules, exactly (each has a unit test in tests/test_learning.py)."""

    name: ClassVar[str] = "seed"
    MIN_OUTCOMES = 50  # a listener is evaluated once it has this many resolved outcomes
    EVAL_WINDOW = 100  # the recent window both accuracies are computed over
    LEAD = 0.05  # 5 points
    STEP = 0.05  # move the user weight 5 %
    W_MIN, W_MAX = 0.5, 0.9
    AFF_MIN_OUTCOMES = 20
    AFF_HIGH, AFF_LOW, AFF_STEP = 0.7, 0.4, 0.05
    AFF_WINDOW = 1000

    def learn(self) -> list[Decision]:
        return self.weight_decisions() + self.affinity_decisions()

    def weight_decisions(self) -> list[Decision]:
        lrn = self.learner
        out = []
        for user, wins in lrn.user_recent.items():
            if lrn.habits[user].n < self.MIN_OUTCOMES:
                continue
            recent = list(wins)[-self.EVAL_WINDOW :]
            old = lrn.user_weight.get(user, lrn.global_weight)
            user_only, enhanced = self.window_accuracy(recent, old, user)
            new = self.next_weight(old, user_only, enhanced)
            if new != old:
                lead = "leads" if enhanced > user_only else "trails"
                out.append(lrn.decision(
                    "weight", f"user_weight/{user}", old, new,
                    f"audio-enhanced accuracy {lead} user-only by "
                    f"{abs(enhanced - user_only) * 100:.1f} points",
                    {"window": float(len(recent)), "user_only": user_only,
                     "audio_enhanced": enhanced}, user_id=user,
                ))  # fmt: skip
        return out

    @classmethod
    def next_weight(cls, old: float, user_only: float, enhanced: float) -> float:
        """The published weight rule: more than 5 points either way moves 5 % that way."""
        lead = round(enhanced - user_only, 9)  # 0.55 - 0.50 is 0.05000000000000004 in floats
        if lead > cls.LEAD:
            new = old - cls.STEP
        elif -lead > cls.LEAD:
            new = old + cls.STEP
        else:
            return old
        return round(min(cls.W_MAX, max(cls.W_MIN, new)), 10)

    def affinity_decisions(self) -> list[Decision]:
        lrn = self.learner
        stats: dict[tuple[str, str], list[int]] = {}
        for win in list(lrn.recent)[-self.AFF_WINDOW :]:
            for cond, _strength in win.conds:
                cell = stats.setdefault((cond, win.predicted), [0, 0])
                cell[0] += 1
                cell[1] += 1 if win.correct else 0
        out = []
        for (cond, label), (n, hits) in sorted(stats.items()):
            old = lrn.table.get(cond, label)
            new = self.next_affinity(old, n, hits)
            if new != old:
                out.append(lrn.decision(
                    "affinity", f"affinity/{cond}/{label}", old, new,
                    f"success {hits / n:.2f} over {n} outcomes",
                    {"outcomes": float(n), "success": hits / n},
                ))  # fmt: skip
        return out

    @classmethod
    def next_affinity(cls, old: float, n: int, hits: int) -> float:
        """The published affinity rule: with >= 20 outcomes, success > 0.7 raises by 0.05 and
        < 0.4 lowers by 0.05, within [0, 1]."""
        if n < cls.AFF_MIN_OUTCOMES:
            return old
        rate = round(hits / n, 9)
        if rate > cls.AFF_HIGH:
            return round(min(1.0, old + cls.AFF_STEP), 10)
        if rate < cls.AFF_LOW:
            return round(max(0.0, old - cls.AFF_STEP), 10)
        return old


class DefaultPolicy(Policy):
    """Ours: per-listener audio affinities as Beta-Bernoulli posteriors with the learned global
    table as their prior; the global table learned by importance-weighted prioritized replay;
    per-listener weights chosen by counterfactual evaluation over a grid, shrunk toward the
    global weight chosen the same way."""

    name: ClassVar[str] = "default"
    replays: ClassVar[bool] = True
    PRIOR_STRENGTH = 5.0  # pseudo-outcomes of the global table in a listener's posterior
    DECAY = 0.995  # per resolved outcome of the listener: drift is forgotten, slowly
    GRID = tuple(i / 10 for i in range(11))
    SHRINK = 30.0  # outcomes at which a listener's own best weight counts half
    MIN_OUTCOMES = 20
    LR = 0.05  # replay step size (times the importance weight and the condition's share)
    MIN_CHANGE = 0.01  # weight changes below this are not worth a decision

    def reset_tallies(self) -> None:
        self.cond_counts: dict[str, dict[str, dict[str, float]]] = {}
        self.cond_totals: dict[str, dict[str, float]] = {}

    def tally(self, win: Window) -> None:
        counts = self.cond_counts.setdefault(win.user, {})
        totals = self.cond_totals.setdefault(win.user, {})
        d = self.DECAY
        for cond, row in counts.items():
            for lab in row:
                row[lab] *= d
            totals[cond] *= d
        if not win.conds:
            return
        for cond, wt in win.shares:
            row = counts.setdefault(cond, {})
            row[win.actual] = row.get(win.actual, 0.0) + wt
            totals[cond] = totals.get(cond, 0.0) + wt

    def audio(self, user_id: str, conds: Active) -> dict[str, float]:
        vec = self._audio_vector(user_id, conds, {})
        return dict(zip(self.learner.labels, vec.tolist(), strict=True))

    def _posterior(
        self, user_id: str, cond: str, cache: dict[tuple[str, str], npt.NDArray[np.float64]]
    ) -> npt.NDArray[np.float64]:
        """The listener's Beta-Bernoulli posterior mean per label for one condition: their
        decayed counts plus PRIOR_STRENGTH pseudo-outcomes of the global table's row."""
        got = cache.get((user_id, cond))
        if got is not None:
            return got
        labels = self.learner.labels
        prior = self.learner.table.distribution(((cond, 1.0),), labels)
        row = self.cond_counts.get(user_id, {}).get(cond, {})
        n = self.cond_totals.get(user_id, {}).get(cond, 0.0)
        k = self.PRIOR_STRENGTH
        vec = np.array([(row.get(lab, 0.0) + k * prior[lab]) / (n + k) for lab in labels])
        cache[(user_id, cond)] = vec
        return vec

    def _audio_vector(
        self, user_id: str, conds: Active, cache: dict[tuple[str, str], npt.NDArray[np.float64]]
    ) -> npt.NDArray[np.float64]:
        """A(features, ·) for one listener: the strength-weighted posteriors, normalized.
        ``cache`` holds posteriors while the tallies and the table stay as they are."""
        n = len(self.learner.labels)
        if not conds:
            return np.full(n, 1.0 / n)
        raw = np.zeros(n)
        for (cond, _s), wt in zip(conds, weights_of(conds), strict=True):
            raw += wt * self._posterior(user_id, cond, cache)
        total: float = float(raw.sum())
        return raw / total

    def learn(self) -> list[Decision]:
        lrn = self.learner
        pooled = [w for wins in lrn.user_recent.values() for w in wins]
        out = []
        g_best = lrn.global_weight
        if len(pooled) >= self.MIN_OUTCOMES:
            g_best, g_acc = self.best_weight(pooled)
            if abs(g_best - lrn.global_weight) >= self.MIN_CHANGE:
                evidence = {"outcomes": float(len(pooled)), "accuracy": g_acc}
                out.append(lrn.decision("weight", "global_weight", lrn.global_weight, g_best,
                                        "best counterfactual accuracy over the grid", evidence))
        for user, wins in lrn.user_recent.items():
            if len(wins) < self.MIN_OUTCOMES:
                continue
            best, acc = self.best_weight(list(wins), user)
            n = float(len(wins))
            new = round((n * best + self.SHRINK * g_best) / (n + self.SHRINK), 4)
            old = lrn.user_weight.get(user, lrn.global_weight)
            if abs(new - old) >= self.MIN_CHANGE:
                out.append(lrn.decision(
                    "weight", f"user_weight/{user}", old, new,
                    f"own best {best:.1f} shrunk toward the global {g_best:.2f}",
                    {"outcomes": n, "own_best": best, "accuracy": acc, "global": g_best},
                    user_id=user,
                ))  # fmt: skip
        return out

    def best_weight(self, wins: Sequence[Window], user: str | None = None) -> tuple[float, float]:
        """The grid weight with the best counterfactual accuracy (ties: the middle one)."""
        labels = self.learner.labels
        col = {lab: j for j, lab in enumerate(labels)}
        p = np.array([[w.p_user.get(lab, 0.0) for lab in labels] for w in wins])
        a = self._audio_matrix(wins, user)
        truth = np.array([col.get(w.actual, -1) for w in wins])
        scores = [float((np.argmax(g * p + (1 - g) * a, axis=1) == truth).mean())
                  for g in self.GRID]  # fmt: skip
        top = max(scores)
        best = [g for g, sc in zip(self.GRID, scores, strict=True) if sc == top]
        return best[len(best) // 2], top

    def _audio_matrix(
        self, wins: Sequence[Window], user: str | None
    ) -> npt.NDArray[np.float64]:
        """A(features, ·) of every window (rows), as :meth:`_audio_vector` computes it one at a
        time: condition shares in a matrix, times each listener's posterior matrix."""
        n_lab = len(self.learner.labels)
        out = np.full((len(wins), n_lab), 1.0 / n_lab)
        by_user: dict[str, list[int]] = {}
        for i, w in enumerate(wins):
            if w.conds:
                by_user.setdefault(user or w.user, []).append(i)
        for uid, rows in by_user.items():
            cond_col: dict[str, int] = {}
            shares: list[tuple[int, int, float]] = []
            for r, i in enumerate(rows):
                for cond, wt in wins[i].shares:
                    shares.append((r, cond_col.setdefault(cond, len(cond_col)), wt))
            mix = np.zeros((len(rows), len(cond_col)))
            r_idx, c_idx, wts = zip(*shares, strict=True)
            np.add.at(mix, (np.array(r_idx), np.array(c_idx)), np.array(wts))
            post = np.array([self._posterior(uid, c, {}) for c in cond_col])
            raw = mix @ post
            out[rows] = raw / raw.sum(axis=1, keepdims=True)
        return out

    def replay(self, items: Sequence[tuple[PredictionOutcome, float]]) -> list[Decision]:
        """One importance-weighted batch step per condition:
        ``aff(c, l) += Σ_i η_i (1[actual_i = l] - aff(c, l)) / max(1, Σ_i η_i)`` with
        ``η_i = LR · w_i · s_c`` over the batch items where ``c`` is active (a weighted move
        toward the batch's choice frequencies, never past them)."""
        lrn = self.learner
        mass: dict[str, float] = {}  # Σ η per condition
        hits: dict[str, dict[str, float]] = {}  # Σ η per condition and chosen label
        for rec, weight in items:
            conds = active(rec.audio_features, lrn.high, lrn.low)
            if not conds or rec.actual is None:
                continue
            for (cond, _s), share in zip(conds, weights_of(conds), strict=True):
                eta = self.LR * weight * share
                mass[cond] = mass.get(cond, 0.0) + eta
                row = hits.setdefault(cond, {})
                row[rec.actual] = row.get(rec.actual, 0.0) + eta
        out = []
        evidence = {"batch": float(len(items))}
        for cond in sorted(mass):
            total = mass[cond]
            scale = max(1.0, total)
            row = hits[cond]
            for lab in lrn.labels:
                old = lrn.table.get(cond, lab)
                raw = old + (row.get(lab, 0.0) - total * old) / scale
                value = round(min(1.0, max(0.0, raw)), 6)
                if value != old:
                    out.append(lrn.decision("affinity", f"affinity/{cond}/{lab}", old, value,
                                            "prioritized replay", evidence))
        return out


POLICIES: dict[str, type[Policy]] = {"fixed": Policy, "seed": SeedPolicy, "default": DefaultPolicy}
