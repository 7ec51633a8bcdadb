"""The demo: similar tracks a person can judge, then a real child writer is SIGKILLed mid-stream
and nothing it acknowledged is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from xpstore import RecordNotFoundError, Store
from xpstore.cli import main
from xpstore.demo.crashwriter import record_for
from xpstore.demo.run import DemoResult, SimilarReport, run_demo
from xpstore.demo.synthetic import STYLES


def test_run_demo_loses_nothing_acknowledged(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(
        tmp_path / "xp", seed=3, records=300, tracks=1200, crash_after=120, echo=lines.append
    )
    assert isinstance(result, DemoResult)
    assert result.acked >= 120
    assert result.lost == [] and result.mismatched == [] and result.damaged_before == []
    assert result.recovered >= result.acked
    # checked after the crash: phase 1's 300 records and phase 2's 1200-track library
    assert result.written == 300 and result.checked_before == 1500
    assert sum(result.counts.values()) == 300
    assert result.ok
    assert lines[-1].startswith("== OK: nothing acknowledged was lost")
    assert any("SIGKILL" in line for line in lines)
    # docs/cli.md shows a real run's output: the same sections, in the same order (issue 14:
    # the pasted output had lost the similar-tracks phase)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    shown = docs.split("$ xpstore demo\n", 1)[1].split("```", 1)[0].splitlines()
    assert [h.split(":")[0] for h in shown if h.startswith("==")] == [
        h.split(":")[0] for h in lines if h.startswith("==")
    ]
    # the demo's own check, repeated independently: the last ACKed record of thread 0 is there
    with Store.open(tmp_path / "xp") as store:
        first_child = [e for e in store.scan() if e.ts >= 1_700_000_000.0]
        assert len(first_child) == result.recovered
        thread0 = sorted((e for e in first_child if e.ts < 1_701_000_000.0), key=lambda e: e.ts)
        if thread0:
            seq = int(thread0[-1].ts - 1_700_000_000.0)
            assert thread0[-1].record == record_for(3, 0, seq)


def test_run_demo_similar_tracks_cluster_by_style(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(
        tmp_path / "xp", seed=3, records=300, tracks=1200, crash_after=20, echo=lines.append
    )
    assert result.ok
    sim = result.similar
    assert isinstance(sim, SimilarReport)
    assert sim.tracks == 1200
    assert sim.kind == "hnsw"  # the demo session builds HNSW from 1000 tracks
    assert sim.recall_at_10 is not None and sim.recall_at_10 >= 0.9
    # the index holds the library and phase 1's fingerprinted tracks, all with a style
    assert set(sim.style_counts) == set(STYLES)
    assert sim.indexed == sum(sim.style_counts.values()) > 1200
    base = max(sim.style_counts.values()) / sim.indexed
    assert base < 0.2
    # the shown lookup: 10 other tracks, best first, mostly of the query's style
    assert sim.query.startswith("lib-") and sim.query not in sim.neighbors
    assert len(sim.neighbors) == len(set(sim.neighbors)) == 10
    assert sim.scores == sorted(sim.scores, reverse=True)
    assert sim.same_style == sim.neighbor_styles.count(sim.query_style) / 10
    assert sim.base_rate == sim.style_counts[sim.query_style] / sim.indexed
    assert sim.same_style >= 0.6 > 3 * sim.base_rate  # seed 3's query: a techno track
    # over many queries, neighbours share the query's style far above any base rate
    assert sim.sample_queries == 200
    assert sim.sample_same_style >= 0.6 and sim.sample_same_style > 4 * base
    assert sim.sample_by_style["metal"] >= 0.9 and sim.sample_by_style["drum_and_bass"] >= 0.9
    # a lookup by raw values finds tracks of the style those values are typical of
    assert set(sim.raw_query) <= {"tempo_bpm", "lufs", "crest_db", "bass_mid_ratio",
                                  "transient_density"}  # fmt: skip
    assert sim.raw_style != sim.query_style
    assert sim.raw_styles.count(sim.raw_style) >= 6
    # the precomputed list comes from the index build and agrees with the live answer
    assert len(sim.precomputed) == 10
    assert set(sim.precomputed_builds) == {sim.build_id}
    assert len(set(sim.precomputed) & set(sim.neighbors)) >= 8
    # the deleted best neighbour is gone from both answers at once, the rest still there
    assert sim.deleted == sim.neighbors[0]
    assert sim.deleted not in sim.after_delete
    assert sim.deleted not in sim.after_delete_precomputed
    assert len(sim.after_delete) == 10
    assert set(sim.neighbors[1:]) <= set(sim.after_delete)
    assert sim.after_delete_precomputed == [t for t in sim.precomputed if t != sim.deleted]
    assert set(result.timings) == {"write", "similar", "crash", "recover", "verify", "learn",
                                   "total"}
    text = "\n".join(lines)
    assert "== phase 2: similar tracks: a library of 1200 generated tracks in 8 styles" in text
    assert f"neighbours are {sim.query_style}, like the query" in text
    assert "STILL IN AN ANSWER" not in text
    # independently, after the crash and recovery: a fresh session's index agrees
    with Store.open(tmp_path / "xp") as store:
        with pytest.raises(RecordNotFoundError):
            store.get_fingerprint(sim.deleted)
        again = store.similar(sim.query, k=10)
        assert len(again) == 10 and sim.deleted not in [n.track_id for n in again]
        styles = [(n.metadata or {}).get("style") for n in again]
        assert styles.count(sim.query_style) >= 5


def test_run_demo_with_held_applier_replays_every_acknowledged_op(tmp_path: Path) -> None:
    result = run_demo(
        tmp_path / "xp", seed=4, records=50, tracks=0, crash_after=60, hold_applier=True
    )
    assert result.ok
    assert result.similar is None and "similar" not in result.timings  # tracks=0: no phase 2
    assert result.checked_before == 50
    # the child applied nothing to LMDB, so every one of its operations came back from the WAL
    assert result.replayed_ops == result.recovered >= result.acked
    assert result.recovery["mode"] == "tolerate_tail"


def test_run_demo_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        run_demo(tmp_path, records=10)


def test_run_demo_refuses_a_tiny_library(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tracks must be 0"):
        run_demo(tmp_path / "xp", records=10, tracks=50)
    assert not (tmp_path / "xp").exists()


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
    assert set(data["timings"]) == {"write", "similar", "crash", "recover", "verify", "learn",
                                    "total"}
    sim = data["similar"]  # the CLI's default library: 3000 tracks
    assert sim["tracks"] == 3000 and sim["kind"] == "hnsw"
    assert sim["sample_same_style"] >= 0.6
    assert sim["deleted"] and sim["deleted"] not in sim["after_delete"]


def test_demo_command_text_into_a_path(tmp_path: Path) -> None:
    path = tmp_path / "xp"
    result = CliRunner().invoke(
        main, ["demo", str(path), "--records", "100", "--crash-after", "30"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "== phase 1: writing 100 synthetic records" in out
    assert "== phase 2: similar tracks: a library of 3000 generated tracks in 8 styles" in out
    assert "title" in out and "artist" in out and "neighbours are" in out
    assert "precomputed=True" in out and "gone at once from the live answer" in out
    assert "killed with SIGKILL" in out
    assert "every acknowledged record present and equal" in out
    assert (path / "xpstore.json").exists()  # a given PATH is kept
    again = CliRunner().invoke(main, ["demo", str(path)])
    assert again.exit_code == 2
    assert "not empty" in again.stderr
