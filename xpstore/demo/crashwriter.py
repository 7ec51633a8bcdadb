"""A writer process for crash demos and crash tests: ``python -m xpstore.demo.crashwriter STORE``.

It opens (or creates) the store, writes deterministic records from several threads, and prints
``ACK <id> <thread> <seq>`` on stdout, flushed, after each ``put`` returns, so a parent that
kills it with SIGKILL knows exactly which records were acknowledged. :func:`record_for` rebuilds
the record any line names, so the parent can check the recovered copy bit for bit. FAISS is never
imported here (keeps the child light).
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import threading
from typing import Any

import numpy as np

from xpstore.demo.synthetic import make_fingerprint, make_prediction, make_query_metric
from xpstore.model.records import Record
from xpstore.store.store import Store


def record_for(seed: int, thread: int, seq: int) -> Record:
    """The record that thread ``thread`` writes as its ``seq``-th put (deterministic)."""
    rng = np.random.default_rng([seed, thread, seq])
    pick = seq % 3
    ts = 1_700_000_000.0 + thread * 1_000_000 + seq
    if pick == 0:
        rec: Record = make_prediction(rng, track_id=f"t{thread}-{seq % 50}")
    elif pick == 1:
        rec = make_fingerprint(rng, f"t{thread}-{seq % 50}")
    else:
        rec = make_query_metric(rng)
    return rec.model_copy(update={"ts": ts})


def _writer(
    store: Store, seed: int, thread: int, count: int, batch: int, out: threading.Lock
) -> None:
    seq = 0
    while count <= 0 or seq < count:
        if batch > 1 and thread % 2 == 1:
            recs = [record_for(seed, thread, seq + k) for k in range(batch)]
            ids = store.put_many(recs)
            lines = "".join(f"ACK {rid} {thread} {seq + k}\n" for k, rid in enumerate(ids))
            seq += batch
        else:
            rid = store.put(record_for(seed, thread, seq))
            lines = f"ACK {rid} {thread} {seq}\n"
            seq += 1
        with out:
            sys.stdout.write(lines)
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xpstore.demo.crashwriter", description=__doc__)
    parser.add_argument("store")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=0, help="puts per thread; 0 = until killed")
    parser.add_argument(
        "--batch", type=int, default=1, help="odd threads use put_many of this size"
    )
    parser.add_argument("--durability", default="commit")
    parser.add_argument("--hold-applier", action="store_true")
    parser.add_argument("--segment-max-bytes", type=int, default=None)
    parser.add_argument(
        "--watchdog-s", type=float, default=0.0,
        help="dump every thread's stack to stderr and exit if still running after this long "
             "(a stuck writer explains itself before its parent gives up on it); 0: off",
    )
    args = parser.parse_args(argv)
    if args.watchdog_s > 0:
        faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    overrides: dict[str, Any] = {"hold_applier": True} if args.hold_applier else {}
    if args.segment_max_bytes:
        overrides["segment_max_bytes"] = args.segment_max_bytes
    out = threading.Lock()
    with Store.open(args.store, create=True, durability=args.durability, **overrides) as store:
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        threads = [
            threading.Thread(
                target=_writer, args=(store, args.seed, t, args.count, args.batch, out)
            )
            for t in range(args.threads)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
