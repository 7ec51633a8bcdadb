"""SIGKILL a real writer process (several threads) at random moments; every acknowledged
record must be back after reopen, bit for bit, and ids must never repeat.

The child is ``python -m xpstore.demo.crashwriter`` (no FAISS imported). 30 rounds in the normal
suite; ``pytest --stress -m stress`` runs 1000.
"""

from __future__ import annotations

import faulthandler
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xpstore import Store
from xpstore.demo.crashwriter import record_for
from xpstore.store.writer import COLUMNAR_PUTS

ROUND_DEADLINE_S = 60.0
"""The longest a round waits for its child's acknowledgements (a round takes ~0.5 s)."""
CHILD_WATCHDOG_S = 50.0
"""A child still alive after this dumps its threads' stacks to stderr and exits, before the
parent's deadline, so a stuck writer's stacks are in the failure message."""
PARENT_ROUND_LIMIT_S = 180.0
"""The parent's own watchdog, re-armed at each round: a round (child, kill, recovery check)
stuck this long dumps the test process's stacks and exits it."""


def _arm_round_watchdog() -> None:
    """Replace pytest's whole-test faulthandler timer with a per-round one.

    pytest arms one ``faulthandler.dump_traceback_later(faulthandler_timeout)`` per test (300 s
    here). The 1000-round stress test needs 8-15 minutes, so that timer fired in every stress
    run, and its dump, which reads the other threads' frames without the GIL, crashed the test
    process with SIGSEGV when it met a thread starting or exiting (a Store's threads in
    ``_check``; reproduced in isolation on CPython 3.11). faulthandler has a single timer, so
    arming it here replaces pytest's (which cancels it after the test): it fires only when one
    round is stuck, which is the question the timer is there to answer.
    """
    faulthandler.dump_traceback_later(PARENT_ROUND_LIMIT_S, exit=True)


def _run_round(
    path: Path, seed: int, kill_after_acks: int, extra: list[str], env: dict[str, str] | None = None
) -> list[tuple[int, int, int]]:
    """Start a writer, SIGKILL it once it has acknowledged ``kill_after_acks`` records."""
    cmd = [
        sys.executable,
        "-m",
        "xpstore.demo.crashwriter",
        str(path),
        "--threads",
        "4",
        "--seed",
        str(seed),
        "--batch",
        "5",
        "--watchdog-s",
        str(CHILD_WATCHDOG_S),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    assert proc.stderr is not None
    acks: list[tuple[int, int, int]] = []
    buf = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + ROUND_DEADLINE_S
    ready = False
    try:
        while time.monotonic() < deadline and (not ready or len(acks) < kill_after_acks):
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line == b"READY":
                    ready = True
                elif line.startswith(b"ACK "):
                    _, rid, thread, seq = line.split()
                    acks.append((int(rid), int(thread), int(seq)))
        assert ready, proc.stderr.read().decode() if proc.poll() is not None else "child not ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, err = proc.communicate(timeout=30)
        sel.close()
    assert proc.returncode == -signal.SIGKILL, err.decode()
    # lines the child printed before it died were acknowledged too
    for line in (buf + rest).split(b"\n"):
        if line.startswith(b"ACK ") and len(line.split()) == 4:
            _, rid, thread, seq = line.split()
            acks.append((int(rid), int(thread), int(seq)))
    return acks


def _check(path: Path, rounds: list[tuple[int, list[tuple[int, int, int]]]],
           batch: int = 5) -> None:  # fmt: skip
    with Store.open(path) as store:
        seen: set[int] = set()
        for seed, acks in rounds:
            for rid, thread, seq in acks:
                assert rid not in seen, f"id {rid} acknowledged twice"
                seen.add(rid)
                got = store.get(rid)
                assert got.record == record_for(seed, thread, seq), f"record {rid} differs"
        # nothing is invented: at most the in-flight, unacknowledged writes of each round
        assert len(seen) <= store.count() <= len(seen) + len(rounds) * 4 * batch


def _crash_rounds(path: Path, n: int, seed: int, batch: int = 5) -> None:
    """``n`` SIGKILL rounds of 4 writer threads; the odd ones use ``put_many`` of ``batch``."""
    rng = np.random.default_rng(seed)
    rounds: list[tuple[int, list[tuple[int, int, int]]]] = []
    for r in range(n):
        _arm_round_watchdog()
        extra = ["--hold-applier"] if r % 3 == 0 else []
        if batch != 5:
            extra += ["--batch", str(batch)]
        if r % 5 == 2:
            extra += ["--durability", "group"]  # a process crash loses nothing in group mode
        if r % 4 == 1:
            extra += ["--segment-max-bytes", "65536"]  # kills land around rotations too
        kill_after = int(rng.choice([0, 1, int(rng.integers(2, 50)), int(rng.integers(50, 400))]))
        acks = _run_round(path, seed * 10_000 + r, kill_after, extra)
        rounds.append((seed * 10_000 + r, acks))
        if r % 10 == 9 or r == n - 1:
            _check(path, rounds, batch)
    total = sum(len(acks) for _seed, acks in rounds)
    assert total > 10 * n, (
        f"only {total} acknowledged records in {n} rounds: the test proves little"
    )


def test_sigkill_rounds_lose_nothing_acknowledged(tmp_path: Path) -> None:
    _crash_rounds(tmp_path / "store", 30, seed=1)


def test_sigkill_rounds_with_columnar_batches(tmp_path: Path) -> None:
    # put_many of 40 records: a batch of COLUMNAR_PUTS or more goes as a put run (no model
    # kept once encoded) and is derived in columns
    assert COLUMNAR_PUTS <= 40
    _crash_rounds(tmp_path / "store", 12, seed=3, batch=40)
    with Store.open(tmp_path / "store") as store:
        report = store.check()
        assert report.ok, report


@pytest.mark.stress
def test_sigkill_stress_1000_rounds(tmp_path: Path) -> None:
    _crash_rounds(tmp_path / "store", 1000, seed=2)
