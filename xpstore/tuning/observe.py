"""The learner in ``store.health()`` and ``store.metrics()``: a check and a collector registered
through the store's seams (``store.parts.health``, ``store.parts.metrics``; docs/service.md).

Layer 6 adds them because only it knows the learner; the store's components stay unaware of it.
``watch_learner`` takes a callable rather than a Learner so a caller that swaps learners (the
HTTP service refreshes its read-only learner as the writer's outcomes arrive) keeps one check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from xpstore.config import StoreConfig
from xpstore.store.health import CheckResult, Status
from xpstore.store.store import Store
from xpstore.tuning.learner import Learner

__all__ = ["CHECK", "COLLECTOR", "accuracy_check", "learner_metrics", "watch_learner"]

CHECK = "prediction_accuracy"
COLLECTOR = "learner"


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
