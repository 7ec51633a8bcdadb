"""Recovery benchmark (issue 3): reopen after SIGKILL, `replay` throughput, `verify` time.

One run, per size N (default 20 000; the issue's 100 000 and 1 000 000 by hand):

1. a child process writes N records with ``put_many`` (batches of 1000, durability ``commit``,
   the applier held back, so nothing reaches LMDB), reports its own ingest rate, and SIGKILLs
   itself: the reference rate, measured in the same run on the same records;
2. ``replay`` (the library behind ``xpstore replay``) streams every operation of a copy of that
   killed store, straight from its WAL: records/s and MB/s of WAL read;
3. reopening the killed store replays the N operations into LMDB: records/s;
4. ``verify`` of the recovered store: seconds.

It prints a markdown table with the ratios to the ingest rate (bar: replay and recovery ≥ 2x).
Usage: ``PYTHONPATH=. python benchmarks/recovery.py --sizes 20000,100000``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import os, signal, sys, time
import numpy as np
from xpstore import Store
from xpstore.demo.synthetic import make_mixed
path, n = sys.argv[1], int(sys.argv[2])
records = make_mixed(np.random.default_rng(1), n, t0=1_700_000_000.0)
store = Store.open(path, create=True, hold_applier=True)
start = time.perf_counter()
for i in range(0, n, 1000):
    store.put_many(records[i:i + 1000])
elapsed = time.perf_counter() - start
print(f"{n / elapsed:.1f}", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _wal_bytes(path: Path) -> int:
    """Bytes of the log (headers and frames), not of the files: a preallocated segment's zeros
    after its last frame are not read as data and do not count."""
    from xpstore.persistence.wal_reader import scan_segment

    total = 0
    for seg in (path / "wal").glob("*.wal"):
        scan = scan_segment(seg, seg.read_bytes(), 1 << 30)
        total += scan.frames[-1].offset + scan.frames[-1].size if scan.frames else scan.size
    return total


def run_size(n: int, workdir: Path) -> dict[str, float]:
    from xpstore import Store
    from xpstore.ops.replay import replay

    path = workdir / f"store-{n}"
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(n)],
        capture_output=True, text=True, timeout=3600, check=False,
    )
    if proc.returncode != -signal.SIGKILL:
        raise RuntimeError(f"writer did not die by SIGKILL: {proc.returncode} {proc.stderr}")
    ingest = float(proc.stdout.strip())
    wal_bytes = _wal_bytes(path)

    copy = workdir / f"copy-{n}"
    shutil.copytree(path, copy)
    start = time.perf_counter()
    count = sum(1 for _ in replay(copy))
    replay_s = time.perf_counter() - start
    if count != n:
        raise RuntimeError(f"replay returned {count} operations, expected {n}")

    start = time.perf_counter()
    with Store.open(path) as store:
        recover_s = time.perf_counter() - start
        replayed = store.recovery_report.replayed_ops if store.recovery_report else -1
        if replayed != n or store.count() != n:
            raise RuntimeError(f"recovery replayed {replayed}, count {store.count()}, not {n}")
    start = time.perf_counter()
    with Store.open(path, readonly=True) as store:
        report = store.check()
    verify_s = time.perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"verify found problems: {report}")
    shutil.rmtree(copy)
    shutil.rmtree(path)
    return {
        "n": n,
        "wal_mb": wal_bytes / 1e6,
        "ingest_rps": ingest,
        "replay_rps": n / replay_s,
        "replay_mbps": wal_bytes / 1e6 / replay_s,
        "recover_s": recover_s,
        "recover_rps": n / recover_s,
        "verify_s": verify_s,
    }


def _table(rows: list[dict[str, float]]) -> str:
    out = [
        "| records | WAL MB | put_many ingest rec/s | replay rec/s | replay MB/s | replay ÷ "
        "ingest | reopen s | recovery rec/s | recovery ÷ ingest | verify s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {int(r['n']):,} | {r['wal_mb']:.1f} | {r['ingest_rps']:,.0f} | "
            f"{r['replay_rps']:,.0f} | {r['replay_mbps']:.1f} | "
            f"{r['replay_rps'] / r['ingest_rps']:.2f}x | {r['recover_s']:.2f} | "
            f"{r['recover_rps']:,.0f} | {r['recover_rps'] / r['ingest_rps']:.2f}x | "
            f"{r['verify_s']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20000", help="comma-separated record counts")
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="xpstore-recovery-", dir=args.dir) as tmp:
        rows = [run_size(n, Path(tmp)) for n in sizes]
    print(f"- machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; "
          f"{time.strftime('%Y-%m-%d')}; command: {' '.join(sys.argv)}")
    print()
    print(_table(rows))
    print()
    for r in rows:
        for what in ("replay", "recover"):
            ratio = r[f"{what}_rps"] / r["ingest_rps"]
            verdict = "PASS" if ratio >= 2.0 else "MISS"
            print(f"- {verdict} {what} ≥ 2x put_many at {int(r['n']):,} records: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
