"""Snapshots and point-in-time restore (issue 3, item 5): real files, real LMDB, real processes.

Round trips, PITR to an LSN and to a commit time, tampered files and manifests, half-written
snapshots, pruning, ENOSPC, SIGKILL at every snapshot/restore crash point, automatic snapshots,
the crash-safe in-place swap, and the ``xpstore snapshot`` commands.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from xpstore import (
    InvalidArgumentError,
    InvalidRecordError,
    PredictionOutcome,
    ReadOnlyStoreError,
    SnapshotError,
    SnapshotInfo,
    Store,
)
from xpstore.cli import main
from xpstore.demo.synthetic import make_fingerprint
from xpstore.model.records import Fingerprint
from xpstore.ops import snapshots as snap_mod
from xpstore.persistence import fs
from xpstore.store.snapshot_service import AutoSnapshotTask

REPO = Path(__file__).resolve().parent.parent
# small segments so that checkpoints have closed segments to delete; durability "none" is
# enough in-process (the SIGKILL tests use "commit")
FAST: dict[str, Any] = {"durability": "none", "segment_max_bytes": 64 * 1024}


def pred(i: int, **extra: Any) -> PredictionOutcome:
    return PredictionOutcome(
        predicted=f"p{i}", confidence=0.5, context="warm_start", ts=1_700_000_000.0 + i, **extra
    )


def state(store: Store) -> dict[int, Any]:
    """Every live record's envelope, plus the current fingerprint of each track seen."""
    out: dict[Any, Any] = {exp.id: exp.envelope_json() for exp in store.scan()}
    for exp in list(store.scan(kind="fingerprint")):
        assert isinstance(exp.record, Fingerprint)
        tid = exp.record.track_id
        try:
            out[f"track:{tid}"] = store.get_fingerprint(tid).id
        except KeyError:
            out[f"track:{tid}"] = None
    return out


def state_at(path: Path) -> dict[int, Any]:
    with Store.open(path, readonly=True) as store:
        return state(store)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


# ------------------------------------------------------------------------------ round trip


def test_round_trip_restores_exactly_the_snapshot(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    with Store.open(src, create=True, **FAST) as store:
        ids = store.put_many([pred(i) for i in range(50)])
        store.put(make_fingerprint(rng, "t1"))
        store.update(ids[0], actual="warm")
        store.delete(ids[1])
        before = state(store)
        info = store.snapshot()
        assert isinstance(info, SnapshotInfo)
        assert info.lsn == store.stats()["acked_lsn"] == 53
        assert info.counts == {"prediction": 49, "fingerprint": 1, "query_metric": 0,
                               "decision": 0}  # fmt: skip
        assert info.path == src / "snapshots" / info.id and (info.path / "manifest.json").exists()
        # later writes must not leak into the restore
        store.put_many([pred(i) for i in range(100, 120)])
        store.delete(ids[2])
        store.delete_track("t1")
        assert store.list_snapshots() == [info]
        out = store.restore_snapshot(info.id, tmp_path / "restored")
    assert out == tmp_path / "restored"
    assert state_at(out) == before
    with Store.open(out) as restored:  # opens normally, writable, ids continue after the LSN
        assert restored.put(pred(999)) == info.lsn + 1
        assert restored.count() == 51
    assert siblings(out) == []  # no temporary left beside it


def test_restored_store_has_its_own_id_and_the_manifest_the_fields(tmp_path: Path) -> None:
    with Store.open(tmp_path / "src", create=True, **FAST) as store:
        store.put_many([pred(i) for i in range(5)])
        info = store.snapshot()
        store.restore_snapshot(info.id, tmp_path / "r")
        src_id = store.store_id
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["format"] == "xpstore-snapshot" and manifest["format_version"] == 1
    assert manifest["store_id"] == src_id and manifest["lsn"] == 5 and manifest["id"] == info.id
    assert manifest["config"]["wal"]["segment_max_bytes"] == 64 * 1024
    entry = manifest["files"]["data.mdb"]
    assert entry["size"] == (info.path / "data.mdb").stat().st_size and len(entry["sha256"]) == 64
    with Store.open(tmp_path / "r", readonly=True) as restored:
        assert restored.store_id != src_id


def test_snapshot_lsn_is_exact_when_the_applier_is_held(tmp_path: Path) -> None:
    """Held applier: LMDB holds nothing, so the snapshot is at LSN 0; PITR brings the rest."""
    with Store.open(tmp_path / "src", create=True, hold_applier=True, **FAST) as store:
        store.put_many([pred(i) for i in range(7)])
        info = store.snapshot()
        assert info.lsn == 0 and sum(info.counts.values()) == 0
        store.restore_snapshot(info.id, tmp_path / "plain")
        store.restore_snapshot(info.id, tmp_path / "pitr", to_lsn=7)
        want = state(store)
    assert state_at(tmp_path / "plain") == {}
    assert state_at(tmp_path / "pitr") == want


def test_snapshot_lsn_is_exact_under_concurrent_writers(tmp_path: Path) -> None:
    """Puts only, so ids are LSNs: each snapshot holds exactly ids 1..lsn, nothing later."""
    import threading

    stop = threading.Event()
    marks = [threading.Event() for _ in range(4)]
    goals = [200, 400, 600, 1 << 62]  # the last goal is set once the snapshots are taken
    cfg: dict[str, Any] = {"durability": "commit", "apply_batch_ops": 50}
    with Store.open(tmp_path / "src", create=True, **cfg) as store:

        def writer() -> None:
            i = 0
            while not stop.is_set():
                last = store.put_many([pred(i), pred(i + 1)])[-1]
                i += 2
                for goal, mark in zip(goals, marks, strict=True):
                    if last >= goal:
                        mark.set()

        thread = threading.Thread(target=writer)
        thread.start()
        infos = []
        try:
            for mark in marks[:3]:
                assert mark.wait(timeout=30)
                infos.append(store.snapshot())  # while the writer keeps going
            goals[3] = infos[-1].lsn + 10
            assert marks[3].wait(timeout=30)  # and it went on after the last one
        finally:
            stop.set()
            thread.join(timeout=30)
        for info in infos:
            into = tmp_path / info.id
            store.restore_snapshot(info.id, into)
            with Store.open(into, readonly=True) as restored:
                assert sorted(e.id for e in restored.scan()) == list(range(1, info.lsn + 1))
                assert info.counts["prediction"] == info.lsn == restored.stats()["applied_lsn"]


def test_restore_into_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with Store.open(tmp_path / "src", create=True, **FAST) as store:
        store.put(pred(1))
        info = store.snapshot()
        store.restore_snapshot(info.id, tmp_path / "empty")
    assert len(state_at(tmp_path / "empty")) == 1


def test_snapshot_refused_on_a_read_only_store(tmp_path: Path) -> None:
    with Store.open(tmp_path / "src", create=True, **FAST):
        pass
    with Store.open(tmp_path / "src", readonly=True) as ro, pytest.raises(ReadOnlyStoreError):
        ro.snapshot()


def test_snapshot_dir_from_config(tmp_path: Path) -> None:
    elsewhere = tmp_path / "snaps" / "nested"
    with Store.open(tmp_path / "src", create=True, snapshot_dir=str(elsewhere), **FAST) as s:
        s.put(pred(1))
        info = s.snapshot()
        assert info.path.parent == elsewhere and s.list_snapshots() == [info]
    assert not (tmp_path / "src" / "snapshots").exists()


# ------------------------------------------------------------------------------ PITR


def _history(tmp_path: Path) -> tuple[Path, SnapshotInfo, dict[int, dict[int, Any]]]:
    """A store with a snapshot and every kind of operation after it; state after each LSN."""
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    states: dict[int, dict[int, Any]] = {}
    store = Store.open(src, create=True, wal_retain_segments=1000, **FAST)
    with store:
        ids = store.put_many([pred(i) for i in range(10)])
        store.put(make_fingerprint(rng, "t1"))
        info = store.snapshot()
        states[info.lsn] = state(store)
        steps: list[Callable[[], object]] = [
            lambda: store.put_many([pred(i) for i in range(20, 23)]),  # one frame, 3 LSNs
            lambda: store.update(ids[3], actual="bright", reward=0.5),
            lambda: store.delete(ids[4]),
            lambda: store.put(make_fingerprint(rng, "t1")),  # supersedes the track
            lambda: store.delete_track("t1"),
            lambda: store.put_many([pred(i) for i in range(30, 400)]),  # rotates segments
            lambda: store.delete(ids[5]),
        ]
        for step in steps:
            step()
            states[store.stats()["acked_lsn"]] = state(store)
        store.flush()  # a checkpoint: retention must keep what PITR needs
    return src, info, states


def test_pitr_to_every_lsn_boundary_matches_the_live_history(tmp_path: Path) -> None:
    src, info, states = _history(tmp_path)
    with Store.open(src, readonly=True) as store:
        for lsn, want in states.items():
            into = tmp_path / f"at-{lsn}"
            store.restore_snapshot(info.id, into, to_lsn=lsn)
            assert state_at(into) == want, f"restore to LSN {lsn}"
        # inside a put_many frame: exact per operation
        store.restore_snapshot(info.id, tmp_path / "mid", to_lsn=info.lsn + 2)
    mid = state_at(tmp_path / "mid")
    assert len(mid) == len(states[info.lsn]) + 2
    with Store.open(tmp_path / "mid", readonly=True) as restored:
        assert restored.stats()["applied_lsn"] == info.lsn + 2


def test_pitr_to_a_time_between_two_writes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with Store.open(src, create=True, durability="none") as store:
        store.put(pred(1))
        info = store.snapshot()
        store.put(pred(2))
        store.update(info.lsn, actual="warm")
        between = time.time()
        want = state(store)
        while time.time() <= between:  # the next commit gets a strictly later time
            pass
        store.put(pred(3))
        store.delete(info.lsn)
        store.restore_snapshot(info.id, tmp_path / "t", to_time=between)
        store.restore_snapshot(info.id, tmp_path / "late", to_time=time.time() + 60)
        everything = state(store)
    assert state_at(tmp_path / "t") == want
    assert state_at(tmp_path / "late") == everything


def test_pitr_argument_errors_create_nothing(tmp_path: Path) -> None:
    with Store.open(tmp_path / "src", create=True, durability="none") as store:
        store.put(pred(1))
        old = time.time() - 3600
        info = store.snapshot()
        store.put(pred(2))
        cases: list[tuple[dict[str, Any], type[Exception], str]] = [
            ({"to_lsn": 0}, InvalidArgumentError, "before snapshot"),
            ({"to_lsn": 99}, InvalidArgumentError, "beyond the end"),
            ({"to_time": old}, InvalidArgumentError, "committed after to_time"),
            ({"to_lsn": 2, "to_time": 1.0}, InvalidArgumentError, "not both"),
            ({"to_lsn": -1}, InvalidArgumentError, "to_lsn"),
            ({"to_time": float("nan")}, InvalidArgumentError, "to_time"),
        ]
        for kwargs, exc, text in cases:
            with pytest.raises(exc, match=text):
                store.restore_snapshot(info.id, tmp_path / "r", **kwargs)
            assert not (tmp_path / "r").exists() and siblings(tmp_path / "r") == []
        for bad_id in ("../src", ".tmp-x", "a/b", ""):
            with pytest.raises(InvalidRecordError, match="snapshot id"):
                store.restore_snapshot(bad_id, tmp_path / "r")
        with pytest.raises(SnapshotError, match="no snapshot 'nope'"):
            store.restore_snapshot("nope", tmp_path / "r")
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("keep me")
        with pytest.raises(InvalidRecordError, match="not an empty directory"):
            store.restore_snapshot(info.id, tmp_path / "full")
        assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_pitr_names_the_missing_wal_range_and_retention_keeps_it(tmp_path: Path) -> None:
    def scenario(path: Path, retain: int) -> tuple[Store, SnapshotInfo]:
        store = Store.open(path, create=True, wal_retain_segments=retain, **FAST)
        store.put_many([pred(i) for i in range(10)])
        info = store.snapshot()
        for k in range(4):  # several rotations after the snapshot
            store.put_many([pred(i) for i in range(100 * k, 100 * k + 300)])
        store.flush()  # checkpoint: deletes closed segments at or below applied_lsn
        return store, info

    store, info = scenario(tmp_path / "a", retain=0)
    with store:
        with pytest.raises(SnapshotError, match=rf"needs LSNs {info.lsn + 1}\.\.\d+ from the WAL"):
            store.restore_snapshot(info.id, tmp_path / "ra", to_lsn=info.lsn + 5)
        assert not (tmp_path / "ra").exists() and siblings(tmp_path / "ra") == []
        store.restore_snapshot(info.id, tmp_path / "ra")  # the snapshot alone still restores
    store, info = scenario(tmp_path / "b", retain=100)
    with store:
        end = store.stats()["acked_lsn"]
        store.restore_snapshot(info.id, tmp_path / "rb", to_lsn=end)
        want = state(store)
    assert state_at(tmp_path / "rb") == want


# ------------------------------------------------------------------------------ damage


def _one_snapshot(tmp_path: Path) -> tuple[Path, SnapshotInfo]:
    src = tmp_path / "src"
    with Store.open(src, create=True, **FAST) as store:
        store.put_many([pred(i) for i in range(20)])
        info = store.snapshot()
    return src, info


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip_data", "truncate_data", "edit_manifest", "no_manifest"])
def test_tampered_snapshot_is_refused_naming_the_file(tmp_path: Path, damage: str) -> None:
    src, info = _one_snapshot(tmp_path)
    data, manifest = info.path / "data.mdb", info.path / "manifest.json"
    if damage == "flip_data":
        _flip(data, data.stat().st_size // 2)
        culprit = data
    elif damage == "truncate_data":
        os.truncate(data, 4096)
        culprit = data
    elif damage == "edit_manifest":
        doc = json.loads(manifest.read_text())
        doc["lsn"] += 1000
        manifest.write_text(json.dumps(doc))
        culprit = manifest
    else:
        manifest.unlink()
        culprit = manifest
    into = tmp_path / "restored"
    with Store.open(src) as store:
        with pytest.raises(SnapshotError) as err:
            store.restore_snapshot(info.id, into)
        assert str(culprit) in str(err.value)
        with pytest.raises(SnapshotError, match=str(culprit.name)):
            store.verify_snapshot(info.id)
        problems = store.check_snapshots()
        assert len(problems) == 1 and info.id in problems[0]
        if damage in ("edit_manifest", "no_manifest"):  # reported, not listed
            assert store.list_snapshots() == []
        store.put(pred(100))  # the store itself is unaffected
    assert not into.exists() and siblings(into) == []


def test_check_snapshots_clean_and_verify_snapshot_ok(tmp_path: Path) -> None:
    src, info = _one_snapshot(tmp_path)
    with Store.open(src, readonly=True) as store:
        assert store.check_snapshots() == []
        assert store.verify_snapshot(info.id) == info


def test_a_newer_snapshot_format_is_refused(tmp_path: Path) -> None:
    from xpstore import FormatVersionError

    src, info = _one_snapshot(tmp_path)
    doc = json.loads((info.path / "manifest.json").read_text())
    doc["format_version"] = 99
    (info.path / "manifest.json").write_text(json.dumps(doc))
    with Store.open(src, readonly=True) as store, pytest.raises(FormatVersionError, match="99"):
        store.restore_snapshot(info.id, tmp_path / "r")


# ------------------------------------------------------------------------------ half snapshots


def test_half_written_snapshot_is_never_listed_and_is_removed(tmp_path: Path) -> None:
    src, info = _one_snapshot(tmp_path)
    with Store.open(src, readonly=True) as store:
        sid = store.store_id
    half = src / "snapshots" / f".tmp-{sid:016x}-deadbeef"
    half.mkdir()
    (half / "data.mdb").write_bytes(b"\0" * 100)
    other = src / "snapshots" / ".tmp-0000000000000001-cafe"  # another store's: left alone
    other.mkdir()
    with Store.open(src) as store:
        assert [i.id for i in store.list_snapshots()] == [info.id]
        store.snapshot()
        assert not half.exists() and other.exists()
        assert len(store.list_snapshots()) == 2


def test_prune_keeps_the_newest(tmp_path: Path) -> None:
    with Store.open(tmp_path / "src", create=True, **FAST) as store:
        taken = []
        for i in range(4):
            store.put(pred(i))
            taken.append(store.snapshot())
        assert store.list_snapshots() == taken  # oldest first
        removed = store.prune_snapshots(keep=2)
        assert removed == taken[:2]
        assert store.list_snapshots() == taken[2:]
        assert not taken[0].path.exists()
        assert store.prune_snapshots(keep=5) == []
        with pytest.raises(InvalidArgumentError):
            store.prune_snapshots(keep=-1)
        assert store.prune_snapshots(keep=0) == taken[2:] and store.list_snapshots() == []
    assert sorted(os.listdir(tmp_path / "src" / "snapshots")) == []


def test_enospc_while_writing_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    real = fs.write_file

    def full_disk(path: fs.PathLike, data: bytes, *, sync: bool = True) -> None:
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, sync=sync)

    with Store.open(src, create=True, durability="commit") as store:
        store.put_many([pred(i) for i in range(10)])
        monkeypatch.setattr(fs, "write_file", full_disk)
        with pytest.raises(OSError) as err:
            store.snapshot()
        monkeypatch.undo()
        assert err.value.errno == errno.ENOSPC and "snapshot not taken" in str(err.value)
        assert store.list_snapshots() == []
        assert os.listdir(src / "snapshots") == []  # the temporary directory was removed
        assert store.put(pred(10)) == 11  # still writable
    with Store.open(src) as store:
        assert store.count() == 11
        assert store.snapshot().lsn == 11


# ------------------------------------------------------------------------------ SIGKILL

_CHILD = """
import sys
from xpstore import Store, PredictionOutcome
path, action, into = sys.argv[1], sys.argv[2], sys.argv[3]
with Store.open(path, create=True) as store:
    for i in range(30):
        rid = store.put(PredictionOutcome(predicted="p", confidence=0.5, context="c",
                                          ts=1_700_000_000.0 + i))
        print("ACK", rid, flush=True)
    if action == "snapshot":
        store.snapshot()
    else:
        snap = store.list_snapshots()[0]
        store.restore_snapshot(snap.id, into, to_lsn=store.stats()["acked_lsn"])
    print("DONE", flush=True)
"""


def _crash_child(point: str, path: Path, action: str, into: Path) -> list[int]:
    env = {**os.environ, "XPSTORE_CRASH_AT": point, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), action, str(into)],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    out = proc.stdout.decode().split("\n")
    assert "DONE" not in out
    return [int(line.split()[1]) for line in out if line.startswith("ACK ")]


@pytest.mark.parametrize("point", ["snapshot.after_copy", "snapshot.before_rename"])
def test_sigkill_mid_snapshot(tmp_path: Path, point: str) -> None:
    src = tmp_path / "src"
    acked = _crash_child(point, src, "snapshot", tmp_path / "unused")
    assert len(acked) == 30
    leftovers = [p for p in (src / "snapshots").iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1  # it really died mid-snapshot
    with Store.open(src) as store:
        assert store.list_snapshots() == []
        assert {rid: store.get(rid).id for rid in acked} == {rid: rid for rid in acked}
        info = store.snapshot()  # removes the leftover
        assert info.lsn == max(acked)
    assert [p.name for p in (src / "snapshots").iterdir()] == [info.id]


@pytest.mark.parametrize("point", ["restore.after_copy", "restore.before_rename"])
def test_sigkill_mid_restore(tmp_path: Path, point: str) -> None:
    src, into = tmp_path / "src", tmp_path / "restored"
    with Store.open(src, create=True, wal_retain_segments=100) as store:
        store.put(pred(0))
        info = store.snapshot()
    acked = _crash_child(point, src, "restore", into)
    assert not into.exists()
    assert len(siblings(into)) == 1  # the child's temporary, never at `into`
    with Store.open(src) as store:
        for rid in acked:
            assert store.get(rid).id == rid
        end = store.stats()["acked_lsn"]
        want = state(store)
        store.restore_snapshot(info.id, into, to_lsn=end)  # and a retry cleans up
    assert siblings(into) == []
    assert state_at(into) == want


# ------------------------------------------------------------------------------ automatic


QUIET: dict[str, Any] = {"apply_interval_ms": 60_000}
"""The applier sleeps through the test, so only the test runs the snapshot task."""


def auto(store: Store, now: float | None = None) -> SnapshotInfo | None:
    """One look at the automatic-snapshot task, run in this thread when it is due."""
    task = store.parts.tasks["snapshot"]
    assert isinstance(task, AutoSnapshotTask)  # its own class, whose due() takes a now
    return task.run() if task.due(now=now) else None


def test_automatic_snapshots_by_records_with_keep(tmp_path: Path) -> None:
    cfg = {"snapshot_every_records": 10, "snapshot_keep": 2, **QUIET}
    with Store.open(tmp_path / "src", create=True, **cfg, **FAST) as store:
        store.put_many([pred(i) for i in range(9)])
        assert auto(store) is None
        store.put(pred(9))
        first = auto(store)
        assert first is not None and first.lsn == 10
        assert auto(store) is None  # nothing new
        for round_ in range(2):
            store.put_many([pred(i) for i in range(10)])
            assert auto(store) is not None, round_
        assert [i.lsn for i in store.list_snapshots()] == [20, 30]
    with Store.open(tmp_path / "src", **cfg) as store:  # the baseline survives a restart
        store.put_many([pred(i) for i in range(5)])
        assert auto(store) is None


def test_automatic_snapshots_by_time_and_failures_stay_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(tmp_path / "src", create=True, snapshot_every_seconds=60, **QUIET,
                    **FAST) as store:
        store.put(pred(0))
        assert auto(store) is None  # the period starts now
        assert auto(store, now=time.time() + 61) is not None
        assert auto(store, now=time.time() + 122) is None  # due, but nothing changed
        store.put(pred(1))

        def broken(*_a: Any, **_k: Any) -> SnapshotInfo:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(snap_mod, "create_snapshot", broken)
        assert auto(store, now=time.time() + 183) is None  # logged, not raised
        assert "automatic snapshot" in caplog.text
        assert store.put(pred(2)) == 3


def test_no_automatic_snapshot_unless_configured(tmp_path: Path) -> None:
    with Store.open(tmp_path / "src", create=True, **FAST) as store:
        store.put_many([pred(i) for i in range(100)])
        assert auto(store) is None
        assert store.list_snapshots() == []


# ------------------------------------------------------------------------------ in place


def _staged(tmp_path: Path) -> tuple[Path, SnapshotInfo, dict[int, Any]]:
    src = tmp_path / "src"
    with Store.open(src, create=True, **FAST) as store:
        store.put_many([pred(i) for i in range(5)])
        info = store.snapshot()
        want = state(store)
        store.put_many([pred(i) for i in range(5, 9)])
        store.restore_snapshot(info.id, snap_mod.in_place_staging(src))
    return src, info, want


def test_in_place_swap_resumes_after_a_crash_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash before each rename of the swap (journal, marker out, wal, data, marker in)."""
    real = fs.replace
    for crash_at in range(8):
        src, info, want = _staged(tmp_path / f"k{crash_at}")
        old = state_at(src)
        calls = {"n": 0}

        def crashing(
            a: fs.PathLike, b: fs.PathLike, _at: int = crash_at, _calls: dict[str, int] = calls
        ) -> None:
            if _calls["n"] == _at:
                raise KeyboardInterrupt("simulated crash")
            _calls["n"] += 1
            real(a, b)

        monkeypatch.setattr(fs, "replace", crashing)
        try:
            snap_mod.swap_in_place(src)
            crashed = False
        except KeyboardInterrupt:
            crashed = True
        monkeypatch.setattr(fs, "replace", real)
        assert crashed == (crash_at < 7), crash_at
        if crash_at == 0:  # before the journal: nothing committed, the old store is intact
            assert not snap_mod.finish_in_place(src)
            assert state_at(src) == old
            snap_mod.in_place_staging(src)  # the next attempt clears the abandoned staging
            assert sorted(p.name for p in src.iterdir()) == [
                "LOCK",
                "data",
                "snapshots",
                "wal",
                "xpstore.json",
            ]
            continue
        if crashed:
            assert snap_mod.finish_in_place(src)
        assert not snap_mod.finish_in_place(src)
        assert state_at(src) == want, crash_at
        with Store.open(src) as store:  # a normal store again; the old snapshot is foreign now
            assert store.list_snapshots() == []
            assert store.put(pred(50)) == info.lsn + 1
        assert sorted(p.name for p in src.iterdir()) == [
            "LOCK",
            "data",
            "snapshots",
            "wal",
            "xpstore.json",
        ]


def test_finish_in_place_without_journal_is_a_no_op(tmp_path: Path) -> None:
    src, _info, _want = _staged(tmp_path)
    assert snap_mod.finish_in_place(src) is False
    assert snap_mod.in_place_staging(src).exists() is False  # abandoned staging removed


# ------------------------------------------------------------------------------ CLI


def cli(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def cli_store(tmp_path: Path) -> Path:
    path = tmp_path / "xp"
    with Store.open(path, create=True, wal_retain_segments=100, durability="none") as store:
        store.put_many([pred(i) for i in range(5)])
    return path


def test_cli_create_list_restore_prune(cli_store: Path, tmp_path: Path) -> None:
    created = cli("snapshot", "create", cli_store, "--json")
    assert created.exit_code == 0, created.output
    snap = json.loads(created.stdout)
    assert snap["lsn"] == 5 and snap["counts"]["prediction"] == 5
    text = cli("snapshot", "create", cli_store)
    assert text.exit_code == 0 and text.stdout.startswith("snapshot ") and "LSN 5" in text.stdout
    with Store.open(cli_store, durability="none") as store:
        store.put_many([pred(i) for i in range(5, 8)])
    listed = cli("snapshot", "--json", "list", cli_store)
    assert listed.exit_code == 0
    doc = json.loads(listed.stdout)
    assert [s["lsn"] for s in doc["snapshots"]] == [5, 5] and doc["problems"] == []
    table = cli("snapshot", "list", cli_store, "--verify")
    assert table.exit_code == 0 and snap["id"] in table.stdout
    into = tmp_path / "r"
    restored = cli(
        "snapshot", "restore", cli_store, snap["id"], "--into", into, "--to-lsn", 7, "--json"
    )
    assert restored.exit_code == 0, restored.output
    out = json.loads(restored.stdout)
    assert out["restored_lsn"] == 7 and out["total"] == 7 and Path(out["into"]) == into
    plain = cli("snapshot", "restore", cli_store, snap["id"], "--into", tmp_path / "r2")
    assert plain.exit_code == 0 and "5 records" in plain.stdout
    pruned = cli("snapshot", "prune", cli_store, "--keep", 1, "--json")
    assert pruned.exit_code == 0
    assert [s["id"] for s in json.loads(pruned.stdout)["removed"]] == [snap["id"]]


def test_cli_restore_in_place(cli_store: Path) -> None:
    snap = json.loads(cli("snapshot", "create", cli_store, "--json").stdout)
    with Store.open(cli_store, durability="none") as store:
        store.put_many([pred(i) for i in range(5, 8)])
    result = cli("snapshot", "restore", cli_store, snap["id"], "--in-place", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"] == 5
    with Store.open(cli_store, readonly=True) as store:
        assert store.count() == 5
    assert cli("snapshot", "list", cli_store, "--all").stdout.count(snap["id"]) == 1


def test_cli_bad_arguments(cli_store: Path, tmp_path: Path) -> None:
    snap = json.loads(cli("snapshot", "create", cli_store, "--json").stdout)
    sid = snap["id"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases: list[tuple[list[Any], int, str]] = [
        (["restore", cli_store, "nope", "--into", tmp_path / "a"], 1, "no snapshot 'nope'"),
        (["restore", cli_store, sid, "--into", full], 2, "not an empty directory"),
        (["restore", tmp_path / "missing", sid, "--into", tmp_path / "b"], 2, "not an xpstore"),
        (["create", tmp_path / "missing"], 2, "not an xpstore"),
        (["list", tmp_path / "missing"], 2, "not an xpstore"),
        (["prune", tmp_path / "missing", "--keep", "1"], 2, "not an xpstore"),
        (["restore", cli_store, sid], 2, "exactly one of --into"),
        (["restore", cli_store, sid, "--into", tmp_path / "c", "--in-place"], 2, "exactly one"),
        (
            ["restore", cli_store, sid, "--into", tmp_path / "d", "--to-lsn", 1, "--to-time", 5],
            2,
            "not both",
        ),
        (["restore", cli_store, sid, "--into", tmp_path / "e", "--to-lsn", 999], 2, "beyond"),
        (["restore", cli_store, sid, "--into", tmp_path / "f", "--to-lsn", -3], 2, ""),
        (["prune", cli_store], 2, "--keep"),
    ]
    for args, code, text in cases:
        result = cli("snapshot", *args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.stderr, (args, result.stderr)
    assert not any((tmp_path / n).exists() for n in "abcdef")
    assert (full / "x").read_text() == "x"


def test_cli_tampered_snapshot_exit_1_naming_the_file(cli_store: Path, tmp_path: Path) -> None:
    snap = json.loads(cli("snapshot", "create", cli_store, "--json").stdout)
    data = Path(snap["path"]) / "data.mdb"
    _flip(data, 100)
    result = cli("snapshot", "restore", cli_store, snap["id"], "--into", tmp_path / "r")
    assert result.exit_code == 1 and str(data) in result.stderr
    assert not (tmp_path / "r").exists()
    listed = cli("snapshot", "list", cli_store, "--verify")
    assert listed.exit_code == 1 and "damaged" in listed.stderr and str(data) in listed.stderr
    assert cli("snapshot", "list", cli_store).exit_code == 0  # manifests alone are fine


def test_cli_locked_store_exit_3(cli_store: Path) -> None:
    with Store.open(cli_store):
        for args in (["create", cli_store], ["prune", cli_store, "--keep", "1"]):
            result = cli("snapshot", *args)
            assert result.exit_code == 3 and "locked" in result.stderr
