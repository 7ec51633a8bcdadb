"""SIGKILL at named crash points in the WAL's own maintenance: mid segment rotation and mid
checkpoint, right after a preallocated segment's zeros are written, and in the middle of a
recovery's replay. The child kills itself there (XPSTORE_CRASH_AT); reopening must succeed and
every acknowledged record must be back (snapshot, restore and compaction points are tested beside
their features)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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
        ("wal.preallocate.after_zeros", "1"),  # zeros ahead of a frame, the frame not yet
        ("wal.preallocate.after_zeros", "4"),
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


_REOPEN = """
import sys
from xpstore import Store
Store.open(sys.argv[1], apply_batch_ops=100).close()
"""


def test_sigkill_in_the_middle_of_a_recovery_replay(tmp_path: Path) -> None:
    """Recovery writes its replay to LMDB in batches; killed after one of them, the next open
    goes on from the batch boundary and ends with every acknowledged record, once."""
    path = tmp_path / "store"
    acks = _run_round(path, 11, 400, ["--hold-applier"])  # nothing of it reaches LMDB
    env = {**os.environ, "XPSTORE_CRASH_AT": "replay.after_batch", "XPSTORE_CRASH_SKIP": "1"}
    proc = subprocess.run([sys.executable, "-c", _REOPEN, str(path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with Store.open(path, readonly=True) as half:  # two batches of the replay are in LMDB
        assert 0 < half.parts.engine.applied_lsn() < max(a[0] for a in acks)
    _check(path, [(11, acks)])
