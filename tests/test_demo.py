"""The demo: a real child writer is SIGKILLed mid-stream and nothing it acknowledged is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from xpstore import Store
from xpstore.cli import main
from xpstore.crashwriter import record_for
from xpstore.demo import DemoResult, run_demo


def test_run_demo_loses_nothing_acknowledged(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path / "xp", seed=3, records=300, crash_after=120, echo=lines.append)
    assert isinstance(result, DemoResult)
    assert result.acked >= 120
    assert result.lost == [] and result.mismatched == [] and result.damaged_before == []
    assert result.recovered >= result.acked
    assert result.written == 300 and result.checked_before == 300
    assert sum(result.counts.values()) == 300
    assert result.ok
    assert lines[-1].startswith("== OK: nothing acknowledged was lost")
    assert any("SIGKILL" in line for line in lines)
    # the demo's own check, repeated independently: the last ACKed record of thread 0 is there
    with Store.open(tmp_path / "xp") as store:
        first_child = [e for e in store.scan() if e.ts >= 1_700_000_000.0]
        assert len(first_child) == result.recovered
        thread0 = sorted((e for e in first_child if e.ts < 1_701_000_000.0), key=lambda e: e.ts)
        if thread0:
            seq = int(thread0[-1].ts - 1_700_000_000.0)
            assert thread0[-1].record == record_for(3, 0, seq)


def test_run_demo_with_held_applier_replays_every_acknowledged_op(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "xp", seed=4, records=50, crash_after=60, hold_applier=True)
    assert result.ok
    # the child applied nothing to LMDB, so every one of its operations came back from the WAL
    assert result.replayed_ops == result.recovered >= result.acked
    assert result.recovery["mode"] == "tolerate_tail"


def test_run_demo_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        run_demo(tmp_path, records=10)


def test_demo_command_json_and_temp_dir_removed() -> None:
    result = CliRunner().invoke(
        main, ["demo", "--records", "100", "--crash-after", "50", "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["lost"] == [] and data["acked"] >= 50
    assert data["kept"] is False
    assert not Path(data["path"]).exists()
    assert set(data["timings"]) == {"write", "crash", "recover", "verify", "total"}


def test_demo_command_text_into_a_path(tmp_path: Path) -> None:
    path = tmp_path / "xp"
    result = CliRunner().invoke(
        main, ["demo", str(path), "--records", "100", "--crash-after", "30"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "== phase 1: writing 100 synthetic records" in out
    assert "killed with SIGKILL" in out
    assert "every acknowledged record present and equal" in out
    assert (path / "xpstore.json").exists()  # a given PATH is kept
    again = CliRunner().invoke(main, ["demo", str(path)])
    assert again.exit_code == 2
    assert "not empty" in again.stderr
