"""Retrieval counts kept outside the envelopes (docs/design.md, "Retrieval counts").

A ``RetrievalOp`` adds its counts to the records' ``prio`` rows in place; every read shows the
total. These tests hold the store to the counts a plain model of the old semantics gives
(``sample`` adds one per drawn occurrence; feedback: rc = max(rc + count_retrieval, sc)),
through draws, batches, feedback, updates, deletes, reopen, a recovery replay of the WAL, a
SIGKILL, and stores written before (envelopes carrying the counts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpstore import Store
from xpstore.demo.synthetic import make_prediction, make_query_metric
from xpstore.model.codec import KIND_CODES, RetrievalOp
from xpstore.model.priority_rows import INPUT_DTYPE
from xpstore.model.records import Decision, PredictionOutcome
from xpstore.persistence import retrievals
from xpstore.persistence.layout import Layout
from xpstore.persistence.lmdb_changes import RetrievalCounts
from xpstore.persistence.lmdb_tables import LmdbTables, u64

ROOT = Path(__file__).resolve().parents[1]


def _predictions(n: int, seed: int = 0) -> list[PredictionOutcome]:
    rng = np.random.default_rng(seed)
    return [make_prediction(rng) for _ in range(n)]


class Model:
    """The retrieval and success counts the old semantics give, per live id."""

    def __init__(self, ids: list[int]) -> None:
        self.rc = dict.fromkeys(ids, 0)
        self.sc = dict.fromkeys(ids, 0)

    def drawn(self, ids: list[int]) -> None:
        for rid in ids:
            self.rc[rid] += 1

    def feedback(self, ids: list[int], success: list[bool], count: bool) -> None:
        for rid, ok in zip(ids, success, strict=True):
            self.sc[rid] += 1 if ok else 0
            self.rc[rid] = max(self.rc[rid] + (1 if count else 0), self.sc[rid])

    def check(self, s: Store) -> None:
        """get, scan, where= on retrieval_count and the sampler's rows all agree with it."""
        for rid, rc in self.rc.items():
            exp = s.get(rid)
            assert (exp.retrieval_count, exp.success_count) == (rc, self.sc[rid]), rid
        scanned = {e.id: e.retrieval_count for e in s.scan("prediction")}
        assert scanned == self.rc
        for k in sorted(set(self.rc.values()))[:3]:
            got = {e.id for e in s.scan("prediction", where={"retrieval_count__gte": k})}
            assert got == {rid for rid, rc in self.rc.items() if rc >= k}
        sampler = s.parts.sampling.sampler
        if sampler is not None:
            s.parts.sampling.attached()  # catch up with the acknowledged batches
            kind = sampler.kinds[KIND_CODES["prediction"]]
            rows = dict(zip(kind.ids[: kind.n].tolist(), kind.cols["rc"][: kind.n].tolist(),
                            strict=True))  # fmt: skip
            assert {rid: rows[rid] for rid in self.rc} == self.rc


_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("draw"), st.integers(1, 12), st.integers(0, 9)),
        st.tuples(st.just("batch"), st.integers(1, 12), st.integers(0, 9)),
        st.tuples(st.just("feedback"), st.lists(st.integers(0, 19), min_size=1, max_size=4),
                  st.booleans(), st.booleans()),
        st.tuples(st.just("external"), st.lists(st.integers(0, 19), min_size=1, max_size=5)),
        st.tuples(st.just("priority"), st.integers(0, 19)),
        st.tuples(st.just("update"), st.integers(0, 19)),
        st.tuples(st.just("delete"), st.integers(0, 19)),
        st.tuples(st.just("apply")),
        st.tuples(st.just("reopen"), st.booleans()),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(actions=_ACTIONS, fold_every=st.sampled_from([1, 2, 3, retrievals.FOLD_ENTRIES]))
def test_counts_follow_the_old_semantics_through_every_path(
    tmp_path_factory: Any, actions: list[tuple[Any, ...]], fold_every: int
) -> None:
    """Draws (``sample``, ``batches``), feedback, counts logged by others, rewrites, deletes,
    applies, reopens; a reopen with ``held`` leaves everything in the WAL for the next open to
    replay (the recovery path derives feedback from replayed counts). The logged counts are
    folded into the rows every ``fold_every`` entries (and at each clean close), so reads,
    rewrites and replays meet them both folded and not."""
    with mock.patch.object(retrievals, "FOLD_ENTRIES", fold_every):
        _follow_the_model(tmp_path_factory.mktemp("rc") / "s", actions)


def _follow_the_model(path: Path, actions: list[tuple[Any, ...]]) -> None:
    opts: dict[str, Any] = {"sample_flush_retrievals": 1}
    s = Store.open(path, create=True, **opts)
    try:
        ids = s.put_many(_predictions(20))
        model = Model(ids)
        for action in actions:
            live = sorted(model.rc)
            name = action[0]
            if name in ("draw", "batch") and live:
                if name == "draw":
                    drawn = s.sample(action[1], kind="prediction", seed=action[2]).ids
                else:
                    batch = next(s.batches(action[1], kind="prediction", seed=action[2]))
                    drawn = batch["ids"].tolist()
                model.drawn(drawn)
            elif name == "feedback" and live:
                chosen = [live[i % len(live)] for i in action[1]]
                success = [action[2] ^ (j % 2 == 1) for j in range(len(chosen))]
                s.record_feedback(chosen, success, count_retrieval=action[3])
                model.feedback(chosen, success, action[3])
            elif name == "external" and live:
                chosen = [live[i % len(live)] for i in action[1]]
                s.parts.writer.submit_one(RetrievalOp(chosen, [2] * len(chosen)))
                model.drawn(chosen + chosen)
            elif name == "priority" and live:
                s.update_priorities([live[action[1] % len(live)]], [3.5])
            elif name == "update" and live:
                s.update(live[action[1] % len(live)], actual="warm", reward=0.5)
            elif name == "delete" and len(live) > 1:
                rid = live[action[1] % len(live)]
                s.delete(rid)
                del model.rc[rid], model.sc[rid]
            elif name == "apply" and not s.config.apply.hold:
                s.flush()
            elif name == "reopen":
                s.close()
                s = Store.open(path, hold_applier=action[1], **opts)
            model.check(s)
        s.close()
        s = Store.open(path, **opts)  # the last session's WAL replayed if it was held
        model.check(s)
    finally:
        s.close()


def test_counts_survive_close_reopen_and_a_replay_of_many_flushes(tmp_path: Path) -> None:
    """The default flush size, thousands of draws: the counts logged at close and those replayed
    from the WAL of a held session equal the draws."""
    path = tmp_path / "s"
    with Store.open(path, create=True, sample_flush_retrievals=500) as s:
        ids = s.put_many(_predictions(300))
        drawn: Counter[int] = Counter()
        for k in range(12):
            drawn.update(next(s.batches(256, kind="prediction", seed=k))["ids"].tolist())
    with Store.open(path, hold_applier=True, sample_flush_retrievals=500) as s:
        for k in range(12, 20):
            drawn.update(s.sample(256, kind="prediction", seed=k).ids)
        s.record_feedback(ids[:10], True, count_retrieval=True)
        drawn.update(ids[:10])
    with Store.open(path) as s:  # replays the held session
        assert {rid: s.get(rid).retrieval_count for rid in ids} == {r: drawn[r] for r in ids}
        assert s.get(ids[0]).success_count == 1


def test_counts_logged_by_others_reach_the_sampler_once(tmp_path: Path) -> None:
    """The sampler's own logged counts are in its rows already; another component's
    ``RetrievalOp`` (the access-pattern detector) is added, while the sampler's own flush of
    the same ids is in flight too."""
    with Store.open(tmp_path / "s", create=True, sample_flush_retrievals=10_000) as s:
        ids = s.put_many(_predictions(50))
        s.sample(100, kind="prediction", seed=3)
        sampler = s.parts.sampling.sampler
        assert sampler is not None
        own = sampler.take_pending()  # as a flush does, before its RetrievalOp is logged
        s.parts.writer.submit_one(RetrievalOp(ids[:5], [7] * 5))
        ordered = sorted(own)
        s.parts.writer.submit_one(RetrievalOp(ordered, [own[r] for r in ordered]))
        s.sample(1, kind="prediction", seed=4)  # catches up
        kind = sampler.kinds[KIND_CODES["prediction"]]
        rows = dict(zip(kind.ids[: kind.n].tolist(), kind.cols["rc"][: kind.n].tolist(),
                        strict=True))  # fmt: skip
        pending = sampler.pending
        for rid in ids:
            stored = s.get(rid).retrieval_count
            assert stored == own.get(rid, 0) + (7 if rid in ids[:5] else 0)
            assert rows[rid] == stored + pending.get(rid, 0)
        assert not sampler.inflight


def _raw_tables(path: Path) -> LmdbTables:
    return LmdbTables(Layout(path).data, readonly=False, map_size=1 << 26)


def test_a_store_written_before_keeps_its_counts(tmp_path: Path) -> None:
    """Stores written before kept the counts in the envelopes (and, from issue 5, in the
    ``prio`` rows too); some rows may be missing (a fast replay, a store older than the
    table). They read the same, and new retrievals add to them."""
    path = tmp_path / "s"
    with Store.open(path, create=True) as s:
        ids = s.put_many(_predictions(6))
        dec = s.put(Decision(component="learner", action="weight", target="user_weight/u1"))
    tables = _raw_tables(path)
    try:
        with tables.env.begin(write=True) as txn:
            records, prio = tables.db(b"records"), tables.db(b"prio")
            for k, rid in enumerate([*ids, dec]):
                raw = txn.get(u64(rid), db=records)
                assert raw is not None
                env = msgpack.unpackb(raw, raw=False)
                env[4], env[5] = 5 + k, 1  # as the old envelope rewrite left them
                txn.put(u64(rid), msgpack.packb(env, use_bin_type=True), db=records)
                row = txn.get(u64(rid), db=prio)
                if row is None:
                    continue  # the decision has no row
                if k % 2:
                    txn.delete(u64(rid), db=prio)  # a record whose row is missing
                else:
                    arr = np.frombuffer(row, dtype=INPUT_DTYPE).copy()
                    arr["rc"], arr["sc"] = 5 + k, 1
                    txn.put(u64(rid), arr.tobytes(), db=prio)
    finally:
        tables.close()
    expect = {rid: 5 + k for k, rid in enumerate([*ids, dec])}
    with Store.open(path) as s:
        assert {rid: s.get(rid).retrieval_count for rid in expect} == expect
        # new counts add to the old ones: rows that exist, rows built now, a decision's envelope
        s.parts.writer.submit_one(RetrievalOp([*ids, dec], [2] * (len(ids) + 1)))
        assert {rid: s.get(rid).retrieval_count for rid in expect} == {
            r: c + 2 for r, c in expect.items()}
        s.flush()
        assert {rid: s.get(rid).retrieval_count for rid in expect} == {
            r: c + 2 for r, c in expect.items()}
        s.record_feedback([ids[1]], True, count_retrieval=True)
        expect = {r: c + 2 for r, c in expect.items()}
        expect[ids[1]] += 1
        assert s.get(ids[1]).success_count == 2
    with Store.open(path) as s:
        assert {rid: s.get(rid).retrieval_count for rid in expect} == expect
        got = {e.id for e in s.scan("prediction", where={"retrieval_count__gte": 12})}
        assert got == {rid for rid in ids if expect[rid] >= 12}


def test_a_retrieval_of_a_deleted_record_is_dropped(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, hold_applier=True) as s:
        ids = s.put_many(_predictions(3))
        s.delete(ids[0])
        s.parts.writer.submit_one(RetrievalOp(ids, [1, 1, 1]))
    with Store.open(tmp_path / "s") as s:
        assert [s.get(r).retrieval_count for r in ids[1:]] == [1, 1]
        assert s.count("prediction") == 2


CHILD = textwrap.dedent(
    """
    import sys
    from xpstore import Store
    path = sys.argv[1]
    s = Store.open(path, sample_flush_retrievals=1, apply_interval_ms=60_000,
                   apply_batch_ops=1_000_000)
    ids = sorted(s.sampling_probabilities())
    for k in range(40):
        drawn = s.sample(16, kind="prediction", seed=k).ids
        fb = drawn[:3]
        s.record_feedback(fb, [k % 2 == 0] * 3, count_retrieval=k % 3 == 0)
        if k == 20:
            s.flush()  # half of it in LMDB, the rest only in the WAL
        print("ACK", k, ",".join(map(str, drawn)), ",".join(map(str, fb)), flush=True)
        sys.stdin.readline()
    """
)


def test_sigkill_recovery_rebuilds_the_same_counts(tmp_path: Path) -> None:
    """A writer draws (every draw's counts logged), gives feedback, is killed with SIGKILL at
    a point where everything it printed is acknowledged; recovery replays the WAL beyond
    LMDB's applied LSN and the counts equal the model's."""
    path = tmp_path / "s"
    with Store.open(path, create=True) as s:
        ids = s.put_many(_predictions(60))
        s.put_many([make_query_metric(np.random.default_rng(1)) for _ in range(5)])
    model = Model(ids)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ})  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    for line in proc.stdout:
        _ack, k, drawn, fb = line.split()
        model.drawn([int(r) for r in drawn.split(",")])
        model.feedback([int(r) for r in fb.split(",")], [int(k) % 2 == 0] * 3, int(k) % 3 == 0)
        if int(k) == 33:
            proc.send_signal(signal.SIGKILL)
            break
        proc.stdin.write("\n")
        proc.stdin.flush()
    proc.wait()
    proc.stdout.close()
    proc.stdin.close()
    assert proc.returncode == -signal.SIGKILL
    with Store.open(path) as s:
        model.check(s)
        assert s.stats()["applied_lsn"] >= ids[-1]


def test_export_and_to_arrow_carry_the_counts(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="the arrow extra (pyarrow) is not installed")
    with Store.open(tmp_path / "s", create=True, sample_flush_retrievals=1) as s:
        ids = s.put_many(_predictions(30))
        model = Model(ids)
        for k in range(5):
            model.drawn(s.sample(16, kind="prediction", seed=k).ids)
        s.record_feedback(ids[:4], True, count_retrieval=False)
        model.feedback(ids[:4], [True] * 4, False)
        expect = model.rc
        model.check(s)
        table = s.to_arrow("prediction")
        got = dict(zip(table.column("id").to_pylist(), table.column("retrieval_count").to_pylist(),
                       strict=True))  # fmt: skip
        assert got == expect
        hot = s.to_arrow("prediction", where={"retrieval_count__gte": 3})
        assert set(hot.column("id").to_pylist()) == {r for r, c in expect.items() if c >= 3}


def test_a_logged_count_of_a_deleted_record_does_not_bring_it_back(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, sample_flush_retrievals=10_000) as s:
        ids = s.put_many(_predictions(5))
        s.sample(50, kind="prediction", seed=1)
        s.delete(ids[0])
        s.parts.writer.submit_one(RetrievalOp(ids, [3] * 5))  # logged by another component
        probs = s.sampling_probabilities("prediction")
        assert ids[0] not in probs and set(probs) == set(ids[1:])
        assert all(ids[0] != rid for k in range(5) for rid in s.sample(20, seed=k).ids)


def test_the_applier_adds_each_operation_once_and_sums_consecutive_ones(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True) as s:
        ids = s.put_many(_predictions(3))
    tables = _raw_tables(path)
    try:
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
        a, b, c = ids
        ops = [RetrievalCounts(applied + 1, {a: 2}), RetrievalCounts(applied + 2, {a: 3, b: 1})]
        tables.apply(ops, applied + 2)
        tables.apply(ops, applied + 2)  # a replay of the same batch: already applied
        with tables.reading() as txn:
            assert tables.retrieval_counts(txn, ids) == {a: 5, b: 1, c: 0}
        # a batch reaching back below applied_lsn adds only the operations above it
        more = [RetrievalCounts(applied + 2, {c: 7}), RetrievalCounts(applied + 3, {c: 1})]
        tables.apply(more, applied + 3)
        with tables.reading() as txn:
            assert tables.retrieval_counts(txn, ids) == {a: 5, b: 1, c: 1}
            assert tables.retrieval_count(txn, c) == 1 and tables.retrieval_count(txn, 999) == 0
    finally:
        tables.close()


def test_a_flush_never_waits_for_another_apply(tmp_path: Path) -> None:
    """A flush applies its counts in the drawing thread, but not while a compaction or a
    snapshot holds the apply lock: the draw returns, the counts are read from the overlay, and
    the applier gets to them later."""
    with Store.open(tmp_path / "s", create=True, sample_flush_retrievals=1) as s:
        ids = s.put_many(_predictions(10))
        applier = s.parts.engine.applier
        assert applier is not None
        drawn: list[int] = []
        with applier.exclusive():
            worker = threading.Thread(
                target=lambda: drawn.extend(s.sample(8, kind="prediction", seed=0).ids))
            worker.start()
            worker.join(30)
            assert not worker.is_alive(), "the draw waited for the apply lock"
            counts = Counter(drawn)
            assert {r: s.get(r).retrieval_count for r in ids} == {r: counts[r] for r in ids}
            assert s.parts.engine.overlay.unapplied_retrievals()
        s.flush()
        assert not s.parts.engine.overlay.unapplied_retrievals()
        assert {r: s.get(r).retrieval_count for r in ids} == {r: counts[r] for r in ids}


def test_a_flush_leaves_its_counts_in_lmdb(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, sample_flush_retrievals=64,
                    apply_interval_ms=60_000) as s:  # fmt: skip
        ids = s.put_many(_predictions(20))
        s.flush()
        drawn = s.sample(64, kind="prediction", seed=2).ids  # reaches the flush size
        tables = s.parts.engine.tables
        with tables.reading() as txn:
            assert tables.retrieval_counts(txn, ids) == {r: Counter(drawn)[r] for r in ids}
        assert not s.parts.engine.overlay.unapplied_retrievals()


# ------------------------------------------------- the log of counts and its fold


@given(entries=st.lists(st.dictionaries(st.integers(0, 40), st.integers(1, 9), min_size=1),
                        min_size=1, max_size=6),
       probe=st.lists(st.integers(0, 45), max_size=12))  # fmt: skip
def test_the_unfolded_aggregate_sums_its_entries(
    entries: list[dict[int, int]], probe: list[int]
) -> None:
    """Merging entry by entry (the writer) equals summing them all (a cold reader)."""
    agg = retrievals.Unfolded(np.zeros(0, np.uint64), np.zeros(0, np.int64))
    want: Counter[int] = Counter()
    for entry in entries:
        ids = np.array(sorted(entry), dtype=np.uint64)
        agg = agg.merged(ids, np.array([entry[i] for i in sorted(entry)], dtype=np.int64))
        want.update(entry)
    assert agg.ids.tolist() == sorted(want)
    assert agg.counts.tolist() == [want[i] for i in sorted(want)]
    assert agg.lookup(probe).tolist() == [want.get(i, 0) for i in probe]


def _log_state(path: Path) -> tuple[int, int]:
    """(entries, counts) the ``retrievals`` table holds, read from the files."""
    tables = _raw_tables(path)
    try:
        with tables.reading() as txn:
            entries, counts, _first, _last = tables.retrievals.state(txn)
            assert txn.stat(tables.db(b"retrievals"))["entries"] == entries
        return entries, counts
    finally:
        tables.close()


def test_flushes_are_logged_then_folded_at_a_clean_close(tmp_path: Path) -> None:
    """Each flush of counts is one entry (no row is rewritten); reads add the entries; a clean
    close folds them into the rows, so a store at rest holds every count in its rows."""
    path = tmp_path / "s"
    with Store.open(path, create=True, sample_flush_retrievals=64) as s:
        ids = s.put_many(_predictions(200))
        s.flush()
        tables = s.parts.engine.tables
        with tables.reading() as txn:
            rows_before = dict(zip(*[a.tolist() for a in tables.retrieval_count_rows(txn, ids)],
                                   strict=True))  # fmt: skip
        drawn: Counter[int] = Counter()
        for k in range(10):
            drawn.update(next(s.batches(64, kind="prediction", seed=k))["ids"].tolist())
        s.flush()
        with tables.reading() as txn:
            entries, counts, _first, _last = tables.retrievals.state(txn)
            raw_rows = {rid: tables.get_record(txn, rid) for rid in ids}
            prio = tables.db(b"prio")
            rcs = {r: int(np.frombuffer(bytes(txn.get(u64(r), db=prio) or b""),
                                        dtype=INPUT_DTYPE)["rc"][0]) for r in ids}  # fmt: skip
        assert entries >= 9 and counts == sum(drawn.values())  # the 10th may be in memory yet
        assert rcs == rows_before == dict.fromkeys(ids, 0)  # no row was rewritten
        assert all(raw is not None for raw in raw_rows.values())
        assert {r: s.get(r).retrieval_count for r in ids} == {r: drawn[r] for r in ids}
    assert _log_state(path) == (0, 0)
    tables = _raw_tables(path)
    try:
        with tables.reading() as txn:
            got = dict(zip(*[a.tolist() for a in tables.retrieval_count_rows(txn, ids)],
                           strict=True))  # fmt: skip
    finally:
        tables.close()
    assert got == {r: drawn[r] for r in ids}


def test_a_read_only_process_reads_the_unfolded_counts(tmp_path: Path) -> None:
    """While the writer holds counts in the log, `xpstore get --readonly` in another process
    sums them from the same LMDB transaction as the rows."""
    path = tmp_path / "s"
    with Store.open(path, create=True, sample_flush_retrievals=1) as s:
        ids = s.put_many(_predictions(40))
        drawn: Counter[int] = Counter()
        for k in range(6):
            drawn.update(s.sample(16, kind="prediction", seed=k).ids)
        s.update_priorities([ids[0]], [2.0])  # a rewrite after logged counts
        s.flush()
        tables = s.parts.engine.tables
        with tables.reading() as txn:
            assert tables.retrievals.state(txn)[0] >= 5  # entries, not folded yet
        for rid in (ids[0], *sorted(drawn)[:3]):
            out = subprocess.run(
                [sys.executable, "-m", "xpstore.cli", "get", str(path), str(rid), "--readonly",
                 "--json"], capture_output=True, text=True, cwd=ROOT, check=True,
            )  # fmt: skip
            assert json.loads(out.stdout)["retrieval_count"] == drawn[rid], rid
