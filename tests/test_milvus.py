"""Milvus as the similarity engine (issue 16, part 1), on Milvus Lite: the follower mirrors the
store exactly (vectors equal to the local index's), follows deletes, supersedes and rebuilds
(blue-green, alias switch), survives SIGKILL mid-batch, resyncs after WAL truncation; the
store answers ``similar()`` through Milvus equal to its local exact index, and falls back to
it with a warning when Milvus is unreachable."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import record_as
from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_fingerprint
from xpstore.errors import (
    IndexNotBuiltError,
    InvalidRecordError,
    MilvusUnavailableError,
    RecordNotFoundError,
)
from xpstore.model.records import Fingerprint
from xpstore.store.milvus import (
    Follower,
    MilvusMirror,
    SyncReport,
    connect,
    translate_where,
)

pytest.importorskip("pymilvus", reason="pymilvus (the 'milvus' extra) is not installed")
pytest.importorskip("milvus_lite", reason="milvus-lite (the 'milvus' extra) is not installed")

ALIAS = "xps"
N = 120


def _library(path: Path, n: int = N, seed: int = 0, **config: Any) -> Store:
    rng = np.random.default_rng(seed)
    store = Store.open(path, create=True, durability="none", **config)
    store.put_many([make_fingerprint(rng, f"t{i}", embedding_dim=4) for i in range(n)])
    store.rebuild_index()
    return store


def _follow(store_path: Path, uri: str, **settings: Any) -> SyncReport:
    """One catch-up run of a follower over a read-only open (as ``xpstore sync milvus``)."""
    with Store.open(store_path, readonly=True) as ro:
        p = ro.parts
        cfg = ro.config.milvus.model_copy(update=settings)
        mirror = MilvusMirror(connect(uri, 10.0), ALIAS)
        try:
            return Follower(p.engine, p.reader, p.index, p.changes, mirror, cfg).run()
        finally:
            mirror.client.close()


def _rows(uri: str) -> dict[str, dict[str, Any]]:
    client = connect(uri, 10.0)
    fields = ["track_id", "record_id", "vector", "lsn", "metadata"]
    try:
        rows = client.query(ALIAS, filter="record_id >= 0", limit=16_384, output_fields=fields)
    finally:
        client.close()
    return {str(r["track_id"]): r for r in rows}


def _assert_mirrors(store: Store, uri: str) -> None:
    """Milvus holds exactly the live tracks, each with its current record and the local index's
    vector."""
    rows = _rows(uri)
    reader = store.parts.reader
    live = {}
    for exp in store.scan("fingerprint"):
        track = record_as(exp, Fingerprint).track_id
        if reader.read_track(track) == exp.id:
            live[track] = exp
    assert set(rows) == set(live)
    for track, exp in live.items():
        row = rows[track]
        assert row["record_id"] == exp.id
        assert row["lsn"] == exp.updated_lsn
        assert row["metadata"] == (record_as(exp, Fingerprint).metadata or {})
        np.testing.assert_allclose(np.asarray(row["vector"], dtype=np.float32),
                                   store.track_vector(track), atol=1e-6)  # fmt: skip


def _same(a: list[Any], b: list[Any]) -> None:
    assert [n.track_id for n in a] == [n.track_id for n in b]
    assert [n.record_id for n in a] == [n.record_id for n in b]
    np.testing.assert_allclose([n.score for n in a], [n.score for n in b], atol=1e-5)


def test_mirror_answers_equal_the_local_exact_index(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.db")
    path = tmp_path / "s"
    with _library(path) as store:
        assert store.index_status()["kind"] == "exact"
        report = _follow(path, uri)
        assert report.resyncs == 1 and report.hwm == store.parts.changes.upto()
        _assert_mirrors(store, uri)
        local = {t: store.similar(t, k=8) for t in ("t1", "t7", "t42")}
        style = store.get_fingerprint("t1").record.metadata["style"]  # type: ignore[union-attr,index]
        local_where = store.similar("t1", k=5, where={"metadata.style": style})
        local_post = store.similar("t7", k=5, where={"batch.tempo_bpm__gt": 110.0})
        fp = make_fingerprint(np.random.default_rng(9), "query", embedding_dim=4)
        local_fp = store.similar(fingerprint=fp, k=6)
    with Store.open(path, index_backend="milvus", milvus_uri=uri,
                    milvus_collection=ALIAS) as store:  # fmt: skip
        for track, want in local.items():
            _same(store.similar(track, k=8), want)
        _same(store.similar("t1", k=5, where={"metadata.style": style}), local_where)
        _same(store.similar("t7", k=5, where={"batch.tempo_bpm__gt": 110.0}), local_post)
        _same(store.similar(fingerprint=fp, k=6), local_fp)
        with pytest.raises(RecordNotFoundError):
            store.similar("nope", k=3)
        with pytest.raises(InvalidRecordError):
            store.similar("t1", k=3, where={"nope": 1})
        assert store.parts.milvus.fallbacks == 0  # input errors are not Milvus's failures


def test_deletes_supersedes_and_updates_follow(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.db")
    path = tmp_path / "s"
    rng = np.random.default_rng(3)
    with _library(path) as store:
        _follow(path, uri)
        store.delete_track("t3")
        store.delete(store.get_fingerprint("t4").id)
        store.put(make_fingerprint(rng, "t5", embedding_dim=4))  # supersede
        store.update(store.get_fingerprint("t6").id, metadata={"artist": "new"})
        store.put_many([make_fingerprint(rng, f"n{i}", embedding_dim=4) for i in range(5)])
        store.flush()
        report = _follow(path, uri, batch_size=3)
        assert report.resyncs == 0 and report.batches >= 3
        assert report.deleted == 2
        _assert_mirrors(store, uri)
        assert _rows(uri)["t6"]["metadata"]["artist"] == "new"
        assert report.hwm == store.parts.changes.upto()
        again = _follow(path, uri)
        assert again.operations == 0  # nothing new: nothing done


def test_rebuild_reembeds_into_a_new_collection_and_switches_the_alias(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.db")
    path = tmp_path / "s"
    with _library(path) as store:
        first = _follow(path, uri)
        old = first.collection
        store.reconfigure(**{"index.audio_weight": 0.5})
        store.rebuild_index()
        store.flush()
        second = _follow(path, uri)
        assert second.switches == [second.collection] and second.collection != old
        client = connect(uri, 10.0)
        assert client.describe_alias(alias=ALIAS)["collection_name"] == second.collection
        assert not client.has_collection(old)
        _assert_mirrors(store, uri)
        want = store.similar("t2", k=5)
    with Store.open(path, index_backend="milvus", milvus_uri=uri,
                    milvus_collection=ALIAS) as store:  # fmt: skip
        _same(store.similar("t2", k=5), want)


def test_truncated_wal_resyncs_from_lmdb(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.db")
    path = tmp_path / "s"
    rng = np.random.default_rng(4)
    with _library(path, **{"wal.segment_max_bytes": 64 * 1024}) as store:
        _follow(path, uri)
        store.delete_track("t0")
        for _ in range(4):
            store.put_many([make_fingerprint(rng, f"n{i}", embedding_dim=4) for i in range(60)])
        store.flush()
        first = store.parts.changes.wal_first_lsn()
        assert first is not None and first > N + 1  # the follower's next LSN is gone
        report = _follow(path, uri)
        assert report.resyncs == 1
        _assert_mirrors(store, uri)
        assert "t0" not in _rows(uri)


def test_unreachable_milvus_falls_back_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s"
    _library(path, n=40).close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    with Store.open(path, index_backend="milvus", milvus_uri=f"http://127.0.0.1:{port}",
                    milvus_timeout_s=1.0) as store:  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="xpstore.store.milvus"):
            hits = store.similar("t1", k=5)
        assert store.parts.milvus.fallbacks == 1
        assert "answered by the local index" in caplog.text
        store.reconfigure(**{"index.backend": "faiss"})
        assert hits == store.similar("t1", k=5)


def test_translate_where() -> None:
    expr, rest = translate_where({"metadata.artist": "A \"b\"", "ts__gte": 5.0,
                                  "track_id__in": ["x", "y"], "batch.lufs__lt": -9,
                                  "metadata.n__in": [object()]})  # fmt: skip
    assert expr == ('metadata["artist"] == "A \\"b\\"" and ts >= 5.0 and '
                    'track_id in ["x", "y"]')  # fmt: skip
    assert set(rest) == {"batch.lufs__lt", "metadata.n__in"}


# ---------------------------------------------------------------- real processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[str]:
    """A Milvus Lite server in its own process, reached by URI like a cluster."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "milvus"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the Milvus Lite server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _sync_cmd(path: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "xpstore.cli", "sync", "milvus", str(path), "--uri", uri,
            "--collection", ALIAS, "--json", *extra]  # fmt: skip


def test_sigkill_mid_batch_resumes_without_loss_or_duplicates(
    tmp_path: Path, milvus_server: str
) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(5)
    with _library(path) as store:
        _follow(path, milvus_server)
        for i in range(30):
            store.put(make_fingerprint(rng, f"t{i}", embedding_dim=4))  # supersedes
        for i in range(40, 50):
            store.delete_track(f"t{i}")
        store.flush()
        hwm_before = _follow_hwm(milvus_server)
        for point in ("milvus.sync.after_upsert", "milvus.sync.before_hwm"):
            env = {**os.environ, "XPSTORE_CRASH_AT": point, "XPSTORE_CRASH_SKIP": "2"}
            cmd = _sync_cmd(path, milvus_server, "--batch-size", "4")
            proc = subprocess.run(cmd, env=env, capture_output=True, timeout=120, check=False)
            assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
            hwm = _follow_hwm(milvus_server)
            assert hwm_before < hwm < store.parts.changes.upto()  # it died mid-way
        cmd = _sync_cmd(path, milvus_server, "--batch-size", "4")
        done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        report = json.loads(done.stdout)
        assert report["hwm"] == store.parts.changes.upto() and report["lag_lsn"] == 0
        _assert_mirrors(store, milvus_server)
        client = connect(milvus_server, 10.0)
        count = client.query(ALIAS, filter="", output_fields=["count(*)"])[0]["count(*)"]
        assert count == len(_rows(milvus_server)) == N - 10


def _follow_hwm(uri: str) -> int:
    mirror = MilvusMirror(connect(uri, 10.0), ALIAS)
    try:
        active = mirror.active()
        assert active is not None
        return mirror.hwm(active)
    finally:
        mirror.client.close()


def test_follow_while_a_writer_ingests(tmp_path: Path, milvus_server: str) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(6)
    with _library(path, n=60) as store:
        follower = subprocess.Popen(
            _sync_cmd(path, milvus_server, "--follow", "--poll", "0.05", "--batch-size", "16"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        try:
            for round_ in range(10):
                store.put_many([make_fingerprint(rng, f"w{round_}-{i}", embedding_dim=4)
                                for i in range(10)])  # fmt: skip
                store.delete_track(f"t{round_}")
            store.flush()
            target = store.parts.changes.upto()
            deadline = time.monotonic() + 120
            while _status(path, milvus_server)["hwm"] != target:
                assert follower.poll() is None, follower.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the follower did not catch up"
                time.sleep(0.2)
            status = _status(path, milvus_server)
            assert status["lag_lsn"] == 0 and status["embedder_current"] is True
            assert status["rows"] == 60 - 10 + 100
        finally:
            follower.send_signal(signal.SIGTERM)
            out, err = follower.communicate(timeout=60)
        assert follower.returncode == 0, err.decode()[-2000:]
        assert json.loads(out)["hwm"] == target
        _assert_mirrors(store, milvus_server)


def _status(path: Path, uri: str) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["sync", "status", str(path), "--uri", uri,
                                       "--collection", ALIAS, "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.output))


def test_no_index_build_yet_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "s"
    rng = np.random.default_rng(8)
    with Store.open(path, create=True, durability="none") as store:
        store.put_many([make_fingerprint(rng, f"t{i}") for i in range(40)])
        store.flush()
        with pytest.raises(IndexNotBuiltError, match="index rebuild"):
            _follow(path, str(tmp_path / "m.db"))


def test_a_long_lived_follower_notices_a_rebuild_that_moved_no_lsn(tmp_path: Path) -> None:
    uri = str(tmp_path / "m.db")
    path = tmp_path / "s"
    rng = np.random.default_rng(10)
    with _library(path) as store, Store.open(path, readonly=True) as ro:
        p = ro.parts
        mirror = MilvusMirror(connect(uri, 10.0), ALIAS)
        follower = Follower(p.engine, p.reader, p.index, p.changes, mirror, ro.config.milvus)
        first = follower.run()
        store.put_many([make_fingerprint(rng, f"x{i}", style="metal", embedding_dim=4)
                        for i in range(80)])  # fmt: skip
        store.flush()
        follower.run()
        lsn = store.parts.changes.upto()
        store.rebuild_index()  # new statistics; LMDB's applied_lsn does not move
        assert store.parts.changes.upto() == lsn
        third = follower.run()
        assert third.switches and third.collection != first.collection
        _assert_mirrors(store, uri)


# ---------------------------------------------------------------- property


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "delete_track", "delete", "meta", "sync"]),
        st.integers(0, 7),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=_OPS, batch=st.integers(1, 5))
def test_any_history_mirrors_the_live_set(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]], batch: int
) -> None:
    """Whatever puts, supersedes, deletes and metadata updates happen, and wherever the
    follower syncs in between, Milvus ends up holding exactly the live tracks."""
    root = tmp_path_factory.mktemp("prop")
    path, uri = root / "s", str(root / "m.db")
    rng = np.random.default_rng(len(ops))
    with Store.open(path, create=True, durability="none") as store:  # < 32 tracks: no build
        store.put_many([make_fingerprint(rng, f"t{i}", embedding_dim=4) for i in range(3)])
        for op, k in ops:
            track = f"t{k}"
            rid = store.parts.reader.read_track(track)
            if op == "put":
                store.put(make_fingerprint(rng, track, embedding_dim=4))
            elif op == "delete_track" and rid is not None:
                store.delete_track(track)
            elif op == "delete" and rid is not None:
                store.delete(rid)
            elif op == "meta" and rid is not None:
                store.update(rid, metadata={"n": str(k)})
            elif op == "sync":
                store.flush()
                _follow(path, uri, batch_size=batch)
        store.flush()
        report = _follow(path, uri, batch_size=batch)
        assert report.hwm == store.parts.changes.upto()
        _assert_mirrors(store, uri)


def test_sync_against_an_unreachable_server_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _library(path, n=10).close()
    result = CliRunner().invoke(main, ["sync", "milvus", str(path), "--uri",
                                       f"http://127.0.0.1:{_free_port()}"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Milvus" in result.output


def test_follow_mode_rides_out_a_milvus_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pymilvus.exceptions import MilvusException

    uri = str(tmp_path / "m.db")
    path = tmp_path / "s"
    rng = np.random.default_rng(12)
    with _library(path) as store:
        _follow(path, uri)
        store.put_many([make_fingerprint(rng, f"n{i}", embedding_dim=4) for i in range(5)])
        store.flush()
        target = store.parts.changes.upto()
        with Store.open(path, readonly=True) as ro:
            p = ro.parts
            mirror = MilvusMirror(connect(uri, 10.0), ALIAS)
            settings = ro.config.milvus.model_copy(update={"poll_s": 0.01})
            follower = Follower(p.engine, p.reader, p.index, p.changes, mirror, settings)
            real = mirror.set_hwm
            failures = [MilvusException(message="injected: server restarting")]

            def flaky(collection: str, lsn: int) -> None:
                if failures:
                    raise failures.pop()
                real(collection, lsn)

            monkeypatch.setattr(mirror, "set_hwm", flaky)
            stop = threading.Event()

            def done(report: SyncReport) -> None:
                if report.hwm == target:
                    stop.set()

            with caplog.at_level(logging.WARNING, logger="xpstore.store.milvus"):
                follower.run(follow=True, stop=stop, on_batch=done)
        assert "injected" in caplog.text and not failures
        _assert_mirrors(store, uri)
        with pytest.raises(MilvusUnavailableError):  # without --follow: a clear error
            monkeypatch.setattr(mirror, "set_hwm", lambda c, lsn: (_ for _ in ()).throw(
                MilvusException(message="down")))  # fmt: skip
            store.put(make_fingerprint(rng, "late", embedding_dim=4))
            store.flush()
            Follower(store.parts.engine, store.parts.reader, store.parts.index,
                     store.parts.changes, mirror, settings).run()  # fmt: skip
