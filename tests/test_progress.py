"""Progress bars on the long operator commands (issue 14): replay, compact, snapshot create and
restore, recover (WAL replay and salvage), ingest.

A bar is drawn on stderr only when it is a terminal; ``XPSTORE_PROGRESS=1`` forces it here, and
each command's stderr must show its phases with done/total, a percentage, a rate and the time
left, while stdout (what scripts parse) stays exactly as it is without a bar.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from xpstore import Store
from xpstore.cli import main
from xpstore.cli._progress import Bar, enabled, render
from xpstore.demo.synthetic import make_mixed

# "phase  12.0/48.0 MiB   25%  6.1 MiB/s  0:06 left" (a count instead of MiB for LSNs/records)
BAR = re.compile(
    r"(?P<phase>[a-z][\w .-]*?)  (?P<done>[\d.,]+)/(?P<total>[\d.,]+ (?:MiB|LSNs|records))  "
    r"+(?P<pct>\d+)%  (?P<rate>[\d.,]+ (?:MiB|LSNs|records))/s  "
    r"(?P<left>\d+:\d\d(?::\d\d)?|--:--) left"
)


def run(*args: Any, progress: bool = True) -> Result:
    env = {"XPSTORE_PROGRESS": "1" if progress else "0"}
    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def bars(stderr: str) -> dict[str, list[re.Match[str]]]:
    """Every drawn bar state by phase (each redraw starts with a carriage return)."""
    out: dict[str, list[re.Match[str]]] = {}
    for chunk in re.split(r"[\r\n]", stderr):
        m = BAR.fullmatch(chunk.replace("\x1b[K", "").strip())
        if m:
            out.setdefault(m["phase"], []).append(m)
    return out


def finished(states: list[re.Match[str]]) -> bool:
    last = states[-1]
    return last["pct"] == "100" and last["done"] == last["total"].split()[0]


def test_render_shape() -> None:
    line = render("replaying WAL", 12 << 20, 48 << 20, "bytes", 2.0)
    assert line == "replaying WAL  12.0/48.0 MiB   25%  6.0 MiB/s  0:06 left"
    assert render("replaying", 500, 2000, "LSNs", 1.0) == (
        "replaying  500/2,000 LSNs   25%  500 LSNs/s  0:03 left")
    assert render("copying", 5, 0, "bytes", 1.0).startswith("copying  0.0 MiB  ")  # no total
    assert render("x", 0, 10, "LSNs", 0.0).endswith("--:-- left")
    assert BAR.fullmatch(line) is not None


def test_bar_draws_one_line_per_phase_and_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    bar = Bar(out)
    for done in range(0, 101, 10):
        bar("phase one", done, 100, "LSNs")
    bar("phase two", 1, 1, "bytes")
    bar.finish()
    text = out.getvalue()
    assert text.count("\n") == 2  # each phase ends its own line
    assert set(bars(text)) == {"phase one", "phase two"}
    assert finished(bars(text)["phase one"])  # the last state is always drawn
    monkeypatch.setenv("XPSTORE_PROGRESS", "0")
    assert not enabled(io.StringIO())
    monkeypatch.setenv("XPSTORE_PROGRESS", "1")
    assert enabled(io.StringIO())
    monkeypatch.delenv("XPSTORE_PROGRESS")
    assert not enabled(io.StringIO())  # not a terminal


@pytest.fixture
def held(tmp_path: Path) -> Path:
    """A store whose WAL holds everything (a crashed writer's state), with a snapshot first."""
    path = tmp_path / "store"
    records = make_mixed(np.random.default_rng(8), 2000, t0=1_690_000_000.0)
    with Store.open(path, create=True, wal_retain_segments=100) as store:
        store.put_many(records[:500])
        store.snapshot()
    with Store.open(path, hold_applier=True) as store:
        for i in range(500, 2000, 100):
            store.put_many(records[i : i + 100])
    return path


def test_recover_and_salvage_show_the_wal_replay(held: Path, tmp_path: Path) -> None:
    result = run("recover", held, "--mode", "salvage", "--into", tmp_path / "salvaged")
    assert result.exit_code == 0, result.output
    assert finished(bars(result.stderr)["replaying WAL"])
    plain = run("recover", held, progress=False)
    result = run("recover", tmp_path / "salvaged")  # nothing to replay there: no bar needed
    assert result.exit_code == 0
    assert "replaying WAL" not in plain.stderr  # off: no bar at all
    result = run("replay", held, "--records")
    assert result.exit_code == 0
    states = bars(result.stderr)["replaying"]
    assert finished(states) and states[-1]["total"] == "2,000 LSNs"
    assert result.stdout == run("replay", held, "--records", progress=False).stdout


def test_recovery_on_open_shows_the_wal_replay(held: Path) -> None:
    result = run("recover", held)
    assert result.exit_code == 0, result.output
    assert finished(bars(result.stderr)["replaying WAL"])


def test_snapshot_and_compact_show_their_copies(held: Path, tmp_path: Path) -> None:
    result = run("snapshot", "create", held)
    assert result.exit_code == 0, result.output
    phases = bars(result.stderr)
    assert finished(phases["copying LMDB"]) and finished(phases["hashing data.mdb"])
    assert finished(phases["replaying WAL"])  # the writer open recovered the held WAL first
    snap_id = result.stdout.split()[1]
    result = run("snapshot", "restore", held, snap_id, "--into", tmp_path / "r")
    assert result.exit_code == 0
    assert finished(bars(result.stderr)["copying data.mdb"])
    result = run("compact", held)
    assert result.exit_code == 0
    assert finished(bars(result.stderr)["copying LMDB compactly"])


def test_point_in_time_restore_shows_the_roll_forward(held: Path, tmp_path: Path) -> None:
    with Store.open(held, readonly=True) as store:
        snap = store.list_snapshots()[0]
    result = run("snapshot", "restore", held, snap.id, "--into", tmp_path / "r",
                 "--to-lsn", 1500)
    assert result.exit_code == 0, result.output
    states = bars(result.stderr)["rolling forward to LSN 1500"]
    assert finished(states) and states[-1]["total"] == "1,000 LSNs"
