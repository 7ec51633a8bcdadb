"""Priority sampling benchmark (issue 5): the in-memory sum-tree against cpprb.

One section per part of the issue's performance list; ``--sections`` picks which run
(comma-separated, in order). Sections:

``store`` -- the store: durable ``update_priorities`` with ``--update-batch`` ids per call, the
sampler's rebuild on open (the LMDB ``prio`` table read as arrays, the trees built), and
``store.sample`` end to end including record decoding.

``memory`` -- ``xpstore.sampling.sumtree.SumTree``
and ``cpprb.PrioritizedReplayBuffer`` (C++), loaded
with the same ``--items`` priorities (uniform in [0.01, 1)), same alpha (0.6) and beta (0.4):

1. **Sanity** (not timed): mean priority of sampled items for both against the exact
   ``sum p^(1+alpha) / sum p^alpha``, and our importance weights for cpprb's sampled indexes
   against the weights cpprb returned (same formula, float32 there).
2. **Loop** of ``--batch`` (256): sample a batch, then update the priorities of the sampled
   items (new priorities from a shared pre-drawn pool). Ours: ``sample`` + ``probabilities`` +
   ``importance_weights`` (normalized by the global minimum) + a gather of the stored ids (cpprb
   returns the stored ``id`` column) + ``set(slots, p**alpha)``. cpprb: ``sample(batch, beta)``
   + ``update_priorities(indexes, p)`` (cpprb raises to alpha itself). Also each half alone.
   Samples/s (median over repeats), per-iteration median and p99, ratio ours/cpprb. Bar: >= 1.0x.
3. **Priority updates** in batches of ``--update-batch`` (10 000) random ids: updates/s.
   Ours includes ``p**alpha``. Bar: >= 1M updates/s.
4. **Build**: ``SumTree.from_weights`` of ``--items`` weights (what opening a store does after
   reading its priority column); cpprb's ``add`` of the same items with priorities for reference.
   Bar: <= 0.5 s at 1M items.

Repeats alternate the order of the cases. Prints markdown tables and the bars as PASS/MISS.

    PYTHONPATH=. python benchmarks/sampling.py [--items 1000000 --batch 256 --repeats 7
                                                --iters 400 --update-batch 10000 --json out.json]

cpprb is optional (``pip install cpprb``); without it the cpprb columns read "cpprb not installed".
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpstore.sampling.sumtree import SumTree, importance_weights

try:
    import cpprb
except ImportError:  # optional baseline
    cpprb = None

perf = time.perf_counter
NOT_INSTALLED = "cpprb not installed"
SAMPLE_BAR = 1.0  # ours / cpprb, sample + update loop
UPDATE_BAR = 1_000_000.0  # updates/s in batches
BUILD_BAR_S = 0.5  # from_weights at 1M
BUILD_BAR_ITEMS = 1_000_000


# ---------------------------------------------------------------------------- shared helpers


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {"numpy": np.__version__}
    for dist in ("xpstore", "cpprb"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def fmt_rate(x: float) -> str:
    if x != x:  # NaN
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k/s"
    return f"{x:.0f} /s"


def fmt_us(s: float) -> str:
    return "-" if s != s else f"{s * 1e6:.1f} us"


def fmt_s(s: float) -> str:
    return "-" if s != s else (f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s")


def ratio(a: float, b: float) -> str:
    return "-" if not (a == a and b == b and b > 0) else f"{a / b:.2f}x"


@dataclass
class Timing:
    """Per-repeat rates and per-iteration durations of one case."""

    rates: list[float] = field(default_factory=list)
    iters: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return float(np.median(self.rates)) if self.rates else float("nan")

    def as_dict(self) -> dict[str, float]:
        return {
            "rate_median": self.rate,
            "iter_median_s": pct(self.iters, 50),
            "iter_p99_s": pct(self.iters, 99),
        }


def run_interleaved(
    cases: dict[str, Callable[[int], float]], iters: int, units: int, repeats: int
) -> dict[str, Timing]:
    """Run ``case(i)`` (returns its own duration) ``iters`` times per repeat, cases alternating
    order each repeat; rate = units * iters / time of the block."""
    out = {name: Timing() for name in cases}
    names = list(cases)
    for name in names:  # warm-up, not recorded
        for i in range(min(iters, 20)):
            cases[name](i)
    for rep in range(repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            fn = cases[name]
            gc.collect()
            durations = [fn(i) for i in range(iters)]
            out[name].iters.extend(durations)
            out[name].rates.append(units * iters / sum(durations))
    return out


def bar_line(ok: bool, text: str) -> str:
    return f"- {'PASS' if ok else 'MISS'} {text}"


# ---------------------------------------------------------------------------- memory section


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    n, batch, alpha, beta = args.items, args.batch, args.alpha, args.beta
    rng = np.random.default_rng(args.seed)
    prio = rng.uniform(0.01, 1.0, n)
    ids = np.arange(n, dtype=np.int64)
    pool = [rng.uniform(0.01, 1.0, batch) for _ in range(64)]
    upd_ids = [rng.integers(0, n, args.update_batch) for _ in range(16)]
    upd_vals = [rng.uniform(0.01, 1.0, args.update_batch) for _ in range(16)]
    result: dict[str, Any] = {"items": n, "batch": batch, "alpha": alpha, "beta": beta}

    # -- build (timed separately, alternating)
    builds: dict[str, list[float]] = {"ours": [], "cpprb": []}
    tree = SumTree.from_weights(prio**alpha)
    rb: Any = None
    for _ in range(args.repeats):
        gc.collect()
        t = perf()
        weights = prio**alpha  # the store reads priorities and raises them to alpha, too
        built = SumTree.from_weights(weights)
        builds["ours"].append(perf() - t)
        del built
        if cpprb is not None:
            gc.collect()
            t = perf()
            rb = cpprb.PrioritizedReplayBuffer(n, {"id": {"dtype": np.int64}}, alpha=alpha, eps=0.0)
            for lo in range(0, n, 100_000):
                rb.add(id=ids[lo : lo + 100_000], priorities=prio[lo : lo + 100_000])
            builds["cpprb"].append(perf() - t)
    build_s = float(np.median(builds["ours"]))
    cpprb_build_s = float(np.median(builds["cpprb"])) if builds["cpprb"] else float("nan")

    # -- sanity: same distribution, same importance weights
    expect_mean = float((prio ** (1 + alpha)).sum() / (prio**alpha).sum())
    srng = np.random.default_rng(args.seed + 1)
    ours_mean = float(prio[np.concatenate([tree.sample(batch, srng) for _ in range(200)])].mean())
    sanity = {"expected_mean_sampled_priority": expect_mean, "ours": ours_mean}
    if rb is not None:
        # cpprb returns its batch in buffers that the next sample() overwrites: copy each.
        drawn = [rb.sample(batch, beta)["indexes"].astype(np.int64) for _ in range(200)]
        sanity["cpprb"] = float(prio[np.concatenate(drawn)].mean())
        last = rb.sample(batch, beta)
        idx = last["indexes"].astype(np.int64)
        ours_w = importance_weights(
            tree.probabilities(idx), len(tree), beta, tree.min_weight / tree.total
        )
        sanity["max_rel_diff_weights_vs_cpprb"] = float(
            np.max(np.abs(ours_w - last["weights"]) / last["weights"])
        )
    result["sanity"] = sanity

    # -- sample + update loop
    srng = np.random.default_rng(args.seed + 2)
    state: dict[str, Any] = {"slots": tree.sample(batch, srng)}
    cpprb_state: dict[str, Any] = {}
    if rb is not None:
        cpprb_state["idx"] = rb.sample(batch, beta)["indexes"]

    def ours_loop(i: int) -> float:
        t = perf()
        slots = tree.sample(batch, srng)
        w = importance_weights(
            tree.probabilities(slots), len(tree), beta, tree.min_weight / tree.total
        )
        got = ids[slots]
        tree.set(slots, pool[i % 64] ** alpha)
        d = perf() - t
        state["slots"], state["w"], state["ids"] = slots, w, got
        return d

    def ours_sample(_i: int) -> float:
        t = perf()
        slots = tree.sample(batch, srng)
        w = importance_weights(
            tree.probabilities(slots), len(tree), beta, tree.min_weight / tree.total
        )
        got = ids[slots]
        d = perf() - t
        state["slots"], state["w"], state["ids"] = slots, w, got
        return d

    def ours_update(i: int) -> float:
        t = perf()
        tree.set(state["slots"], pool[i % 64] ** alpha)
        return perf() - t

    def cpprb_loop(i: int) -> float:
        t = perf()
        b = rb.sample(batch, beta)
        rb.update_priorities(b["indexes"], pool[i % 64])
        d = perf() - t
        cpprb_state["idx"] = b["indexes"]
        return d

    def cpprb_sample(_i: int) -> float:
        t = perf()
        b = rb.sample(batch, beta)
        d = perf() - t
        cpprb_state["idx"] = b["indexes"]
        return d

    def cpprb_update(i: int) -> float:
        t = perf()
        rb.update_priorities(cpprb_state["idx"], pool[i % 64])
        return perf() - t

    loop_cases: dict[str, Callable[[int], float]] = {"ours loop": ours_loop}
    if rb is not None:
        loop_cases["cpprb loop"] = cpprb_loop
    loop = run_interleaved(loop_cases, args.iters, batch, args.repeats)
    half_cases: dict[str, Callable[[int], float]] = {
        "ours sample": ours_sample,
        "ours update": ours_update,
    }
    if rb is not None:
        half_cases |= {"cpprb sample": cpprb_sample, "cpprb update": cpprb_update}
    halves = run_interleaved(half_cases, args.iters, batch, args.repeats)
    timings = loop | halves

    # -- bulk priority updates
    def ours_bulk(i: int) -> float:
        t = perf()
        tree.set(upd_ids[i % 16], upd_vals[i % 16] ** alpha)
        return perf() - t

    def cpprb_bulk(i: int) -> float:
        t = perf()
        rb.update_priorities(upd_ids[i % 16], upd_vals[i % 16])
        return perf() - t

    bulk_cases: dict[str, Callable[[int], float]] = {"ours bulk": ours_bulk}
    if rb is not None:
        bulk_cases["cpprb bulk"] = cpprb_bulk
    bulk_iters = max(10, args.iters // 10)
    timings |= run_interleaved(bulk_cases, bulk_iters, args.update_batch, args.repeats)

    # -- report
    def row(label: str, key: str, what: str) -> str:
        ours = timings[f"ours {key}"]
        if rb is None:
            theirs_cols = f"{NOT_INSTALLED} | - | - | -"
        else:
            c = timings[f"cpprb {key}"]
            theirs_cols = (
                f"{fmt_rate(c.rate)} | {fmt_us(pct(c.iters, 50))} | {fmt_us(pct(c.iters, 99))} | "
                f"{ratio(ours.rate, c.rate)}"
            )
        return (
            f"| {label} | {what} | {fmt_rate(ours.rate)} | {fmt_us(pct(ours.iters, 50))} | "
            f"{fmt_us(pct(ours.iters, 99))} | {theirs_cols} |"
        )

    print(f"## memory: SumTree vs cpprb.PrioritizedReplayBuffer, {n:,} items\n")
    print(f"alpha {alpha}, beta {beta}, batch {batch}, {args.iters} iterations x {args.repeats} "
          f"repeats (bulk: {bulk_iters} x {args.update_batch:,} ids); rates are medians over "
          "repeats, per-iteration times over all iterations.\n")  # fmt: skip
    print("| case | unit | ours | ours p50/iter | ours p99/iter | cpprb | cpprb p50/iter | "
          "cpprb p99/iter | ours/cpprb |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    print(row(f"sample {batch} + update {batch}", "loop", "samples/s"))
    print(row(f"sample {batch} (+ IS weights, ids)", "sample", "samples/s"))
    print(row(f"update {batch} priorities", "update", "updates/s"))
    print(row(f"update {args.update_batch:,} random ids", "bulk", "updates/s"))
    print(
        f"| build from {n:,} priorities | s | {fmt_s(build_s)} | - | - | "
        + (NOT_INSTALLED if rb is None else fmt_s(cpprb_build_s))
        + " (add with priorities) | - | - | "
        + ("-" if rb is None else ratio(cpprb_build_s, build_s))
        + " (speed) |"
    )
    print()
    print(
        f"Sanity: mean sampled priority expected {expect_mean:.5f}, ours {sanity['ours']:.5f}"
        + (
            ""
            if rb is None
            else f", cpprb {sanity['cpprb']:.5f}; our importance weights for cpprb's indexes "
            f"differ from cpprb's (float32) by at most "
            f"{sanity['max_rel_diff_weights_vs_cpprb']:.1e} relative"
        )
        + ".\n"
    )

    bars: list[dict[str, Any]] = []
    if rb is not None:
        r = timings["ours loop"].rate / timings["cpprb loop"].rate
        bars.append({"bar": "sample+update >= 1.0x cpprb", "pass": r >= SAMPLE_BAR,
                     "text": f"{r:.2f}x"})  # fmt: skip
    else:
        bars.append({"bar": "sample+update >= 1.0x cpprb", "pass": False, "text": NOT_INSTALLED})
    up = timings["ours bulk"].rate
    bars.append({"bar": "in-memory updates >= 1M/s", "pass": up >= UPDATE_BAR,
                 "text": fmt_rate(up)})  # fmt: skip
    build_text = f"{fmt_s(build_s)} at {n:,} items"
    if n < BUILD_BAR_ITEMS:
        build_text += f" (the bar is at {BUILD_BAR_ITEMS:,}: run with --items {BUILD_BAR_ITEMS})"
    bars.append({"bar": "build <= 0.5 s at 1M", "pass": build_s <= BUILD_BAR_S,
                 "text": build_text})  # fmt: skip
    for b in bars:
        print(bar_line(b["pass"], f"{b['bar']}: {b['text']}"))
    print()

    result["timings"] = {k: v.as_dict() for k, v in timings.items()}
    result["build_s"] = {"ours": build_s, "cpprb_fill": cpprb_build_s}
    result["bars"] = bars
    return result


def section_store(args: argparse.Namespace) -> dict[str, Any]:
    """The store: durable ``update_priorities`` (10k ids per call), the sampler's rebuild on
    open (reading the ``prio`` table + building the trees), and ``store.sample`` end to end."""
    import shutil
    import tempfile

    from xpstore import Store
    from xpstore.demo.synthetic import make_prediction

    n = args.items
    root = Path(tempfile.mkdtemp(prefix="xpstore-sampling-"))
    path = root / "store"
    rng = np.random.default_rng(args.seed)
    try:
        t0 = perf()
        with Store.open(path, create=True, durability="none") as st:
            proto = [make_prediction(rng) for _ in range(1000)]
            for lo in range(0, n, 10_000):
                st.put_many([proto[(lo + i) % 1000].model_copy(update={"ts": None})
                             for i in range(min(10_000, n - lo))])  # fmt: skip
        load_s = perf() - t0
        opens: list[float] = []
        updates: list[float] = []
        samples: list[float] = []
        filt_first: list[float] = []
        filt: list[float] = []
        batch = args.batch
        for rep in range(3):
            with Store.open(path) as st:
                t0 = perf()
                st.sample(1, seed=rep)  # attach: read the prio table, build the trees
                opens.append(perf() - t0)
                ids = rng.integers(1, n + 1, size=args.update_batch).tolist()
                for _ in range(5):
                    prios = rng.uniform(0.01, 10.0, size=len(ids)).tolist()
                    t0 = perf()
                    st.update_priorities(ids, prios)
                    updates.append((perf() - t0) / len(ids))
                for _ in range(50):
                    t0 = perf()
                    st.sample(batch, kind="prediction")
                    samples.append(perf() - t0)
                where = {"context": "warm_start"}
                t0 = perf()
                st.sample(batch, kind="prediction", where=where)
                filt_first.append(perf() - t0)
                for _ in range(20):
                    t0 = perf()
                    st.sample(batch, kind="prediction", where=where)
                    filt.append(perf() - t0)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med_open = statistics.median(opens)
    upd_rate = 1.0 / statistics.median(updates)
    print(f"## store ({n:,} predictions; loaded in {load_s:.1f} s with durability none)\n")
    print("| case | median | p99 | rate |")
    print("|---|---:|---:|---:|")
    print(f"| sampler rebuild on open (prio table -> trees) | {fmt_s(med_open)} | - | - |")
    print(f"| update_priorities, {args.update_batch:,} ids per call (durable: one fsync) | "
          f"{fmt_s(statistics.median(updates) * args.update_batch)} per call | - | "
          f"{fmt_rate(upd_rate)} updates/s |")  # fmt: skip
    print(f"| store.sample({batch}) end to end (draw + decode {batch} records) | "
          f"{fmt_us(statistics.median(samples))} | {fmt_us(pct(samples, 99))} | "
          f"{fmt_rate(batch / statistics.median(samples))} samples/s |")  # fmt: skip
    print(f"| store.sample({batch}, where=context) first call (scans the kind once) | "
          f"{fmt_s(statistics.median(filt_first))} | - | - |")  # fmt: skip
    print(f"| store.sample({batch}, where=context) later calls (cached id set) | "
          f"{fmt_us(statistics.median(filt))} | {fmt_us(pct(filt, 99))} | "
          f"{fmt_rate(batch / statistics.median(filt))} samples/s |")  # fmt: skip
    ok = med_open <= BUILD_BAR_S or n < BUILD_BAR_ITEMS
    print()
    print(bar_line(ok, f"sampler rebuild on open <= 0.5 s at 1M: {fmt_s(med_open)} at {n:,}"))
    print()
    return {"open_s": opens, "update_s_per_id": updates, "sample_s": samples, "load_s": load_s,
            "where_first_s": filt_first, "where_s": filt}


# ---------------------------------------------------------------------------- main

SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "memory": section_memory,
    "store": section_store,
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sections", default="memory", help=f"comma-separated: {','.join(SECTIONS)}")
    p.add_argument("--items", type=int, default=100_000, help="items in the sampler")
    p.add_argument("--batch", type=int, default=256, help="sample batch size")
    p.add_argument("--alpha", type=float, default=0.6)
    p.add_argument("--beta", type=float, default=0.4)
    p.add_argument("--iters", type=int, default=400, help="timed iterations per case per repeat")
    p.add_argument("--update-batch", type=int, default=10_000, help="ids per bulk update")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        p.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    if args.items < args.batch or args.items < 1000:
        p.error("need --items >= 1000 and >= --batch")

    info = machine()
    print("# xpstore priority sampling benchmark (issue 5)\n")
    print(
        f"- date: {info['date']}; machine: {info['nproc']} cores, {info['cpu']}, Linux "
        f"{info['kernel']}; Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    )
    print(f"- command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
    started = perf()
    results: dict[str, Any] = {"machine": info, "args": vars(args)}
    for name in names:
        results[name] = SECTIONS[name](args)
    results["run_s"] = perf() - started
    print(f"run took {results['run_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
