"""Queries in several threads while a writer adds, supersedes and deletes fingerprints and
rebuilds run and swap: no exception, no retired id returned after its retirement was
acknowledged, and after the last swap every acknowledged fingerprint is findable (issue 4)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.index_support import (
    index_rebuilder,
    index_server,
    library,
    live_fingerprints,
    vector_of,
)
from xpstore import RecordNotFoundError, Store
from xpstore.demo.synthetic import make_fingerprint


@pytest.mark.parametrize("build_in", ["thread", "process"])
def test_queries_during_writes_and_swaps(tmp_path: Path, build_in: str) -> None:
    rng = np.random.default_rng(21)
    with Store.open(
        tmp_path / "s",
        create=True,
        index_exact_below=0,  # HNSW: the index that cannot remove
        index_delta_min=60,
        index_delta_ratio=0.01,
        index_build_in=build_in,
        durability="group",
    ) as st:
        st.put_many(library(rng, 1500))
        st.rebuild_index()
        server = index_server(st)
        probes = np.vstack([vector_of(server, st.get_fingerprint(f"t{i}").id) for i in range(50)])
        retired_at: dict[int, float] = {}
        answers: list[tuple[float, list[int]]] = []
        errors: list[BaseException] = []
        revived: list[int] = []
        stop = threading.Event()
        lock = threading.Lock()

        def reader(seed: int) -> None:
            qrng = np.random.default_rng(seed)
            try:
                while not stop.is_set():
                    q = probes[int(qrng.integers(len(probes)))]
                    started = time.monotonic()
                    if qrng.random() < 0.2:
                        try:
                            hits = st.similar(f"t{int(qrng.integers(1500))}", k=10)
                        except RecordNotFoundError:
                            continue  # that track was deleted: a correct answer
                    else:
                        hits = st.similar(vector=q, k=10, exclude_self=False)
                    with lock:
                        answers.append((started, [h.record_id for h in hits]))
            except BaseException as exc:
                errors.append(exc)

        def writer() -> None:
            wrng = np.random.default_rng(5)
            try:
                for step in range(450):
                    op = step % 3
                    if op == 0:
                        st.put(make_fingerprint(wrng, f"new{step}"))
                    elif op == 1:  # supersede an existing track
                        track = f"t{int(wrng.integers(1500))}"
                        try:
                            old = st.get_fingerprint(track).id
                        except RecordNotFoundError:
                            continue
                        st.put(make_fingerprint(wrng, track))
                        retired_at.setdefault(old, time.monotonic())
                    else:
                        track = f"t{int(wrng.integers(1500))}"
                        try:
                            old = st.get_fingerprint(track).id
                            st.delete_track(track)
                        except RecordNotFoundError:
                            continue
                        retired_at.setdefault(old, time.monotonic())
                    if step == 200:
                        st.rebuild_index(wait=False)
                    if step % 5 == 0:  # no retired id may come back to life (e.g. at a swap)
                        server = index_server(st)
                        revived.extend(r for r in list(retired_at) if server.is_live(r))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
        w = threading.Thread(target=writer)
        for t in threads:
            t.start()
        w.start()
        w.join(timeout=120)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert not revived, f"retired ids served again: {sorted(set(revived))[:10]}"
        assert len(answers) > 100
        builds = index_rebuilder(st).builds
        assert builds >= 2, f"only {builds} rebuilds ran during the test"
        stale = [
            (rid, started)
            for started, rids in answers
            for rid in rids
            if rid in retired_at and retired_at[rid] < started
        ]
        assert not stale, f"{len(stale)} answers held ids retired before the query began"

        # what the index serves is exactly the live set, before the last swap...
        live = live_fingerprints(st)
        server = index_server(st)
        served = (set(server.main.ids.tolist()) - server.tombs) | set(server.delta.pos)
        assert served == set(live)
        assert server.live_count() == len(live)

        st.rebuild_index()  # ...and after it every acknowledged fingerprint is findable
        server = index_server(st)
        live = live_fingerprints(st)
        assert server.live_count() == len(live)
        ids = sorted(live)
        vecs = server.embedder.embed_many([live[r] for r in ids])
        found = st.similar_many(vecs, k=10, params={"ef_search": 256})
        missing = [r for r, hits in zip(ids, found, strict=True)
                   if r not in {h.record_id for h in hits}]
        assert not missing, f"{len(missing)} live fingerprints not findable, e.g. {missing[:5]}"
