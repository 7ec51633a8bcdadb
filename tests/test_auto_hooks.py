"""Automatic snapshots and retention run from the store's own applier thread (not only when
their methods are called by hand). Polled with a deadline; the background thread's cadence is
a few milliseconds here."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xpstore import Store
from xpstore.demo.synthetic import make_prediction


def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_automatic_snapshot_from_the_applier(store_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Store.open(store_path, create=True, snapshot_every_records=50, apply_interval_ms=5,
                    apply_batch_ops=20) as store:
        store.put_many([make_prediction(rng) for _ in range(120)])
        assert _until(lambda: len(store.list_snapshots()) >= 1)
        snap = store.list_snapshots()[-1]
        store.verify_snapshot(snap.id)
        assert snap.lsn >= 50


def test_automatic_retention_from_the_applier(store_path: Path) -> None:
    rng = np.random.default_rng(2)
    config = {"retention": {"prediction": {"max_count": 30}}, "retention_interval_s": 0.05,
              "apply_interval_ms": 5}
    with Store.open(store_path, create=True, config=config) as store:
        ids = store.put_many([make_prediction(rng, ts=1000.0 + i) for i in range(100)])
        assert _until(lambda: store.count("prediction") == 30)
        assert sorted(e.id for e in store.scan(kind="prediction")) == ids[-30:]
    with Store.open(store_path) as store:  # the evictions were logged: they survive a reopen
        assert store.count("prediction") == 30
