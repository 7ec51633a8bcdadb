"""``xpstore sample``: rows, JSONL, filters, seeds, exit codes (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_prediction, make_query_metric


def _store(tmp_path: Path) -> Path:
    path = tmp_path / "s"
    rng = np.random.default_rng(0)
    with Store.open(path, create=True) as s:
        s.put_many([make_prediction(rng) for _ in range(50)])
        s.put_many([make_query_metric(rng) for _ in range(20)])
    return path


def test_sample_rows_and_jsonl(tmp_path: Path) -> None:
    path = _store(tmp_path)
    r = CliRunner().invoke(main, ["sample", str(path), "-n", "5", "--kind", "prediction"])
    assert r.exit_code == 0, r.output
    assert len(r.output.strip().splitlines()) == 6 and "prediction" in r.output
    r = CliRunner().invoke(main, ["sample", str(path), "-n", "7", "--json", "--seed", "3",
                                  "--where", "context=warm_start", "--kind", "prediction"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert len(rows) == 7
    assert all(row["record"]["context"] == "warm_start" for row in rows)
    assert all(0 < row["weight"] <= 1 and 0 < row["probability"] < 1 for row in rows)
    with Store.open(path) as s:  # the CLI's draws were counted and logged at its close
        assert sum(s.get(row["id"]).retrieval_count for row in rows) >= 7


def test_sample_errors(tmp_path: Path) -> None:
    path = _store(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["sample", str(path), "-n", "0"])
    assert r.exit_code == 2 and "-n" in r.output
    r = runner.invoke(main, ["sample", str(path), "--kind", "fingerprint"])
    assert r.exit_code == 1 and "nothing to sample" in r.output
    r = runner.invoke(main, ["sample", str(path), "--beta", "3"])
    assert r.exit_code == 2
