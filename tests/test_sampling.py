"""Prioritized sampling through the store (issue 5): exact probabilities (chi-square, whole store
and filtered), importance weights, the priority model, bad input, empty populations, durable
priorities and feedback across SIGKILL, deterministic resume across close and reopen."""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpstore import (
    EmptySampleError,
    InvalidArgumentError,
    PredictionOutcome,
    RecordNotFoundError,
    Store,
)
from xpstore.demo.synthetic import make_prediction, make_query_metric

# chi-square critical values at alpha = 0.001 (upper tail), by degrees of freedom
CHI2_999 = {19: 43.82, 29: 58.30, 39: 72.05}


def _chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _predictions(n: int, seed: int = 0, context: str | None = None) -> list[PredictionOutcome]:
    rng = np.random.default_rng(seed)
    out = [make_prediction(rng) for _ in range(n)]
    if context is not None:
        out = [p.model_copy(update={"context": context}) for p in out]
    return out


def _frequencies(st_: Store, ids: list[int], draws: int, **kw: Any) -> np.ndarray:
    index = {rid: j for j, rid in enumerate(ids)}
    counts = np.zeros(len(ids))
    for b in range(draws // 256):
        if b:
            kw.pop("seed", None)  # seed once, then let the stream run
        for rid in st_.sample(256, **kw).ids:
            counts[index[rid]] += 1
    return counts


def test_frequencies_match_p_alpha_over_the_sum_whole_store(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, priority_alpha=0.7) as s:
        ids = s.put_many(_predictions(40))
        prios = np.geomspace(0.05, 20.0, 40)  # three orders of magnitude
        s.update_priorities(ids, prios.tolist())
        probs = prios**0.7 / (prios**0.7).sum()
        got = s.sampling_probabilities()
        assert np.allclose([got[i] for i in ids], probs, rtol=1e-9)
        counts = _frequencies(s, ids, 256 * 200, seed=3)
        stat = _chi2(counts, probs)
        assert stat < CHI2_999[39], stat
        # the same statistic rejects a wrong distribution: uniform
        assert _chi2(counts, np.full(40, 1 / 40)) > 10 * CHI2_999[39]


def test_frequencies_match_within_kind_and_where_filters(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, priority_alpha=1.0) as s:
        rng = np.random.default_rng(4)
        preds = _predictions(60, seed=4)
        ids = s.put_many(preds)
        s.put_many([make_query_metric(rng) for _ in range(30)])  # another kind
        prios = rng.uniform(0.1, 5.0, size=60)
        s.update_priorities(ids, prios.tolist())
        warm = [i for i, p in zip(ids, preds, strict=True) if p.context == "warm_start"]
        assert 10 < len(warm) < 50
        wp = np.array([prios[ids.index(i)] for i in warm])
        counts = _frequencies(s, warm, 256 * 120, kind="prediction",
                              where={"context": "warm_start"}, seed=5)
        dof = len(warm) - 1
        crit = 1.0 + dof + 3.1 * math.sqrt(2 * dof) + 2.0  # ~alpha 0.001 (normal approx.)
        assert _chi2(counts, wp / wp.sum()) < crit
        assert _chi2(counts, np.full(len(warm), 1 / len(warm))) > 5 * crit
        # kind= alone: only predictions, in proportion to their priorities
        counts = _frequencies(s, ids, 256 * 100, kind="prediction", seed=6)
        assert _chi2(counts, prios / prios.sum()) < 1.0 + 59 + 3.1 * math.sqrt(118) + 2.0


def test_importance_weights_equal_the_formula(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        ids = s.put_many(_predictions(30))
        s.update_priorities(ids, np.linspace(0.2, 3.0, 30).tolist())
        probs = s.sampling_probabilities()
        batch = s.sample(64, beta=0.5, seed=1)
        n = len(probs)
        pmin = min(probs.values())
        for rid, p, w in zip(batch.ids, batch.probabilities, batch.weights, strict=True):
            assert math.isclose(p, probs[rid], rel_tol=1e-9)
            expect = (n * probs[rid]) ** -0.5 / (n * pmin) ** -0.5
            assert math.isclose(w, expect, rel_tol=1e-9)
        assert batch.records[0].id == batch.ids[0]
        assert all(0 < w <= 1 for w in batch.weights)


def test_the_default_model_per_kind(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {"new_item_priority": 0.0, "priority_alpha": 1.0}
    with Store.open(tmp_path / "s", create=True, **cfg) as s:
        t = 1_700_000_000.0
        a = s.put(PredictionOutcome(predicted="warm", confidence=0.2, context="c", reward=-0.5,
                                    ts=t))
        b = s.put(PredictionOutcome(predicted="warm", confidence=0.9, context="c",
                                    ts=t - 7 * 86400))
        probs = s.sampling_probabilities()
        pa = 0.4 * 0.8 + 0.4 * 0.5 + 0.2 * 1.0  # newest: age_term 1
        pb = 0.4 * 0.1 + 0.0 + 0.2 * 0.5  # one half-life older
        assert math.isclose(probs[a], pa / (pa + pb), rel_tol=1e-6)
        assert math.isclose(probs[b], pb / (pa + pb), rel_tol=1e-6)
        # feedback moves priority: successes raise it, failures lower it
        s.record_feedback([a], [True], count_retrieval=True)
        s.record_feedback([b], [False], count_retrieval=True)
        after = s.sampling_probabilities()
        assert after[a] > probs[a] and after[b] < probs[b]
        exp = s.get(a)
        assert (exp.retrieval_count, exp.success_count) == (1, 1)


def test_never_sampled_items_get_new_item_priority(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True, new_item_priority=5.0, priority_alpha=1.0) as s:
        ids = s.put_many(_predictions(10))
        probs = s.sampling_probabilities()
        assert all(math.isclose(probs[i], 0.1) for i in ids)  # all at max(formula, 5.0)
        s.sample(3, seed=0)
        drawn = set(s.sample(3, seed=0).ids)
        after = s.sampling_probabilities()
        assert all(after[i] < 0.1 for i in drawn)  # sampled once: back to the formula


def test_duplicate_ids_last_priority_wins_and_feedback_counts_each(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        ids = s.put_many(_predictions(3))
        s.update_priorities([ids[0], ids[0], ids[1]], [1.0, 9.0, 2.0])
        assert s.get(ids[0]).priority == 9.0 and s.get(ids[1]).priority == 2.0
        s.record_feedback([ids[2], ids[2]], [True, True], count_retrieval=True)
        assert (s.get(ids[2]).retrieval_count, s.get(ids[2]).success_count) == (2, 2)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "x", True])
def test_bad_priorities_are_refused_and_nothing_is_logged(tmp_path: Path, bad: Any) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        ids = s.put_many(_predictions(3))
        before = s.stats()["next_lsn"]
        with pytest.raises(InvalidArgumentError) as err:
            s.update_priorities(ids, [1.0, bad, 1.0])
        assert err.value.field == "priorities[1]"
        assert s.stats()["next_lsn"] == before


def test_other_bad_arguments(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        ids = s.put_many(_predictions(3))
        before = s.stats()["next_lsn"]
        with pytest.raises(RecordNotFoundError):
            s.update_priorities([ids[0], 999_999], [1.0, 1.0])
        with pytest.raises(InvalidArgumentError, match="2 priorities"):
            s.update_priorities(ids, [1.0, 2.0])
        with pytest.raises(InvalidArgumentError):
            s.record_feedback(ids, [True])
        with pytest.raises(InvalidArgumentError):
            s.record_feedback(ids, ["yes", True, True])  # type: ignore[list-item]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"n": 0}, "n"), ({"n": 4, "beta": 2.0}, "beta"),
            ({"n": 4, "kind": "song"}, "kind"), ({"n": 4, "seed": -1}, "seed")]
        for kwargs, field in cases:
            with pytest.raises(InvalidArgumentError) as err:
                s.sample(**kwargs)
            assert err.value.field == field
        assert s.stats()["next_lsn"] == before


def test_empty_store_and_empty_filters_raise_empty_sample_error(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        with pytest.raises(EmptySampleError):
            s.sample(4)
        s.put_many(_predictions(5))
        with pytest.raises(EmptySampleError):
            s.sample(4, kind="query_metric")
        with pytest.raises(LookupError):
            s.sample(4, kind="prediction", where={"context": "no-such-context"})
        rid = s.sample(1).ids[0]
        s.delete(rid)
        assert rid not in s.sampling_probabilities()


def test_where_filter_follows_later_writes(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as s:
        s.put_many(_predictions(20, context="cold_start"))
        with pytest.raises(EmptySampleError):
            s.sample(2, kind="prediction", where={"context": "warm_start"})
        new = s.put_many(_predictions(3, seed=9, context="warm_start"))
        got = set(s.sample(50, kind="prediction", where={"context": "warm_start"}).ids)
        assert got == set(new)
        s.delete(new[0])
        got = set(s.sample(50, kind="prediction", where={"context": "warm_start"}).ids)
        assert got == set(new[1:])


CHILD = textwrap.dedent(
    """
    import sys
    from xpstore import Store
    path = sys.argv[1]
    with Store.open(path) as s:
        ids = sorted(s.sampling_probabilities())
        for k, rid in enumerate(ids):
            s.update_priorities([rid], [1.0 + k])
            s.record_feedback([rid], [k % 2 == 0], count_retrieval=True)
            print("ACK", rid, flush=True)
        import time
        time.sleep(60)
    """
)


def test_sigkill_after_acknowledged_priority_updates_and_feedback(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True) as s:
        s.put_many(_predictions(200))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ})  # fmt: skip
    acked: list[int] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(int(line.split()[1]))
        if len(acked) == 120:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    with Store.open(path) as s:
        ordered = sorted(s.sampling_probabilities())
        probs = s.sampling_probabilities()
        for rid in acked:
            k = ordered.index(rid)
            exp = s.get(rid)
            assert exp.priority == 1.0 + k
            assert exp.retrieval_count == 1 and exp.success_count == (1 if k % 2 == 0 else 0)
        alpha = s.config.sampling.alpha
        # the tree reflects them: P ∝ p^alpha among the acknowledged ids
        a, b = acked[0], acked[-1]
        ka, kb = ordered.index(a), ordered.index(b)
        ratio = probs[b] / probs[a]
        assert math.isclose(ratio, ((1.0 + kb) / (1.0 + ka)) ** alpha, rel_tol=1e-6)


def test_a_seeded_run_resumes_identically_after_close_and_reopen(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with Store.open(a, create=True) as s:
        s.put_many(_predictions(300))
        s.put_many([make_query_metric(np.random.default_rng(1)) for _ in range(100)])
    shutil.copytree(a, b)
    with Store.open(a) as s:
        first = [s.sample(16, seed=7).ids] + [s.sample(16).ids for _ in range(4)]
    with Store.open(a) as s:
        first += [s.sample(16).ids for _ in range(5)]
    with Store.open(b) as s:
        second = [s.sample(16, seed=7).ids] + [s.sample(16).ids for _ in range(9)]
    assert first == second


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["put", "delete", "prio", "feedback"]),
                          st.integers(0, 50), st.floats(0.01, 100.0)), max_size=40))
def test_tree_totals_equal_the_sum_of_live_leaves(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, float]]
) -> None:
    path = tmp_path_factory.mktemp("h") / "s"
    with Store.open(path, create=True, durability="none") as s:
        live = s.put_many(_predictions(5))
        s.sample(1)  # attach the sampler, so every later op goes through the listener
        for op, pick, value in ops:
            if op == "put":
                live += s.put_many(_predictions(1, seed=pick))
            elif not live:
                continue
            elif op == "delete":
                s.delete(live.pop(pick % len(live)))
            elif op == "prio":
                s.update_priorities([live[pick % len(live)]], [value])
            else:
                s.record_feedback([live[pick % len(live)]], [value > 50], count_retrieval=True)
        sampler = s.parts.sampling.attached()
        for kind in sampler.kinds.values():
            leaves = kind.tree.get(np.arange(kind.n)) if kind.n else np.zeros(0)
            assert math.isclose(kind.tree.total, float(leaves.sum()), rel_tol=1e-9, abs_tol=1e-12)
        probs = s.sampling_probabilities()
        assert set(probs) == set(live)
        if live:
            assert math.isclose(sum(probs.values()), 1.0, rel_tol=1e-9)


def test_records_replayed_by_recovery_get_their_rows_at_the_first_sample(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with Store.open(path, create=True, hold_applier=True) as s:  # everything stays in the WAL
        ids = s.put_many(_predictions(40))
        s.update_priorities(ids[:2], [7.0, 8.0])
    with Store.open(path) as s:  # recovery copies the puts into LMDB without their rows
        tables = s.parts.engine.tables
        with tables.reading() as txn:
            rows = txn.stat(tables.db(b"prio"))["entries"]
        assert rows == 2  # only the priority op computed rows
        probs = s.sampling_probabilities()
        assert set(probs) == set(ids)
        with tables.reading() as txn:
            assert txn.stat(tables.db(b"prio"))["entries"] == 40
        assert s.get(ids[0]).priority == 7.0


def test_a_where_filter_on_counters_follows_counter_only_changes(tmp_path: Path) -> None:
    """Counter-only changes (feedback, priorities) skip the filter re-check unless the filter
    looks at a counter: then it must see them."""
    with Store.open(tmp_path / "s", create=True) as s:
        ids = s.put_many(_predictions(6, context="warm_start"))
        by_context = s.sample(50, kind="prediction", where={"context": "warm_start"}, seed=1)
        assert set(by_context.ids) <= set(ids)
        assert s.sample(4, kind="prediction", where={"success_count__gte": 0}, seed=2).ids
        with pytest.raises(EmptySampleError):
            s.sample(4, kind="prediction", where={"success_count__gte": 1})
        s.record_feedback(ids[:2], True)
        drawn = set(s.sample(50, kind="prediction", where={"success_count__gte": 1}, seed=3).ids)
        assert drawn == set(ids[:2])


def test_a_deleted_record_stays_out_when_the_trees_are_reweighed(tmp_path: Path) -> None:
    """A deleted record keeps its slot (weight 0) and its row; moving ``t_ref`` reweighs every
    slot, and used to give the deleted one its weight back (found by the retrieval-count
    property test: counts logged between the puts and the delete gave the record a slot)."""
    from xpstore.model.codec import RetrievalOp

    s = Store.open(tmp_path / "s", create=True)
    try:
        rng = np.random.default_rng(0)
        ids = s.put_many([make_prediction(rng) for _ in range(20)])
        s.parts.writer.submit_one(RetrievalOp([ids[0]], [2]))
        s.delete(ids[8])
        sampler = s.parts.sampling.attached()  # t_ref moves from 0 to the newest ts here
        probs = sampler.probabilities("prediction")
        assert ids[8] not in probs and set(probs) == set(ids) - {ids[8]}
        drawn = s.sample(400, kind="prediction", seed=1).ids
        assert ids[8] not in drawn and len(set(drawn)) == 19
    finally:
        s.close()
