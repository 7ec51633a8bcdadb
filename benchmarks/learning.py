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
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from xpstore import Learner, PredictionOutcome, Store
from xpstore.demo.listeners import make_listeners, simulate, track_features
from xpstore.tuning.model import active

POLICIES = ("fixed", "seed", "default", "oracle")


def accuracy_runs(args: argparse.Namespace, work: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {p: [] for p in POLICIES}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
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


def replay_race(args: argparse.Namespace, work: Path) -> dict[str, dict[str, list[Any]]]:
    """Prioritized (alpha 0.6) vs uniform (alpha 0) replay on the same data, in two scenarios
    where the global affinity table (what replay trains) is what matters:

    - ``trend``: the issue's listeners, and at each listener's drift point the audio mapping of
      the whole population moves by one shared permutation (``make_listeners(audio_drift=True)``);
      counted from the last drift point;
    - ``cold``: 25x the listeners with 1/25 of the interactions each (same number of outcomes):
      few outcomes per listener, so the table is most of what predicts for them; counted from
      the start.

    After each learning step the table's **expected** accuracy is computed against the
    simulator's true choice distributions on a fixed set of tracks (no sampling noise): argmax
    of the table's A for each track, scored by the mean probability a listener (a fixed subset
    of at most 50) chooses it. Reported per seed: outcomes until that first reaches ``--target``
    x the best any table could do at that moment (the per-track argmax of the same mean
    distribution), the mean table accuracy and the mean best over the counted period, and the
    overall prediction accuracy, and how far from uniform the final sampling distribution is:
    its effective sample size as a share of the population, ``1 / (N sum P(i)^2)`` (1.0 is
    uniform)."""
    out: dict[str, dict[str, list[Any]]] = {}
    shapes = {
        "trend": (args.listeners, args.interactions, True),
        "cold": (args.listeners * 25, max(8, args.interactions // 25), False),
    }
    for scenario, (n_people, n_inter, drift) in shapes.items():
        out[scenario] = {}
        for name, alpha in (("prioritized", 0.6), ("uniform", 0.0)):
            rows = []
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                with Store.open(work / f"race-{scenario}-{name}-{seed}", create=True,
                                durability="none", priority_alpha=alpha) as st:  # fmt: skip
                    rows.append(_race_one(st, args, seed, n_people, n_inter, drift))
                print(f"  race {scenario} {name} seed {seed}: {rows[-1]}", flush=True)
            out[scenario][name] = rows
    return out


def _race_one(
    st: Store, args: argparse.Namespace, seed: int, n_people: int, n_inter: int, drift: bool
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    people = make_listeners(n_people, rng, n_inter, audio_drift=drift)
    judges = people[:: max(1, len(people) // 50)]
    evr = np.random.default_rng(10_000 + seed)
    tracks = [f for f in (track_features(evr) for _ in range(200)) if active(f, 0.6, 0.4)]
    lrn = Learner(st, policy="default", seed=seed)
    start_t = max(p.drift_at for p in people) if drift else 0
    curve: list[tuple[int, float, float, float]] = []  # (outcomes, table acc, best, KL)
    hits = 0
    for t in range(n_inter):
        for person in people:
            f = track_features(rng)
            pred = lrn.predict(person.user_id, f)
            actual = person.choose(f, t, rng)
            hits += pred.label == actual
            lrn.resolve(lrn.record(pred), actual)
            if lrn.resolved % lrn.learn_every == 0 and t >= start_t:
                acc, best, kl = _table_accuracy(lrn, judges, tracks, t)
                curve.append(((t - start_t) * n_people, acc, best, kl))
    reach = next((o for o, a, b, _k in curve if a >= args.target * b), None)
    probs = np.array(list(st.sampling_probabilities("prediction").values()))
    ess = float(1.0 / (len(probs) * (probs**2).sum()))
    return {"reached_at": reach, "ess": round(ess, 3),
            "table_mean": round(statistics.mean(c[1] for c in curve), 4),
            "table_best": round(statistics.mean(c[2] for c in curve), 4),
            "table_kl": round(statistics.mean(c[3] for c in curve), 4),
            "accuracy_all": round(hits / (n_inter * n_people), 4)}  # fmt: skip


def _table_accuracy(
    lrn: Learner, judges: list[Any], tracks: list[dict[str, float]], t: int
) -> tuple[float, float, float]:
    """(the table's expected accuracy, the best any table could have, the mean KL divergence
    of the table's A from the true mean choice distribution) at interaction ``t``."""
    labels = lrn.labels
    got = best = kl = 0.0
    for f in tracks:
        mean = dict.fromkeys(labels, 0.0)
        for person in judges:
            for lab, p in person.distribution(f, t).items():
                mean[lab] += p / len(judges)
        dist = lrn.table.distribution(active(f, lrn.high, lrn.low), labels)
        got += mean[max(dist, key=dist.__getitem__)]
        best += max(mean.values())
        kl += sum(m * math.log(m / max(dist[lab], 1e-9)) for lab, m in mean.items() if m > 0)
    n = len(tracks)
    return got / n, best / n, kl / n


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
    p.add_argument("--first-seed", type=int, default=0,
                   help="run seeds first-seed .. first-seed + seeds - 1 (split a run)")
    p.add_argument("--last", type=int, default=1000)
    p.add_argument("--target", type=float, default=0.9,
                   help="replay race: the share of the best table accuracy to reach")
    p.add_argument("--sections", default="accuracy,costs,race",
                   help="comma-separated: accuracy, costs, race")
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
        sections = set(args.sections.split(","))
        acc = accuracy_runs(args, work) if "accuracy" in sections else {}
        cost = costs(work) if "costs" in sections else {}
        race = replay_race(args, work) if "race" in sections else {}
    bars: list[tuple[str, bool]] = []
    if acc:
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
        default_ece = statistics.mean([r.ece for r in acc["default"] if r.ece is not None]
                                      or [1.0])  # fmt: skip
        bars += [("default >= fixed + 10 points", means["default"] >= means["fixed"] + 0.10),
                 ("default >= seed + 3 points", means["default"] >= means["seed"] + 0.03),
                 ("ECE <= 0.05 (default)", default_ece <= 0.05)]  # fmt: skip
    if cost:
        print(f"\npredict p50 {cost['predict_p50_us']:.1f} µs (p99 "
              f"{cost['predict_p99_us']:.1f} µs); resolve: "
              f"{cost['resolve_durable_updates']:.0f} durable update per call (checked); "
              f"step(256) median {cost['step_256_median_ms']:.1f} ms")  # fmt: skip
        bars += [("predict p50 <= 50 µs", cost["predict_p50_us"] <= 50),
                 ("step of 256 <= 20 ms", cost["step_256_median_ms"] <= 20)]  # fmt: skip
    for scenario, modes in race.items():
        for name, rows in modes.items():
            print(f"replay race {scenario}, {name}: outcomes to {args.target:.0%} of the best "
                  f"table {[r['reached_at'] for r in rows]}; mean table accuracy "
                  f"{[r['table_mean'] for r in rows]} (best possible "
                  f"{[r['table_best'] for r in rows]}); KL(true || table) "
                  f"{[r['table_kl'] for r in rows]}; "
                  f"overall accuracy {[r['accuracy_all'] for r in rows]}; sampling ESS/N "
                  f"{[r['ess'] for r in rows]}")  # fmt: skip
    for bar, ok in bars:
        print(f"- {'PASS' if ok else 'MISS'} {bar}")
    print(f"\nrun took {time.perf_counter() - started:.0f} s")

if __name__ == "__main__":
    main()
