"""``store.health()``, ``store.metrics()`` and their CLI commands (issue 13), in process: every
built-in check driven to each status through its thresholds on real stores, the registries,
the window over the telemetry, the histogram export, the verify record, the learner's check,
``xpstore health`` exit codes and ``xpstore report``'s PNGs."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from xpstore import InvalidArgumentError, Learner, Store, Tuning
from xpstore.cli import main
from xpstore.config import StoreConfig
from xpstore.demo.listeners import simulate
from xpstore.demo.synthetic import make_fingerprint, make_query_metric
from xpstore.index.history import FILE as BUILDS_FILE
from xpstore.index.history import read_builds
from xpstore.model.records import Decision
from xpstore.model.sketch import LogHistogram
from xpstore.ops.inspect import CheckReport
from xpstore.persistence.telemetry import Telemetry
from xpstore.store.health import (
    CheckResult,
    RecentTelemetry,
    grade,
    last_verify,
    record_verify,
    worst,
)
from xpstore.store.metrics import LATENCY_BUCKETS, to_buckets
from xpstore.tuning.monitor import MemoryReading
from xpstore.tuning.observe import watch_learner

PRED = {"kind": "prediction", "predicted": "warm", "confidence": 0.5, "context": "c"}


def _fingerprints(store: Store, n: int, seed: int = 0, prefix: str = "t") -> None:
    rng = np.random.default_rng(seed)
    store.put_many([make_fingerprint(rng, f"{prefix}{i}") for i in range(n)])


# ------------------------------------------------------------------ registry and grading


def test_grade_and_worst() -> None:
    assert grade(5, 10, 20) == "healthy" and grade(15, 10, 20) == "warning"
    assert grade(25, 10, 20) == "critical"
    assert grade(0.9, 0.7, 0.5, lower_is_worse=True) == "healthy"
    assert grade(0.6, 0.7, 0.5, lower_is_worse=True) == "warning"
    assert grade(0.4, 0.7, 0.5, lower_is_worse=True) == "critical"
    assert worst([]) == "healthy" and worst(["healthy", "critical", "warning"]) == "critical"


def test_check_registry(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        health = store.parts.health
        builtin = health.names()
        assert builtin == ["wal", "applier_lag", "fsync", "index", "memory", "disk",
                           "answer_cache", "verify"]  # fmt: skip
        health.register_check("mine", lambda cfg: CheckResult("x", "warning", "look", 3))
        report = store.health()
        assert report["status"] == "warning"
        assert report["checks"]["mine"] == {"status": "warning", "message": "look", "value": 3}
        with pytest.raises(InvalidArgumentError, match="replace=True") as info:
            health.register_check("mine", lambda cfg: CheckResult("mine", "healthy", ""))
        assert info.value.field == "name"
        with pytest.raises(InvalidArgumentError, match="letters"):
            health.register_check("bad name", lambda cfg: CheckResult("", "healthy", ""))

        def boom(cfg: StoreConfig) -> CheckResult:
            raise RuntimeError("the probe broke")

        health.register_check("memory", boom, replace=True)  # replaces a built-in one
        row = store.health()["checks"]["memory"]
        assert row["status"] == "critical" and "the probe broke" in row["message"]
        assert store.health()["status"] == "critical"
        health.unregister_check("memory")
        health.unregister_check("mine")
        assert "memory" not in store.health()["checks"]
        with pytest.raises(InvalidArgumentError, match="no health check 'nope'") as info:
            health.check("nope")
        assert info.value.field == "check"


# ------------------------------------------------------------------ window and histograms


def test_recent_window_subtracts_older_observations() -> None:
    now = [1000.0]
    tel = Telemetry()
    recent = RecentTelemetry(tel, clock=lambda: now[0])
    for v in (0.001, 0.002, 0.003):
        tel.observe("wal.fsync", v)
    assert recent.histogram("wal.fsync", 60).count == 3  # no old snapshot: since open
    now[0] += 61
    tel.observe("wal.fsync", 0.5)
    tel.observe("wal.fsync", 0.5)
    h = recent.histogram("wal.fsync", 60)
    assert h.count == 2 and h.sum == pytest.approx(1.0)
    assert h.quantile(0.5) == pytest.approx(0.5, rel=0.02)
    now[0] += 120
    assert recent.histogram("wal.fsync", 60).count == 0  # nothing in the last minute
    assert recent.histogram("never.seen", 60).count == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=100.0), min_size=1, max_size=300),
       st.integers(min_value=0, max_value=5))  # fmt: skip
def test_buckets_match_exact_counts_within_the_sketch_error(values: list[float], zeros: int
                                                            ) -> None:  # fmt: skip
    h = LogHistogram()
    h.extend(values)
    h.add(0.0, zeros) if zeros else None
    rows = to_buckets(h, LATENCY_BUCKETS)
    assert rows[-1] == ("+Inf", float(len(values) + zeros))
    counts = [c for _le, c in rows]
    assert counts == sorted(counts)
    for le, c in rows[:-1]:
        bound = float(le)
        at_most = zeros + sum(v <= bound / 1.02 for v in values)
        at_most_loose = zeros + sum(v <= bound * 1.02 for v in values)
        assert at_most <= c <= at_most_loose, (le, c)


# ------------------------------------------------------------------ built-in checks


def test_wal_check_sees_segments_a_checkpoint_should_have_deleted(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True, durability="none", segment_max_bytes=64 * 1024,
                    config={"wal.retain_segments": 100}) as store:  # fmt: skip
        for _ in range(6):
            store.put_many([dict(PRED, context="x" * 2000) for _ in range(20)])
        store.flush()
    segs = sorted((path / "wal").glob("*.wal"))
    assert len(segs) >= 3
    with Store.open(path, readonly=True) as store:  # retained on purpose: not counted
        row = store.health()["checks"]["wal"]
        assert row["status"] == "healthy" and row["value"]["checkpoint_age_s"] == 0
    old = time.time() - 7200
    for seg in segs[:-1]:
        os.utime(seg, (old, old))
    with Store.open(path, readonly=True, config={"wal.retain_segments": 0}) as store:
        row = store.health()["checks"]["wal"]
        assert row["status"] == "critical", row
        assert row["value"]["checkpoint_age_s"] >= 7000 and "checkpoint" in row["message"]
    with Store.open(path, readonly=True, config={"wal.retain_segments": 0,
                                            "health.checkpoint_age_critical_s": 1e6,
                                            "health.wal_bytes_warning": 1}) as store:  # fmt: skip
        row = store.health()["checks"]["wal"]
        assert row["status"] == "warning" and row["value"]["bytes"] > 1


def test_applier_lag_and_fsync_checks(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {"health.lag_ops_warning": 5, "health.lag_ops_critical": 50,
           "health.fsync_p99_warning_s": 1e-9, "health.fsync_p99_critical_s": 3600.0}
    with Store.open(tmp_path / "s", create=True, hold_applier=True, config=cfg) as store:
        fsync = store.parts.health.check("fsync")
        assert fsync.status == "healthy" and "too few" in fsync.message
        for _ in range(25):  # 25 commits, 25 fsyncs
            store.put(PRED)
        lag = store.parts.health.check("applier_lag")
        assert lag.status == "warning" and lag.value["lag_ops"] == 25
        assert "applier held" in lag.message
        fsync = store.parts.health.check("fsync")
        assert fsync.status == "warning" and fsync.value["count"] == 25
        assert 0 < fsync.value["p50_s"] <= fsync.value["p99_s"]
        store.put_many([PRED] * 30)
        assert store.parts.health.check("applier_lag").status == "critical"
    with Store.open(tmp_path / "s", readonly=True) as store:
        lag = store.parts.health.check("applier_lag")
        assert lag.status == "healthy" and lag.value["lag_ops"] is None
        assert "writer process" in lag.message


def test_index_check(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True, durability="none", index_auto_rebuild=False,
                    index_delta_min=1000) as store:  # fmt: skip
        assert store.parts.health.check("index").message.startswith("no fingerprints")
        _fingerprints(store, 200)
        store.rebuild_index()
        row = store.parts.health.check("index")
        assert row.status == "healthy" and row.value["size"] == 200
        assert row.value["recall_at_10"] == pytest.approx(1.0)
        _fingerprints(store, 40, seed=1, prefix="new")
        for i in range(30):
            store.delete_track(f"t{i}")
        row = store.parts.health.check("index")
        assert row.status == "healthy"  # within the thresholds
        assert row.value["delta"] == 40 and row.value["tombstones"] == 30
        store.reconfigure(**{"health.index_delta_warning": 0.01,
                             "health.index_tombstone_warning": 0.1})  # fmt: skip
        row = store.parts.health.check("index")
        assert row.status == "warning"
        assert "rebuild trigger" in row.message and "tombstones are 15%" in row.message
        store.reconfigure(**{"health.index_delta_warning": 2.0,
                             "health.index_tombstone_warning": 0.4,
                             "health.recall_warning": 1.0,
                             "health.recall_critical": 1.0})  # fmt: skip
        row = store.parts.health.check("index")
        assert row.status in ("healthy", "critical")  # exact: recall 1.0 is not under 1.0
        store.reconfigure(**{"index.exact_below": 0})  # HNSW: a probe under 1 is possible
        store.rebuild_index()
        builds = read_builds(path / "index")
        assert [b["build_id"] for b in builds] == sorted(b["build_id"] for b in builds)
        assert len(builds) == 2 and builds[-1]["kind"] == "hnsw"
        recall = builds[-1]["recall_at_10"]
        row = store.parts.health.check("index")
        assert row.status == ("critical" if recall < 1.0 else "healthy")
    with open(path / "index" / BUILDS_FILE, "a") as fh:
        fh.write('{"build_id": 9, "torn')  # a crash mid-append
    assert len(read_builds(path / "index")) == 2


def test_memory_disk_and_cache_checks(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    with Store.open(path, create=True, durability="none") as store:
        now = time.time()
        qs = [make_query_metric(rng, ts=now).model_copy(update={"cache_hit": i % 10 < 8})
              for i in range(100)]  # fmt: skip
        store.put_many(qs)
        report = store.health()
        assert report["status"] == "healthy", report
        cache = report["checks"]["answer_cache"]
        assert cache["value"]["hit_rate"] == pytest.approx(0.8)
        mem = report["checks"]["memory"]["value"]
        assert mem["source"] == "psutil" and 0 <= mem["level"] <= 3
        disk = report["checks"]["disk"]["value"]
        assert disk["free_bytes"] > 0 and disk["map_used_bytes"] <= disk["map_size"]
        store.reconfigure(**{"health.cache_hit_warning": 0.9, "health.memory_warning_pct": 0.01,
                             "health.disk_free_warning_bytes": 1 << 60})  # fmt: skip
        checks = store.health()["checks"]
        assert {checks[n]["status"] for n in ("answer_cache", "memory", "disk")} == {"warning"}
        assert checks["memory"]["value"]["level"] == 2
        store.reconfigure(**{"health.cache_hit_critical": 0.85, "health.memory_critical_pct": 0.02,
                             "health.disk_free_critical_bytes": 1 << 60})  # fmt: skip
        checks = store.health()["checks"]
        assert {checks[n]["status"] for n in ("answer_cache", "memory", "disk")} == {"critical"}
        store.reconfigure(**{"health.window_s": 1e-3})  # the queries are now out of the window
        time.sleep(0.01)
        cache = store.parts.health.check("answer_cache")
        assert cache.status == "healthy" and cache.value["queries"] == 0


def test_verify_record(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Store.open(path, create=True).close()
    assert last_verify(path) is None
    result = CliRunner().invoke(main, ["verify", str(path)])  # changes nothing by default
    assert result.exit_code == 0 and last_verify(path) is None
    with Store.open(path, readonly=True) as store:
        assert "no verify recorded" in store.parts.health.check("verify").message
    result = CliRunner().invoke(main, ["verify", str(path), "--record"])
    assert result.exit_code == 0, result.output
    rec = last_verify(path)
    assert rec is not None and rec["ok"] and rec["problems"] == 0
    with Store.open(path, readonly=True) as store:
        assert store.parts.health.check("verify").status == "healthy"
    bad = CheckReport(str(path))
    bad.add("wal/0001.wal+64", "torn tail")
    record_verify(path, bad, at=time.time() - 100)
    with Store.open(path, readonly=True, config={"health.verify_age_warning_s": 10}) as store:
        row = store.parts.health.check("verify")
        assert row.status == "critical" and "wal/0001.wal+64: torn tail" in row.message
        record_verify(path, CheckReport(str(path)), at=time.time() - 100)
        row = store.parts.health.check("verify")
        assert row.status == "warning" and row.value["age_s"] >= 100
        (path / "last_verify.json").write_text("{garbage")
        row = store.parts.health.check("verify")
        assert row.status == "critical" and "damaged" in row.message


def test_learner_check_and_metrics(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, durability="none",
                    config={"health.accuracy_min_outcomes": 20}) as store:  # fmt: skip
        learner = Learner(store, policy="fixed")
        watch_learner(store, lambda: learner)
        row = store.parts.health.check("prediction_accuracy")
        assert row.status == "healthy" and "too few" in row.message
        simulate(store, "fixed", listeners=2, interactions=20, seed=0, learner=learner)
        row = store.parts.health.check("prediction_accuracy")
        rate = row.value["window"]["accuracy"]
        assert row.value["window"]["n"] == 40
        assert row.status == ("warning" if rate < 0.4 else "healthy")
        store.reconfigure(**{"health.accuracy_warning": 1.0})
        if rate < 1.0:
            assert store.parts.health.check("prediction_accuracy").status == "warning"
        m = store.metrics()
        assert m['xpstore_learner_accuracy_ratio{span="window"}'] == pytest.approx(rate)
        assert m['xpstore_learner_weight{side="user"}'] == pytest.approx(0.7)
        assert m["xpstore_learner_resolved"] == 40


def test_tuning_takes_over_the_memory_check_and_exports_its_decisions(tmp_path: Path) -> None:
    readings = [MemoryReading(total=1000, available=600, rss=50 << 20)]
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        _fingerprints(store, 30)
        tuning = Tuning(store, background=False)
        tuning.monitor.reader = lambda: readings[-1]
        row = store.parts.health.check("memory")
        assert row.status == "healthy" and row.value["source"] == "monitor"
        assert "no reading of its own yet" in row.message and row.value["level"] == 0
        for available, level, status in ((150, 1, "warning"), (50, 2, "critical"),
                                          (600, 0, "healthy")):  # fmt: skip
            readings.append(MemoryReading(total=1000, available=available, rss=60 << 20))
            assert tuning.monitor.check() == level
            row = store.parts.health.check("memory")
            assert (row.status, row.value["level"]) == (status, level), row
            assert row.value["used_pct"] == pytest.approx(100 - available / 10)
            assert store.metrics()["xpstore_memory_level"] == level
        assert store.health()["checks"]["memory"]["status"] == "healthy"

        tuning.tuner.enable()
        tuning.tuner.disable()
        tuning.tuner.enable()
        store.put(Decision(component="tuner", action="rollback", target="index.ef_search",
                           old=32.0, new=64.0, reason="recall under the floor", evidence={},
                           policy="balanced"))  # fmt: skip
        m = store.metrics()
        assert m['xpstore_tuner_decisions_total{action="enable",knob="tuner"}'] == 2
        assert m['xpstore_tuner_decisions_total{action="disable",knob="tuner"}'] == 1
        assert m['xpstore_tuner_decisions_total{action="rollback",knob="index.ef_search"}'] == 1
        assert m["xpstore_tuner_rollbacks_total"] == 1
        assert m["xpstore_tuner_enabled"] == 1 and m["xpstore_tuner_pending_changes"] == 0
        assert m['xpstore_tuner_strategy{strategy="balanced"}'] == 1
        text = store.parts.metrics.text().decode()
        assert "# HELP xpstore_tuner_decisions_total " in text
        assert "# TYPE xpstore_tuner_decisions_total counter" in text
        tuning.tuner.disable()
        assert store.metrics()["xpstore_tuner_enabled"] == 0
        # one tuning per open store: a second is refused before it starts anything and leaves
        # the first's memory check and metrics in place
        threads = threading.active_count()
        with pytest.raises(InvalidArgumentError, match="already has a Tuning") as err:
            Tuning(store, background=True)
        assert err.value.field == "store" and threading.active_count() == threads
        assert store.health()["checks"]["memory"]["value"]["source"] == "monitor"
        assert store.metrics()["xpstore_tuner_enabled"] == 0

        tuning.close()  # detached: psutil's check is back, the tuner's metrics are gone
        assert store.health()["checks"]["memory"]["value"]["source"] == "psutil"
        assert "xpstore_tuner_enabled" not in store.metrics()
        assert list(store.health()["checks"]).index("memory") == 4  # back in its place
        with Tuning(store, background=False, monitor=False):
            assert store.health()["checks"]["memory"]["value"]["source"] == "psutil"
            assert store.metrics()["xpstore_tuner_enabled"] == 0
        with pytest.raises(InvalidArgumentError, match="no built-in"):
            store.parts.health.restore_check("prediction_accuracy")


# ------------------------------------------------------------------ metrics


def test_metrics_dict_and_text(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as store:
        _fingerprints(store, 50)
        for _ in range(3):
            store.put(PRED)
        store.similar("t1", k=3)
        m = store.metrics()
        assert m['xpstore_records{kind="fingerprint"}'] == 50
        assert m["xpstore_puts_total"] == 4 and m["xpstore_put_records_total"] == 53
        assert m["xpstore_put_seconds_count"] == 4
        assert m['xpstore_put_seconds_bucket{le="+Inf"}'] == 4
        assert m["xpstore_wal_fsyncs_total"] == m["xpstore_wal_fsync_seconds_count"] >= 4
        assert m["xpstore_wal_written_bytes_total"] > 0
        assert m["xpstore_acked_lsn"] == 53 and m["xpstore_applier_lag_ops"] >= 0
        assert m["xpstore_index_vectors"] + m["xpstore_index_delta"] == 50
        assert m["xpstore_similar_queries_total"] == 1
        assert m['xpstore_health_check_status{check="wal"}'] == 0
        text = store.parts.metrics.text().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name, family in families.items():
            assert family.documentation, name
            if family.type == "counter":
                assert f"{name}_total " in text, name
            if name.endswith("_seconds"):
                assert family.type in ("histogram", "gauge"), name
        assert families["xpstore_wal_group_commit_writers"].type == "histogram"
        store.parts.metrics.register_collector("extra", lambda: [])
        with pytest.raises(InvalidArgumentError, match="replace=True"):
            store.parts.metrics.register_collector("extra", lambda: [])
        store.parts.metrics.unregister_collector("extra")


# ------------------------------------------------------------------ CLI


def _health(path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["health", str(path), "--json", *extra])
    return result.exit_code, json.loads(result.stdout) if result.stdout.strip() else {}


def test_health_command_exit_codes(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True, durability="none") as store:
        store.put(PRED)
    code, report = _health(path)
    assert (code, report["status"]) == (0, "healthy")
    result = CliRunner().invoke(main, ["health", str(path)])
    assert result.exit_code == 0 and "ok   wal" in result.stdout
    with Store.open(path) as store:
        store.reconfigure(**{"health.disk_free_warning_bytes": 1 << 60})
    code, report = _health(path)
    assert (code, report["status"]) == (1, "warning")
    assert report["checks"]["disk"]["status"] == "warning"
    with Store.open(path) as store:
        store.reconfigure(**{"health.disk_free_critical_bytes": 1 << 60})
    code, report = _health(path)
    assert (code, report["status"]) == (4, "critical")
    result = CliRunner().invoke(main, ["health", str(path)])
    assert result.exit_code == 4 and "CRIT disk" in result.stdout
    assert CliRunner().invoke(main, ["health", str(tmp_path / "none")]).exit_code == 2
    data = path / "data" / "data.mdb"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    code, report = _health(path)
    assert (code, report["status"]) == (4, "critical")
    assert "cannot open" in report["checks"]["open"]["message"]
    assert "truncated" in report["checks"]["open"]["message"]


def test_metrics_command(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True, durability="none") as store:
        _fingerprints(store, 30)
        store.rebuild_index()
    result = CliRunner().invoke(main, ["metrics", str(path)])
    assert result.exit_code == 0, result.output
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    assert families["xpstore_index_vectors"].samples[0].value == 30
    result = CliRunner().invoke(main, ["metrics", str(path), "--json"])
    assert json.loads(result.stdout)['xpstore_records{kind="fingerprint"}'] == 30


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR, after checking the signature and the IEND chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    assert data.endswith(b"IEND\xaeB`\x82"), path
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def test_report_pngs(tmp_path: Path) -> None:
    from xpstore.service.report import SIZES

    path = tmp_path / "s"
    Store.open(path, create=True, durability="none").close()
    empty = tmp_path / "empty"  # nothing to draw: every figure says so, at its size
    result = CliRunner().invoke(main, ["report", str(path), "--out", str(empty)])
    assert result.exit_code == 0, result.output
    for name, size in SIZES.items():
        assert _png_size(empty / f"{name}.png") == size, name
    with Store.open(path) as store, Tuning(store, background=False, monitor=False) as tuning:
        _fingerprints(store, 120)
        store.rebuild_index()
        store.rebuild_index()
        simulate(store, "default", listeners=3, interactions=40, seed=0)
        for i in range(20):
            store.similar(f"t{i}", k=5)
        tuning.profiler.flush()  # the put/similar summaries the latency figure reads
    assert len(read_builds(path / "index")) >= 2  # and any automatic build
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)["files"]
    assert set(files) == set(SIZES)
    for name, file in files.items():
        assert _png_size(Path(file)) == SIZES[name], name
        assert Path(file).stat().st_size > (empty / f"{name}.png").stat().st_size, name


def test_latency_over_time_merges_the_summaries_and_the_query_metrics(tmp_path: Path) -> None:
    from xpstore.tuning.profiler import latency_over_time

    rng = np.random.default_rng(3)
    with Store.open(tmp_path / "s", create=True, durability="none") as store:
        assert latency_over_time(store) == {}
        with Tuning(store, background=False, monitor=False) as tuning:
            for i in range(3):
                _fingerprints(store, 10, seed=i, prefix=f"b{i}-")
            store.similar("b0-1", k=3)
            assert tuning.profiler.flush() >= 2
            store.similar("b1-1", k=3)
            tuning.profiler.flush()
        hour = 3600.0 * (time.time() // 3600 - 30)  # metrics logged a day ago, an hour apart
        metrics = [make_query_metric(rng, ts=hour + 3600 * (i % 2) + i) for i in range(40)]
        store.put_many(metrics)
        series = latency_over_time(store, app_types=1)
        put = series["store.put"]
        # one observation per put call: three ingests and the first flush's own put_many
        assert sum(p["count"] for p in put) == 4
        assert sum(p["count"] for p in series["store.similar"]) == 2
        app = [t for t in series if not t.startswith("store.")]
        counts = {m.query_type: 0 for m in metrics}
        for m in metrics:
            counts[m.query_type] += 1
        assert app == [min(counts, key=lambda t: (-counts[t], t))]  # the most frequent type
        points = series[app[0]]
        assert sum(p["count"] for p in points) == counts[app[0]]
        assert [p["t"] for p in points] == sorted(p["t"] for p in points)
        assert len(points) == 2 and points[1]["t"] - points[0]["t"] == 3600  # hourly steps
        for p in points:
            lat = sorted(m.latency_ms for m in metrics if m.query_type == app[0]
                         and p["t"] <= (m.ts or 0.0) < p["t"] + 3600)  # fmt: skip
            assert p["p50_ms"] == pytest.approx(float(np.quantile(lat, 0.5, method="lower")),
                                                rel=0.05)  # fmt: skip
            assert p["p50_ms"] <= p["p99_ms"] <= max(lat) * 1.0001
