"""Store.batches (issue 16, part 3): training batches as arrays, checked against get()."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import record_as
from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint, make_prediction, make_query_metric
from xpstore.errors import ExtraMissingError, InvalidArgumentError
from xpstore.model.records import BATCH_FIELDS, Fingerprint, PredictionOutcome, QueryMetric
from xpstore.store.batches import FEATURES

LABELS = ("adaptive", "gentle", "warm", "bright", "punchy", "live")


def _filled(path: Path, n: int = 300) -> Store:
    rng = np.random.default_rng(7)
    store = Store.open(path, create=True, durability="none")
    store.put_many([make_prediction(rng, f"t{i}", ts=1000.0 + i) for i in range(n)])
    store.put_many([make_fingerprint(rng, f"t{i}", with_streaming=i % 3 == 0, with_batch=i % 5 != 0)
                    for i in range(60)])  # fmt: skip
    store.put_many([make_query_metric(rng, ts=2000.0 + i) for i in range(50)])
    return store


def _check_prediction_rows(store: Store, batch: dict[str, np.ndarray]) -> None:
    for i, rid in enumerate(batch["ids"].tolist()):
        rec = record_as(store.get(rid), PredictionOutcome)
        feats = rec.audio_features or {}
        for j, name in enumerate(FEATURES["prediction"]):
            want = feats.get(name, math.nan)
            got = float(batch["features"][i, j])
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, rel=1e-6)
        assert batch["labels"][i] == (rec.actual or "")
        want_id = LABELS.index(rec.actual) if rec.actual in LABELS else -1
        assert batch["label_ids"][i] == want_id
        reward = batch["rewards"][i]
        assert math.isnan(reward) if rec.reward is None else reward == pytest.approx(rec.reward)


def test_prioritized_prediction_batches_match_the_records(tmp_path: Path) -> None:
    with _filled(tmp_path / "s") as store:
        got = list(store.batches(64, kind="prediction", label_names=LABELS, max_batches=5, seed=3))
        assert len(got) == 5
        for batch in got:
            assert batch["ids"].dtype == np.int64 and batch["ids"].shape == (64,)
            assert batch["features"].dtype == np.float32
            assert batch["features"].shape == (64, len(FEATURES["prediction"]))
            assert batch["weights"].dtype == np.float32
            assert 0 < float(batch["weights"].max()) <= 1.0
            assert np.all(batch["probabilities"] > 0)
            _check_prediction_rows(store, batch)
        # every draw was counted as a retrieval, as sample() counts them
        drawn = np.concatenate([b["ids"] for b in got])
        assert store.parts.sampling.attached().draws >= len(drawn)


def test_in_order_batches_are_one_pass_over_the_kind(tmp_path: Path) -> None:
    with _filled(tmp_path / "s") as store:
        batches = list(store.batches(70, kind="prediction", prioritized=False,
                                     label_names=LABELS))  # fmt: skip
        assert [len(b["ids"]) for b in batches] == [70, 70, 70, 70, 20]
        ids = np.concatenate([b["ids"] for b in batches]).tolist()
        assert ids == [e.id for e in store.scan("prediction")]
        for b in batches:
            assert np.all(b["weights"] == 1.0) and np.all(np.isnan(b["probabilities"]))
            _check_prediction_rows(store, b)
        where = {"context": "warm_start"}
        filtered = np.concatenate(
            [b["ids"] for b in store.batches(16, kind="prediction", where=where, prioritized=False)]
        ).tolist()
        assert filtered == [e.id for e in store.scan("prediction", where=where)]
        assert filtered


def test_where_restricts_prioritized_draws(tmp_path: Path) -> None:
    with _filled(tmp_path / "s") as store:
        where = {"context": "cold_start"}
        allowed = {e.id for e in store.scan("prediction", where=where)}
        for batch in store.batches(32, kind="prediction", where=where, max_batches=4, seed=1):
            assert set(batch["ids"].tolist()) <= allowed


def test_fingerprint_and_query_metric_columns(tmp_path: Path) -> None:
    with _filled(tmp_path / "s") as store:
        fp = next(store.batches(40, kind="fingerprint", seed=0))
        for i, rid in enumerate(fp["ids"].tolist()):
            rec = record_as(store.get(rid), Fingerprint)
            assert fp["labels"][i] == rec.track_id
            if rec.batch is None:
                assert np.all(np.isnan(fp["features"][i]))
            else:
                want = [getattr(rec.batch, n) for n in BATCH_FIELDS]
                np.testing.assert_allclose(fp["features"][i], want, rtol=1e-6)
            assert math.isnan(fp["rewards"][i])
        picked = next(store.batches(8, kind="fingerprint", features=["lufs", "tempo_bpm"],
                                    prioritized=False))  # fmt: skip
        assert picked["features"].shape == (8, 2)
        qm = next(store.batches(16, kind="query_metric", prioritized=False))
        for i, rid in enumerate(qm["ids"].tolist()):
            q = record_as(store.get(rid), QueryMetric)
            want = [q.latency_ms, q.memory_mb, q.result_count, q.concurrency, q.accuracy]
            np.testing.assert_allclose(qm["features"][i], want, rtol=1e-6)
            assert bool(qm["labels"][i]) == q.success
            sat = q.user_satisfaction
            assert math.isnan(qm["rewards"][i]) if sat is None else qm["rewards"][i] == sat


def test_feedback_goes_back_by_id(tmp_path: Path) -> None:
    with _filled(tmp_path / "s") as store:
        batch = next(store.batches(16, kind="prediction", seed=5))
        ids = sorted(set(batch["ids"].tolist()))
        store.update_priorities(ids, [5.0] * len(ids))
        store.record_feedback(ids, True)
        for rid in ids:
            assert store.get(rid).success_count >= 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 8, "kind": "decision"}, "kind"),
        ({"batch_size": 8, "as_": "jax"}, "as_"),
        ({"batch_size": 8, "max_batches": -1}, "max_batches"),
        ({"batch_size": 8, "features": []}, "features"),
        ({"batch_size": 8, "kind": "fingerprint", "features": ["energy"]}, "features"),
    ],
)
def test_bad_arguments_name_the_field(
    tmp_path: Path, kwargs: dict[str, object], field: str
) -> None:
    with _filled(tmp_path / "s", n=10) as store, pytest.raises(InvalidArgumentError) as info:
        store.batches(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is installed")
def test_torch_without_torch_names_the_extra(tmp_path: Path) -> None:
    with (
        _filled(tmp_path / "s", n=10) as store,
        pytest.raises(ExtraMissingError, match=r"xpstore\[torch\]") as info,
    ):
        store.batches(8, as_="torch")
    assert info.value.extra == "torch"


NO_TORCH = "PyTorch is not installed (optional extra 'torch', not in CI)"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason=NO_TORCH)
def test_torch_batches_are_tensors(tmp_path: Path) -> None:
    import torch

    with _filled(tmp_path / "s", n=50) as store:
        batch = next(store.batches(8, as_="torch", seed=0))
        assert isinstance(batch["features"], torch.Tensor)
        assert batch["features"].shape == (8, len(FEATURES["prediction"]))
        assert isinstance(batch["ids"], torch.Tensor)


def test_retrieval_counting_can_be_left_to_feedback(tmp_path: Path) -> None:
    with _filled(tmp_path / "s") as store:
        sampler = store.parts.sampling.attached()
        before = sampler.pending_count()
        batch = next(store.batches(32, kind="prediction", count_retrievals=False, seed=2))
        assert sampler.pending_count() == before
        next(store.batches(32, kind="prediction", seed=2))
        assert sampler.pending_count() > before
        ids = sorted(set(batch["ids"].tolist()))
        store.record_feedback(ids, True, count_retrieval=True)
        assert all(store.get(rid).retrieval_count >= 1 for rid in ids)
