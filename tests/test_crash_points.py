"""SIGKILL at named crash points in the WAL's own maintenance: mid segment rotation and mid
checkpoint. The child kills itself there (XPSTORE_CRASH_AT); reopening must succeed and every
acknowledged record must be back (snapshot, restore and compaction points are tested beside
their features)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_crash import _check, _run_round
from xpstore import Store


@pytest.mark.parametrize(
    ("point", "skip"),
    [
        ("wal.rotate.after_create", "0"),
        ("wal.rotate.after_create", "3"),
        ("checkpoint.before_unlink", "0"),
        ("checkpoint.after_unlink", "0"),
        ("checkpoint.after_unlink", "2"),
    ],
)
def test_sigkill_at_wal_crash_points(tmp_path: Path, point: str, skip: str) -> None:
    path = tmp_path / "store"
    env = {"XPSTORE_CRASH_AT": point, "XPSTORE_CRASH_SKIP": skip}
    acks = _run_round(path, 7, 10**9, ["--segment-max-bytes", "65536"], env=env)
    assert len(acks) > 50, "the child died before it wrote enough to reach the crash point"
    _check(path, [(7, acks)])
    with Store.open(path) as store:  # and the store keeps working after the recovery
        rid = store.put({"kind": "prediction", "predicted": "warm", "confidence": 0.5,
                         "context": "cold_start"})
        assert rid > max(a[0] for a in acks)
