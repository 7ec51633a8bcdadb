"""The learner and the self-tuner in ``store.health()`` and ``store.metrics()``: checks and
collectors registered through the store's seams (``store.parts.health``, ``store.parts.metrics``;
docs/service.md).

Layer 6 adds them because only it knows the learner and the tuner; the store's components stay
unaware of them. ``watch_learner`` takes a callable rather than a Learner so a caller that swaps
learners (the HTTP service refreshes its read-only learner as the writer's outcomes arrive) keeps
one check. ``watch_tuning`` is called by :class:`~xpstore.tuning.tuning.Tuning` when it attaches:
the resource monitor's level takes the place of the built-in psutil ``memory`` check, and the
tuner's decisions become metrics; ``unwatch_tuning`` puts the psutil check back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from xpstore.config import StoreConfig
from xpstore.errors import InvalidArgumentError
from xpstore.store.health import CheckResult, Status
from xpstore.store.store import Store
from xpstore.tuning.learner import Learner

if TYPE_CHECKING:
    from xpstore.tuning.monitor import ResourceMonitor
    from xpstore.tuning.tuner import AutoTuner

__all__ = [
    "CHECK", "COLLECTOR", "MEMORY_CHECK", "TUNER_COLLECTOR", "accuracy_check", "learner_metrics",
    "memory_check", "tuner_metrics", "unwatch_tuning", "watch_learner", "watch_tuning",
]  # fmt: skip

CHECK = "prediction_accuracy"
COLLECTOR = "learner"
MEMORY_CHECK = "memory"
TUNER_COLLECTOR = "tuner"


def watch_learner(store: Store, learner: Callable[[], Learner], *, replace: bool = True) -> None:
    """Register the learner's check (:data:`CHECK`) and metrics (:data:`COLLECTOR`) on
    ``store``; ``learner()`` is called at each check or scrape."""
    store.parts.health.register_check(CHECK, lambda cfg: accuracy_check(learner(), cfg),
                                       replace=replace)  # fmt: skip
    store.parts.metrics.register_collector(COLLECTOR, lambda: learner_metrics(learner()),
                                           replace=replace)  # fmt: skip


def accuracy_check(learner: Learner, config: StoreConfig) -> CheckResult:
    """Warning when the recent accuracy is under ``health.accuracy_warning``, once
    ``health.accuracy_min_outcomes`` resolved outcomes exist in the learner's window."""
    h = config.health
    acc = learner.accuracy()
    window = acc["window"]
    n, rate = int(window["n"]), window["accuracy"]
    value = {"window": window, "all_time": acc["all_time"], "policy": learner.policy_name,
             "resolved": learner.resolved}  # fmt: skip
    if n < h.accuracy_min_outcomes or rate is None:
        return CheckResult(CHECK, "healthy", f"{n} resolved predictions, fewer than "
                           f"{h.accuracy_min_outcomes}: too few to judge", value)  # fmt: skip
    status: Status = "warning" if rate < h.accuracy_warning else "healthy"
    return CheckResult(CHECK, status, f"accuracy {rate:.1%} over the last {n} resolved "
                       f"predictions (warning under {h.accuracy_warning:.0%})", value)  # fmt: skip


def learner_metrics(learner: Learner) -> Iterator[Metric]:
    """Accuracy (recent window and all time), resolved outcomes, calibration error, the global
    weights and how many listeners have their own."""
    acc = learner.accuracy()
    g = GaugeMetricFamily("xpstore_learner_accuracy_ratio",
                          "Share of resolved predictions that were right.",
                          labels=["span"])  # fmt: skip
    for span in ("window", "all_time"):
        rate = acc[span]["accuracy"]
        if rate is not None:
            g.add_metric([span], float(rate))
    yield g
    yield GaugeMetricFamily("xpstore_learner_resolved", "Resolved predictions the learner knows.",
                            value=float(learner.resolved))  # fmt: skip
    ece = learner.calibration()["ece"]
    if ece is not None:
        yield GaugeMetricFamily("xpstore_learner_calibration_error",
                                "Expected calibration error of the recorded confidences.",
                                value=float(ece))  # fmt: skip
    w = learner.weights()
    weights = GaugeMetricFamily("xpstore_learner_weight", "The global blend weights.",
                                labels=["side"])  # fmt: skip
    weights.add_metric(["user"], float(w["user_weight"]))
    weights.add_metric(["audio"], float(w["audio_weight"]))
    yield weights
    yield GaugeMetricFamily("xpstore_learner_users_weighted",
                            "Listeners with a weight of their own.",
                            value=float(len(learner.user_weight)))  # fmt: skip


def claim_tuning(store: Store, tuner: Callable[[], AutoTuner]) -> None:
    """Register the tuner's metrics (:data:`TUNER_COLLECTOR`, read through ``tuner()``) as the
    claim of the one tuning of ``store``. InvalidArgumentError if another ``Tuning`` holds it:
    two tuners would fight over the same knobs, and the first to close would take the other's
    memory check with it."""
    try:
        store.parts.metrics.register_collector(TUNER_COLLECTOR, lambda: tuner_metrics(tuner()))
    except InvalidArgumentError:
        raise InvalidArgumentError(
            "this store already has a Tuning attached (one per open store: two would tune the "
            "same knobs against each other); close that one first",
            field="store",
        ) from None


def watch_tuning(store: Store, monitor: ResourceMonitor | None) -> None:
    """With a ``monitor``, its memory level becomes the ``memory`` check in place of the
    built-in psutil one (after :func:`claim_tuning`)."""
    if monitor is not None:
        store.parts.health.register_check(MEMORY_CHECK, lambda cfg: memory_check(monitor),
                                          replace=True)  # fmt: skip


def unwatch_tuning(store: Store, *, monitor: bool) -> None:
    """Undo :func:`claim_tuning` and :func:`watch_tuning` (the psutil ``memory`` check comes
    back)."""
    store.parts.metrics.unregister_collector(TUNER_COLLECTOR)
    if monitor:
        store.parts.health.restore_check(MEMORY_CHECK)


MEMORY_STATUS: dict[int, Status] = {0: "healthy", 1: "warning", 2: "critical", 3: "critical"}
"""The monitor's levels as check statuses: at 2 (over 90 % used) the store already answers
from a degraded index, at 3 its background work is paused."""


def memory_check(monitor: ResourceMonitor) -> CheckResult:
    """The resource monitor's level in force and its last reading (it reads every
    ``interval_s``). Before its first reading the check reads memory itself, but applies no
    level: only the monitor changes the store's degradation."""
    st = monitor.status()
    level = int(st["level"])
    reading = monitor.last or monitor.reader()
    value = {"level": level, "used_pct": reading.used_percent, "process_rss_bytes": reading.rss,
             "strategy": st["strategy"], "reserve": st["reserve"],
             "cache_budget": st["cache_budget"], "degradation": st["store"],
             "source": "monitor"}  # fmt: skip
    msg = (f"level {level}: {reading.used_percent:.0f}% of system memory in use, this process "
           f"{reading.rss >> 20} MiB (resource monitor, {monitor.strategy}"
           f"{'' if monitor.last else ', no reading of its own yet'})")
    return CheckResult(MEMORY_CHECK, MEMORY_STATUS[min(3, max(0, level))], msg, value)


def tuner_metrics(tuner: AutoTuner) -> Iterator[Metric]:
    """Decisions by knob and action and rollbacks (from the stored decisions, so a read-only
    process counts the writer's too), whether background tuning is on, the strategy, the change
    waiting for its judgement."""
    history = tuner.history()
    by: Counter[tuple[str, str]] = Counter((d["target"], d["action"]) for d in history)
    enabled = tuner.enabled
    strategy = tuner.strategy
    for d in history:  # the last switch and strategy in the store win (a writer beside us)
        if d["target"] == "tuner" and d["action"] in ("enable", "disable"):
            enabled = d["action"] == "enable"
        if d["target"] == "tuner" and d.get("strategy"):
            strategy = str(d["strategy"])
    decisions = CounterMetricFamily("xpstore_tuner_decisions",
                                    "Self-tuner decisions by knob and action (set, keep, "
                                    "rollback, recommend, enable, disable, strategy).",
                                    labels=["knob", "action"])  # fmt: skip
    for (knob, action), n in sorted(by.items()):
        decisions.add_metric([knob, action], float(n))
    yield decisions
    yield CounterMetricFamily("xpstore_tuner_rollbacks",
                              "Knob changes the self-tuner judged worse and undid.",
                              value=float(sum(n for (_, a), n in by.items() if a == "rollback")))
    yield GaugeMetricFamily("xpstore_tuner_enabled", "1 while background tuning is on.",
                            value=1.0 if enabled else 0.0)  # fmt: skip
    info = GaugeMetricFamily("xpstore_tuner_strategy", "The self-tuner's strategy (value 1).",
                             labels=["strategy"])  # fmt: skip
    info.add_metric([strategy], 1.0)
    yield info
    yield GaugeMetricFamily("xpstore_tuner_pending_changes",
                            "Knobs changed by the last run, waiting for their judgement.",
                            value=float(len(tuner.pending)))  # fmt: skip
