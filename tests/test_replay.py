"""`xpstore replay` and `persistence.replay.replay`: LSN order, filters, the LMDB part of a
partly checkpointed WAL, salvage around damage (files untouched), CSV, bad arguments."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from tests.helpers import files_of, segments
from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_mixed
from xpstore.model.records import (
    Fingerprint,
    PredictionOutcome,
    Record,
    kind_of,
    record_to_json,
)
from xpstore.ops.replay import ReplayItem, ReplayStream, replay
from xpstore.persistence.wal_format import Frame
from xpstore.persistence.wal_reader import scan_segment

T0 = 1_690_000_000.0
MAX_FRAME = 64 * 1024 * 1024

# the store's root, the records put (in order), and the ids of the updated and deleted records
Held = tuple[Path, list[Record], dict[str, int]]


def run(*args: Any) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def originals(n: int, seed: int = 11) -> list[Record]:
    return make_mixed(np.random.default_rng(seed), n, t0=T0)


def write(store: Store, records: list[Record], batch: int = 40) -> list[int]:
    ids: list[int] = []
    for start in range(0, len(records), batch):
        ids += store.put_many(records[start : start + batch])
    return ids






def frames_of(seg: Path) -> list[Frame]:
    scan = scan_segment(seg, seg.read_bytes(), MAX_FRAME)
    assert scan.error is None
    return scan.frames


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def items_of(root: Path, **kw: Any) -> tuple[list[ReplayItem], ReplayStream]:
    with replay(root, **kw) as stream:
        items = list(stream)
    return items, stream


@pytest.fixture
def held(tmp_path: Path) -> Held:
    """Everything in the WAL: 600 puts, then an update, a delete and a delete_track."""
    root = tmp_path / "held"
    recs = originals(600)
    with Store.open(root, create=True, hold_applier=True, segment_max_bytes=64 * 1024) as store:
        ids = write(store, recs)
        pred = next(i for i, r in zip(ids, recs, strict=True) if isinstance(r, PredictionOutcome))
        fp = next(r for r in recs if isinstance(r, Fingerprint))
        store.update(pred, actual="warm")
        store.delete(ids[1])
        store.delete_track(fp.track_id)
    assert len(segments(root)) >= 3
    return root, recs, {"pred": pred, "deleted": ids[1]}


# ------------------------------------------------------------------------ order and content


def test_replay_streams_every_operation_in_lsn_order(held: Held) -> None:
    root, recs, ids = held
    before = files_of(root)
    items, stream = items_of(root)
    assert [i.lsn for i in items] == list(range(1, 604))
    assert all(i.source == "wal" for i in items)
    puts = items[:600]
    assert [i.op for i in puts] == ["put"] * 600
    for item, rec in zip(puts, recs, strict=True):
        assert item.data == record_to_json(rec)  # the fast path equals the model's JSON
        assert item.id == item.lsn and item.kind == item.data["kind"]
        assert item.ts == rec.ts
    assert puts[5].record == recs[5]  # validated model on demand
    commits = [i.commit_time for i in items]
    assert all(c is not None for c in commits) and commits == sorted(commits)  # type: ignore[type-var]
    upd, dele, dtrack = items[600:]
    assert (upd.op, upd.id, upd.kind, upd.data) == ("update", ids["pred"], "prediction",
                                                    {"actual": "warm"})
    assert (dele.op, dele.id, dele.kind) == ("delete", ids["deleted"], kind_of(recs[1]))
    assert dtrack.op == "delete_track" and dtrack.kind == "fingerprint" and dtrack.track_id
    assert stream.gaps == [] and not stream.lost
    assert files_of(root) == before


def test_replay_filters(held: Held) -> None:
    root, recs, _ids = held
    preds, _ = items_of(root, kinds=["prediction"])
    assert preds and all(i.kind == "prediction" for i in preds)
    assert {i.op for i in preds} == {"put", "update"} | (
        {"delete"} if isinstance(recs[1], PredictionOutcome) else set()
    )
    window, _ = items_of(root, from_lsn=10, to_lsn=20)
    assert [i.lsn for i in window] == list(range(10, 21))
    since, until = recs[100].ts, recs[200].ts
    timed, _ = items_of(root, since=since, until=until)
    assert timed and all(since <= i.ts < until for i in timed)  # type: ignore[operator]
    assert {i.lsn for i in timed if i.op == "put"} == {
        n + 1 for n, r in enumerate(recs) if since <= r.ts < until  # type: ignore[operator]
    }
    assert not any(i.op == "delete_track" for i in timed)  # no ts: dropped by a time filter
    both, _ = items_of(root, kinds=["fingerprint", "query_metric"], to_lsn=50)
    assert {i.kind for i in both} <= {"fingerprint", "query_metric"}
    assert max(i.lsn for i in both) <= 50


def test_cli_jsonl_records_are_reingestable(held: Held, tmp_path: Path) -> None:
    root, recs, _ids = held
    result = run("replay", root, "--records")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 600 and json.loads(lines[0]) == record_to_json(recs[0])
    (tmp_path / "all.jsonl").write_text(result.stdout)
    copy = tmp_path / "copy"
    assert run("init", copy).exit_code == 0
    assert run("ingest", copy, tmp_path / "all.jsonl").exit_code == 0
    with Store.open(copy, readonly=True) as store:
        assert [e.record for e in store.scan()] == sorted(recs, key=lambda r: r.ts)  # type: ignore[arg-type, return-value]

    ops = [json.loads(x) for x in run("replay", root, "--from-lsn", 599).stdout.splitlines()]
    assert [o["op"] for o in ops] == ["put", "put", "update", "delete", "delete_track"]
    assert ops[0]["record"] == record_to_json(recs[598]) and ops[0]["source"] == "wal"


def test_cli_csv_flattens_fields(held: Held) -> None:
    root, recs, _ids = held
    result = run("replay", root, "--format", "csv", "--to-lsn", 60)
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 60
    assert "batch.tempo_bpm" in rows[0] and "streaming.values.tempo_bpm" in rows[0]
    n, fp = next((k, r) for k, r in enumerate(recs[:60]) if isinstance(r, Fingerprint))
    row = rows[n]
    assert row["kind"] == "fingerprint" and int(row["lsn"]) == n + 1
    assert fp.batch is not None and float(row["batch.tempo_bpm"]) == fp.batch.tempo_bpm
    assert row["track_id"] == fp.track_id
    p, pred = next((k, r) for k, r in enumerate(recs[:60]) if isinstance(r, PredictionOutcome))
    assert rows[p]["batch.tempo_bpm"] == "" and rows[p]["predicted"] == pred.predicted


# ------------------------------------------------------------------------ partly checkpointed


def test_replay_of_a_partly_checkpointed_store(tmp_path: Path) -> None:
    root = tmp_path / "s"
    first, second = originals(300, seed=1), originals(200, seed=2)
    with Store.open(root, create=True, segment_max_bytes=64 * 1024) as store:
        ids_a = write(store, first)
        store.flush()  # apply and checkpoint: the early segments are deleted
    with Store.open(root, hold_applier=True) as store:  # the rest stays in the WAL only
        ids_b = write(store, second)
        if isinstance(first[2], PredictionOutcome):
            store.update(ids_a[2], actual="bright")
        else:
            store.delete(ids_a[2])
    wal_first = min(int(p.stem) for p in segments(root))
    assert wal_first > 1
    before = files_of(root)

    items, stream = items_of(root)
    lsns = [i.lsn for i in items]
    assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
    lmdb_part = [i for i in items if i.source == "lmdb"]
    wal_part = [i for i in items if i.source == "wal"]
    assert lmdb_part and wal_part
    assert max(i.lsn for i in lmdb_part) < min(i.lsn for i in wal_part)
    assert all(i.op == "put" and i.commit_time is None for i in lmdb_part)
    assert {i.id for i in items if i.op == "put"} == set(ids_a) | set(ids_b)
    by_id = {i.id: i for i in items if i.op == "put"}
    for rid, rec in zip(ids_a + ids_b, first + second, strict=True):
        assert by_id[rid].data == record_to_json(rec)
    assert stream.gaps == []
    assert files_of(root) == before

    result = run("replay", root)
    assert result.exit_code == 0
    assert "current state" in result.stderr
    assert [json.loads(x)["lsn"] for x in result.stdout.splitlines()] == lsns


# ------------------------------------------------------------------------ damage


def test_replay_skips_a_damaged_frame_reports_the_gap_and_continues(held: Held) -> None:
    root, _recs, _ids = held
    seg = segments(root)[1]
    hit = frames_of(seg)[1]
    flip(seg, hit.offset + 40)
    before = files_of(root)

    items, stream = items_of(root)
    lsns = [i.lsn for i in items]
    lost = set(range(hit.first_lsn, hit.last_lsn + 1))
    assert lsns == [n for n in range(1, 604) if n not in lost]
    assert len(stream.gaps) == 1
    gap = stream.gaps[0]
    assert gap.where == f"wal/{seg.name}+{hit.offset}" and gap.reason == "crc_mismatch"
    assert (gap.first_lsn, gap.last_lsn) == (hit.first_lsn, hit.last_lsn)
    assert gap.lost and gap.from_lmdb is None and stream.lost

    result = run("replay", root)
    assert result.exit_code == 1
    assert f"gap at wal/{seg.name}+{hit.offset}" in result.stderr
    assert f"LSNs {hit.first_lsn}..{hit.last_lsn}" in result.stderr
    assert len(result.stdout.splitlines()) == len(items)
    as_json = run("replay", root, "--json")
    gaps = [json.loads(x)["gap"] for x in as_json.stderr.splitlines() if '"gap"' in x]
    assert gaps[0]["where"] == gap.where and gaps[0]["lost"]
    assert files_of(root) == before


def test_damage_inside_applied_lsns_is_filled_from_lmdb(tmp_path: Path) -> None:
    root = tmp_path / "kept"
    recs = originals(300)
    with Store.open(root, create=True, segment_max_bytes=64 * 1024,
                    wal_retain_segments=100) as store:
        write(store, recs)
        store.flush()
    seg = segments(root)[0]
    hit = frames_of(seg)[2]
    flip(seg, hit.offset + 40)

    items, stream = items_of(root)
    assert [i.lsn for i in items] == list(range(1, 301))
    filled = [i for i in items if hit.first_lsn <= i.lsn <= hit.last_lsn]
    assert filled and all(i.source == "lmdb" for i in filled)
    assert all(i.data == record_to_json(recs[i.lsn - 1]) for i in filled)
    (gap,) = stream.gaps
    assert gap.from_lmdb == (hit.first_lsn, hit.last_lsn) and not gap.lost
    result = run("replay", root)
    assert result.exit_code == 0 and "taken from LMDB" in result.stderr


def test_torn_tail_is_reported_not_lost(held: Held) -> None:
    root, _recs, _ids = held
    last = segments(root)[-1]
    tail = frames_of(last)[-1]
    os.truncate(last, tail.offset + 30)
    items, stream = items_of(root)
    assert items[-1].lsn == tail.first_lsn - 1
    (gap,) = stream.gaps
    assert gap.torn and not gap.lost and gap.first_lsn == tail.first_lsn
    result = run("replay", root)
    assert result.exit_code == 0 and "torn tail" in result.stderr


# ------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    ("cmd", "rest"),
    [(("replay",), ()), (("verify",), ()), (("wal", "inspect"), ()),
     (("replay",), ("--format", "csv"))],
)
def test_bad_paths_exit_2_and_modify_nothing(
    tmp_path: Path, cmd: tuple[str, ...], rest: tuple[str, ...]
) -> None:
    missing = run(*cmd, tmp_path / "nope", *rest)
    assert missing.exit_code == 2 and "not an xpstore store" in missing.stderr
    assert not (tmp_path / "nope").exists()

    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    result = run(*cmd, plain, *rest)
    assert result.exit_code == 2 and "not an xpstore store" in result.stderr
    assert sorted(p.name for p in plain.iterdir()) == ["notes.txt"]

    newer = tmp_path / "newer"
    Store.open(newer, create=True).close()
    marker = newer / "xpstore.json"
    data = json.loads(marker.read_text())
    data["format_version"] = 99
    marker.write_text(json.dumps(data))
    before = files_of(newer)
    result = run(*cmd, newer, *rest)
    assert result.exit_code == 2 and "format 99" in result.stderr
    assert files_of(newer) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--from-lsn", "-1"), "--from-lsn -1 is out of range"),
        (("--to-lsn", "-5"), "--to-lsn -5 is out of range"),
        (("--from-lsn", "10", "--to-lsn", "5"), "--from-lsn 10 is after --to-lsn 5"),
        (("--format", "csv", "--records"), "--records applies to --format jsonl only"),
        (("--since", "yesterday"), "neither seconds since the epoch nor an ISO 8601"),
        (("--kind", "nonsense"), "nonsense"),
    ],
)
def test_bad_replay_arguments_exit_2(held: Held, args: tuple[str, ...], message: str) -> None:
    root, _recs, _ids = held
    before = files_of(root)
    result = run("replay", root, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert files_of(root) == before


def test_library_range_errors() -> None:
    from xpstore.errors import InvalidRecordError

    for kw in ({"from_lsn": -1}, {"from_lsn": 5, "to_lsn": 4}, {"kinds": ["bogus"]},
               {"since": 5.0, "until": 5.0}):
        with pytest.raises(InvalidRecordError):
            replay("/nonexistent", **kw)


def test_replay_beyond_the_end_is_empty_not_an_error(held: Held) -> None:
    root, _recs, _ids = held
    result = run("replay", root, "--from-lsn", 10_000)
    assert result.exit_code == 0 and result.stdout == ""
