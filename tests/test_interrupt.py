"""Ctrl-C (issue 14.3): a KeyboardInterrupt must never leave the store waiting forever.

``xpstore ingest`` hung in about one try of three when SIGINT came during its write phase: the
interrupt landed in the WAL group-commit leader, which never cleared its leader flag, so every
later ``wait`` (``Store.close``'s included) slept forever while holding the writer lock.

In-process, a fault-injecting file system (the ``xpstore.persistence.fs`` seam) raises
KeyboardInterrupt inside the leader's flush while other writers wait on it; in subprocesses, a
real ``xpstore ingest`` gets SIGINT at several moments and must end within seconds, say how to
resume, and leave a store that ``verify`` passes.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xpstore import Store, WALWriteError
from xpstore.cli import commands
from xpstore.persistence import applier as applier_mod
from xpstore.persistence import fs
from xpstore.persistence import wal as wal_mod
from xpstore.persistence.fs import OsFS
from xpstore.store.combiner import Submission

FOLLOWERS = 4
TIMEOUT = 10.0


def prediction(i: int) -> dict[str, Any]:
    return {"kind": "prediction", "predicted": "warm", "confidence": 0.5,
            "context": "cold_start", "ts": 1_690_000_000.0 + i}


class Interrupting(OsFS):
    """Raises KeyboardInterrupt once, in ``where`` ("write" or "fdatasync") of the WAL leader,
    after ``followers`` other writers have queued behind it."""

    def __init__(self, where: str, queued: threading.Event) -> None:
        self.where = where
        self.queued = queued
        self.entered = threading.Event()
        self.fired = False

    def _maybe(self, what: str) -> None:
        if what == self.where and not self.fired:
            self.fired = True
            self.entered.set()
            assert self.queued.wait(TIMEOUT), "the other writers never queued"
            raise KeyboardInterrupt

    def write(self, fd: int, data: bytes | memoryview) -> int:
        self._maybe("write")
        return super().write(fd, data)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        self._maybe("write")  # the WAL writes frames (and preallocated zeros) with pwrite
        return super().pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        self._maybe("fdatasync")
        super().fdatasync(fd)


def count_queued(store: Store, n: int) -> threading.Event:
    """An event set once ``n`` more writers entered the store's commit combiner: with a batch
    running (the interrupted leader's), they queue behind it."""
    combiner = store.parts.writer.combiner
    done = threading.Event()
    seen = [0]
    real = combiner.run

    def run(sub: Submission) -> None:
        seen[0] += 1
        if seen[0] >= n:
            done.set()
        real(sub)

    combiner.run = run  # type: ignore[method-assign]
    return done


def run_writers(
    store: Store, fsys: Interrupting, lead: list[dict[str, Any]] | None = None
) -> tuple[list[Any], list[BaseException]]:
    """A leader that gets interrupted and FOLLOWERS writers queued behind it; every thread must
    finish within TIMEOUT. ``lead``: the leader's ``put_many`` batch (default: one put)."""
    results: list[Any] = []
    errors: list[BaseException] = []

    def put(i: int) -> None:
        try:
            if i == 0 and lead is not None:
                store.put_many(lead)
            else:
                results.append(store.put(prediction(i)))
        except BaseException as exc:  # KeyboardInterrupt in the leader, WALWriteError elsewhere
            errors.append(exc)

    leader = threading.Thread(target=put, args=(0,), daemon=True)
    leader.start()
    assert fsys.entered.wait(TIMEOUT)
    threads = [threading.Thread(target=put, args=(i,), daemon=True)
               for i in range(1, FOLLOWERS + 1)]
    for t in threads:
        t.start()
    for t in [leader, *threads]:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a writer is still waiting for the interrupted leader"
    return results, errors


def close_within(store: Store, timeout: float = TIMEOUT) -> BaseException | None:
    error: list[BaseException] = []

    def close() -> None:
        try:
            store.close()
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=close, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "Store.close is still waiting"
    return error[0] if error else None


def test_interrupt_in_the_leaders_fdatasync(store_path: Path) -> None:
    """After the frame was written the batch cannot be taken back: the log is poisoned (as for
    a failed fsync), every waiter gets WALWriteError at once, close() finishes, and a reopen
    recovers everything acknowledged."""
    store = Store.open(store_path, create=True)
    before = store.put(prediction(-1))
    queued = count_queued(store, FOLLOWERS + 1)
    fsys = Interrupting("fdatasync", queued)
    with fs.use(fsys):
        results, errors = run_writers(store, fsys)
        assert sum(isinstance(e, KeyboardInterrupt) for e in errors) == 1
        others = [e for e in errors if not isinstance(e, KeyboardInterrupt)]
        assert len(others) + len(results) == FOLLOWERS
        assert all(isinstance(e, WALWriteError) and "interrupted" in str(e) for e in others)
        with pytest.raises(WALWriteError, match="interrupted"):
            store.put(prediction(99))
        assert close_within(store) is None
    with Store.open(store_path) as store:
        assert store.get(before).record.ts == 1_690_000_000.0 - 1
        for rid in results:
            store.get(rid)
        assert store.check().ok


@pytest.mark.parametrize("first", ["zero-fill", "frame"])
def test_interrupt_before_the_write_hands_the_flush_on(store_path: Path, first: str) -> None:
    """Interrupted before any byte of the frame was written, the leader puts its groups back
    and wakes the next writer to lead: the others are acknowledged as if nothing happened.
    ``zero-fill``: the interrupt lands in the preallocated segment's first zeros (a fresh
    segment); ``frame``: in the frame's own write, over zeros written before."""
    store = Store.open(store_path, create=True)
    before = [store.put(prediction(-1))] if first == "frame" else []
    queued = count_queued(store, FOLLOWERS + 1)
    fsys = Interrupting("write", queued)
    with fs.use(fsys):
        results, errors = run_writers(store, fsys)
        assert [type(e) for e in errors] == [KeyboardInterrupt]
        assert len(results) == FOLLOWERS
        store.put(prediction(99))  # the log is fine
        assert close_within(store) is None
    with Store.open(store_path) as store:
        assert {store.get(rid).id for rid in results} == set(results)
        # the interrupted leader's own record was flushed by the next leader
        assert store.count() == FOLLOWERS + 2 + len(before)
        assert store.check().ok


def test_interrupt_before_an_appended_large_frame_hands_the_flush_on(store_path: Path) -> None:
    """A frame of 64 KiB or more is appended past the preallocated zeros, none written ahead
    of it: interrupted before its write, the segment has not grown, so the leader hands the
    flush on as it does over zeros, and its batch is logged by the next leader."""
    store = Store.open(store_path, create=True)
    before = store.put(prediction(-1))  # the segment and its first zero window exist
    wal = store.parts.engine.wal
    assert wal is not None
    size = wal.stats.bytes
    lead = [{**prediction(1000 + j), "context": f"c{j}-" + "x" * 400} for j in range(200)]
    queued = count_queued(store, FOLLOWERS + 1)
    fsys = Interrupting("write", queued)
    with fs.use(fsys):
        results, errors = run_writers(store, fsys, lead)
        assert [type(e) for e in errors] == [KeyboardInterrupt]
        assert len(results) == FOLLOWERS
        assert close_within(store) is None
    assert wal.stats.bytes - size > 64 * 1024  # the leader's batch went out as a large frame
    with Store.open(store_path) as store:
        assert {store.get(rid).id for rid in [before, *results]} == {before, *results}
        contexts = {e.record.context for e in store.scan(kind="prediction")}  # type: ignore[union-attr]
        assert {d["context"] for d in lead} <= contexts  # flushed by the next leader
        assert store.count() == FOLLOWERS + 1 + len(lead)
        assert store.check().ok


def test_close_is_bounded_when_a_flush_hangs(store_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A leader stuck in fdatasync (a hung disk) makes close() fail with a clear error after
    wal.CLOSE_TIMEOUT_S instead of waiting forever (the sampler's retrieval counts, logged at
    close, wait no longer either)."""
    monkeypatch.setattr(wal_mod, "CLOSE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(applier_mod, "STOP_TIMEOUT_S", 0.5)  # its checkpoint may wait too
    release = threading.Event()
    entered = threading.Event()

    class Hanging(OsFS):
        def fdatasync(self, fd: int) -> None:
            entered.set()
            release.wait(TIMEOUT)
            super().fdatasync(fd)

    store = Store.open(store_path, create=True)
    store.put_many([prediction(i) for i in range(1, 11)])
    store.sample(4)  # retrieval counts pending: close logs them through the WAL
    with fs.use(Hanging()):
        writer = threading.Thread(target=store.put, args=(prediction(0),), daemon=True)
        writer.start()
        assert entered.wait(TIMEOUT)
        started = time.monotonic()
        error = close_within(store)
        assert time.monotonic() - started < 5
        assert isinstance(error, WALWriteError) and "timed out" in str(error), error
        release.set()
        writer.join(TIMEOUT)
    with Store.open(store_path) as again:  # the lock was released; the records are there
        assert again.count() == 11


# ---------------------------------------------------------------------------- the CLI


LINES = 40_000


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ingest") / "records.jsonl"
    with path.open("w") as f:
        for i in range(LINES):
            f.write(json.dumps(prediction(i)) + "\n")
    return path


def cli(*args: Any, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xpstore.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def ingest(jsonl: Path, store_path: Path) -> Iterator[Callable[[str, float], tuple[int, str]]]:
    """Start ``xpstore ingest``, wait for its progress line ``phase``, then ``delay`` s, send
    SIGINT; return the exit code and stderr (the child must end within TIMEOUT of it)."""
    procs: list[subprocess.Popen[bytes]] = []

    def go(phase: str, delay: float) -> tuple[int, str]:
        env = dict(os.environ, XPSTORE_PROGRESS="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "xpstore.cli", "ingest", str(store_path), str(jsonl),
             "--batch-size", "500"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        procs.append(proc)
        assert proc.stderr is not None
        seen = b""
        deadline = time.monotonic() + 60
        while phase.encode() not in seen:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stderr], [], [], left)
            chunk = os.read(proc.stderr.fileno(), 65536) if ready else b""
            if not chunk:
                break
            seen += chunk
        assert phase.encode() in seen, seen.decode(errors="replace")
        time.sleep(delay)  # the moment of the interrupt is the variable under test
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _out, err = proc.communicate(timeout=TIMEOUT)
        assert time.monotonic() - sent < TIMEOUT
        return proc.returncode, (seen + err).decode(errors="replace")

    yield go
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reaps it and closes the pipes


def stored_ts(path: Path) -> list[float]:
    with Store.open(path, readonly=True) as store:
        return sorted(exp.ts for exp in store.scan())


def test_sigint_while_validating_writes_nothing(
    ingest: Callable[[str, float], tuple[int, str]], store_path: Path
) -> None:
    Store.open(store_path, create=True).close()
    code, err = ingest("validating", 0.0)
    assert code == 130, err
    assert "nothing written" in err
    assert cli("verify", store_path).returncode == 0
    assert stored_ts(store_path) == []


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.15, 0.4])
def test_sigint_while_writing_stops_cleanly_and_resumes(
    ingest: Callable[[str, float], tuple[int, str]], store_path: Path, jsonl: Path,
    delay: float,
) -> None:
    Store.open(store_path, create=True).close()
    code, err = ingest("ingesting", delay)
    assert code in (0, 130), err
    assert "Traceback" not in err
    result = cli("verify", store_path)
    assert result.returncode == 0, result.stdout
    if code == 130:
        assert "interrupted" in err
        assert "--resume-from " in err, err
        resume = err.split("--resume-from ", 1)[1].split()[0]
        written = stored_ts(store_path)
        assert len(written) == int(resume) - 1  # every line before it, none after
        again = cli("ingest", store_path, jsonl, "--resume-from", resume)
        assert again.returncode == 0, again.stderr
    expected = [prediction(i)["ts"] for i in range(LINES)]
    assert stored_ts(store_path) == expected  # every line once: no duplicate, no gap


@pytest.mark.parametrize("entry", [True, False])
def test_ctrl_c_after_an_ingest_is_deferred_then_ignored_in_the_process_only(
    monkeypatch: pytest.MonkeyPatch, entry: bool
) -> None:
    """While deferred, Ctrl-C only marks the ingest as interrupted; once the command is over,
    the ``xpstore`` process ignores it (it exits next: a late Ctrl-C once ended a finished
    ingest with exit -2 in the interpreter's teardown), and an in-process caller gets its own
    handler back."""
    monkeypatch.setattr(commands._PROCESS, "entry", entry)
    previous = signal.getsignal(signal.SIGINT)
    try:
        with commands._Interrupt() as interrupt:
            interrupt.defer()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the Python-level handler runs at the next bytecode
            assert interrupt.hit
        after = signal.getsignal(signal.SIGINT)
        assert after is (signal.SIG_IGN if entry else previous)
        if entry:
            os.kill(os.getpid(), signal.SIGINT)  # ignored: no KeyboardInterrupt
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGINT, previous)
