"""Bad arguments to every command that takes a store: a missing path, a directory that is not a
store, a store of a newer format, an LSN out of range, a store locked by a live writer. Each
gets a clear message and the exit code of DESIGN §9, and nothing on disk changes."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tests.helpers import files_of
from xpstore import Store
from xpstore.cli import main

# argv after the store path, per command: enough to get past click's own parsing
COMMANDS: dict[str, list[str]] = {
    "put": ['{"kind": "prediction", "predicted": "a", "confidence": 0.5, "context": "c"}'],
    "ingest": ["-"],
    "get": ["1"],
    "scan": [],
    "sample": [],
    "stats": [],
    "wal inspect": [],
    "verify": [],
    "replay": [],
    "compact": [],
    "retention": [],
    "recover": [],
    "snapshot create": [],
    "snapshot list": [],
    "snapshot restore": ["nosuch", "--into", "{tmp}/restored"],
    "snapshot prune": ["--keep", "1"],
    "similar": ["t1"],
    "index status": [],
    "index rebuild": [],
    "learn report": [],
    "learn step": [],
    "learn reset": [],
    "validate": [],
    "health": [],
    "metrics": [],
    "report": ["--out", "{tmp}/report"],
    "serve": ["--writable", "--port", "0"],  # writable: refused at once when locked
    "export": ["--out", "{tmp}/exported"],
    "sync milvus": ["--uri", "{tmp}/milvus.db"],
    "sync status": ["--uri", "{tmp}/milvus.db"],
    "profile": [],
    "tune status": [],
    "tune run": [],
    "tune enable": [],
    "tune disable": [],
    "tune history": [],
}
# commands that only read: a live writer does not stop them
READ_ONLY_OK_WHEN_LOCKED = {"get", "scan", "sample", "stats", "wal inspect", "verify", "replay",
                            "snapshot list", "snapshot restore",  # restore writes elsewhere
                            "similar", "index status", "learn report", "profile",
                            "tune history", "health", "metrics", "report",
                            "export", "sync milvus", "sync status"}  # read-only opens  # fmt: skip


def _leaves(group: click.Group = main, prefix: str = "") -> list[str]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.extend(_leaves(command, f"{prefix}{name} "))
        else:
            out.append(f"{prefix}{name}")
    return out


def _argv(command: str, path: Path, tmp: Path) -> list[str]:
    extra = [a.replace("{tmp}", str(tmp)) for a in COMMANDS[command]]
    return [*command.split(), str(path), *extra]




def test_the_table_covers_every_command_that_takes_a_store() -> None:
    assert set(_leaves()) - {"init", "demo", "learn simulate"} == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_path_and_not_a_store(tmp_path: Path, command: str) -> None:
    runner = CliRunner()
    missing = tmp_path / "nothing"
    result = runner.invoke(main, _argv(command, missing, tmp_path), input="")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "not an xpstore store" in result.output
    assert not missing.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    result = runner.invoke(main, _argv(command, plain, tmp_path), input="")
    assert result.exit_code == 2, result.output
    assert files_of(plain) == {"notes.txt": b"hello"}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_newer_format_version(tmp_path: Path, command: str) -> None:
    path = tmp_path / "store"
    Store.open(path, create=True).close()
    marker = path / "xpstore.json"
    data = json.loads(marker.read_text())
    data["format_version"] = 99
    marker.write_text(json.dumps(data))
    before = files_of(path)
    result = CliRunner().invoke(main, _argv(command, path, tmp_path), input="")
    assert result.exit_code == 2, result.output
    assert "99" in result.output
    assert files_of(path) == before


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_locked_store(tmp_path: Path, command: str) -> None:
    path = tmp_path / "store"
    with Store.open(path, create=True) as store:
        store.put({"kind": "prediction", "predicted": "a", "confidence": 0.5, "context": "c"})
        store.flush()
        result = CliRunner().invoke(main, _argv(command, path, tmp_path), input="")
        if command in READ_ONLY_OK_WHEN_LOCKED:
            assert result.exit_code in (0, 1), result.output  # 1: get of a missing id etc.
            assert "is locked" not in result.output
        else:
            assert result.exit_code == 3, result.output
            assert "is locked" in result.output and "pid" in result.output


@pytest.mark.parametrize(
    "argv",
    [
        ["replay", "{path}", "--from-lsn", "-1"],
        ["replay", "{path}", "--from-lsn", "5", "--to-lsn", "2"],
        ["recover", "{path}", "--mode", "point_in_time", "--to-lsn", "-3"],
        ["snapshot", "restore", "{path}", "x", "--into", "{tmp}/r", "--to-lsn", "-1"],
        ["get", "{path}", "-5"],
    ],
)
def test_lsn_out_of_range(tmp_path: Path, argv: list[str]) -> None:
    path = tmp_path / "store"
    Store.open(path, create=True).close()
    before = files_of(path)
    args = [a.replace("{path}", str(path)).replace("{tmp}", str(tmp_path)) for a in argv]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert files_of(path) == before
