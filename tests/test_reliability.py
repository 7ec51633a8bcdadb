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

from xpstore import Store
from xpstore.cli import main
from xpstore.demo.synthetic import make_fingerprint, make_mixed

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
