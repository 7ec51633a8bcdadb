"""Commit combining (issue 15, item 1): concurrent writers hand their submissions to one leader.
The combiner's own rules with a scripted batch runner (who leads, what each batch holds, whose
error is whose, no hang when a batch is cut short), then real stores written from threads."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tests.index_support import library
from xpstore import RecordNotFoundError, Store, XpStoreError
from xpstore.store.combiner import Combiner, Submission


def _sub(tag: int) -> Submission:
    return Submission([tag], [b"x"], {})


def _no_wait(batch: list[Submission]) -> None:
    return None


class _Runner:
    """A batch runner that records each batch and the thread that ran it; the first batch
    waits for ``release`` so that others can queue behind it."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.fail_tags: set[int] = set()

    def __call__(self, batch: list[Submission]) -> None:
        self.batches.append(([s.ops[0] for s in batch], threading.current_thread().name))
        if len(self.batches) == 1:
            self.started.set()
            assert self.release.wait(10)
        for s in batch:
            if s.ops[0] in self.fail_tags:
                s.error = RecordNotFoundError(f"no record {s.ops[0]}")
            else:
                s.span = (s.ops[0], s.ops[0])


def _run_in_thread(c: Combiner, sub: Submission, name: str) -> threading.Thread:
    t = threading.Thread(target=c.run, args=(sub,), name=name)
    t.start()
    return t


def test_writers_queued_behind_a_batch_run_together_led_by_the_oldest() -> None:
    runner = _Runner()
    c = Combiner(runner, _no_wait)
    first = _sub(0)
    lead = _run_in_thread(c, first, "w0")
    assert runner.started.wait(10)
    subs = [_sub(i) for i in range(1, 6)]
    threads = []
    for i, s in enumerate(subs, start=1):  # queued in this order while batch 0 runs
        threads.append(_run_in_thread(c, s, f"w{i}"))
        for _ in range(200):
            if len(c._queue) == i:
                break
            threading.Event().wait(0.005)
    assert [s.ops[0] for s in c._queue] == [1, 2, 3, 4, 5]
    runner.release.set()
    for t in [lead, *threads]:
        t.join(10)
        assert not t.is_alive()
    assert runner.batches == [([0], "w0"), ([1, 2, 3, 4, 5], "w1")]
    assert all(s.span == (s.ops[0], s.ops[0]) and s.error is None for s in [first, *subs])
    assert (c.batches, c.submissions) == (2, 6)
    # the combiner is idle again: the next writer leads its own batch at once
    alone = _sub(9)
    c.run(alone)
    assert runner.batches[-1] == ([9], threading.current_thread().name)


def test_a_failure_is_its_own_submissions_only() -> None:
    runner = _Runner()
    runner.release.set()
    runner.fail_tags = {2}
    c = Combiner(runner, _no_wait)
    subs = [_sub(i) for i in range(4)]
    threads = [_run_in_thread(c, s, f"w{i}") for i, s in enumerate(subs)]
    for t in threads:
        t.join(10)
    assert isinstance(subs[2].error, RecordNotFoundError) and subs[2].span is None
    assert all(s.error is None and s.span is not None for i, s in enumerate(subs) if i != 2)


def test_a_batch_cut_short_fails_every_writer_of_it_and_hangs_none() -> None:
    """An exception escaping the batch runner (a bug, an interrupt): the leader sees it, the
    batch's other writers get an error saying the outcome is unknown (never a span: their
    group may be appended and not durable), writers queued behind it still run."""
    gate = threading.Event()
    calls: list[list[int]] = []

    def runner(batch: list[Submission]) -> None:
        calls.append([s.ops[0] for s in batch])
        if len(calls) == 1:
            assert gate.wait(10)
        if len(calls) == 2:
            batch[0].span = (1, 1)  # appended, then the wait is cut short
            raise KeyboardInterrupt
        for s in batch:
            s.span = (s.ops[0], s.ops[0])

    c = Combiner(runner, _no_wait)
    subs = [_sub(i) for i in range(4)]
    errors: dict[int, BaseException] = {}

    def write(s: Submission) -> None:
        try:
            c.run(s)
        except BaseException as exc:  # the leader's own interrupt
            errors[s.ops[0]] = exc

    threads = [threading.Thread(target=write, args=(subs[0],))]
    threads[0].start()
    while not calls:
        threading.Event().wait(0.001)
    for s in subs[1:3]:
        threads.append(threading.Thread(target=write, args=(s,)))
        threads[-1].start()
        while s not in c._queue:
            threading.Event().wait(0.001)
    gate.set()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert calls[:2] == [[0], [1, 2]]
    assert isinstance(errors.get(1), KeyboardInterrupt)  # the leader of batch 2
    for s in subs[1:3]:
        assert s.span is None and isinstance(s.error, XpStoreError)
        assert "unknown" in str(s.error) and "KeyboardInterrupt" in str(s.error)
    assert subs[0].span == (0, 0)
    c.run(subs[3])  # not stuck: the next writer leads
    assert subs[3].span == (3, 3)


def test_writers_return_only_after_their_batch_was_waited_for() -> None:
    """No writer returns before the wait of its own batch ended; writers queued meanwhile run in
    the next batch, after it."""
    first_waiting = threading.Event()
    finish_first = threading.Event()
    appended: list[list[int]] = []
    waited: list[list[int]] = []

    def append(batch: list[Submission]) -> None:
        appended.append([s.ops[0] for s in batch])
        for s in batch:
            s.span = (s.ops[0], s.ops[0])

    def wait(batch: list[Submission]) -> None:
        if batch[0].ops[0] == 0:
            first_waiting.set()
            assert finish_first.wait(10)
        waited.append([s.ops[0] for s in batch])

    c = Combiner(append, wait)
    done: list[int] = []

    def write(s: Submission) -> None:
        c.run(s)
        done.append(s.ops[0])

    t0 = threading.Thread(target=write, args=(_sub(0),))
    t0.start()
    assert first_waiting.wait(10)
    t1 = threading.Thread(target=write, args=(_sub(1),))
    t1.start()
    for _ in range(2000):
        if c._queue:
            break
        threading.Event().wait(0.001)
    assert appended == [[0]] and done == []  # 1 queued behind the batch that waits
    finish_first.set()
    for t in (t0, t1):
        t.join(10)
        assert not t.is_alive()
    assert appended == [[0], [1]] and waited == [[0], [1]] and sorted(done) == [0, 1]


def test_an_interrupt_in_the_wait_fails_the_batch_as_unknown() -> None:
    def append(batch: list[Submission]) -> None:
        for s in batch:
            s.span = (s.ops[0], s.ops[0])

    def wait(batch: list[Submission]) -> None:
        raise KeyboardInterrupt

    c = Combiner(append, wait)
    sub = _sub(0)
    with pytest.raises(KeyboardInterrupt):
        c.run(sub)
    assert sub.span is None and isinstance(sub.error, XpStoreError)
    assert "unknown" in str(sub.error)
    ok = _sub(1)
    c2 = Combiner(append, _no_wait)
    c2.run(ok)
    assert ok.span == (1, 1)
    assert not c._leading  # the interrupted combiner is idle again, not stuck leading


def test_threads_putting_one_by_one_get_distinct_durable_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    fps = library(rng, 240)
    per = 30
    ids: list[list[int]] = [[] for _ in range(8)]
    with Store.open(tmp_path / "s", create=True, durability="commit") as st:

        def writer(i: int) -> None:
            for fp in fps[i * per : (i + 1) * per]:
                ids[i].append(st.put(fp))

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        flat = [rid for part in ids for rid in part]
        assert len(flat) == len(set(flat)) == 240
        for part in ids:
            assert part == sorted(part)  # one thread's puts keep their order
    with Store.open(tmp_path / "s") as st:
        for i, part in enumerate(ids):
            for fp, rid in zip(fps[i * per : (i + 1) * per], part, strict=True):
                assert st.get_fingerprint(fp.track_id).id == rid


def test_a_failing_write_among_concurrent_ones_fails_alone(tmp_path: Path) -> None:
    """Deletes of missing ids fail inside the combined batch (derived under the write lock);
    the puts batched with them succeed, and the deleter gets its own error."""
    rng = np.random.default_rng(8)
    fps = library(rng, 120)
    errors: list[BaseException] = []
    put_ids: list[int] = []
    with Store.open(tmp_path / "s", create=True, durability="commit") as st:

        def putter(part: list) -> None:  # type: ignore[type-arg]
            for fp in part:
                put_ids.append(st.put(fp))

        def deleter() -> None:
            for rid in range(10**9, 10**9 + 30):
                try:
                    st.delete(rid)
                except RecordNotFoundError as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=putter, args=(fps[i::4],)) for i in range(4)]
        threads.append(threading.Thread(target=deleter))
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(errors) == 30 and all(str(10**9) in str(e) or "record" in str(e)
                                         for e in errors)  # fmt: skip
        assert len(put_ids) == 120 and st.count() == 120


@pytest.mark.parametrize("durability", ["none", "group"])
def test_combining_holds_in_every_durability_mode(tmp_path: Path, durability: str) -> None:
    rng = np.random.default_rng(9)
    fps = library(rng, 80)
    with Store.open(tmp_path / "s", create=True, durability=durability) as st:
        threads = [
            threading.Thread(target=lambda part=fps[i::4]: [st.put(fp) for fp in part])
            for i in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert st.count() == 80
    with Store.open(tmp_path / "s") as st:
        assert st.count() == 80
