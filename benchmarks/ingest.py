"""Ingest benchmark (issue 2): xpstore ``put``/``put_many`` against raw and SQLite baselines.

Every case runs in this one process, on the same disk and on the same records (a realistic mix
from ``xpstore.demo.synthetic.make_mixed``);
the raw baselines write the records' encoded bytes, so the
byte sizes match. Each repeat runs every case once, in an order rotated by one per repeat, and each
run gets a fresh directory. The table shows the median rate over the repeats, the spread, latency
percentiles pooled over the repeats (per put for single-record cases, per batch for batched ones)
and the ratio to the relevant baseline; then the issue's bars, each PASS or MISS.

    PYTHONPATH=. python benchmarks/ingest.py [--records 3000 --threads 8 --batch 1000
                                              --repeats 3 --dir /tmp --json out.json]

The timed part of an xpstore case ends when the last put is acknowledged (durable in the WAL,
visible to reads); the LMDB apply runs concurrently in the store's applier thread and what is left
of it at ``close()`` is reported as "drain". ``--held`` adds the xpstore cases on a store opened
with ``hold_applier=True`` (nothing applied to LMDB during the run), which isolates the WAL path.
``--profile CASE`` runs one case once more under cProfile (the calling thread only) and prints the
top entries. The workload's objects are ``gc.freeze()``d so that the collections the measured code
triggers do not walk the harness's data; the header reports the CPU other processes used during
the timed section (absolute timings on a shared VM are noisy: compare ratios within one run).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import pstats
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google_crc32c
import lmdb
import msgpack
import numpy as np
import pydantic
from _common import cpu_busy

import xpstore
from xpstore.demo.synthetic import make_mixed
from xpstore.model.codec import KIND_CODES, PutOp, encode_op
from xpstore.model.records import Record, kind_of, record_to_json
from xpstore.persistence.wal_format import encode_frame
from xpstore.store.store import Store

REPO = Path(__file__).resolve().parent.parent

perf = time.perf_counter


# --------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """The same records in every form a case needs, built once before any timing."""

    records: list[Record]  # validated models, ts set
    dicts: list[dict[str, Any]]  # {"kind": ..., **fields}: what put_many/ingest takes from JSON
    dumps: list[tuple[type[Any], dict[str, Any]]]  # (model class, model_dump) for validate+encode
    payloads: list[bytes]  # encode_op(PutOp(record)): the WAL operation bytes
    frames: list[bytes]  # one WAL frame per record (header + CRC + payload + pad)
    kinds: list[int]
    ts: list[float]
    threads: int
    batch: int

    @classmethod
    def build(cls, n: int, threads: int, batch: int, seed: int) -> Workload:
        rng = np.random.default_rng(seed)
        records = make_mixed(rng, n, t0=time.time() - n)
        payloads = [encode_op(PutOp(r)) for r in records]
        salt = b"\x01\x02\x03\x04"
        now = time.time()
        return cls(
            records=records,
            dicts=[record_to_json(r) for r in records],
            dumps=[(type(r), r.model_dump(exclude_none=True)) for r in records],
            payloads=payloads,
            frames=[encode_frame(salt, i + 1, [p], now) for i, p in enumerate(payloads)],
            kinds=[KIND_CODES[kind_of(r)] for r in records],
            ts=[float(r.ts) for r in records if r.ts is not None],
            threads=threads,
            batch=batch,
        )

    def batches(self, items: Sequence[Any]) -> list[Sequence[Any]]:
        return [items[i : i + self.batch] for i in range(0, len(items), self.batch)]


@dataclass
class Run:
    """One timed run of one case."""

    seconds: float
    n: int
    latencies: list[float]  # seconds, per put or per batch
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.seconds


def _timed_loop(items: Sequence[Any], fn: Callable[[Any], object]) -> tuple[float, list[float]]:
    lat: list[float] = []
    append = lat.append
    start = perf()
    for item in items:
        t = perf()
        fn(item)
        append(perf() - t)
    return perf() - start, lat


def _threaded(
    n_threads: int, items: Sequence[Any], fn: Callable[[Any], object]
) -> tuple[float, list[float]]:
    """Run ``fn`` over ``items`` split round-robin over threads released by one barrier."""
    barrier = threading.Barrier(n_threads + 1)
    lats: list[list[float]] = [[] for _ in range(n_threads)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        mine = items[i::n_threads]
        out = lats[i]
        barrier.wait()
        try:
            for item in mine:
                t = perf()
                fn(item)
                out.append(perf() - t)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = perf()
    for w in workers:
        w.join()
    seconds = perf() - start
    if errors:
        raise errors[0]
    return seconds, [x for lat in lats for x in lat]


# --------------------------------------------------------------------------- xpstore cases


def _open_store(d: Path, held: bool) -> Store:
    # held: the applier is held back (hold_applier, a documented test/benchmark setting), so
    # nothing is applied to LMDB during the run: isolates the WAL path from the apply work
    return Store.open(d / "store", create=True, durability="commit", hold_applier=held)


def _close_store(store: Store, n: int, run: Run) -> Run:
    wal = store.stats()["wal"]
    count = store.count()
    if count != n:
        raise RuntimeError(f"store holds {count} records after {n} puts")
    # diagnostics from internals, read defensively (they are not API and may change)
    applier = getattr(store, "_applier", None)
    apply_txns = getattr(applier, "batches", None)
    wal_stats = getattr(getattr(store, "_wal", None), "stats", None)
    t = perf()
    store.close()
    run.extra["drain_s"] = perf() - t
    run.extra["ops_per_sync"] = float(wal["ops_per_sync"] or 0.0)
    if isinstance(apply_txns, int):
        run.extra["lmdb_apply_txns"] = float(apply_txns)
    syncs = getattr(wal_stats, "syncs", 0)
    if syncs:
        run.extra["wal_sync_s"] = float(getattr(wal_stats, "sync_seconds", 0.0)) / syncs
    return run


def xpstore_case(how: str, *, held: bool = False) -> Callable[[Workload, Path], Run]:
    """``how``: "put_1t", "put_nt", "put_many_dicts" or "put_many_models"."""

    def run(w: Workload, d: Path) -> Run:
        store = _open_store(d, held)
        collector = _CollectorTime()
        cpu = time.process_time()
        if how == "put_1t":
            seconds, lat = _timed_loop(w.records, store.put)
        elif how == "put_nt":
            seconds, lat = _threaded(w.threads, w.records, store.put)
        elif how == "put_many_dicts":
            seconds, lat = _timed_loop(w.batches(w.dicts), store.put_many)
        elif how == "put_many_models":
            seconds, lat = _timed_loop(w.batches(w.records), store.put_many)
        else:
            raise ValueError(how)
        cpu = time.process_time() - cpu
        gc_s = collector.stop()
        n = len(w.records)
        return _close_store(store, n, Run(seconds, n, lat, {"cpu_s": cpu, "gc_s": gc_s / n}))

    return run


class _CollectorTime:
    """Seconds the garbage collector ran (every thread) from creation to :meth:`stop`: a
    diagnostic, since a batch's surviving objects cost collections (docs/benchmarks.md)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start: dict[int, float] = {}
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, _info: dict[str, int]) -> None:
        ident = threading.get_ident()
        if phase == "start":
            self._start[ident] = perf()
        elif ident in self._start:
            self.total += perf() - self._start.pop(ident)

    def stop(self) -> float:
        gc.callbacks.remove(self._callback)
        return self.total


# --------------------------------------------------------------------------- baselines


def _sqlite(d: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(d / "bench.sqlite", isolation_level=None, check_same_thread=False)
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise RuntimeError(f"SQLite refused WAL mode ({mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE rec (id INTEGER PRIMARY KEY, kind INTEGER NOT NULL, ts REAL NOT NULL,"
        " data BLOB NOT NULL)"
    )
    conn.execute("CREATE INDEX rec_kind_ts ON rec (kind, ts)")  # xpstore keeps (kind, ts, id)
    return conn


_INSERT = "INSERT INTO rec (kind, ts, data) VALUES (?, ?, ?)"


def _rows(w: Workload) -> list[tuple[int, float, bytes]]:
    return list(zip(w.kinds, w.ts, w.payloads, strict=True))


def case_sqlite_auto(w: Workload, d: Path) -> Run:
    conn = _sqlite(d)
    rows = _rows(w)
    execute = conn.execute
    seconds, lat = _timed_loop(rows, lambda row: execute(_INSERT, row))
    conn.close()
    return Run(seconds, len(rows), lat)


def case_sqlite_batch(w: Workload, d: Path) -> Run:
    conn = _sqlite(d)
    rows = _rows(w)

    def txn(chunk: Sequence[tuple[int, float, bytes]]) -> None:
        conn.execute("BEGIN")
        conn.executemany(_INSERT, chunk)
        conn.execute("COMMIT")

    seconds, lat = _timed_loop(w.batches(rows), txn)
    conn.close()
    return Run(seconds, len(rows), lat)


def case_lmdb_batch(w: Workload, d: Path) -> Run:
    env = lmdb.open(str(d / "lmdb"), map_size=1 << 30, sync=True, metasync=True)
    items = [(i.to_bytes(8, "big"), p) for i, p in enumerate(w.payloads, 1)]

    def txn(chunk: Sequence[tuple[bytes, bytes]]) -> None:
        with env.begin(write=True) as t:
            t.cursor().putmulti(chunk, append=True)

    seconds, lat = _timed_loop(w.batches(items), txn)
    env.close()
    return Run(seconds, len(items), lat)


def case_raw_fsync(w: Workload, d: Path) -> Run:
    fd = os.open(d / "raw.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    write, sync = os.write, os.fdatasync

    def commit(frame: bytes) -> None:
        write(fd, frame)
        sync(fd)

    seconds, lat = _timed_loop(w.frames, commit)
    os.close(fd)
    return Run(seconds, len(w.frames), lat)


def case_raw_prealloc(w: Workload, d: Path) -> Run:
    """As raw_fsync, but overwriting a preallocated file: fdatasync without a size update."""
    fd = os.open(d / "prealloc.log", os.O_WRONLY | os.O_CREAT, 0o644)
    os.posix_fallocate(fd, 0, sum(map(len, w.frames)) + 4096)
    os.fsync(fd)
    write, sync = os.write, os.fdatasync

    def commit(frame: bytes) -> None:
        write(fd, frame)
        sync(fd)

    seconds, lat = _timed_loop(w.frames, commit)
    os.close(fd)
    return Run(seconds, len(w.frames), lat)


def case_raw_zeroed(w: Workload, d: Path) -> Run:
    """As raw_prealloc, but the space zero-filled with real writes and synced first (what a
    preallocated WAL segment does): each fdatasync overwrites written blocks, no extent to
    convert. ``posix_fallocate`` leaves unwritten extents, which ext4 converts at each sync."""
    fd = os.open(d / "zeroed.log", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, bytes(sum(map(len, w.frames)) + 4096))
    os.fsync(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    write, sync = os.write, os.fdatasync

    def commit(frame: bytes) -> None:
        write(fd, frame)
        sync(fd)

    seconds, lat = _timed_loop(w.frames, commit)
    os.close(fd)
    return Run(seconds, len(w.frames), lat)


class MiniGroupCommit:
    """Leader/follower group commit in its smallest form: one Condition, one write, one sync."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.cond = threading.Condition(threading.Lock())
        self.pending: list[bytes] = []
        self.next_seq = 1
        self.durable_seq = 0
        self.leading = False
        self.syncs = 0

    def commit(self, frame: bytes) -> None:
        with self.cond:
            seq = self.next_seq
            self.next_seq += 1
            self.pending.append(frame)
            while True:
                if self.durable_seq >= seq:
                    return
                if not self.leading:
                    self.leading = True
                    batch, self.pending = self.pending, []
                    last = self.next_seq - 1
                    break
                self.cond.wait()
        os.write(self.fd, b"".join(batch))
        os.fdatasync(self.fd)
        with self.cond:
            self.syncs += 1
            self.durable_seq = last
            self.leading = False
            self.cond.notify_all()


def case_mini_gc(w: Workload, d: Path) -> Run:
    fd = os.open(d / "gc.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    gc = MiniGroupCommit(fd)
    seconds, lat = _threaded(w.threads, w.frames, gc.commit)
    size = os.fstat(fd).st_size
    os.close(fd)
    if size != sum(map(len, w.frames)):
        raise RuntimeError("minimal group commit lost frames")
    return Run(seconds, len(w.frames), lat, {"ops_per_sync": len(w.frames) / gc.syncs})


_SALT = b"\x01\x02\x03\x04"


def _encoded(record: Record) -> tuple[bytes, bytes]:
    """A record's WAL payload and frame, as any store of these records must make them before
    they reach its log (the frame's LSN is a placeholder: the same bytes and CRC work)."""
    payload = encode_op(PutOp(record))
    return payload, encode_frame(_SALT, 1, [payload], time.time())


class MiniCombining:
    """The group commit of the floors below, in the form that measured fastest here (faster
    than :class:`MiniGroupCommit`): writers queue their frame, one leads, followers sleep on
    their own gate (a held lock released to wake them), the leader writes and syncs the whole
    queue, then hands ``after(first_seq, payloads)`` the group (inline, before anyone is woken)
    and wakes the next leader and its followers."""

    def __init__(self, fd: int, after: Callable[[int, list[bytes]], None] | None) -> None:
        self.fd = fd
        self.after = after
        self.mu = threading.Lock()
        self.queue: list[list[Any]] = []
        self.leading = False
        self.next_seq = 1
        self.syncs = 0

    def commit(self, payload: bytes, frame: bytes) -> None:
        gate = threading.Lock()
        gate.acquire()
        item: list[Any] = [frame, payload, gate, False]
        with self.mu:
            self.queue.append(item)
            lead = not self.leading
            self.leading = True
        if not lead:
            gate.acquire()
            if not item[3]:  # woken because its group is durable, not to lead
                return
        with self.mu:
            batch, self.queue = self.queue, []
        os.write(self.fd, b"".join([i[0] for i in batch]))
        os.fdatasync(self.fd)
        self.syncs += 1
        first = self.next_seq
        self.next_seq += len(batch)
        if self.after is not None:
            self.after(first, [i[1] for i in batch])
        with self.mu:
            nxt = self.queue[0] if self.queue else None
            if nxt is None:
                self.leading = False
            else:
                nxt[3] = True
        if nxt is not None:
            nxt[2].release()
        for i in batch:
            if i is not item:
                i[2].release()


class MiniApplier:
    """Writes synced groups into LMDB: one transaction per call (``inline``: in the caller,
    the WAL leader) or per wake-up of its own thread (as xpstore's applier); keys in log order,
    no fsync (the WAL holds durability)."""

    def __init__(self, env: lmdb.Environment, *, inline: bool) -> None:
        self.env = env
        self.cond = threading.Condition(threading.Lock())
        self.groups: list[tuple[int, list[bytes]]] = []
        self.stopping = False
        self.thread = None if inline else threading.Thread(target=self._loop, daemon=True)
        if self.thread is not None:
            self.thread.start()

    def __call__(self, first: int, payloads: list[bytes]) -> None:
        if self.thread is None:
            self._write([(first, payloads)])
            return
        with self.cond:
            self.groups.append((first, payloads))
            self.cond.notify()

    def _write(self, groups: list[tuple[int, list[bytes]]]) -> None:
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            for first, payloads in groups:
                cur.putmulti(
                    [(s.to_bytes(8, "big"), p) for s, p in enumerate(payloads, first)],
                    append=True,
                )

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.groups and not self.stopping:
                    self.cond.wait()
                groups, self.groups = self.groups, []
            if groups:
                self._write(groups)
            elif self.stopping:
                return

    def close(self) -> int:
        """Drain; return the number of records in LMDB."""
        if self.thread is not None:
            with self.cond:
                self.stopping = True
                self.cond.notify()
            self.thread.join()
        with self.env.begin() as txn:
            n = int(txn.stat()["entries"])
        self.env.close()
        return n


def mini_case(apply: str | None) -> Callable[[Workload, Path], Run]:
    """A floor under xpstore's N-thread put: each thread encodes and frames its record (what
    any store of these records must do) and commits it through :class:`MiniCombining`;
    ``apply`` None: nothing more; "thread" or "inline": the smallest LMDB apply of each group
    (:class:`MiniApplier`). No validation, no derived state, no reads."""

    def run(w: Workload, d: Path) -> Run:
        fd = os.open(d / "wal.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        applier = None
        if apply is not None:
            env = lmdb.open(str(d / "lmdb"), map_size=1 << 30, sync=False, metasync=False)
            applier = MiniApplier(env, inline=apply == "inline")
        gc_ = MiniCombining(fd, applier)
        commit = gc_.commit

        def put(record: Record) -> None:
            commit(*_encoded(record))

        seconds, lat = _threaded(w.threads, w.records, put)
        extra = {"ops_per_sync": len(w.records) / gc_.syncs}
        size = os.fstat(fd).st_size
        os.close(fd)
        if size != sum(map(len, w.frames)):
            raise RuntimeError("the floor's WAL lost frames")
        if applier is not None:
            t = perf()
            applied = applier.close()
            extra["drain_s"] = perf() - t
            if applied != len(w.records):
                raise RuntimeError(f"the floor applied {applied} of {len(w.records)} records")
        return Run(seconds, len(w.records), lat, extra)

    return run


def case_validate_encode(w: Workload, _d: Path) -> Run:
    def one(item: tuple[type[Any], dict[str, Any]]) -> None:
        encode_op(PutOp(item[0].model_validate(item[1])))

    cpu = time.process_time()
    seconds, lat = _timed_loop(w.dumps, one)
    return Run(seconds, len(w.dumps), lat, {"cpu_s": time.process_time() - cpu})


def case_validate_direct(w: Workload, _d: Path) -> Run:
    """validate_encode with each model's pydantic validator called directly, as put_many does
    (``model_validate`` only forwards to it): the stricter baseline for the put_many bar."""
    items = [(cls.__pydantic_validator__, data) for cls, data in w.dumps]

    def one(item: tuple[Any, dict[str, Any]]) -> None:
        encode_op(PutOp(item[0].validate_python(item[1])))

    cpu = time.process_time()
    seconds, lat = _timed_loop(items, one)
    return Run(seconds, len(items), lat, {"cpu_s": time.process_time() - cpu})


# --------------------------------------------------------------------------- case table


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    fn: Callable[[Workload, Path], Run]
    per: str  # "put" or "batch": what a latency sample covers
    baseline: str | None  # key of the case the ratio column compares against


def cases(threads: int, batch: int, held: bool) -> list[Case]:
    out = [
        Case("put_1t", "xpstore put, 1 thread, commit", xpstore_case("put_1t"), "put", "raw_fsync"),
        Case(
            "put_nt",
            f"xpstore put, {threads} threads, commit",
            xpstore_case("put_nt"),
            "put",
            "mini_gc",
        ),
        Case(
            "put_many_dicts",
            f"xpstore put_many({batch} dicts), commit",
            xpstore_case("put_many_dicts"),
            "batch",
            "validate_encode",
        ),
        Case(
            "put_many_models",
            f"xpstore put_many({batch} models), commit",
            xpstore_case("put_many_models"),
            "batch",
            "validate_encode",
        ),
        Case(
            "sqlite_auto",
            "SQLite WAL FULL, autocommit, 1 thread",
            case_sqlite_auto,
            "put",
            "raw_fsync",
        ),
        Case(
            "sqlite_batch",
            f"SQLite WAL FULL, {batch}/txn",
            case_sqlite_batch,
            "batch",
            "lmdb_batch",
        ),
        Case("lmdb_batch", f"raw LMDB, {batch}/txn, sync", case_lmdb_batch, "batch", None),
        Case("raw_fsync", "raw append + fdatasync per record", case_raw_fsync, "put", None),
        Case(
            "raw_prealloc",
            "raw overwrite, preallocated file + fdatasync",
            case_raw_prealloc,
            "put",
            "raw_fsync",
        ),
        Case(
            "raw_zeroed",
            "raw overwrite, zero-filled file + fdatasync",
            case_raw_zeroed,
            "put",
            "raw_fsync",
        ),
        Case(
            "mini_gc", f"minimal group commit, {threads} threads", case_mini_gc, "put", "raw_fsync"
        ),
        Case(
            "validate_encode", "validate + encode only (no I/O)", case_validate_encode, "put", None
        ),
        Case(
            "validate_direct",
            "validate (the validator called directly) + encode only (no I/O)",
            case_validate_direct,
            "put",
            None,
        ),
        Case(
            "mini_enc",
            f"floor: encode + combining group commit, {threads} threads",
            mini_case(None),
            "put",
            "mini_gc",
        ),
        Case(
            "mini_store",
            f"floor: encode + combining group commit + LMDB applier thread, {threads} threads",
            mini_case("thread"),
            "put",
            "mini_gc",
        ),
        Case(
            "mini_inline",
            f"floor: encode + combining group commit + LMDB apply by the leader, {threads} threads",
            mini_case("inline"),
            "put",
            "mini_gc",
        ),
    ]
    if held:
        for key, base, per in (
            ("put_1t", "raw_fsync", "put"),
            ("put_nt", "mini_gc", "put"),
            ("put_many_dicts", "validate_encode", "batch"),
        ):
            label = next(c.label for c in out if c.key == key)
            out.append(
                Case(
                    f"{key}_held",
                    f"{label}, applier held",
                    xpstore_case(key, held=True),
                    per,
                    base,
                )
            )
    return out


# --------------------------------------------------------------------------- machine


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine(bench_dir: Path) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    df = _run(["df", "-T", str(bench_dir)]).splitlines()
    fs = df[1].split() if len(df) > 1 else ["?", "?", "", "", "", "", "?"]
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "bench_dir": str(bench_dir),
        "fs_device": fs[0],
        "fs_type": fs[1],
        "fs_mount": fs[-1],
        "same_device_as_repo": os.stat(bench_dir).st_dev == os.stat(REPO).st_dev,
        "loadavg_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "versions": {
            "xpstore": xpstore.__version__,
            "lmdb": lmdb.__version__,
            "sqlite": sqlite3.sqlite_version,
            "pydantic": pydantic.VERSION,
            "msgpack": ".".join(map(str, msgpack.version)),
            "google-crc32c": f"{_version('google-crc32c')} ({google_crc32c.implementation})",
            "numpy": np.__version__,
        },
    }


def _cpu_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    return cpu_busy(children=False)


# --------------------------------------------------------------------------- report


def fmt_rate(x: float) -> str:
    return f"{x / 1000:,.1f} k" if x >= 10_000 else f"{x:,.0f}"


def fmt_dur(s: float) -> str:
    if s >= 0.1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


@dataclass
class Result:
    case: Case
    runs: list[Run]

    @property
    def rates(self) -> list[float]:
        return [r.rate for r in self.runs]

    @property
    def median(self) -> float:
        return float(np.median(self.rates))

    def pct(self, q: float) -> float:
        return float(np.percentile([x for r in self.runs for x in r.latencies], q))

    def extra(self, key: str) -> float | None:
        vals = [r.extra[key] for r in self.runs if key in r.extra]
        return float(np.median(vals)) if vals else None


def table(results: dict[str, Result]) -> str:
    head = (
        "| case | records/s (median) | min-max | latency of | p50 | p99 | ratio | vs |\n"
        "|---|---:|---:|---|---:|---:|---:|---|"
    )
    lines = [head]
    for res in results.values():
        c = res.case
        base = results.get(c.baseline) if c.baseline else None
        ratio = f"{res.median / base.median:.2f}x" if base else "—"
        vs = base.case.label if base else "(baseline)"
        lines.append(
            f"| {c.label} | {fmt_rate(res.median)} | {fmt_rate(min(res.rates))}-"
            f"{fmt_rate(max(res.rates))} | {c.per} | {fmt_dur(res.pct(50))} | "
            f"{fmt_dur(res.pct(99))} | {ratio} | {vs} |"
        )
    return "\n".join(lines)


def bars(results: dict[str, Result]) -> list[dict[str, Any]]:
    spec = [
        ("1-thread commit put ≥ 0.7x raw append+fdatasync", "put_1t", "raw_fsync", 0.7),
        ("N-thread commit put ≥ 0.8x minimal group commit", "put_nt", "mini_gc", 0.8),
        ("N-thread commit put ≥ 2x SQLite FULL autocommit", "put_nt", "sqlite_auto", 2.0),
        (
            "put_many (dicts) ≥ 0.5x validation+encoding only",
            "put_many_dicts",
            "validate_encode",
            0.5,
        ),
        (
            "put_many (dicts) ≥ 0.5x validation (validator called directly)+encoding only",
            "put_many_dicts",
            "validate_direct",
            0.5,
        ),
    ]
    out = []
    for text, a, b, need in spec:
        if a in results and b in results:
            r = results[a].median / results[b].median
            held = results.get(f"{a}_held")
            ca, cb = results[a].extra("cpu_s"), results[b].extra("cpu_s")
            out.append(
                {
                    "bar": text,
                    "case": a,
                    "baseline": b,
                    "need": need,
                    "ratio": r,
                    "pass": r >= need,
                    "ratio_applier_held": held.median / results[b].median if held else None,
                    # records per CPU-second of the process (all threads), which other jobs on
                    # a shared machine disturb far less than the wall clock
                    "ratio_cpu": cb / ca if ca and cb else None,
                    # the median of each repeat's own ratio: the two cases of one repeat run
                    # seconds apart, so a host whose speed drifts over the run (this VM's
                    # baselines moved 60-120 k/s within one run) disturbs it far less
                    "ratio_paired": _paired(results[a], results[b]),
                    "floor": _floor(results, a, b),
                }
            )
    return out


def _paired(a: Result, b: Result) -> float | None:
    """Median over repeats of ``a``'s rate over ``b``'s in the same repeat."""
    if len(a.runs) != len(b.runs) or not a.runs:
        return None
    return float(np.median([x / y for x, y in zip(a.rates, b.rates, strict=True)]))


def _floor(results: dict[str, Result], case: str, baseline: str) -> tuple[str, float] | None:
    """For the N-thread put bars: the fastest floor that writes LMDB (``mini_store``,
    ``mini_inline``) measured in the run, and its ratio to the bar's baseline."""
    if case != "put_nt":
        return None
    floors = [results[k] for k in ("mini_store", "mini_inline") if k in results]
    if not floors:
        return None
    best = max(floors, key=lambda r: r.median)
    return best.case.key, best.median / results[baseline].median


def profile_case(case: Case, w: Workload, root: Path, top: int) -> None:
    d = Path(tempfile.mkdtemp(prefix=f"profile-{case.key}-", dir=root))
    prof = cProfile.Profile()
    try:
        prof.enable()
        case.fn(w, d)
        prof.disable()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"\n**cProfile of {case.label}** (calling thread only), top {top} by tottime\n")
    print("```")
    pstats.Stats(prof, stream=sys.stdout).strip_dirs().sort_stats("tottime").print_stats(top)
    print("```")


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=3000, help="records per case per repeat")
    p.add_argument("--threads", type=int, default=8, help="threads for the concurrent cases")
    p.add_argument("--batch", type=int, default=1000, help="records per batch / transaction")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="parent of the temp bench dir (default: $TMPDIR)")
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--only", default=None, help="comma-separated case keys to run")
    p.add_argument("--no-warmup", action="store_true", help="skip the small untimed warm-up")
    p.add_argument(
        "--held",
        action="store_true",
        help="also run the xpstore put cases with the applier held (no LMDB apply during the run)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--profile", default=None, help="case key to run once more under cProfile")
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)

    all_cases = cases(args.threads, args.batch, args.held)
    if args.only:
        keys = set(args.only.split(","))
        unknown = keys - {c.key for c in all_cases}
        if unknown:
            p.error(f"unknown case(s) {sorted(unknown)}; known: {[c.key for c in all_cases]}")
        all_cases = [c for c in all_cases if c.key in keys]

    root = Path(tempfile.mkdtemp(prefix="xpstore-ingest-", dir=args.dir))
    try:
        info = machine(root)
        t_gen = perf()
        w = Workload.build(args.records, args.threads, args.batch, args.seed)
        t_gen = perf() - t_gen
        avg = float(np.mean([len(x) for x in w.payloads]))
        avg_frame = float(np.mean([len(x) for x in w.frames]))
        kinds = {k: w.kinds.count(c) for k, c in KIND_CODES.items()}

        print("# xpstore ingest benchmark (issue 2)\n")
        print(f"- date: {info['date']}")
        print(f"- machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}")
        print(
            f"- bench dir: {info['bench_dir']} on {info['fs_device']} ({info['fs_type']}, "
            f"mounted at {info['fs_mount']}); same device as the repo: "
            f"{'yes' if info['same_device_as_repo'] else 'no'}"
        )
        print(
            f"- Python {info['python']}; "
            + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
        )
        print(
            f"- workload: {args.records} records per case per repeat ({kinds}), op payload "
            f"{avg:.0f} B mean, WAL frame of one record {avg_frame:.0f} B mean; "
            f"{args.threads} threads, batches of {args.batch}, {args.repeats} repeats "
            f"(order rotated per repeat), generated in {t_gen:.1f} s; workload objects "
            "gc.freeze()d, gc.collect() before each run"
        )
        print(f"- command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}\n")

        if not args.no_warmup:
            small = Workload.build(
                min(200, args.records), args.threads, min(args.batch, 50), args.seed + 1
            )
            for c in all_cases:
                d = Path(tempfile.mkdtemp(prefix="warm-", dir=root))
                c.fn(small, d)
                shutil.rmtree(d, ignore_errors=True)

        # the workload's objects (four forms of every record) would otherwise be traversed by
        # every full GC collection the measured code triggers: move them out of the collector's
        # sight; each run also starts from a collected heap
        gc.collect()
        gc.freeze()
        results = {c.key: Result(c, []) for c in all_cases}
        busy0, own0 = _cpu_busy()
        t_all = perf()
        for rep in range(args.repeats):
            k = rep % len(all_cases)
            for c in all_cases[k:] + all_cases[:k]:
                d = Path(tempfile.mkdtemp(prefix=f"{c.key}-", dir=root))
                gc.collect()
                try:
                    results[c.key].runs.append(c.fn(w, d))
                finally:
                    shutil.rmtree(d, ignore_errors=True)
        t_all = perf() - t_all
        busy1, own1 = _cpu_busy()
        other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t_all * (os.cpu_count() or 1))
        info["other_cpu_share"] = other
        info["loadavg_end"] = os.getloadavg()[0]

        print(table(results))
        print()
        notes = []
        for key, res in results.items():
            if key.startswith(("put", "mini_")):
                ops = res.extra("ops_per_sync")
                part = f"{res.case.label}: {ops:.1f} records per fdatasync"
                sync = res.extra("wal_sync_s")
                if sync is not None:
                    part += f" (mean WAL fdatasync {fmt_dur(sync)})"
                txns = res.extra("lmdb_apply_txns")
                if txns is not None:
                    part += f", {txns:.0f} LMDB apply transactions during the run"
                drain = res.extra("drain_s")
                if drain is not None:
                    part += f", close (LMDB drain) {fmt_dur(drain)}"
                collected = res.extra("gc_s")
                if collected is not None:
                    part += f", garbage collector {collected * 1e6:.2f} µs a record"
                notes.append(part)
        for n in notes:
            print(f"- {n}")
        noisy = "; NOISY: compare ratios only" if other > 0.1 else ""
        print(
            f"- timed section: {t_all:.1f} s; other processes used {other:.0%} of the machine's "
            f"CPU meanwhile (load average {info['loadavg_start']:.2f} at start, "
            f"{info['loadavg_end']:.2f} at end){noisy}\n"
        )

        checks = bars(results)
        if checks:
            print("**Bars**\n")
            for b in checks:
                verdict = "PASS" if b["pass"] else "MISS"
                held = b["ratio_applier_held"]
                note = f" (applier held: {held:.2f}x)" if held is not None else ""
                if b["ratio_cpu"] is not None:
                    note += f" (per CPU-second: {b['ratio_cpu']:.2f}x)"
                if b["ratio_paired"] is not None:
                    note += f" (median of each repeat's own ratio: {b['ratio_paired']:.2f}x)"
                print(
                    f"- {verdict} {b['bar'].replace('N-thread', f'{args.threads}-thread')}: "
                    f"{b['ratio']:.2f}x{note}"
                )
                if b["floor"] is not None:
                    key, ratio = b["floor"]
                    where = "below" if ratio < b["need"] else "at or above"
                    print(
                        f"  - the fastest WAL + LMDB floor ({key}) reaches {ratio:.2f}x: {where} "
                        f"the bar's {b['need']}x; xpstore reaches {b['ratio'] / ratio:.2f}x of it"
                    )

        if args.json:
            out = {
                "machine": info,
                "args": vars(args),
                "workload": {
                    "payload_mean_bytes": avg,
                    "frame_mean_bytes": avg_frame,
                    "kinds": kinds,
                },
                "cases": {
                    key: {
                        "label": r.case.label,
                        "latency_of": r.case.per,
                        "baseline": r.case.baseline,
                        "rates": r.rates,
                        "median_rate": r.median,
                        "p50_s": r.pct(50),
                        "p99_s": r.pct(99),
                        "extra": {
                            k: r.extra(k)
                            for k in ("ops_per_sync", "drain_s", "lmdb_apply_txns", "wal_sync_s",
                                      "gc_s")
                        },
                    }
                    for key, r in results.items()
                },
                "bars": checks,
            }
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
            print(f"\nwrote {args.json}")

        if args.profile:
            every = cases(args.threads, args.batch, held=True)
            match = [c for c in every if c.key == args.profile]
            if not match:
                p.error(f"unknown case {args.profile!r} for --profile")
            profile_case(match[0], w, root, args.profile_top)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
