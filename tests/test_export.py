"""Export for analytics (issue 16, part 2): every value of every exported file read back with
pyarrow and with DuckDB and compared with ``scan``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from tests.helpers import record_as
from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_fingerprint, make_prediction, make_query_metric
from xpstore.errors import ExtraMissingError, InvalidArgumentError, InvalidRecordError
from xpstore.model.records import BATCH_FIELDS, Experience, Fingerprint

pa = pytest.importorskip("pyarrow", reason="pyarrow (the 'arrow' extra) is not installed")
pq = pytest.importorskip("pyarrow.parquet")
duckdb = pytest.importorskip("duckdb", reason="duckdb (in the 'test' extra) is not installed")


def _fill(path: Path) -> Store:
    rng = np.random.default_rng(11)
    store = Store.open(path, create=True, durability="none")
    store.put_many([make_prediction(rng, f"t{i % 40}", ts=1000.0 + i) for i in range(500)])
    store.put_many(
        [make_fingerprint(rng, f"t{i}", with_streaming=i % 2 == 0, with_batch=i % 7 != 0,
                          embedding_dim=4, ts=3000.0 + i) for i in range(80)]
    )
    store.put_many([make_query_metric(rng, ts=5000.0 + i) for i in range(60)])
    store.update(1, actual="warm", reward=0.5)
    store.delete(2)
    store.update_priorities([3], [4.0])
    store.record_feedback([4], True)
    return store


def _expected_row(exp: Experience) -> dict[str, Any]:
    """The flattened row the export documents, from the envelope."""
    row: dict[str, Any] = {
        "id": exp.id, "ts": exp.ts, "lsn": exp.updated_lsn,
        "retrieval_count": exp.retrieval_count, "success_count": exp.success_count,
        "priority": exp.priority,
    }  # fmt: skip
    rec = exp.record.model_dump(exclude_none=True)
    rec.pop("ts", None)
    if exp.kind == "fingerprint":
        batch = rec.pop("batch", None)
        if batch is not None:
            for name in BATCH_FIELDS:
                row[f"batch.{name}"] = batch[name]
    for key, value in _flat(rec).items():
        row[key] = value
    return row


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        elif isinstance(value, dict):
            continue
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return got == want or (math.isnan(got) and math.isnan(want))
    if isinstance(want, list | tuple):
        return list(got) == list(want)
    return bool(got == want)


def _compare(rows: list[dict[str, Any]], store: Store, kind: str) -> None:
    expected = sorted((_expected_row(e) for e in store.scan(kind)), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [r["id"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        for key, value in want.items():
            assert key in got, f"column {key} missing"
            assert _same(got[key], value), (kind, got["id"], key, got[key], value)
        extra = {k for k, v in got.items() if v is not None and k not in want}
        assert not extra, (kind, got["id"], extra)


@pytest.mark.parametrize("fmt", ["parquet", "arrow", "jsonl"])
def test_export_reads_back_equal_to_scan(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    with _fill(tmp_path / "s") as store:
        report = store.parts.export.export(out, fmt, None, None, None, None, 100, None)
        lsn = store.stats()["applied_lsn"]
        assert report["lsn"] == lsn
        manifest = json.loads((out / "export.json").read_text())
        assert manifest["kinds"]["prediction"]["rows"] == 499
        for kind in ("prediction", "fingerprint", "query_metric"):
            path = out / manifest["kinds"][kind]["file"]
            if fmt == "parquet":
                table = pq.read_table(path)
                assert pq.ParquetFile(path).metadata.row_group(0).num_rows <= 100
            elif fmt == "arrow":
                with pa.memory_map(str(path)) as src:
                    table = pa.ipc.open_file(src).read_all()
            else:
                lines = path.read_text().splitlines()
                _compare([json.loads(line) for line in lines], store, kind)
                continue
            _compare(table.to_pylist(), store, kind)
        if fmt == "parquet":
            fp = pq.read_table(out / "fingerprint.parquet")
            assert fp.schema.field("embedding").type == pa.list_(pa.float64(), 4)
            assert fp.schema.field("batch.lufs").type == pa.float64()


def test_duckdb_reads_the_parquet_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with _fill(tmp_path / "s") as store:
        store.parts.export.export(out, "parquet", None, None, None, None, 128, None)
        con = duckdb.connect()
        path = str(out / "prediction.parquet")
        got = con.execute(
            f'SELECT id, confidence, "audio_features.energy", actual FROM \'{path}\' ORDER BY id'
        ).fetchall()
        want = [
            (e.id, e.record.confidence,  # type: ignore[union-attr]
             (e.record.audio_features or {}).get("energy"),  # type: ignore[union-attr]
             e.record.actual)  # type: ignore[union-attr]
            for e in sorted(store.scan("prediction"), key=lambda e: e.id)
        ]  # fmt: skip
        assert got == want
        n, s = con.execute(
            f"SELECT count(*), sum(\"batch.tempo_bpm\") FROM '{out / 'fingerprint.parquet'}'"
        ).fetchone()
        fps = list(store.scan("fingerprint"))
        assert n == len(fps)
        tempos = [
            fp.batch.tempo_bpm
            for fp in (record_as(e, Fingerprint) for e in fps)
            if fp.batch is not None
        ]
        assert s == pytest.approx(sum(tempos))


def test_to_arrow_filters(tmp_path: Path) -> None:
    with _fill(tmp_path / "s") as store:
        where = {"context": "warm_start", "confidence__gt": 0.5}
        table = store.to_arrow("prediction", where=where, since=1100.0, until=1300.0)
        want = sorted(e.id for e in store.scan("prediction", where=where, since=1100.0,
                                               until=1300.0))  # fmt: skip
        assert table.column("id").to_pylist() == want
        assert want
        empty = store.to_arrow("prediction", since=1e9)
        assert empty.num_rows == 0
        assert "id" in empty.column_names


def test_export_is_one_consistent_read(tmp_path: Path) -> None:
    """Writes acknowledged before the call are all there, applier or not (a writer process
    applies them first); the manifest's LSN is the read's."""
    with _fill(tmp_path / "s") as store:
        rid = store.put(make_prediction(np.random.default_rng(1), "late", ts=9999.0))
        table = store.to_arrow("prediction")
        assert rid in table.column("id").to_pylist()


def test_bad_arguments(tmp_path: Path) -> None:
    with _fill(tmp_path / "s") as store:
        with pytest.raises(InvalidArgumentError, match="kind"):
            store.to_arrow("nope")
        with pytest.raises(InvalidArgumentError, match="format"):
            store.parts.export.export(tmp_path / "o", "csv", None, None, None, None, 10, None)
        with pytest.raises(InvalidArgumentError, match="row_group_size"):
            store.parts.export.export(tmp_path / "o", "parquet", None, None, None, None, 0, None)
        with pytest.raises(InvalidRecordError):
            store.to_arrow("prediction", where={"nope__gt": 1})
    held = Store.open(tmp_path / "h", create=True, hold_applier=True, durability="none")
    with held, pytest.raises(Exception, match="hold_applier"):
        held.to_arrow("prediction")


def test_cli_export(tmp_path: Path) -> None:
    store_path = tmp_path / "s"
    _fill(store_path).close()
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["export", str(store_path), "--format", "parquet", "--out", str(out), "--kind",
               "prediction", "--where", "context=warm_start", "--row-group-size", "64",
               "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["kinds"]) == {"prediction"}
    table = pq.read_table(out / "prediction.parquet")
    assert set(table.column("context").to_pylist()) == {"warm_start"}
    assert report["kinds"]["prediction"]["rows"] == table.num_rows > 0
    bad = CliRunner().invoke(main, ["export", str(store_path), "--format", "csv", "--out",
                                    str(out)])  # fmt: skip
    assert bad.exit_code == 2


def test_without_pyarrow_the_error_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    with _fill(tmp_path / "s") as store:
        monkeypatch.setitem(sys.modules, "pyarrow", None)  # what an absent package looks like
        with pytest.raises(ExtraMissingError, match=r"xpstore\[arrow\]") as info:
            store.to_arrow("prediction")
        assert info.value.extra == "arrow"


def test_cli_export_draws_a_progress_bar(tmp_path: Path) -> None:
    store_path = tmp_path / "s"
    _fill(store_path).close()
    result = CliRunner().invoke(
        main, ["export", str(store_path), "--out", str(tmp_path / "o"), "--format", "arrow"],
        env={"XPSTORE_PROGRESS": "1"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "exporting prediction" in result.stderr
    assert "499/499 records" in result.stderr  # finished at the kind's count
    assert "prediction" in result.stdout and "499 rows" in result.stdout
