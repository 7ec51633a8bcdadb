"""Streaming-vs-batch validation: by-name comparison, calibration (monotone in the target
false-accept rate; the prior when too few pairs), durable verdicts queryable with ``where=``,
the automatic check when batch values replace a streaming-only fingerprint, and bad input."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpstore import (
    BatchFingerprint,
    Fingerprint,
    InvalidArgumentError,
    RecordNotFoundError,
    Store,
    StreamingFingerprint,
)
from xpstore.demo.synthetic import make_fingerprint
from xpstore.index import validation as v
from xpstore.index.validation_prior import PRIOR
from xpstore.model.records import BATCH_FIELDS, STREAMING_FIELDS


def _library(n: int, seed: int) -> list[Fingerprint]:
    rng = np.random.default_rng(seed)
    return [make_fingerprint(rng, f"t{i}", with_streaming=True) for i in range(n)]


def _rows(fps: list[Fingerprint]) -> tuple[np.ndarray, np.ndarray]:
    stream = v.rows_of([fp.streaming.values for fp in fps if fp.streaming is not None])
    batch = v.rows_of([fp.batch.as_dict() for fp in fps if fp.batch is not None])
    return stream, batch


# --------------------------------------------------------------------------- by name


def test_streaming_values_are_compared_by_name() -> None:
    """The 13 streaming names are not the first 13 batch names: the row is built by name, and
    a streaming fingerprint equal to its batch values by name is a perfect match."""
    assert list(STREAMING_FIELDS) != list(BATCH_FIELDS[: len(STREAMING_FIELDS)])
    fp = make_fingerprint(np.random.default_rng(3), "x", with_streaming=False)
    assert fp.batch is not None
    batch = fp.batch.as_dict()
    same = {n: batch[n] for n in STREAMING_FIELDS}
    shuffled = dict(reversed(list(same.items())))
    np.testing.assert_array_equal(v.streaming_row(same), v.streaming_row(shuffled))
    model = v.ValidationModel.from_json(PRIOR["model"])
    checks = v.metric_checks(model, shuffled, batch)
    assert set(checks) == set(STREAMING_FIELDS)
    assert all(c.error == 0.0 for c in checks.values())
    assert checks["tempo_bpm"].relative and not checks["harmonic_ratio"].relative
    row = v.streaming_row(same)
    assert v.cosine(model, row, v.streaming_row(batch)) == pytest.approx(1.0)
    by_position = dict(zip(STREAMING_FIELDS, [batch[n] for n in BATCH_FIELDS[:13]], strict=True))
    assert v.cosine(model, v.streaming_row(by_position), v.streaming_row(batch)) < 0.9


def test_ten_value_streaming_skips_the_harmonic_metrics() -> None:
    model = v.ValidationModel.from_json(PRIOR["model"])
    fp = _library(1, 4)[0]
    assert fp.batch is not None
    ten = {n: x for n, x in fp.batch.as_dict().items() if n in STREAMING_FIELDS[:10]}
    row = v.streaming_row(ten)
    assert np.isnan(row[10:]).all()
    raw = model.raw_scores(row[None, :], v.streaming_row(fp.batch.as_dict())[None, :])
    assert np.isfinite(raw).all()
    assert "harmonic_ratio" not in v.metric_checks(model, ten, fp.batch.as_dict())


# --------------------------------------------------------------------------- calibration


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_calibration_threshold_is_monotone_in_the_target_rate(seed: int) -> None:
    fps = _library(60, seed)
    stream, batch = _rows(fps)
    own = np.arange(len(fps), dtype=np.int64)
    fars = (0.01, 0.05, 0.1, 0.3)
    fits = [v.fit_model(stream, batch, batch, batch, own, target_far=f, seed=1) for f in fars]
    thresholds = [f.threshold for f in fits]
    assert thresholds == sorted(thresholds, reverse=True)  # a higher rate, a lower bar
    accepts = [f.accept_rate for f in fits]
    assert accepts == sorted(accepts)
    for far, fit in zip(fars, fits, strict=True):
        assert fit.false_accept_rate <= far + 1e-9 + 1 / fit.false_pairs
        assert fit.true_pairs == len(fps) and fit.false_pairs == len(fps) * (len(fps) - 1)


def test_auc_counts_ties_as_half() -> None:
    assert v.auc(np.array([2.0, 3.0]), np.array([1.0, 0.0])) == 1.0
    assert v.auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert np.isnan(v.auc(np.array([]), np.array([1.0])))


def test_confidence_grades() -> None:
    grade, mean = v.confidence_quality({"a": 0.9, "b": 0.95})
    assert grade == "high" and mean == pytest.approx(0.925)
    assert v.confidence_quality({"a": 0.7})[0] == "medium"
    assert v.confidence_quality({"a": 0.2})[0] == "low"
    assert v.confidence_quality({}) == ("low", 0.0)


def test_store_calibration_prior_then_library(store_path: Path) -> None:
    fps = _library(80, 7)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps[:10])
        cal = store.calibrate_validation()
        assert cal.source == "prior" and cal.version == 1
        assert cal.reason is not None and "10 fingerprints" in cal.reason
        assert cal.true_pairs == PRIOR["true_pairs"]
        store.put_many(fps[10:])
        cal = store.calibrate_validation(target_far=0.1)
        assert cal.source == "library" and cal.version == 2 and cal.reason is None
        assert cal.true_pairs == len(fps) and cal.false_pairs == len(fps) * (len(fps) - 1)
        assert cal.target_far == 0.1 and len(cal.cohort) == 80
        strict = store.calibrate_validation(target_far=0.01)
        assert strict.threshold >= cal.threshold  # monotone through the store too
        with pytest.raises(InvalidArgumentError) as err:
            store.reconfigure(validation_calibration=None)
        assert err.value.field == "validation_calibration"
    with Store.open(store_path) as store:  # durable: logged through the WAL
        kept = store.config.validation.calibration
        assert kept is not None and kept.version == 3 and kept.target_far == 0.01


def test_store_validation_is_recorded_and_queryable(store_path: Path) -> None:
    fps = _library(60, 8)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps)
        store.calibrate_validation()
        good = store.validate_streaming(fps[0].track_id)
        assert good.recorded and good.calibration == 1 and good.source == "library"
        assert good.valid and good.status == "valid" and good.score >= good.threshold
        assert set(good.metrics) == set(fps[0].streaming.values)  # type: ignore[union-attr]
        kept = store.get_fingerprint(fps[0].track_id).record
        assert isinstance(kept, Fingerprint) and kept.validation is not None
        assert kept.validation.status == "valid" and kept.validation.calibration == 1
        assert kept.validation.score == pytest.approx(good.score)
        # another track's batch values: not the same track (not recorded: explicit values)
        other = fps[1].batch
        assert other is not None
        bad = store.validate_streaming(fps[0].track_id, batch=other.as_dict())
        assert not bad.recorded
        counts = store.validate_all_streaming()
        assert counts["skipped"] == 1 and counts["validated"] == len(fps) - 1
        assert counts["valid"] + counts["invalid"] == counts["validated"]
        valid = {e.record.track_id for e in store.scan("fingerprint",  # type: ignore[union-attr]
                                                       where={"validation.status": "valid"})}
        assert fps[0].track_id in valid and len(valid) == counts["valid"] + 1
        again = store.validate_all_streaming()
        assert again["validated"] == 0 and again["skipped"] == len(fps)
    with Store.open(store_path, readonly=True) as ro:
        found = list(ro.scan("fingerprint", where={"validation.status": "valid"}))
        assert len(found) == len(valid)


def test_store_validation_refuses_bad_input_and_changes_nothing(store_path: Path) -> None:
    rng = np.random.default_rng(9)
    batch_only = make_fingerprint(rng, "b", with_streaming=False)
    stream_only = make_fingerprint(rng, "s", with_batch=False, with_streaming=True)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many([batch_only, stream_only])
        wal = store.parts.engine.writable()
        lsn = wal.acked_lsn
        sb = stream_only.streaming
        bb = batch_only.batch
        assert sb is not None and bb is not None
        cases: list[tuple[Callable[[], object], str]] = [
            (lambda: store.validate_streaming("b"), "streaming"),
            (lambda: store.validate_streaming("s"), "batch"),
            (lambda: store.validate_streaming(streaming={"tempo_bpm": 1.0}), "streaming"),
            (lambda: store.validate_streaming(streaming=sb), "batch"),
            (lambda: store.validate_streaming("s", streaming=3), "streaming"),
            (lambda: store.validate_streaming("b", streaming={"nope": 1.0}), "streaming"),
            (lambda: store.validate_streaming("b", record=cast(bool, "yes")), "record"),
            (lambda: store.validate_streaming(streaming=sb, batch=bb.as_dict(), record=True),
             "record"),
            (lambda: store.calibrate_validation(target_far=0.7), "target_far"),
            (lambda: store.calibrate_validation(target_far=True), "target_far"),
            (lambda: store.calibrate_validation(tracks=["zzz"]), "tracks"),
            (lambda: store.calibrate_validation(tracks="b"), "tracks"),
            (lambda: store.calibrate_validation(seed=-1), "seed"),
        ]
        for call, field in cases:
            with pytest.raises(InvalidArgumentError) as err:
                call()
            assert err.value.field == field
        with pytest.raises(RecordNotFoundError):
            store.validate_streaming("missing")
        assert wal.acked_lsn == lsn and store.config.validation.calibration is None
        # explicit values, no track: scored with the prior, nothing written
        res = store.validate_streaming(streaming=sb, batch=bb.as_dict())
        assert res.calibration == 0 and res.source == "prior" and not res.recorded
        assert wal.acked_lsn == lsn


# --------------------------------------------------------------------------- automatic


def test_batch_values_for_a_streaming_only_track_trigger_validation(store_path: Path) -> None:
    fp = _library(1, 10)[0]
    assert fp.streaming is not None and fp.batch is not None
    with Store.open(store_path, create=True, durability="none") as store:
        store.put(Fingerprint(track_id="x", streaming=fp.streaming))
        first = store.get_fingerprint("x").record
        assert isinstance(first, Fingerprint) and first.validation is not None
        assert first.validation.status == "pending"  # streaming values, nothing to check yet
        pending = list(store.scan("fingerprint", where={"validation.status": "pending"}))
        assert [e.id for e in pending] == [store.get_fingerprint("x").id]
        store.put(Fingerprint(track_id="x", batch=BatchFingerprint(**fp.batch.as_dict())))
        task = store.parts.tasks["validation"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the applier's thread runs it; or run it here
            if not task.due():
                rec = store.get_fingerprint("x").record
                assert isinstance(rec, Fingerprint)
                if rec.validation is not None:
                    break
            else:
                task.run()
            time.sleep(0.05)
        rec = store.get_fingerprint("x").record
        assert isinstance(rec, Fingerprint) and rec.validation is not None
        assert rec.validation.status in ("valid", "invalid") and rec.validation.calibration == 0
        assert rec.validation.status == "valid"  # the streaming values came from this batch


def test_streaming_fingerprint_given_directly() -> None:
    sf = StreamingFingerprint(
        values=dict.fromkeys(STREAMING_FIELDS, 0.5), confidence=dict.fromkeys(STREAMING_FIELDS, 1.0)
    )
    fp = Fingerprint(track_id="p", streaming=sf)
    assert fp.validation is not None and fp.validation.status == "pending"
    both = Fingerprint(track_id="q", streaming=sf, batch=_library(1, 1)[0].batch)
    assert both.validation is None


def test_cli_validate(store_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from xpstore.cli import main

    fps = _library(40, 12)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps)
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(store_path), "--calibrate", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["calibration"]["source"] == "library" and out["calibration"]["true_pairs"] == 40
    assert out["counts"]["validated"] == 40
    result = runner.invoke(main, ["validate", str(store_path), fps[0].track_id])
    assert result.exit_code == 0, result.output
    assert fps[0].track_id in result.output and "tempo_bpm" in result.output
    result = runner.invoke(main, ["validate", str(store_path), "--all"])
    assert result.exit_code == 0 and "validated" in result.output
    result = runner.invoke(main, ["validate", str(store_path), "nope"])
    assert result.exit_code == 1
