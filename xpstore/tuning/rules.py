"""The auto-tuner's pure rules (docs/tuning.md, "Rules"): what to recommend for an application's
query type, the strategies' objectives, and the knob-step helpers. No store access here, so every
rule has a unit test of its own.

``recommend`` follows the published rules of Athena's auto-tuner (research/origins.md §3), with
its weaknesses fixed where the notes name them (balanced's 70/20/10 mix is implemented; the
speedup is measured, not assumed):

- concurrency 15 when p99 < 100 ms, 8 when < 500 ms, else 4; x1.2 when the parallel speedup is
  above 2, x0.7 below 1.1; within 2-20 (slow types, p99 > 500 ms, within 2-5);
- timeout = p99 x the strategy's factor (latency 1.2, throughput 2.0, cost 1.5, balanced 1.5),
  within 5-30 s;
- parallel only where the measured speedup is above 1.2;
- cache unless the measured hit rate is below ``CACHE_MIN_HIT`` (0.05; cost: 0.2): a cache that
  never hits only costs memory;
- nothing changes before ``min_samples`` (10) queries, and a recommendation replaces the current
  one only when a number moves by more than 10 % or a switch flips.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from xpstore.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_CONFIG",
    "STRATEGIES",
    "TuningConfig",
    "changed_enough",
    "objective",
    "propose",
]

STRATEGIES: dict[str, dict[str, float]] = {
    "latency": {"latency": 1.0},
    "throughput": {"throughput": 1.0},
    "cost": {"cost": 1.0},
    "balanced": {"latency": 0.7, "throughput": 0.2, "cost": 0.1},
}
"""Each strategy's objective weights (balanced: the published 70/20/10)."""
TIMEOUT_FACTOR = {"latency": 1.2, "throughput": 2.0, "cost": 1.5, "balanced": 1.5}
FAST_P99_MS = 100.0
SLOW_P99_MS = 500.0
CONCURRENCY = {"fast": 15, "medium": 8, "slow": 4}
SPEEDUP_HIGH, SPEEDUP_LOW = 2.0, 1.1
SCALE_HIGH, SCALE_LOW = 1.2, 0.7
PARALLEL_MIN_SPEEDUP = 1.2
TIMEOUT_MIN_S, TIMEOUT_MAX_S = 5.0, 30.0
CACHE_MIN_HIT = {"latency": 0.05, "throughput": 0.05, "cost": 0.2, "balanced": 0.05}
MIN_CHANGE = 0.10
MIN_SAMPLES = 10


@dataclass(frozen=True)
class TuningConfig:
    """What an application should run a query type with."""

    max_concurrent: int
    timeout_s: float
    parallel: bool
    cache: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_CONFIG = TuningConfig(max_concurrent=8, timeout_s=TIMEOUT_MAX_S, parallel=False,
                              cache=True)  # fmt: skip
"""Before any measurement: the medium concurrency, the longest timeout, sequential, cached."""


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(
            f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}", field="strategy"
        )
    return strategy


def propose(
    summary: Mapping[str, Any], strategy: str, min_samples: int = MIN_SAMPLES
) -> tuple[TuningConfig | None, dict[str, str]]:
    """The rules applied to one type's profile summary (``Profiler.profile()["types"][t]``);
    None while there are fewer than ``min_samples`` queries. Returns the config and the reason
    for each value."""
    check_strategy(strategy)
    n = int(summary.get("count") or 0)
    if n < min_samples:
        return None, {"samples": f"{n} queries, fewer than {min_samples}"}
    p99 = float(summary["p99_ms"])
    speedup = summary.get("parallel_speedup")
    if speedup is None:
        speedup = summary.get("layer_speedup")
    why: dict[str, str] = {}
    if p99 < FAST_P99_MS:
        base, lo, hi, band = CONCURRENCY["fast"], 2, 20, "fast"
    elif p99 <= SLOW_P99_MS:
        base, lo, hi, band = CONCURRENCY["medium"], 2, 20, "medium"
    else:
        base, lo, hi, band = CONCURRENCY["slow"], 2, 5, "slow"
    scale = 1.0
    if speedup is not None and speedup > SPEEDUP_HIGH:
        scale = SCALE_HIGH
    elif speedup is not None and speedup < SPEEDUP_LOW:
        scale = SCALE_LOW
    conc = max(lo, min(hi, round(base * scale)))
    why["max_concurrent"] = (f"p99 {p99:.1f} ms is {band}: {base}"
                             + (f" x{scale} (speedup {speedup:.2f})" if scale != 1.0 else "")
                             + f", within {lo}-{hi}")  # fmt: skip
    timeout = p99 / 1000.0 * TIMEOUT_FACTOR[strategy]
    timeout = max(TIMEOUT_MIN_S, min(TIMEOUT_MAX_S, timeout))
    why["timeout_s"] = (f"p99 {p99:.1f} ms x {TIMEOUT_FACTOR[strategy]} ({strategy}), "
                        f"within {TIMEOUT_MIN_S:g}-{TIMEOUT_MAX_S:g} s")  # fmt: skip
    parallel = speedup is not None and speedup > PARALLEL_MIN_SPEEDUP
    measured = f"measured speedup {speedup:.2f}" if speedup is not None else "no measurement"
    why["parallel"] = f"{measured} (needs > {PARALLEL_MIN_SPEEDUP})"
    hit = summary.get("cache_hit_rate")
    floor = CACHE_MIN_HIT[strategy]
    cache = hit is None or hit >= floor
    why["cache"] = (f"hit rate {hit:.2f}" if hit is not None else "no cache data") + (
        f" (off below {floor})"
    )
    return TuningConfig(conc, round(timeout, 3), parallel, cache), why


def changed_enough(old: TuningConfig, new: TuningConfig, min_change: float = MIN_CHANGE) -> bool:
    """A recommendation replaces ``old`` only when a number moves by more than ``min_change``
    (relative) or a switch flips."""
    if old.parallel != new.parallel or old.cache != new.cache:
        return True
    return _moved(old.max_concurrent, new.max_concurrent, min_change) or _moved(
        old.timeout_s, new.timeout_s, min_change
    )


def _moved(old: float, new: float, min_change: float) -> bool:
    if old == 0:
        return new != 0
    return abs(new - old) / abs(old) > min_change


def objective(
    strategy: str, before: Mapping[str, float], after: Mapping[str, float]
) -> float | None:
    """The strategy's objective of ``after`` relative to ``before`` (1.0: unchanged; lower is
    better): the weighted sum of p99 latency, inverse throughput and memory ratios, over the
    parts measured on both sides (weights renormalized). None when nothing is comparable."""
    weights = STRATEGIES[check_strategy(strategy)]
    parts: list[tuple[float, float]] = []
    pairs = {"latency": ("p99_ms", False), "throughput": ("qps", True),
             "cost": ("memory_bytes", False)}  # fmt: skip
    for part, w in weights.items():
        key, inverse = pairs[part]
        b, a = before.get(key), after.get(key)
        if b is None or a is None or not (b > 0 and a > 0) or math.isnan(a + b):
            continue
        parts.append((w, b / a if inverse else a / b))
    total = sum(w for w, _r in parts)
    if not total:
        return None
    return sum(w * r for w, r in parts) / total


def moved(old: float, new: float, min_change: float = MIN_CHANGE) -> bool:
    """A knob changes only when it moves by more than ``min_change`` (relative)."""
    return _moved(old, new, min_change)
