"""The telemetry seam: the log-bucket sketch against exact percentiles, and the store's own
operations observed in memory (what profilers and metrics read)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.index_support import library
from xpstore import InvalidArgumentError, Store
from xpstore.demo.synthetic import make_prediction
from xpstore.model.sketch import LogHistogram
from xpstore.persistence.telemetry import Telemetry

values = st.lists(
    st.floats(min_value=1e-7, max_value=1e4, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=300,
)


def _within(got: float, lo: float, hi: float, gamma: float) -> bool:
    """``got`` lies in [lo / gamma, hi * gamma] (one bucket's width around the true rank)."""
    return lo / gamma - 1e-12 <= got <= hi * gamma + 1e-12


@settings(max_examples=200, deadline=None)
@given(values, st.sampled_from([0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 1.0]))
def test_quantiles_are_within_one_bucket_of_the_exact_order_statistic(
    xs: list[float], q: float
) -> None:
    h = LogHistogram()
    h.extend(xs)
    srt = sorted(xs)
    rank = q * (len(xs) - 1)
    lo, hi = srt[math.floor(rank)], srt[math.ceil(rank)]
    assert _within(h.quantile(q), lo, hi, h.gamma)
    assert h.count == len(xs) and math.isclose(h.sum, sum(xs), rel_tol=1e-9)
    assert h.min == min(xs) and h.max == max(xs)


@settings(max_examples=100, deadline=None)
@given(values, values)
def test_merging_equals_adding_everything_to_one(a: list[float], b: list[float]) -> None:
    one = LogHistogram()
    one.extend(a + b)
    left, right = LogHistogram(), LogHistogram()
    left.extend(a)
    right.extend(b)
    merged = left.merge(right)
    assert merged.buckets == one.buckets and merged.count == one.count
    for q in (0.5, 0.99):
        assert merged.quantile(q) == one.quantile(q)


@settings(max_examples=50, deadline=None)
@given(values)
def test_the_plain_dict_form_round_trips(xs: list[float]) -> None:
    h = LogHistogram()
    h.extend(xs)
    h.add(0.0)
    back = LogHistogram.from_dict(h.to_dict())
    assert back.buckets == h.buckets and back.zeros == 1 and back.count == h.count
    assert back.quantile(0.9) == h.quantile(0.9)


def test_a_heavy_tail_p99_matches_numpy_within_the_bucket_error() -> None:
    rng = np.random.default_rng(3)
    xs = rng.lognormal(mean=-7, sigma=1.5, size=50_000)
    h = LogHistogram()
    h.extend(xs.tolist())
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = float(np.quantile(xs, q))
        assert abs(h.quantile(q) / exact - 1) < 0.021, q
    assert h.count_above(float(np.quantile(xs, 0.99))) == pytest.approx(500, rel=0.05)


def test_bad_values_and_documents_are_refused_by_name() -> None:
    h = LogHistogram()
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(InvalidArgumentError, match="finite and >= 0"):
            h.add(bad)
    assert h.count == 0
    with pytest.raises(InvalidArgumentError, match="'count'"):
        LogHistogram.from_dict({"gamma": 1.02, "buckets": {}, "zeros": 0, "sum": 0.0})
    one = LogHistogram()
    one.add(0.5)
    with pytest.raises(InvalidArgumentError, match="sum to 1"):
        LogHistogram.from_dict(one.to_dict() | {"count": 3})
    with pytest.raises(InvalidArgumentError, match="malformed"):
        LogHistogram.from_dict(one.to_dict() | {"min": None})
    with pytest.raises(InvalidArgumentError, match="gamma"):
        LogHistogram(1.5).merge(LogHistogram())
    with pytest.raises(InvalidArgumentError, match="q must be"):
        h.quantile(1.5)
    assert math.isnan(h.quantile(0.5))


def test_intervals_are_taken_apart_from_the_totals() -> None:
    t = Telemetry()
    t.observe("put", 0.001)
    with t.timed("put"):
        pass
    t.incr("put.records", 5)
    start, end, first = t.take_interval()
    assert start <= end and first["put"].count == 2
    t.observe("put", 0.002)
    _, _, second = t.take_interval()
    assert second["put"].count == 1
    assert t.histograms()["put"].count == 3 and t.counters() == {"put.records": 5.0}


def test_the_store_observes_its_own_operations(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with Store.open(tmp_path / "s", create=True, durability="commit") as st:
        st.put_many(library(rng, 50))
        ids = [st.put(make_prediction(rng)) for _ in range(5)]
        st.flush()
        st.similar("t1", k=3)
        st.similar_many(np.stack([st.track_vector("t2"), st.track_vector("t3")]), k=2)
        st.rebuild_index()
        st.sample(4, kind="prediction")
        st.snapshot()
        tel = st.parts.telemetry
        hist = tel.histograms()
        for name in ("put", "wal.fsync", "wal.commit_writers", "apply", "apply.batch_ops",
                     "similar", "similar_many", "sample", "snapshot", "index.rebuild"):  # fmt: skip
            assert hist[name].count >= 1, name
        assert hist["put"].count == 1 + len(ids)
        assert tel.counters()["put.records"] == 50 + len(ids)
        assert tel.counters()["wal.bytes"] > 0
        assert hist["apply.batch_ops"].sum >= 55  # every record was applied
        assert hist["put"].quantile(0.5) > 0


def test_a_failed_call_is_still_timed(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", create=True) as st:
        st.put_many(library(np.random.default_rng(0), 5))
        with pytest.raises(InvalidArgumentError):
            st.sample(0)
        assert st.parts.telemetry.histograms()["sample"].count == 1
