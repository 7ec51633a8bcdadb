"""Self-tuning benchmark (issue 12): the auto-tuner's strategies against the default config, the
profiler's overhead, and hot-track prewarming. Three parts, each one process run, every figure
beside its baseline from the same run:

1. **strategies** (``--tracks``, default 20 000; the issue's size is 100 000): a store of
   synthetic tracks in eight styles (HNSW). The workload: ``similar(track_id)`` with a Zipf(1.1)
   popularity over the tracks (``--queries`` single queries) while a thread ingests new
   fingerprints (``--ingest-rate`` per second, batches of 20), then ``similar_many`` in batches of
   100 (queries/s). Recall@10 of single queries against exact search over the live vectors, on
   300 uniformly drawn tracks (not the tuner's own probes), and the index's memory (its
   serialized size). For each strategy the config goes back to the defaults (rebuilt when the
   graph changed), the default is measured, the tuner runs until it has nothing to change (at
   most ``--runs`` runs), and the tuned config is measured the same way. Bars: latency p99 of
   ``similar`` -25 % with recall >= the floor; throughput ``similar_many`` q/s +20 %; cost index
   memory -40 % with recall >= the floor.
2. **overhead**: what profiling the store's own calls adds per call (``Telemetry.observe`` and
   the ``@timed`` wrapper: a decorated method against the same method undecorated, 1M calls
   each), and ``profile(query_type)`` over 1M metrics (fed through ``Profiler.add``, the path the
   rebuild on open takes, spread over the 24 hourly slots), median of 50 calls; bars 2 us, 10 ms.
3. **prewarm**: Zipf(1.1) ``similar(track_id)`` on a store whose history (an earlier session's
   lookups, logged as retrieval counts) makes some tracks hot; each round reopens the store
   twice, once attaching ``Tuning(prewarm=False)`` and once ``Tuning(prewarm=True)``, and runs
   the same ``--prewarm-queries`` queries: answer-cache hit rate and ``similar`` p50.

    PYTHONPATH=. python benchmarks/tuning.py [--parts strategies,overhead,prewarm
        --tracks 20000 --queries 3000 --dir /tmp --json tuning.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from xpstore import Store, Tuning
from xpstore.demo.synthetic import make_fingerprint, make_query_metric
from xpstore.index.backends import exact_knn
from xpstore.model.records import Experience, QueryMetric
from xpstore.persistence.telemetry import Telemetry
from xpstore.store.engine import timed
from xpstore.tuning import AutoTuner, PatternDetector, Profiler
from xpstore.tuning.probes import live_vectors

DEFAULTS = {"index.ef_search": 64, "index.nprobe": 32, "index.hnsw_m": 32,
            "index.query_threads": 1, "index.answer_cache": 100_000, "index.delta_ratio": 0.1,
            "apply.batch_ops": 10_000, "apply.interval_ms": 200.0}  # fmt: skip


def zipf_tracks(rng: np.random.Generator, n_tracks: int, n: int, s: float = 1.1) -> list[str]:
    """``n`` track ids drawn with P(rank r) ~ 1/r**s over a random popularity order."""
    ranks = np.arange(1, n_tracks + 1, dtype=np.float64)
    p = ranks**-s
    p /= p.sum()
    order = rng.permutation(n_tracks)
    picks = rng.choice(n_tracks, size=n, p=p)
    return [f"t{int(order[i])}" for i in picks]


def build_store(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with Store.open(path, create=True, durability="none", index_build_in="process") as store:
        for i in range(0, n, 5000):
            store.put_many([make_fingerprint(rng, f"t{j}") for j in range(i, min(n, i + 5000))])
        store.rebuild_index()


# --------------------------------------------------------------------------- strategies


def _recall(store: Store, rng: np.random.Generator, n_tracks: int, k: int = 10) -> float:
    mgr = store.parts.index.manager
    assert mgr is not None and mgr.server is not None
    server = mgr.server
    ids, vecs = live_vectors(server)  # main minus tombstones, plus the delta
    tracks = [f"t{int(i)}" for i in rng.choice(n_tracks, size=300, replace=False)]
    own = [store.parts.reader.read_track(t) for t in tracks]
    q = np.vstack([server.vector_of(int(r)) for r in own if r is not None])
    top = exact_knn(q, vecs, k + 1)
    hits = 0
    for t, rid, row in zip(tracks, own, top.tolist(), strict=True):
        want = {int(ids[p]) for p in row if int(ids[p]) != rid}
        got = {n.record_id for n in store.similar(t, k=k)}
        hits += len(want & got)
    return hits / (k * len(tracks))


def measure(store: Store, args: argparse.Namespace, seed: int,
            n: int | None = None) -> dict[str, Any]:  # fmt: skip
    """The workload under the config in force (``n`` queries, default ``--queries``)."""
    rng = np.random.default_rng(seed)
    queries = zipf_tracks(rng, args.tracks, n or args.queries)
    stop = threading.Event()
    ingest_rng = np.random.default_rng(seed + 1)
    counter = [0]

    def ingest() -> None:
        while not stop.is_set():
            base = f"new{seed}-{counter[0]}"
            store.put_many([make_fingerprint(ingest_rng, f"{base}-{i}") for i in range(20)])
            counter[0] += 1
            stop.wait(20 / args.ingest_rate)

    thread = threading.Thread(target=ingest, daemon=True)
    thread.start()
    lat = []
    try:
        for t in queries:
            t0 = time.perf_counter()
            store.similar(t)
            lat.append(time.perf_counter() - t0)
    finally:
        stop.set()
        thread.join()
    server = store.parts.index.serving()
    vec_rows = [server.vector_of(int(r)) for t in queries[:1000]
                if (r := store.parts.reader.read_track(t)) is not None]  # fmt: skip
    vecs = np.vstack([v for v in vec_rows if v is not None])
    qps = []
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(0, len(vecs), 100):
            store.similar_many(vecs[i : i + 100])
        qps.append(len(vecs) / (time.perf_counter() - t0))
    backend = server.main.backend
    assert backend is not None
    arr = np.array(lat) * 1000
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p90_ms": float(np.percentile(arr, 90)),
        "p99_ms": float(np.percentile(arr, 99)),
        "qps_many": statistics.median(qps),
        "recall": _recall(store, np.random.default_rng(seed + 2), args.tracks),
        "memory_bytes": backend.memory_bytes(),
        "config": {k: store.config.get(k) for k in DEFAULTS},
        "ingested": counter[0] * 20,
    }


def strategies(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    path = work / "strategies"
    t0 = time.perf_counter()
    build_store(path, args.tracks, args.seed)
    out: dict[str, Any] = {"tracks": args.tracks, "build_s": time.perf_counter() - t0,
                           "results": {}}  # fmt: skip
    with Store.open(path, durability="none", index_build_in="process") as store:
        for strat in args.strategies.split(","):
            rebuild = store.config.index.hnsw_m != DEFAULTS["index.hnsw_m"]
            store.reconfigure(**DEFAULTS)
            if rebuild:
                store.rebuild_index()
            default = measure(store, args, args.seed)
            tuner = AutoTuner(store, Profiler(store, background=False), strategy=strat,
                              recall_floor=args.floor, seed=args.seed,
                              background=False)  # fmt: skip
            log = []
            for run in range(args.runs):
                measure(store, args, args.seed + 1000 + run, n=args.queries // 4)  # traffic
                res = tuner.run()
                log.append(res)
                if res["change"] is None and not tuner.pending:
                    break
            if tuner.pending:  # judged by this strategy, not by the next one's tuner
                measure(store, args, args.seed + 2000, n=args.queries // 4)
                log.append({"judged": tuner.judge_pending(), "change": None})
            tuned_cfg = {k: store.config.get(k) for k in DEFAULTS}
            live_default = {k: v for k, v in DEFAULTS.items() if k != "index.hnsw_m"}
            live_tuned = {k: v for k, v in tuned_cfg.items() if k != "index.hnsw_m"}
            pairs: dict[str, list[dict[str, Any]]] = {"default": [], "tuned": []}
            for r in range(args.rounds):  # interleaved, same index: live knobs switched back
                order = (("default", live_default), ("tuned", live_tuned))
                for name, cfg in order if r % 2 == 0 else order[::-1]:
                    store.reconfigure(**cfg)
                    pairs[name].append(measure(store, args, args.seed + 10 * r))
            store.reconfigure(**live_tuned)
            tuned = _median(pairs["tuned"])
            same_index_default = _median(pairs["default"])
            out["results"][strat] = {"default_before_tuning": default,
                                     "default_same_index": same_index_default,
                                     "tuned": tuned, "rounds": pairs, "runs": log,
                                     "decisions": len(tuner.history())}  # fmt: skip
            tuner.close()
            pad = " " * len(strat)
            print(f"{strat}: default (before tuning) {fmt(default)}\n"
                  f"{pad}  default (same index, median of {args.rounds}) "
                  f"{fmt(same_index_default)}\n"
                  f"{pad}  tuned   (median of {args.rounds}) {fmt(tuned)}", flush=True)  # fmt: skip
    return out


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for key in ("p50_ms", "p90_ms", "p99_ms", "qps_many", "recall", "memory_bytes"):
        out[key] = statistics.median(r[key] for r in rows)
    return out


def fmt(m: dict[str, Any]) -> str:
    return (f"p99 {m['p99_ms']:.3f} ms, p90 {m['p90_ms']:.3f} ms, p50 {m['p50_ms']:.3f} ms, "
            "similar_many "
            f"{m['qps_many']:.0f} q/s, recall {m['recall']:.3f}, index "
            f"{m['memory_bytes'] / 2**20:.1f} MiB, {m['config']}")  # fmt: skip


# --------------------------------------------------------------------------- overhead


class _Plain:
    def __init__(self, telemetry: Telemetry) -> None:
        self._engine = type("E", (), {"telemetry": telemetry})()

    def call(self, x: int) -> int:
        return x + 1

    @timed("bench")
    def timed_call(self, x: int) -> int:
        return x + 1


def overhead(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    tel = Telemetry()
    obj = _Plain(tel)
    n = 1_000_000
    rounds: dict[str, list[float]] = {"plain": [], "timed": [], "observe": []}
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            obj.call(i)
        rounds["plain"].append((time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for i in range(n):
            obj.timed_call(i)
        rounds["timed"].append((time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        for _i in range(n):
            tel.observe("x", 1e-5)
        rounds["observe"].append((time.perf_counter() - t0) / n)
    med = {k: statistics.median(v) * 1e6 for k, v in rounds.items()}
    added = med["timed"] - med["plain"]
    # profile() over 1M metrics, through Profiler.add (the path of the rebuild on open)
    path = work / "overhead"
    rng = np.random.default_rng(args.seed)
    with Store.open(path, create=True, durability="none") as store:
        prof = Profiler(store, background=False)
        samples = [make_query_metric(rng) for _ in range(2000)]
        now = time.time()
        t0 = time.perf_counter()
        for i in range(args.metrics):
            rec = samples[i % len(samples)]
            ts = now - (i % 86_000)
            model = QueryMetric.model_construct(**{**dict(rec), "ts": ts})
            prof.add(Experience(i + 1, "query_metric", ts, model, i + 1))
        feed = time.perf_counter() - t0
        qt = samples[0].query_type
        times = []
        for _ in range(50):
            t0 = time.perf_counter()
            res = prof.profile(qt)
            times.append(time.perf_counter() - t0)
        count = res["types"][qt]["count"]
        prof.close()
    out = {"per_call_us": med, "added_per_call_us": added, "metrics": args.metrics,
           "profile_ms": statistics.median(times) * 1000, "profile_count": count,
           "feed_us_per_metric": feed / args.metrics * 1e6}  # fmt: skip
    print(f"overhead: @timed adds {added:.3f} us per call (plain {med['plain']:.3f}, timed "
          f"{med['timed']:.3f}, observe alone {med['observe']:.3f}); profile({qt!r}) over "
          f"{args.metrics} metrics: {out['profile_ms']:.2f} ms (median of 50); feeding "
          f"{out['feed_us_per_metric']:.1f} us/metric", flush=True)  # fmt: skip
    return out


# --------------------------------------------------------------------------- prewarm


def _session(path: Path, queries: list[str], prewarm: bool) -> dict[str, float]:
    with Store.open(path, durability="none", index_auto_rebuild=False) as store:
        t0 = time.perf_counter()
        tuning = Tuning(store, background=False, monitor=False, prewarm=prewarm)
        attach = time.perf_counter() - t0
        store.parts.index.serving()  # attached either way before the clock starts
        before = store.parts.telemetry.counters()
        lat = []
        for t in queries:
            q0 = time.perf_counter()
            # the metadata read too: it is what the answer cache saves (read lazily, at the
            # first access; a caller that never reads it neither hits nor misses the cache)
            [h.metadata for h in store.similar(t)]
            lat.append(time.perf_counter() - q0)
        after = store.parts.telemetry.counters()
        tuning.close()
    hits = after.get("answers.hits", 0) - before.get("answers.hits", 0)
    misses = after.get("answers.misses", 0) - before.get("answers.misses", 0)
    arr = np.array(lat) * 1000
    return {"hit_rate": hits / max(1.0, hits + misses), "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)), "attach_s": attach}  # fmt: skip


def prewarm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    path = work / "prewarm"
    build_store(path, args.tracks, args.seed)
    rng = np.random.default_rng(args.seed + 7)
    history = zipf_tracks(rng, args.tracks, args.history)
    with Store.open(path, durability="none") as store:  # an earlier session's lookups
        det = PatternDetector(store)
        for t in history:
            store.similar(t)
        det.flush()
        hot = len(det.hot())
        det.close()
    rows: dict[str, list[dict[str, float]]] = {"cold": [], "prewarmed": []}
    for r in range(args.rounds):
        queries = zipf_tracks(np.random.default_rng(args.seed + 100 + r), args.tracks,
                              args.prewarm_queries)  # fmt: skip
        for name, flag in (("cold", False), ("prewarmed", True)) if r % 2 == 0 else (
            ("prewarmed", True), ("cold", False)
        ):  # fmt: skip
            rows[name].append(_session(path, queries, flag))
    summary = {name: {k: statistics.median(x[k] for x in v) for k in v[0]}
               for name, v in rows.items()}  # fmt: skip
    print(f"prewarm ({hot} hot tracks): cold {summary['cold']}\n"
          f"                        prewarmed {summary['prewarmed']}", flush=True)  # fmt: skip
    return {"hot_tracks": hot, "rounds": rows, "median": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--parts", default="strategies,overhead,prewarm")
    p.add_argument("--tracks", type=int, default=20_000)
    p.add_argument("--queries", type=int, default=3000)
    p.add_argument("--ingest-rate", type=float, default=200.0, help="fingerprints per second")
    p.add_argument("--strategies", default="latency,throughput,cost,balanced")
    p.add_argument("--runs", type=int, default=8, help="tuner runs per strategy, at most")
    p.add_argument("--floor", type=float, default=0.95)
    p.add_argument("--metrics", type=int, default=1_000_000)
    p.add_argument("--history", type=int, default=20_000, help="earlier lookups (prewarm)")
    p.add_argument("--prewarm-queries", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--switch-interval-ms", type=float, default=None,
                   help="sys.setswitchinterval for the whole run (Python's default: 5 ms): how "
                        "long a thread waiting for the GIL may wait for a busy one")  # fmt: skip
    args = p.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    work = Path(tempfile.mkdtemp(prefix="xpstore-tuning-", dir=args.dir))
    out: dict[str, Any] = {"machine": platform.platform(), "cpus": os.cpu_count(),
                           "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    try:
        for part in args.parts.split(","):
            out[part] = {"strategies": strategies, "overhead": overhead,
                         "prewarm": prewarm}[part](args, work)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
