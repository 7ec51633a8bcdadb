"""`xpstore recover`: point_in_time with --to-lsn, salvage into a new store, and bad arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers import files_of
from xpstore import InvalidArgumentError, Store, WALCorruptionError
from xpstore.cli import main
from xpstore.demo.synthetic import make_mixed
from xpstore.model.records import Record
from xpstore.ops.salvage import salvage_store
from xpstore.persistence.wal_format import Frame
from xpstore.persistence.wal_reader import scan_segment


def _held_store(path: Path, n: int = 12, **kw: Any) -> list[Record]:
    records = make_mixed(np.random.default_rng(11), n, t0=100.0)
    with Store.open(path, create=True, hold_applier=True, **kw) as store:
        for r in records:
            store.put(r)  # one frame per put: LSN i is frame i
    return records


def _frames(path: Path) -> list[tuple[Path, Frame]]:
    segs = sorted((path / "wal").glob("*.wal"))
    out: list[tuple[Path, Frame]] = []
    for seg in segs:
        scan = scan_segment(seg, seg.read_bytes(), 1 << 26)
        out.extend((seg, f) for f in scan.frames)
    return out


def _flip(seg: Path, offset: int) -> None:
    data = bytearray(seg.read_bytes())
    data[offset] ^= 0x40
    seg.write_bytes(bytes(data))




def test_salvage_skips_a_damaged_frame_and_reports_the_gap(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _held_store(src)
    seg, frame = _frames(src)[4]  # LSN 5
    _flip(seg, frame.offset + 40)
    before = files_of(src)
    with pytest.raises(WALCorruptionError):
        Store.open(src)
    assert files_of(src) == before  # the refused open changed nothing
    report = salvage_store(src, tmp_path / "dst")
    assert [(g.first_lsn, g.last_lsn, g.reason) for g in report.gaps] == [(5, 5, "crc_mismatch")]
    with Store.open(tmp_path / "dst") as dst:
        assert sorted(e.id for e in dst.scan()) == [i for i in range(1, 13) if i != 5]
        new_id = dst.put(make_mixed(np.random.default_rng(1), 1)[0])
        assert new_id == 13
    assert files_of(src) == before  # salvage never writes into the damaged store


def test_salvage_over_a_missing_segment_and_a_torn_tail(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _held_store(src, n=500, segment_max_bytes=64 * 1024)
    segs = sorted((src / "wal").glob("*.wal"))
    assert len(segs) >= 3
    frames = _frames(src)
    lost = [f for s, f in frames if s == segs[1]]
    segs[1].unlink()
    last_seg, last = frames[-1]
    with last_seg.open("r+b") as fh:  # tear the last frame
        fh.truncate(last.offset + 10)
    report = salvage_store(src, tmp_path / "dst")
    gaps = [(g.first_lsn, g.last_lsn) for g in report.gaps]
    assert (lost[0].first_lsn, lost[-1].last_lsn) in gaps
    assert (last.first_lsn, None) in gaps
    expected = {f.first_lsn for s, f in frames if s != segs[1]} - {last.first_lsn}
    with Store.open(tmp_path / "dst") as dst:
        assert {e.id for e in dst.scan()} == expected


def test_point_in_time_to_lsn_sets_the_rest_aside(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _held_store(path)
    with pytest.raises(InvalidArgumentError):
        Store.open(path, to_lsn=7)  # needs recovery_mode="point_in_time"
    result = CliRunner().invoke(main, ["recover", str(path), "--mode", "point_in_time",
                                       "--to-lsn", "7", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["records"] == 7 and data["dropped_lsns"] == [8, 12]
    assert data["broken_copies"]
    with Store.open(path) as store:
        assert sorted(e.id for e in store.scan()) == list(range(1, 8))
        assert store.put(make_mixed(np.random.default_rng(2), 1)[0]) == 8
        store.flush()
    with pytest.raises(InvalidArgumentError) as info:  # LMDB already holds LSN 8
        Store.open(path, recovery_mode="point_in_time", to_lsn=3)
    assert "snapshot" in str(info.value)


def test_recover_modes_through_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    clean = tmp_path / "clean"
    _held_store(clean)
    result = runner.invoke(main, ["recover", str(clean)])
    assert result.exit_code == 0 and "the WAL was clean" in result.output
    damaged = tmp_path / "damaged"
    _held_store(damaged)
    seg, frame = _frames(damaged)[2]
    _flip(seg, frame.offset + 40)
    before = files_of(damaged)
    for mode in ("tolerate_tail", "absolute"):
        result = runner.invoke(main, ["recover", str(damaged), "--mode", mode])
        assert result.exit_code == 1
        assert seg.name in result.output and "point_in_time" in result.output
    assert files_of(damaged) == before
    result = runner.invoke(main, ["recover", str(damaged), "--mode", "salvage", "--into",
                                  str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["records"] == 11 and data["gaps"][0]["first_lsn"] == 3
    result = runner.invoke(main, ["recover", str(damaged), "--mode", "point_in_time"])
    assert result.exit_code == 0 and "dropped LSNs 3..12" in result.output


def test_recover_bad_arguments(tmp_path: Path) -> None:
    runner = CliRunner()
    path = tmp_path / "s"
    _held_store(path, n=3)
    cases = [
        (["recover", str(path), "--mode", "salvage"], 2, "--into"),
        (["recover", str(path), "--into", str(tmp_path / "x")], 2, "salvage"),
        (["recover", str(path), "--mode", "absolute", "--to-lsn", "2"], 2, "point_in_time"),
        (["recover", str(tmp_path / "nothing")], 2, "not an xpstore store"),
        (["recover", str(path), "--mode", "bogus"], 2, "bogus"),
    ]
    for args, code, text in cases:
        result = runner.invoke(main, args)
        assert result.exit_code == code, (args, result.output)
        assert text in result.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    result = runner.invoke(main, ["recover", str(path), "--mode", "salvage", "--into",
                                  str(tmp_path / "full")])
    assert result.exit_code == 2 and "not empty" in result.output
    with Store.open(path):
        result = runner.invoke(main, ["recover", str(path)])
        assert result.exit_code == 3 and "locked" in result.output
    shutil.rmtree(tmp_path / "full")
