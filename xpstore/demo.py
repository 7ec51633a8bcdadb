"""The guided demo behind ``xpstore demo``: realistic writes, queries, then a real crash.

Phase 1 writes a few thousand synthetic records of all three kinds (batched and single puts),
resolves some predictions' outcomes with updates, retires a track, and shows counts, a record and
a filtered scan. Phase 2 is the point of the project: a child process
(``python -m xpstore.crashwriter``) writes from four threads and prints ``ACK <id> <thread>
<seq>`` after each acknowledged put; the demo kills it with SIGKILL mid-stream, reopens the store
(WAL recovery), and checks that every acknowledged record is there, equal to the record the child
was asked to write, and that every record written before the crash is unchanged.

The logic lives here, not in the CLI, so tests can run it; ``echo`` receives the human report.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from xpstore.crashwriter import record_for
from xpstore.errors import RecordNotFoundError, XpStoreError
from xpstore.persistence.layout import MARKER
from xpstore.store.records import KINDS, Fingerprint, PredictionOutcome, Record
from xpstore.store.store import Store
from xpstore.synthetic import make_mixed

log = logging.getLogger(__name__)

Echo = Callable[[str], None]

DEMO_T0 = 1_690_000_000.0
"""Timestamps of the demo's phase-1 records start here (about one a second), so runs repeat."""
_BATCH = 500
_SINGLE_PUTS = 100
_UPDATES = 50
_CHILD_THREADS = 4
_CHILD_BATCH = 8
_READY_TIMEOUT_S = 60.0
_ACK_TIMEOUT_S = 60.0


@dataclass
class DemoResult:
    """What the demo did and found; ``ok`` is False when an acknowledged record was lost."""

    path: str
    seed: int
    written: int = 0
    """Records written in phase 1 (puts; updates and the delete_track not counted)."""
    updated: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Live records per kind after phase 1."""
    warm_energetic: int = 0
    """Phase-1 warm_start predictions with audio_features.energy > 0.6 (the where= example)."""
    acked: int = 0
    """Records the child acknowledged before it was killed."""
    recovered: int = 0
    """Records of the child present after recovery (acknowledged or not: at least ``acked``)."""
    lost: list[int] = field(default_factory=list)
    """Acknowledged ids missing after recovery."""
    mismatched: list[int] = field(default_factory=list)
    """Acknowledged ids present but not equal to what the child wrote."""
    damaged_before: list[int] = field(default_factory=list)
    """Phase-1 ids missing or changed after the crash."""
    checked_before: int = 0
    """Phase-1 records (live at the end of phase 1) checked after the crash."""
    replayed_ops: int = 0
    truncated: list[dict[str, Any]] = field(default_factory=list)
    """Torn WAL tails cut off by recovery (segment and byte offset)."""
    recovery: dict[str, object] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: write, crash (child run), recover (reopen), verify, total."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.mismatched or self.damaged_before) and self.acked > 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _quiet(_line: str) -> None:
    """Default echo: say nothing."""


def run_demo(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    records: int = 3000,
    crash_after: int = 400,
    hold_applier: bool = False,
    echo: Echo = _quiet,
) -> DemoResult:
    """Run both phases on a new store at ``path`` and return what was checked.

    ``crash_after`` acknowledged records (at least) are awaited before the SIGKILL;
    ``hold_applier`` makes the child keep everything in its WAL so recovery replays all of it.
    Raises ValueError if ``path`` already holds something, XpStoreError/OSError on failures that
    are not about lost data (the child not starting, for instance).
    """
    root = Path(path)
    if (root / MARKER).exists() or (root.exists() and any(root.iterdir())):
        raise ValueError(f"{root} is not empty; the demo needs a new or empty directory")
    if records < 0 or crash_after < 1:
        raise ValueError("records must be >= 0 and crash_after >= 1")
    result = DemoResult(path=str(root), seed=seed)
    start = time.perf_counter()
    before = _phase_one(root, seed, records, result, echo)
    result.timings["write"] = round(time.perf_counter() - start, 3)
    acks = _phase_crash(root, seed, crash_after, hold_applier, result, echo)
    _phase_verify(root, seed, acks, before, result, echo)
    result.timings["total"] = round(time.perf_counter() - start, 3)
    _report(result, echo)
    return result


# ---------------------------------------------------------------------------- phase 1


def _phase_one(
    root: Path, seed: int, n: int, result: DemoResult, echo: Echo
) -> dict[int, Record]:
    """Write, update, delete, query; return every live record by id (to check after the crash)."""
    rng = np.random.default_rng(seed)
    recs = make_mixed(rng, n, t0=DEMO_T0)
    n_single = min(_SINGLE_PUTS, n // 10)
    bulk, singles = recs[: n - n_single], recs[n - n_single :]
    echo(f"== phase 1: writing {n} synthetic records to {root}")
    with Store.open(root, create=True) as store:
        ids: list[int] = []
        t = time.perf_counter()
        for i in range(0, len(bulk), _BATCH):
            ids += store.put_many(bulk[i : i + _BATCH])
        t_bulk = time.perf_counter() - t
        t = time.perf_counter()
        ids += [store.put(r) for r in singles]
        t_single = time.perf_counter() - t
        result.written = len(ids)
        echo(
            f"   put_many: {len(bulk)} records in batches of up to {_BATCH}, "
            f"{t_bulk * 1000:.0f} ms; put: {len(singles)} single records, {t_single * 1000:.0f} ms"
            f" (durability={store.config.durability})"
        )
        result.updated = _resolve_outcomes(store, ids, recs, rng)
        echo(f"   update: resolved the outcome (actual, reward) of {result.updated} predictions")
        _retire_track(store, recs, echo)
        result.counts = {k: store.count(k) for k in KINDS}
        echo("   live records: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
        if ids:
            env = store.get(ids[0])
            echo(f"   get({ids[0]}): a {env.kind}, ts {env.ts:.0f}: {_brief(env.record)}")
        where = {"context": "warm_start", "audio_features.energy__gt": 0.6}
        hits = list(store.scan("prediction", where=where))
        result.warm_energetic = len(hits)
        echo(f"   scan(kind='prediction', where={where}): {len(hits)} records, e.g.")
        for env in hits[:2]:
            echo(f"     id {env.id}: {_brief(env.record)}")
        before = {env.id: env.record for env in store.scan()}
    return before


def _resolve_outcomes(
    store: Store, ids: list[int], recs: list[Record], rng: np.random.Generator
) -> int:
    """Resolve some unresolved predictions, as an application does once the user chose."""
    done = 0
    for rid, rec in zip(ids, recs, strict=True):
        if done >= _UPDATES:
            break
        if isinstance(rec, PredictionOutcome) and rec.actual is None:
            correct = bool(rng.random() < 0.3 + 0.6 * rec.confidence)
            actual = rec.predicted if correct else ("warm" if rec.predicted != "warm" else "bright")
            store.update(rid, actual=actual, reward=1.0 if correct else -0.5)
            done += 1
    return done


def _retire_track(store: Store, recs: list[Record], echo: Echo) -> None:
    track = next((r.track_id for r in recs if isinstance(r, Fingerprint)), None)
    if track is None:
        return
    store.delete_track(track)
    try:
        store.get_fingerprint(track)
        echo(f"   delete_track({track!r}): still visible (unexpected)")
    except RecordNotFoundError:
        echo(f"   delete_track({track!r}): no longer found by get_fingerprint; history kept")


def _brief(record: Record) -> str:
    if isinstance(record, PredictionOutcome):
        energy = (record.audio_features or {}).get("energy")
        extra = f", energy {energy:.2f}" if energy is not None else ""
        return (
            f"predicted {record.predicted!r}, actual {record.actual!r}, "
            f"confidence {record.confidence:.2f}, context {record.context!r}{extra}"
        )
    data = record.model_dump(exclude_none=True)
    keys = list(data)[:4]
    return ", ".join(f"{k}={_clip(data[k])}" for k in keys)


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------- phase 2


@dataclass(frozen=True, slots=True)
class Ack:
    id: int
    thread: int
    seq: int


def _child_env() -> dict[str, str]:
    """The environment of the child: ours, with this xpstore importable first."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Copy the child's stdout into a queue, then None at EOF."""
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


def _phase_crash(
    root: Path, seed: int, crash_after: int, hold: bool, result: DemoResult, echo: Echo
) -> list[Ack]:
    """Start the crash writer, wait for ``crash_after`` ACKs, SIGKILL it; return every ACK."""
    cmd = [
        sys.executable, "-m", "xpstore.crashwriter", str(root),
        "--threads", str(_CHILD_THREADS), "--seed", str(seed), "--batch", str(_CHILD_BATCH),
    ]
    if hold:
        cmd.append("--hold-applier")
    echo(f"== phase 2: crash test: {_CHILD_THREADS} writer threads in a child process")
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_child_env()
    ) as child:
        assert child.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
        pump.start()
        acks: list[Ack] = []
        try:
            _await_acks(lines, acks, crash_after, child, err)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        pump.join(timeout=_ACK_TIMEOUT_S)
        _drain(lines, acks)  # ACKs printed between our last read and the kill count too
        code = child.returncode
    result.acked = len(acks)
    result.timings["crash"] = round(time.perf_counter() - t, 3)
    echo(
        f"   child pid {child.pid} acknowledged {len(acks)} records; killed with SIGKILL "
        f"(exit {code}) after {result.timings['crash']:.2f} s"
    )
    return acks


def _await_acks(
    lines: queue.Queue[str | None],
    acks: list[Ack],
    target: int,
    child: subprocess.Popen[str],
    err: IO[str],
) -> None:
    """Read READY, then ACK lines until ``target`` of them; raise if the child fails first."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    ready = False
    while len(acks) < target:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            raise XpStoreError(
                f"crash writer produced {len(acks)} ACKs in {_READY_TIMEOUT_S:.0f} s; giving up"
            ) from None
        if line is None:
            child.wait()
            err.seek(0)
            raise XpStoreError(
                f"crash writer exited with {child.returncode} before it was killed: "
                + (err.read().strip().splitlines() or ["(no output)"])[-1]
            )
        if not ready:
            ready = line.strip() == "READY"
            deadline = time.monotonic() + _ACK_TIMEOUT_S
            continue
        ack = _parse_ack(line)
        if ack is not None:
            acks.append(ack)


def _drain(lines: queue.Queue[str | None], acks: list[Ack]) -> None:
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return
        if line is None:
            return
        ack = _parse_ack(line)
        if ack is not None:
            acks.append(ack)


def _parse_ack(line: str) -> Ack | None:
    """An ``ACK id thread seq`` line; a partial last line (cut by the kill) is not an ACK."""
    if not line.endswith("\n"):
        return None
    parts = line.split()
    if len(parts) != 4 or parts[0] != "ACK":
        return None
    return Ack(int(parts[1]), int(parts[2]), int(parts[3]))


# ---------------------------------------------------------------------------- verify


def _phase_verify(
    root: Path,
    seed: int,
    acks: list[Ack],
    before: dict[int, Record],
    result: DemoResult,
    echo: Echo,
) -> None:
    """Reopen (recovery), then check every ACK and every phase-1 record."""
    echo("== recovery: reopening the store")
    t = time.perf_counter()
    with Store.open(root) as store:
        result.timings["recover"] = round(time.perf_counter() - t, 3)
        report = store.recovery_report
        if report is not None:
            result.recovery = report.as_dict()
            result.replayed_ops = report.replayed_ops
            result.truncated = [{"segment": s, "offset": o} for s, o in report.truncated]
        t = time.perf_counter()
        for ack in acks:
            try:
                got = store.get(ack.id).record
            except RecordNotFoundError:
                result.lost.append(ack.id)
                continue
            if got != record_for(seed, ack.thread, ack.seq):
                result.mismatched.append(ack.id)
        for rid, rec in before.items():
            try:
                if store.get(rid).record != rec:
                    result.damaged_before.append(rid)
            except RecordNotFoundError:
                result.damaged_before.append(rid)
        total = store.count()
        result.recovered = total - len(before)
        result.checked_before = len(before)
        result.timings["verify"] = round(time.perf_counter() - t, 3)


def _report(result: DemoResult, echo: Echo) -> None:
    echo(
        f"   reopened in {result.timings['recover'] * 1000:.0f} ms: replayed "
        f"{result.replayed_ops} WAL operations"
        + (
            "; truncated a torn tail at "
            + ", ".join(f"{t['segment']}@{t['offset']}" for t in result.truncated)
            if result.truncated
            else "; no torn tail"
        )
    )
    echo(
        f"   acknowledged {result.acked}, recovered {result.recovered} records of the child "
        f"(writes completed but not yet acknowledged may survive too)"
    )
    ok_acks = result.acked - len(result.lost) - len(result.mismatched)
    echo(
        f"   every acknowledged record present and equal: {ok_acks}/{result.acked}; "
        f"phase-1 records unchanged: {result.checked_before - len(result.damaged_before)}/"
        f"{result.checked_before}"
    )
    if result.lost:
        echo(f"   LOST {len(result.lost)} acknowledged records, e.g. ids {result.lost[:10]}")
    if result.mismatched:
        echo(f"   {len(result.mismatched)} records differ, e.g. ids {result.mismatched[:10]}")
    if result.damaged_before:
        echo(
            f"   {len(result.damaged_before)} phase-1 records missing or changed, e.g. "
            f"ids {result.damaged_before[:10]}"
        )
    echo(
        "== " + ("OK: nothing acknowledged was lost" if result.ok else "FAILED")
        + f" (total {result.timings['total']:.2f} s)"
    )
