"""The service's ASGI app in process (httpx's ASGI transport): the error paths that need a body
without a length, a store that closes under the app, the token file rules and the ``where``
syntax. The same app as a real process is tests/test_service.py."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from xpstore import InvalidArgumentError, Store, Tuning
from xpstore.demo.synthetic import make_fingerprint
from xpstore.service.app import ServiceError, create_app, parse_where
from xpstore.service.server import read_token

TOKEN = b"in-process-token-0123456789"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("app") / "s"
    rng = np.random.default_rng(0)
    with Store.open(path, create=True, durability="none") as store:
        store.put_many([make_fingerprint(rng, f"t{i}") for i in range(60)])
        store.put({"kind": "prediction", "predicted": "warm", "actual": "warm",
                   "confidence": 0.6, "context": "c", "user_id": "u1"})  # fmt: skip
    return path


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    with Store.open(store_path) as s:
        yield s


def _run(store: Store, calls: list[tuple[str, str, dict[str, Any]]], **app_args: Any
         ) -> list[httpx.Response]:  # fmt: skip
    app = create_app(store, **app_args)

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [await client.request(method, url, **kw) for method, url, kw in calls]

    return asyncio.run(go())


def _err(r: httpx.Response, status: int, field: str | None) -> None:
    assert r.status_code == status, r.text
    assert r.json()["field"] == field, r.json()


async def _chunks(n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b" " * 1024


def test_chunked_body_over_the_limit(store: Store) -> None:
    json_type = {"content-type": "application/json"}
    big, small = _run(store, [
        ("POST", "/similar", {"content": _chunks(8), "headers": json_type}),
        ("POST", "/similar", {"json": {"vector": [1.0] + [0.0] * 24, "k": 1}}),
    ], max_body_bytes=4096)  # fmt: skip
    _err(big, 413, "body")
    assert small.status_code == 200, small.text


def test_writable_app_and_token(store: Store) -> None:
    auth = {"authorization": "Bearer " + TOKEN.decode()}
    none, ok, wrong_scheme = _run(store, [
        ("POST", "/learning/reset", {"headers": auth}),
        ("POST", "/learning/reset", {"headers": auth}),
        ("POST", "/learning/reset", {"headers": {"authorization": "Basic " + TOKEN.decode()}}),
    ], token=TOKEN)  # fmt: skip
    assert none.status_code == 200 and ok.status_code == 200
    _err(wrong_scheme, 403, "authorization")
    (no_token,) = _run(store, [("POST", "/learning/reset", {"headers": auth})], token=None)
    _err(no_token, 403, None)
    assert "token-file" in no_token.json()["error"]


def test_health_and_metrics_in_process(store: Store) -> None:
    health, check, metrics, weights = _run(store, [
        ("GET", "/health", {}), ("GET", "/health/wal", {}), ("GET", "/metrics", {}),
        ("GET", "/learning/weights?user=u1", {}),
    ])  # fmt: skip
    assert health.status_code in (200, 503) and health.json()["readonly"] is False
    assert check.json()["check"] == "wal" and check.status_code == 200
    assert "xpstore_learner_accuracy_ratio" in metrics.text
    assert weights.status_code == 200 and weights.json()["user"] == "u1"


def test_errors_of_a_closed_store_and_a_broken_endpoint(store_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:  # fmt: skip
    store = Store.open(store_path)
    app = create_app(store)

    def broken(cfg: Any) -> Any:
        raise RuntimeError("boom")

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            store.parts.metrics.register_collector("broken", lambda: broken(None))
            crash = await client.get("/metrics")
            store.parts.metrics.unregister_collector("broken")
            store.close()
            closed = await client.get("/stats")
            return [crash, closed]

    with caplog.at_level(logging.ERROR, logger="xpstore"):
        crash, closed = asyncio.run(go())
    assert crash.status_code == 500 and "RuntimeError" in crash.json()["error"]
    assert "Traceback" not in crash.text
    _err(closed, 503, None)
    assert "closed" in closed.json()["error"]


def test_unknown_paths_and_methods_answer_json(store: Store) -> None:
    missing, method = _run(store, [("GET", "/nope", {}), ("DELETE", "/stats", {})])
    _err(missing, 404, None)
    _err(method, 405, None)
    assert set(missing.json()) == {"error", "field"}


def test_parse_where() -> None:
    assert parse_where([]) is None
    assert parse_where(['{"a": 1}', "b.c=x", "d=2", "e=null"]) == {
        "a": 1, "b.c": "x", "d": 2, "e": None}  # fmt: skip
    for bad in ("[1, 2]", "{oops", "novalue", "=3"):
        with pytest.raises(ServiceError) as info:
            parse_where([bad])
        assert info.value.status == 400 and info.value.field == "where"


def test_read_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    path.chmod(0o600)
    assert read_token(path) == TOKEN
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="xpstore"):
        assert read_token(path) == TOKEN
    assert "readable by other users" in caplog.text
    path.write_bytes(b"short\n")
    with pytest.raises(InvalidArgumentError, match="shorter than 16") as info:
        read_token(path)
    assert info.value.field == "token_file"
    with pytest.raises(InvalidArgumentError, match="cannot read the token file"):
        read_token(tmp_path / "missing")


def test_tuning_endpoints_in_process(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(1)
    auth = {"authorization": "Bearer " + TOKEN.decode()}
    with Store.open(path, create=True, durability="none") as store:
        store.put_many([make_fingerprint(rng, f"t{i}") for i in range(30)])
        # no Tuning attached (serve --no-tuning): every /tuning endpoint answers 503
        for r in _run(store, [("GET", "/tuning/status", {}), ("GET", "/tuning/history", {}),
                              ("POST", "/tuning/enable", {"headers": auth})],
                      token=TOKEN):  # fmt: skip
            _err(r, 503, None)
            assert "--no-tuning" in r.json()["error"]
        with Tuning(store, background=False) as tuning:
            (status, no_auth, bad_token, enable, after, hist, last, bad_limit, wrong_method,
             disable, end) = _run(store, [
                ("GET", "/tuning/status", {}),
                ("POST", "/tuning/enable", {}),
                ("POST", "/tuning/enable", {"headers": {"authorization": "Bearer nope"}}),
                ("POST", "/tuning/enable", {"headers": auth}),
                ("GET", "/tuning/status", {}),
                ("GET", "/tuning/history", {}),
                ("GET", "/tuning/history?limit=1", {}),
                ("GET", "/tuning/history?limit=0", {}),
                ("GET", "/tuning/enable", {}),
                ("POST", "/tuning/disable", {"headers": auth}),
                ("GET", "/tuning/history", {}),
            ], token=TOKEN, tuning=tuning)  # fmt: skip
            assert status.status_code == 200 and status.json()["enabled"] is False
            assert status.json()["memory"]["level"] == 0
            assert status.json()["knobs"]["index.ef_search"] == store.config.get("index.ef_search")
            _err(no_auth, 403, "authorization")
            _err(bad_token, 403, "authorization")
            assert enable.status_code == 200 and enable.json()["enabled"] is True
            assert after.json()["enabled"] is True
            assert hist.json()["total"] == 1  # the refused calls changed nothing
            (only,) = hist.json()["decisions"]
            assert (only["action"], only["target"]) == ("enable", "tuner")
            assert last.json() == hist.json()
            _err(bad_limit, 422, "limit")
            _err(wrong_method, 405, None)
            assert disable.status_code == 200 and disable.json()["enabled"] is False
            assert [d["action"] for d in end.json()["decisions"]] == ["enable", "disable"]
            (enable_ro,) = _run(store, [("POST", "/tuning/enable", {"headers": auth})],
                                token=None, tuning=tuning)  # fmt: skip
            _err(enable_ro, 403, None)
        assert [d["action"] for d in tuning.tuner.history()] == ["enable", "disable"]
    with Store.open(path, readonly=True) as reader, Tuning(reader, background=False) as tuning:
        status, refused, hist = _run(reader, [
            ("GET", "/tuning/status", {}),
            ("POST", "/tuning/disable", {"headers": auth}),
            ("GET", "/tuning/history", {}),
        ], token=TOKEN, tuning=tuning)  # fmt: skip
        assert status.json()["enabled"] is False and hist.json()["total"] == 2
        assert "read-only" in refused.json()["error"] and refused.status_code == 403
        beside = ("import sys; from xpstore import Store, Tuning\n"
                  "with Store.open(sys.argv[1]) as w, Tuning(w, background=False) as t:\n"
                  "    t.tuner.enable()\n")  # a writer process beside the read-only service
        subprocess.run([sys.executable, "-c", beside, str(path)], check=True, timeout=120)
        status, hist = _run(reader, [("GET", "/tuning/status", {}),
                                     ("GET", "/tuning/history", {})], tuning=tuning)  # fmt: skip
        assert status.json()["enabled"] is True and hist.json()["total"] == 3
