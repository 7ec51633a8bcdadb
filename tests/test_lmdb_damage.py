"""A damaged LMDB data file (issue 14.2): ``data.mdb`` truncated to half.

Mapping such a file and touching a page past its end kills the process with SIGBUS (exit 135,
no message): stats, get, scan, replay, recover (every mode), snapshot list and snapshot restore
all died that way. The data file's size is now checked against LMDB's meta pages before it is
mapped (``xpstore.persistence.lmdb_datafile.check_data_file``), every open fails with one
``LmdbCorruptionError`` naming the file, and the two ways back (a snapshot plus the retained WAL)
work without reading the damaged file.

The commands run as subprocesses: a regression would kill the test runner itself.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xpstore import Store
from xpstore.demo.synthetic import make_mixed

TIMEOUT = 60
Damaged = tuple[Path, dict[int, Any], str, int]


def cli(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xpstore.cli", *(str(a) for a in args)],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )


def build(path: Path) -> tuple[dict[int, Any], str, int]:
    """A store with a snapshot in the middle of its history and its WAL retained since; returns
    every live record's JSON by id, the snapshot's id and the last LSN."""
    records = make_mixed(np.random.default_rng(7), 900, proportions=(1, 0, 0),
                         t0=1_690_000_000.0)
    with Store.open(path, create=True, wal_retain_segments=1000) as store:
        store.put_many(records[:500])
        snap = store.snapshot()
        store.put_many(records[500:700])
    with Store.open(path) as store:  # a second session: the WAL spans segments
        ids = store.put_many(records[700:])
        last = store.update(ids[0], actual="warm").updated_lsn
        live = {exp.id: exp.to_json() for exp in store.scan()}
    return live, snap.id, last


def truncate_half(path: Path) -> Path:
    data = path / "data" / "data.mdb"
    size = data.stat().st_size
    os.truncate(data, size // 2)
    return data


@pytest.fixture
def damaged(tmp_path: Path) -> Damaged:
    path = tmp_path / "store"
    live, snap_id, last = build(path)
    truncate_half(path)
    return path, live, snap_id, last


def test_size_check_reads_the_meta_pages(tmp_path: Path) -> None:
    """In-process: the check reads the two meta pages with plain file reads (never mmap)."""
    from xpstore.errors import LmdbCorruptionError, StoreCorruptionError
    from xpstore.persistence.lmdb_datafile import check_data_file

    path = tmp_path / "store"
    build(path)
    data = path / "data" / "data.mdb"
    check_data_file(data.parent)  # intact: no error
    size = data.stat().st_size
    os.truncate(data, size // 2)
    with pytest.raises(LmdbCorruptionError) as info:
        check_data_file(data.parent)
    assert isinstance(info.value, StoreCorruptionError)
    assert info.value.path == data
    message = str(info.value)
    assert str(data) in message and f"{size // 2:,}" in message and "truncated" in message
    os.truncate(data, 100)  # less than the two meta pages
    with pytest.raises(LmdbCorruptionError, match="meta pages"):
        check_data_file(data.parent)
    data.write_bytes(b"\0" * 8192)  # no magic in either meta page
    with pytest.raises(LmdbCorruptionError, match="not an LMDB data file"):
        check_data_file(data.parent)
    os.truncate(data, 0)
    check_data_file(data.parent)  # empty: LMDB initializes it on a writer open


def test_meta_page_layout_matches_lmdb(tmp_path: Path) -> None:
    """The offsets the check reads (magic, version, page size, last page, txn id) are LMDB's:
    read them from a real file and compare with what py-lmdb reports."""
    from xpstore.persistence.lmdb_datafile import read_meta_pages

    path = tmp_path / "store"
    build(path)
    metas = read_meta_pages(path / "data" / "data.mdb")
    newest = max(metas, key=lambda m: m.txnid)
    import lmdb

    env = lmdb.open(str(path / "data"), readonly=True, max_dbs=16, lock=False)
    try:
        info, stat = env.info(), env.stat()
    finally:
        env.close()
    assert newest.page_size == stat["psize"]
    assert newest.last_page == info["last_pgno"]
    assert newest.txnid == info["last_txnid"]
    assert struct.calcsize("<I") == 4  # the layout is little-endian on every supported machine


@pytest.mark.parametrize("args", [
    ("stats", "{p}"),
    ("get", "{p}", "1"),
    ("scan", "{p}", "--limit", "1"),
    ("get", "{p}", "1", "--readonly"),
    ("recover", "{p}"),
    ("recover", "{p}", "--mode", "absolute"),
    ("recover", "{p}", "--mode", "point_in_time"),
    ("snapshot", "create", "{p}"),
    ("compact", "{p}"),
])
def test_commands_fail_with_one_clear_error(damaged: Damaged,
                                            args: tuple[str, ...]) -> None:
    path, _live, _snap, _last = damaged
    result = cli(*(a.format(p=path) for a in args))
    assert result.returncode == 1, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "data.mdb" in errors[0] and "truncated" in errors[0]
    assert "Traceback" not in result.stderr


def test_verify_and_replay_report_the_file(damaged: Damaged) -> None:
    path, _live, _snap, _last = damaged
    result = cli("verify", path)
    assert result.returncode == 1, result.stderr
    assert "data.mdb" in result.stdout and "truncated" in result.stdout
    assert "checker died" not in result.stdout
    result = cli("replay", path)
    assert result.returncode in (0, 1), result.stderr  # the WAL is read; LMDB is reported
    assert "data.mdb" in result.stderr


def test_snapshot_list_works_without_lmdb(damaged: Damaged) -> None:
    path, _live, snap_id, _last = damaged
    result = cli("snapshot", "list", path, "--json")
    assert result.returncode == 0, result.stderr
    assert [s["id"] for s in json.loads(result.stdout)["snapshots"]] == [snap_id]
    assert "data.mdb" in result.stderr  # a warning says why the files were read directly


def test_snapshot_restore_rolls_forward_without_the_damaged_file(
    damaged: Damaged, tmp_path: Path
) -> None:
    path, live, snap_id, last = damaged
    into = tmp_path / "restored"
    result = cli("snapshot", "restore", path, snap_id, "--into", into, "--to-lsn", last)
    assert result.returncode == 0, result.stderr
    assert cli("verify", into).returncode == 0
    with Store.open(into, readonly=True) as store:
        assert {exp.id: exp.to_json() for exp in store.scan()} == live


def test_salvage_starts_from_the_snapshot(damaged: Damaged,
                                          tmp_path: Path) -> None:
    path, live, snap_id, _last = damaged
    into = tmp_path / "salvaged"
    result = cli("recover", path, "--mode", "salvage", "--into", into, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["gaps"] == []
    assert any(snap_id in w and "data.mdb" in w for w in report["warnings"]), report
    assert cli("verify", into).returncode == 0
    with Store.open(into, readonly=True) as store:
        assert {exp.id: exp.to_json() for exp in store.scan()} == live
