"""Data out of the store (issue 16): export, batch iterators, the Milvus follower.

Sections (``--sections``, comma-separated, in order):

``export`` -- a store of ``--predictions`` prediction records. Per repeat, alternating order:
  the *physical floor* (one LMDB read transaction and a cursor over ``records``: what py-lmdb
  costs to hand every key and value to Python, nothing decoded), the *decode floor* (the same
  cursor and ``msgpack.unpackb`` of every envelope: what a reader that builds Python objects
  pays before it builds anything), ``store.to_arrow("prediction")``, ``xpstore export --format
  parquet`` into a temporary directory (rows/s, files fsynced), and ``store.scan`` (pydantic
  envelopes) over ``--scan-limit`` records for reference. Each case is timed by the wall clock
  and by this process's CPU time (``time.process_time``): on a shared machine the second is
  what the work needed, the first also holds the time other processes had the cores. Bar:
  export >= 200k records/s at 1M predictions.

``batches`` -- the same store: ``store.batches(256)`` (prioritized, numpy) against
  ``store.sample(256)`` followed by the same arrays built from the envelopes (what a learner
  did before). Samples/s over ``--batch-iters`` batches after one warm-up batch (the
  sampler's attach). Bar: >= 50k samples/s at batch 256 from a 1M store.

``milvus`` -- a store of ``--tracks`` fingerprints (index rebuilt): the follower's catch-up of
  the whole library into an empty Milvus Lite collection (one LMDB read, embedded, upserted),
  its throughput on the change feed (``--updates`` puts, half superseding, then one run), and
  ``similar(track, k=10)`` latency through Milvus Lite against the local FAISS index, the
  same ``--queries`` tracks alternating (median, p99). Milvus Lite runs in this process
  (its gRPC server on threads), as the issue's "Milvus Lite" figures ask.

    PYTHONPATH=. python benchmarks/dataflow.py [--sections export,batches,milvus]
        [--predictions 100000 --tracks 20000 --updates 5000 --queries 200 --repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from _common import cpu_busy as _cpu_busy

from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint, make_prediction
from xpstore.persistence.retrievals import FOLD_COUNTS
from xpstore.store.batches import FEATURES

perf = time.perf_counter
EXPORT_BAR = 200_000.0
BATCH_BAR = 50_000.0


def _fill_predictions(path: Path, n: int) -> Store:
    rng = np.random.default_rng(0)
    store = Store.open(path, create=True, durability="none")
    step = 50_000
    for start in range(0, n, step):
        recs = [make_prediction(rng, f"t{i % 5000}", ts=1_000.0 + i)
                for i in range(start, min(n, start + step))]  # fmt: skip
        store.put_many(recs)
    store.flush()
    return store


class CpuWatch:
    """CPU share other processes used since construction (NOISY above 10 %)."""

    def __init__(self) -> None:
        self.t0 = perf()
        self.b0, self.o0 = _cpu_busy()

    def report(self, what: str) -> None:
        busy, own = _cpu_busy()
        wall = perf() - self.t0
        share = max(0.0, (busy - self.b0) - (own - self.o0)) / (wall * (os.cpu_count() or 1))
        noisy = " (NOISY: compare ratios only)" if share > 0.1 else ""
        print(f"\nother processes used {share:.0%} of the machine's CPU during {what}{noisy}")


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def _rate_table(title: str, rates: dict[str, list[float]], base: str, unit: str) -> None:
    print(f"\n### {title}\n")
    print(f"| case | median {unit} | min | max | / {base} |")
    print("|---|---:|---:|---:|---:|")
    b = _median(rates[base])
    for name, xs in rates.items():
        m = _median(xs)
        print(f"| {name} | {m:,.0f} | {min(xs):,.0f} | {max(xs):,.0f} | {m / b:.2f} |")


# ---------------------------------------------------------------------------- export


def export_section(store: Store, n: int, repeats: int, scan_limit: int) -> None:
    tables = store.parts.engine.tables
    tmp = Path(tempfile.mkdtemp(prefix="xps-export-"))

    def cursor() -> int:
        with tables.reading() as txn:
            cur = txn.cursor(db=tables.db(b"records"))
            return sum(1 for _ in cur.iternext(keys=True, values=True))

    def floor() -> int:
        with tables.reading() as txn:
            cur = txn.cursor(db=tables.db(b"records"))
            unpack = msgpack.unpackb
            return sum(1 for v in cur.iternext(keys=False, values=True) if unpack(v, raw=False))

    def to_arrow() -> int:
        rows: int = store.to_arrow("prediction").num_rows
        return rows

    def parquet() -> int:
        out = tmp / "out"
        shutil.rmtree(out, ignore_errors=True)
        report = store.parts.export.export(out, "parquet", ["prediction"], None, None, None,
                                           131_072, None)  # fmt: skip
        rows: int = report["kinds"]["prediction"]["rows"]
        return rows

    def scan() -> int:
        return sum(1 for _ in store.scan("prediction", limit=min(n, scan_limit)))

    floor_name = "decode floor (cursor + msgpack)"
    cases: dict[str, Callable[[], int]] = {
        "physical floor (cursor only, nothing decoded)": cursor,
        floor_name: floor,
        "store.to_arrow": to_arrow,
        "export parquet (files fsynced)": parquet,
        f"store.scan (pydantic, first {min(n, scan_limit):,})": scan,
    }
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    to_arrow()  # warm-up: the process's first large allocations, pyarrow's lazy imports
    watch = CpuWatch()
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in order:
            t, c = perf(), time.process_time()
            rows = cases[name]()
            wall[name].append(rows / (perf() - t))
            cpu[name].append(rows / (time.process_time() - c))
    watch.report("the export runs")
    _rate_table(f"Export of {n:,} predictions (wall clock)", wall, floor_name, "records/s")
    _rate_table(f"Export of {n:,} predictions (CPU time of this process)", cpu, floor_name,
                "records/CPU-s")  # fmt: skip
    best = _median(wall["export parquet (files fsynced)"])
    verdict = "PASS" if best >= EXPORT_BAR else "MISS"
    print(f"\nbar: export >= {EXPORT_BAR:,.0f} records/s at 1M: {best:,.0f} at {n:,} -> {verdict}"
          f" (per CPU-second of this process: "
          f"{_median(cpu['export parquet (files fsynced)']):,.0f})")  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- batches


def batches_section(store: Store, repeats: int, iters: int, size: int = 256) -> None:
    it = store.batches(size, kind="prediction")
    next(it)  # attach the sampler (reads the prio table once)
    quiet = store.batches(size, kind="prediction", count_retrievals=False)
    names = FEATURES["prediction"]

    def ours() -> float:
        t = perf()
        for _ in range(iters):
            next(it)
        return iters * size / (perf() - t)

    def uncounted() -> float:
        t = perf()
        for _ in range(iters):
            next(quiet)
        return iters * size / (perf() - t)

    def baseline() -> float:
        t = perf()
        for _ in range(iters):
            batch = store.sample(size, kind="prediction")
            recs = [e.record for e in batch.records]
            feats = np.array([[(getattr(r, "audio_features", None) or {}).get(f, np.nan)
                               for f in names] for r in recs], dtype=np.float32)  # fmt: skip
            labels = np.array([getattr(r, "actual", None) or "" for r in recs])
            rewards = np.array([getattr(r, "reward", None) or np.nan for r in recs])
            assert feats.shape == (size, len(names)) and len(labels) == len(rewards)
        return iters * size / (perf() - t)

    cases = [("store.sample + arrays (baseline)", baseline), ("store.batches (numpy)", ours),
             ("store.batches (count_retrievals=False)", uncounted)]  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name, _ in cases}
    watch = CpuWatch()
    for r in range(repeats):
        for name, fn in cases if r % 2 == 0 else reversed(cases):
            rates[name].append(fn())
    watch.report("the batch runs")
    _rate_table(f"Training batches of {size} ({iters} per repeat)", rates,
                "store.sample + arrays (baseline)", "samples/s")  # fmt: skip
    # the counted path logs its counts and folds them into the rows every FOLD_COUNTS counts:
    # one timed run long enough to hold two folds, so their cost is in the figure
    tables = store.parts.engine.tables
    long_iters = -(-2 * FOLD_COUNTS // size) + 1
    folds = _Folds(tables.retrievals)
    t, c = perf(), time.process_time()
    for _ in range(long_iters):
        next(it)
    wall, cpu = perf() - t, time.process_time() - c
    folds.stop()
    steady = long_iters * size / wall
    print(f"\nstore.batches (numpy), counted, one run of {long_iters} batches holding "
          f"{folds.n} folds of the logged counts into the rows ({folds.seconds:.2f} s in "
          f"them before their commits, longest {folds.longest * 1e3:.0f} ms): "
          f"{steady:,.0f} samples/s wall, "
          f"{long_iters * size / cpu:,.0f} samples/s of this process's CPU")  # fmt: skip
    results = {name: _median(rates[name]) for name in rates}
    results["store.batches (numpy), with folds"] = steady
    for name in ("store.batches (numpy)", "store.batches (numpy), with folds",
                 "store.batches (count_retrievals=False)"):  # fmt: skip
        got = results[name]
        verdict = "PASS" if got >= BATCH_BAR else "MISS"
        print(f"\nbar: >= {BATCH_BAR:,.0f} samples/s at batch {size}, {name}: {got:,.0f} -> "
              f"{verdict}")  # fmt: skip


class _Folds:
    """Times the folds of logged retrieval counts while installed (wraps the log's method)."""

    def __init__(self, log: Any) -> None:
        self.log, self.n, self.seconds, self.longest = log, 0, 0.0, 0.0
        inner = log.fold

        def timed(txn: Any) -> int:
            t0 = perf()
            try:
                return int(inner(txn))
            finally:
                took = perf() - t0
                self.n += 1
                self.seconds += took
                self.longest = max(self.longest, took)

        log.fold = timed

    def stop(self) -> None:
        del self.log.fold  # the class's method again


# ---------------------------------------------------------------------------- milvus


def milvus_section(root: Path, tracks: int, updates: int, queries: int, repeats: int) -> None:
    from xpstore.store.milvus import Follower, MilvusMirror, connect

    rng = np.random.default_rng(1)
    path = root / "fp"
    uri = str(root / "milvus.db")
    store = Store.open(path, create=True, durability="none")
    step = 20_000
    for start in range(0, tracks, step):
        store.put_many([make_fingerprint(rng, f"t{i}")
                        for i in range(start, min(tracks, start + step))])  # fmt: skip
    store.rebuild_index()
    store.flush()
    kind = store.index_status()["kind"]

    def follow() -> Any:
        with Store.open(path, readonly=True) as ro:
            p = ro.parts
            mirror = MilvusMirror(connect(uri, 30.0), "bench")
            return Follower(p.engine, p.reader, p.index, p.changes, mirror,
                            ro.config.milvus).run()  # fmt: skip

    watch = CpuWatch()
    t = perf()
    first = follow()
    catch_up = perf() - t
    print(f"\n### Milvus Lite follower ({tracks:,} tracks, index {kind})\n")
    print("| step | operations | seconds | per second |")
    print("|---|---:|---:|---:|")
    print(f"| catch-up of the whole library (one LMDB read) | {first.upserted:,} | "
          f"{catch_up:.2f} | {first.upserted / catch_up:,.0f} |")  # fmt: skip
    puts = [make_fingerprint(rng, f"t{i}" if i % 2 == 0 else f"new{i}") for i in range(updates)]
    for start in range(0, len(puts), 1000):
        store.put_many(puts[start : start + 1000])
    store.flush()
    t = perf()
    feed = follow()
    dt_feed = perf() - t
    print(f"| change feed: {updates:,} puts (half supersede) | {feed.operations:,} | "
          f"{dt_feed:.2f} | {feed.operations / dt_feed:,.0f} |")  # fmt: skip
    if feed.resyncs:
        print("(the feed run resynchronized: an index rebuild or a checkpoint intervened)")
    watch.report("the follower runs")

    ids = [f"t{int(i)}" for i in rng.integers(0, tracks, size=queries)]
    local: list[float] = []
    remote: list[float] = []
    store.close()
    with Store.open(path, index_backend="milvus", milvus_uri=uri, milvus_collection="bench",
                    index_auto_rebuild=False) as s:  # fmt: skip
        milvus = s.parts.milvus
        s.similar(ids[0], k=10)
        s.reconfigure(**{"index.backend": "faiss"})
        s.similar(ids[0], k=10)
        watch = CpuWatch()
        for r in range(repeats):
            for backend in (("faiss", "milvus") if r % 2 == 0 else ("milvus", "faiss")):
                s.reconfigure(**{"index.backend": backend})
                out = local if backend == "faiss" else remote
                for tr in ids:
                    t = perf()
                    s.similar(tr, k=10)
                    out.append((perf() - t) * 1e3)
        fallbacks = milvus.fallbacks
        watch.report("the queries")
    print(f"\n### similar(track, k=10), {queries} tracks x {repeats} repeats\n")
    print("| engine | median ms | p99 ms | / local |")
    print("|---|---:|---:|---:|")
    lm = _median(local)
    print(f"| local FAISS ({kind}) | {lm:.3f} | {_p99(local):.3f} | 1.00 |")
    print(f"| Milvus Lite (in-process gRPC) | {_median(remote):.3f} | {_p99(remote):.3f} | "
          f"{_median(remote) / lm:.1f} |")  # fmt: skip
    print(f"\n(fallbacks to the local index during the Milvus runs: {fallbacks})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sections", default="export,batches,milvus")
    ap.add_argument("--predictions", type=int, default=100_000)
    ap.add_argument("--scan-limit", type=int, default=100_000)
    ap.add_argument("--batch-iters", type=int, default=200)
    ap.add_argument("--tracks", type=int, default=20_000)
    ap.add_argument("--updates", type=int, default=5_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sections = args.sections.split(",")
    print(f"# dataflow benchmark: {' '.join(sys.argv[1:])}")
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="xps-dataflow-"))
    try:
        if "export" in sections or "batches" in sections:
            t = perf()
            store = _fill_predictions(root / "pred", args.predictions)
            print(f"\nfilled {args.predictions:,} predictions in {perf() - t:.1f} s")
            with store:
                if "export" in sections:
                    export_section(store, args.predictions, args.repeats, args.scan_limit)
                if "batches" in sections:
                    batches_section(store, args.repeats, args.batch_iters)
        if "milvus" in sections:
            milvus_section(root, args.tracks, args.updates, args.queries, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
