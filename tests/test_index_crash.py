"""SIGKILL during an index rebuild and during its swap: the reopened store serves answers equal to
exact search over the live fingerprints, and no build leftovers remain (issue 4).

The child process (this test is about the index, so it imports FAISS) writes fingerprints,
retires some, and rebuilds with ``XPSTORE_CRASH_AT`` set to one of the index's crash points; the
parent reopens and compares ``similar`` with brute force.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.helpers import record_as
from tests.index_support import exact_top, index_server, library, same_up_to_ties
from xpstore import Fingerprint, Store

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from xpstore import Store
    from xpstore.demo.synthetic import make_fingerprint

    path, build_in, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    rng = np.random.default_rng(99)
    with Store.open(path, index_auto_rebuild=False, index_build_in=build_in,
                    index_exact_below=int(sys.argv[4])) as st:
        st.similar("t0", k=1)  # attach
        st.put_many([make_fingerprint(rng, f"c{i}") for i in range(150)])
        for i in range(0, 300, 5):
            st.delete_track(f"t{i}")
        st.put_many([make_fingerprint(rng, f"t{i}") for i in range(1, 300, 7)])  # supersede
        print("READY", flush=True)
        if mode == "kill-mid-build":
            st.rebuild_index(wait=False)
            time.sleep(float(sys.argv[5]))
            os.kill(os.getpid(), 9)
        st.rebuild_index()
        print("NOT KILLED", flush=True)
    """
)


def _child(path: Path, build_in: str, mode: str, exact_below: int, env: dict[str, str],
           delay: float = 0.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(path), build_in, mode, str(exact_below), str(delay)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **env},
        cwd=Path(__file__).resolve().parents[1], check=False,
    )  # fmt: skip


def _seed(path: Path, exact_below: int) -> None:
    rng = np.random.default_rng(7)
    with Store.open(path, create=True, index_auto_rebuild=False,
                    index_exact_below=exact_below) as st:
        st.put_many(library(rng, 1200))
        st.rebuild_index()


def _check_exact(path: Path, exact_below: int) -> None:
    folder = path / "index"
    with Store.open(path, index_auto_rebuild=False, index_exact_below=exact_below) as st:
        assert not list(folder.glob("build-*")) and not list(folder.glob("neighbors-*"))
        status = st.index_status()
        readded = {f"t{i}" for i in range(1, 300, 7)}
        gone = {f"t{i}" for i in range(0, 300, 5)} - readded
        assert status["live"] == 1200 - len(gone) + 150, status
        agree = total = 0
        for q in ["t1", "t8", "c3", "t44", "c77", "t299"]:
            fp = st.get_fingerprint(q)
            query = index_server(st).embedder.embed(record_as(fp, Fingerprint))
            got = [(h.record_id, h.score) for h in st.similar(q, k=10)]
            want = exact_top(st, query, 10, exclude=[fp.id])
            if exact_below > 1200:
                assert same_up_to_ties(got, want), (q, got, want)
            agree += len({g for g, _ in got} & {w for w, _ in want})
            total += len(want)
        assert agree / total >= 0.95
        deleted = {h.track_id for h in st.similar("t1", k=1500)}
        assert not gone & deleted


@pytest.mark.parametrize(
    "point",
    [
        "index.build.started",
        "index.build.before_swap",
        "index.swap.after_swap",
        "index.swap.after_rename",
        "index.neighbors.partial",
    ],
)
def test_sigkill_at_each_index_crash_point(tmp_path: Path, point: str) -> None:
    path = tmp_path / "s"
    _seed(path, 10_000)
    proc = _child(path, "thread", "crash-point", 10_000, {"XPSTORE_CRASH_AT": point})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    assert "READY" in proc.stdout and "NOT KILLED" not in proc.stdout
    _check_exact(path, 10_000)


def _builders(path: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "xpstore.index.build" in cmd and any(str(path) in c for c in cmd):
            out.append(p)
    return out


def test_sigkill_while_a_child_process_builds(tmp_path: Path) -> None:
    """The store dies mid-build; its build process notices and exits; reopen serves correctly."""
    path = tmp_path / "s"
    _seed(path, 0)  # HNSW
    proc = _child(path, "process", "kill-mid-build", 0, {}, delay=0.3)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    deadline = time.monotonic() + 30
    while _builders(path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _builders(path), "the orphaned build process kept running"
    _check_exact(path, 0)
