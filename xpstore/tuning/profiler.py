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
bounded tallies of query texts (trending) and the slowest queries. A query merges at most
``window / slot`` slots, whatever the number of stored metrics.
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

__all__ = ["ALL_LAYERS", "Profiler", "TypeStats"]

log = logging.getLogger(__name__)

ALL_LAYERS = "*"
"""The layer key of a whole query (its total latency)."""
STORE_PREFIX = "store."
TEXT_CAP = 2048
"""Distinct query texts tallied per slot; beyond it the rarest are dropped (lossy counting)."""
SLOW_KEEP = 20
"""Slowest queries remembered per slot and type."""


@dataclass
class TypeStats:
    """Counters and sketches of one (query_type, layer) in one slot; mergeable."""

    latency: LogHistogram = field(default_factory=LogHistogram)
    errors: int = 0
    successes: int = 0
    cache_hits: int = 0
    hit_latency: LogHistogram = field(default_factory=LogHistogram)
    miss_latency: LogHistogram = field(default_factory=LogHistogram)
    parallel: LogHistogram = field(default_factory=LogHistogram)
    sequential: LogHistogram = field(default_factory=LogHistogram)
    layer_speedup_sum: float = 0.0
    layer_speedup_n: int = 0
    by_concurrency: dict[int, LogHistogram] = field(default_factory=dict)
    hours: list[int] = field(default_factory=lambda: [0] * 24)

    def merge(self, o: TypeStats) -> TypeStats:
        self.latency.merge(o.latency)
        self.errors += o.errors
        self.successes += o.successes
        self.cache_hits += o.cache_hits
        self.hit_latency.merge(o.hit_latency)
        self.miss_latency.merge(o.miss_latency)
        self.parallel.merge(o.parallel)
        self.sequential.merge(o.sequential)
        self.layer_speedup_sum += o.layer_speedup_sum
        self.layer_speedup_n += o.layer_speedup_n
        for c, h in o.by_concurrency.items():
            self.by_concurrency.setdefault(c, LogHistogram()).merge(h)
        self.hours = [a + b for a, b in zip(self.hours, o.hours, strict=True)]
        return self

    def summary(self) -> dict[str, Any]:
        """The figures ``profile`` reports (latencies in ms)."""
        n = self.latency.count
        par, seq = self.parallel, self.sequential
        speedup = seq.mean / par.mean if par.count and seq.count and par.mean > 0 else None
        layer_speedup = (
            self.layer_speedup_sum / self.layer_speedup_n if self.layer_speedup_n else None
        )
        return {
            "count": n,
            "mean_ms": _ms(self.latency.mean) if n else None,
            "p50_ms": _ms(self.latency.quantile(0.5)) if n else None,
            "p90_ms": _ms(self.latency.quantile(0.9)) if n else None,
            "p99_ms": _ms(self.latency.quantile(0.99)) if n else None,
            "max_ms": _ms(self.latency.max) if n else None,
            "error_rate": self.errors / n if n else None,
            "success_rate": self.successes / n if n else None,
            "cache_hit_rate": self.cache_hits / n if n else None,
            "parallel_speedup": speedup,
            "layer_speedup": layer_speedup,
            "parallel_count": par.count,
            "sequential_count": seq.count,
        }


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
                whole.layer_speedup_sum += sum(rec.layer_latencies_ms.values()) / rec.latency_ms
                whole.layer_speedup_n += 1
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
        merged: dict[tuple[str, str], TypeStats] = {}
        texts: dict[str, dict[str, int]] = {}
        slow: dict[str, list[tuple[float, int, str]]] = {}
        with self._lock:
            for slot in self._window(hours):
                for key, st in slot.stats.items():
                    if query_type is not None and key[0] != query_type:
                        continue
                    have = merged.get(key)
                    if have is None:
                        merged[key] = TypeStats().merge(st)
                    else:
                        have.merge(st)
                for qt, tally in slot.texts.items():
                    if query_type is None or qt == query_type:
                        into = texts.setdefault(qt, {})
                        for t, c in tally.items():
                            into[t] = into.get(t, 0) + c
                for qt, heap in slot.slow.items():
                    if query_type is None or qt == query_type:
                        slow.setdefault(qt, []).extend(heap)
        types: dict[str, Any] = {}
        for (qt, layer), st in sorted(merged.items()):
            entry = types.setdefault(qt, {"layers": {}})
            if layer == ALL_LAYERS:
                entry.update(st.summary())
                entry["hour_of_day"] = list(st.hours)
                entry["cache"] = _cache(st)
                entry["concurrency"] = {
                    str(c): {"count": h.count, "mean_ms": _ms(h.mean),
                             "p99_ms": _ms(h.quantile(0.99))}
                    for c, h in sorted(st.by_concurrency.items())
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

    def _window(self, hours: float | None) -> Iterable[_Slot]:
        span = self.window_s if hours is None else min(self.window_s, hours * 3600.0)
        oldest = int((time.time() - span) // self.slot_s)
        return [s for k, s in self._slots.items() if k >= oldest]

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
    if rec.error is not None or not rec.success:
        st.errors += 1
    if rec.cache_hit:
        st.cache_hits += 1
        st.hit_latency.add(latency)
    else:
        st.miss_latency.add(latency)
    (st.parallel if rec.parallel else st.sequential).add(latency)
    st.by_concurrency.setdefault(_concurrency_bucket(rec.concurrency), LogHistogram()).add(latency)
    st.hours[hour] += 1


def _concurrency_bucket(c: int) -> int:
    """1, 2, 4, 8, 16, ...: the power of two at or below ``c``."""
    return 1 << (max(1, c).bit_length() - 1)


def _cache(st: TypeStats) -> dict[str, Any]:
    hit, miss = st.hit_latency, st.miss_latency
    saved = None
    if hit.count and miss.count and miss.mean > 0:
        saved = 1.0 - hit.mean / miss.mean
    return {
        "hit_rate": st.cache_hits / st.latency.count if st.latency.count else None,
        "hit_mean_ms": _ms(hit.mean) if hit.count else None,
        "miss_mean_ms": _ms(miss.mean) if miss.count else None,
        "latency_saved": saved,
    }
