"""``xpstore similar`` and ``xpstore index status|rebuild`` through click's CliRunner, on a real
store of 300 synthetic fingerprints (real LMDB, real FAISS, files on tmp_path)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import STYLES, make_fingerprint

N_TRACKS = 300
STATUS_KEYS = {"kind", "size", "delta", "tombstones", "lsn", "build_id", "recall_at_10"}


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with N_TRACKS fingerprints, styles in turn; no index build has run yet."""
    path = tmp_path_factory.mktemp("cli-index") / "xp"
    rng = np.random.default_rng(7)
    styles = list(STYLES)
    fps = [make_fingerprint(rng, f"t{i:04d}", styles[i % len(styles)]) for i in range(N_TRACKS)]
    with Store.open(path, create=True, durability="none", index_auto_rebuild=False) as store:
        store.put_many(fps)
    return path


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A small store of its own, for tests that rebuild (the module's store stays unbuilt)."""
    path = tmp_path / "xp"
    rng = np.random.default_rng(3)
    fps = [make_fingerprint(rng, f"f{i:03d}", "techno" if i % 2 else "jazz") for i in range(120)]
    with Store.open(path, create=True, durability="none", index_auto_rebuild=False) as store:
        store.put_many(fps)
    return path


def status_json(path: Path, *extra: str) -> dict[str, Any]:
    result = run("index", "status", path, "--json", *extra)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


# ---------------------------------------------------------------------------- similar


def test_similar_json(library: Path) -> None:
    result = run("similar", library, "t0003", "-k", 7, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["query"] == "t0003" and data["k"] == 7
    hits = data["neighbors"]
    assert len(hits) == 7
    assert "t0003" not in {h["track_id"] for h in hits}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 + 1e-5 for s in scores)
    for h in hits:
        assert set(h) == {"track_id", "score", "record_id", "metadata", "build_id"}
        assert h["build_id"] is None  # a live search
        assert set(h["metadata"]) >= {"title", "artist", "style"}
    # the same answers as the library call
    with Store.open(library, readonly=True) as store:
        expected = store.similar("t0003", k=7)
    assert [h["track_id"] for h in hits] == [n.track_id for n in expected]
    assert [h["record_id"] for h in hits] == [n.record_id for n in expected]


def test_similar_table(library: Path) -> None:
    result = run("similar", library, "t0010", "-k", 4)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["rank", "track_id", "score", "title", "artist", "style"]
    assert len(lines) == 5
    data = json.loads(run("similar", library, "t0010", "-k", 4, "--json").stdout)
    for rank, (line, hit) in enumerate(zip(lines[1:], data["neighbors"], strict=True), start=1):
        cells = line.split()
        assert cells[0] == str(rank)
        assert cells[1] == hit["track_id"]
        assert cells[2] == f"{hit['score']:.3f}"
        assert cells[-1] == hit["metadata"]["style"]
        assert hit["metadata"]["title"] in line and hit["metadata"]["artist"] in line
    assert "t0010" not in {line.split()[1] for line in lines[1:]}


def test_similar_where_filters_on_metadata(library: Path) -> None:
    # t0001 is ambient; ask for techno tracks only
    result = run(
        "similar", library, "t0001", "-k", 5, "--where", "metadata.style=techno", "--json"
    )
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)["neighbors"]
    assert len(hits) == 5
    assert {h["metadata"]["style"] for h in hits} == {"techno"}
    both = run(
        "similar", library, "t0001", "--where", "metadata.style=techno",
        "--where", "metadata.title__ne=nothing", "--json",
    )  # fmt: skip
    assert both.exit_code == 0, both.output
    assert {h["metadata"]["style"] for h in json.loads(both.stdout)["neighbors"]} == {"techno"}


def test_similar_readonly_beside_a_writer(library: Path) -> None:
    with Store.open(library, index_auto_rebuild=False):
        result = run("similar", library, "t0005", "-k", 3, "--json")
        assert result.exit_code == 0, result.output
        assert len(json.loads(result.stdout)["neighbors"]) == 3
        forced = run("similar", library, "t0005", "-k", 3, "--readonly", "--json")
        assert forced.exit_code == 0, forced.output
        assert json.loads(forced.stdout) == json.loads(result.stdout)


def test_similar_unknown_track_is_exit_1(library: Path) -> None:
    result = run("similar", library, "no-such-track")
    assert result.exit_code == 1
    assert "error:" in result.output and "no-such-track" in result.output


@pytest.mark.parametrize("k", [0, -3])
def test_similar_k_below_1_is_exit_2(library: Path, k: int) -> None:
    result = run("similar", library, "t0003", "-k", k)
    assert result.exit_code == 2
    assert "-k" in result.output


def test_similar_bad_where_is_exit_2(library: Path) -> None:
    for bad in ("metadata.style", "metadata..style=x"):
        result = run("similar", library, "t0003", "--where", bad)
        assert result.exit_code == 2, result.output
        assert "where" in result.output


def test_precomputed_before_any_build_is_exit_1(library: Path) -> None:
    result = run("similar", library, "t0003", "--precomputed")
    assert result.exit_code == 1
    assert "precomputed" in result.output and "t0003" in result.output


# ---------------------------------------------------------------------------- index


def test_index_status_before_a_build(library: Path) -> None:
    data = status_json(library)
    assert set(data) >= STATUS_KEYS
    assert data["build_id"] is None and data["kind"] is None
    assert data["size"] == 0
    assert data["delta"] == N_TRACKS
    assert data["tombstones"] == 0
    text = run("index", "status", library)
    assert text.exit_code == 0, text.output
    lines = dict(line.split(":", 1) for line in text.stdout.splitlines())
    assert lines["delta"].strip() == str(N_TRACKS)
    assert lines["build_id"].strip() == "-"


def test_rebuild_then_status_and_precomputed(fresh: Path) -> None:
    result = run("index", "rebuild", fresh, "--json")
    assert result.exit_code == 0, result.output
    built = json.loads(result.stdout)
    assert built["build_id"] is not None and built["kind"] == "exact"
    assert built["size"] == 120 and built["delta"] == 0
    assert built["recall_at_10"] == pytest.approx(1.0)
    assert "rebuilding the index" in result.stderr

    data = status_json(fresh, "--readonly")
    assert set(data) >= STATUS_KEYS
    assert data["build_id"] == built["build_id"]
    assert data["kind"] == "exact" and data["size"] == 120 and data["delta"] == 0
    assert data["lsn"] == built["lsn"] and data["file_bytes"] > 0

    text = run("index", "status", fresh)
    assert text.exit_code == 0, text.output
    lines = {k: v.strip() for k, v in (line.split(":", 1) for line in text.stdout.splitlines())}
    assert lines["kind"] == "exact" and lines["size"] == "120"
    assert lines["build_id"] == str(built["build_id"])

    pre = run("similar", fresh, "f001", "-k", 5, "--precomputed", "--json")
    assert pre.exit_code == 0, pre.output
    hits = json.loads(pre.stdout)["neighbors"]
    assert len(hits) == 5
    assert {h["build_id"] for h in hits} == {built["build_id"]}
    assert "f001" not in {h["track_id"] for h in hits}
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    live = json.loads(run("similar", fresh, "f001", "-k", 5, "--json").stdout)["neighbors"]
    assert [h["track_id"] for h in hits] == [h["track_id"] for h in live]

    # a second rebuild makes a newer build, text output this time
    again = run("index", "rebuild", fresh)
    assert again.exit_code == 0, again.output
    assert "kind:" in again.stdout and "build_id:" in again.stdout
    assert status_json(fresh)["build_id"] > built["build_id"]


def test_rebuild_of_a_locked_store_is_exit_3(fresh: Path) -> None:
    with Store.open(fresh):
        for argv in (["index", "rebuild", fresh], ["index", "rebuild", fresh, "--no-wait"]):
            result = run(*argv)
            assert result.exit_code == 3, result.output
            assert "is locked" in result.output
    assert not (fresh / "index" / "main.faiss").exists()


def test_rebuild_no_wait_runs_in_a_detached_process(fresh: Path) -> None:
    result = run("index", "rebuild", fresh, "--no-wait", "--json")
    assert result.exit_code == 0, result.output
    started = json.loads(result.stdout)
    assert started["started"] is True
    pid = started["pid"]
    log = Path(started["log"])
    try:
        _, status = os.waitpid(pid, 0)  # the command returned before its build finished
        assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
        text = log.read_text()
        assert "rebuilding the index" in text
        built = json.loads(text[text.index("\n{") :])  # the child's --json status
    finally:
        log.unlink(missing_ok=True)
    data = status_json(fresh)
    assert data["build_id"] == built["build_id"] is not None
    assert data["size"] == 120 and data["delta"] == 0
