"""Similar-track lookup benchmark (issue 4): ``Store.similar`` against raw FAISS and hnswlib.

One run, per size N (default 20 000; the issue's 100 000 and 1 000 000 by hand):

1. **Data.** N synthetic tracks in eight style clusters
   (``xpstore.demo.synthetic.sample_batch_values``
   per style; with ``--embedding-dim`` an embedding near a per-style centroid as well), loaded with
   ``put_many`` in batches (durability ``none``: loading is not what is measured), plus
   ``--queries`` held-out tracks of the same styles that are never stored: the query vectors
   (embedded with the index's own statistics), so queries land near, not on, stored tracks.
2. **Initial build.** The first index call attaches the index (the library goes to the exact
   delta) and builds the main index in a child process (``index_build_in="process"``,
   ``index_build_threads=1``); HNSW from ``index_exact_below`` (10 000) up.
3. **Single queries, at rest**, two passes over the same queries (first ask; asked again, when
   the store's answer cache and the CPU caches are warm), interleaved (each case on a different
   query at a time, order rotated):
   ``store.similar(vector=q)`` (ids, tracks and scores read: metadata is loaded lazily, at
   its first access); the same with every answer's ``metadata`` read (one read for the
   call's answers missing from the answer cache); raw ``index.search`` on the store's own
   FAISS index object (same
   efSearch, same OpenMP threads as the store's single-query path) plus a dict lookup of the ids
   to track ids (the bar's baseline); ``store.similar(track_id)`` of random stored tracks (end to
   end: LMDB track map, the stored vector, the search, the result mapping); hnswlib (same
   vectors, M=32, ef_construction=128, ef=64) plus the same dict lookup. Then exact search
   (``IndexFlatIP``) on its own, for reference. Recall@10 of each against exact search over the
   same stored vectors.
4. **Batched**: ``store.similar_many`` in batches of ``--batch`` against raw batched
   ``index.search`` + mapping and hnswlib's batched ``knn_query``: queries/s, median of repeats.
5. **Rebuild under load**: single-query ``similar(vector)`` p99 at rest, then while
   ``rebuild_index(wait=False)`` runs (child process, one FAISS thread), queried from this thread
   until the new index is swapped in and its neighbour lists are stored; per phase of the rebuild
   (from the store's log records), then at rest again; once per ``--rebuild-query-threads``
   value of ``index_query_threads`` (the store is reopened with it).
6. **Memory**: the index file's size and the RSS a fresh process gains by loading it (FAISS
   through ``index_file.load``; hnswlib's own file the same way), scaled to a million vectors.

Prints markdown tables (medians, p99, ratios) and the issue's bars as PASS/MISS.

    PYTHONPATH=. python benchmarks/knn.py [--sizes 20000,100000 --queries 1000 --batch 100
                                          --rest-queries 3000 --dir /tmp --json knn.json]

``--profile`` runs ``similar(vector=...)`` over the queries once more under cProfile and prints
the top entries. Internals are read where the benchmark needs them (the store's FAISS index
object and its embedder), as the issue asks for "the same index object".
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import importlib.metadata
import io
import json
import logging
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import hnswlib
import numpy as np
import psutil
from _common import cpu_busy as _cpu_busy

import xpstore
from xpstore import Store
from xpstore.demo.synthetic import STYLES, sample_batch_values
from xpstore.index.backends import faiss_threads
from xpstore.model.records import BATCH_FIELDS, BatchFingerprint, Fingerprint

perf = time.perf_counter
thread_cpu = time.thread_time  # CPU time of this thread: what other jobs on the cores disturb less
STYLE_NAMES = tuple(STYLES)
K = 10
HNSW_M, HNSW_EFC, HNSW_EF = 32, 128, 64  # the store's defaults; hnswlib gets the same


# --------------------------------------------------------------------------- data


@dataclass
class Tracks:
    """Synthetic tracks: style index, the 25 batch values, optional embedding."""

    style: np.ndarray[Any, np.dtype[np.int64]]
    values: np.ndarray[Any, np.dtype[np.float64]]
    embedding: np.ndarray[Any, np.dtype[np.float64]] | None

    def __len__(self) -> int:
        return int(self.style.shape[0])


def make_tracks(rng: np.random.Generator, n: int, emb_dim: int) -> Tracks:
    style = rng.integers(len(STYLE_NAMES), size=n)
    values = np.empty((n, len(BATCH_FIELDS)))
    for s, name in enumerate(STYLE_NAMES):
        rows = np.flatnonzero(style == s)
        if rows.size:
            values[rows] = sample_batch_values(rng, name, int(rows.size))
    emb = None
    if emb_dim:
        # a fixed unit centroid per style, every track near its style's (as make_fingerprint does)
        cent = np.random.default_rng(7).normal(size=(len(STYLE_NAMES), emb_dim))
        cent /= np.linalg.norm(cent, axis=1, keepdims=True)
        emb = cent[style] + rng.normal(0.0, 0.6 / np.sqrt(emb_dim), size=(n, emb_dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return Tracks(style, values, emb)


def fingerprints(tracks: Tracks, lo: int, hi: int) -> list[Fingerprint]:
    out = []
    for i in range(lo, hi):
        style = STYLE_NAMES[int(tracks.style[i])]
        out.append(
            Fingerprint(
                track_id=f"t{i:07d}",
                batch=BatchFingerprint(**dict(zip(BATCH_FIELDS, tracks.values[i].tolist(),
                                                  strict=True))),
                embedding=None if tracks.embedding is None else tracks.embedding[i].tolist(),
                metadata={"title": f"Track {i}", "artist": f"Artist {i % 7919}", "style": style},
                algorithm_version="8",
            )
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- measurement helpers


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def fmt_dur(s: float) -> str:
    if s != s:  # NaN
        return "—"
    if s >= 0.1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


class CpuWatch:
    """CPU share other processes used between start() and stop() (NOISY above 10 %)."""

    def __init__(self) -> None:
        self.t0 = perf()
        self.b0, self.o0 = _cpu_busy()

    def other_share(self) -> float:
        busy, own = _cpu_busy()
        wall = perf() - self.t0
        return max(0.0, (busy - self.b0) - (own - self.o0)) / (wall * (os.cpu_count() or 1))


def recall(got: Sequence[Sequence[int]], truth: np.ndarray[Any, Any]) -> float:
    hits = [len(set(g) & set(t.tolist())) / K for g, t in zip(got, truth, strict=True)]
    return float(np.mean(hits))


class LogTimes(logging.Handler):
    """Collects (perf time, message) of the store's log records (the rebuild's phases)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append((perf(), record.getMessage()))


_RSS_CHILD = r"""
import gc, json, sys
import psutil
import hnswlib
from xpstore.index.index_file import load
p = psutil.Process()
out = {}
gc.collect(); before = p.memory_info().rss
backend, meta = load(sys.argv[1])
gc.collect(); out["faiss"] = p.memory_info().rss - before
if len(sys.argv) > 2:
    idx = hnswlib.Index(space="ip", dim=int(sys.argv[3]))
    gc.collect(); before = p.memory_info().rss
    idx.load_index(sys.argv[2])
    gc.collect(); out["hnswlib"] = p.memory_info().rss - before
print(json.dumps(out))
"""


# --------------------------------------------------------------------------- one size


@dataclass
class Lat:
    label: str
    lat: list[float] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # this thread's CPU time per call


def open_store(
    path: Path,
    args: argparse.Namespace,
    n: int,
    *,
    create: bool,
    query_threads: int | None = None,
) -> Store:
    extra = {} if query_threads is None else {"index_query_threads": query_threads}
    return Store.open(
        path,
        create=create,
        durability="none",
        map_size=int(max(1 << 30, n * 4096)),
        embedding_dim=args.embedding_dim or None,
        index_build_in="process",
        index_build_threads=1,
        # no automatic rebuilds: the benchmark decides when a build runs (with them on, the
        # attach's delta-size trigger and its "no index yet" request can run two full builds)
        index_auto_rebuild=False,
        index_neighbors_k=args.neighbors_k,
        index_ef_search=HNSW_EF,
        index_hnsw_m=HNSW_M,
        index_ef_construction=HNSW_EFC,
        **extra,
    )


def run_size(n: int, args: argparse.Namespace, root: Path, log_times: LogTimes) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + n)
    out: dict[str, Any] = {"n": n}
    t = perf()
    lib = make_tracks(rng, n, args.embedding_dim)
    held = make_tracks(rng, args.queries, args.embedding_dim)
    out["gen_s"] = perf() - t

    path = root / f"store-{n}"
    store = open_store(path, args, n, create=True)
    try:
        # ---- load
        t = perf()
        rids: list[int] = []
        for lo in range(0, n, args.load_batch):
            rids.extend(store.put_many(fingerprints(lib, lo, min(n, lo + args.load_batch))))
        out["load_s"] = perf() - t
        track_of = {rid: f"t{i:07d}" for i, rid in enumerate(rids)}
        gc.collect()
        gc.freeze()
        logging.info("%d: loaded %d tracks in %.1f s", n, n, out["load_s"])

        # ---- initial build: the first index call attaches (the library goes to the delta)
        t = perf()
        store.index_status()
        out["attach_s"] = perf() - t
        t = perf()
        store.rebuild_index(wait=True, timeout=args.build_timeout)
        out["initial_build_wall_s"] = perf() - t
        st, _ = wait_idle(store, args.build_timeout)
        out["status"] = {k: st[k] for k in ("kind", "size", "params", "build_seconds",
                                            "recall_at_10", "file_bytes")}  # fmt: skip
        logging.info("%d: initial build %.1f s (%s)", n, out["initial_build_wall_s"], st)
        if st["size"] != n or st["kind"] != "hnsw":
            raise RuntimeError(
                f"index is {st['kind']} with {st['size']} vectors; the benchmark compares an HNSW "
                f"index of {n} (sizes from index_exact_below to index_hnsw_below)"
            )

        mgr = store.parts.index.manager  # the same FAISS object the store searches
        assert mgr is not None and mgr.server is not None
        server = mgr.server
        backend = server.main.backend
        assert backend is not None
        index = backend.faiss_index
        dim = int(index.d)
        inner = faiss.downcast_index(index.index)
        vecs = inner.reconstruct_n(0, inner.ntotal)  # the stored vectors, as the index has them
        vec_ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        emb = held.embedding
        queries = server.embedder.embed_rows(
            held.values, emb, None if emb is None else np.ones(len(held), dtype=bool)
        )
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nq = queries.shape[0]

        # ---- exact ground truth over the same stored vectors
        t = perf()
        _, truth_pos = faiss.knn(queries, vecs, K, metric=faiss.METRIC_INNER_PRODUCT)
        truth = vec_ids[truth_pos]
        out["truth_s"] = perf() - t

        # ---- hnswlib on the same vectors
        hn = hnswlib.Index(space="ip", dim=dim)
        t = perf()
        hn.init_index(max_elements=n, M=HNSW_M, ef_construction=HNSW_EFC, random_seed=1)
        hn.add_items(vecs, vec_ids, num_threads=args.hnswlib_threads)
        out["hnswlib_build_s"] = perf() - t
        hn.set_ef(HNSW_EF)
        hn.set_num_threads(1)
        logging.info("%d: hnswlib built in %.1f s", n, out["hnswlib_build_s"])
        flat = faiss.IndexFlatIP(dim)
        flat.add(vecs)

        # ---- single queries: two passes over the same queries, interleaved per query (order
        # rotated); the first pass asks each query for the first time, the second again (the
        # store's answer cache and the CPU caches are then warm). Warm-up on other queries.
        picks = rng.choice(vec_ids, size=nq + 50, replace=False)
        track_queries = [track_of[int(r)] for r in picks[:nq]]
        warm_tracks = [track_of[int(r)] for r in picks[nq:]]
        warm_vecs = np.ascontiguousarray(vecs[rng.choice(vecs.shape[0], 50, replace=False)])

        def q_store(q: Any) -> list[int]:
            return [nb.record_id for nb in store.similar(vector=q, k=K)]

        def q_store_meta(q: Any) -> list[int]:
            # every answer's metadata read too (read lazily, at the first access: one read for
            # the ten answers, unless the answer cache holds them)
            hits = store.similar(vector=q, k=K)
            metas = [nb.metadata for nb in hits]
            assert len(metas) == len(hits)
            return [nb.record_id for nb in hits]

        def q_raw(q: Any) -> list[int]:
            _, ids = index.search(q[None, :], K)
            hits = [(track_of[r], r) for r in ids[0].tolist() if r >= 0]
            return [r for _, r in hits]

        def q_track(t: Any) -> list[int]:
            return [nb.record_id for nb in store.similar(t, k=K)]

        def q_hnswlib(q: Any) -> list[int]:
            labels, _ = hn.knn_query(q[None, :], k=K)
            hits = [(track_of[r], r) for r in labels[0].tolist()]
            return [r for _, r in hits]

        def q_exact(q: Any) -> list[int]:
            _, pos = flat.search(q[None, :], K)
            hits = [(track_of[r], r) for r in vec_ids[pos[0]].tolist()]
            return [r for _, r in hits]

        cases: list[tuple[str, Callable[[Any], list[int]], Sequence[Any], Sequence[Any]]] = [
            ("store", q_store, queries, warm_vecs),
            ("store_meta", q_store_meta, queries, warm_vecs),
            ("raw", q_raw, queries, warm_vecs),
            ("track", q_track, track_queries, warm_tracks),
            ("hnswlib", q_hnswlib, queries, warm_vecs),
        ]
        # the store runs a single-query search with index_query_threads OpenMP threads; the
        # raw and exact baselines get the same (the setting is per calling thread)
        query_threads = int(store.config.index.query_threads)
        out["omp_threads"] = int(faiss.omp_get_max_threads())
        out["query_threads"] = query_threads
        lat = {key: (Lat(key), Lat(key)) for key, *_ in cases}
        watch = CpuWatch()
        with faiss_threads(query_threads):
            for _, fn, _, warm in cases:
                for x in warm:
                    fn(x)
            # case c asks query (i + c * nq / cases) in slot i: every case asks every query
            # once per pass, and never right after another case asked the same one (which
            # would hand it a graph walk already in the CPU caches)
            shift = [c * nq // len(cases) for c in range(len(cases))]
            for pass_ in (0, 1):
                for key, *_ in cases:
                    lat[key][pass_].ids.extend([] for _ in range(nq))
                for i in range(nq):
                    r = i % len(cases)
                    order = list(range(r, len(cases))) + list(range(r))
                    for c in order:
                        key, fn, inputs, _ = cases[c]
                        j = (i + shift[c]) % nq
                        c0, t0 = thread_cpu(), perf()
                        got = fn(inputs[j])
                        lat[key][pass_].lat.append(perf() - t0)
                        lat[key][pass_].cpu.append(thread_cpu() - c0)
                        lat[key][pass_].ids[j] = got
            exact = Lat("exact")
            for i in range(nq):
                t0 = perf()
                got = q_exact(queries[i])
                exact.lat.append(perf() - t0)
                exact.ids.append(got)
        out["single_other_cpu"] = watch.other_share()

        def summary(first: Lat, again: Lat | None, key: str) -> dict[str, Any]:
            return {
                "p50_s": pct(first.lat, 50),
                "p99_s": pct(first.lat, 99),
                "cpu_p50_s": pct(first.cpu, 50),
                "mean_s": float(np.mean(first.lat)),
                "again_p50_s": pct(again.lat, 50) if again else float("nan"),
                "again_p99_s": pct(again.lat, 99) if again else float("nan"),
                "recall_at_10": None if key == "track" else recall(first.ids, truth),
            }

        out["single"] = {key: summary(v[0], v[1], key) for key, v in lat.items()}
        out["single"]["exact"] = summary(exact, None, "exact")

        # ---- batched
        batches = [queries[i : i + args.batch] for i in range(0, nq, args.batch)]
        hn.set_num_threads(os.cpu_count() or 1)

        def b_store() -> None:
            for b in batches:
                store.similar_many(b, k=K)

        def b_raw() -> None:
            for b in batches:
                _, ids = index.search(b, K)
                [[(track_of[r], r) for r in row if r >= 0] for row in ids.tolist()]

        def b_hnswlib() -> None:
            for b in batches:
                labels, _ = hn.knn_query(b, k=K)
                [[(track_of[r], r) for r in row] for row in labels.tolist()]

        bcases = [("store", b_store), ("raw", b_raw), ("hnswlib", b_hnswlib)]
        for _, fn in bcases:
            fn()
        rates: dict[str, list[float]] = {key: [] for key, _ in bcases}
        for rep in range(args.repeats):
            r = rep % len(bcases)
            for key, fn in bcases[r:] + bcases[:r]:
                t0 = perf()
                fn()
                rates[key].append(nq / (perf() - t0))
        out["batched"] = {key: {"qps": float(np.median(v)), "runs": v} for key, v in rates.items()}
        hn.set_num_threads(1)

        # ---- memory: the files, and the RSS a fresh process gains loading them
        hn_file = root / f"hnswlib-{n}.bin"
        hn.save_index(str(hn_file))
        main_file = Path(str(store.index_status()["file"]))
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, str(main_file), str(hn_file), str(dim)],
            capture_output=True, text=True, check=True, timeout=3600,
        )  # fmt: skip
        rss = json.loads(proc.stdout.strip().splitlines()[-1])
        out["memory"] = {
            "faiss_file_bytes": main_file.stat().st_size,
            "faiss_rss_bytes": rss["faiss"],
            "hnswlib_file_bytes": hn_file.stat().st_size,
            "hnswlib_rss_bytes": rss["hnswlib"],
        }
        hn_file.unlink()

        # ---- rebuild under load: p99 at rest, during a rebuild, at rest again, per value of
        # index_query_threads (the OpenMP threads of a single-query search; the store is
        # reopened with the value, a session-only override)
        out["rebuild"] = {}
        for qt in [int(x) for x in args.rebuild_query_threads.split(",") if x.strip()]:
            if qt != store.config.index.query_threads:
                store.close()
                store = open_store(path, args, n, create=False, query_threads=qt)
                store.index_status()  # attach: loads the index file
            wait_idle(store, args.build_timeout)
            out["rebuild"][str(qt)] = rebuild_under_load(store, queries, args, log_times)

        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for i in range(nq):
                store.similar(vector=queries[i], k=K)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).strip_dirs().sort_stats("tottime").print_stats(
                args.profile_top
            )
            out["profile"] = (
                f"**cProfile of store.similar(vector=...) at {n:,}**, {nq} queries, top "
                f"{args.profile_top} by tottime\n\n```\n{buf.getvalue().strip()}\n```\n"
            )
    finally:
        store.close()
        gc.unfreeze()
        shutil.rmtree(path, ignore_errors=True)
    return out


def rebuild_under_load(
    store: Store, queries: np.ndarray[Any, Any], args: argparse.Namespace, log_times: LogTimes
) -> dict[str, Any]:
    """Single-query latency at rest, during ``rebuild_index(wait=False)``, at rest again."""
    nq = queries.shape[0]

    def one(i: int) -> float:
        t0 = perf()
        store.similar(vector=queries[i % nq], k=K)
        return perf() - t0

    mgr = store.parts.index.manager
    assert mgr is not None and mgr.rebuilder is not None
    rb = mgr.rebuilder
    rest = [one(i) for i in range(args.rest_queries)]
    builds0 = rb.builds
    log_times.events.clear()
    during: list[tuple[float, float]] = []  # (start time, latency)
    watch = CpuWatch()
    t_req = perf()
    store.rebuild_index(wait=False)
    deadline = time.monotonic() + args.build_timeout
    i = 0
    while rb.builds == builds0:
        if rb.last_error is not None:
            raise RuntimeError(f"rebuild failed: {rb.last_error}")
        t0 = perf()
        store.similar(vector=queries[i % nq], k=K)
        during.append((t0, perf() - t0))
        i += 1
        if time.monotonic() > deadline:
            raise RuntimeError(f"rebuild did not finish in {args.build_timeout} s")
    t_done = perf()
    other = watch.other_share()
    rest_after = [one(i) for i in range(args.rest_queries)]
    st = store.index_status()
    phases = _phases([(t, m) for t, m in log_times.events if t >= t_req], t_req, t_done)
    dl = [x for _, x in during]
    return {
        "wall_s": t_done - t_req,
        "child_build_s": st["build_seconds"],
        "recall_probe": st["recall_at_10"],
        "other_cpu": other,
        "queries": len(dl),
        "rest": {"p50_s": pct(rest, 50), "p99_s": pct(rest, 99), "max_s": max(rest)},
        "during": {
            "p50_s": pct(dl, 50),
            "p99_s": pct(dl, 99),
            "p999_s": pct(dl, 99.9),
            "max_s": max(dl) if dl else float("nan"),
        },
        "rest_after": {"p50_s": pct(rest_after, 50), "p99_s": pct(rest_after, 99)},
        "phases": [
            {
                "phase": name,
                "seconds": hi - lo,
                "queries": len(sel := [x for s, x in during if lo <= s < hi]),
                "p50_s": pct(sel, 50),
                "p99_s": pct(sel, 99),
                "max_s": max(sel) if sel else float("nan"),
            }
            for name, lo, hi in phases
        ],
    }


def wait_idle(store: Store, timeout: float) -> tuple[dict[str, Any], float]:
    """Wait until the index has a build and no build runs (checked twice, 1 s apart).

    Returns the status and the time the build was first seen finished.
    """
    deadline = time.monotonic() + timeout
    seen: tuple[Any, float] | None = None
    while True:
        st = store.index_status()
        if st["last_error"]:
            raise RuntimeError(f"index build failed: {st['last_error']}")
        if st["build_id"] is not None and not st["rebuilding"]:
            if seen is not None and seen[0] == st["build_id"]:
                return st, seen[1]
            seen = (st["build_id"], perf())
            time.sleep(1.0)
            continue
        seen = None
        if time.monotonic() > deadline:
            raise RuntimeError(f"no finished index build within {timeout} s")
        time.sleep(0.2)


def _phases(
    events: list[tuple[float, str]], start: float, end: float
) -> list[tuple[str, float, float]]:
    """Phases of one rebuild from the store's log records (missing marks merge phases)."""

    def first(prefix: str) -> float | None:
        return next((t for t, m in events if m.startswith(prefix)), None)

    marks = [
        ("waiting for the rebuilder / flush", start),
        ("child build + parent load/verify", first("index rebuild")),
        ("swap", first("loaded ")),
        ("rename + neighbour lists into LMDB", first("index swap")),
    ]
    present = [(name, t) for name, t in marks if t is not None]
    out = []
    for j, (name, t) in enumerate(present):
        hi = present[j + 1][1] if j + 1 < len(present) else end
        out.append((name, t, hi))
    return out


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "cpu_avx2": " avx2 " in flags,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "xpstore": xpstore.__version__,
            "faiss": faiss.__version__,
            "faiss_module": _faiss_module(),
            "hnswlib": importlib.metadata.version("hnswlib"),
            "numpy": np.__version__,
            "psutil": psutil.__version__,
        },
    }


def _faiss_module() -> str:
    """Which FAISS extension module the loader picked (generic, avx2, avx512)."""
    for name in ("swigfaiss_avx512", "swigfaiss_avx2", "swigfaiss"):
        if f"faiss.{name}" in sys.modules:
            return name
    return "?"


def report(r: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    n = r["n"]
    s = r["single"]
    raw = s["raw"]["p50_s"]
    st = r["status"]
    print(f"### {n:,} tracks\n")
    print(
        f"- index: {st['kind']} {st['params']}, {st['size']:,} vectors of dim "
        f"{25 + (args.embedding_dim or 0)}; build's own recall probe "
        f"{'—' if st['recall_at_10'] is None else round(st['recall_at_10'], 4)}"
    )
    print(
        f"- load: building {n:,} Fingerprint models + put_many in {r['load_s']:.1f} s "
        f"({n / r['load_s']:,.0f}/s); attach (library into the exact delta) {r['attach_s']:.1f} s;"
        f" initial build {r['initial_build_wall_s']:.1f} s wall (child's own "
        f"{st['build_seconds']:.1f} s); hnswlib build ({args.hnswlib_threads} thread"
        f"{'s' if args.hnswlib_threads > 1 else ''}) {r['hnswlib_build_s']:.1f} s"
    )
    print(f"- other processes used {r['single_other_cpu']:.0%} of the CPU during the single "
          f"queries{' (NOISY)' if r['single_other_cpu'] > 0.1 else ''}\n")  # fmt: skip
    omp = r["omp_threads"]
    qt = r["query_threads"]
    labels = {
        "store": "store.similar(vector=q)",
        "store_meta": "store.similar(vector=q), every answer's metadata read",
        "raw": "raw FAISS index.search + dict id→track",
        "track": "store.similar(track_id) end to end",
        "hnswlib": "hnswlib knn_query (ef=64) + dict id→track",
        "exact": "exact IndexFlatIP search + dict id→track (own loop)",
    }
    print(
        f"Single queries: FAISS runs with index_query_threads = {qt} OpenMP thread(s) in the "
        f"store, and the raw and exact baselines get the same ({omp} is FAISS's default here, "
        "used by the batched rows).\n"
    )
    print(
        "| single query (k=10) | first ask p50 | p99 | asked again p50 | p99 | p50 ÷ raw, first "
        "| p50 ÷ raw, again | p99 ÷ raw, first | recall@10 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = s["raw"]
    for key, label in labels.items():
        v = s[key]
        rc = "—" if v["recall_at_10"] is None else f"{v['recall_at_10']:.3f}"
        print(
            f"| {label} | {fmt_dur(v['p50_s'])} | {fmt_dur(v['p99_s'])} | "
            f"{fmt_dur(v['again_p50_s'])} | {fmt_dur(v['again_p99_s'])} | "
            f"{ratio_text(v['p50_s'], base['p50_s'])} | "
            f"{ratio_text(v['again_p50_s'], base['again_p50_s'])} | "
            f"{ratio_text(v['p99_s'], base['p99_s'])} | {rc} |"
        )
    cpu = [(labels[k], s[k].get("cpu_p50_s", float("nan"))) for k in labels if k != "exact"]
    raw_cpu = s["raw"].get("cpu_p50_s", float("nan"))
    print("\n- this thread's CPU time per first ask, p50 (what other jobs on the cores disturb "
          "less than the wall clock): " + "; ".join(
              f"{label} {fmt_dur(c)} ({ratio_text(c, raw_cpu)})" for label, c in cpu))  # fmt: skip
    b = r["batched"]
    print(f"\n| batched, {args.batch} per call | queries/s (median of {args.repeats}) | ÷ raw |")
    print("|---|---:|---:|")
    for key, label in (
        ("store", "store.similar_many"),
        ("raw", "raw FAISS index.search + dict"),
        ("hnswlib", "hnswlib knn_query + dict"),
    ):
        print(f"| {label} | {b[key]['qps']:,.0f} | {b[key]['qps'] / b['raw']['qps']:.2f}x |")
    print(
        "\n| single-query similar(vector) | queries | p50 | p99 | max | p99 ÷ at rest |\n"
        "|---|---:|---:|---:|---:|---:|"
        if r["rebuild"] else "\n(rebuild under load: not measured in this run)"
    )
    for variant, rv in r["rebuild"].items():
        rest99 = rv["rest"]["p99_s"]
        name = f"index_query_threads={variant}"
        print(
            f"| **{name}**: at rest, before | {args.rest_queries} | "
            f"{fmt_dur(rv['rest']['p50_s'])} | {fmt_dur(rest99)} | "
            f"{fmt_dur(rv['rest']['max_s'])} | 1.00x |\n"
            f"| during rebuild ({rv['wall_s']:.1f} s) | {rv['queries']} | "
            f"{fmt_dur(rv['during']['p50_s'])} | {fmt_dur(rv['during']['p99_s'])} | "
            f"{fmt_dur(rv['during']['max_s'])} | {rv['during']['p99_s'] / rest99:.2f}x |"
        )
        for ph in rv["phases"]:
            print(
                f"| … {ph['phase']} ({ph['seconds']:.2f} s) | {ph['queries']} | "
                f"{fmt_dur(ph['p50_s'])} | {fmt_dur(ph['p99_s'])} | {fmt_dur(ph['max_s'])} | "
                f"{ratio_text(ph['p99_s'], rest99)} |"
            )
        print(
            f"| at rest, after | {args.rest_queries} | {fmt_dur(rv['rest_after']['p50_s'])} | "
            f"{fmt_dur(rv['rest_after']['p99_s'])} | | "
            f"{rv['rest_after']['p99_s'] / rest99:.2f}x |"
        )
    print()
    for variant, rv in r["rebuild"].items():
        print(
            f"- rebuild under load (index_query_threads={variant}): {rv['wall_s']:.1f} s wall "
            f"(child's own build "
            f"{rv['child_build_s']:.1f} s); other processes used {rv['other_cpu']:.0%} of the "
            f"CPU meanwhile{' (NOISY)' if rv['other_cpu'] > 0.1 else ''}"
        )
    m = r["memory"]
    per = 1e6 / n
    print(
        f"- memory per million vectors: FAISS file {m['faiss_file_bytes'] * per / 2**20:,.0f} MiB,"
        f" RSS of a process that loads it +{m['faiss_rss_bytes'] * per / 2**20:,.0f} MiB; hnswlib "
        f"file {m['hnswlib_file_bytes'] * per / 2**20:,.0f} MiB, RSS "
        f"+{m['hnswlib_rss_bytes'] * per / 2**20:,.0f} MiB\n"
    )
    ratio = s["store"]["p50_s"] / raw
    rec = s["store"]["recall_at_10"]
    rb = r["rebuild"].get(str(qt)) or next(iter(r["rebuild"].values()), None)
    p99r = s["store"]["p99_s"] / s["raw"]["p99_s"]
    again = s["store"]["again_p50_s"] / s["raw"]["again_p50_s"]
    nan = float("nan")
    cpu_ratio = ratio_text(s["store"].get("cpu_p50_s", nan), s["raw"].get("cpu_p50_s", nan))
    bars = [
        {
            "bar": "similar(vector) p50 ≤ 1.3x raw FAISS search + id mapping",
            "value": ratio,
            "pass": ratio <= 1.3,
            "text": f"{ratio:.2f}x first ask (p99 {p99r:.2f}x), {again:.2f}x asked again; "
            f"thread CPU time p50 {cpu_ratio} first ask",
        },
        {
            "bar": "recall@10 vs exact ≥ 0.95",
            "value": rec,
            "pass": rec >= 0.95,
            "text": f"{rec:.3f}",
        },
    ]
    if rb is not None:  # --rebuild-query-threads "" skips the rebuild-under-load section
        rbr = rb["during"]["p99_s"] / rb["rest"]["p99_s"]
        during, at_rest = fmt_dur(rb["during"]["p99_s"]), fmt_dur(rb["rest"]["p99_s"])
        bars.append({
            "bar": "query p99 during rebuild ÷ at rest ≤ 2.0",
            "value": rbr,
            "pass": rbr <= 2.0,
            "text": f"{rbr:.2f}x ({during} vs {at_rest})",
        })  # fmt: skip
    for bar in bars:
        print(f"- {'PASS' if bar['pass'] else 'MISS'} {bar['bar']} at {n:,}: {bar['text']}")
    print()
    return bars


def ratio_text(a: float, b: float) -> str:
    r = a / b
    return "—" if r != r else f"{r:.2f}x"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sizes", default="20000", help="comma-separated track counts")
    p.add_argument("--queries", type=int, default=1000, help="held-out query tracks")
    p.add_argument("--batch", type=int, default=100, help="queries per similar_many call")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the batched cases")
    p.add_argument(
        "--rest-queries",
        type=int,
        default=3000,
        help="single queries for the at-rest p99 (before and after the rebuild)",
    )
    p.add_argument(
        "--rebuild-query-threads",
        default="1",
        help="comma-separated index_query_threads values, one rebuild-under-load run each (the "
        "bar uses the store's default, 1; e.g. 1,2 also shows FAISS's default of one per core; "
        "an empty value skips the section)",
    )
    p.add_argument(
        "--embedding-dim",
        type=int,
        default=0,
        help="add an embedding block of this size (0: audio only, 25 dims)",
    )
    p.add_argument(
        "--hnswlib-threads",
        type=int,
        default=1,
        help="threads for hnswlib's build (1: as the store's build)",
    )
    p.add_argument(
        "--neighbors-k",
        type=int,
        default=10,
        help="index_neighbors_k: neighbour lists each build stores (0: none)",
    )
    p.add_argument("--load-batch", type=int, default=5000)
    p.add_argument("--build-timeout", type=float, default=7200.0)
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--dir", default=None, help="parent of the temporary directory")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile similar(vector=...) over the queries (cProfile)",
    )
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.queries < 50 or any(n < 20_000 for n in sizes):
        p.error("need --queries >= 50 and sizes >= 20000 (HNSW from 10k, child build from 20k)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")  # fmt: skip
    log_times = LogTimes()
    xlog = logging.getLogger("xpstore")
    xlog.addHandler(log_times)
    xlog.setLevel(logging.INFO)
    if not args.verbose:
        xlog.propagate = False  # the rebuild's INFO records feed the phase split only
    info = machine()
    started = perf()
    results = []
    with tempfile.TemporaryDirectory(prefix="xpstore-knn-", dir=args.dir) as tmp:
        for n in sizes:
            results.append(run_size(n, args, Path(tmp), log_times))
    info["run_s"] = perf() - started
    print("# xpstore similar-track benchmark (issue 4)\n")
    print(
        f"- date: {info['date']}; machine: {info['nproc']} cores, {info['cpu']} (AVX2 "
        f"{'yes' if info['cpu_avx2'] else 'no'}), Linux {info['kernel']}; Python "
        f"{info['python']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    )
    print(f"- {args.queries} held-out query tracks; k={K}; HNSW M={HNSW_M}, "
          f"efConstruction={HNSW_EFC}, efSearch={HNSW_EF} (store and hnswlib); builds store "
          f"{args.neighbors_k} neighbours per track; "
          f"run took {info['run_s']:.0f} s")  # fmt: skip
    print(f"- command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")
    all_bars = []
    for r in results:
        bars = report(r, args)
        if "profile" in r:
            print(r["profile"])
        all_bars.append({"n": r["n"], "bars": bars})
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "args": vars(args), "results": results, "bars": all_bars},
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
