"""`xpstore wal inspect`, `xpstore verify` and `Store.check()`: clean stores, each kind of damage
named by place, read-only behaviour (files compared byte for byte), and a live writer beside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest
from click.testing import CliRunner, Result

from tests.helpers import files_of, record_as, segments
from xpstore import Fingerprint, Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_mixed
from xpstore.ops.inspect import inspect_wal
from xpstore.persistence.lmdb_tables import index_key, u64
from xpstore.persistence.wal_format import Frame
from xpstore.persistence.wal_reader import BadFrame, WalReader, scan_segment

MAX_FRAME = 64 * 1024 * 1024


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def make_store(path: Path, n: int = 300, *, batch: int = 50, **config: Any) -> list[int]:
    """n mixed records in batches (one frame each), an update, a delete and a delete_track."""
    records = make_mixed(np.random.default_rng(7), n, t0=1_690_000_000.0)
    ids: list[int] = []
    with Store.open(path, create=True, **config) as store:
        for start in range(0, n, batch):
            ids += store.put_many(records[start : start + batch])
        kinds = {i: store.get(i).kind for i in ids}
        preds = [i for i in ids if kinds[i] == "prediction"]
        fps = [i for i in ids if kinds[i] == "fingerprint"]
        store.update(preds[0], actual="warm")
        store.delete(preds[1])
        store.delete_track(record_as(store.get(fps[-1]), Fingerprint).track_id)
    return ids






def frame_offsets(seg: Path) -> list[int]:
    scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    assert scan.error is None
    return [f.offset for f in scan.frames]


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


@pytest.fixture
def held(tmp_path: Path) -> Path:
    """A store whose every operation is still in the WAL (applier held), in several segments."""
    root = tmp_path / "held"
    make_store(root, 600, hold_applier=True, segment_max_bytes=64 * 1024)
    assert len(segments(root)) >= 3
    return root


# ------------------------------------------------------------------------ wal inspect


def test_inspect_clean_wal_reports_every_segment_in_lsn_order(held: Path) -> None:
    reports = inspect_wal(held / "wal", with_frames=True)
    segs = [r for r in reports if r.role == "segment"]
    assert segs and all(r.ok for r in segs)
    expected = 1
    for rep in segs:
        assert rep.first_lsn == expected
        assert rep.frame_list is not None and len(rep.frame_list) == rep.frames
        if rep.frames:
            assert rep.frame_list[0].first_lsn == rep.first_lsn
            assert rep.frame_list[-1].last_lsn == rep.last_lsn
            assert rep.first_commit is not None and rep.last_commit is not None
            assert rep.first_commit <= rep.last_commit
            expected = rep.last_lsn + 1
        assert rep.size == (held / "wal" / rep.name).stat().st_size
    assert expected - 1 == 603  # 600 puts + update + delete + delete_track

    result = run("wal", "inspect", held, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["problems"] == 0
    assert [s["name"] for s in data["segments"]] == [r.name for r in reports]

    text = run("wal", "inspect", held, "--frames")
    assert text.exit_code == 0
    assert f"+{segs[0].frame_list[0].offset}" in text.stdout  # type: ignore[index]
    assert "0 with problems" in text.stdout


def test_inspect_torn_tail_names_segment_and_offset_and_changes_nothing(held: Path) -> None:
    last = segments(held)[-1]
    offsets = frame_offsets(last)
    assert len(offsets) >= 2
    cut = offsets[-1] + 20  # inside the last frame's header
    os.truncate(last, cut)
    before = files_of(held)

    rep = next(r for r in inspect_wal(held / "wal") if r.name == last.name)
    assert rep.bad_offset == offsets[-1] and rep.bad_reason == "truncated_header"
    assert rep.resumes_at is None

    result = run("wal", "inspect", held)
    assert result.exit_code == 1
    assert f"{last.name}" in result.stdout and f"bad frame at +{offsets[-1]}" in result.stdout
    assert "nothing valid after it" in result.stdout
    assert files_of(held) == before


def test_inspect_bit_flip_names_the_frame_and_where_valid_frames_resume(held: Path) -> None:
    seg = segments(held)[0]
    offsets = frame_offsets(seg)
    flip(seg, offsets[1] + 40)  # payload of the second frame
    before = files_of(held)

    rep = next(r for r in inspect_wal(held / "wal") if r.name == seg.name)
    assert (rep.bad_offset, rep.bad_reason) == (offsets[1], "crc_mismatch")
    assert rep.resumes_at == offsets[2]
    assert rep.frames == 1

    result = run("wal", "inspect", held, "--json")
    assert result.exit_code == 1
    seg_json = next(s for s in json.loads(result.stdout)["segments"] if s["name"] == seg.name)
    assert seg_json["bad_offset"] == offsets[1] and not seg_json["ok"]
    # the next segment now starts after a gap in the LSN sequence
    assert any("missing before this segment" in p for r in inspect_wal(held / "wal")
               for p in r.problems)
    assert files_of(held) == before


def test_inspect_lists_broken_copies_and_foreign_segments(tmp_path: Path, held: Path) -> None:
    last = segments(held)[-1]
    os.truncate(last, frame_offsets(last)[-1] + 20)
    with Store.open(held, hold_applier=True) as store:  # recovery keeps a .broken copy
        assert store.recovery_report is not None and store.recovery_report.broken_copies
    other = tmp_path / "other"
    make_store(other, 20, hold_applier=True)
    foreign = segments(other)[0]
    (held / "wal" / "00000000000000900000.wal").write_bytes(foreign.read_bytes())

    reports = inspect_wal(held / "wal", store_id=_store_id(held))
    assert any(r.role == "broken" for r in reports)
    odd = next(r for r in reports if r.name == "00000000000000900000.wal")
    assert any("belongs to store" in p for p in odd.problems)
    assert any("file name says 900000" in p for p in odd.problems)
    result = run("wal", "inspect", held)
    assert "[broken]" in result.stdout and result.exit_code == 1


def test_inspect_accepts_a_bare_wal_directory(held: Path) -> None:
    result = run("wal", "inspect", held / "wal")
    assert result.exit_code == 0
    assert segments(held)[0].name in result.stdout


def _store_id(root: Path) -> int:
    return int(json.loads((root / "xpstore.json").read_text())["store_id"])


# ------------------------------------------------------------------------ the salvage walk


def test_walk_resyncs_after_damage_and_reports_the_hidden_lsns(held: Path) -> None:
    seg = segments(held)[0]
    scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    hit = scan.frames[2]
    flip(seg, hit.offset + 40)
    reader = WalReader(held / "wal", store_id=_store_id(held), max_frame_bytes=MAX_FRAME)
    items = list(reader)
    damage = [i for i in items if not isinstance(i, Frame)]
    assert len(damage) == 1
    d = damage[0]
    assert isinstance(d, BadFrame)
    assert (d.segment, d.offset, d.reason) == (seg, hit.offset, "crc_mismatch")
    assert (d.first_lsn, d.last_lsn) == (hit.first_lsn, hit.last_lsn)
    assert not d.torn
    lsns = [f.first_lsn for f in items if isinstance(f, Frame)]
    assert hit.first_lsn not in lsns and hit.last_lsn + 1 in lsns
    assert reader.end_lsn == 603


# ------------------------------------------------------------------------ verify: clean


def test_verify_clean_store_exit_0(tmp_path: Path) -> None:
    root = tmp_path / "s"
    make_store(root, 400)
    with Store.open(root) as store:
        store.snapshot()
        report = store.check()
        assert report.ok, report.problems
        assert report.stats["records"] == store.count()
        assert report.stats["snapshots"] == 1
    before = files_of(root)
    result = run("verify", root)
    assert result.exit_code == 0, result.stdout
    assert "OK" in result.stdout
    data = json.loads(run("verify", root, "--json").stdout)
    assert data["ok"] and data["problems"] == []
    assert sum(data["stats"]["counts"].values()) == data["stats"]["records"]
    assert files_of(root) == before


def test_verify_held_store_with_everything_in_the_wal(held: Path) -> None:
    result = run("verify", held, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["stats"]["wal"]["ops"] == 603 and data["stats"]["applied_lsn"] == 0


# ------------------------------------------------------------------------ verify: damage


def _raw_env(root: Path) -> lmdb.Environment:
    return lmdb.open(str(root / "data"), max_dbs=8, subdir=True)


def _problems(root: Path) -> list[dict[str, str]]:
    result = run("verify", root, "--json")
    assert result.exit_code == 1, result.stdout
    return list(json.loads(result.stdout)["problems"])


@pytest.fixture
def applied(tmp_path: Path) -> tuple[Path, list[int]]:
    root = tmp_path / "applied"
    return root, make_store(root, 300)


def test_verify_finds_a_corrupted_record(applied: tuple[Path, list[int]]) -> None:
    root, ids = applied
    env = _raw_env(root)
    with env.begin(write=True) as txn:
        txn.put(u64(ids[10]), b"\x97\x01\x05garbage", db=env.open_db(b"records", txn=txn))
    env.close()
    problems = _problems(root)
    assert any(p["where"] == f"lmdb records id={ids[10]}" and "does not decode" in p["what"]
               for p in problems)


def test_verify_finds_an_index_entry_without_record(applied: tuple[Path, list[int]]) -> None:
    root, _ids = applied
    env = _raw_env(root)
    with env.begin(write=True) as txn:
        txn.put(index_key(1, 1_690_000_000.5, 777_777), b"", db=env.open_db(b"by_kind_ts", txn=txn))
    env.close()
    problems = _problems(root)
    assert {"where": "lmdb by_kind_ts kind=prediction id=777777",
            "what": "index entry without a record"} in problems
    assert any(p["where"] == "lmdb meta counts prediction" for p in problems)


def test_verify_finds_a_record_without_index_entry(applied: tuple[Path, list[int]]) -> None:
    root, ids = applied
    with Store.open(root, readonly=True) as store:
        exp = store.get(ids[3])
    env = _raw_env(root)
    with env.begin(write=True) as txn:
        assert txn.delete(index_key(_code(exp.kind), exp.ts, exp.id),
                          db=env.open_db(b"by_kind_ts", txn=txn))
    env.close()
    problems = _problems(root)
    assert any(p["where"] == f"lmdb records id={ids[3]}" and "no by_kind_ts entry" in p["what"]
               for p in problems)


def _code(kind: str) -> int:
    return {"prediction": 1, "fingerprint": 2, "query_metric": 3}[kind]


def test_verify_finds_a_count_mismatch(applied: tuple[Path, list[int]]) -> None:
    root, _ids = applied
    env = _raw_env(root)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        raw = txn.get(b"counts", db=meta)
        assert raw is not None
        counts = json.loads(raw)
        counts["3"] += 5
        txn.put(b"counts", json.dumps(counts).encode(), db=meta)
    env.close()
    problems = _problems(root)
    assert any(p["where"] == "lmdb meta counts query_metric" and "says" in p["what"]
               for p in problems)


def test_verify_finds_a_wal_bit_flip_and_a_torn_tail(held: Path) -> None:
    seg = segments(held)[0]
    offsets = frame_offsets(seg)
    flip(seg, offsets[2] + 36)
    last = segments(held)[-1]
    os.truncate(last, frame_offsets(last)[-1] + 40)
    before = files_of(held)
    problems = _problems(held)
    wheres = [p["where"] for p in problems]
    assert f"wal/{seg.name}+{offsets[2]}" in wheres
    flip_problem = problems[wheres.index(f"wal/{seg.name}+{offsets[2]}")]
    assert "crc_mismatch" in flip_problem["what"] and "unreadable" in flip_problem["what"]
    torn = [p for p in problems if p["where"].startswith(f"wal/{last.name}+")]
    assert torn and torn[0]["what"].startswith("torn tail")
    assert files_of(held) == before


def test_verify_finds_a_tampered_snapshot(applied: tuple[Path, list[int]]) -> None:
    root, _ids = applied
    with Store.open(root) as store:
        info = store.snapshot()
    flip(info.path / "data.mdb", 5000)  # same size, different bytes
    fake = root / "snapshots" / "handmade"
    fake.mkdir()
    (fake / "data.mdb").write_bytes(b"x" * 100)
    (fake / "manifest.json").write_text(
        json.dumps({"files": {"data.mdb": {"sha256": "0" * 64, "size": 100}}})
    )
    problems = _problems(root)
    tampered = [p for p in problems if p["where"] == f"snapshot {info.id}"]
    assert tampered and "sha256" in tampered[0]["what"]
    assert any(p["where"] == "snapshot handmade" for p in problems)


def test_check_reports_problems_in_process(applied: tuple[Path, list[int]]) -> None:
    root, ids = applied
    env = _raw_env(root)
    with env.begin(write=True) as txn:
        txn.delete(u64(ids[0]), db=env.open_db(b"records", txn=txn))
    env.close()
    with Store.open(root) as store:
        report = store.check()
    assert not report.ok
    assert any("index entry without a record" in p.what for p in report.problems)
    assert any(str(p).startswith("lmdb ") for p in report.problems)


# ------------------------------------------------------------------------ verify: live writer

_BUSY_WRITER = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    from xpstore import Store
    from xpstore.demo.synthetic import make_mixed
    records = make_mixed(np.random.default_rng(3), 4000, t0=1_700_000_000.0)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with Store.open(sys.argv[1], segment_max_bytes=65536, apply_interval_ms=5,
                    checkpoint_interval_s=0.05) as store:
        store.put_many(records[:200])
        print("READY", flush=True)
        i = 200
        while not stop.is_set():  # until the parent closes stdin
            store.put_many(records[i % 4000 : i % 4000 + 10])
            i += 10
    """
)


def test_verify_beside_a_live_busy_writer(tmp_path: Path) -> None:
    root = tmp_path / "live"
    Store.open(root, create=True).close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    child = subprocess.Popen(
        [sys.executable, "-c", _BUSY_WRITER, str(root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        for _ in range(3):
            result = run("verify", root, "--json")
            data = json.loads(result.stdout)
            assert result.exit_code == 0, data
            assert any("live writer" in n for n in data["notes"])
        assert child.poll() is None  # the writer was never disturbed
    finally:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        assert child.wait(timeout=30) == 0
        child.stdout.close()
    assert run("verify", root).exit_code == 0


def test_verify_survives_lmdb_aborting_on_a_damaged_page(tmp_path: Path) -> None:
    root = tmp_path / "pages"
    with Store.open(root, create=True) as store:
        store.put_many(make_mixed(np.random.default_rng(1), 3000, t0=1_690_000_000.0))
    data = root / "data" / "data.mdb"
    with data.open("r+b") as f:  # a zeroed page inside the records B-tree: liblmdb asserts
        f.seek(4096 * 40)
        f.write(bytes(4096))
    before = files_of(root)
    result = run("verify", root, "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert any(p["where"] == f"lmdb {root / 'data'}" and "SIGABRT" in p["what"]
               for p in report["problems"])
    assert report["stats"]["wal"]["ops"] == 3000  # the WAL was still checked
    assert files_of(root) == before
