"""Learned similarity (``Store.fit_similarity``, ``index.similarity_fit``) and library statistics
in force from the first answer (``IndexManager.ensure_library_stats``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.index_support import index_server, library
from xpstore import InvalidArgumentError, ReadOnlyStoreError, Store
from xpstore.demo.synthetic import STYLES, make_fingerprint
from xpstore.index import default_stats
from xpstore.index.similarity_fit import (
    assign_folds,
    cross_validate,
    fit_weights,
    scorable,
    top1_hits,
)
from xpstore.model.records import BATCH_FIELDS, Fingerprint

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
IntArray = np.ndarray[Any, np.dtype[np.int64]]


# --------------------------------------------------------------------------- cross-validation


@st.composite
def grouped_library(draw: st.DrawFn) -> tuple[FloatArray, IntArray, int]:
    """A random library: group sizes 1-6, some tracks in no group, and a valid fold count."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=14))
    loose = draw(st.integers(0, 8))
    codes = np.array([g for g, n in enumerate(sizes) for _ in range(n)] + [-1] * loose)
    perm = draw(st.permutations(list(range(codes.shape[0]))))
    codes = codes[np.array(perm)]
    multi = sum(1 for n in sizes if n >= 2)
    if multi < 2:
        codes = np.concatenate([codes, [100, 100, 101, 101]])
        multi += 2
    folds = draw(st.integers(2, min(5, multi)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.normal(size=(codes.shape[0], 25)), codes.astype(np.int64), folds


@settings(max_examples=60, deadline=None)
@given(lib=grouped_library(), seed=st.integers(0, 1000))
def test_cross_validation_never_leaks_a_group(
    lib: tuple[FloatArray, IntArray, int], seed: int
) -> None:
    """No group is both trained on and scored in one fold; every member of a group with two or
    more tracks is scored exactly once; the fit sees nothing but training rows."""
    x, codes, folds = lib
    seen: list[set[int]] = []

    def recording_fit(rows: FloatArray, groups: IntArray, init: FloatArray) -> FloatArray:
        # the rows the fit gets are exactly the library rows of the groups it is told about
        for row, code in zip(rows, groups.tolist(), strict=True):
            matches = np.flatnonzero((x == row).all(axis=1))
            assert any(codes[m] == code for m in matches)
        seen.append(set(groups.tolist()))
        return init

    baseline = np.full(25, 1 / 25)
    cv = cross_validate(x, codes, baseline, folds=folds, seed=seed, fit=recording_fit)
    assert len(seen) == folds == len(cv.tested)
    for trained, tested in zip(seen, cv.tested, strict=True):
        assert not trained & tested
        assert -1 not in trained
    scored = scorable(codes)
    assert cv.scored == scored.shape[0]
    tested_all = [g for t in cv.tested for g in t]
    assert sorted(tested_all) == sorted(set(codes[scored].tolist()))  # each group once
    assert cv.baseline_hits == cv.cv_hits  # the recording fit returns the baseline weights


def test_folds_hold_whole_groups_and_are_balanced() -> None:
    codes = np.repeat(np.arange(20), np.arange(20) % 5 + 1).astype(np.int64)
    fold_of = assign_folds(codes, 4, seed=3)
    assert set(fold_of) == set(range(20))
    load = np.bincount([fold_of[int(c)] for c in codes], minlength=4)
    assert load.max() - load.min() <= 5  # the largest group's size at most
    assert assign_folds(codes, 4, seed=3) == fold_of  # seeded


def test_cross_validation_refuses_impossible_folds() -> None:
    x = np.zeros((6, 25))
    codes = np.array([0, 0, 1, 1, 2, -1], dtype=np.int64)
    for folds in (1, 3):  # 2 groups have two tracks
        with pytest.raises(InvalidArgumentError) as err:
            cross_validate(x, codes, np.full(25, 1 / 25), folds=folds)
        assert err.value.field == "folds"


# --------------------------------------------------------------------------- the fit


def _signal_library(seed: int, groups: int = 30, per: int = 4) -> tuple[FloatArray, IntArray]:
    """Groups separated in 6 dimensions; the other 19 are louder noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, 6))
    rows = []
    codes = []
    for g in range(groups):
        for _ in range(per):
            signal = centres[g] + 0.15 * rng.normal(size=6)
            rows.append(np.concatenate([signal, 1.5 * rng.normal(size=19)]))
            codes.append(g)
    x = np.array(rows)
    return (x - x.mean(axis=0)) / x.std(axis=0), np.array(codes, dtype=np.int64)


def test_fit_weights_finds_the_informative_dimensions() -> None:
    x, codes = _signal_library(0)
    uniform = np.full(25, 1 / 25)
    w = fit_weights(x, codes, uniform)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    assert w[:6].sum() > 0.6  # 6 of 25 dimensions carry the groups
    everyone = scorable(codes)
    assert top1_hits(x, codes, everyone, w).mean() > top1_hits(x, codes, everyone, uniform).mean()
    cv = cross_validate(x, codes, uniform, folds=3)
    assert cv.cv_hit_rate > cv.baseline_hit_rate  # and it carries over to unseen groups
    assert np.array_equal(fit_weights(x, codes, uniform), w)  # deterministic


# --------------------------------------------------------------------------- the store


def _styled(n_per_style: int = 10, seed: int = 5) -> tuple[list[Fingerprint], dict[str, str]]:
    rng = np.random.default_rng(seed)
    fps: list[Fingerprint] = []
    groups: dict[str, str] = {}
    for style in sorted(STYLES):
        for i in range(n_per_style):
            fp = make_fingerprint(rng, f"{style}-{i}", style, with_streaming=False)
            fps.append(fp)
            groups[fp.track_id] = style
    return fps, groups


def test_fit_similarity_reports_logs_and_changes_nothing_else(store_path: Path) -> None:
    fps, groups = _styled()
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps)
        store.rebuild_index(wait=True)
        before = store.track_vector(fps[0].track_id)
        report = store.fit_similarity(groups, folds=3)
        assert report.version == 1 and not report.used
        assert set(report.weights) == set(BATCH_FIELDS)
        assert sum(report.weights.values()) == pytest.approx(1.0)
        assert report.groups == len(STYLES) and report.tracks == report.scored == len(fps)
        assert report.gain == pytest.approx(report.cv_hit_rate - report.baseline_hit_rate)
        assert report.cv_hits == round(report.cv_hit_rate * report.scored)
        learned = store.config.index.learned
        assert learned is not None and learned.version == 1 and learned.mode == "logratio"
        assert learned.weights == report.weights and learned.cv_hit_rate == report.cv_hit_rate
        assert store.config.index.dim_weights is None  # nothing changes unless asked
        store.rebuild_index(wait=True)
        assert store.index_status()["dim_weights"] == "default"
        np.testing.assert_array_equal(store.track_vector(fps[0].track_id), before)
    with Store.open(store_path) as store:  # durable through the WAL
        learned = store.config.index.learned
        assert learned is not None and learned.weights == report.weights
        store.reconfigure(index_dim_weights="learned")
        store.rebuild_index(wait=True)
        status = store.index_status()
        assert status["dim_weights"] == "learned v1"
        server = index_server(store)
        got = server.embedder.dim_weights
        assert got == pytest.approx(report.weights)
        again = store.fit_similarity(groups, folds=3, use=True)
        assert again.version == 2 and again.used
        assert store.config.index.dim_weights == "learned"


def test_fit_similarity_refuses_bad_input_and_changes_nothing(store_path: Path) -> None:
    fps, groups = _styled(4)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps)
        wal = store.parts.engine.writable()
        lsn = wal.acked_lsn
        bad: list[tuple[dict[str, Any], str]] = [
            ({"groups": {**groups, "nope": "x"}}, "groups['nope']"),
            ({"groups": {fps[0].track_id: None}}, f"groups[{fps[0].track_id!r}]"),
            ({"groups": {fps[0].track_id: ["unhashable"]}}, f"groups[{fps[0].track_id!r}]"),
            ({"groups": [("a", 1)]}, "groups"),
            ({"groups": groups, "folds": 1}, "folds"),
            ({"groups": groups, "folds": True}, "folds"),
            ({"groups": groups, "folds": 99}, "folds"),
            ({"groups": groups, "seed": -1}, "seed"),
            ({"groups": groups, "use": "yes"}, "use"),
        ]
        for kwargs, field in bad:
            with pytest.raises(InvalidArgumentError) as err:
                store.fit_similarity(**kwargs)
            assert err.value.field == field, kwargs
        assert wal.acked_lsn == lsn and store.config.index.learned is None
        with pytest.raises(InvalidArgumentError) as err:
            store.reconfigure(index_learned=None)
        assert err.value.field == "index_learned"
        with pytest.raises(InvalidArgumentError) as err:
            store.reconfigure(index_dim_weights="learned")  # nothing learned yet
        assert err.value.field == "index.dim_weights"
        store.fit_similarity(groups, folds=2, use=True)
        with pytest.raises(InvalidArgumentError) as err:
            store.reconfigure(index_mode="zscore")  # learned for logratio
        assert err.value.field == "index.dim_weights"
        store.reconfigure(index_mode="zscore", index_dim_weights=None)  # both at once: fine
    with Store.open(store_path, readonly=True) as ro, pytest.raises(ReadOnlyStoreError):
        ro.fit_similarity(groups)


def test_reopen_embeds_the_delta_as_the_file_was_built(store_path: Path) -> None:
    """Settings changed after a build (here the weights) reach the next build, not the delta
    of a reopened store: new puts are embedded like the vectors of the file they meet."""
    rng = np.random.default_rng(11)
    fps = library(rng, 60, with_streaming=False)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps)
        store.rebuild_index(wait=True)
        built = dict(index_server(store).embedder.dim_weights)
        uniform = dict.fromkeys(BATCH_FIELDS, 1.0)
        store.reconfigure(index_dim_weights=uniform, index_auto_rebuild=False)
    with Store.open(store_path, durability="none") as store:
        twin = fps[7].model_copy(update={"track_id": "twin"})
        store.put(twin)
        hits = store.similar("twin", k=1)
        assert hits[0].track_id == fps[7].track_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert index_server(store).embedder.dim_weights == pytest.approx(built)


# --------------------------------------------------------------------------- library statistics


def _answers(store: Store, tracks: list[str]) -> dict[str, list[str]]:
    return {t: [h.track_id for h in store.similar(t, k=5)] for t in tracks}


def test_answers_before_and_after_the_first_build_agree(store_path: Path) -> None:
    rng = np.random.default_rng(21)
    fps = library(rng, 150)
    probe = [fp.track_id for fp in fps[:50]]
    with Store.open(store_path, create=True, durability="none", index_auto_rebuild=False) as s:
        s.put_many(fps)
        before = _answers(s, probe)
        status = s.index_status()
        assert status["kind"] is None and status["stats_count"] == len(fps)  # no build yet
        s.rebuild_index(wait=True)
        assert s.index_status()["stats_count"] == len(fps)
        assert _answers(s, probe) == before
        vec = s.track_vector(probe[0])
        s.put(fps[0].model_copy(update={"track_id": "late"}))  # after the build: the delta
        assert s.similar(vector=vec, k=2)[0].score == pytest.approx(1.0, abs=1e-5)


def test_a_build_on_the_prior_is_folded_into_library_statistics(store_path: Path) -> None:
    rng = np.random.default_rng(22)
    fps = library(rng, 120)
    with Store.open(store_path, create=True, durability="none", index_auto_rebuild=False) as s:
        s.put_many(fps[:10])
        s.rebuild_index(wait=True)  # 10 tracks: too few to fit, the prior stays
        assert s.index_status()["stats_count"] == default_stats.COUNT
        assert s.similar(fps[0].track_id, k=3)  # small libraries answer on the prior
        s.put_many(fps[10:])
        s.delete_track(fps[5].track_id)
        probe = [fp.track_id for fp in fps[:40] if fp.track_id != fps[5].track_id]
        before = _answers(s, probe)
        status = s.index_status()
        assert status["stats_count"] == len(fps) - 1 and status["size"] == 0  # folded
        assert status["delta"] == len(fps) - 1
        assert fps[5].track_id not in {h.track_id for h in s.similar(fps[6].track_id, k=200)}
        s.rebuild_index(wait=True)
        assert s.index_status()["size"] == len(fps) - 1
        assert _answers(s, probe) == before
