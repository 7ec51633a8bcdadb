"""The HTTP service (issue 13) as a real process on a free port, spoken to with httpx: every
endpoint and error path, the token, read-only refusal, a writer ingesting while the service
reads, SIGTERM, and the OpenAPI document.

Three processes in all (one read-only service, one writable service, one writer), shared by
the tests of this module, so the whole file stays within a few seconds of process starts.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from xpstore import Store
from xpstore.demo.listeners import simulate
from xpstore.demo.synthetic import make_fingerprint, make_query_metric

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-for-the-tests-0123456789"
TRACKS = 300
START_TIMEOUT = 60.0


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    path: Path
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start(path: Path, log: Path, *extra: str) -> Service:
    port = _free_port()
    cmd = [sys.executable, "-m", "xpstore.cli", "serve", str(path), "--port", str(port), *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env())
    svc = Service(proc, f"http://127.0.0.1:{port}", path, log)
    deadline = time.monotonic() + START_TIMEOUT
    with svc.client() as c:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the service exited with {proc.returncode}: "
                                     f"{log.read_text()}")  # fmt: skip
            try:
                if c.get("/openapi.json").status_code == 200:
                    return svc
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                _stop(svc)
                raise AssertionError(f"the service did not answer in time: {log.read_text()}")
            time.sleep(0.1)


def _stop(svc: Service) -> int:
    if svc.proc.poll() is None:
        svc.proc.send_signal(signal.SIGTERM)
        try:
            return svc.proc.wait(30)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait(10)
    return svc.proc.returncode


def _make_store(path: Path, *, seed: int, **config: Any) -> None:
    rng = np.random.default_rng(seed)
    with Store.open(path, create=True, durability="none", **config) as store:
        store.put_many([make_fingerprint(rng, f"t{i}") for i in range(TRACKS)])
        now = time.time()
        metrics = [make_query_metric(rng, ts=now).model_copy(update={"cache_hit": False})
                   for _ in range(60)]  # fmt: skip
        store.put_many(metrics)
        simulate(store, "default", listeners=3, interactions=20, seed=seed)
        store.rebuild_index()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("service")
    ro, rw = base / "ro", base / "rw"
    # the read-only service's store: every query missed the cache (answer_cache critical) and
    # the disk threshold is unreachable (disk: warning)
    _make_store(ro, seed=1, **{"health.disk_free_warning_bytes": 1 << 60})
    _make_store(rw, seed=2)
    token = base / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return {"ro": ro, "rw": rw, "token": token, "base": base}


@pytest.fixture(scope="module")
def ro(stores: dict[str, Path]) -> Iterator[Service]:
    svc = _start(stores["ro"], stores["base"] / "ro.log", "--token-file", str(stores["token"]),
                 "--max-body", "4096")  # fmt: skip
    try:
        yield svc
    finally:
        _stop(svc)


@pytest.fixture(scope="module")
def rw(stores: dict[str, Path]) -> Iterator[Service]:
    svc = _start(stores["rw"], stores["base"] / "rw.log", "--writable", "--token-file",
                 str(stores["token"]))  # fmt: skip
    try:
        yield svc
    finally:
        _stop(svc)


def _error(r: httpx.Response, status: int, field: str | None = "any") -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"error", "field"} and body["error"], body
    assert "Traceback" not in r.text
    if field != "any":
        assert body["field"] == field, body
    return body


# ------------------------------------------------------------------------- operators


def test_openapi_document(ro: Service) -> None:
    with ro.client() as c:
        doc = c.get("/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    methods = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert methods == {
        ("/metrics", "get"), ("/health", "get"), ("/health/{check}", "get"),
        ("/similar/{track_id}", "get"), ("/similar", "post"), ("/records/{record_id}", "get"),
        ("/stats", "get"), ("/index/status", "get"), ("/learning/accuracy", "get"),
        ("/learning/weights", "get"), ("/learning/reset", "post"),
        ("/tuning/status", "get"), ("/tuning/enable", "post"), ("/tuning/disable", "post"),
        ("/tuning/history", "get"),
    }  # fmt: skip
    params = {p["name"]: p for p in doc["paths"]["/similar/{track_id}"]["get"]["parameters"]}
    assert set(params) == {"track_id", "k", "where", "precomputed"}
    assert params["track_id"]["in"] == "path" and params["track_id"]["required"]
    k = params["k"]["schema"]
    assert (k["minimum"], k["maximum"], k["default"]) == (1, 1000, 10)
    body = doc["components"]["schemas"]["SimilarBody"]
    assert set(body["properties"]) == {"fingerprint", "vector", "k", "where", "exclude_self"}
    assert body["additionalProperties"] is False
    err = doc["components"]["schemas"]["ErrorBody"]
    assert set(err["properties"]) == {"error", "field"} and err["required"] == ["error"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op.get("operationId") and op.get("summary"), (path, method)
            if path != "/metrics":
                assert "400" in op["responses"] and "403" in op["responses"], (path, method)
    assert "requestBody" in doc["paths"]["/similar"]["post"]


def test_health(ro: Service) -> None:
    with ro.client() as c:
        r = c.get("/health")
        assert r.status_code == 503  # answer_cache is critical
        report = r.json()
        assert report["status"] == "critical" and report["readonly"] is True
        checks = report["checks"]
        assert {"wal", "applier_lag", "fsync", "index", "memory", "disk", "answer_cache",
                "verify", "prediction_accuracy"} <= set(checks)  # fmt: skip
        assert checks["answer_cache"]["status"] == "critical"
        assert checks["answer_cache"]["value"]["hit_rate"] == 0.0
        assert checks["disk"]["status"] == "warning"
        assert checks["index"]["status"] == "healthy"
        assert checks["index"]["value"]["size"] == TRACKS
        for name, row in checks.items():
            one = c.get(f"/health/{name}")
            assert one.status_code == (503 if row["status"] == "critical" else 200), name
            assert one.json()["check"] == name and one.json()["status"] == row["status"]
        warn = c.get("/health/disk")
        assert warn.status_code == 200 and warn.json()["status"] == "warning"
        _error(c.get("/health/nosuch"), 404, "check")


def test_metrics(ro: Service) -> None:
    with ro.client() as c:
        c.get("/similar/t1")  # one query, so similar() latency has an observation
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert all(name.startswith("xpstore_") and f.documentation for name, f in families.items())
    records = {s.labels["kind"]: s.value for s in families["xpstore_records"].samples}
    assert records["fingerprint"] == TRACKS and records["query_metric"] == 60
    assert families["xpstore_similar_seconds"].type == "histogram"
    count = [s.value for s in families["xpstore_similar_seconds"].samples
             if s.name == "xpstore_similar_seconds_count"]  # fmt: skip
    assert count and count[0] >= 1
    assert families["xpstore_similar_queries"].type == "counter"
    assert "xpstore_similar_queries_total" in r.text
    assert families["xpstore_index_vectors"].samples[0].value == TRACKS
    checks = {s.labels["check"]: s.value for s in families["xpstore_health_check_status"].samples}
    assert checks["answer_cache"] == 2 and checks["disk"] == 1
    assert families["xpstore_answer_cache_hit_ratio"].samples[0].value == 0.0
    acc = {s.labels["span"] for s in families["xpstore_learner_accuracy_ratio"].samples}
    assert acc == {"window", "all_time"}


def test_stats_index_records(ro: Service) -> None:
    with ro.client() as c:
        stats = c.get("/stats").json()
        assert stats["counts"]["fingerprint"] == TRACKS and stats["readonly"] is True
        status = c.get("/index/status").json()
        assert status["size"] == TRACKS and status["recall_at_10"] is not None
        rec = c.get("/records/1").json()
        assert rec["id"] == 1 and rec["kind"] == "fingerprint" and rec["record"]["track_id"]
        _error(c.get("/records/99999999"), 404)
        _error(c.get("/records/0"), 422, "record_id")
        _error(c.get("/records/abc"), 422, "record_id")


# ------------------------------------------------------------------------- similar


def test_similar_get(ro: Service) -> None:
    with ro.client() as c:
        r = c.get("/similar/t3", params={"k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["neighbors"]
        assert len(hits) == 5 and all(h["track_id"] != "t3" for h in hits)
        assert hits == sorted(hits, key=lambda h: -h["score"])
        style = hits[0]["metadata"]["style"]
        flt = c.get("/similar/t3", params={"k": 3, "where": f"metadata.style={style}"})
        assert flt.status_code == 200, flt.text
        assert all(h["metadata"]["style"] == style for h in flt.json()["neighbors"])
        same = c.get("/similar/t3", params={"k": 3, "where": json.dumps(
            {"metadata.style": style})})  # fmt: skip
        assert same.json()["neighbors"] == flt.json()["neighbors"]
        pre = c.get("/similar/t3", params={"k": 5, "precomputed": "true"})
        assert pre.status_code == 200 and len(pre.json()["neighbors"]) == 5
        _error(c.get("/similar/no-such-track"), 404, "track_id")
        _error(c.get("/similar/t3", params={"k": 0}), 422, "k")
        _error(c.get("/similar/t3", params={"k": 1001}), 422, "k")
        _error(c.get("/similar/t3", params={"k": "ten"}), 422, "k")
        _error(c.get("/similar/t3", params={"where": "bogus=1"}), 400)
        _error(c.get("/similar/t3", params={"where": "{not json"}), 400, "where")
        _error(c.get("/similar/t3", params={"where": "novalue"}), 400, "where")
        _error(c.get("/similar/t3", params={"precomputed": "maybe"}), 422, "precomputed")


def test_similar_post(ro: Service, stores: dict[str, Path]) -> None:
    with Store.open(stores["ro"], readonly=True) as store:
        fp = store.get_fingerprint("t7").record.model_dump(mode="json")
    fp.pop("kind", None)
    with ro.client() as c:
        r = c.post("/similar", json={"fingerprint": fp, "k": 4})
        assert r.status_code == 200, r.text
        assert len(r.json()["neighbors"]) == 4
        dim = 25  # no embedding in this store: the hybrid vector is the audio block
        vec = c.post("/similar", json={"vector": [1.0] + [0.0] * (dim - 1), "k": 2})
        assert vec.status_code == 200, vec.text
        _error(c.post("/similar", json={"vector": [1.0, 2.0]}), 400, "vector")
        _error(c.post("/similar", json={"k": 3}), 400, "fingerprint")
        _error(c.post("/similar", json={"fingerprint": fp, "vector": [1.0]}), 400)
        _error(c.post("/similar", json={"fingerprint": {"track_id": "x"}}), 400)
        _error(c.post("/similar", json={"fingerprint": fp, "k": 0}), 422, "k")
        _error(c.post("/similar", json={"fingerprint": fp, "bogus": 1}), 422, "bogus")
        _error(c.post("/similar", content=b"{not json",
                      headers={"content-type": "application/json"}), 400, "body")  # fmt: skip
        _error(c.post("/similar", json={"vector": [0.0] * 2000}), 413, "body")  # > --max-body


# ------------------------------------------------------------------------- learning


def test_learning(ro: Service) -> None:
    with ro.client() as c:
        acc = c.get("/learning/accuracy").json()
        assert acc["resolved"] > 0 and acc["accuracy"]["all_time"]["n"] == acc["resolved"]
        by = c.get("/learning/accuracy", params={"by": "user", "window": 10}).json()
        assert set(by["accuracy"]) == {"u00", "u01", "u02"}
        _error(c.get("/learning/accuracy", params={"by": "mood"}), 422, "by")
        _error(c.get("/learning/accuracy", params={"window": 0}), 422, "window")
        w = c.get("/learning/weights").json()
        assert w["source"] == "global" and abs(w["user_weight"] + w["audio_weight"] - 1) < 1e-9
        assert c.get("/learning/weights", params={"user": "u01"}).status_code == 200
        _error(c.get("/learning/weights", params={"user": "nobody"}), 404, "user")


def _decisions(c: httpx.Client) -> int:
    n: int = c.get("/stats").json()["counts"]["decision"]
    return n


def test_read_only_refuses_changes(ro: Service) -> None:
    with ro.client() as c:
        before = _decisions(c)
        auth = {"authorization": f"Bearer {TOKEN}"}
        body = _error(c.post("/learning/reset", headers=auth), 403)
        assert "read-only" in body["error"]
        assert _decisions(c) == before


def test_tuning_endpoints(ro: Service, rw: Service) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    with ro.client() as c:  # read-only: status and history, but no switching
        st = c.get("/tuning/status").json()
        assert st["enabled"] is False and st["memory"]["strategy"] == "balanced"
        before = _decisions(c)
        assert "read-only" in _error(c.post("/tuning/enable", headers=auth), 403)["error"]
        assert _decisions(c) == before and c.get("/tuning/history").json()["total"] == 0
    with rw.client() as c:
        _error(c.post("/tuning/enable"), 403, "authorization")
        r = c.post("/tuning/enable", headers=auth)
        assert r.status_code == 200 and r.json()["enabled"] is True
        assert c.get("/tuning/status").json()["enabled"] is True
        (last,) = c.get("/tuning/history", params={"limit": 1}).json()["decisions"]
        assert (last["action"], last["target"]) == ("enable", "tuner")
        assert c.post("/tuning/disable", headers=auth).json()["enabled"] is False
        metrics = c.get("/metrics").text
        assert 'xpstore_tuner_decisions_total{action="enable",knob="tuner"} 1.0' in metrics
        assert "xpstore_tuner_enabled 0.0" in metrics


def test_token(rw: Service) -> None:
    with rw.client() as c:
        before = _decisions(c)
        _error(c.post("/learning/reset"), 403, "authorization")
        _error(c.post("/learning/reset", headers={"authorization": "Bearer wrong"}), 403)
        _error(c.post("/learning/reset", headers={"authorization": TOKEN}), 403)  # no scheme
        _error(c.post("/learning/reset", json={"user": "u00"},
                      headers={"authorization": f"Bearer {TOKEN}x"}), 403)  # fmt: skip
        assert _decisions(c) == before
        auth = {"authorization": f"Bearer {TOKEN}"}
        _error(c.post("/learning/reset", json={"user": "nobody"}, headers=auth), 404, "user")
        _error(c.post("/learning/reset", json={"users": "u00"}, headers=auth), 422, "users")
        # 20 outcomes per listener: nobody has a weight of their own yet
        _error(c.post("/learning/reset", json={"user": "u00"}, headers=auth), 404, "user")
        assert _decisions(c) == before
        r = c.post("/learning/reset", headers=auth)
        assert r.status_code == 200, r.text
        assert r.json()["reset"] == "all" and r.json()["decisions"] >= 1
        assert _decisions(c) == before + r.json()["decisions"]


def test_reader_beside_a_writer(tmp_path: Path) -> None:
    """A writer process ingests while a read-only service answers; the service sees the new
    records (after the writer's applier and the reader's refresh) and never fails a query."""
    path = tmp_path / "live"
    _make_store(path, seed=3)
    writer_code = (
        "import sys, numpy as np\n"
        "from xpstore import Store\n"
        "from xpstore.demo.synthetic import make_fingerprint\n"
        "rng = np.random.default_rng(5)\n"
        "with Store.open(sys.argv[1]) as s:\n"
        "    print('open', flush=True)\n"
        "    for b in range(20):\n"
        "        s.put_many([make_fingerprint(rng, f'w{b}-{i}') for i in range(20)])\n"
        "        sys.stdin.readline()\n"  # the test paces the writer: one batch per line
        "print('done', flush=True)\n"
    )  # fmt: skip
    svc = _start(path, tmp_path / "live.log")
    writer = subprocess.Popen([sys.executable, "-c", writer_code, str(path)], env=_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdin is not None
        assert writer.stdout.readline().strip() == b"open"
        seen: list[int] = []
        with svc.client() as c:
            for _ in range(20):
                r = c.get("/similar/t1", params={"k": 5})
                assert r.status_code == 200, r.text
                seen.append(c.get("/stats").json()["counts"]["fingerprint"])
                writer.stdin.write(b"\n")
                writer.stdin.flush()
            writer.stdin.close()
            assert writer.stdout.readline().strip() == b"done"
            assert writer.wait(30) == 0
            deadline = time.monotonic() + 30
            while c.get("/stats").json()["counts"]["fingerprint"] < TRACKS + 400:
                assert time.monotonic() < deadline, "the reader never saw the writer's records"
                time.sleep(0.1)
            assert seen == sorted(seen) and seen[0] >= TRACKS
            deadline = time.monotonic() + 30
            while True:  # the index follows LMDB (index.refresh_s)
                hits = c.get("/similar/w19-3", params={"k": 3})
                if hits.status_code == 200:
                    break
                _error(hits, 404, "track_id")
                assert time.monotonic() < deadline, "the reader's index never caught up"
                time.sleep(0.1)
            health = c.get("/health/applier_lag").json()
            assert health["status"] == "healthy" and health["value"]["lag_ops"] is None
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(10)
        for pipe in (writer.stdin, writer.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()
        assert _stop(svc) == 0


def test_sigterm_clean_shutdown(rw: Service, stores: dict[str, Path]) -> None:
    """Last test of the writable service: SIGTERM ends it with status 0, the writer lock is
    released and what it wrote is there."""
    with rw.client() as c:
        decisions = _decisions(c)
    assert _stop(rw) == 0
    log = rw.log.read_text()
    assert "Traceback" not in log and "Shutting down" in log
    with Store.open(stores["rw"]) as store:  # the lock is free again
        assert store.count("decision") == decisions
