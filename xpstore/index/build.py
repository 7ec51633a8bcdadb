"""One index build: LMDB read transaction -> statistics -> vectors -> FAISS -> file (+ neighbours).

The same :func:`run_build` runs in a background thread of the store (small libraries) or in a
child process (``python -m xpstore.index.build``, large ones): decoding a million envelopes is
seconds of pure Python, and in a thread of the serving process that would hold the GIL against
every query (issue 4). The child opens LMDB read-only, builds with a limited number of FAISS
threads, writes the index file (atomic, checksummed, ``index_file.save``) and the neighbour lists
file (checksummed, :mod:`xpstore.index.neighbors`), prints one JSON line and exits; the parent
verifies both checksums before it uses a byte. A child whose parent died stops at its next phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xpstore.index import neighbors as nbrs
from xpstore.index.backends import (
    IndexBackend,
    build,
    choose_backend,
    exact_knn,
    faiss_threads,
)
from xpstore.index.embedding import DEFAULT_MODE, AudioStats, HybridEmbedder, ScalingMode
from xpstore.index.index_file import save
from xpstore.index.live import read_library
from xpstore.index.rows import FingerprintRows
from xpstore.index.serving import BuildInfo
from xpstore.persistence.lmdb_tables import LmdbTables

__all__ = ["BuildOutcome", "BuildPlan", "embedder_from_record", "read_live", "run_build"]

log = logging.getLogger(__name__)

MIN_FIT_ROWS = 32
"""Below this many fingerprints the build keeps the prior statistics (too few to fit)."""
RECALL_PROBE = 200
_NEIGHBOR_CHUNK = 4096


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build needs besides the data; JSON-able so a child process can take it."""

    build_id: int
    mode: ScalingMode = DEFAULT_MODE
    audio_weight: float = 0.7
    embedding_weight: float = 0.3
    dim_weights: dict[str, float] | None = None
    dim_weights_source: str = "default"
    """Where ``dim_weights`` came from: ``default`` (the mode's), ``custom`` (set by name) or
    ``learned v<N>`` (``Store.fit_similarity``); recorded in the build."""
    embedding_dim: int | None = None
    exact_below: int = 10_000
    hnsw_below: int = 2_000_000
    hnsw: dict[str, int] = field(default_factory=dict)  # m, ef_construction, ef_search
    nprobe: int = 32
    threads: int = 1
    neighbors_k: int = 10
    kind: str | None = None  # force a kind (tests, benchmarks); None: by size
    store_id: int = 0  # written into the file: an index never serves another store

    def embedder(self, stats: AudioStats) -> HybridEmbedder:
        return HybridEmbedder(
            stats,
            audio_weight=self.audio_weight,
            embedding_weight=self.embedding_weight,
            embedding_dim=self.embedding_dim,
            dim_weights=self.dim_weights,
        )

    def embedder_record(self, embedder: HybridEmbedder) -> dict[str, Any]:
        """What a build records about its embedder (``BuildInfo.embedder``)."""
        return {
            "audio_weight": self.audio_weight,
            "embedding_weight": self.embedding_weight,
            "dim_weights": embedder.dim_weights,
            "dim_weights_source": self.dim_weights_source,
        }


def embedder_from_record(
    record: dict[str, Any], stats: AudioStats, embedding_dim: int | None
) -> HybridEmbedder:
    """The embedder a build recorded (``BuildPlan.embedder_record``), over ``stats``."""
    return HybridEmbedder(
        stats,
        audio_weight=float(record["audio_weight"]),
        embedding_weight=float(record["embedding_weight"]),
        embedding_dim=embedding_dim,
        dim_weights=dict(record["dim_weights"]),
    )


@dataclass
class BuildOutcome:
    info: BuildInfo
    stats: AudioStats
    backend: IndexBackend | None  # None when it ran in a child (load the file instead)
    ids: np.ndarray[Any, np.dtype[np.int64]] | None


def read_live(
    tables: LmdbTables, embedding_dim: int | None
) -> tuple[int, FingerprintRows]:
    """Every track's current fingerprint, read in one LMDB read transaction at ``applied_lsn``
    (from the ``fprows`` table: ``index.live``), in record-id order."""
    lib = read_library(tables, embedding_dim, lambda live: live)
    return lib.applied_lsn, lib.rows


def run_build(
    tables: LmdbTables,
    plan: BuildPlan,
    out: Path,
    neighbors_out: Path | None,
    *,
    alive: Callable[[], bool] = lambda: True,
) -> BuildOutcome:
    """Build from LMDB into ``out`` (and the neighbour lists into ``neighbors_out``)."""
    started = time.perf_counter()
    lsn, rows = read_live(tables, plan.embedding_dim)
    if not alive():
        raise SystemExit(3)
    n = len(rows)
    if n >= MIN_FIT_ROWS:
        stats = AudioStats.fit(rows.audio, plan.mode, ids=rows.ids)
    else:
        stats = AudioStats.prior(plan.mode)
    embedder = plan.embedder(stats)
    vecs = embedder.embed_rows(rows.audio, rows.embedding, rows.has_embedding)
    kind = plan.kind or choose_backend(n, exact_below=plan.exact_below, hnsw_below=plan.hnsw_below)
    if kind == "ivf" and n == 0:
        kind = "exact"
    params: dict[str, Any] = {}
    if kind == "hnsw":
        params = dict(plan.hnsw)
    elif kind == "ivf":
        params = {"nprobe": plan.nprobe}
    backend = build(kind, rows.ids, vecs, dim=embedder.dim, threads=plan.threads, **params)
    if not alive():
        raise SystemExit(3)
    with faiss_threads(plan.threads):
        recall = _recall_ids(backend, vecs, rows.ids, plan.build_id)
    info = BuildInfo(
        build_id=plan.build_id,
        lsn=lsn,
        kind=kind,
        count=n,
        params=backend.params,
        built_at=time.time(),
        duration_s=0.0,
        recall_at_10=recall,
        stats_mode=stats.mode,
        neighbors_k=plan.neighbors_k if neighbors_out is not None else 0,
        embedder=plan.embedder_record(embedder),
    )
    if neighbors_out is not None and plan.neighbors_k > 0:
        with faiss_threads(plan.threads):
            _write_neighbors(backend, vecs, rows, info, plan.neighbors_k, neighbors_out, alive)
    info = BuildInfo(**{**asdict(info), "duration_s": time.perf_counter() - started})
    build_meta = {**info.to_json(), "store_id": plan.store_id}
    save(backend, out, lsn=lsn, stats_dict=stats.to_dict(), build=build_meta)
    return BuildOutcome(info, stats, backend, rows.ids)


def _recall_ids(
    backend: IndexBackend,
    vecs: np.ndarray[Any, Any],
    ids: np.ndarray[Any, np.dtype[np.int64]],
    seed: int,
) -> float | None:
    n = vecs.shape[0]
    if n < 2:
        return None
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(RECALL_PROBE, n), replace=False)
    q = np.ascontiguousarray(vecs[sample])
    k = min(10, n)
    truth_pos = exact_knn(q, vecs, k)
    _, got = backend.search(q, k)
    hits = [
        len(set(ids[t].tolist()) & set(g.tolist())) / k
        for t, g in zip(truth_pos, got, strict=True)
    ]
    return float(np.mean(hits))


def _write_neighbors(
    backend: IndexBackend,
    vecs: np.ndarray[Any, Any],
    rows: FingerprintRows,
    info: BuildInfo,
    k: int,
    out: Path,
    alive: Callable[[], bool],
) -> None:
    """Each track's ``k`` nearest other tracks, encoded for LMDB, into a checksummed file."""
    track_of = dict(zip(rows.ids.tolist(), rows.track_ids, strict=True))
    n = len(rows)
    with nbrs.NeighborFileWriter(out) as writer:
        for lo in range(0, n, _NEIGHBOR_CHUNK):
            if not alive():
                raise SystemExit(3)
            hi = min(n, lo + _NEIGHBOR_CHUNK)
            scores, got = backend.search(vecs[lo:hi], min(k + 1, n))
            for j in range(hi - lo):
                me = int(rows.ids[lo + j])
                items = [
                    (track_of[int(r)], int(r), float(s))
                    for r, s in zip(got[j], scores[j], strict=True)
                    if r >= 0 and int(r) != me
                ][:k]
                writer.add(rows.track_ids[lo + j], nbrs.encode(info.build_id, info.lsn, items))


# --------------------------------------------------------------------------- child process


def _parent_alive(parent: int) -> Callable[[], bool]:
    return lambda: os.getppid() == parent


def main(argv: list[str] | None = None) -> int:
    """Child-process entry point; see the module doc. Prints one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m xpstore.index.build")
    parser.add_argument("--data", required=True, help="the store's LMDB directory")
    parser.add_argument("--plan", required=True, help="BuildPlan as JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--neighbors", default=None)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--map-size", type=int, default=1 << 28)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    plan = BuildPlan(**json.loads(args.plan))
    tables = LmdbTables(Path(args.data), readonly=True, map_size=args.map_size)
    try:
        outcome = run_build(
            tables,
            plan,
            Path(args.out),
            Path(args.neighbors) if args.neighbors else None,
            alive=_parent_alive(args.parent),
        )
    finally:
        tables.close()
    sys.stdout.write(
        json.dumps({"info": outcome.info.to_json(), "stats": outcome.stats.to_dict()}) + "\n"
    )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
