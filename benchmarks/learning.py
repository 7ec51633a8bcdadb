"""Learning benchmark (issue 10): simulated listeners against the learner's policies.

For each seed: ``--listeners`` x ``--interactions`` predict -> record -> resolve rounds
(``xpstore.demo.listeners``) per policy, fixed / seed / default and the oracle that knows the
simulator, each against its own store (durability none: the accuracy is the point). Reports the
accuracy over each listener's last ``--last`` interactions (mean and spread over the seeds), the
ECE, the cost of ``predict`` (p50), ``resolve`` (durable updates per call) and ``step`` (256),
and prioritized vs uniform replay: interactions needed to reach a target accuracy, both.

Usage: ``PYTHONPATH=. python benchmarks/learning.py`` (small defaults; the issue's run is
``--listeners 20 --interactions 5000 --seeds 5``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from xpstore import Learner, PredictionOutcome, Store
from xpstore.demo.listeners import make_listeners, simulate, track_features

POLICIES = ("fixed", "seed", "default", "oracle")


def accuracy_runs(args: argparse.Namespace, work: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {p: [] for p in POLICIES}
    for seed in range(args.seeds):
        for policy in POLICIES:
            with Store.open(work / f"acc-{policy}-{seed}", create=True, durability="none") as st:
                res = simulate(st, policy, listeners=args.listeners,
                               interactions=args.interactions, seed=seed,
                               last=min(args.last, args.interactions))  # fmt: skip
            out[policy].append(res)
            print(f"  seed {seed} {policy:<8} last {res.accuracy_last:.3f}", flush=True)
    return out


def costs(work: Path) -> dict[str, float]:
    """predict p50, resolve's durable updates per call, step(256) median, on a commit store."""
    rng = np.random.default_rng(9)
    with Store.open(work / "costs", create=True) as st:  # durability commit: the real cost
        lrn = Learner(st, policy="default", learn_every=1_000_000, seed=1)
        people = make_listeners(10, rng, 300)
        feats = [track_features(rng) for _ in range(3000)]
        times = []
        for i, f in enumerate(feats):
            t0 = time.perf_counter()
            pred = lrn.predict(people[i % 10].user_id, f)
            times.append(time.perf_counter() - t0)
            if i < 600:
                rid = lrn.record(pred)
                before = st.stats()["next_lsn"]
                lrn.resolve(rid, people[i % 10].choose(f, i // 10, rng))
                assert st.stats()["next_lsn"] == before + 1
        steps = []
        for _ in range(15):
            t0 = time.perf_counter()
            lrn.step()
            steps.append(time.perf_counter() - t0)
    return {"predict_p50_us": statistics.median(times) * 1e6,
            "predict_p99_us": float(np.percentile(times, 99)) * 1e6,
            "resolve_durable_updates": 1.0,
            "step_256_median_ms": statistics.median(steps) * 1e3}  # fmt: skip


def replay_race(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prioritized (alpha 0.6) vs uniform (alpha 0) replay on the same data. Replay trains the
    global affinity table, so that is what is raced: after each learning step, the table's own
    accuracy (argmax of A with the global table) over the last 500 resolved outcomes; reported:
    interactions until it first reaches ``--target``, and its final value, per seed. The overall
    accuracy of the default policy is reported too (it mostly comes from per-listener counts)."""
    out: dict[str, Any] = {}
    for name, alpha in (("prioritized", 0.6), ("uniform", 0.0)):
        rows = []
        for seed in range(args.seeds):
            with Store.open(work / f"race-{name}-{seed}", create=True, durability="none",
                            priority_alpha=alpha) as st:  # fmt: skip
                rows.append(_race_one(st, args, seed))
        out[name] = rows
    return out


def _race_one(st: Store, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    people = make_listeners(args.listeners, rng, args.interactions)
    lrn = Learner(st, policy="default", seed=seed)
    curve: list[float] = []
    hits = 0
    for t in range(args.interactions):
        for person in people:
            f = track_features(rng)
            pred = lrn.predict(person.user_id, f)
            actual = person.choose(f, t, rng)
            hits += pred.label == actual
            lrn.resolve(lrn.record(pred), actual)
            if lrn.resolved % lrn.learn_every == 0:
                recent = list(lrn.recent)[-500:]
                ok = sum(1 for w in recent if max(
                    (d := lrn.table.distribution(w.conds, lrn.labels)), key=d.__getitem__
                ) == w.actual)  # fmt: skip
                curve.append(ok / len(recent))
    reach = next((i for i, a in enumerate(curve) if a >= args.target), None)
    return {"reached_at": None if reach is None else (reach + 1) * lrn.learn_every,
            "table_final": curve[-1] if curve else None,
            "accuracy_all": hits / (args.interactions * args.listeners)}  # fmt: skip


def rebuild_time(n: int, work: Path) -> float:
    """Seconds for ``Learner(store)`` to rebuild its tallies from ``n`` resolved outcomes."""
    rng = np.random.default_rng(3)
    people = make_listeners(20, rng, max(1, n // 20))
    labels = ["adaptive", "gentle", "warm", "bright", "punchy", "live"]
    with Store.open(work / f"rebuild-{n}", create=True, durability="none") as st:
        for start in range(0, n, 10_000):
            batch = []
            for i in range(start, min(n, start + 10_000)):
                f = track_features(rng)
                batch.append(PredictionOutcome(
                    predicted=labels[i % 6], actual=people[i % 20].choose(f, 0, rng),
                    confidence=0.5, context="warm_start", user_id=people[i % 20].user_id,
                    audio_features=f, score=0.4, ts=1_700_000_000.0 + i,
                ))  # fmt: skip
            st.put_many(batch)
    with Store.open(work / f"rebuild-{n}") as st:
        t0 = time.perf_counter()
        lrn = Learner(st, policy="default")
        took = time.perf_counter() - t0
        assert lrn.resolved == n
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--listeners", type=int, default=10)
    p.add_argument("--interactions", type=int, default=1000, help="per listener")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--last", type=int, default=1000)
    p.add_argument("--target", type=float, default=0.30,
                   help="table accuracy for the replay race")
    p.add_argument("--rebuild", type=int, default=0,
                   help="only measure the learner's rebuild from this many resolved outcomes")
    args = p.parse_args()
    if args.rebuild:
        with tempfile.TemporaryDirectory() as tmp:
            took = rebuild_time(args.rebuild, Path(tmp))
        print(f"learner rebuild from {args.rebuild:,} resolved outcomes: {took:.2f} s "
              f"({took / args.rebuild * 1e6:.1f} µs per outcome)")  # fmt: skip
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print(f"# learning benchmark: {args.listeners} listeners x {args.interactions} "
              f"interactions, {args.seeds} seeds", flush=True)  # fmt: skip
        acc = accuracy_runs(args, work)
        cost = costs(work)
        race = replay_race(args, work)
    print("\n| policy | accuracy, last interactions (mean ± sd over seeds) | ECE |")
    print("|---|---:|---:|")
    means = {}
    for policy, runs in acc.items():
        vals = [r.accuracy_last for r in runs]
        means[policy] = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        eces = [r.ece for r in runs if r.ece is not None]
        ece = f"{statistics.mean(eces):.3f}" if eces else "-"
        print(f"| {policy} | {means[policy]:.3f} ± {sd:.3f} | {ece} |")
    print(f"\npredict p50 {cost['predict_p50_us']:.1f} µs (p99 {cost['predict_p99_us']:.1f} µs); "
          f"resolve: {cost['resolve_durable_updates']:.0f} durable update per call (checked); "
          f"step(256) median {cost['step_256_median_ms']:.1f} ms")  # fmt: skip
    for name, rows in race.items():
        print(f"replay race, {name}: table accuracy reached {args.target} after "
              f"{[r['reached_at'] for r in rows]} interactions; final table accuracy "
              f"{[round(r['table_final'], 3) for r in rows]}; overall accuracy "
              f"{[round(r['accuracy_all'], 3) for r in rows]}")  # fmt: skip
    default_ece = statistics.mean([r.ece for r in acc["default"] if r.ece is not None] or [1.0])
    for bar, ok in (
        ("default >= fixed + 10 points", means["default"] >= means["fixed"] + 0.10),
        ("default >= seed + 3 points", means["default"] >= means["seed"] + 0.03),
        ("ECE <= 0.05 (default)", default_ece <= 0.05),
        ("predict p50 <= 50 µs", cost["predict_p50_us"] <= 50),
        ("step of 256 <= 20 ms", cost["step_256_median_ms"] <= 20),
    ):
        print(f"- {'PASS' if ok else 'MISS'} {bar}")
    print(f"\nrun took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
