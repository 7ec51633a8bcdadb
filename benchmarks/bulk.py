"""Bulk fingerprint ingest (issue 15, item 2): ``put_fingerprints`` against its floors.

One process run measures, on the same styled fingerprints (the 25 batch values, title/artist/
style metadata), in batches:

- **put_fingerprints** (``durability="commit"``, the applier running) and **put_fingerprints,
  applier held** (nothing applied to LMDB during the run: the writer's path alone), and
  **put_many (dicts)** of the same fingerprints;
- the floors the store cannot go below on this machine: **encode only** (columns validated and
  encoded, envelopes built: no I/O, no overlay), **raw WAL** (the encoded batches' frames
  appended to a file with one fdatasync each: no Python per row), **LMDB apply** (what the
  applier spends per row to move the batch into LMDB, measured on its own after a held run),
  **raw LMDB** (the envelopes put into one LMDB table by ``putmulti``: no Python per row) and
  **the smallest store** (encode, one WAL frame + fdatasync and the raw LMDB put of each batch,
  in one thread: a durable store that keeps nothing but the records).

Each case reports fingerprints per second of wall-clock time, per CPU-second of the calling
thread (the critical path: validation, encoding, the WAL leader's write and sync) and per
CPU-second of the whole process (the applier thread included). On a shared machine the wall
clock is disturbed by other processes far more than CPU seconds are: compare the CPU columns.

``--baseline DIR`` runs the xpstore cases also from another source tree (a checkout of the code
before a change) in alternating child processes, so before and after come from one run:

    PYTHONPATH=. python benchmarks/bulk.py [--tracks 50000 --batch 5000 --repeats 3]
    git archive main | tar -x -C /tmp/base
    PYTHONPATH=. python benchmarks/bulk.py --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_busy as _cpu_busy

perf = time.perf_counter
STYLES = ("techno", "ambient", "metal", "jazz", "classical", "hip_hop", "folk", "drum_and_bass")


@dataclass
class Data:
    track_ids: list[str]
    values: np.ndarray[Any, Any]  # (n, 25)
    metadata: list[dict[str, str]]


def make_data(n: int, seed: int) -> Data:
    from xpstore.demo.synthetic import sample_batch_values

    rng = np.random.default_rng(seed)
    styles = [STYLES[i % len(STYLES)] for i in range(n)]
    values = np.empty((n, 25))
    for j, style in enumerate(STYLES):  # rows j, j + 8, ...: one call per style
        rows = values[j :: len(STYLES)]
        rows[:] = sample_batch_values(rng, style, rows.shape[0])
    meta = [{"title": f"Track {i}", "artist": f"Artist {i % 7919}", "style": styles[i]}
            for i in range(n)]  # fmt: skip
    return Data([f"t{i:07d}" for i in range(n)], values, meta)


def _batches(n: int, b: int) -> list[tuple[int, int]]:
    return [(i, min(n, i + b)) for i in range(0, n, b)]


@dataclass
class Timing:
    wall: float
    thread: float
    process: float
    extra: float = 0.0  # case-specific seconds (drain at close)


def _timed(fn: Callable[[], object]) -> Timing:
    gc.collect()
    w, t, p = perf(), time.thread_time(), time.process_time()
    fn()
    return Timing(perf() - w, time.thread_time() - t, time.process_time() - p)


# --------------------------------------------------------------------------- xpstore cases


def case_put_fingerprints(d: Data, root: Path, batch: int, held: bool) -> Timing:
    from xpstore import Store

    n = len(d.track_ids)
    s = Store.open(root / "s", create=True, durability="commit", hold_applier=held,
                   map_size=int(max(1 << 30, n * 4096)), index_auto_rebuild=False)  # fmt: skip

    def run() -> None:
        for lo, hi in _batches(n, batch):
            s.put_fingerprints(d.track_ids[lo:hi], d.values[lo:hi], metadata=d.metadata[lo:hi])

    t = _timed(run)
    if s.count("fingerprint") != n:
        raise RuntimeError("the store lost fingerprints")
    w = perf()
    s.close()
    t.extra = perf() - w
    return t


def case_put_many(d: Data, root: Path, batch: int) -> Timing:
    from xpstore import Store
    from xpstore.model.records import BATCH_FIELDS

    n = len(d.track_ids)
    dicts = [{"kind": "fingerprint", "track_id": t, "metadata": m,
              "batch": dict(zip(BATCH_FIELDS, v, strict=True))}
             for t, m, v in zip(d.track_ids, d.metadata, d.values.tolist(),
                                strict=True)]  # fmt: skip
    gc.freeze()
    s = Store.open(root / "m", create=True, durability="commit",
                   map_size=int(max(1 << 30, n * 4096)), index_auto_rebuild=False)  # fmt: skip

    def run() -> None:
        for lo, hi in _batches(n, batch):
            s.put_many(dicts[lo:hi])

    t = _timed(run)
    w = perf()
    s.close()
    t.extra = perf() - w
    gc.unfreeze()
    return t


def case_lmdb_apply(d: Data, root: Path, batch: int) -> Timing:
    """The applier's work per row, alone: a held run, then every effect applied in this
    thread (one LMDB transaction per ``apply.batch_ops``)."""
    from xpstore import Store

    n = len(d.track_ids)
    s = Store.open(root / "a", create=True, durability="commit", hold_applier=True,
                   map_size=int(max(1 << 30, n * 4096)), index_auto_rebuild=False)  # fmt: skip
    for lo, hi in _batches(n, batch):
        s.put_fingerprints(d.track_ids[lo:hi], d.values[lo:hi], metadata=d.metadata[lo:hi])
    applier = s.parts.engine.applier
    assert applier is not None
    t = _timed(applier.apply_all)
    s.close()
    return t


def case_encode_only(d: Data, _root: Path, batch: int) -> Timing:
    """Validation and encoding as put_fingerprints does them, no I/O and no overlay."""
    from xpstore.model.codec import encode_fingerprint_puts, envelopes_from_puts
    from xpstore.model.columns import fingerprint_columns

    n = len(d.track_ids)

    def run() -> None:
        for lo, hi in _batches(n, batch):
            cols = fingerprint_columns(d.track_ids[lo:hi], d.values[lo:hi],
                                       metadata=d.metadata[lo:hi])  # fmt: skip
            payloads = encode_fingerprint_puts(cols)
            envelopes_from_puts(payloads, kind="fingerprint", ts=cols.ts, first_lsn=lo + 1)

    return _timed(run)


def case_raw_wal(d: Data, root: Path, batch: int) -> Timing:
    """The encoded batches' frames (built before the timing) appended with one fdatasync
    each: what the disk allows the WAL, with no Python work per row."""
    from xpstore.model.codec import encode_fingerprint_puts
    from xpstore.model.columns import fingerprint_columns
    from xpstore.persistence.wal_format import encode_frame

    n = len(d.track_ids)
    frames = []
    for lo, hi in _batches(n, batch):
        cols = fingerprint_columns(d.track_ids[lo:hi], d.values[lo:hi],
                                   metadata=d.metadata[lo:hi])  # fmt: skip
        frames.append(encode_frame(b"salt", lo + 1, encode_fingerprint_puts(cols), time.time()))
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "raw.wal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def run() -> None:
        for frame in frames:
            os.write(fd, frame)
            os.fdatasync(fd)

    try:
        return _timed(run)
    finally:
        os.close(fd)


def _lmdb_env(root: Path, n: int) -> Any:
    import lmdb

    root.mkdir(parents=True, exist_ok=True)
    # no fsync: the cheapest commit LMDB has (a store's WAL holds durability)
    return lmdb.open(str(root / "lmdb"), map_size=int(max(1 << 30, n * 4096)), sync=False,
                     metasync=False)  # fmt: skip


def _keys(lo: int, hi: int) -> list[bytes]:
    # V8, not S8: an S8 item drops its trailing zero bytes
    keys: list[bytes] = np.arange(lo + 1, hi + 1, dtype=">u8").view("V8").tolist()
    return keys


def case_raw_lmdb(d: Data, root: Path, batch: int) -> Timing:
    """The batches' envelopes (built before the timing) put into one LMDB table, one
    ``putmulti`` and one transaction per batch: the least any LMDB-backed store spends to keep
    each fingerprint, with no Python per row beyond the key list (no track map, no index)."""
    from xpstore.model.codec import encode_fingerprint_puts, envelopes_from_puts
    from xpstore.model.columns import fingerprint_columns

    n = len(d.track_ids)
    batches = []
    for lo, hi in _batches(n, batch):
        cols = fingerprint_columns(d.track_ids[lo:hi], d.values[lo:hi],
                                   metadata=d.metadata[lo:hi])  # fmt: skip
        env_ = envelopes_from_puts(encode_fingerprint_puts(cols), kind="fingerprint", ts=cols.ts,
                                   first_lsn=lo + 1)  # fmt: skip
        batches.append(list(zip(_keys(lo, hi), env_, strict=True)))
    env = _lmdb_env(root, n)

    def run() -> None:
        for items in batches:
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(items, append=True)

    try:
        return _timed(run)
    finally:
        env.close()


def case_smallest_store(d: Data, root: Path, batch: int) -> Timing:
    """The smallest durable fingerprint store in one thread: per batch, the encode-only floor's
    work, one WAL frame appended and fdatasync'ed, then the envelopes put into one LMDB table
    (:func:`case_raw_lmdb`). No overlay, no track map, no index, no priority rows: what
    put_fingerprints does, minus everything the store keeps beyond the records."""
    from xpstore.model.codec import encode_fingerprint_puts, envelopes_from_puts
    from xpstore.model.columns import fingerprint_columns
    from xpstore.persistence.wal_format import encode_frame

    n = len(d.track_ids)
    env = _lmdb_env(root, n)
    fd = os.open(root / "raw.wal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def run() -> None:
        for lo, hi in _batches(n, batch):
            cols = fingerprint_columns(d.track_ids[lo:hi], d.values[lo:hi],
                                       metadata=d.metadata[lo:hi])  # fmt: skip
            payloads = encode_fingerprint_puts(cols)
            os.write(fd, encode_frame(b"salt", lo + 1, payloads, time.time()))
            os.fdatasync(fd)
            env_ = envelopes_from_puts(payloads, kind="fingerprint", ts=cols.ts,
                                       first_lsn=lo + 1)  # fmt: skip
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(zip(_keys(lo, hi), env_, strict=True), append=True)

    try:
        return _timed(run)
    finally:
        os.close(fd)
        env.close()


CASES: dict[str, tuple[str, Callable[[Data, Path, int], Timing], bool]] = {
    # key: (label, function, runs from the tree under test)
    "put_fingerprints": ("put_fingerprints, commit",
                         lambda d, r, b: case_put_fingerprints(d, r, b, False), True),
    "put_fingerprints_held": ("put_fingerprints, commit, applier held",
                              lambda d, r, b: case_put_fingerprints(d, r, b, True), True),
    "put_many_dicts": ("put_many (dicts) of the same fingerprints", case_put_many, True),
    "lmdb_apply": ("floor: LMDB apply (the applier's work, alone)", case_lmdb_apply, True),
    "encode_only": ("floor: validate + encode only (no I/O)", case_encode_only, True),
    "raw_wal": ("floor: raw WAL append + fdatasync per batch", case_raw_wal, False),
    "raw_lmdb": ("floor: raw LMDB put of the envelopes, one table", case_raw_lmdb, False),
    "smallest_store": ("floor: encode + WAL + raw LMDB, one thread (the smallest store)",
                       case_smallest_store, False),
}  # fmt: skip


# --------------------------------------------------------------------------- runs


def child(args: argparse.Namespace) -> int:
    """Run the cases named in --only once each (this tree) and print their timings as JSON."""
    d = make_data(args.tracks, args.seed)
    out = {}
    for key in args.only.split(","):
        _label, fn, _tree = CASES[key]
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            t = fn(d, Path(tmp), args.batch)
        out[key] = t.__dict__
    print(json.dumps(out))
    return 0


def _spawn(tree: Path, keys: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--only", ",".join(keys),
           "--tracks", str(args.tracks), "--batch", str(args.batch), "--seed", str(args.seed)]
    if args.dir:
        cmd += ["--dir", args.dir]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"child run from {tree} failed:\n{res.stderr}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracks", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=",".join(CASES), help="comma-separated case keys")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another source tree: its xpstore cases run too, alternating")
    p.add_argument("--dir", default=None, help="where the stores go (default: the temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    keys = args.only.split(",")
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    here = Path(__file__).resolve().parent.parent
    trees = [("", here)] + ([("baseline: ", args.baseline.resolve())] if args.baseline else [])
    runs: dict[str, list[dict[str, float]]] = {}
    busy0, own0 = _cpu_busy()
    t0 = perf()
    for rep in range(args.repeats):
        order = trees if rep % 2 == 0 else trees[::-1]
        for prefix, tree in order:
            todo = [k for k in keys if CASES[k][2] or not prefix]
            todo = todo[rep % len(todo):] + todo[: rep % len(todo)]
            for key, t in _spawn(tree, todo, args).items():
                runs.setdefault(prefix + key, []).append(t)
    elapsed = perf() - t0
    busy1, own1 = _cpu_busy()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1))
    n = args.tracks
    print(f"# bulk fingerprint ingest: {n:,} fingerprints in batches of {args.batch:,}, "
          f"{args.repeats} repeats (medians)\n")
    print(f"- machine: {os.cpu_count()} cores, {platform.machine()}, Python "
          f"{platform.python_version()}; other processes used {other:.0%} of the CPU")
    print(f"- command: bulk.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print("| case | fingerprints/s (wall) | per thread CPU-second | per process CPU-second "
          "| close (drain) |")
    print("|---|---:|---:|---:|---:|")
    table: dict[str, dict[str, float]] = {}
    for prefix, _tree in trees:
        for key in keys:
            samples = runs.get(prefix + key)
            if not samples:
                continue
            med = {f: statistics.median(s[f] for s in samples)
                   for f in ("wall", "thread", "process", "extra")}  # fmt: skip
            table[prefix + key] = med
            drain = f"{med['extra'] * 1000:.0f} ms" if med["extra"] else "—"
            print(f"| {prefix}{CASES[key][0]} | {n / med['wall']:,.0f} | "
                  f"{n / med['thread']:,.0f} | {n / med['process']:,.0f} | {drain} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "other_cpu": other, "medians": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
