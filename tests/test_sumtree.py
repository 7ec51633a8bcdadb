"""The in-memory sum-tree sampler (xpstore/store/sumtree.py): exact sampling frequencies, the
importance-weight formula, input checks, growth, O(n) builds and a hypothesis state machine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from xpstore.errors import EmptySampleError, InvalidRecordError
from xpstore.sampling.sumtree import MAX_WEIGHT, SumTree, importance_weights

# ---------------------------------------------------------------------------- chi-square helper


def chi2_sf(x: float, dof: int) -> float:
    """Survival function of the chi-square distribution (integer dof), from the closed forms of
    the regularized upper incomplete gamma function Q(dof/2, x/2); terms in log space."""
    if x <= 0.0:
        return 1.0
    half = x / 2.0
    if dof % 2 == 0:  # Q = e^-h * sum_{i < dof/2} h^i / i!
        return math.fsum(
            math.exp(i * math.log(half) - math.lgamma(i + 1) - half) for i in range(dof // 2)
        )
    # odd: Q = erfc(sqrt h) + e^-h * sum_{i=1}^{(dof-1)/2} h^(i-1/2) / Gamma(i+1/2)
    tail = math.fsum(
        math.exp((i - 0.5) * math.log(half) - math.lgamma(i + 0.5) - half)
        for i in range(1, (dof - 1) // 2 + 1)
    )
    return math.erfc(math.sqrt(half)) + tail


def chi2_stat(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize(
    ("x", "dof", "alpha"),
    [
        (3.841, 1, 0.05),
        (5.991, 2, 0.05),
        (18.307, 10, 0.05),
        (66.339, 49, 0.05),
        (85.351, 49, 0.001),
        (86.661, 50, 0.001),
    ],
)
def test_chi2_sf_matches_published_critical_values(x: float, dof: int, alpha: float) -> None:
    assert chi2_sf(x, dof) == pytest.approx(alpha, rel=2e-3)


# ---------------------------------------------------------------------------- sampling frequencies

ALPHA = 0.001  # significance level of the goodness-of-fit test


def _skewed_tree() -> tuple[SumTree, np.ndarray, np.ndarray]:
    """50 live slots with weights spanning 3 orders of magnitude, scattered among empty slots,
    in a tree large enough (capacity 2**14) to have stored levels below the searched top."""
    rng = np.random.default_rng(7)
    weights = 10.0 ** np.linspace(-3.0, 0.0, 50)
    rng.shuffle(weights)
    slots = np.sort(rng.choice(10_000, size=50, replace=False))
    tree = SumTree(4)
    tree.set(slots, weights)
    assert tree.capacity == 16_384
    return tree, slots, weights


def _draw_counts(tree: SumTree, slots: np.ndarray, mode: str) -> np.ndarray:
    """204 800 draws: ``stratified`` through ``sample`` (400 batches of 512), or ``iid``: the
    same descent fed independent uniform points of [0, total) (no stratification)."""
    rng = np.random.default_rng(20240611)
    if mode == "stratified":
        drawn = np.concatenate([tree.sample(512, rng) for _ in range(400)])
    else:
        drawn = tree.descend(rng.random(204_800) * tree.total)
    assert np.isin(drawn, slots).all(), "sampled an empty slot"
    pos = np.searchsorted(slots, drawn)
    return np.bincount(pos, minlength=slots.shape[0]).astype(np.float64)


@pytest.mark.parametrize("mode", ["iid", "stratified"])
def test_sampling_frequencies_match_weights_chi_square(mode: str) -> None:
    """Pearson's chi-square goodness of fit at ALPHA = 0.001 (49 degrees of freedom).

    For ``iid`` draws the statistic follows chi2(49) under the null. Stratified batches have a
    smaller variance than multinomial draws, so there the statistic is stochastically smaller and
    the acceptance is conservative; the power checks below hold for both.
    """
    tree, slots, weights = _skewed_tree()
    counts = _draw_counts(tree, slots, mode)
    target = weights / weights.sum()
    dof = slots.shape[0] - 1
    assert (target * counts.sum()).min() >= 5  # every expected count large enough for chi-square

    stat = chi2_stat(counts, target)
    p_value = chi2_sf(stat, dof)
    assert p_value > ALPHA, f"frequencies differ from w/sum(w): chi2={stat:.1f}, p={p_value:.2g}"

    # The same statistic on the same draws rejects wrong distributions, so the test has power:
    # uniform, and a subtly wrong exponent (w**1.05, i.e. alpha off by 5%).
    uniform = np.full_like(target, 1.0 / target.shape[0])
    assert chi2_sf(chi2_stat(counts, uniform), dof) < 1e-12
    skewed = weights**1.05 / (weights**1.05).sum()
    assert chi2_sf(chi2_stat(counts, skewed), dof) < 1e-12


def test_a_sampler_with_an_off_by_one_would_fail() -> None:
    """A sampler that shifts every draw to the next live slot fails the same test."""
    tree, slots, weights = _skewed_tree()
    counts = _draw_counts(tree, slots, "stratified")
    shifted = np.roll(counts, 1)
    target = weights / weights.sum()
    assert chi2_sf(chi2_stat(shifted, target), slots.shape[0] - 1) < 1e-12


def test_stratified_batches_cover_the_distribution() -> None:
    """A batch of n from n equal weights returns each slot exactly once (one draw per segment)."""
    tree = SumTree.from_weights(np.ones(64))
    drawn = tree.sample(64, np.random.default_rng(1))
    assert sorted(drawn.tolist()) == list(range(64))
    assert drawn.dtype == np.int64


def test_sample_is_deterministic_for_a_seed() -> None:
    tree = SumTree.from_weights(np.random.default_rng(3).random(5000))
    a = tree.sample(300, np.random.default_rng(42))
    b = tree.sample(300, np.random.default_rng(42))
    assert np.array_equal(a, b)


# ---------------------------------------------------------------------------- importance weights


def test_importance_weights_equal_the_formula() -> None:
    weights = np.array([0.5, 2.0, 0.0, 1.0, 0.25, 4.0])
    tree = SumTree.from_weights(weights)
    n_items, beta = len(tree), 0.4
    assert n_items == 5
    live = weights[weights > 0]
    slots = np.array([0, 1, 3, 4, 5, 1])
    probs = tree.probabilities(slots)
    assert probs == pytest.approx(weights[slots] / live.sum(), rel=1e-15)

    got = importance_weights(probs, n_items, beta, tree.min_weight / tree.total)
    # By hand: (N*P(i))**-beta divided by its maximum over ALL items (the rarest one, 0.25).
    all_p = live / live.sum()
    max_w = max((n_items * p) ** -beta for p in all_p)
    expected = [(n_items * (weights[s] / live.sum())) ** -beta / max_w for s in slots]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[3] == pytest.approx(1.0)  # slot 4 holds the smallest weight
    assert ((got > 0) & (got <= 1)).all()


def test_importance_weights_beta_zero_and_one() -> None:
    p = np.array([0.1, 0.2, 0.7])
    assert np.array_equal(importance_weights(p, 3, 0.0, 0.1), np.ones(3))
    assert importance_weights(p, 3, 1.0, 0.1) == pytest.approx([1.0, 0.5, 1 / 7])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.5}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"min_probability": 0.0}, "min_probability"),
        ({"min_probability": float("inf")}, "min_probability"),
        ({"n_items": 0}, "n"),
        ({"min_probability": 0.5}, "probabilities"),  # P(i) below the stated minimum
    ],
)
def test_importance_weights_reject_bad_arguments(kwargs: dict[str, float], field: str) -> None:
    args: dict[str, float] = {"n_items": 3, "beta": 0.4, "min_probability": 0.1} | kwargs
    with pytest.raises(InvalidRecordError) as info:
        importance_weights(np.array([0.1, 0.2, 0.7]), **args)  # type: ignore[arg-type]
    assert info.value.field == field


# ---------------------------------------------------------------------------- set / get


def test_duplicate_slots_in_one_set_last_value_wins() -> None:
    tree = SumTree(16)
    tree.set([3, 7, 3, 9, 3], [1.0, 2.0, 5.0, 4.0, 6.0])
    assert tree.get([3, 7, 9]).tolist() == [6.0, 2.0, 4.0]
    assert len(tree) == 3
    assert tree.total == 12.0
    # A duplicate that empties the slot last empties it; one that fills it last fills it.
    tree.set([7, 7], [3.0, 0.0])
    tree.set([11, 11], [0.0, 0.5])
    assert tree.get([7, 11]).tolist() == [0.0, 0.5]
    assert len(tree) == 3
    assert tree.min_weight == 0.5
    assert tree.total == pytest.approx(10.5)


def test_scalar_weight_broadcasts_and_zero_deletes() -> None:
    tree = SumTree.from_weights([1.0, 2.0, 3.0, 4.0])
    tree.set([1, 3], 0.0)
    assert tree.get(range(4)).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert len(tree) == 2
    assert tree.min_weight == 1.0
    assert tree.total == 4.0
    assert set(tree.sample(200, np.random.default_rng(0)).tolist()) == {0, 2}


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        (-1.0, "-1.0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (float("-inf"), "-inf"),
        (MAX_WEIGHT * 2, "2e+250"),
    ],
)
def test_bad_weights_are_refused_and_leave_the_tree_unchanged(bad: float, shown: str) -> None:
    tree = SumTree.from_weights([1.0, 2.0, 3.0])
    before = (tree.capacity, len(tree), tree.total, tree.min_weight, tree.get(range(3)).tolist())
    with pytest.raises(InvalidRecordError) as info:
        tree.set([0, 1, 5000, 2], [9.0, 9.0, bad, 9.0])  # slot 5000 would also grow the tree
    assert info.value.field == "priorities"
    assert "priorities[2]" in str(info.value)
    assert shown in str(info.value)
    after = (tree.capacity, len(tree), tree.total, tree.min_weight, tree.get(range(3)).tolist())
    assert after == before
    with pytest.raises(InvalidRecordError) as info:
        SumTree.from_weights([1.0, bad])
    assert info.value.field == "priorities"
    assert "priorities[1]" in str(info.value)
    tree.set([0], MAX_WEIGHT)  # the largest accepted weight
    assert tree.total == MAX_WEIGHT


@pytest.mark.parametrize(
    ("slots", "weights", "field"),
    [
        ([0, -1], [1.0, 1.0], "slots"),
        ([0.0, 1.0], [1.0, 1.0], "slots"),
        ([[0, 1]], [1.0, 1.0], "slots"),
        ([True, False], [1.0, 1.0], "slots"),
        ([0, 1], [1.0, 1.0, 1.0], "priorities"),
        ([0, 1], ["a", "b"], "priorities"),
    ],
)
def test_bad_slots_or_shapes_are_refused(slots: object, weights: object, field: str) -> None:
    tree = SumTree.from_weights([1.0])
    with pytest.raises(InvalidRecordError) as info:
        tree.set(slots, weights)  # type: ignore[arg-type]
    assert info.value.field == field
    assert tree.get([0, 1]).tolist() == [1.0, 0.0]


def test_get_past_capacity_reads_empty() -> None:
    tree = SumTree.from_weights([1.0, 2.0])
    assert tree.get([1, 10**6]).tolist() == [2.0, 0.0]
    assert tree.get([]).shape == (0,)


def test_capacity_is_a_power_of_two_and_validated() -> None:
    assert SumTree(1000).capacity == 1024
    assert SumTree(1).capacity == 1
    assert SumTree().capacity == 1024
    for bad in (0, -4, 2.5, True):
        with pytest.raises(InvalidRecordError):
            SumTree(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- empty trees


def test_empty_tree_refuses_to_sample() -> None:
    tree = SumTree()
    assert len(tree) == 0
    assert tree.total == 0.0
    assert tree.min_weight == math.inf
    with pytest.raises(EmptySampleError):
        tree.sample(4, np.random.default_rng(0))
    with pytest.raises(EmptySampleError):
        tree.probabilities([0])
    tree.set([5, 6], [1.0, 2.0])
    tree.set([5, 6], [0.0, 0.0])  # emptied again
    assert len(tree) == 0
    assert tree.total == 0.0
    assert tree.min_weight == math.inf
    with pytest.raises(EmptySampleError) as info:
        tree.sample(1, np.random.default_rng(0))
    assert isinstance(info.value, LookupError)


def test_sample_size_is_validated() -> None:
    tree = SumTree.from_weights([1.0])
    assert tree.sample(0, np.random.default_rng(0)).shape == (0,)
    with pytest.raises(InvalidRecordError) as info:
        tree.sample(-1, np.random.default_rng(0))
    assert info.value.field == "n"


# ---------------------------------------------------------------------------- growth and builds


def test_growth_keeps_every_weight() -> None:
    rng = np.random.default_rng(11)
    tree = SumTree(2)
    model = np.zeros(0)
    capacities = []
    for step in range(12):  # slots up to ~20k: capacities 2 .. 32768, stored levels appear
        hi = 2 + int(2.4**step)
        slots = rng.integers(0, hi, size=40)
        weights = rng.uniform(0.0, 10.0, size=40)
        weights[rng.random(40) < 0.2] = 0.0
        tree.set(slots, weights)
        if model.shape[0] < hi:
            model = np.concatenate([model, np.zeros(hi - model.shape[0])])
        for s, w in zip(slots, weights, strict=True):
            model[s] = w
        capacities.append(tree.capacity)
        assert tree.capacity >= model.shape[0] or not model[tree.capacity :].any()
        assert np.array_equal(tree.get(np.arange(model.shape[0])), model)
        assert tree.total == pytest.approx(model.sum(), rel=1e-12)
        assert len(tree) == np.count_nonzero(model)
    assert capacities == sorted(capacities)
    assert all(c & (c - 1) == 0 for c in capacities)
    assert capacities[-1] > 4096  # past the flat top: stored levels exercised


@pytest.mark.parametrize("n", [10, 1500, 10_000, 70_000])
def test_from_weights_equals_incremental_sets(n: int) -> None:
    rng = np.random.default_rng(n)
    weights = rng.exponential(1.0, size=n)
    weights[rng.random(n) < 0.1] = 0.0
    built = SumTree.from_weights(weights)
    incremental = SumTree()
    order = rng.permutation(n)
    for chunk in np.array_split(order, 7):
        incremental.set(chunk, weights[chunk])
    assert built.capacity == incremental.capacity
    assert len(built) == len(incremental) == np.count_nonzero(weights)
    # Bit for bit: parents are recomputed from children, never adjusted by deltas.
    assert built.total == incremental.total
    assert built.min_weight == incremental.min_weight == weights[weights > 0].min()
    assert np.array_equal(built.get(np.arange(n)), incremental.get(np.arange(n)))
    assert np.array_equal(
        built.sample(999, np.random.default_rng(5)),
        incremental.sample(999, np.random.default_rng(5)),
    )


def test_updates_do_not_drift() -> None:
    """Many updates of the same slots leave the total equal to a fresh build's."""
    rng = np.random.default_rng(9)
    tree = SumTree.from_weights(rng.random(20_000))
    for _ in range(300):
        slots = rng.integers(0, 20_000, size=256)
        tree.set(slots, rng.random(256) * 1e3)
    fresh = SumTree.from_weights(tree.get(np.arange(20_000)))
    assert tree.total == fresh.total


# ---------------------------------------------------------------------------- boundary draws


@pytest.mark.parametrize("capacity", [8, 1 << 15])
def test_draws_on_boundaries_never_return_an_empty_slot(capacity: int) -> None:
    """Draws exactly on a cumulative boundary, at the total, or past it (rounding) land on a
    non-empty slot; the fast descent's dead ends are redone by the careful one."""
    last = capacity - 1
    tree = SumTree(capacity)
    tree.set([1, 2, last - 3], [1.0, 0.5, 2.0])  # zeros around every live slot
    total = tree.total
    assert total == 3.5
    u = np.array([0.0, 1.0, 1.5, 3.4999999, total, np.nextafter(total, np.inf), total * 4])
    got = tree.descend(u)
    assert got.tolist() == [1, 2, last - 3, last - 3, last - 3, last - 3, last - 3]
    assert (tree.get(got) > 0).all()
    # The slot left of a boundary is empty and the right one holds the rest: boundary goes right.
    tree.set([0, 1], [0.0, 0.0])
    assert tree.descend(np.array([0.0, 0.5])).tolist() == [2, last - 3]
    # A live slot whose right neighbours are all empty is taken for any draw at/after its start.
    tree.set([last - 3], 0.0)
    assert tree.descend(np.array([0.0, 0.25, 0.5, 1.0, 1e9])).tolist() == [2] * 5


def test_careful_descent_handles_a_left_sum_rounded_above_the_draw() -> None:
    """The fast descent goes right when u >= left child; when the right subtree is empty (u is
    past the left child only by rounding) the careful descent keeps to the left."""
    tree = SumTree(1 << 14)
    tree.set([100], [0.1])
    tree.set([101], [0.2])
    tree.set([101], [0.0])
    got = tree.descend(np.array([0.1, 0.1 + 1e-17, np.nextafter(0.1, 1.0)]))
    assert got.tolist() == [100, 100, 100]


# ---------------------------------------------------------------------------- state machine


WEIGHTS = st.one_of(
    st.just(0.0),
    st.floats(min_value=1e-9, max_value=1e6, allow_nan=False, allow_infinity=False),
)


class SumTreeMachine(RuleBasedStateMachine):
    """Inserts, updates, deletes (weight 0) and duplicates against a dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.tree = SumTree(2)
        self.model: dict[int, float] = {}
        self.rng = np.random.default_rng(0)

    @rule(items=st.lists(st.tuples(st.integers(0, 300), WEIGHTS), min_size=1, max_size=20))
    def set_many(self, items: list[tuple[int, float]]) -> None:
        self.tree.set([s for s, _ in items], [w for _, w in items])
        for s, w in items:  # later duplicates overwrite earlier ones
            self.model[s] = w

    @rule(slot=st.integers(4000, 9000), weight=WEIGHTS)
    def insert_far(self, slot: int, weight: float) -> None:  # grows past the flat top
        self.tree.set([slot], [weight])
        self.model[slot] = weight

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        live = sorted(s for s, w in self.model.items() if w > 0)
        if not live:
            return
        chosen = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=5))
        self.tree.set(chosen, 0.0)
        for s in chosen:
            self.model[s] = 0.0

    @rule(bad=st.sampled_from([-1.0, float("nan"), float("inf")]), slot=st.integers(0, 300))
    def refused(self, bad: float, slot: int) -> None:
        with pytest.raises(InvalidRecordError):
            self.tree.set([slot, slot + 1], [1.0, bad])

    @invariant()
    def totals_match_live_leaves(self) -> None:
        live = [w for w in self.model.values() if w > 0]
        assert len(self.tree) == len(live)
        assert self.tree.total == pytest.approx(math.fsum(live), rel=1e-9, abs=0.0)
        assert self.tree.min_weight == (min(live) if live else math.inf)
        if self.model:
            slots = sorted(self.model)
            assert self.tree.get(slots).tolist() == [self.model[s] for s in slots]

    @invariant()
    def samples_are_live(self) -> None:
        if not any(w > 0 for w in self.model.values()):
            with pytest.raises(EmptySampleError):
                self.tree.sample(8, self.rng)
            return
        drawn = self.tree.sample(64, self.rng)
        assert all(self.model.get(int(s), 0.0) > 0 for s in drawn)

    @invariant()
    def equals_a_fresh_build(self) -> None:
        leaves = self.tree.get(np.arange(self.tree.capacity))
        fresh = SumTree.from_weights(leaves, capacity=self.tree.capacity)
        assert fresh.capacity == self.tree.capacity
        assert fresh.total == self.tree.total


SumTreeMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSumTreeMachine = SumTreeMachine.TestCase


def test_set_and_get_do_not_modify_the_callers_arrays() -> None:
    tree = SumTree(1 << 14)
    for slots in (np.array([9000], dtype=np.int64), np.array([9001, 5, 9001], dtype=np.int64)):
        weights = np.full(slots.shape[0], 2.5)
        before = slots.copy()
        tree.set(slots, weights)
        tree.get(slots)
        assert np.array_equal(slots, before)
        assert (weights == 2.5).all()
    assert tree.get([5, 9000, 9001]).tolist() == [2.5, 2.5, 2.5]
