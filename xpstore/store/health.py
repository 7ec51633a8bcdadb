"""``store.health()``: is this store well? One entry per check, the worst check wins.

Each check measures one thing, compares it with its thresholds (``StoreConfig.health``;
docs/service.md, "Health") and returns a :class:`CheckResult`: ``healthy``, ``warning`` or
``critical``, a message a person can act on, and the measured value. Checks are a registry
(:meth:`Health.register_check`), so a capability above the store adds its own (the learner's
prediction accuracy, from ``xpstore.tuning``) or replaces a built-in one of the same name (the
resource monitor's memory level replaces the psutil one). A check that raises is reported as
``critical`` with the reason, never as an exception out of ``health()``.

Checks read what any process can see (files on disk, LMDB) and what this process measured
(fsync latencies, the applier's lag exist only in the writer); a reader says which figures it
cannot measure rather than inventing them. Nothing here writes to the store, except
:func:`record_verify`, which ``xpstore verify --record`` calls to leave its outcome beside it.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from xpstore.config import HealthSettings, StoreConfig
from xpstore.errors import InvalidArgumentError, XpStoreError
from xpstore.model.sketch import LogHistogram
from xpstore.ops.inspect import CheckReport
from xpstore.persistence import fs
from xpstore.persistence.telemetry import Telemetry
from xpstore.store.engine import Engine
from xpstore.store.index_service import IndexService
from xpstore.store.reader import Reader

__all__ = [
    "STATUSES",
    "CheckFn",
    "CheckResult",
    "Health",
    "RecentTelemetry",
    "Status",
    "grade",
    "last_verify",
    "record_verify",
    "worst",
]

log = logging.getLogger(__name__)

Status = Literal["healthy", "warning", "critical"]
STATUSES: tuple[Status, ...] = ("healthy", "warning", "critical")
_RANK = {s: i for i, s in enumerate(STATUSES)}

VERIFY_FILE = "last_verify.json"
"""Written beside the store's data by ``xpstore verify --record`` (never read by recovery)."""
CACHE_SCAN_LIMIT = 10_000
"""At most this many query metrics of the window are read for the answer-cache hit rate."""


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: status, what it means, and the measured value (JSON-able)."""

    name: str
    status: Status
    message: str
    value: Any = None

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "value": self.value}


CheckFn = Callable[[StoreConfig], CheckResult]
"""A check: given the config in force (thresholds in ``config.health``), measure and grade."""


def worst(statuses: Any) -> Status:
    """The worst of ``statuses`` (healthy when there are none)."""
    out: Status = "healthy"
    for s in statuses:
        if _RANK[s] > _RANK[out]:
            out = s
    return out


def grade(value: float, warning: float, critical: float, *, lower_is_worse: bool = False) -> Status:
    """``critical`` past ``critical``, ``warning`` past ``warning``, else ``healthy``."""
    if lower_is_worse:
        return "critical" if value < critical else "warning" if value < warning else "healthy"
    return "critical" if value > critical else "warning" if value > warning else "healthy"


class RecentTelemetry:
    """The telemetry of the last ``window_s`` seconds, from snapshots of the totals.

    Telemetry keeps totals since open; a window is the totals now minus the totals at the
    newest snapshot at least ``window_s`` old (bucket counts subtract exactly). Snapshots are
    taken when a window is asked for, at most one per tenth of the window, so the window is
    right to within a tenth; until the process is ``window_s`` old it is "since open".
    """

    def __init__(self, telemetry: Telemetry, clock: Callable[[], float] = time.monotonic) -> None:
        self._telemetry = telemetry
        self._clock = clock
        self._lock = threading.Lock()
        self._snaps: deque[tuple[float, dict[str, LogHistogram]]] = deque()

    def histogram(self, name: str, window_s: float) -> LogHistogram:
        """Observations of ``name`` in the window."""
        now = self._clock()
        current = self._telemetry.histograms()
        with self._lock:
            if not self._snaps or now - self._snaps[-1][0] >= window_s / 10:
                self._snaps.append((now, current))
            while len(self._snaps) > 1 and self._snaps[1][0] <= now - window_s:
                self._snaps.popleft()  # keep the newest snapshot that is window_s old
            base_t, base = self._snaps[0]
        h = current.get(name, LogHistogram())
        if base_t > now - window_s:  # no snapshot old enough: everything since open
            return h
        return _minus(h, base.get(name))


def _minus(h: LogHistogram, base: LogHistogram | None) -> LogHistogram:
    """``h`` without the observations already in ``base`` (an earlier copy of the same sketch);
    min and max are those of the whole history (a sketch cannot take them back)."""
    if base is None:
        return h
    out = LogHistogram(h.gamma)
    for i, c in h.buckets.items():
        left = c - base.buckets.get(i, 0)
        if left > 0:
            out.buckets[i] = left
    out.zeros = max(0, h.zeros - base.zeros)
    out.count = out.zeros + sum(out.buckets.values())
    out.sum = max(0.0, h.sum - base.sum)
    if out.count:
        out.min, out.max = h.min, h.max
    return out


@dataclass
class _Registered:
    fn: CheckFn
    builtin: bool = field(default=False)


class Health:
    """The check registry of one open store and its built-in checks (see the module doc)."""

    def __init__(self, engine: Engine, reader: Reader, index: IndexService) -> None:
        self._engine = engine
        self._reader = reader
        self._index = index
        self.recent = RecentTelemetry(engine.telemetry)
        self._checks: dict[str, _Registered] = {}
        self._lock = threading.Lock()
        for name, fn in (
            ("wal", self._check_wal),
            ("applier_lag", self._check_lag),
            ("fsync", self._check_fsync),
            ("index", self._check_index),
            ("memory", self._check_memory),
            ("disk", self._check_disk),
            ("answer_cache", self._check_cache),
            ("verify", self._check_verify),
        ):
            self._checks[name] = _Registered(fn, builtin=True)
        self._builtins = {name: reg.fn for name, reg in self._checks.items()}

    # ------------------------------------------------------------------ registry
    def register_check(self, name: str, fn: CheckFn, *, replace: bool = False) -> None:
        """Add the check ``name``; ``replace=True`` takes the place of a check of that name (a
        built-in one included). InvalidArgumentError if the name is taken and not replaced."""
        if not name or not name.replace("_", "").isalnum():
            raise InvalidArgumentError(
                f"a check name is letters, digits and '_', got {name!r}", field="name"
            )
        with self._lock:
            if name in self._checks and not replace:
                raise InvalidArgumentError(
                    f"a check named {name!r} exists; pass replace=True to replace it",
                    field="name",
                )
            self._checks[name] = _Registered(fn)

    def restore_check(self, name: str) -> None:
        """Put the built-in check ``name`` back in its place after a ``replace=True`` (the
        resource monitor's memory check gives way to psutil's when tuning detaches)."""
        fn = self._builtins.get(name)
        if fn is None:
            raise InvalidArgumentError(f"no built-in health check {name!r}", field="name")
        with self._lock:
            self._checks[name] = _Registered(fn, builtin=True)

    def unregister_check(self, name: str) -> None:
        """Remove the check ``name`` (nothing if there is none)."""
        with self._lock:
            self._checks.pop(name, None)

    def names(self) -> list[str]:
        """The registered checks, in the order they run."""
        with self._lock:
            return list(self._checks)

    # ------------------------------------------------------------------ running
    def check(self, name: str) -> CheckResult:
        """Run one check; InvalidArgumentError (field ``check``) if there is no such check."""
        with self._lock:
            reg = self._checks.get(name)
        if reg is None:
            raise InvalidArgumentError(
                f"no health check {name!r}; the checks are {', '.join(self.names())}",
                field="check",
            )
        return self._run(name, reg.fn)

    def report(self) -> dict[str, Any]:
        """Every check and the overall status: ``{"status", "checks": {name: {status, message,
        value}}, "checked_at", "path", "readonly"}``."""
        self._engine.check_open()
        with self._lock:
            items = list(self._checks.items())
        results = {name: self._run(name, reg.fn) for name, reg in items}
        return {
            "status": worst(r.status for r in results.values()),
            "checks": {name: r.as_dict() for name, r in results.items()},
            "checked_at": time.time(),
            "path": str(self._engine.path),
            "readonly": self._engine.readonly,
        }

    def _run(self, name: str, fn: CheckFn) -> CheckResult:
        self._engine.check_open()
        try:
            result = fn(self._engine.config)
        except Exception as exc:  # a failing check is a finding, not a crash of health()
            log.warning("health check %s failed", name, exc_info=True)
            return CheckResult(name, "critical", f"the check failed: {exc}", None)
        if result.name != name:
            result = CheckResult(name, result.status, result.message, result.value)
        return result

    # ------------------------------------------------------------------ built-in checks
    def _check_wal(self, config: StoreConfig) -> CheckResult:
        h = config.health
        segs = _segments(self._engine.layout.wal)
        total = sum(size for _lsn, _p, size, _m in segs)
        applied = self._engine.applied_lsn()
        # a closed segment whose every LSN LMDB holds is what a checkpoint deletes; the ones
        # the retention settings keep on purpose are not counted
        deletable = [
            mtime for (_f, _p, _s, mtime), nxt in itertools.pairwise(segs)
            if nxt[0] - 1 <= applied
        ]  # fmt: skip
        keep = config.wal.retain_segments
        if keep:
            deletable = deletable[:-keep] if len(deletable) > keep else []
        now = time.time()
        if config.wal.retain_seconds > 0:
            deletable = [m for m in deletable if m < now - config.wal.retain_seconds]
        age = now - min(deletable) if deletable else 0.0
        value = {"bytes": total, "segments": len(segs), "checkpoint_age_s": round(age, 3),
                 "applied_lsn": applied}  # fmt: skip
        status = worst([
            grade(total, h.wal_bytes_warning, h.wal_bytes_critical),
            grade(age, h.checkpoint_age_warning_s, h.checkpoint_age_critical_s),
        ])  # fmt: skip
        msg = f"{len(segs)} segments, {_mib(total)}"
        if deletable:
            msg += (f"; {len(deletable)} segment(s) LMDB already holds have waited "
                    f"{age:.0f} s for a checkpoint")  # fmt: skip
            if status != "healthy":
                msg += " (is the writer running? a writer open checkpoints)"
        return CheckResult("wal", status, msg, value)

    def _check_lag(self, config: StoreConfig) -> CheckResult:
        h = config.health
        engine = self._engine
        wal = engine.wal
        applied = engine.applied_lsn()
        if wal is None:
            return CheckResult("applier_lag", "healthy",
                               "measured in the writer process only (this one reads)",
                               {"applied_lsn": applied, "lag_ops": None})  # fmt: skip
        acked = wal.acked_lsn
        lag = max(0, acked - applied)
        value = {"acked_lsn": acked, "applied_lsn": applied, "lag_ops": lag,
                 "overlay_ops": len(engine.overlay)}  # fmt: skip
        status = grade(lag, h.lag_ops_warning, h.lag_ops_critical)
        if engine.applier is not None and engine.applier.error is not None:
            return CheckResult("applier_lag", "critical",
                               f"the applier stopped: {engine.applier.error}", value)  # fmt: skip
        held = engine.applier is not None and engine.applier.hold
        msg = f"{lag} acknowledged operations not yet in LMDB" + (" (applier held)" if held else "")
        return CheckResult("applier_lag", status, msg, value)

    def _check_fsync(self, config: StoreConfig) -> CheckResult:
        h = config.health
        hist = self.recent.histogram("wal.fsync", h.window_s)
        if hist.count < h.fsync_min_count:
            why = ("no WAL in this process (it reads)" if self._engine.wal is None
                   else f"{hist.count} fsyncs in the last {h.window_s:g} s, fewer than "
                        f"{h.fsync_min_count}: too few to judge")  # fmt: skip
            return CheckResult("fsync", "healthy", why, {"count": hist.count, "p99_s": None})
        p50, p99 = hist.quantile(0.5), hist.quantile(0.99)
        value = {"count": hist.count, "p50_s": p50, "p99_s": p99, "window_s": h.window_s}
        status = grade(p99, h.fsync_p99_warning_s, h.fsync_p99_critical_s)
        return CheckResult("fsync", status,
                           f"fdatasync p99 {p99 * 1e3:.2f} ms (p50 {p50 * 1e3:.2f} ms) over "
                           f"{hist.count} syncs", value)  # fmt: skip

    def _check_index(self, config: StoreConfig) -> CheckResult:
        h = config.health
        if self._index.manager is None and self._reader.count("fingerprint") == 0:
            return CheckResult("index", "healthy", "no fingerprints: nothing to index", None)
        st = self._index.status()
        cfg = config.index
        size, delta, tombs = int(st["size"]), int(st["delta"]), int(st["tombstones"])
        trigger = min(cfg.delta_max, max(cfg.delta_min, int(cfg.delta_ratio * size)))
        tomb_share = tombs / size if size else 0.0
        recall = st.get("recall_at_10")
        value = {"size": size, "delta": delta, "delta_trigger": trigger, "tombstones": tombs,
                 "tombstone_share": round(tomb_share, 4), "build_age_s": st.get("age_s"),
                 "recall_at_10": recall, "recall_warning": h.recall_warning,
                 "last_error": st.get("last_error")}  # fmt: skip
        statuses: list[Status] = []
        notes: list[str] = []
        if delta > h.index_delta_warning * trigger:
            statuses.append("warning")
            notes.append(f"delta {delta} is over {h.index_delta_warning:g}x its rebuild trigger "
                         f"{trigger}")  # fmt: skip
        if tomb_share > h.index_tombstone_warning:
            statuses.append("warning")
            notes.append(f"tombstones are {tomb_share:.0%} of the index")
        if recall is not None:
            s = grade(float(recall), h.recall_warning, h.recall_critical, lower_is_worse=True)
            statuses.append(s)
            if s != "healthy":
                notes.append(f"the last build's recall@10 probe {recall:.3f} is under "
                             f"{h.recall_warning:g}")  # fmt: skip
        if st.get("last_error"):
            statuses.append("warning")
            notes.append(f"the last rebuild failed: {st['last_error']}")
        age = st.get("age_s")
        head = f"{st.get('kind') or 'no'} index of {size}, delta {delta}, {tombs} tombstones"
        if age is not None:
            head += f", built {age:.0f} s ago"
        return CheckResult("index", worst(statuses), "; ".join([head, *notes]), value)

    def _check_memory(self, config: StoreConfig) -> CheckResult:
        h = config.health
        vm = psutil.virtual_memory()
        pct = float(vm.percent)
        level = memory_level(pct, h)
        rss = psutil.Process().memory_info().rss
        value = {"level": level, "used_pct": pct, "available_bytes": int(vm.available),
                 "process_rss_bytes": int(rss), "source": "psutil"}  # fmt: skip
        status: Status = "critical" if level >= 3 else "warning" if level == 2 else "healthy"
        return CheckResult("memory", status,
                           f"level {level}: {pct:.0f}% of system memory in use, this process "
                           f"{_mib(rss)}", value)  # fmt: skip

    def _check_disk(self, config: StoreConfig) -> CheckResult:
        h = config.health
        usage = shutil.disk_usage(self._engine.path)
        tables = self._engine.tables
        info = tables.env.info()
        psize = int(tables.env.stat()["psize"])
        map_size, used = int(info["map_size"]), (int(info["last_pgno"]) + 1) * psize
        value = {"free_bytes": usage.free, "total_bytes": usage.total, "map_size": map_size,
                 "map_used_bytes": used, "map_used_share": round(used / map_size, 4)}  # fmt: skip
        status = grade(usage.free, h.disk_free_warning_bytes, h.disk_free_critical_bytes,
                       lower_is_worse=True)  # fmt: skip
        msg = f"{_mib(usage.free)} free; LMDB uses {_mib(used)} of its {_mib(map_size)} map"
        if used > 0.9 * map_size and usage.free < map_size and status == "healthy":
            status = "warning"  # LMDB grows by doubling its map: that needs map_size more
            msg += "; the map is nearly full and the disk cannot hold its doubling"
        return CheckResult("disk", status, msg, value)

    def _check_cache(self, config: StoreConfig) -> CheckResult:
        h = config.health
        since = time.time() - h.window_s
        n = hits = 0
        for exp in self._reader.scan("query_metric", since=since, until=None, where=None,
                                     limit=CACHE_SCAN_LIMIT):  # fmt: skip
            n += 1
            hits += bool(getattr(exp.record, "cache_hit", False))
        value = {"queries": n, "hits": hits, "hit_rate": hits / n if n else None,
                 "window_s": h.window_s}  # fmt: skip
        if n < h.cache_min_queries:
            return CheckResult("answer_cache", "healthy",
                               f"{n} query metrics in the last {h.window_s:g} s, fewer than "
                               f"{h.cache_min_queries}: too few to judge", value)  # fmt: skip
        rate = hits / n
        status = grade(rate, h.cache_hit_warning, h.cache_hit_critical, lower_is_worse=True)
        return CheckResult("answer_cache", status,
                           f"hit rate {rate:.0%} over {n} queries in the last {h.window_s:g} s",
                           value)  # fmt: skip

    def _check_verify(self, config: StoreConfig) -> CheckResult:
        last = last_verify(self._engine.path)
        if last is None:
            return CheckResult("verify", "healthy",
                               "no verify recorded (xpstore verify --record)", None)  # fmt: skip
        age = max(0.0, time.time() - float(last["at"]))
        value = {**last, "age_s": round(age, 1)}
        if not last["ok"]:
            first = f": {last['first']}" if last.get("first") else ""
            return CheckResult("verify", "critical",
                               f"the last verify ({age:.0f} s ago) found {last['problems']} "
                               f"problem(s){first}", value)  # fmt: skip
        limit = config.health.verify_age_warning_s
        if limit is not None and age > limit:
            return CheckResult("verify", "warning",
                               f"the last verify was clean but {age:.0f} s ago (over {limit:g})",
                               value)  # fmt: skip
        return CheckResult("verify", "healthy", f"clean {age:.0f} s ago", value)


def memory_level(used_pct: float, h: HealthSettings) -> int:
    """0-3 like the resource monitor's levels: 2 from the warning threshold, 3 from the critical
    one, 1 within 10 points under the warning threshold."""
    if used_pct >= h.memory_critical_pct:
        return 3
    if used_pct >= h.memory_warning_pct:
        return 2
    return 1 if used_pct >= h.memory_warning_pct - 10 else 0


def _segments(wal_dir: Path) -> list[tuple[int, Path, int, float]]:
    """(first LSN, path, size, mtime) of each WAL segment, oldest first; files a checkpoint
    deletes meanwhile are skipped."""
    out = []
    for p in wal_dir.glob("*.wal"):
        try:
            st = p.stat()
            out.append((int(p.stem), p, st.st_size, st.st_mtime))
        except (OSError, ValueError):
            continue
    return sorted(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def record_verify(root: str | Path, report: CheckReport, *, at: float | None = None) -> Path:
    """Leave ``report``'s outcome in ``<root>/last_verify.json`` (atomically) for the health
    check; the data files are not touched."""
    doc = {
        "at": time.time() if at is None else at,
        "ok": report.ok,
        "problems": len(report.problems),
        "first": f"{report.problems[0].where}: {report.problems[0].what}"
        if report.problems else None,
    }  # fmt: skip
    path = Path(root) / VERIFY_FILE
    fs.atomic_write(path, json.dumps(doc).encode())
    return path


def last_verify(root: str | Path) -> dict[str, Any] | None:
    """The last recorded verify outcome, or None; a damaged file raises XpStoreError."""
    path = Path(root) / VERIFY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, Mapping):
            doc = {}
        at = float(doc["at"])
        out = {"at": at, "ok": bool(doc["ok"]), "problems": int(doc["problems"]),
               "first": None if doc.get("first") is None else str(doc["first"])}  # fmt: skip
    except (ValueError, TypeError, KeyError) as exc:
        raise XpStoreError(f"{path} is damaged ({exc}); run xpstore verify again") from exc
    if not math.isfinite(at):
        raise XpStoreError(f"{path} is damaged (field 'at'); run xpstore verify again")
    return out
