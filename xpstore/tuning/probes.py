"""The tuner's measurements: a probe set's latency, throughput and recall (docs/tuning.md).

A probe set (:class:`Probes`) is drawn by the tuner (priority sampling of the current
fingerprints); here it is measured against the live index: recall@10 against the exact top 10 of
the live set (:func:`live_vectors`), latency one query at a time (p50, p99 of the median pass),
throughput as one batch. :func:`measure_pair` measures two search-parameter sets interleaved, so
that the rare pauses of a shared machine land on both sides; :func:`delta_row_cost` prices one
delta row for the rebuild-cadence rule.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xpstore.model.sketch import LogHistogram

if TYPE_CHECKING:
    from xpstore.index.serving import IndexServer

__all__ = [
    "BATCH_REPEATS",
    "REPEATS",
    "K",
    "Measurement",
    "Probes",
    "delta_row_cost",
    "live_vectors",
    "measure",
    "measure_pair",
]

K = 10
BATCH_REPEATS = 7
"""Batched probe searches per measurement (a few ms each); the median is kept."""
REPEATS = 3
"""Probe passes per measurement; the median pass's p50, p99 and batch time are kept (one pass
of 200 single queries puts p99 at the 2nd-slowest query: a stray pause of another process on
the shared machine decided it)."""


@dataclass(frozen=True)
class Measurement:
    """What one probe pass measured (evidence of a decision)."""

    p50_ms: float | None = None
    p99_ms: float | None = None
    qps: float | None = None
    recall: float | None = None
    memory_bytes: float | None = None

    def as_evidence(self, prefix: str = "") -> dict[str, float]:
        out = {}
        for key in ("p50_ms", "p99_ms", "qps", "recall", "memory_bytes"):
            v = getattr(self, key)
            if v is not None:
                out[prefix + key] = float(v)
        return out


class Probes:
    """One probe set and its exact answers."""

    def __init__(self, queries: np.ndarray[Any, Any], own: list[int],
                 truth: list[set[int]]) -> None:  # fmt: skip
        self.queries = queries
        self.own = own
        self.truth = truth


def measure(
    server: IndexServer | None,
    probes: Probes | None,
    memory: float | None,
    params: dict[str, int] | None = None,
    threads: int | None = None,
) -> Measurement:
    """Latency (one query at a time, p50 and p99 of the median pass), throughput (one batch)
    and recall of the probes under ``params`` (``threads``: OpenMP threads per query)."""
    if probes is None or server is None:
        return Measurement(memory_bytes=memory)
    saved = server.query_threads
    if threads is not None:
        server.query_threads = threads
    p50s: list[float] = []
    p99s: list[float] = []
    hits = 0
    try:
        for _rep in range(REPEATS):
            lat = LogHistogram()
            hits = 0
            for i in range(len(probes.own)):
                t0 = time.perf_counter()
                got = server.search(probes.queries[i : i + 1], K, params=params,
                                    exclude=[{probes.own[i]}])[0]  # fmt: skip
                lat.add(time.perf_counter() - t0)
                hits += len({rid for rid, _s in got} & probes.truth[i])
            p50s.append(lat.quantile(0.5))
            p99s.append(lat.quantile(0.99))
    finally:
        server.query_threads = saved
    batches = []
    excl = [{r} for r in probes.own]
    for _rep in range(BATCH_REPEATS):
        t0 = time.perf_counter()
        server.search(probes.queries, K, exclude=excl, params=params)
        batches.append(time.perf_counter() - t0)
    batch = sorted(batches)[BATCH_REPEATS // 2]
    total = sum(len(t) for t in probes.truth)
    return Measurement(
        p50_ms=sorted(p50s)[REPEATS // 2] * 1000, p99_ms=sorted(p99s)[REPEATS // 2] * 1000,
        qps=len(probes.own) / batch if batch > 0 else None,
        recall=hits / total if total else None, memory_bytes=memory,
    )  # fmt: skip


def measure_pair(
    server: IndexServer | None,
    probes: Probes,
    memory: float | None,
    old: dict[str, int],
    new: dict[str, int],
) -> tuple[Measurement, Measurement]:
    """:func:`measure` of two search-parameter sets interleaved: each probe query under
    both (the order alternating), each batch too. Latency is each query's fastest of the
    passes, then p50 and p99 across queries: the search's own cost per query, which is what
    these knobs move. A raw p99 of a few hundred sub-millisecond calls is decided by how
    many of the rare pauses (another thread holding the GIL, another process) land on each
    side, and read as a 1.5-1.8x "worsening" of a change that made every query cheaper."""
    if server is None:
        return Measurement(memory_bytes=memory), Measurement(memory_bytes=memory)
    sides = (old, new)
    n = len(probes.own)
    fastest = np.full((2, n), np.inf)
    hits = [0, 0]
    for rep in range(REPEATS):
        for i in range(n):
            for side in ((0, 1) if (i + rep) % 2 == 0 else (1, 0)):
                t0 = time.perf_counter()
                got = server.search(probes.queries[i : i + 1], K, params=sides[side],
                                    exclude=[{probes.own[i]}])[0]  # fmt: skip
                fastest[side, i] = min(fastest[side, i], time.perf_counter() - t0)
                if rep == 0:
                    hits[side] += len({rid for rid, _s in got} & probes.truth[i])
    excl = [{r} for r in probes.own]
    batches: tuple[list[float], list[float]] = ([], [])
    for rep in range(BATCH_REPEATS):
        for side in ((0, 1) if rep % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            server.search(probes.queries, K, exclude=excl, params=sides[side])
            batches[side].append(time.perf_counter() - t0)
    total = sum(len(t) for t in probes.truth)
    out = []
    for side in (0, 1):
        batch = sorted(batches[side])[BATCH_REPEATS // 2]
        p50, p99 = np.quantile(fastest[side], (0.5, 0.99)) if n else (math.nan, math.nan)
        out.append(Measurement(
            p50_ms=float(p50) * 1000, p99_ms=float(p99) * 1000,
            qps=len(probes.own) / batch if batch > 0 else None,
            recall=hits[side] / total if total else None, memory_bytes=memory,
        ))  # fmt: skip
    return out[0], out[1]


def live_vectors(server: IndexServer) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """(ids, vectors) of the live set: the main index's stored vectors minus tombstones, plus
    the delta."""
    backend = server.main.backend
    assert backend is not None
    ids, vecs = backend.vectors()
    tombs = server.tombs
    if tombs:
        keep = ~np.isin(ids, np.fromiter(tombs, dtype=np.int64, count=len(tombs)))
        ids, vecs = ids[keep], vecs[keep]
    delta = server.delta
    view = delta.view
    if view.n:
        d_ids = view.ids[: view.n]
        live = d_ids >= 0
        ids = np.concatenate([ids, d_ids[live]])
        vecs = np.vstack([vecs, view.vecs[: view.n][live]])
    return ids, np.ascontiguousarray(vecs, dtype=np.float32)


def delta_row_cost(server: IndexServer, probes: Probes) -> float | None:
    """Seconds one delta row adds to one query (an exact scan: linear in rows), measured on a
    scratch delta of the probes' own vectors repeated to 4096 rows."""
    from xpstore.index.delta import Delta
    from xpstore.model.events import RawFingerprint

    q = probes.queries
    rows = 4096
    scratch = np.resize(q, (rows, q.shape[1])).astype(np.float32)
    ids = np.arange(rows, dtype=np.int64)
    delta = Delta(q.shape[1], None)
    raw = RawFingerprint("probe", np.full(25, np.nan), None, None)
    for i in range(rows):
        delta.add(int(ids[i]), raw, scratch[i])
    one = q[:1]
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        delta.search(one, K)
    cost = (time.perf_counter() - t0) / reps / rows
    return cost if cost > 0 else None
