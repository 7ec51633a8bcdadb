"""Retention (evictions logged in the WAL like deletes) and compaction (crash-safe swap).

SIGKILL tests run real child processes (``sys.executable -c``) that stop at the named crash
points through ``XPSTORE_CRASH_AT``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_fingerprint, make_mixed, make_query_metric
from xpstore.errors import ReadOnlyStoreError, RecordNotFoundError, XpStoreError
from xpstore.model.records import PredictionOutcome, QueryMetric, Record
from xpstore.ops import compaction
from xpstore.ops.compaction import COMPACT_DIR, INTENT, OLD_DIR, finish_interrupted
from xpstore.persistence.layout import Layout
from xpstore.store import maintenance

REPO = Path(__file__).resolve().parent.parent
T0 = 1_700_000_000.0


def prediction(i: int, ts: float | None = None) -> PredictionOutcome:
    return PredictionOutcome(
        predicted="punchy",
        actual="warm",
        confidence=0.5,
        context=f"ctx{i}",
        ts=T0 + i if ts is None else ts,
    )


def metric(i: int) -> QueryMetric:
    return make_query_metric(np.random.default_rng(i), ts=T0 + i)


def live(store: Store, kind: str | None = None) -> dict[int, Record]:
    return {exp.id: exp.record for exp in store.scan(kind)}


def retention_task(store: Store) -> maintenance.RetentionTask:
    """The store's retention task as its own class (whose ``due`` takes a ``now``)."""
    task = store.parts.tasks["retention"]
    assert isinstance(task, maintenance.RetentionTask)
    return task


def child(script: str, *args: Any, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (no FAISS), optionally dying at a crash point."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XPSTORE_CRASH_AT", None)
    if crash_at is not None:
        env["XPSTORE_CRASH_AT"] = crash_at
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def acked_ids(out: str) -> list[int]:
    return [int(x) for line in out.splitlines() if line.startswith("ACK") for x in line.split()[1:]]


# ------------------------------------------------------------------------ retention


def test_retention_by_count_keeps_the_newest_per_kind(store_path: Path) -> None:
    cfg = {"retention": {"prediction": {"max_count": 5}}}
    with Store.open(store_path, create=True, config=cfg) as store:
        # out-of-order timestamps: eviction follows ts, not id
        ids = store.put_many([prediction(i, ts=T0 + (i * 7) % 20) for i in range(20)])
        metrics = store.put_many([metric(i) for i in range(10)])
        by_ts = sorted(ids, key=lambda rid: store.get(rid).ts)
        assert store.apply_retention() == {"prediction": 15}
        assert set(live(store, "prediction")) == set(by_ts[-5:])
        assert set(live(store, "query_metric")) == set(metrics)
        assert store.count("prediction") == 5
        assert store.apply_retention() == {"prediction": 0}  # nothing more to do


def test_retention_by_age_and_the_union_of_both_rules(store_path: Path) -> None:
    cfg = {
        "retention": {
            "prediction": {"max_age_s": 100.0},
            "query_metric": {"max_age_s": 100.0, "max_count": 3},
        }
    }
    with Store.open(store_path, create=True, config=cfg) as store:
        preds = store.put_many([prediction(i) for i in range(10)])  # ts T0 .. T0+9
        metrics = store.put_many([metric(i) for i in range(10)])
        evicted = store.apply_retention(now=T0 + 105.0)  # cutoff T0+5: ts < cutoff goes
        assert evicted == {"prediction": 5, "query_metric": 7}  # age takes 5, count 7
        assert set(live(store, "prediction")) == set(preds[5:])
        assert set(live(store, "query_metric")) == set(metrics[7:])
        assert store.apply_retention(now=T0 + 1_000.0) == {"prediction": 5, "query_metric": 3}
        assert store.count() == 0


def test_retention_without_rules_and_on_a_readonly_store(store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        store.put(prediction(0))
        assert store.apply_retention() == {}
        assert not retention_task(store).due(now=time.monotonic() + 1e9)
    with Store.open(store_path, readonly=True) as ro, pytest.raises(ReadOnlyStoreError):
        ro.apply_retention()


def test_evicting_a_current_fingerprint_retires_its_track(store_path: Path) -> None:
    rng = np.random.default_rng(3)
    cfg = {"retention": {"fingerprint": {"max_count": 2}}}
    fps = [
        make_fingerprint(rng, "old-track").model_copy(update={"ts": T0}),
        make_fingerprint(rng, "kept-track").model_copy(update={"ts": T0 + 1}),  # superseded
        make_fingerprint(rng, "kept-track").model_copy(update={"ts": T0 + 2}),
        make_fingerprint(rng, "new-track").model_copy(update={"ts": T0 + 3}),
    ]
    with Store.open(store_path, create=True, config=cfg) as store:
        ids = store.put_many(fps)
        assert store.apply_retention() == {"fingerprint": 2}
        with pytest.raises(RecordNotFoundError):
            store.get_fingerprint("old-track")
        # the superseded fingerprint went, the track's current one stays
        assert store.get_fingerprint("kept-track").id == ids[2]
        assert store.get_fingerprint("new-track").id == ids[3]
    with Store.open(store_path) as store:
        with pytest.raises(RecordNotFoundError):
            store.get_fingerprint("old-track")
        assert set(live(store)) == {ids[2], ids[3]}


def test_evictions_go_through_the_wal_in_small_frames(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "EVICT_BATCH", 7)
    cfg = {"retention": {"prediction": {"max_count": 10}}}
    with Store.open(store_path, create=True, config=cfg) as store:
        store.put_many([prediction(i) for i in range(60)])
        frames = store.stats()["wal"]["frames"]
        assert store.apply_retention() == {"prediction": 50}
        assert store.stats()["wal"]["frames"] - frames == 8  # ceil(50 / 7) frames
        assert store.stats()["next_lsn"] == 61 + 50  # one LSN per eviction


def test_a_record_deleted_meanwhile_is_skipped_not_fatal(store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        a, b, c = store.put_many([prediction(i) for i in range(3)])
        store.delete(b)  # as if a user deleted it between the scan and the eviction
        assert store.parts.maintenance.evict([a, b, c]) == 2
        assert store.count() == 0


def test_evictions_are_replayed_when_lmdb_never_saw_them(store_path: Path) -> None:
    cfg = {"retention": {"prediction": {"max_count": 2}}}
    with Store.open(store_path, create=True, config=cfg) as store:
        ids = store.put_many([prediction(i) for i in range(6)])
    with Store.open(store_path, hold_applier=True) as store:
        assert store.apply_retention() == {"prediction": 4}
        assert set(live(store)) == set(ids[4:])  # read your evictions
    with Store.open(store_path, readonly=True) as ro:  # LMDB only: still there
        assert set(live(ro)) == set(ids)
    with Store.open(store_path) as store:  # the WAL replays the evictions
        assert set(live(store)) == set(ids[4:])
        assert store.count("prediction") == 2


RETENTION_CHILD = """
import sys
from xpstore import Store
with Store.open(sys.argv[1], hold_applier=True) as store:
    print("EVICTED", store.apply_retention()["prediction"], flush=True)
    sys.stdout.flush()
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_evictions_survive_a_sigkill_with_the_applier_held(store_path: Path) -> None:
    cfg = {"retention": {"prediction": {"max_count": 3}}}
    with Store.open(store_path, create=True, config=cfg) as store:
        ids = store.put_many([prediction(i) for i in range(10)])
    proc = child(RETENTION_CHILD, store_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "EVICTED 7" in proc.stdout
    with Store.open(store_path) as store:
        assert set(live(store)) == set(ids[7:])
        assert store.recovery_report is not None
        assert store.recovery_report.replayed_ops == 7


def test_automatic_retention_runs_when_due(store_path: Path) -> None:
    cfg = {"retention": {"prediction": {"max_count": 1}}, "retention_interval_s": 3600.0}
    with Store.open(store_path, create=True, config=cfg) as store:
        task = retention_task(store)
        store.put_many([prediction(i) for i in range(4)])
        now = time.monotonic()
        assert not task.due(now=now)  # the first pass is due an interval after the open
        assert task.due(now=now + 3600.0)
        task.run()
        assert store.count("prediction") == 1
        store.put_many([prediction(i) for i in range(10, 13)])
        assert not task.due(now=time.monotonic())  # the run restarted the period
        assert store.count("prediction") == 4
        assert task.due(now=time.monotonic() + 3600.0)
        task.run()
        assert store.count("prediction") == 1


# ----------------------------------------------------------------------- compaction


def fill_and_thin(path: Path, n: int = 3000, keep_every: int = 10) -> dict[int, Record]:
    """A store that had ``n`` records and kept one in ``keep_every``: LMDB full of free pages."""
    rng = np.random.default_rng(7)
    with Store.open(path, create=True) as store:
        ids = store.put_many(make_mixed(rng, n, t0=T0))
        for start in range(0, n, 500):
            chunk = [rid for rid in ids[start : start + 500] if rid % keep_every]
            for rid in chunk:
                store.delete(rid)
        store.flush()
        return live(store)


def data_file(path: Path) -> Path:
    return path / "data" / "data.mdb"


def test_compact_shrinks_and_keeps_every_live_record(store_path: Path) -> None:
    before = fill_and_thin(store_path)
    size = data_file(store_path).stat().st_size
    with Store.open(store_path) as store:
        space = compaction.lmdb_space(store.parts.engine.tables)
        assert space["reclaimable_bytes"] > size // 2
        report = store.compact()
        assert report.before_bytes == size
        assert report.after_bytes == data_file(store_path).stat().st_size
        assert report.after_bytes < size // 2
        assert live(store) == before  # readable at once, same objects
        assert compaction.lmdb_space(store.parts.engine.tables)["reclaimable_bytes"] == 0
        new_id = store.put(prediction(0))
        assert new_id > max(before)
    assert not (store_path / COMPACT_DIR).exists() and not (store_path / OLD_DIR).exists()
    with Store.open(store_path) as store:
        assert live(store) == {**before, new_id: prediction(0)}
        assert store.put(prediction(1)) == new_id + 1  # ids never repeat
        assert store.count() == len(before) + 2


def test_compact_with_unapplied_writes_keeps_them_in_the_wal(store_path: Path) -> None:
    before = fill_and_thin(store_path)
    with Store.open(store_path, hold_applier=True) as store:
        rid = store.put(prediction(5))
        store.delete(next(iter(before)))
        store.compact()
        assert store.get(rid).record == prediction(5)
    with Store.open(store_path) as store:
        expected = dict(before)
        del expected[next(iter(before))]
        assert live(store) == {**expected, rid: prediction(5)}


def test_compact_refuses_readonly_and_a_second_handle(store_path: Path) -> None:
    fill_and_thin(store_path, n=100)
    with Store.open(store_path, readonly=True) as ro, pytest.raises(ReadOnlyStoreError):
        ro.compact()
    with Store.open(store_path) as store:
        with Store.open(store_path, readonly=True), pytest.raises(XpStoreError, match="other"):
            store.compact()
        assert store.count() == 10  # still usable
        store.compact()
        assert store.count() == 10


COMPACT_CHILD = """
import sys
from xpstore import Store
from xpstore.model.records import PredictionOutcome
path, puts, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
with Store.open(path, hold_applier=hold) as store:
    recs = [PredictionOutcome(predicted="p", confidence=0.5, context=f"c{i}", ts=2e9 + i)
            for i in range(puts)]
    ids = store.put_many(recs) if recs else []
    print("ACK", *ids, flush=True)
    store.compact()
    print("DONE", flush=True)
"""


@pytest.mark.parametrize(
    ("point", "puts", "hold"),
    [
        ("compact.after_copy", 0, False),
        ("compact.after_copy", 40, True),
        ("compact.after_swap", 0, False),
        ("compact.after_swap", 40, False),
        ("compact.after_swap", 40, True),
    ],
)
def test_sigkill_mid_compaction_leaves_the_old_or_the_new_file(
    store_path: Path, point: str, puts: int, hold: bool
) -> None:
    before = fill_and_thin(store_path)
    old_bytes = data_file(store_path).read_bytes()
    proc = child(COMPACT_CHILD, store_path, puts, int(hold), crash_at=point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "DONE" not in proc.stdout
    acked = acked_ids(proc.stdout)
    assert len(acked) == puts
    # opening the store calls this itself; calling it first is harmless (idempotent)
    done = finish_interrupted(Layout(store_path))
    assert done == ("rolled_back" if point == "compact.after_copy" else "rolled_forward")
    assert finish_interrupted(Layout(store_path)) is None
    leftovers = {COMPACT_DIR, OLD_DIR, INTENT} & {p.name for p in store_path.iterdir()}
    assert not leftovers
    new_bytes = data_file(store_path).read_bytes()
    if point == "compact.after_copy" and not puts:
        assert new_bytes == old_bytes  # the old file, untouched
    if point == "compact.after_swap":
        assert len(new_bytes) < len(old_bytes) // 2  # the compacted file
    with Store.open(store_path) as store:
        expected = {**before, **{rid: prediction(0) for rid in acked}}
        got = live(store)
        assert set(got) == set(expected)
        assert all(got[rid] == rec for rid, rec in before.items())
        for k, rid in enumerate(acked):
            assert got[rid] == PredictionOutcome(
                predicted="p", confidence=0.5, context=f"c{k}", ts=2e9 + k
            )
        assert store.count() == len(expected)
        assert store.put(prediction(1)) > max(expected)


# ----------------------------------------------------- finish_interrupted, state by state


@pytest.fixture
def two_versions(store_path: Path) -> Iterator[tuple[Path, Path]]:
    """``data`` of a store at version 1 (one record) and a compacted copy at version 2 (two)."""
    with Store.open(store_path, create=True) as store:
        store.put(prediction(0))
    v1 = store_path.parent / "v1"
    shutil.copytree(store_path / "data", v1)
    with Store.open(store_path) as store:
        store.put(prediction(1))
        store.flush()
        v2 = store_path.parent / "v2"
        v2.mkdir()
        store.parts.engine.tables.env.copy(str(v2), compact=True)
    yield v1, v2


def lmdb_count(path: Path) -> int:
    """What LMDB itself holds (a read-only open replays nothing from the WAL)."""
    with Store.open(path, readonly=True) as ro:
        return ro.count()


def place(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def write_intent(store: Path, copy: Path, size: int | None = None) -> None:
    n = (copy / "data.mdb").stat().st_size if size is None else size
    (store / INTENT).write_text(json.dumps({"format": "xpstore-compact", "copy_bytes": n}))


@pytest.mark.parametrize(
    ("state", "outcome", "version"),
    [
        ("partial copy, no intent", "rolled_back", 1),
        ("copy + intent, nothing renamed", "rolled_forward", 2),
        ("copy + intent, data renamed to data.old", "rolled_forward", 2),
        ("intent, swap done, data.old left", "rolled_forward", 2),
        ("intent, copy size mismatch", "rolled_back", 1),
        ("intent, copy size mismatch, data renamed", "rolled_back", 1),
        ("intent unreadable", "rolled_back", 1),
        ("no intent, data.old left after cleanup", "rolled_back", 2),
    ],
)
def test_finish_interrupted_handles_every_intermediate_state(
    store_path: Path, two_versions: tuple[Path, Path], state: str, outcome: str, version: int
) -> None:
    v1, v2 = two_versions
    data, tmp, old = store_path / "data", store_path / COMPACT_DIR, store_path / OLD_DIR
    place(v1, data)
    if state == "partial copy, no intent":
        tmp.mkdir()
        (tmp / "data.mdb").write_bytes((v2 / "data.mdb").read_bytes()[:5000])
        (store_path / (INTENT + ".tmp")).write_text('{"format": "xpst')  # torn, never renamed
    elif state == "copy + intent, nothing renamed":
        place(v2, tmp)
        write_intent(store_path, v2)
    elif state == "copy + intent, data renamed to data.old":
        place(v2, tmp)
        write_intent(store_path, v2)
        data.rename(old)
    elif state == "intent, swap done, data.old left":
        place(v2, data)
        place(v1, old)
        write_intent(store_path, v2)
    elif state == "intent, copy size mismatch":
        place(v2, tmp)
        write_intent(store_path, v2, size=123)
    elif state == "intent, copy size mismatch, data renamed":
        place(v2, tmp)
        write_intent(store_path, v2, size=123)
        data.rename(old)
    elif state == "intent unreadable":
        place(v2, tmp)
        (store_path / INTENT).write_text("{not json")
    else:
        place(v2, data)
        place(v1, old)
    assert finish_interrupted(Layout(store_path)) == outcome
    assert not {COMPACT_DIR, OLD_DIR, INTENT} & {p.name for p in store_path.iterdir()}
    assert lmdb_count(store_path) == version
    with Store.open(store_path) as store:  # the WAL completes either version
        assert store.count() == 2


def test_compaction_refuses_while_an_interrupted_one_is_pending(
    store_path: Path, two_versions: tuple[Path, Path]
) -> None:
    _v1, v2 = two_versions
    with Store.open(store_path) as store:
        place(v2, store_path / COMPACT_DIR)
        write_intent(store_path, v2)
        with pytest.raises(XpStoreError, match="interrupted"):
            store.compact()
        assert store.count() == 2


# ----------------------------------------------------------------------------- CLI


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_compact(store_path: Path) -> None:
    before = fill_and_thin(store_path)
    size = data_file(store_path).stat().st_size
    result = run("compact", store_path, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["before_bytes"] == size
    assert report["after_bytes"] == data_file(store_path).stat().st_size < size
    text = run("compact", store_path)
    assert text.exit_code == 0
    assert text.stdout.startswith(f"compacted {store_path}: ")
    with Store.open(store_path) as store:
        assert live(store) == before


def test_cli_compact_bad_arguments(tmp_path: Path, store_path: Path) -> None:
    missing = run("compact", tmp_path / "nope")
    assert missing.exit_code == 2
    assert "not an xpstore store" in missing.stderr
    assert not (tmp_path / "nope").exists()
    assert run("compact").exit_code == 2  # no path at all
    fill_and_thin(store_path, n=100)
    size = data_file(store_path).stat().st_size
    with Store.open(store_path):  # flock conflicts even within one process
        busy = run("compact", store_path)
        assert busy.exit_code == 3
        assert busy.stderr.startswith("error: ")
    assert data_file(store_path).stat().st_size == size  # nothing modified


def test_cli_retention(store_path: Path) -> None:
    cfg = {"retention": {"prediction": {"max_age_s": 10.0}}}
    with Store.open(store_path, create=True, config=cfg) as store:
        store.put_many([prediction(i) for i in range(10)])
    result = run("retention", store_path, "--now", T0 + 15.0, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["evicted"] == {"prediction": 5}
    text = run("retention", store_path, "--now", T0 + 15.0)
    assert text.stdout.strip() == "prediction: evicted 0"
    assert run("retention", store_path.parent / "nope").exit_code == 2
