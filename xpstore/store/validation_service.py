"""Streaming-vs-batch validation for a Store (issue 11): ``calibrate_validation``,
``validate_streaming`` and the automatic check when batch values arrive for a streaming-only
track. The math is ``index.validation``; docs/validation.md is the user's account.

* **Calibration** reads every current fingerprint that has both streaming and batch values (a
  true pair each; the streaming values of one against the batch values of another are the
  different-track pairs), fits the per-metric model and the threshold at
  ``validation.target_far``, draws the cohort from the library's batch fingerprints, and logs the
  result through the WAL as the ``validation.calibration`` setting, with its sample sizes. With
  fewer than ``validation.min_pairs`` such fingerprints it says so and logs the documented prior
  (``index.validation_prior``) instead (``source="prior"``, ``reason``).
* **Validation** compares one fingerprint's streaming values with batch values by name and, when
  asked to record, writes the verdict into the fingerprint's ``validation`` field (an update
  through the WAL), where ``where={"validation.status": "valid"}`` finds it.
* **Automatically** (``validation.auto``): the component listens to acknowledged track changes;
  a new current fingerprint with batch values replacing one that had only streaming values is
  queued, and the applier's maintenance thread validates it against those streaming values.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xpstore.config import ValidationCalibration
from xpstore.errors import InvalidArgumentError, RecordNotFoundError
from xpstore.index import validation as v
from xpstore.index.validation_prior import PRIOR
from xpstore.model.codec import decode_envelope, envelope_counters
from xpstore.model.events import Acknowledged
from xpstore.model.records import Experience, Fingerprint, StreamingFingerprint
from xpstore.persistence.lmdb_tables import from_u64
from xpstore.store.engine import Engine
from xpstore.store.reader import Reader
from xpstore.store.writer import Writer

__all__ = ["StreamingValidator", "ValidationResult", "ValidationTask"]

log = logging.getLogger(__name__)

MAX_CALIBRATION = 5000
"""At most this many fingerprints with both parts enter a calibration (drawn with the seed)."""


@dataclass(frozen=True)
class ValidationResult:
    """One streaming-vs-batch comparison (docs/validation.md)."""

    track_id: str | None
    valid: bool
    score: float
    """Cohort-normalized log-likelihood ratio (raw when there is no cohort); higher is better."""
    threshold: float
    cosine: float
    """Cosine of the standardized values over the shared names (the published 0.95 measure)."""
    quality: str
    """``high`` / ``medium`` / ``low`` from the streaming confidences."""
    mean_confidence: float
    metrics: dict[str, v.MetricCheck]
    calibration: int
    """The calibration version (0: the documented prior)."""
    source: str
    record_id: int | None = None
    recorded: bool = False

    @property
    def status(self) -> str:
        return "valid" if self.valid else "invalid"

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "metrics"}
        out["status"] = self.status
        out["metrics"] = {name: m.to_json() for name, m in self.metrics.items()}
        return out


@dataclass
class _Active:
    """The calibration in force, ready to score with."""

    version: int
    source: str
    model: v.ValidationModel
    threshold: float
    raw_threshold: float
    cohort_ids: tuple[int, ...]
    cohort: np.ndarray[Any, np.dtype[np.float64]] = field(
        default_factory=lambda: np.zeros((0, len(v.NAMES)))
    )


class StreamingValidator:
    """Calibrates and runs streaming-vs-batch validation for one store."""

    def __init__(self, engine: Engine, reader: Reader, writer: Writer) -> None:
        self._engine = engine
        self._reader = reader
        self._writer = writer
        self._lock = threading.Lock()
        self._active: _Active | None = None
        self._queue: list[tuple[int, int]] = []  # (new current id, retired streaming-only id)
        self._queue_lock = threading.Lock()
        self._sub = None
        overlay = engine.overlay if not engine.readonly else None
        if overlay is not None:
            sub, _unapplied = overlay.subscribe(self._on_durable)
            sub.start()
            self._sub = sub

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self, target_far: float | None, tracks: Sequence[str] | None, seed: int
    ) -> ValidationCalibration:
        """See :meth:`xpstore.Store.calibrate_validation`."""
        engine = self._engine
        engine.writable()
        cfg = engine.config.validation
        far = cfg.target_far if target_far is None else _check_far(target_far)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidArgumentError(f"seed must be an int >= 0, got {seed!r}", field="seed")
        wanted = _check_tracks(tracks)
        current = self._current()
        if wanted is not None:
            missing = sorted(wanted - {fp.track_id for _rid, fp in current})
            if missing:
                raise InvalidArgumentError(
                    f"tracks names {missing[0]!r}, which has no current fingerprint",
                    field="tracks",
                )
        with_batch = [(rid, fp) for rid, fp in current if fp.batch is not None]
        pairs = [
            (rid, fp) for rid, fp in with_batch
            if fp.streaming is not None and (wanted is None or fp.track_id in wanted)
        ]  # fmt: skip
        rng = np.random.default_rng(seed)
        if len(pairs) > MAX_CALIBRATION:
            keep = np.sort(rng.choice(len(pairs), size=MAX_CALIBRATION, replace=False))
            pairs = [pairs[i] for i in keep.tolist()]
        cohort_n = min(cfg.cohort_size, len(with_batch))
        cohort_pick = np.sort(rng.choice(len(with_batch), size=cohort_n, replace=False))
        cohort = [with_batch[i] for i in cohort_pick.tolist()]
        cohort_ids = [rid for rid, _fp in cohort]
        previous = cfg.calibration.version if cfg.calibration is not None else 0
        now = time.time()
        if len(pairs) < cfg.min_pairs:
            reason = (
                f"{len(pairs)} fingerprints with both streaming and batch values, fewer than "
                f"validation.min_pairs ({cfg.min_pairs}): the documented prior applies"
            )
            log.warning("calibrate_validation: %s", reason)
            cal = ValidationCalibration(
                version=previous + 1, source="prior", reason=reason, target_far=far,
                model=dict(PRIOR["model"]), threshold=_prior_threshold("thresholds", far),
                raw_threshold=_prior_threshold("raw_thresholds", far), cohort=cohort_ids,
                true_pairs=int(PRIOR["true_pairs"]), false_pairs=int(PRIOR["false_pairs"]),
                auc=float(PRIOR["auc"]), accept_rate=None, false_accept_rate=None,
                calibrated_at=now,
            )  # fmt: skip
        else:
            stream = v.rows_of([_streaming(fp).values for _rid, fp in pairs])
            batch = v.rows_of([_batch(fp) for _rid, fp in pairs])
            library = v.rows_of([_batch(fp) for _rid, fp in with_batch])
            index_of = {rid: k for k, rid in enumerate(cohort_ids)}
            own = np.array([index_of.get(rid, -1) for rid, _fp in pairs], dtype=np.int64)
            cohort_rows = v.rows_of([_batch(fp) for _rid, fp in cohort])
            fit = v.fit_model(stream, batch, library, cohort_rows, own, target_far=far, seed=seed)
            cal = ValidationCalibration(
                version=previous + 1, source="library", target_far=far,
                model=fit.model.to_json(), threshold=fit.threshold,
                raw_threshold=fit.raw_threshold, cohort=cohort_ids, true_pairs=fit.true_pairs,
                false_pairs=fit.false_pairs, auc=fit.auc, accept_rate=fit.accept_rate,
                false_accept_rate=fit.false_accept_rate, calibrated_at=now,
            )  # fmt: skip
        self._writer.log_settings({"validation.calibration": cal.model_dump()})
        with self._lock:
            self._active = None
        log.info("validation calibration v%d (%s): %d true pairs, threshold %.3f at FAR %.3f",
                 cal.version, cal.source, cal.true_pairs, cal.threshold, far)  # fmt: skip
        return cal

    # ------------------------------------------------------------------ validation
    def validate(
        self,
        track_id: str | None,
        streaming: StreamingFingerprint | Mapping[str, Any] | None,
        batch: Mapping[str, float] | None,
        record: bool | None,
    ) -> ValidationResult:
        """See :meth:`xpstore.Store.validate_streaming`."""
        self._engine.check_open()
        if record is None:
            record = track_id is not None and streaming is None and batch is None
        if not isinstance(record, bool):
            raise InvalidArgumentError(f"record must be True or False, got {record!r}",
                                       field="record")  # fmt: skip
        rid: int | None = None
        fp: Fingerprint | None = None
        if track_id is not None:
            rid = self._reader.read_track(str(track_id))
            if rid is None:
                raise RecordNotFoundError(f"no track {track_id!r}")
            rec = self._reader.get(rid).record
            assert isinstance(rec, Fingerprint)
            fp = rec
        stream = _as_streaming(streaming) if streaming is not None else None
        if stream is None and fp is not None:
            stream = fp.streaming
        values = dict(batch) if batch is not None else None
        if values is None and fp is not None and fp.batch is not None:
            values = _batch(fp)
        if stream is None:
            raise InvalidArgumentError(
                "no streaming values to validate (the track has none; pass streaming=)",
                field="streaming",
            )
        if values is None:
            raise InvalidArgumentError(
                "no batch values to validate against (the track has none; pass batch=)",
                field="batch",
            )
        result = self._score(str(track_id) if track_id is not None else None, stream, values,
                             rid)  # fmt: skip
        if record:
            if rid is None:
                raise InvalidArgumentError("record=True needs a track_id", field="record")
            self._record(rid, result, stream)
            result = ValidationResult(**{**result.__dict__, "recorded": True})
        return result

    def validate_all(self, only_unvalidated: bool) -> dict[str, int]:
        """Validate (and record) every current fingerprint with both parts; with
        ``only_unvalidated`` the ones without a verdict under the calibration in force."""
        self._engine.writable()
        active = self._ensure_active()
        counts = {"validated": 0, "valid": 0, "invalid": 0, "skipped": 0}
        for rid, fp in self._current():
            if fp.batch is None or fp.streaming is None:
                continue
            known = fp.validation
            if (only_unvalidated and known is not None and known.status != "pending"
                    and known.calibration == active.version):  # fmt: skip
                counts["skipped"] += 1
                continue
            result = self._score(fp.track_id, fp.streaming, _batch(fp), rid)
            self._record(rid, result, fp.streaming)
            counts["validated"] += 1
            counts[result.status] += 1
        return counts

    def _score(
        self, track_id: str | None, stream: StreamingFingerprint, batch: Mapping[str, float],
        rid: int | None,
    ) -> ValidationResult:  # fmt: skip
        active = self._ensure_active()
        model = active.model
        s = v.streaming_row(stream.values)[None, :]
        b = v.streaming_row(batch)[None, :]
        raw = model.raw_scores(s, b)
        if active.cohort.shape[0] >= v.MIN_COHORT:
            exclude = None
            if rid is not None and rid in active.cohort_ids:
                exclude = np.array([active.cohort_ids.index(rid)], dtype=np.int64)
            mean, spread = model.cohort_stats(s, active.cohort, exclude)
            score, threshold = float(((raw - mean) / spread)[0]), active.threshold
        else:
            score, threshold = float(raw[0]), active.raw_threshold
        quality, mean_conf = v.confidence_quality(stream.confidence)
        return ValidationResult(
            track_id=track_id, valid=score >= threshold, score=score, threshold=threshold,
            cosine=v.cosine(model, s[0], b[0]), quality=quality, mean_confidence=mean_conf,
            metrics=v.metric_checks(model, stream.values, batch), calibration=active.version,
            source=active.source, record_id=rid,
        )  # fmt: skip

    def _record(self, rid: int, result: ValidationResult, stream: StreamingFingerprint) -> None:
        del stream
        self._writer.update(rid, {"validation": {
            "status": result.status, "score": result.score, "threshold": result.threshold,
            "calibration": result.calibration, "quality": result.quality,
            "validated_at": time.time(),
        }})  # fmt: skip

    def _ensure_active(self) -> _Active:
        cal = self._engine.config.validation.calibration
        with self._lock:
            active = self._active
            version = cal.version if cal is not None else 0
            if active is not None and active.version == version:
                return active
            if cal is None:
                far = self._engine.config.validation.target_far
                active = _Active(0, "prior", v.ValidationModel.from_json(PRIOR["model"]),
                                 _prior_threshold("thresholds", far),
                                 _prior_threshold("raw_thresholds", far), ())  # fmt: skip
            else:
                active = _Active(cal.version, cal.source, v.ValidationModel.from_json(cal.model),
                                 cal.threshold, cal.raw_threshold, tuple(cal.cohort))  # fmt: skip
                active.cohort = self._cohort_rows(active.cohort_ids)
            self._active = active
            return active

    def _cohort_rows(self, ids: tuple[int, ...]) -> np.ndarray[Any, np.dtype[np.float64]]:
        rows = []
        for rid in ids:
            exp = self._reader.read_get(rid)  # values never change; a deleted one is skipped
            if exp is not None and isinstance(exp.record, Fingerprint) and exp.record.batch:
                rows.append(_batch(exp.record))
        return v.rows_of(rows)

    def _current(self) -> list[tuple[int, Fingerprint]]:
        """Every track's current fingerprint (LMDB after the applier caught up)."""
        engine = self._engine
        if not engine.readonly:
            engine.apply_through_acked()
        tables = engine.tables
        with tables.reading() as txn:
            ids = [from_u64(value) for _key, value in tables.iter_tracks(txn)]
        out: list[tuple[int, Fingerprint]] = []
        for rid in ids:
            exp = self._reader.read_get(rid)
            if exp is not None and isinstance(exp.record, Fingerprint):
                out.append((rid, exp.record))
        return out

    # ------------------------------------------------------------------ automatic
    def _on_durable(self, batch: Acknowledged) -> None:
        """Overlay subscriber (WAL leader): queue track changes that may need a validation."""
        events = [  # what track_events() yields with a current and a retired id
            (eff.track_to, eff.track_from) for eff in batch.effects
            if eff.track_to is not None and eff.track_from is not None
            and eff.track_from != eff.track_to
        ]  # fmt: skip
        if events:
            with self._queue_lock:
                self._queue.extend(events)

    def pending_checks(self) -> int:
        with self._queue_lock:
            return len(self._queue)

    def run_queued(self) -> int:
        """Validate queued tracks: a new current fingerprint with batch values replacing a
        streaming-only one is checked against those streaming values. Returns how many."""
        with self._queue_lock:
            queued, self._queue = self._queue, []
        done = 0
        # the retired fingerprints first, encoded, in one read: most track changes replace one
        # with batch values, which its record map shows without building the record's models
        retired_raw = self._reader.envelopes(sorted({r for _c, r in queued})) if queued else {}
        for current, retired in queued:
            raw = retired_raw.get(retired)
            if raw is None:
                continue  # deleted meanwhile
            m = envelope_counters(raw)[6]
            if m.get("batch") is not None or m.get("streaming") is None:
                continue
            ofp = decode_envelope(retired, raw).record
            assert isinstance(ofp, Fingerprint) and ofp.streaming is not None
            new = self._reader.read_get(current)
            if new is None or self._reader.read_track(_track(new)) != current:
                continue  # superseded or deleted meanwhile
            nfp = new.record
            assert isinstance(nfp, Fingerprint)
            if nfp.batch is None:
                continue
            if nfp.validation is not None and nfp.validation.status != "pending":
                continue
            stream = nfp.streaming or ofp.streaming
            result = self._score(nfp.track_id, stream, _batch(nfp), current)
            self._record(current, result, stream)
            done += 1
        if done:
            log.info("validated %d fingerprints whose batch values arrived", done)
        return done

    def close(self) -> None:
        if self._sub is not None:
            self._sub.cancel()
            self._sub = None


class ValidationTask:
    """The automatic validation (a :class:`~xpstore.persistence.applier.MaintenanceTask`): due
    when ``validation.auto`` is on and track changes are queued."""

    name = "validation"

    def __init__(self, engine: Engine, validator: StreamingValidator) -> None:
        self._engine = engine
        self._validator = validator

    def due(self) -> bool:
        engine = self._engine
        if engine.readonly or engine.closed or not engine.config.validation.auto:
            return False
        return self._validator.pending_checks() > 0

    def run(self) -> int:
        try:
            return self._validator.run_queued()
        except Exception:
            if self._engine.closed:
                log.debug("automatic validation stopped: the store was closed", exc_info=True)
                return 0
            raise


def _track(exp: Experience) -> str:
    rec = exp.record
    assert isinstance(rec, Fingerprint)
    return rec.track_id


def _batch(fp: Fingerprint) -> dict[str, float]:
    assert fp.batch is not None
    return fp.batch.as_dict()


def _streaming(fp: Fingerprint) -> StreamingFingerprint:
    assert fp.streaming is not None
    return fp.streaming


def _as_streaming(value: StreamingFingerprint | Mapping[str, Any]) -> StreamingFingerprint:
    if isinstance(value, StreamingFingerprint):
        return value
    if not isinstance(value, Mapping):
        raise InvalidArgumentError(
            f"streaming must be a StreamingFingerprint or a mapping, got {type(value).__name__}",
            field="streaming",
        )
    data = dict(value)
    if "values" not in data:  # bare values by name: full confidence
        data = {"values": data, "confidence": dict.fromkeys(data, 1.0)}
    try:
        return StreamingFingerprint.model_validate(data)
    except ValueError as exc:
        raise InvalidArgumentError(f"streaming: {exc}", field="streaming") from exc


def _check_far(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 0.5:
        raise InvalidArgumentError(f"target_far must be in (0, 0.5), got {value!r}",
                                   field="target_far")  # fmt: skip
    return float(value)


def _check_tracks(tracks: Sequence[str] | None) -> set[str] | None:
    if tracks is None:
        return None
    if isinstance(tracks, str) or not all(isinstance(t, str) for t in tracks):
        raise InvalidArgumentError("tracks must be a list of track ids", field="tracks")
    return set(tracks)


def _prior_threshold(key: str, far: float) -> float:
    """The prior's threshold at ``far``, interpolated between its grid of rates."""
    grid = sorted((float(k), float(t)) for k, t in PRIOR[key].items())
    fars = [g for g, _t in grid]
    thresholds = [t for _g, t in grid]
    return float(np.interp(far, fars, thresholds))
