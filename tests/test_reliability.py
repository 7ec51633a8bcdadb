"""Reliability defects found by trying the store as a new user would (issue 14).

One reproduction per defect: each test failed on the code before its fix. The SIGBUS case
(a truncated LMDB file) is in ``test_lmdb_damage.py``, the Ctrl-C hang in ``test_interrupt.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from xpstore import Fingerprint, Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_fingerprint, make_mixed, sample_batch_values

ROOT = Path(__file__).resolve().parent.parent


def run(*args: Any, input: str | None = None) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


# ------------------------------------------------------------------ 1. verify after priorities


def readme_example() -> str:
    """The README's "API in ten lines" block, verbatim."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## The API in ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README.md lost its API example"
    return match.group(1)


def test_readme_example_runs_and_verify_passes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14.1: after update_priorities (as in the README), verify reported every id with a
    stored priority as "index entry disagrees with the record's kind or ts" and exited 1."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(14)
    records = make_mixed(rng, 400, t0=1_690_000_000.0)
    records.append(make_fingerprint(rng, "track-42", ts=1_690_000_500.0))
    namespace: dict[str, Any] = {
        "records": records,
        "t0": 1_690_000_000.0,
        "new_priorities": [0.5 + i / 512 for i in range(256)],
        "track_ids": ["bulk-1", "bulk-2"],
        "values": sample_batch_values(rng, "techno", 2),
        "groups": {r.track_id: f"album-{i % 6}" for i, r in enumerate(
            r for r in records if isinstance(r, Fingerprint))},
    }
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    with Store.open("data/xp", readonly=True) as store:
        batch_ids = set(namespace["batch"].ids)
        report = store.check()
    assert report.ok, report.problems
    prioritized = [i for i in batch_ids if store_priority(tmp_path / "data/xp", i) is not None]
    assert prioritized, "the example stored no explicit priority: the test lost its point"
    result = run("verify", "data/xp")
    assert result.exit_code == 0, result.output
    assert "PROBLEM" not in result.output


def store_priority(path: Path, rid: int) -> float | None:
    with Store.open(path, readonly=True) as store:
        return store.get(rid).priority


def test_verify_after_update_priorities_small(store_path: Path) -> None:
    """The issue's smallest reproduction: 10 records, 2 priorities, then verify."""
    with Store.open(store_path, create=True) as store:
        ids = store.put_many(make_mixed(np.random.default_rng(1), 10, t0=1_690_000_000.0))
        store.update_priorities(ids[:2], [2.0, 3.0])
    with Store.open(store_path) as store:
        assert store.check().ok
    result = run("verify", store_path)
    assert result.exit_code == 0, result.output


def test_replay_names_the_kind_of_an_update_to_a_prioritized_record(store_path: Path) -> None:
    """Issue 14.1, the same misreading in ``replay``: an update whose target lives only in LMDB
    with a stored priority came out with kind and ts null (and a --kind filter dropped it)."""
    from xpstore.ops.replay import replay

    with Store.open(store_path, create=True) as store:
        rid = store.put_many(make_mixed(np.random.default_rng(2), 1, proportions=(1, 0, 0),
                                        t0=1_690_000_000.0))[0]
        store.update_priorities([rid], [4.0])
        ts = store.get(rid).ts
    with Store.open(store_path) as store:  # the checkpoint drops the segment holding the put
        store.update(rid, actual="warm")
    with replay(store_path) as stream:
        updates = [item for item in stream if item.op == "update"]
    assert [(u.kind, u.ts) for u in updates] == [("prediction", ts)]


# ------------------------------------------------------------------ 4. a bound on sample -n


def test_sample_refuses_n_over_the_limit(store_path: Path) -> None:
    """Issue 14.4: ``sample -n 1000000000`` on a 303-record store grew to 24 GB and was
    OOM-killed. ``n`` is bounded by ``sampling.max_sample`` (default 1,000,000)."""
    from xpstore.errors import InvalidArgumentError

    with Store.open(store_path, create=True) as store:
        store.put_many(make_mixed(np.random.default_rng(3), 303, t0=1_690_000_000.0))
        assert store.config.sampling.max_sample == 1_000_000
        with pytest.raises(InvalidArgumentError, match=r"\bn\b.*1,000,000") as info:
            store.sample(1_000_000_000)
        assert info.value.field == "n"
        store.reconfigure(**{"sampling.max_sample": 10})
        assert len(store.sample(10).ids) == 10
        with pytest.raises(InvalidArgumentError, match=r"sampling\.max_sample"):
            store.sample(11)
    result = run("sample", store_path, "-n", 1_000_000_000)
    assert result.exit_code == 2
    assert "-n" in result.output and "10" in result.output and "max_sample" in result.output
    assert run("sample", store_path, "-n", 10, "--json").exit_code == 0


# ------------------------------------------------------------------ a failed salvage


def test_failed_salvage_leaves_nothing_at_into(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 14: a salvage that failed half-way left a half-built ``--into`` directory (LMDB
    copied, no marker), which the next attempt refused as "not empty"."""
    import errno

    from xpstore.ops import salvage

    src = tmp_path / "store"
    with Store.open(src, create=True) as store:
        store.put_many(make_mixed(np.random.default_rng(4), 50, t0=1_690_000_000.0))

    def full_disk(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    for case in ("new", "empty"):
        parent = tmp_path / case
        parent.mkdir()
        into = parent / "salvaged"
        if case == "empty":
            into.mkdir()
        with monkeypatch.context() as m:
            m.setattr(salvage, "recover_wal", full_disk)
            with pytest.raises(OSError, match="No space"):
                salvage.salvage_store(src, into)
        left = sorted(str(p.relative_to(parent)) for p in parent.rglob("*"))
        assert left == (["salvaged"] if case == "empty" else []), left
        salvage.salvage_store(src, into)  # and a retry works
        with Store.open(into, readonly=True) as store:
            assert store.count() == 50


# ------------------------------------------------------------------ input errors


def prediction_line(i: int, **extra: Any) -> str:
    import json

    return json.dumps({"kind": "prediction", "predicted": "warm", "confidence": 0.5,
                       "context": "cold_start", "ts": 1_690_000_000.0 + i, **extra})


def test_ingest_checks_the_size_limit_before_writing_anything(store_path: Path,
                                                             tmp_path: Path) -> None:
    """Issue 14: without --partial, ingest wrote 2000 records before failing on a 2 MiB record
    at line 2501: the size limit was checked per batch at write time, not in the whole-file
    validation the README promises."""
    Store.open(store_path, create=True).close()
    lines = [prediction_line(i) for i in range(3000)]
    lines[2500] = prediction_line(2500, predicted="w" * (2 << 20))
    src = tmp_path / "big.jsonl"
    src.write_text("\n".join(lines) + "\n")
    result = run("ingest", store_path, src)
    assert result.exit_code == 2
    assert f"{src}:2501: predicted: record encodes to" in result.output
    assert "1,048,576 bytes (the records.max_record_bytes setting)" in result.output
    assert "nothing written" in result.output
    with Store.open(store_path, readonly=True) as store:
        assert store.count() == 0
    result = run("ingest", store_path, src, "--partial")  # the good lines only, still exit 2
    assert result.exit_code == 2
    with Store.open(store_path, readonly=True) as store:
        assert store.count() == 2999


def test_a_too_large_record_names_its_field(store_path: Path) -> None:
    """Issue 14: a 10 MB record was refused as "records[0] encodes to N bytes, over
    max_record_bytes=M", naming neither the field nor where the limit is set."""
    from xpstore.errors import RecordTooLargeError

    big = {"kind": "prediction", "predicted": "x" * (10 << 20), "confidence": 0.5,
           "context": "c"}
    with Store.open(store_path, create=True) as store:
        with pytest.raises(RecordTooLargeError) as info:
            store.put(big)
        assert info.value.field == "predicted"
        assert "largest field is 'predicted'" in str(info.value)
        assert "records.max_record_bytes" in str(info.value)
        with pytest.raises(RecordTooLargeError, match=r"^records\[1\]: "):
            store.put_many([{**big, "predicted": "ok"}, big])
        assert store.count() == 0
    import json

    result = run("put", store_path, "-", input=json.dumps(big))
    assert result.exit_code == 2
    assert "predicted:" in result.output and "records[0]" not in result.output


def test_bad_json_is_reported_at_the_files_line(store_path: Path, tmp_path: Path) -> None:
    """Issue 14: a broken line 3 was reported as "FILE:3: json: Expecting value: line 2
    column 1 (char 35)": json's own line count disagreed with the file's."""
    Store.open(store_path, create=True).close()
    src = tmp_path / "bad.jsonl"
    src.write_text(prediction_line(0) + "\n\n" + '{"kind": "prediction", "predicted":\n')
    result = run("ingest", store_path, src)
    assert result.exit_code == 2
    assert f"{src}:3: json: Expecting value at column 36" in result.output
    assert "line 2" not in result.output


def test_cli_errors_name_the_option_not_the_setting(tmp_path: Path, store_path: Path) -> None:
    """Issue 14: `init --segment-max-bytes 1` said "config wal.segment_max_bytes: ..."."""
    result = run("init", tmp_path / "new", "--segment-max-bytes", 1)
    assert result.exit_code == 2
    assert "--segment-max-bytes" in result.output and "wal.segment_max_bytes" not in result.output
    assert not (tmp_path / "new").exists()
    Store.open(store_path, create=True).close()
    src = tmp_path / "one.jsonl"
    src.write_text(prediction_line(0) + "\n")
    result = run("ingest", store_path, src, "--batch-size", 200_000)
    assert result.exit_code == 2 and "--batch-size" in result.output
    assert "100,000" in result.output


@pytest.mark.parametrize("ts", [1.7e308, 1.7e12, 253_402_300_800.0])
def test_ts_is_bounded_to_years_1970_to_9999(store_path: Path, ts: float) -> None:
    """Issue 14: ts=1.8e308 parses to inf (refused), but 1.7e308, or a time in milliseconds,
    was accepted and stored."""
    from xpstore.errors import InvalidRecordError

    with Store.open(store_path, create=True) as store:
        with pytest.raises(InvalidRecordError) as info:
            store.put({"kind": "prediction", "predicted": "w", "confidence": 0.5,
                       "context": "c", "ts": ts})
        assert info.value.field == "ts"
        assert "year 10000" in str(info.value)
        store.put({"kind": "prediction", "predicted": "w", "confidence": 0.5, "context": "c",
                   "ts": 253_402_300_799.0})  # the last second of 9999 is fine
    result = run("put", store_path, prediction_line(0, ts=ts).replace('"ts": 1690000000.0, ', ""))
    assert result.exit_code == 2 and "ts:" in result.output


# ------------------------------------------------------------------ read-only commands


def test_verify_leaves_lmdbs_lock_file_alone(store_path: Path) -> None:
    """Issue 14: ``verify`` (documented as never modifying the store) wrote a reader slot into
    data/lock.mdb through its read-only open with the lock."""
    with Store.open(store_path, create=True) as store:
        store.put_many(make_mixed(np.random.default_rng(5), 100, t0=1_690_000_000.0))
    lock = store_path / "data" / "lock.mdb"
    before = (lock.stat().st_mtime_ns, lock.stat().st_size, lock.read_bytes())
    for args in (("verify", store_path), ("verify", store_path, "--in-process")):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert (lock.stat().st_mtime_ns, lock.stat().st_size, lock.read_bytes()) == before


def test_get_and_scan_take_json(store_path: Path) -> None:
    """Issue 14: every command takes --json, but get and scan refused it."""
    import json

    with Store.open(store_path, create=True) as store:
        ids = store.put_many(make_mixed(np.random.default_rng(6), 5, t0=1_690_000_000.0))
    result = run("get", store_path, ids[0], "--json")
    assert result.exit_code == 0
    assert result.output.count("\n") == 1 and json.loads(result.output)["id"] == ids[0]
    plain = run("scan", store_path)
    result = run("scan", store_path, "--json")
    assert result.exit_code == 0 and result.output == plain.output
    assert [json.loads(line)["ts"] for line in result.output.splitlines()] == sorted(
        json.loads(line)["ts"] for line in result.output.splitlines())


def test_a_reader_sees_what_the_writer_applied(store_path: Path) -> None:
    """Issue 14: docs/cli.md said a read-only open sees a live writer's records "normally within
    milliseconds"; it sees them once that writer's applier has committed them to LMDB, after
    up to apply.interval_ms (200 ms by default), or at once after Store.flush()."""
    text = (ROOT / "docs" / "cli.md").read_text()
    assert "within milliseconds" not in text and "apply.interval_ms" in text
    with Store.open(store_path, create=True, apply_interval_ms=60_000.0) as writer:
        rid = writer.put({"kind": "prediction", "predicted": "w", "confidence": 0.5,
                          "context": "c"})
        with Store.open(store_path, readonly=True) as reader:
            assert reader.count() == 0  # acknowledged, not applied: the reader cannot see it
            writer.flush()
            assert reader.get(rid).id == rid
