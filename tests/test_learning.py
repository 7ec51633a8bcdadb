"""The affinity learner (issue 10): the published seed rules one by one, property tests of the
clamps and the calibration, the learner's API and errors, decisions through the WAL, and its
state after a SIGKILL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from xpstore import Decision, InvalidArgumentError, Learner, PredictionOutcome, Store
from xpstore.cli import main
from xpstore.demo.listeners import make_listeners, simulate, track_features
from xpstore.tuning.calibration import MIN_OUTCOMES, Calibrator, reliability
from xpstore.tuning.model import DEFAULT_RULES, active, blend, conditions
from xpstore.tuning.policies import SeedPolicy

REPO = Path(__file__).resolve().parents[1]
fractions = st.floats(0.0, 1.0, allow_nan=False)


# ----------------------------------------------------------------------- the seed rules


def test_seed_weight_moves_toward_audio_when_it_leads_by_more_than_5_points() -> None:
    assert SeedPolicy.next_weight(0.7, user_only=0.50, enhanced=0.56) == 0.65


def test_seed_weight_moves_toward_the_user_when_audio_trails_by_more_than_5_points() -> None:
    assert SeedPolicy.next_weight(0.7, user_only=0.60, enhanced=0.54) == 0.75


def test_seed_weight_stays_within_5_points() -> None:
    assert SeedPolicy.next_weight(0.7, user_only=0.50, enhanced=0.55) == 0.7
    assert SeedPolicy.next_weight(0.7, user_only=0.55, enhanced=0.50) == 0.7


def test_seed_weight_is_clamped_to_half_and_nine_tenths() -> None:
    assert SeedPolicy.next_weight(0.5, user_only=0.2, enhanced=0.9) == 0.5
    assert SeedPolicy.next_weight(0.9, user_only=0.9, enhanced=0.2) == 0.9
    assert SeedPolicy.next_weight(0.52, user_only=0.2, enhanced=0.9) == 0.5


def test_seed_affinity_needs_20_outcomes() -> None:
    assert SeedPolicy.next_affinity(0.5, n=19, hits=19) == 0.5
    assert SeedPolicy.next_affinity(0.5, n=20, hits=19) == 0.55


def test_seed_affinity_rises_above_70_and_falls_below_40_percent_success() -> None:
    assert SeedPolicy.next_affinity(0.5, n=100, hits=71) == 0.55
    assert SeedPolicy.next_affinity(0.5, n=100, hits=70) == 0.5  # not above 0.7
    assert SeedPolicy.next_affinity(0.5, n=100, hits=40) == 0.5  # not below 0.4
    assert SeedPolicy.next_affinity(0.5, n=100, hits=39) == 0.45


def test_seed_affinity_is_clamped_to_0_and_1() -> None:
    assert SeedPolicy.next_affinity(1.0, n=50, hits=50) == 1.0
    assert SeedPolicy.next_affinity(0.0, n=50, hits=0) == 0.0
    assert SeedPolicy.next_affinity(0.98, n=50, hits=50) == 1.0


@given(fractions, fractions, fractions)
def test_seed_weight_never_leaves_its_range(start: float, user_only: float, enh: float) -> None:
    w = 0.5 + 0.4 * start
    assert 0.5 <= SeedPolicy.next_weight(w, user_only, enh) <= 0.9


@given(fractions, st.integers(0, 500), st.data())
def test_seed_affinity_never_leaves_0_1(old: float, n: int, data: st.DataObject) -> None:
    hits = data.draw(st.integers(0, n))
    assert 0.0 <= SeedPolicy.next_affinity(old, n, hits) <= 1.0


def test_seed_evaluates_a_listener_only_from_50_outcomes(store: Store) -> None:
    lrn = Learner(store, policy="seed", learn_every=10_000)  # learn by hand only
    rng = np.random.default_rng(0)
    for i in range(49):
        f = {"energy": 0.9} if i % 2 else {"energy": 0.1}
        pred = lrn.predict("u1", f)
        lrn.resolve(lrn.record(pred), "punchy" if i % 2 else "gentle")
    assert not any(d.target.startswith("user_weight/") for d in lrn.policy.learn())
    pred = lrn.predict("u1", track_features(rng))
    lrn.resolve(lrn.record(pred), "warm")
    assert lrn.habits["u1"].n == 50
    lrn.policy.learn()  # evaluated now (whether it moves depends on the accuracies)


# ----------------------------------------------------------------------- the model


@given(st.dictionaries(st.sampled_from(["energy", "brightness", "dynamics", "vocal_presence",
                                        "tempo_energy", "other"]), fractions))  # fmt: skip
def test_conditions_follow_the_thresholds(features: dict[str, float]) -> None:
    conds = set(conditions(features))
    for name, value in features.items():
        if name == "other":
            continue
        assert (f"high_{name}" in conds) == (value > 0.6)
        assert (f"low_{name}" in conds) == (value < 0.4)
    strengths = [s for _c, s in active(features)]
    assert strengths == sorted(strengths, reverse=True)


@given(st.lists(fractions, min_size=3, max_size=3), st.lists(fractions, min_size=3, max_size=3),
       fractions)  # fmt: skip
def test_a_blend_of_two_distributions_is_a_distribution(a: list[float], b: list[float],
                                                        w: float) -> None:  # fmt: skip
    labels = ["x", "y", "z"]
    pa = {lab: (v + 1e-3) / (sum(a) + 3e-3) for lab, v in zip(labels, a, strict=True)}
    pb = {lab: (v + 1e-3) / (sum(b) + 3e-3) for lab, v in zip(labels, b, strict=True)}
    mixed = blend(pa, pb, w)
    assert abs(sum(mixed.values()) - 1.0) < 1e-9 and all(v >= 0 for v in mixed.values())


@given(st.lists(st.tuples(fractions, st.booleans()), min_size=MIN_OUTCOMES, max_size=400))
def test_the_calibration_is_monotone_and_a_probability(pairs: list[tuple[float, bool]]) -> None:
    cal = Calibrator.fit([s for s, _ in pairs], [ok for _, ok in pairs])
    xs = np.linspace(0, 1, 41)
    ys = [cal(float(x)) for x in xs]
    assert all(0.0 <= y <= 1.0 for y in ys)
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(ys))


def test_calibration_learns_an_overconfident_score() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random(4000)
    correct = rng.random(4000) < scores * 0.5  # right half as often as the score says
    cal = Calibrator.fit(scores.tolist(), correct.tolist())
    conf = [cal(s) for s in scores.tolist()]
    assert reliability(conf, correct.tolist())["ece"] < 0.03  # type: ignore[operator]
    assert reliability(scores.tolist(), correct.tolist())["ece"] > 0.2  # type: ignore[operator]


# ----------------------------------------------------------------------- the learner


def test_predict_record_resolve_through_the_store(store: Store) -> None:
    lrn = Learner(store, policy="fixed")
    pred = lrn.predict("u1", {"energy": 0.9, "brightness": 0.5}, context="cold_start")
    assert pred.label == "punchy" and pred.conditions == ("high_energy",)
    assert pred.user_weight == 0.7 and pred.audio_weight == pytest.approx(0.3)
    assert abs(sum(pred.scores.values()) - 1.0) < 1e-9
    rid = lrn.record(pred, track_id="t1")
    rec = store.get(rid).record
    assert isinstance(rec, PredictionOutcome) and rec.predicted == "punchy"
    assert rec.user_id == "u1" and rec.track_id == "t1" and rec.score == pytest.approx(pred.score)
    before = store.stats()["next_lsn"]
    lrn.resolve(rid, "warm")
    assert store.stats()["next_lsn"] == before + 1  # one durable update
    done = store.get(rid).record
    assert isinstance(done, PredictionOutcome) and done.actual == "warm" and done.reward == -1.0
    assert lrn.accuracy() ["all_time"] == {"n": 1, "accuracy": 0.0}


def test_bad_arguments_name_the_argument(store: Store) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        Learner(store, policy="clever")
    assert err.value.field == "policy"
    lrn = Learner(store)
    with pytest.raises(InvalidArgumentError) as err:
        lrn.predict("u1", {"energy": 1.5})
    assert err.value.field == "audio_features.energy"
    with pytest.raises(InvalidArgumentError) as err:
        lrn.predict("", {})
    assert err.value.field == "user_id"
    with pytest.raises(InvalidArgumentError) as err:
        lrn.weights("nobody")
    assert err.value.field == "user_id"
    with pytest.raises(InvalidArgumentError):
        lrn.accuracy(by="planet")
    rid = lrn.record(lrn.predict("u1", {}))
    lrn.resolve(rid, "warm")
    with pytest.raises(InvalidArgumentError, match="already resolved"):
        lrn.resolve(rid, "warm")
    with pytest.raises(InvalidArgumentError) as err:
        Learner(store, labels=[])
    assert err.value.field == "labels"


def _play(lrn: Learner, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    people = make_listeners(4, rng, n)
    for t in range(n):
        for person in people:
            f = track_features(rng)
            pred = lrn.predict(person.user_id, f)
            lrn.resolve(lrn.record(pred), person.choose(f, t, rng))


@pytest.mark.parametrize("policy", ["seed", "default"])
def test_decisions_are_records_and_reopening_gives_the_same_state(store_path: Path,
                                                                 policy: str) -> None:  # fmt: skip
    with Store.open(store_path, create=True, durability="none") as store:
        lrn = Learner(store, policy=policy, learn_every=50, seed=3)
        _play(lrn, 150)
        weights = dict(lrn.user_weight)
        rules = lrn.rules()
        decisions = list(store.scan(kind="decision"))
        assert decisions, "learning logged nothing"
        for exp in decisions:
            assert isinstance(exp.record, Decision)
            assert exp.record.component == "learner" and exp.record.policy == policy
            assert exp.record.reason
        resolved = lrn.resolved
    with Store.open(store_path) as store:
        again = Learner(store, policy=policy)
        assert again.user_weight == weights and again.rules() == rules
        assert again.resolved == resolved


def test_step_writes_feedback_and_priorities(store: Store) -> None:
    lrn = Learner(store, policy="default", learn_every=10_000, batch_size=32, seed=1)
    _play(lrn, 20)
    rep = lrn.step()
    assert rep.sampled == 32 and 0.0 <= rep.mean_loss <= 1.0 and rep.decisions == len(rep.changed)
    touched = [e for e in store.scan(kind="prediction") if e.priority is not None]
    assert touched  # update_priorities reached them
    right = [e for e in touched if isinstance(e.record, PredictionOutcome)
             and e.record.actual == e.record.predicted]  # fmt: skip
    assert right and all(e.success_count >= 1 for e in right)  # record_feedback did too


def test_reset_is_a_decision(store: Store) -> None:
    lrn = Learner(store, policy="default", learn_every=40, seed=2)
    _play(lrn, 60)
    assert lrn.user_weight, "no listener weight was learned"
    user = sorted(lrn.user_weight)[0]
    lrn.reset(user)
    assert user not in lrn.user_weight
    lrn.reset()
    assert lrn.user_weight == {} and lrn.weights()["user_weight"] == 0.7
    targets = [e.record.target for e in store.scan(kind="decision")
               if isinstance(e.record, Decision) and e.record.action == "reset"]  # fmt: skip
    assert f"user_weight/{user}" in targets and "all" in targets


def test_the_default_policy_beats_the_fixed_one_on_simulated_listeners(tmp_path: Path) -> None:
    results = {}
    for policy in ("fixed", "default"):
        with Store.open(tmp_path / policy, create=True, durability="none") as store:
            results[policy] = simulate(store, policy, listeners=6, interactions=300, seed=5,
                                       last=150).accuracy_last  # fmt: skip
    assert results["default"] > results["fixed"]


CHILD = """
import json, sys
import numpy as np
from xpstore import Store, Learner
from xpstore.demo.listeners import make_listeners, track_features
store = Store.open(sys.argv[1], hold_applier=True)
lrn = Learner(store, policy="seed", learn_every=25, seed=4)
rng = np.random.default_rng(4)
people = make_listeners(3, rng, 400)
for t in range(400):
    for p in people:
        f = track_features(rng)
        pred = lrn.predict(p.user_id, f)
        before = lrn.resolved
        lrn.resolve(lrn.record(pred), p.choose(f, t, rng))
        if lrn.resolved % 25 == 0:
            print(json.dumps([lrn.user_weight, lrn.rules()]), flush=True)
            if lrn.resolved == 200:
                sys.stdin.readline()  # wait here to be killed: the parent knows the state
"""


def test_the_learner_state_after_a_sigkill_is_the_last_acknowledged_decision(
    store_path: Path,
) -> None:
    Store.open(store_path, create=True).close()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(store_path)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout is not None
    states: list[Any] = []
    try:
        for line in proc.stdout:
            states.append(json.loads(line))
            if len(states) == 8:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
        err = proc.stderr.read() if proc.stderr else ""
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL, err
    with Store.open(store_path) as store:
        lrn = Learner(store, policy="seed")
        state = [lrn.user_weight, lrn.rules()]
        folded = json.loads(json.dumps(state))
    # killed while waiting after its 8th learning step: exactly the state it printed there
    assert lrn.resolved == 200
    assert folded == states[-1]
    assert states[-1] != states[0]  # the seed rules did change something on the way


# ----------------------------------------------------------------------- the CLI


def test_learn_cli_reports_and_refuses_bad_arguments(tmp_path: Path) -> None:
    runner = CliRunner()
    sim = tmp_path / "sim"
    res = runner.invoke(main, ["learn", "simulate", str(sim), "--listeners", "2",
                               "--interactions", "60", "--policy", "fixed", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["results"][0]["policy"] == "fixed" and 0 <= data["results"][0]["accuracy_all"] <= 1
    res = runner.invoke(main, ["learn", "report", str(sim / "fixed"), "--policy", "fixed",
                               "--by", "user", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["resolved"] == 120 and set(report["by"]["user"]) == {"u00", "u01"}
    again = runner.invoke(main, ["learn", "simulate", str(sim), "--listeners", "2"])
    assert again.exit_code == 2 and "not empty" in again.stderr
    bad = runner.invoke(main, ["learn", "report", str(sim / "fixed"), "--by", "planet"])
    assert bad.exit_code == 2
    missing = runner.invoke(main, ["learn", "reset", str(sim / "fixed"), "--policy", "fixed",
                                   "--user", "nobody"])  # fmt: skip
    assert missing.exit_code == 2 and "nobody" in missing.stderr
    assert DEFAULT_RULES["high_energy"] == "punchy"


def test_learn_report_plot_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    runner = CliRunner()
    assert runner.invoke(main, ["learn", "simulate", str(sim), "--listeners", "2",
                                "--interactions", "150", "--policy", "default"]).exit_code == 0
    png = tmp_path / "learn.png"
    res = runner.invoke(main, ["learn", "report", str(sim / "default"), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1000, 420)
