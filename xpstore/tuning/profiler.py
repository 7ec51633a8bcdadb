"""The profiler (issue 12; docs/tuning.md, "Profiler"): what queries cost, per query type and
layer, over a sliding window, without ever rescanning the store after open.

Two sources:

- **QueryMetric records** an application logs. Each acknowledged one reaches the profiler on the
  acknowledgement path (an overlay subscription: the WAL leader only appends the effect to an
  inbox; decoding happens at the next read or flush, off the leader). Opening rebuilds the
  window from the stored records (one ``scan`` over the window's time range).
- **The store's own operations** (``put``, ``wal.fsync``, ``apply``, ``similar``, ``sample``,
  ``snapshot``, ``index.rebuild``, ...), observed in memory by ``store.parts.telemetry``. Every
  ``flush_s`` seconds the profiler takes the interval's histograms and logs **one QueryMetric per
  operation type** (``query_type="store.<name>"``, ``layers=["store"]``, ``latency_ms`` the
  interval's mean, ``result_count`` its count, ``query_text`` the interval's LogHistogram as JSON)
  through the WAL: never one record per call. Being QueryMetrics, they come back through the same
  path and are merged exactly (bucket counts add), so ``profile("store.put")`` covers restarts.

State: the window is cut into slots of ``slot_s`` (an hour); each slot keeps, per
``(query_type, layer)``, a :class:`~xpstore.model.sketch.LogHistogram` of latencies (±2 %,
mergeable exactly; why not a t-digest: docs/design.md, "Telemetry") and plain counters, plus
bounded tallies of query texts (trending) and the slowest queries. ``profile()`` over the whole
window merges the closed slots once (cached until one of them changes or expires) and adds the
current slot: its cost does not grow with the number of stored metrics.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from xpstore.errors import InvalidArgumentError, XpStoreError
from xpstore.model.events import Acknowledged
from xpstore.model.records import Experience, QueryMetric
from xpstore.model.sketch import LogHistogram
from xpstore.store.store import Store

__all__ = ["ALL_LAYERS", "LATENCY_TYPES", "Profiler", "TypeStats", "latency_over_time"]

log = logging.getLogger(__name__)

ALL_LAYERS = "*"
"""The layer key of a whole query (its total latency)."""
STORE_PREFIX = "store."
TEXT_CAP = 256
"""Distinct query texts tallied per slot and type; beyond it the rarer half is dropped (lossy
counting: a text frequent over the slot survives)."""
SLOW_KEEP = 20
"""Slowest queries remembered per slot and type."""


@dataclass
class TypeStats:
    """Counters and one latency sketch of one (query_type, layer) in one slot; mergeable. Only
    the latency needs quantiles; the cache, parallel and concurrency splits keep sums and
    counts for their means, so a query costs one sketch update per (type, layer)."""

    latency: LogHistogram = field(default_factory=LogHistogram)
    errors: int = 0
    successes: int = 0
    hits: list[float] = field(default_factory=lambda: [0.0, 0.0])  # count, latency sum
    misses: list[float] = field(default_factory=lambda: [0.0, 0.0])
    parallel: list[float] = field(default_factory=lambda: [0.0, 0.0])
    sequential: list[float] = field(default_factory=lambda: [0.0, 0.0])
    layer_speedup: list[float] = field(default_factory=lambda: [0.0, 0.0])  # count, sum
    by_concurrency: dict[int, list[float]] = field(default_factory=dict)  # count, sum, max
    hours: list[int] = field(default_factory=lambda: [0] * 24)

    def merge(self, o: TypeStats) -> TypeStats:
        """Add ``o``'s counts to these."""
        sign = 1
        self.latency.merge(o.latency)
        self.errors += o.errors
        self.successes += o.successes
        for mine, theirs in ((self.hits, o.hits), (self.misses, o.misses),
                             (self.parallel, o.parallel), (self.sequential, o.sequential),
                             (self.layer_speedup, o.layer_speedup)):  # fmt: skip
            mine[0] += sign * theirs[0]
            mine[1] += sign * theirs[1]
        for c, (n, total, top) in o.by_concurrency.items():
            row = self.by_concurrency.setdefault(c, [0.0, 0.0, 0.0])
            row[0] += sign * n
            row[1] += sign * total
            row[2] = max(row[2], top)
        self.hours = [a + sign * b for a, b in zip(self.hours, o.hours, strict=True)]
        return self

    def summary(self) -> dict[str, Any]:
        """The figures ``profile`` reports (latencies in ms)."""
        n = self.latency.count
        par, seq = _mean(self.parallel), _mean(self.sequential)
        speedup = seq / par if par and seq else None
        return {
            "count": n,
            "mean_ms": _ms(self.latency.mean) if n else None,
            "p50_ms": _ms(self.latency.quantile(0.5)) if n else None,
            "p90_ms": _ms(self.latency.quantile(0.9)) if n else None,
            "p99_ms": _ms(self.latency.quantile(0.99)) if n else None,
            "max_ms": _ms(self.latency.max) if n else None,
            "error_rate": self.errors / n if n else None,
            "success_rate": self.successes / n if n else None,
            "cache_hit_rate": self.hits[0] / n if n else None,
            "parallel_speedup": speedup,
            "layer_speedup": _mean(self.layer_speedup),
            "parallel_count": int(self.parallel[0]),
            "sequential_count": int(self.sequential[0]),
        }


def _mean(pair: list[float]) -> float | None:
    return pair[1] / pair[0] if pair[0] > 0 else None


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class _Slot:
    """One ``slot_s`` of the window."""

    __slots__ = ("slow", "stats", "texts")

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str], TypeStats] = {}
        self.texts: dict[str, dict[str, int]] = {}  # query_type -> text -> count
        self.slow: dict[str, list[tuple[float, int, str]]] = {}  # min-heaps (latency, id, text)

    def get(self, qtype: str, layer: str) -> TypeStats:
        key = (qtype, layer)
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = TypeStats()
        return st

    def add_text(self, qtype: str, text: str) -> None:
        tally = self.texts.setdefault(qtype, {})
        tally[text] = tally.get(text, 0) + 1
        if len(tally) > TEXT_CAP:  # drop the rarest half: the frequent ones survive
            cut = sorted(tally.values())[len(tally) // 2]
            for t in [t for t, c in tally.items() if c <= cut and t != text]:
                del tally[t]

    def add_slow(self, qtype: str, latency: float, rid: int, text: str) -> None:
        heap = self.slow.setdefault(qtype, [])
        item = (latency, rid, text)
        if len(heap) < SLOW_KEEP:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)


class _Merged:
    """Several slots merged: stats per (type, layer), text tallies, slow-query candidates."""

    def __init__(self, slots: Iterable[_Slot], query_type: str | None) -> None:
        self.stats: dict[tuple[str, str], TypeStats] = {}
        self.texts: dict[str, dict[str, int]] = {}
        self.slow: dict[str, list[tuple[float, int, str]]] = {}
        for slot in slots:
            self.add(slot, query_type)

    def add(self, slot: _Slot, query_type: str | None) -> None:
        for key, st in slot.stats.items():
            if query_type is not None and key[0] != query_type:
                continue
            have = self.stats.get(key)
            if have is None:
                self.stats[key] = TypeStats().merge(st)
            else:
                have.merge(st)
        for qt, tally in slot.texts.items():
            if query_type is None or qt == query_type:
                into = self.texts.setdefault(qt, {})
                for t, c in tally.items():
                    into[t] = into.get(t, 0) + c
        for qt, heap in slot.slow.items():
            if query_type is None or qt == query_type:
                self.slow.setdefault(qt, []).extend(heap)

    def copy(self, query_type: str | None) -> _Merged:
        """A copy limited to ``query_type`` (None: all), safe to add to."""
        out = _Merged((), None)
        for key, st in self.stats.items():
            if query_type is None or key[0] == query_type:
                out.stats[key] = TypeStats().merge(st)
        for qt, tally in self.texts.items():
            if query_type is None or qt == query_type:
                out.texts[qt] = dict(tally)
        for qt, heap in self.slow.items():
            if query_type is None or qt == query_type:
                out.slow[qt] = list(heap)
        return out


class Profiler:
    """See the module docstring. ``Profiler(store)`` subscribes and rebuilds the window;
    ``close()`` flushes the last interval and unsubscribes."""

    def __init__(
        self,
        store: Store,
        *,
        window_s: float = 24 * 3600.0,
        slot_s: float = 3600.0,
        flush_s: float = 60.0,
        slow_quantile: float = 0.99,
        background: bool = True,
        on_flush: list[Callable[[], object]] | None = None,
    ) -> None:
        if not (isinstance(window_s, int | float) and window_s > 0):
            raise InvalidArgumentError(f"window_s must be > 0, got {window_s!r}", field="window_s")
        if not (isinstance(slot_s, int | float) and 0 < slot_s <= window_s):
            raise InvalidArgumentError("slot_s must be in (0, window_s]", field="slot_s")
        if not (isinstance(flush_s, int | float) and flush_s > 0):
            raise InvalidArgumentError(f"flush_s must be > 0, got {flush_s!r}", field="flush_s")
        if not 0.0 < slow_quantile < 1.0:
            raise InvalidArgumentError("slow_quantile must be in (0, 1)", field="slow_quantile")
        self.store = store
        self.window_s = float(window_s)
        self.slot_s = float(slot_s)
        self.flush_s = float(flush_s)
        self.slow_quantile = slow_quantile
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._version = 0
        self._closed: tuple[int, int, _Merged] | None = None
        self._inbox: deque[Acknowledged] = deque()
        self._scanned_max = 0
        self.fingerprints_acked = 0
        """New fingerprints acknowledged since the profiler started (the tuner's insert rate)."""
        self.started = time.time()
        self.flushes = 0
        self.on_flush: list[Callable[[], object]] = on_flush if on_flush is not None else []
        """Called after each periodic flush, on the profiler's thread (the pattern detector
        logs its lookups there)."""
        self._stop = threading.Event()
        self._sub = None
        self._thread: threading.Thread | None = None
        parts = store.parts
        writable = not store.readonly
        if writable:
            self._sub, _unapplied = parts.engine.overlay.subscribe(self._on_ack)
        self.rebuild()
        if self._sub is not None:
            self._sub.start()
        if background and writable:
            self._thread = threading.Thread(target=self._run, name="xpstore-profiler",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    # ------------------------------------------------------------------ intake
    def _on_ack(self, batch: Acknowledged) -> None:
        """Overlay listener (the WAL leader): keep the batch if it holds new query metrics."""
        for eff in batch.effects:
            if eff.is_new and eff.kind in ("query_metric", "fingerprint"):
                self._inbox.append(batch)
                return

    def catch_up(self) -> None:
        """Decode and count the query metrics acknowledged since the last call."""
        inbox = self._inbox
        while inbox:
            batch = inbox.popleft()
            for eff in batch.effects:
                if not eff.is_new or eff.record_id is None:
                    continue
                if eff.kind == "fingerprint":
                    self.fingerprints_acked += 1
                elif eff.kind == "query_metric" and eff.record_id > self._scanned_max:
                    exp = eff.experience()
                    if exp is not None:
                        self.add(exp)

    def rebuild(self) -> None:
        """The window from the stored query metrics (at open: one scan of the window)."""
        started = time.perf_counter()
        since = time.time() - self.window_s
        n = 0
        top = 0
        with self._lock:
            self._slots.clear()
            self._version += 1
        for exp in self.store.scan("query_metric", since=since):
            self.add(exp)
            top = max(top, exp.id)
            n += 1
        self._scanned_max = top
        log.info("profiler rebuilt from %d query metrics in %.2f s", n,
                 time.perf_counter() - started)  # fmt: skip

    def add(self, exp: Experience) -> None:
        """Count one stored QueryMetric (an application's, or a store summary)."""
        rec = exp.record
        if not isinstance(rec, QueryMetric):
            raise InvalidArgumentError(f"record {exp.id} is a {exp.kind}, not a query metric",
                                       field="record")  # fmt: skip
        ts = rec.ts if rec.ts is not None else exp.ts
        with self._lock:
            slot = self._slot(ts)
            if slot is None:
                return
            if rec.query_type.startswith(STORE_PREFIX) and rec.layers == ["store"]:
                self._add_summary(slot, rec, ts)
                return
            latency = rec.latency_ms / 1000.0
            hour = time.gmtime(ts).tm_hour
            whole = slot.get(rec.query_type, ALL_LAYERS)
            _count(whole, rec, latency, hour)
            if rec.parallel and latency > 0 and rec.layer_latencies_ms:
                whole.layer_speedup[0] += 1
                whole.layer_speedup[1] += sum(rec.layer_latencies_ms.values()) / rec.latency_ms
            for layer in rec.layers:
                lat = rec.layer_latencies_ms.get(layer)
                if lat is not None:
                    _count(slot.get(rec.query_type, layer), rec, lat / 1000.0, hour)
            if rec.query_text:
                slot.add_text(rec.query_type, rec.query_text)
            slot.add_slow(rec.query_type, latency, exp.id, rec.query_text)

    def _add_summary(self, slot: _Slot, rec: QueryMetric, ts: float) -> None:
        try:
            hist = LogHistogram.from_dict(json.loads(rec.query_text))
        except (ValueError, InvalidArgumentError) as exc:
            log.warning("store summary %s unreadable: %s", rec.query_id, exc)
            return
        st = slot.get(rec.query_type, ALL_LAYERS)
        st.latency.merge(hist)
        st.successes += hist.count
        st.hours[time.gmtime(ts).tm_hour] += hist.count

    def _slot(self, ts: float) -> _Slot | None:
        """The slot of ``ts`` (None: outside the window); drops slots that left it."""
        now = time.time()
        key = int(ts // self.slot_s)
        oldest = int((now - self.window_s) // self.slot_s)
        if key < oldest:
            return None
        if key < int(now // self.slot_s):
            self._version += 1  # a closed slot changed: the cached merge is stale
        if len(self._slots) > self.window_s / self.slot_s + 2:
            for k in [k for k in self._slots if k < oldest]:
                del self._slots[k]
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        return slot

    # ------------------------------------------------------------------ queries
    def stats(
        self, query_type: str, layer: str = ALL_LAYERS, hours: float | None = None
    ) -> TypeStats:
        """The merged stats of one type and layer over the last ``hours`` (default: window)."""
        self.catch_up()
        out = TypeStats()
        with self._lock:
            for slot in self._window(hours):
                st = slot.stats.get((query_type, layer))
                if st is not None:
                    out.merge(st)
        return out

    def query_types(self, hours: float | None = None) -> list[str]:
        self.catch_up()
        with self._lock:
            return sorted({qt for slot in self._window(hours) for qt, _l in slot.stats})

    def profile(
        self, query_type: str | None = None, hours: float | None = None, top: int = 10
    ) -> dict[str, Any]:
        """Count, mean, p50/p99, error, cache-hit and success rates, parallel speedup per type
        and layer; trending and slow queries, the hour-of-day pattern, cache and concurrency
        effectiveness (docs/tuning.md). ``query_type`` None: every type."""
        if hours is not None and not (isinstance(hours, int | float) and hours > 0):
            raise InvalidArgumentError(f"hours must be > 0, got {hours!r}", field="hours")
        self.catch_up()
        with self._lock:
            if hours is None:  # the closed slots merged once (cached), plus the current one
                now_key = int(time.time() // self.slot_s)
                cache = self._closed
                if cache is None or cache[0] != self._version or cache[1] != now_key:
                    closed = [s for k, s in self._window_items(None) if k < now_key]
                    self._closed = cache = (self._version, now_key, _Merged(closed, None))
                current = self._slots.get(now_key)
                merged = cache[2].copy(query_type)
                if current is not None:
                    merged.add(current, query_type)
            else:
                merged = _Merged(self._window(hours), query_type)
        types: dict[str, Any] = {}
        slow, texts = merged.slow, merged.texts
        for (qt, layer), st in sorted(merged.stats.items()):
            entry = types.setdefault(qt, {"layers": {}})
            if layer == ALL_LAYERS:
                entry.update(st.summary())
                entry["hour_of_day"] = list(st.hours)
                entry["cache"] = _cache(st)
                entry["concurrency"] = {
                    str(c): {"count": int(n), "mean_ms": _ms(total / n), "max_ms": _ms(peak)}
                    for c, (n, total, peak) in sorted(st.by_concurrency.items()) if n > 0
                }  # fmt: skip
                thr = st.latency.quantile(self.slow_quantile) if st.latency.count else math.inf
                entry["slow"] = {
                    "threshold_ms": _ms(thr) if st.latency.count else None,
                    "count": st.latency.count_above(thr) if st.latency.count else 0,
                    "examples": [
                        {"id": rid, "latency_ms": _ms(lat), "query_text": text}
                        for lat, rid, text in sorted(slow.get(qt, []), reverse=True)[:top]
                        if lat >= thr
                    ],
                }  # fmt: skip
            else:
                entry["layers"][layer] = st.summary()
        trending = sorted(
            ((c, qt, t) for qt, tally in texts.items() for t, c in tally.items()), reverse=True
        )[:top]
        return {
            "window_hours": (hours if hours is not None else self.window_s / 3600.0),
            "types": types,
            "trending": [{"query_text": t, "query_type": qt, "count": c} for c, qt, t in trending],
        }

    def _window(self, hours: float | None) -> list[_Slot]:
        return [s for _k, s in self._window_items(hours)]

    def _window_items(self, hours: float | None) -> list[tuple[int, _Slot]]:
        span = self.window_s if hours is None else min(self.window_s, hours * 3600.0)
        oldest = int((time.time() - span) // self.slot_s)
        return [(k, s) for k, s in self._slots.items() if k >= oldest]

    # ------------------------------------------------------------------ store summaries
    def flush(self) -> int:
        """Log the interval's store-operation summaries (one QueryMetric per operation type,
        one WAL frame); return how many were logged."""
        start, end, hists = self.store.parts.telemetry.take_interval()
        records = []
        for name, hist in sorted(hists.items()):
            if not hist.count or name.endswith("batch_ops") or name.endswith("writers"):
                continue  # sizes, not latencies: the metrics endpoint exports those
            records.append(QueryMetric(
                query_id=f"store:{name}:{start:.3f}", query_text=json.dumps(hist.to_dict()),
                query_type=STORE_PREFIX + name, latency_ms=_ms(hist.mean), memory_mb=0.0,
                cache_hit=False, result_count=hist.count, layers=["store"], success=True,
                ts=end,
            ))  # fmt: skip
        if records:
            self.store.put_many(records)
            self.flushes += 1
        return len(records)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
                self.catch_up()
                for hook in self.on_flush:
                    hook()
            except XpStoreError as exc:  # a closed or failed store: stop quietly
                log.info("profiler stops: %s", exc)
                return

    def close(self) -> None:
        """Stop the thread and unsubscribe; in background mode, log the last interval (a
        profiler without its thread only flushes when asked: ``xpstore profile`` writes
        nothing)."""
        self._stop.set()
        if self._sub is not None:
            self._sub.cancel()
        if self._thread is None:
            return
        self._thread.join(timeout=30)
        if not self.store.readonly and not self.store.parts.engine.closed:
            try:
                self.flush()
            except XpStoreError as exc:
                log.warning("profiler: last summary not logged: %s", exc)


def _count(st: TypeStats, rec: QueryMetric, latency: float, hour: int) -> None:
    st.latency.add(latency)
    if rec.success:
        st.successes += 1
    else:
        st.errors += 1
    split = st.hits if rec.cache_hit else st.misses
    split[0] += 1
    split[1] += latency
    split = st.parallel if rec.parallel else st.sequential
    split[0] += 1
    split[1] += latency
    key = _concurrency_bucket(rec.concurrency)
    row = st.by_concurrency.get(key)
    if row is None:
        row = st.by_concurrency[key] = [0.0, 0.0, 0.0]
    row[0] += 1
    row[1] += latency
    row[2] = max(row[2], latency)
    st.hours[hour] += 1


def _concurrency_bucket(c: int) -> int:
    """1, 2, 4, 8, 16, ...: the power of two at or below ``c``."""
    return 1 << (max(1, c).bit_length() - 1)


def _cache(st: TypeStats) -> dict[str, Any]:
    hit, miss = _mean(st.hits), _mean(st.misses)
    return {
        "hit_rate": st.hits[0] / st.latency.count if st.latency.count else None,
        "hit_mean_ms": _ms(hit) if hit is not None else None,
        "miss_mean_ms": _ms(miss) if miss is not None else None,
        "latency_saved": 1.0 - hit / miss if hit is not None and miss else None,
    }


LATENCY_TYPES = ("store.put", "store.similar")
"""The store operations :func:`latency_over_time` always follows."""
BUCKETS_S = (60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0)
"""Candidate widths of a time step; the narrowest giving at most ``max_points`` steps wins."""


def latency_over_time(
    store: Store,
    *,
    since: float | None = None,
    app_types: int = 4,
    max_points: int = 120,
) -> dict[str, list[dict[str, float]]]:
    """p50 and p99 (ms) per time step of ``store.put`` and ``store.similar`` (the profiler's
    stored summaries, merged exactly) and of the ``app_types`` most frequent application query
    types (their QueryMetrics' latencies): ``{type: [{"t", "p50_ms", "p99_ms", "count"}]}``, a
    step's ``t`` its start (epoch seconds). One scan of the stored query metrics from ``since``
    (``xpstore report``'s latency figure)."""
    minute: dict[tuple[str, int], LogHistogram] = {}
    app_counts: dict[str, int] = {}
    for exp in store.scan("query_metric", since=since):
        rec = exp.record
        if not isinstance(rec, QueryMetric):
            continue
        ts = rec.ts if rec.ts is not None else exp.ts
        key = (rec.query_type, int(ts // BUCKETS_S[0]))
        if rec.query_type.startswith(STORE_PREFIX) and rec.layers == ["store"]:
            if rec.query_type not in LATENCY_TYPES:
                continue
            try:
                hist = LogHistogram.from_dict(json.loads(rec.query_text))
            except (ValueError, InvalidArgumentError) as exc:
                log.warning("store summary %s unreadable: %s", rec.query_id, exc)
                continue
            minute.setdefault(key, LogHistogram()).merge(hist)
        else:
            app_counts[rec.query_type] = app_counts.get(rec.query_type, 0) + 1
            minute.setdefault(key, LogHistogram()).add(rec.latency_ms / 1000.0)
    if not minute:
        return {}
    keep = {*LATENCY_TYPES, *sorted(app_counts, key=lambda t: (-app_counts[t], t))[:app_types]}
    steps = [k[1] for k in minute]
    span = (max(steps) - min(steps) + 1) * BUCKETS_S[0]
    width = next((w for w in BUCKETS_S if span / w <= max_points), BUCKETS_S[-1])
    merged: dict[str, dict[int, LogHistogram]] = {}
    for (qtype, step), hist in minute.items():
        if qtype in keep:
            t = int(step * BUCKETS_S[0] // width)
            merged.setdefault(qtype, {}).setdefault(t, LogHistogram()).merge(hist)
    return {
        qtype: [
            {"t": t * width, "p50_ms": _ms(h.quantile(0.5)), "p99_ms": _ms(h.quantile(0.99)),
             "count": float(h.count)}
            for t, h in sorted(by_t.items())
        ]
        for qtype, by_t in sorted(merged.items())
    }  # fmt: skip
