"""The affinity learner (issue 10; docs/learning.md): predicts a listener's preset, records and
resolves outcomes in the store, and learns from them through prioritized replay.

Built on the public Store API only (``put``, ``update``, ``scan``, ``sample``,
``record_feedback``, ``update_priorities``). Its state has two parts:

- **decisions** (``Decision`` records, through the WAL): every change of a weight or an
  affinity, and every reset, old -> new with the reason and the evidence. The learned state is
  the last decision per target, so reopening after a crash gives exactly the state of the last
  acknowledged decision: a change is applied in memory only after its decision is acknowledged.
- **tallies** derived from the stored outcomes (accuracy counters, habits, windows, the
  calibration), rebuilt from the outcomes on open like the sampler's trees.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from xpstore.errors import EmptySampleError, InvalidArgumentError
from xpstore.model.records import Decision, Experience, PredictionOutcome
from xpstore.store.store import Store
from xpstore.tuning.calibration import Calibrator, reliability
from xpstore.tuning.model import (
    DEFAULT_LABELS,
    Active,
    AffinityTable,
    Habits,
    active,
    argmax,
    blend,
    default_affinities,
)
from xpstore.tuning.policies import POLICIES, Policy, Window

__all__ = ["Learner", "Prediction", "StepReport"]

log = logging.getLogger(__name__)

COMPONENT = "learner"
GLOBAL_WEIGHT = 0.7
"""The published default: 70 % user behaviour, 30 % audio."""
WINDOW = 2000
"""Resolved outcomes kept for windowed accuracy and the calibration fit."""
USER_WINDOW = 200
"""Per-listener outcomes kept for counterfactual weight evaluation."""


@dataclass(frozen=True)
class Prediction:
    """What ``Learner.predict`` returns; ``Learner.record`` stores it as a PredictionOutcome."""

    label: str
    confidence: float
    scores: dict[str, float]
    user_weight: float
    audio_weight: float
    conditions: tuple[str, ...]
    user_id: str
    context: str
    audio_features: dict[str, float] | None
    score: float  # the raw blended score of ``label`` (what confidence is calibrated from)


@dataclass
class StepReport:
    """What one ``step`` did: the batch, the model's mean loss on it, what changed."""

    sampled: int
    mean_loss: float
    changed: list[tuple[str, float | None, float | None]] = field(default_factory=list)
    decisions: int = 0


class Learner:
    """See the module docstring and docs/learning.md."""

    def __init__(
        self,
        store: Store,
        policy: Literal["fixed", "seed", "default"] | str = "default",
        learn_every: int = 100,
        batch_size: int = 256,
        seed: int | None = None,
        *,
        labels: Sequence[str] | None = None,
        high: float = 0.6,
        low: float = 0.4,
        habit_decay: float = 0.98,
    ) -> None:
        if policy not in POLICIES:
            raise InvalidArgumentError(
                f"unknown policy {policy!r}; use one of {', '.join(POLICIES)}", field="policy"
            )
        for name, value in (("learn_every", learn_every), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}",
                                           field=name)  # fmt: skip
        if not 0.0 <= low <= high <= 1.0:
            raise InvalidArgumentError("thresholds need 0 <= low <= high <= 1", field="high")
        if labels is not None and (not labels or not all(isinstance(x, str) and x for x in labels)):
            raise InvalidArgumentError("labels must be non-empty strings", field="labels")
        self.store = store
        self.policy_name = policy
        self.learn_every = learn_every
        self.batch_size = batch_size
        self.seed = seed
        self.high, self.low = high, low
        self.habit_decay = habit_decay
        self.labels: list[str] = list(labels) if labels is not None else list(DEFAULT_LABELS)
        self.policy: Policy = POLICIES[policy](self)
        self.global_weight = GLOBAL_WEIGHT
        self.user_weight: dict[str, float] = {}
        self.table = AffinityTable(default_affinities(self.labels))
        self._reset_tallies()
        self.rebuild()

    # ------------------------------------------------------------------ prediction
    def predict(
        self,
        user_id: str,
        audio_features: Mapping[str, float] | None = None,
        context: str = "warm_start",
    ) -> Prediction:
        """The preset this listener most likely wants for this track, with a calibrated
        confidence; InvalidArgumentError names a bad argument."""
        if not isinstance(user_id, str) or not user_id:
            raise InvalidArgumentError("user_id must be a non-empty string", field="user_id")
        if not isinstance(context, str) or not context:
            raise InvalidArgumentError("context must be a non-empty string", field="context")
        conds = active(audio_features, self.high, self.low)
        w = self.user_weight.get(user_id, self.global_weight)
        scores = blend(self.user_distribution(user_id), self.audio_distribution(user_id, conds), w)
        label, raw = argmax(scores)
        names = tuple(c for c, _s in conds)
        return Prediction(label, self.calibrator(raw), scores, w, 1.0 - w, names, user_id,
                          context, dict(audio_features) if audio_features else None,
                          raw)  # fmt: skip

    def user_distribution(self, user_id: str) -> dict[str, float]:
        """P_user: the listener's habits smoothed toward everyone's (2 pseudo-counts)."""
        prior = self.global_habits.distribution(self.labels, self._uniform, 1.0)
        habits = self.habits.get(user_id)
        if habits is None:
            return prior
        return habits.distribution(self.labels, prior, 2.0)

    def audio_distribution(self, user_id: str, conds: Active) -> dict[str, float]:
        """A(features, ·) under the policy (the default policy personalizes it)."""
        return self.policy.audio(user_id, conds)

    # ------------------------------------------------------------------ outcomes
    def record(self, pred: Prediction, track_id: str | None = None) -> int:
        """Store the prediction as a PredictionOutcome (durable); return its id."""
        if not isinstance(pred, Prediction):
            raise InvalidArgumentError("record takes a Prediction from predict()", field="pred")
        return self.store.put(PredictionOutcome(
            predicted=pred.label, confidence=pred.confidence, context=pred.context,
            track_id=track_id, user_id=pred.user_id, audio_features=pred.audio_features,
            user_weight=pred.user_weight, score=min(1.0, max(0.0, pred.score)),
        ))  # fmt: skip

    def resolve(self, rid: int, actual: str, reward: float | None = None) -> Experience:
        """Record what the listener really chose (one durable update) and learn when due."""
        if not isinstance(actual, str) or not actual:
            raise InvalidArgumentError("actual must be a non-empty label", field="actual")
        exp = self.store.get(rid)
        rec = exp.record
        if not isinstance(rec, PredictionOutcome):
            raise InvalidArgumentError(f"record {rid} is a {exp.kind}, not a prediction",
                                       field="id")  # fmt: skip
        if rec.actual is not None:
            raise InvalidArgumentError(f"prediction {rid} is already resolved", field="id")
        r = (1.0 if actual == rec.predicted else -1.0) if reward is None else reward
        done = self.store.update(rid, actual=actual, reward=r)
        self._tally(done)
        if self.resolved % self.learn_every == 0:
            self.learn()
        return done

    # ------------------------------------------------------------------ learning
    def learn(self) -> list[Decision]:
        """The policy's periodic learning (every ``learn_every`` resolved outcomes): weights,
        affinities, the calibration; returns the decisions it logged."""
        decisions = self.policy.learn()
        self.commit(decisions)
        if self.policy.replays:
            self.step()
        self.calibrator = self._fit_calibrator()
        return decisions

    def step(self) -> StepReport:
        """One prioritized replay step: draw resolved predictions by priority, update the model
        with the batch's importance weights (default policy), write back ``record_feedback``
        (was the logged prediction right) and ``update_priorities`` (the current model's loss
        on each item, so surprising outcomes are replayed more)."""
        try:
            batch = self.store.sample(
                self.batch_size, kind="prediction", where={"actual__ne": None},
                seed=self._next_seed(),
            )  # fmt: skip
        except EmptySampleError:
            return StepReport(0, math.nan)
        items: list[tuple[PredictionOutcome, float]] = []
        for exp, w in zip(batch.records, batch.weights.tolist(), strict=True):
            rec = exp.record
            assert isinstance(rec, PredictionOutcome)
            items.append((rec, float(w)))
        losses = [self.policy.loss(rec) for rec, _w in items]
        decisions = self.policy.replay(items)
        with self.store.batch() as writes:  # one WAL frame, one fsync for the whole step
            writes.put_many(decisions)
            writes.record_feedback(batch.ids, [rec.actual == rec.predicted for rec, _ in items])
            writes.update_priorities(batch.ids, [loss + 0.01 for loss in losses])
        for d in decisions:  # applied only once acknowledged
            self._apply(d)
        changed = [(d.target, d.old, d.new) for d in decisions]
        return StepReport(len(items), sum(losses) / len(losses), changed, len(decisions))

    def commit(self, decisions: Sequence[Decision]) -> None:
        """Log ``decisions`` (one WAL frame), then apply them in memory."""
        if not decisions:
            return
        self.store.put_many(decisions)
        for d in decisions:
            self._apply(d)

    def reset(self, user_id: str | None = None) -> list[Decision]:
        """Back to the defaults (one listener's weight, or every weight and affinity), as
        decisions."""
        if user_id is not None and user_id not in self.user_weight:
            raise InvalidArgumentError(f"no learned weight for user {user_id!r}", field="user_id")
        targets = [user_id] if user_id is not None else list(self.user_weight)
        decisions = [self.decision("reset", f"user_weight/{u}", self.user_weight[u], None,
                                    "reset", user_id=u) for u in targets]  # fmt: skip
        if user_id is None:
            decisions.append(self.decision("reset", "all", None, None, "reset"))
        self.commit(decisions)
        return decisions

    # ------------------------------------------------------------------ reports
    def accuracy(self, by: str | None = None, window: int | None = None) -> dict[str, Any]:
        """Accuracy of the logged predictions, all time and over the last ``window`` resolved
        outcomes; ``by`` = "label" (the predicted label), "context" or "user"."""
        if by not in (None, "label", "context", "user"):
            raise InvalidArgumentError(f"by must be label, context or user, got {by!r}",
                                       field="by")  # fmt: skip
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):  # fmt: skip
            raise InvalidArgumentError(f"window must be an int >= 1, got {window!r}",
                                       field="window")  # fmt: skip
        recent = list(self.recent)[-window:] if window else list(self.recent)
        if by is None:
            return {"all_time": _rate(self.totals), "window": _rate(_count(recent)),
                    "window_size": len(recent)}  # fmt: skip
        keyed = self.by[by]
        keys = sorted(set(keyed) | {_key(r, by) for r in recent})
        windowed = _count_by(recent, by)
        return {k: {"all_time": _rate(keyed.get(k, (0, 0))),
                    "window": _rate(windowed.get(k, (0, 0)))} for k in keys}  # fmt: skip

    def calibration(self, bins: int = 10) -> dict[str, Any]:
        """ECE, Brier and the reliability bins of the recorded confidences (recent window)."""
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 100:
            raise InvalidArgumentError(f"bins must be an int in [1, 100], got {bins!r}",
                                       field="bins")  # fmt: skip
        conf = [w.confidence for w in self.recent]
        ok = [w.correct for w in self.recent]
        return reliability(conf, ok, bins)

    def weights(self, user_id: str | None = None) -> dict[str, Any]:
        """The user (and audio) weight for ``user_id``, or the global default."""
        if user_id is None:
            return {"user_weight": self.global_weight, "audio_weight": 1 - self.global_weight,
                    "source": "global"}  # fmt: skip
        if user_id not in self.habits and user_id not in self.user_weight:
            raise InvalidArgumentError(f"unknown user {user_id!r}", field="user_id")
        w = self.user_weight.get(user_id, self.global_weight)
        return {"user_weight": w, "audio_weight": 1 - w,
                "source": "user" if user_id in self.user_weight else "global"}  # fmt: skip

    def rules(self) -> dict[str, dict[str, float]]:
        """The affinity table: condition -> label -> affinity."""
        return {c: dict(row) for c, row in self.table.cells.items()}

    # ------------------------------------------------------------------ state
    def rebuild(self) -> None:
        """Learned state from the decisions, tallies from the outcomes (at open)."""
        started = time.perf_counter()
        decisions = sorted(
            (e for e in self.store.scan(kind="decision", where={"component": COMPONENT})),
            key=lambda e: e.id,
        )
        for exp in decisions:
            rec = exp.record
            assert isinstance(rec, Decision)
            if rec.policy == self.policy_name:
                self._apply(rec)
        self._reset_tallies()
        for exp in self.store.scan(kind="prediction", where={"actual__ne": None}):
            self._tally(exp, learn=False)
        self.calibrator = self._fit_calibrator()
        log.info("learner (%s) rebuilt: %d decisions, %d outcomes in %.2f s", self.policy_name,
                 len(decisions), self.resolved, time.perf_counter() - started)  # fmt: skip

    def _reset_tallies(self) -> None:
        self.resolved = 0
        self.totals = (0, 0)
        self.by: dict[str, dict[str, tuple[int, int]]] = {"label": {}, "context": {}, "user": {}}
        self.recent: deque[Window] = deque(maxlen=WINDOW)
        self.user_recent: dict[str, deque[Window]] = {}
        self.habits: dict[str, Habits] = {}
        self.global_habits = Habits(self.habit_decay)
        self._uniform = dict.fromkeys(self.labels, 1.0 / len(self.labels))
        self.calibrator = Calibrator()
        self.policy.reset_tallies()
        self._seed_counter = 0

    def _tally(self, exp: Experience, learn: bool = True) -> None:
        rec = exp.record
        assert isinstance(rec, PredictionOutcome) and rec.actual is not None
        for lab in (rec.predicted, rec.actual):
            if lab not in self._uniform:
                self._add_label(lab)
        user = rec.user_id or "-"
        conds = active(rec.audio_features, self.high, self.low)
        p_user = self.user_distribution(user)
        ok = rec.actual == rec.predicted
        win = Window(user, rec.predicted, rec.actual, rec.context, ok, conds, p_user,
                     rec.score if rec.score is not None else rec.confidence,
                     rec.confidence)  # fmt: skip
        self.recent.append(win)
        self.user_recent.setdefault(user, deque(maxlen=USER_WINDOW)).append(win)
        self.habits.setdefault(user, Habits(self.habit_decay)).add(rec.actual)
        self.global_habits.add(rec.actual)
        self.policy.tally(win)
        self.resolved += 1
        self.totals = _inc(self.totals, ok)
        for key, value in (("label", rec.predicted), ("context", rec.context), ("user", user)):
            table = self.by[key]
            table[value] = _inc(table.get(value, (0, 0)), ok)

    def _add_label(self, label: str) -> None:
        self.labels.append(label)
        self._uniform = dict.fromkeys(self.labels, 1.0 / len(self.labels))

    def _apply(self, d: Decision) -> None:
        """One decision into the in-memory state (its ``new`` value for its target)."""
        if d.action == "reset" and d.target == "all":
            self.user_weight.clear()
            self.global_weight = GLOBAL_WEIGHT
            self.table = AffinityTable(default_affinities(self.labels))
            return
        kind, _, rest = d.target.partition("/")
        if kind == "user_weight":
            if d.new is None:
                self.user_weight.pop(rest, None)
            else:
                self.user_weight[rest] = d.new
        elif kind == "global_weight" and d.new is not None:
            self.global_weight = d.new
        elif kind == "affinity" and d.new is not None:
            cond, _, label = rest.partition("/")
            if label not in self._uniform:
                self._add_label(label)
            self.table.set(cond, label, d.new)

    def decision(self, action: str, target: str, old: float | None, new: float | None,
                  reason: str, evidence: Mapping[str, float] | None = None,
                  user_id: str | None = None) -> Decision:  # fmt: skip
        return Decision(component=COMPONENT, action=action, target=target, old=old, new=new,
                        reason=reason, evidence=dict(evidence or {}), user_id=user_id,
                        policy=self.policy_name)  # fmt: skip

    def _fit_calibrator(self) -> Calibrator:
        return Calibrator.fit([w.score for w in self.recent], [w.correct for w in self.recent])

    def _next_seed(self) -> int | None:
        if self.seed is None:
            return None
        self._seed_counter += 1
        return self.seed * 1_000_003 + self._seed_counter


def _inc(pair: tuple[int, int], ok: bool) -> tuple[int, int]:
    return pair[0] + 1, pair[1] + (1 if ok else 0)


def _rate(pair: tuple[int, int]) -> dict[str, Any]:
    n, hits = pair
    return {"n": n, "accuracy": hits / n if n else None}


def _key(w: Window, by: str) -> str:
    return w.predicted if by == "label" else w.context if by == "context" else w.user


def _count(items: Iterable[Window]) -> tuple[int, int]:
    out = (0, 0)
    for w in items:
        out = _inc(out, w.correct)
    return out


def _count_by(items: Iterable[Window], by: str) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for w in items:
        k = _key(w, by)
        out[k] = _inc(out.get(k, (0, 0)), w.correct)
    return out
