"""Peers benchmark (issue 15): xpstore beside Chroma, LanceDB, hnswlib and cpprb, same data,
one process run.

Workload (the issue's side-by-side): N styled fingerprints (``knn.make_tracks``: eight style
clusters, the 25 batch values, metadata title/artist/style), ingested durably in batches, then
single "tracks like this one" queries for random stored tracks (``similar(track_id)``, k=10,
the track itself left out), every system on the same tracks and the same query tracks.

Systems (each skipped with a note when its package is missing; ``pip install -e '.[peers]'``):

- **xpstore** ``put_fingerprints`` (the columnar bulk path; ``durability="commit"``: one WAL
  fdatasync per batch), then ``rebuild_index()`` (reported as "index ready"), then
  ``similar(track_id)``, interleaved with the same queries reading every answer's
  ``metadata`` (loaded lazily, at its first access; Chroma's query returns metadata by
  default, so that row is the like-for-like one); ``put_many`` of the same records as dicts
  (the per-record path, what a JSON ingest does) for reference;
- **Chroma** ``PersistentClient`` (its own durability: SQLite plus its HNSW segment),
  ``collection.add(ids, embeddings, metadatas)`` per batch (inner-product space), queries as
  ``get(ids=[t], include=["embeddings"])`` + ``query(n_results=k+1)``;
- **LanceDB** (a table on disk, ``add`` per batch, an exact ``search`` per query: it builds no
  ANN index below ~100k rows without one asked for);
- **hnswlib** (in memory, not durable: ``add_items`` per batch with the store's M and
  efConstruction, ``knn_query`` with the store's efSearch plus a dict id -> track);
- **cpprb** (an in-memory replay buffer, not durable: ``add`` of the rows per batch): the
  ingest rate of a structure with no durability, index or validation at all, for scale.

The peers get vectors computed before their timing starts (the values z-scored on the
library, L2-normalized): xpstore's ingest time includes its own validation, encoding and
embedding. Ratios are xpstore ÷ peer for rates and peer ÷ xpstore for latencies, so above 1
means xpstore is ahead.

    PYTHONPATH=. python benchmarks/peers.py [--tracks 50000 --batch 5000 --queries 500
                                             --dir /tmp --only xpstore,chroma --json out.json]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn import HNSW_EF, HNSW_EFC, HNSW_M, STYLE_NAMES, CpuWatch, make_tracks

from xpstore import Store
from xpstore.model.records import BATCH_FIELDS

perf = time.perf_counter
K = 10


@dataclass
class Data:
    track_ids: list[str]
    values: np.ndarray[Any, Any]  # (n, 25)
    vectors: np.ndarray[Any, Any]  # (n, 25) float32, unit norm: what the peers index
    metadata: list[dict[str, str]]
    queries: list[int]  # row numbers of the query tracks


@dataclass
class Result:
    system: str
    ingest_s: float
    ready_s: float = 0.0  # after ingest, until queries are served by the final index
    lat: list[float] = field(default_factory=list)
    note: str = ""
    cpu_s: float = 0.0  # CPU seconds of this process (all threads) during the ingest
    lat_meta: list[float] = field(default_factory=list)  # xpstore: queries reading metadata

    def cpu_rate(self, n: int) -> float:
        return n / self.cpu_s if self.cpu_s > 0 else float("nan")

    def rate(self, n: int) -> float:
        return n / self.ingest_s if self.ingest_s > 0 else float("nan")


def make_data(n: int, queries: int, seed: int) -> Data:
    rng = np.random.default_rng(seed)
    tr = make_tracks(rng, n, 0)
    ids = [f"t{i:07d}" for i in range(n)]
    meta = [{"title": f"Track {i}", "artist": f"Artist {i % 7919}",
             "style": STYLE_NAMES[int(tr.style[i])]} for i in range(n)]  # fmt: skip
    z = (tr.values - tr.values.mean(axis=0)) / tr.values.std(axis=0)
    vec = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
    q = rng.choice(n, size=min(queries, n), replace=False).tolist()
    return Data(ids, tr.values, vec, meta, q)


def pct(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def _batches(n: int, b: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + b)) for i in range(0, n, b)]


# --------------------------------------------------------------------------- systems


def run_xpstore(d: Data, root: Path, batch: int) -> Result:
    n = len(d.track_ids)
    with Store.open(root / "xp", create=True, durability="commit",
                    map_size=int(max(1 << 30, n * 4096)), index_auto_rebuild=False,
                    index_build_in="process", index_build_threads=1, index_hnsw_m=HNSW_M,
                    index_ef_construction=HNSW_EFC, index_ef_search=HNSW_EF) as s:  # fmt: skip
        gc.collect()
        c0, t0 = time.process_time(), perf()
        for lo, hi in _batches(n, batch):
            s.put_fingerprints(d.track_ids[lo:hi], d.values[lo:hi], metadata=d.metadata[lo:hi])
        ingest, cpu = perf() - t0, time.process_time() - c0
        t0 = perf()
        s.rebuild_index()  # attaches (exact delta) and builds HNSW
        ready = perf() - t0
        # two kinds of query, interleaved, each on every query track once and never right
        # after the other asked the same track: ids and scores only (metadata is read lazily,
        # at its first access: never here), and every answer's metadata read (what Chroma's
        # query returns by default)
        lat: list[float] = []
        lat_meta: list[float] = []
        nq = len(d.queries)
        for j in range(nq):
            for kind in ((0, 1) if j % 2 == 0 else (1, 0)):
                i = d.queries[j if kind == 0 else (j + nq // 2) % nq]
                t = perf()
                hits = s.similar(d.track_ids[i], k=K)
                if kind:
                    metas = [h.metadata for h in hits]
                    assert all(m is not None for m in metas)
                (lat_meta if kind else lat).append(perf() - t)
                assert len(hits) == K
    return Result("xpstore put_fingerprints", ingest, ready, lat, cpu_s=cpu, lat_meta=lat_meta)


def run_xpstore_put_many(d: Data, root: Path, batch: int) -> Result:
    n = len(d.track_ids)
    dicts = [{"kind": "fingerprint", "track_id": t, "metadata": m,
              "batch": dict(zip(BATCH_FIELDS, v, strict=True))}
             for t, m, v in zip(d.track_ids, d.metadata, d.values.tolist(),
                                strict=True)]  # fmt: skip
    gc.freeze()
    with Store.open(root / "xpm", create=True, durability="commit",
                    map_size=int(max(1 << 30, n * 4096)), index_auto_rebuild=False) as s:
        gc.collect()
        c0, t0 = time.process_time(), perf()
        for lo, hi in _batches(n, batch):
            s.put_many(dicts[lo:hi])
        ingest, cpu = perf() - t0, time.process_time() - c0
    gc.unfreeze()
    return Result("xpstore put_many (dicts)", ingest, note="ingest only", cpu_s=cpu)


def run_chroma(d: Data, root: Path, batch: int) -> Result:
    import chromadb

    client = chromadb.PersistentClient(path=str(root / "chroma"))
    col = client.create_collection(
        "tracks", metadata={"hnsw:space": "ip", "hnsw:M": HNSW_M,
                            "hnsw:construction_ef": HNSW_EFC, "hnsw:search_ef": HNSW_EF},
    )  # fmt: skip
    n = len(d.track_ids)
    gc.collect()
    c0, t0 = time.process_time(), perf()
    for lo, hi in _batches(n, batch):
        col.add(ids=d.track_ids[lo:hi], embeddings=d.vectors[lo:hi],
                metadatas=d.metadata[lo:hi])  # type: ignore[arg-type]  # fmt: skip
    ingest, cpu = perf() - t0, time.process_time() - c0
    lat = []
    for i in d.queries:
        t = perf()
        got = col.get(ids=[d.track_ids[i]], include=["embeddings"])
        emb = got["embeddings"]
        assert emb is not None
        res = col.query(query_embeddings=[emb[0]], n_results=K + 1)
        hits = [x for x in res["ids"][0] if x != d.track_ids[i]][:K]
        lat.append(perf() - t)
        assert len(hits) == K
    return Result(f"Chroma {importlib.metadata.version('chromadb')} PersistentClient", ingest,
                  0.0, lat, cpu_s=cpu)  # fmt: skip


def run_lancedb(d: Data, root: Path, batch: int) -> Result:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(str(root / "lance"))
    n = len(d.track_ids)
    dim = d.vectors.shape[1]

    def table_of(lo: int, hi: int) -> pa.Table:
        vec = pa.FixedSizeListArray.from_arrays(pa.array(d.vectors[lo:hi].ravel()), dim)
        return pa.table({
            "id": d.track_ids[lo:hi], "vector": vec,
            "title": [m["title"] for m in d.metadata[lo:hi]],
            "artist": [m["artist"] for m in d.metadata[lo:hi]],
            "style": [m["style"] for m in d.metadata[lo:hi]],
        })  # fmt: skip

    gc.collect()
    t0 = perf()
    tbl = None
    for lo, hi in _batches(n, batch):
        if tbl is None:
            tbl = db.create_table("tracks", data=table_of(lo, hi))
        else:
            tbl.add(table_of(lo, hi))
    ingest = perf() - t0
    assert tbl is not None
    lat = []
    for i in d.queries:
        t = perf()
        tid = d.track_ids[i]
        row = tbl.search().where(f"id = '{tid}'").limit(1).to_list()
        res = tbl.search(row[0]["vector"]).metric("dot").limit(K + 1).to_list()
        hits = [r["id"] for r in res if r["id"] != tid][:K]
        lat.append(perf() - t)
        assert len(hits) == K
    return Result(f"LanceDB {importlib.metadata.version('lancedb')} (exact search)", ingest,
                  0.0, lat)  # fmt: skip


def run_hnswlib(d: Data, _root: Path, batch: int) -> Result:
    import hnswlib

    n, dim = d.vectors.shape
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, M=HNSW_M, ef_construction=HNSW_EFC)
    index.set_num_threads(1)
    track_of: dict[int, str] = {}
    gc.collect()
    t0 = perf()
    for lo, hi in _batches(n, batch):
        index.add_items(d.vectors[lo:hi], np.arange(lo, hi))
        track_of.update(zip(range(lo, hi), d.track_ids[lo:hi], strict=True))
    ingest = perf() - t0
    index.set_ef(HNSW_EF)
    lat = []
    for i in d.queries:
        t = perf()
        labels, _ = index.knn_query(d.vectors[i], k=K + 1)
        hits = [track_of[int(x)] for x in labels[0] if int(x) != i][:K]
        lat.append(perf() - t)
        assert len(hits) == K
    return Result("hnswlib (in memory, not durable)", ingest, 0.0, lat,
                  note="no durability, no metadata")  # fmt: skip


def run_cpprb(d: Data, _root: Path, batch: int) -> Result:
    import cpprb

    n, dim = d.values.shape
    rb = cpprb.ReplayBuffer(n, {"obs": {"shape": (dim,)}})
    gc.collect()
    t0 = perf()
    for lo, hi in _batches(n, batch):
        rb.add(obs=d.values[lo:hi])
    ingest = perf() - t0
    return Result("cpprb ReplayBuffer (in memory, not durable)", ingest,
                  note="ingest only: no durability, index or validation")  # fmt: skip


SYSTEMS: dict[str, Callable[[Data, Path, int], Result]] = {
    "xpstore": run_xpstore,
    "xpstore_put_many": run_xpstore_put_many,
    "chroma": run_chroma,
    "lancedb": run_lancedb,
    "hnswlib": run_hnswlib,
    "cpprb": run_cpprb,
}
_PACKAGES = {"chroma": "chromadb", "lancedb": "lancedb", "hnswlib": "hnswlib", "cpprb": "cpprb"}


# --------------------------------------------------------------------------- report


def fmt_lat(s: float) -> str:
    if s != s:
        return "—"
    if s >= 1.0:
        return f"{s:.1f} s"
    return f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def report(results: list[Result], n: int) -> str:
    base = results[0] if results and results[0].system.startswith("xpstore put_f") else None
    lines = [
        "| system | ingest (fingerprints/s) | xpstore ÷ it | index ready after | ingest + ready "
        "(fingerprints/s) | xpstore ÷ it | similar p50 | p99 | its p50 ÷ xpstore's "
        "| its p99 ÷ xpstore's | its p50 ÷ xpstore's, metadata read |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    m50 = pct(base.lat_meta, 50) if base is not None and base.lat_meta else float("nan")
    for r in results:
        rate = r.rate(n)
        p50, p99 = pct(r.lat, 50), pct(r.lat, 99)
        ratio = f"{base.rate(n) / rate:.1f}x" if base is not None and r is not base else "—"
        b50, b99 = (pct(base.lat, 50), pct(base.lat, 99)) if base is not None else (0.0, 0.0)
        l50 = f"{p50 / b50:.1f}x" if base is not None and r is not base and r.lat else "—"
        l99 = f"{p99 / b99:.1f}x" if base is not None and r is not base and r.lat else "—"
        ready = fmt_lat(r.ready_s) if r.ready_s else "—"
        total = n / (r.ingest_s + r.ready_s)
        tratio = "—"
        if base is not None and r is not base:
            tratio = f"{n / (base.ingest_s + base.ready_s) / total:.1f}x"
        name = r.system + (f" ({r.note})" if r.note else "")
        lm = f"{p50 / m50:.1f}x" if r is not base and r.lat and m50 == m50 else "—"
        lines.append(f"| {name} | {rate:,.0f} | {ratio} | {ready} | {total:,.0f} | {tratio} | "
                     f"{fmt_lat(p50)} | {fmt_lat(p99)} | {l50} | {l99} | {lm} |")  # fmt: skip
        if r is base and r.lat_meta:
            m99 = fmt_lat(pct(r.lat_meta, 99))
            lines.append(f"| … its similar(track_id) with every answer's metadata read | | | | "
                         f"| | {fmt_lat(m50)} | {m99} | — | — | — |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tracks", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(SYSTEMS))
    ap.add_argument("--dir", default=None, help="parent of the bench directory (default $TMPDIR)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    data = make_data(args.tracks, args.queries, args.seed)
    root = Path(tempfile.mkdtemp(prefix="xpstore-peers-", dir=args.dir))
    results: list[Result] = []
    skipped: list[str] = []
    watch = CpuWatch()
    try:
        for name in args.only.split(","):
            pkg = _PACKAGES.get(name)
            if pkg is not None:
                try:
                    importlib.metadata.version(pkg)
                except importlib.metadata.PackageNotFoundError:
                    skipped.append(f"{name} (pip install {pkg}, or the `peers` extra)")
                    continue
            d = root / name
            d.mkdir()
            results.append(SYSTEMS[name](data, d, args.batch))
            shutil.rmtree(d, ignore_errors=True)
            print(f"done: {results[-1].system}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    other = watch.other_share()
    print(f"# peers: {args.tracks:,} fingerprints in batches of {args.batch:,}, "
          f"{len(data.queries)} similar(track_id) queries, k={K}")  # fmt: skip
    print(f"- machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Linux {platform.release()}, Python {platform.python_version()}; other processes "
          f"used {other:.0%} of the CPU{' (NOISY)' if other > 0.10 else ''}")  # fmt: skip
    if skipped:
        print(f"- skipped: {', '.join(skipped)}")
    print()
    print(report(results, args.tracks))
    cpu = [r for r in results if r.cpu_s]
    if cpu:
        print("\nIngest per CPU-second of this process (all its threads; less sensitive to other "
              "jobs on the machine than the wall-clock rates):")
        for r in cpu:
            print(f"- {r.system}: {r.cpu_rate(args.tracks):,.0f} fingerprints per CPU-second")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "other_cpu": other,
            "results": [{"system": r.system, "ingest_s": r.ingest_s, "ready_s": r.ready_s,
                         "cpu_s": r.cpu_s,
                         "p50": pct(r.lat, 50), "p99": pct(r.lat, 99), "note": r.note,
                         "p50_metadata_read": pct(r.lat_meta, 50) if r.lat_meta else None}
                        for r in results],
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
