"""The ``xpstore`` command line, through click's CliRunner (sqlite-utils style).

Every command's happy path with its output checked, the input-error paths of ``ingest``, the
exit-code policy (DESIGN §9), and a test that fails when a command is undocumented.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
from click.testing import CliRunner, Result

from xpstore import Store, StoreLockedError
from xpstore.cli import EXIT_CODES, exit_code_for, main
from xpstore.demo.synthetic import make_mixed
from xpstore.errors import (
    CodecError,
    FormatVersionError,
    InvalidRecordError,
    RecordNotFoundError,
    StoreCorruptionError,
    StoreNotFoundError,
    WALCorruptionError,
    WALWriteError,
)
from xpstore.model.records import PredictionOutcome, record_to_json

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

PREDICTION = {
    "kind": "prediction",
    "predicted": "punchy",
    "actual": "warm",
    "confidence": 0.8,
    "context": "warm_start",
    "audio_features": {"energy": 0.7},
    "ts": 1_700_000_000.0,
}


def run(*args: Any, input: str | None = None) -> Result:
    """Invoke the CLI in-process; exceptions the CLI does not expect propagate to the test."""
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def records(n: int, seed: int = 1) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [record_to_json(r) for r in make_mixed(rng, n, t0=1_690_000_000.0)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def count(path: Path) -> int:
    with Store.open(path) as store:
        return store.count()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    path = tmp_path / "xp"
    assert run("init", path, "--durability", "none").exit_code == 0
    return path


# ---------------------------------------------------------------------------- init


def test_init_creates_a_store(tmp_path: Path) -> None:
    path = tmp_path / "xp"
    result = run("init", path)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"created store {path} (durability=commit")
    assert (path / "xpstore.json").exists()
    assert count(path) == 0


def test_init_json_reports_the_persisted_config(tmp_path: Path) -> None:
    path = tmp_path / "xp"
    result = run("init", path, "--durability", "group", "--segment-max-bytes", 1 << 20, "--json")
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["path"] == str(path)
    assert data["config"]["durability"] == "group"
    assert data["config"]["segment_max_bytes"] == 1 << 20
    with Store.open(path) as store:  # persisted, not just this session's
        assert store.config.wal.durability == "group"
        assert store.config.wal.segment_max_bytes == 1 << 20


def test_init_refuses_an_existing_store(store_dir: Path) -> None:
    result = run("init", store_dir)
    assert result.exit_code == 2
    assert result.stderr == f"error: {store_dir} already is an xpstore store\n"


def test_init_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run("init", tmp_path)
    assert result.exit_code == 2
    assert "non-empty directory" in result.stderr and "notes.txt" in result.stderr
    assert not (tmp_path / "xpstore.json").exists()


def test_init_refuses_an_out_of_range_setting(tmp_path: Path) -> None:
    result = run("init", tmp_path / "xp", "--segment-max-bytes", 10)
    assert result.exit_code == 2
    # the option the user typed, not the API setting behind it (issue 14; it used to say
    # "error: config wal.segment_max_bytes: ...")
    assert "'--segment-max-bytes': 10 is not in the range 65536<=x<=4294967296" in result.stderr


# ---------------------------------------------------------------------------- put / get


def test_put_prints_the_id_and_get_prints_the_envelope(store_dir: Path) -> None:
    first = run("put", store_dir, json.dumps(PREDICTION))
    assert first.exit_code == 0
    assert first.stdout == "1\n"
    second = run("put", store_dir, json.dumps(PREDICTION), "--json")
    assert json.loads(second.stdout) == {"id": 2}

    got = run("get", store_dir, 1)
    assert got.exit_code == 0
    env = json.loads(got.stdout)
    assert env["id"] == 1
    assert env["kind"] == "prediction"
    assert env["updated_lsn"] == 1
    assert env["ts"] == PREDICTION["ts"]
    assert env["record"] == {k: v for k, v in PREDICTION.items() if k != "kind"}


def test_put_reads_stdin_and_fills_in_ts(store_dir: Path) -> None:
    rec = {k: v for k, v in PREDICTION.items() if k != "ts"}
    result = run("put", store_dir, "-", input=json.dumps(rec))
    assert result.exit_code == 0
    with Store.open(store_dir) as store:
        env = store.get(int(result.stdout))
    assert isinstance(env.record, PredictionOutcome)
    assert env.record.predicted == "punchy" and env.ts > 1_700_000_000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "error: JSON: bad JSON: "),
        ('{"kind": "prediction", "kind": "fingerprint"}', "duplicate key 'kind'"),
        ('{"kind": "prediction", "predicted": "x", "confidence": 1.5, "context": "c"}',
         "error: JSON: confidence: Input should be less than or equal to 1"),
        ('{"predicted": "x"}', "error: JSON: kind: missing"),
        ('[1, 2]', "a record must be a JSON object"),
        ('{"kind": "prediction", "predicted": "x", "confidence": 0.5, "context": "c", "x": 1}',
         "error: JSON: x: Extra inputs are not permitted"),
    ],
)
def test_put_rejects_bad_input_with_exit_2(store_dir: Path, text: str, message: str) -> None:
    result = run("put", store_dir, text)
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stdout == ""
    assert count(store_dir) == 0


def test_get_unknown_id_exits_1(store_dir: Path) -> None:
    result = run("get", store_dir, 99)
    assert result.exit_code == 1
    assert result.stderr == "error: no record with id 99\n"


def test_get_negative_id_is_a_usage_error(store_dir: Path) -> None:
    result = run("get", store_dir, "--", "-1")
    assert result.exit_code == 2


# ---------------------------------------------------------------------------- ingest


def test_ingest_writes_every_line_and_reports_the_ids(store_dir: Path, tmp_path: Path) -> None:
    rows = records(250)
    path = write_jsonl(tmp_path / "in.jsonl", [*rows[:100], "", *rows[100:]])  # a blank line
    result = run("ingest", store_dir, path, "--batch-size", 64)
    assert result.exit_code == 0
    assert result.stdout == f"wrote 250 records from {path} (ids 1..250)\n"
    assert count(store_dir) == 250


def test_ingest_json_summary_and_stdin(store_dir: Path) -> None:
    rows = records(10)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    result = run("ingest", store_dir, "-", "--json", input=text)
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {
        "file": "<stdin>", "written": 10, "first_id": 1, "last_id": 10, "bad_lines": [],
    }


def test_ingest_with_one_bad_line_writes_nothing(store_dir: Path, tmp_path: Path) -> None:
    run("put", store_dir, json.dumps(PREDICTION))
    rows: list[Any] = records(20)
    rows[12] = {"kind": "prediction", "predicted": "x", "confidence": 3.0, "context": "c"}
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run("ingest", store_dir, path)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{path}:13: confidence: Input should be less than or equal to 1")
    assert lines[-1] == (
        f"error: 1 bad line in {path}; nothing written (--partial writes the valid lines)"
    )
    assert result.stdout == ""
    assert count(store_dir) == 1  # unchanged


def test_ingest_reports_every_bad_line(store_dir: Path, tmp_path: Path) -> None:
    good = records(3)
    rows = [good[0], "{oops", good[1], {"kind": "bogus"}, "", {"kind": "fingerprint",
            "track_id": "t"}, good[2]]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run("ingest", store_dir, path, "--json")
    assert result.exit_code == 2
    assert [line.split(": ")[0] for line in result.stderr.splitlines()[:3]] == [
        f"{path}:2", f"{path}:4", f"{path}:6",
    ]
    assert f"{path}:4: kind: unknown record kind 'bogus'" in result.stderr
    assert f"{path}:6: batch: a fingerprint needs batch or streaming values" in result.stderr
    data = json.loads(result.stdout)
    assert data["written"] == 0
    assert [(b["line"], b["field"]) for b in data["bad_lines"]] == [
        (2, "json"), (4, "kind"), (6, "batch"),
    ]
    assert count(store_dir) == 0


def test_ingest_partial_writes_the_good_lines_and_still_exits_2(
    store_dir: Path, tmp_path: Path
) -> None:
    good = records(5)
    rows = [*good[:2], {"kind": "prediction"}, *good[2:]]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run("ingest", store_dir, path, "--partial")
    assert result.exit_code == 2
    assert result.stdout == f"wrote 5 records from {path} (ids 1..5); skipped 1 bad lines\n"
    assert result.stderr.startswith(f"{path}:3: predicted: Field required")
    assert count(store_dir) == 5


def test_ingest_missing_file_is_a_usage_error(store_dir: Path, tmp_path: Path) -> None:
    result = run("ingest", store_dir, tmp_path / "absent.jsonl")
    assert result.exit_code == 2


def test_ingest_batch_refused_by_the_store_names_the_lines(store_dir: Path, tmp_path: Path) -> None:
    fp = next(r for r in records(40) if r["kind"] == "fingerprint")
    rows = [dict(fp, embedding=[0.1, 0.2]), dict(fp, embedding=[0.1, 0.2, 0.3])]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = run("ingest", store_dir, path, "--batch-size", 1)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:2-2: batch refused: ")
    assert "1 records before it were written (ids 1..1)" in result.stderr


# ---------------------------------------------------------------------------- scan


@pytest.fixture
def filled(store_dir: Path, tmp_path: Path) -> Path:
    path = write_jsonl(tmp_path / "seed.jsonl", records(600, seed=5))
    assert run("ingest", store_dir, path).exit_code == 0
    return store_dir


def jsonl(result: Result) -> list[dict[str, Any]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_scan_output_reingested_gives_identical_records(filled: Path, tmp_path: Path) -> None:
    out = run("scan", filled)
    first = jsonl(out)
    assert len(first) == 600
    dump = tmp_path / "dump.jsonl"
    dump.write_text(out.stdout)
    other = tmp_path / "other"
    assert run("init", other).exit_code == 0
    assert run("ingest", other, dump).exit_code == 0
    assert jsonl(run("scan", other)) == first
    with Store.open(filled) as a, Store.open(other) as b:
        assert [e.record for e in a.scan()] == [e.record for e in b.scan()]


def test_scan_filters(filled: Path) -> None:
    where = ["--where", "context=warm_start", "--where", "audio_features.energy__gt=0.6"]
    rows = jsonl(run("scan", filled, "--kind", "prediction", *where))
    assert rows, "the seed data has warm_start predictions with energy > 0.6"
    for row in rows:
        assert row["kind"] == "prediction" and row["context"] == "warm_start"
        assert row["audio_features"]["energy"] > 0.6
    with Store.open(filled) as store:
        expected = store.scan(
            "prediction", where={"context": "warm_start", "audio_features.energy__gt": 0.6}
        )
        assert [e.to_json() for e in expected] == rows

    limited = jsonl(run("scan", filled, "--kind", "query_metric", "--limit", 3))
    assert len(limited) == 3 and {r["kind"] for r in limited} == {"query_metric"}

    listed = jsonl(run("scan", filled, "--where", 'kind__in=["fingerprint","query_metric"]'))
    assert listed and {r["kind"] for r in listed} == {"fingerprint", "query_metric"}


def test_scan_time_range_and_iso_dates(filled: Path) -> None:
    every = jsonl(run("scan", filled))
    t_lo, t_hi = every[100]["ts"], every[200]["ts"]
    rows = jsonl(run("scan", filled, "--since", repr(t_lo), "--until", repr(t_hi)))
    assert rows == every[100:200]
    # 1_690_000_000 is 2023-07-22T04:26:40Z; the seed data starts just after it
    iso = jsonl(run("scan", filled, "--since", "2023-07-22T04:26:40", "--limit", 1))
    assert iso == every[:1]
    assert jsonl(run("scan", filled, "--until", "2023-07-22T04:26:40+00:00")) == []


def test_scan_envelope(filled: Path) -> None:
    rows = jsonl(run("scan", filled, "--envelope", "--limit", 2))
    assert [set(r) for r in rows] == [
        {"id", "kind", "ts", "updated_lsn", "retrieval_count", "success_count", "record"}
    ] * 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--where", "nofield=1"], "error: where: 'nofield' names no field"),
        (["--where", "confidence__near=1"], "unknown operator '__near'"),
        (["--where", "context__in=warm_start"], "needs a list of values"),
        (["--where", "missing-equals"], "expected PATH[__OP]=VALUE"),
        (["--since", "yesterday"], "neither seconds since the epoch nor an ISO 8601"),
        (["--kind", "bogus"], "'bogus' is not one of"),
    ],
)
def test_scan_bad_arguments_exit_2(store_dir: Path, args: list[str], message: str) -> None:
    result = run("scan", store_dir, *args)
    assert result.exit_code == 2
    assert message in result.stderr


# ---------------------------------------------------------------------------- stats


def test_stats_table_and_json(filled: Path) -> None:
    with Store.open(filled) as store:
        counts = {k: store.count(k) for k in ("prediction", "fingerprint", "query_metric",
                                              "decision")}
    data = json.loads(run("stats", filled, "--json").stdout)
    assert data["counts"] == counts
    assert data["total"] == 600
    assert data["durability"] == "none"

    text = run("stats", filled).stdout
    assert re.search(r"^counts\.prediction +" + f"{counts['prediction']:,}$", text, re.M)
    assert re.search(r"^total +600$", text, re.M)
    assert re.search(r"^durability +none$", text, re.M)


def test_stats_reports_a_recovery_replay(tmp_path: Path) -> None:
    path = tmp_path / "xp"
    with Store.open(path, create=True, hold_applier=True) as store:
        store.put(PREDICTION)  # acknowledged in the WAL, never applied to LMDB
    data = json.loads(run("stats", path, "--json").stdout)
    assert data["counts"]["prediction"] == 1
    assert data["recovery"]["replayed_ops"] == 1


# ---------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "argv",
    [
        ["put", "{path}", json.dumps(PREDICTION)],
        ["ingest", "{path}", "-"],
        ["get", "{path}", "1"],
        ["scan", "{path}"],
        ["stats", "{path}"],
    ],
    ids=lambda argv: argv[0],
)
def test_not_a_store_exits_2(tmp_path: Path, argv: list[str]) -> None:
    result = run(*[a.replace("{path}", str(tmp_path / "nowhere")) for a in argv], input="")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {tmp_path / 'nowhere'} is not an xpstore store")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["init", "put", "ingest", "get", "scan", "stats"])
def test_missing_path_is_a_usage_error(command: str) -> None:
    result = run(command)
    assert result.exit_code == 2
    assert "Missing argument" in result.stderr


def test_newer_format_version_exits_2(store_dir: Path) -> None:
    marker = store_dir / "xpstore.json"
    data = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(data, format_version=99)))
    for argv in (["stats", store_dir], ["put", store_dir, json.dumps(PREDICTION)]):
        result = run(*argv)
        assert result.exit_code == 2
        assert "written by store format 99" in result.stderr


def test_locked_store_exits_3_naming_the_pid(store_dir: Path) -> None:
    with Store.open(store_dir):  # flock conflicts even within one process
        result = run("put", store_dir, json.dumps(PREDICTION))
        assert result.exit_code == 3
        assert f"pid {os.getpid()}" in result.stderr
        assert result.stderr.startswith("error: ")
        assert run("ingest", store_dir, "-", input="").exit_code == 3


def test_reading_a_locked_store_falls_back_to_readonly(store_dir: Path) -> None:
    run("put", store_dir, json.dumps(PREDICTION))
    with Store.open(store_dir):
        result = run("get", store_dir, 1)
        assert result.exit_code == 0
        assert json.loads(result.stdout)["id"] == 1
        stats = json.loads(run("stats", store_dir, "--json").stdout)
        assert stats["readonly"] is True


def test_readonly_sees_only_applied_data_a_writer_open_replays_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "xp"
    with Store.open(path, create=True, hold_applier=True) as store:
        store.put(PREDICTION)  # acknowledged in the WAL, not applied: a crashed writer's state
    readonly = run("get", path, 1, "--readonly")
    assert readonly.exit_code == 1  # the documented caveat of --readonly
    replayed = run("get", path, 1)  # lock free: a writer open replays the WAL first
    assert replayed.exit_code == 0
    assert json.loads(replayed.stdout)["record"]["predicted"] == "punchy"
    assert run("get", path, 1, "--readonly").exit_code == 0  # now applied


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (StoreLockedError("busy", pid=1), 3),
        (RecordNotFoundError("no record"), 1),
        (InvalidRecordError("bad"), 2),
        (CodecError("bad bytes"), 2),
        (StoreNotFoundError("nowhere"), 2),
        (FormatVersionError("v99"), 2),
        (StoreCorruptionError("crc"), 1),
        (WALCorruptionError("crc"), 1),
        (WALWriteError("fsync"), 1),
        (PermissionError("denied"), 1),
        (RuntimeError("a bug"), None),
    ],
)
def test_exit_code_table(exc: BaseException, code: int | None) -> None:
    assert exit_code_for(exc) == code


def test_exit_code_table_orders_subclasses_first() -> None:
    classes = [cls for cls, _ in EXIT_CODES]
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls), f"{later.__name__} is shadowed by {cls.__name__}"


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("xpstore, version ")


# ---------------------------------------------------------------------------- documentation


def _commands() -> list[str]:
    assert isinstance(main, click.Group)
    return sorted(main.commands)


@pytest.mark.parametrize("name", _commands())
def test_every_command_has_help_with_an_example(name: str) -> None:
    result = run(name, "--help")
    assert result.exit_code == 0
    assert "Example:" in result.stdout
    command = main.commands[name]
    assert command.get_short_help_str(limit=80).strip()
    assert not command.get_short_help_str(limit=80).endswith("...")


@pytest.mark.parametrize("name", _commands())
def test_every_command_is_documented(name: str) -> None:
    text = DOCS.read_text()
    assert re.search(rf"^## `xpstore {name}\b", text, re.M), f"docs/cli.md lacks `xpstore {name}`"


def _leaf_commands(
    group: click.Group = main, prefix: str = ""
) -> Iterator[tuple[str, click.Command]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_json_flag_where_output_is_text() -> None:
    for name, command in _leaf_commands():
        options = {opt for p in command.params for opt in getattr(p, "opts", [])}
        # get and scan always print JSON; serve prints a log, not a result
        if name not in ("get", "scan", "serve"):
            assert "--json" in options, name
