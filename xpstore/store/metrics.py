"""``store.metrics()``: the store's figures as Prometheus metrics (prometheus_client).

:class:`Metrics` is a prometheus_client *custom collector*: nothing is counted twice; every
scrape reads the telemetry (``engine.telemetry``: latency and size histograms, counters) and the
store's state (LSNs, counts, WAL and LMDB sizes, the index, the sampler, the health checks) at
that moment. Collectors are a registry (:meth:`Metrics.register_collector`) so that a capability
above the store exports its own families (the learner: accuracy and weights, from
``xpstore.tuning``).

**Histograms, not summaries.** The telemetry's log-bucket sketches are exported as Prometheus
histograms with fixed buckets (:data:`LATENCY_BUCKETS`, :data:`SIZE_BUCKETS`): buckets from
several processes or instances add up and ``histogram_quantile(rate(...[5m]))`` gives a
quantile over any window, while a summary's quantiles are fixed at export (here: since open)
and cannot be aggregated. Each sketch bucket is counted at its geometric midpoint, so a
boundary is placed within 1 % of where an exact histogram would put it.

Names follow Prometheus conventions (``xpstore_*_total`` counters, ``_seconds``, ``_bytes``),
each with a HELP line; the list is in docs/service.md.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from xpstore.errors import InvalidArgumentError
from xpstore.model.records import KINDS
from xpstore.model.sketch import LogHistogram
from xpstore.store.engine import Engine
from xpstore.store.health import STATUSES, Health
from xpstore.store.index_service import IndexService
from xpstore.store.reader import Reader
from xpstore.store.sampling_service import Sampling

__all__ = ["LATENCY_BUCKETS", "SIZE_BUCKETS", "Collector", "Metrics", "to_buckets"]

LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
"""Seconds: 25 us (a cached read) to 5 min (a rebuild of millions of tracks)."""
SIZE_BUCKETS = tuple(float(2**i) for i in range(0, 21, 1))
"""Counts (writers per group commit, operations per LMDB transaction): 1 to ~1M, doubling."""

Collector = Callable[[], Iterable[Metric]]
"""A callable returning prometheus_client metric families (``GaugeMetricFamily``, ...)."""

_HISTOGRAMS: dict[str, tuple[str, str, tuple[float, ...]]] = {
    "put": ("xpstore_put_seconds", "Latency of put/put_many calls (validate to acknowledged).",
            LATENCY_BUCKETS),
    "wal.fsync": ("xpstore_wal_fsync_seconds", "Latency of each WAL fdatasync.",
                  LATENCY_BUCKETS),
    "wal.commit_writers": ("xpstore_wal_group_commit_writers",
                           "Writers sharing one WAL write and sync (group-commit batch size).",
                           SIZE_BUCKETS),
    "apply": ("xpstore_apply_seconds", "Latency of each applier LMDB transaction.",
              LATENCY_BUCKETS),
    "apply.batch_ops": ("xpstore_apply_batch_ops",
                        "Operations per applier LMDB transaction.", SIZE_BUCKETS),
    "similar": ("xpstore_similar_seconds", "Latency of similar() calls.", LATENCY_BUCKETS),
    "similar_many": ("xpstore_similar_many_seconds", "Latency of similar_many() calls.",
                     LATENCY_BUCKETS),
    "sample": ("xpstore_sample_seconds", "Latency of sample() calls.", LATENCY_BUCKETS),
    "snapshot": ("xpstore_snapshot_seconds", "Duration of snapshots.", LATENCY_BUCKETS),
    "index.rebuild": ("xpstore_index_rebuild_seconds", "Duration of index builds.",
                      LATENCY_BUCKETS),
}  # fmt: skip
_COUNTERS: dict[str, tuple[str, str]] = {
    "put.records": ("xpstore_put_records", "Records written by put/put_many."),
    "wal.bytes": ("xpstore_wal_written_bytes", "Bytes written to the WAL."),
}
_STATUS_VALUE = {s: float(i) for i, s in enumerate(STATUSES)}


def to_buckets(h: LogHistogram, bounds: Iterable[float]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs for a Prometheus histogram, ``+Inf`` last; each sketch
    bucket counts at its geometric midpoint (clamped to the observed min and max)."""
    les = sorted(bounds)
    counts = [0] * (len(les) + 1)
    for value, n in [(0.0, h.zeros), *((_mid(h, i), c) for i, c in h.buckets.items())]:
        if not n:
            continue
        pos = next((j for j, le in enumerate(les) if value <= le), len(les))
        counts[pos] += n
    out, running = [], 0
    for le, c in zip([*(_le(x) for x in les), "+Inf"], counts, strict=True):
        running += c
        out.append((le, float(running)))
    return out


def _mid(h: LogHistogram, i: int) -> float:
    return float(min(max(h.gamma ** (i + 0.5), h.min), h.max))


def _le(x: float) -> str:
    return repr(float(x)) if x < 1e-3 else f"{x:g}"


class Metrics:
    """The collector of one open store (see the module doc); ``collect()`` is what
    prometheus_client calls, :meth:`as_dict` and :meth:`text` are the two renderings."""

    def __init__(
        self, engine: Engine, reader: Reader, index: IndexService, sampling: Sampling,
        health: Health,
    ) -> None:  # fmt: skip
        self._engine = engine
        self._reader = reader
        self._index = index
        self._sampling = sampling
        self._health = health
        self._lock = threading.Lock()
        self._collectors: dict[str, Collector] = {}

    # ------------------------------------------------------------------ registry
    def register_collector(self, name: str, fn: Collector, *, replace: bool = False) -> None:
        """Add a source of metric families under ``name`` (``replace=True`` to swap one)."""
        with self._lock:
            if name in self._collectors and not replace:
                raise InvalidArgumentError(
                    f"a collector named {name!r} exists; pass replace=True to replace it",
                    field="name",
                )
            self._collectors[name] = fn

    def unregister_collector(self, name: str) -> None:
        with self._lock:
            self._collectors.pop(name, None)

    # ------------------------------------------------------------------ renderings
    def collect(self) -> Iterator[Metric]:
        """Every family: the store's own, then each registered collector's."""
        self._engine.check_open()
        yield from self._telemetry()
        yield from self._state()
        with self._lock:
            extra = list(self._collectors.values())
        for fn in extra:
            yield from fn()

    def text(self) -> bytes:
        """The Prometheus text exposition (what ``GET /metrics`` serves)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)

    def as_dict(self) -> dict[str, float]:
        """Every sample as ``{name{label="v",...}: value}``, in exposition order."""
        out: dict[str, float] = {}
        for family in self.collect():
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    # ------------------------------------------------------------------ families
    def _telemetry(self) -> Iterator[Metric]:
        tel = self._engine.telemetry
        hists = tel.histograms()
        for key, h in sorted(hists.items()):
            name, doc, bounds = _HISTOGRAMS.get(key) or (
                "xpstore_" + key.replace(".", "_") + "_seconds", f"Latency of {key}.",
                LATENCY_BUCKETS,
            )  # fmt: skip
            yield HistogramMetricFamily(name, doc, buckets=to_buckets(h, bounds),
                                        sum_value=h.sum)  # fmt: skip
        calls = {"put": "xpstore_puts", "wal.fsync": "xpstore_wal_fsyncs",
                 "similar": "xpstore_similar_queries", "sample": "xpstore_samples"}  # fmt: skip
        for key, name in calls.items():
            seen = hists.get(key)
            yield CounterMetricFamily(name, f"Calls counted by the {key} telemetry.",
                                      value=seen.count if seen is not None else 0)  # fmt: skip
        counters = tel.counters()
        for key, (name, doc) in _COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=counters.get(key, 0.0))
        yield GaugeMetricFamily("xpstore_open_seconds", "Seconds since this process opened "
                                "the store.", value=time.time() - tel.opened_at)  # fmt: skip

    def _state(self) -> Iterator[Metric]:
        engine = self._engine
        applied = engine.applied_lsn()
        yield GaugeMetricFamily("xpstore_applied_lsn", "Last LSN applied to LMDB.", value=applied)
        wal = engine.wal
        if wal is not None:
            yield GaugeMetricFamily("xpstore_acked_lsn", "Last LSN acknowledged by the WAL.",
                                    value=wal.acked_lsn)  # fmt: skip
            yield GaugeMetricFamily("xpstore_applier_lag_ops",
                                    "Acknowledged operations not yet applied to LMDB.",
                                    value=max(0, wal.acked_lsn - applied))  # fmt: skip
            yield GaugeMetricFamily("xpstore_overlay_ops",
                                    "Acknowledged operations held in memory for LMDB.",
                                    value=len(engine.overlay))  # fmt: skip
        records = GaugeMetricFamily("xpstore_records", "Live records by kind.", labels=["kind"])
        for kind in KINDS:
            records.add_metric([kind], self._reader.count(kind))
        yield records
        wal_bytes = segs = 0
        for p in engine.layout.wal.glob("*.wal"):
            try:
                wal_bytes += p.stat().st_size
                segs += 1
            except OSError:  # a checkpoint deleted it meanwhile
                continue
        yield GaugeMetricFamily("xpstore_wal_disk_bytes", "Bytes of WAL on disk.", value=wal_bytes)
        yield GaugeMetricFamily("xpstore_wal_segments", "WAL segments on disk.", value=segs)
        tables = engine.tables
        info = tables.env.info()
        psize = int(tables.env.stat()["psize"])
        yield GaugeMetricFamily("xpstore_lmdb_map_bytes", "LMDB map size.",
                                value=int(info["map_size"]))  # fmt: skip
        yield GaugeMetricFamily("xpstore_lmdb_used_bytes", "LMDB pages in use (high-water).",
                                value=(int(info["last_pgno"]) + 1) * psize)  # fmt: skip
        yield from self._index_families()
        sampler = self._sampling.sampler
        if sampler is not None:  # a scrape does not attach the sampler (a rebuild from LMDB)
            items = GaugeMetricFamily("xpstore_sampler_items",
                                      "Items in the priority sampler's trees, by kind.",
                                      labels=["kind"])  # fmt: skip
            for kind, n in sorted(sampler.size().items()):
                items.add_metric([kind], n)
            yield items
        yield from self._health_families()

    def _index_families(self) -> Iterator[Metric]:
        mgr = self._index.manager
        if mgr is None or mgr.server is None:  # a scrape does not attach the index
            return
        st = self._index.status()
        for key, name, doc in (
            ("size", "xpstore_index_vectors", "Vectors in the main index."),
            ("delta", "xpstore_index_delta", "Vectors in the exact delta since the last build."),
            ("tombstones", "xpstore_index_tombstones", "Retired ids still in the main index."),
            ("live", "xpstore_index_live", "Tracks the index serves."),
            ("recall_at_10", "xpstore_index_recall", "The last build's recall@10 probe."),
            ("age_s", "xpstore_index_build_age_seconds", "Seconds since the last build."),
            ("build_id", "xpstore_index_build_id", "Id of the build in service."),
        ):
            v = st.get(key)
            if v is not None:
                yield GaugeMetricFamily(name, doc, value=float(v))
        builds = self._engine.telemetry.histograms().get("index.rebuild")
        yield CounterMetricFamily("xpstore_index_builds", "Index builds by this process.",
                                  value=builds.count if builds is not None else 0)  # fmt: skip

    def _health_families(self) -> Iterator[Metric]:
        report = self._health.report()
        checks = GaugeMetricFamily("xpstore_health_check_status",
                                   "Each health check: 0 healthy, 1 warning, 2 critical.",
                                   labels=["check"])  # fmt: skip
        for name, row in report["checks"].items():
            checks.add_metric([name], _STATUS_VALUE[row["status"]])
        yield checks
        yield GaugeMetricFamily("xpstore_health_status", "Overall health: 0 healthy, 1 warning, "
                                "2 critical.", value=_STATUS_VALUE[report["status"]])  # fmt: skip
        mem = report["checks"].get("memory", {}).get("value") or {}
        if "level" in mem:
            yield GaugeMetricFamily("xpstore_memory_level", "Memory pressure level 0-3.",
                                    value=float(mem["level"]))  # fmt: skip
        cache = report["checks"].get("answer_cache", {}).get("value") or {}
        if "queries" in cache:
            lookups = GaugeMetricFamily(
                "xpstore_answer_cache_lookups",
                "Query metrics in the health window by cache result.", labels=["result"])
            lookups.add_metric(["hit"], float(cache["hits"]))
            lookups.add_metric(["miss"], float(cache["queries"] - cache["hits"]))
            yield lookups
            if cache.get("hit_rate") is not None:
                yield GaugeMetricFamily("xpstore_answer_cache_hit_ratio",
                                        "Answer-cache hit rate in the health window.",
                                        value=float(cache["hit_rate"]))  # fmt: skip
        disk = report["checks"].get("disk", {}).get("value") or {}
        if "free_bytes" in disk:
            yield GaugeMetricFamily("xpstore_disk_free_bytes",
                                    "Free space on the store's file system.",
                                    value=float(disk["free_bytes"]))  # fmt: skip

