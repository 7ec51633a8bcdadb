"""The three record kinds, their validation, and the ``Experience`` envelope.

Records are strict, frozen pydantic v2 models (DESIGN §3): unknown fields, NaN/±inf (also inside
dicts and lists) and wrong types are refused, and only hard bounds are checked ("typical" ranges
are for normalization, not validation). Every validation failure, including one raised by a
model's constructor, surfaces as :class:`~xpstore.errors.InvalidRecordError` whose ``field`` is
the dotted path of the first bad field (``batch.tempo_bpm``, ``streaming.values.tempo_bpm``), so
the CLI and the store can say exactly which value was wrong.

The 25 batch values are always keyed by name, never by position (Auralis has two orders, and its
streaming validator compared the wrong metrics by index); ``BATCH_FIELDS`` is the one canonical
order, used for vectors and by the codec.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeAlias, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from xpstore.errors import InvalidRecordError

__all__ = [
    "BATCH_FIELDS",
    "HARMONIC_FIELDS",
    "KINDS",
    "MODEL_BY_KIND",
    "MUTABLE_FIELDS",
    "SAMPLEABLE_KINDS",
    "STREAMING_FIELDS",
    "STREAMING_FIELDS_NO_HARMONIC",
    "BatchFingerprint",
    "Decision",
    "Experience",
    "Fingerprint",
    "PredictionOutcome",
    "QueryMetric",
    "Record",
    "RecordModel",
    "StreamingFingerprint",
    "StreamingValidation",
    "apply_changes",
    "invalid_record_error",
    "kind_of",
    "record_from_json",
    "record_to_json",
    "validate_record",
    "with_ts",
]

# --------------------------------------------------------------------------- field name tables

BATCH_FIELDS: Final[tuple[str, ...]] = (
    # frequency: fractions of energy, sum ≈ 1 (not enforced)
    "sub_bass_pct",
    "bass_pct",
    "low_mid_pct",
    "mid_pct",
    "upper_mid_pct",
    "presence_pct",
    "air_pct",
    # dynamics (dB)
    "lufs",
    "crest_db",
    "bass_mid_ratio",
    # temporal
    "tempo_bpm",
    "rhythm_stability",
    "transient_density",
    "silence_ratio",
    # spectral (normalized: 1.0 = 8 kHz centroid, 10 kHz rolloff)
    "spectral_centroid",
    "spectral_rolloff",
    "spectral_flatness",
    # harmonic
    "harmonic_ratio",
    "pitch_stability",
    "chroma_energy",
    # variation
    "dynamic_range_variation",
    "loudness_variation_std",
    "peak_consistency",
    # stereo
    "stereo_width",
    "phase_correlation",
)
"""The 25 batch fingerprint values in canonical order (DESIGN §3 table order)."""

STREAMING_FIELDS: Final[tuple[str, ...]] = (
    "dynamic_range_variation",
    "loudness_variation_std",
    "peak_consistency",
    "spectral_centroid",
    "spectral_rolloff",
    "spectral_flatness",
    "tempo_bpm",
    "rhythm_stability",
    "transient_density",
    "silence_ratio",
    "harmonic_ratio",
    "pitch_stability",
    "chroma_energy",
)
"""The 13 streaming values in Auralis's (and DESIGN's) order."""

HARMONIC_FIELDS: Final[tuple[str, ...]] = ("harmonic_ratio", "pitch_stability", "chroma_energy")
STREAMING_FIELDS_NO_HARMONIC: Final[tuple[str, ...]] = tuple(
    f for f in STREAMING_FIELDS if f not in HARMONIC_FIELDS
)
"""The 10 streaming values a streaming analyzer without harmonic analysis produces."""

_STREAMING_13: Final = frozenset(STREAMING_FIELDS)
_STREAMING_10: Final = frozenset(STREAMING_FIELDS_NO_HARMONIC)

KINDS: Final[tuple[str, ...]] = ("prediction", "fingerprint", "query_metric", "decision")
SAMPLEABLE_KINDS: Final[tuple[str, ...]] = ("prediction", "fingerprint", "query_metric")
"""The experiences: what priority sampling draws from (a decision is an audit record)."""

MUTABLE_FIELDS: Final[dict[str, frozenset[str]]] = {
    "prediction": frozenset({"actual", "reward"}),
    "fingerprint": frozenset({"metadata", "validation"}),
    "query_metric": frozenset({"user_satisfaction"}),
    "decision": frozenset(),
}
"""Fields an update may change, per kind; everything else is fixed once written."""

METADATA_MAX_KEYS: Final = 64
METADATA_MAX_VALUE_CHARS: Final = 4096
METADATA_MAX_KEY_CHARS: Final = 256
EMBEDDING_MAX_DIM: Final = 65_536
INT64_MAX: Final = 2**63 - 1
"""Counts are capped so that every valid record encodes (msgpack and LMDB take int64)."""

# --------------------------------------------------------------------------- constrained types

Fraction = Annotated[float, Field(ge=0, le=1)]
NonNegative = Annotated[float, Field(ge=0)]
Lufs = Annotated[float, Field(le=0)]
Tempo = Annotated[float, Field(gt=0, le=1000)]
Correlation = Annotated[float, Field(ge=-1, le=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
_CUSTOM_ERROR: Final = "xpstore_invalid"

TS_MAX: Final = 253_402_300_800.0
"""10000-01-01T00:00:00Z: a record's ts is seconds since the epoch in years 1970..9999. Beyond
it a ts is a mistake (milliseconds or microseconds, 1.8e308), and datetime cannot show it."""


def _fail(path: str, message: str) -> PydanticCustomError:
    """An error for a custom check; ``path`` (relative to where it is raised) extends its loc."""
    return PydanticCustomError(_CUSTOM_ERROR, message, {"path": path})


def _sane_ts(ts: float) -> float:
    if ts >= TS_MAX:
        hint = "; a time in milliseconds must be divided by 1000" if ts < TS_MAX * 1000 else ""
        raise _fail("", f"must be seconds since the epoch, before the year 10000 (< {TS_MAX:.0f}),"
                        f" got {ts!r}{hint}")  # fmt: skip
    return ts


Timestamp = Annotated[float, Field(ge=0), AfterValidator(_sane_ts)]
"""Seconds since the epoch, years 1970..9999; ``None`` on a record means "the time of the put"."""


_MODEL_CONFIG: Final = ConfigDict(
    extra="forbid",
    frozen=True,
    allow_inf_nan=False,
    strict=True,  # no "1.5" -> 1.5 or True -> 1.0 coercion; int -> float is still accepted
    validate_default=False,
    revalidate_instances="never",
)


class _RecordModel(BaseModel):
    """Shared config; constructor errors become InvalidRecordError (a ValueError) like ingest's."""

    model_config = _MODEL_CONFIG

    if not TYPE_CHECKING:  # keep the pydantic-mypy plugin's typed __init__ signature

        def __init__(self, /, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise invalid_record_error(exc) from exc

        # Tell pydantic this __init__ only wraps BaseModel's (as RootModel's does), so nested
        # validation and model_validate keep the fast path instead of calling it per field.
        __init__.__pydantic_base_init__ = True


# --------------------------------------------------------------------------- fingerprints


class BatchFingerprint(_RecordModel):
    """The 25 values of a full-track analysis, in Auralis's units, hard bounds only."""

    sub_bass_pct: Fraction
    bass_pct: Fraction
    low_mid_pct: Fraction
    mid_pct: Fraction
    upper_mid_pct: Fraction
    presence_pct: Fraction
    air_pct: Fraction
    lufs: Lufs
    crest_db: NonNegative
    bass_mid_ratio: float
    tempo_bpm: Tempo
    rhythm_stability: Fraction
    transient_density: Fraction
    silence_ratio: Fraction
    spectral_centroid: Fraction
    spectral_rolloff: Fraction
    spectral_flatness: Fraction
    harmonic_ratio: Fraction
    pitch_stability: Fraction
    chroma_energy: Fraction
    dynamic_range_variation: Fraction
    loudness_variation_std: NonNegative
    peak_consistency: Fraction
    stereo_width: Fraction
    phase_correlation: Correlation

    def as_dict(self) -> dict[str, float]:
        """The 25 values keyed by name, in ``BATCH_FIELDS`` order."""
        d = self.__dict__
        return {name: d[name] for name in BATCH_FIELDS}


_VALUE_CONFIG: Final = ConfigDict(strict=True, allow_inf_nan=False)
# One adapter per streaming name, built from the batch field's own constraints, so the two can
# never disagree about a bound (and the messages are pydantic's own).
_STREAMING_VALUE_ADAPTERS: Final[dict[str, TypeAdapter[float]]] = {
    name: TypeAdapter(
        cast(Any, Annotated)[(float, *BatchFingerprint.model_fields[name].metadata)],
        config=_VALUE_CONFIG,
    )
    for name in STREAMING_FIELDS
}


def _key_set_message(keys: frozenset[str]) -> tuple[str, str]:
    """Path and message for a streaming key set that is neither the 13 nor the 10 names."""
    unknown = sorted(keys - _STREAMING_13)
    expected = _STREAMING_13 if keys & set(HARMONIC_FIELDS) else _STREAMING_10
    missing = [name for name in STREAMING_FIELDS if name in expected - keys]
    rule = "expected exactly the 13 streaming names or the 10 without " + ", ".join(HARMONIC_FIELDS)
    if unknown:
        return unknown[0], f"unknown streaming value {unknown[0]!r}; {rule}"
    return missing[0], f"missing streaming value {missing[0]!r}; {rule}"


class StreamingFingerprint(_RecordModel):
    """A streaming analysis: 13 values (or 10 without harmonics) with per-value confidence."""

    values: dict[str, float]
    confidence: dict[str, Fraction]
    chunk_count: int = Field(0, ge=0, le=INT64_MAX)

    @field_validator("values", mode="after")
    @classmethod
    def _check_values(cls, values: dict[str, float]) -> dict[str, float]:
        keys = frozenset(values)
        if keys not in (_STREAMING_13, _STREAMING_10):
            path, message = _key_set_message(keys)
            raise _fail(path, message)
        for name, value in values.items():
            try:
                _STREAMING_VALUE_ADAPTERS[name].validate_python(value)
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise _fail(name, f"{msg} (got {_short(value)})") from exc
        # canonical order, so equal fingerprints encode to equal bytes
        return {name: values[name] for name in STREAMING_FIELDS if name in values}

    @field_validator("confidence", mode="after")
    @classmethod
    def _check_confidence(cls, conf: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        values = info.data.get("values")
        if values is None:  # values already failed; that error is the one reported
            return conf
        extra = [k for k in conf if k not in values]
        if extra:
            raise _fail(extra[0], f"confidence for {extra[0]!r}, which is not in values")
        missing = [k for k in values if k not in conf]
        if missing:
            raise _fail(missing[0], f"no confidence for {missing[0]!r}; keys must match values")
        return {name: conf[name] for name in values}

    def mean_confidence(self) -> float:
        """Average per-value confidence (the priority sampler's stand-in for a confidence)."""
        conf = self.confidence
        return sum(conf.values()) / len(conf) if conf else 0.0


class StreamingValidation(_RecordModel):
    """Whether a fingerprint's streaming values agree with its batch values (issue 11,
    docs/validation.md). ``pending``: streaming values without batch values to check them
    against (set when a streaming-only fingerprint is put); ``valid`` / ``invalid``: the
    verdict of ``Store.validate_streaming`` under calibration ``calibration``."""

    status: Literal["pending", "valid", "invalid"]
    score: float | None = None
    threshold: float | None = None
    calibration: int | None = Field(None, ge=0, le=INT64_MAX)
    """The calibration version (0: the documented prior)."""
    quality: Literal["high", "medium", "low"] | None = None
    """The streaming confidences' grade."""
    validated_at: Timestamp | None = None


MetadataKey = Annotated[str, Field(min_length=1, max_length=METADATA_MAX_KEY_CHARS)]
MetadataValue = Annotated[str, Field(max_length=METADATA_MAX_VALUE_CHARS)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=METADATA_MAX_KEYS)]
"""A small string map: title, artist, collection, source path."""
Embedding = Annotated[list[float], Field(min_length=1, max_length=EMBEDDING_MAX_DIM)]


class Fingerprint(_RecordModel):
    """A track's audio fingerprint; a newer one for the same ``track_id`` supersedes it."""

    track_id: NonEmptyStr
    batch: BatchFingerprint | None = None
    streaming: StreamingFingerprint | None = None
    embedding: Embedding | None = None
    metadata: Metadata | None = None
    algorithm_version: str | None = None
    ts: Timestamp | None = None
    validation: StreamingValidation | None = None
    """Streaming-vs-batch status (``where={"validation.status": "valid"}``); a streaming-only
    fingerprint is ``pending`` unless given otherwise."""

    @field_validator("batch", mode="before")
    @classmethod
    def _batch_from_mapping(cls, value: Any) -> Any:
        # strict mode takes a dict for a nested model; widen that to any Mapping
        if isinstance(value, Mapping) and not isinstance(value, dict):
            return dict(value)
        return value

    @field_validator("algorithm_version", mode="before")
    @classmethod
    def _version_to_str(cls, value: Any) -> Any:
        # Auralis numbers its fingerprint algorithm (8); keep it a label here
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @model_validator(mode="after")
    def _needs_values(self) -> Fingerprint:
        if self.batch is None and self.streaming is None:
            raise _fail("batch", "a fingerprint needs batch or streaming values (or both)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _pending_without_batch(cls, data: Any) -> Any:
        # streaming values with nothing to check them against yet: pending (docs/validation.md)
        if (
            isinstance(data, Mapping)
            and data.get("batch") is None
            and data.get("streaming") is not None
            and data.get("validation") is None
        ):
            return {**data, "validation": {"status": "pending"}}
        return data


# --------------------------------------------------------------------------- outcomes, metrics


class PredictionOutcome(_RecordModel):
    """One prediction (e.g. an Auralis preset) and, once known, what the user actually chose."""

    predicted: NonEmptyStr
    actual: str | None = None
    current: str | None = None
    confidence: Fraction
    context: NonEmptyStr
    track_id: NonEmptyStr | None = None
    user_id: NonEmptyStr | None = None
    chunk_idx: int | None = Field(None, ge=0, le=INT64_MAX)
    audio_features: dict[str, Fraction] | None = None
    reward: float | None = None
    user_weight: Fraction | None = None
    score: Fraction | None = None
    """The predictor's raw (uncalibrated) score of ``predicted``, when it has one: what its
    confidence calibration is fitted on (``xpstore.tuning``)."""
    ts: Timestamp | None = None

    @property
    def was_correct(self) -> bool | None:
        """Derived, never stored: None while the outcome is unknown."""
        return None if self.actual is None else self.actual == self.predicted


class QueryMetric(_RecordModel):
    """One query's cost and result (Athena's QueryMetrics, with its names shortened)."""

    query_id: NonEmptyStr
    query_text: str
    query_type: NonEmptyStr
    latency_ms: NonNegative
    memory_mb: NonNegative
    cache_hit: bool
    result_count: int = Field(ge=0, le=INT64_MAX)
    layers: list[str] = Field(default_factory=list)
    layer_latencies_ms: dict[str, NonNegative] = Field(default_factory=dict)
    success: bool
    error: str | None = None
    parallel: bool = False
    concurrency: int = Field(1, ge=1, le=INT64_MAX)
    accuracy: Fraction = 1.0
    user_satisfaction: Fraction | None = None
    ts: Timestamp | None = None

    @field_validator("layer_latencies_ms", mode="after")
    @classmethod
    def _layers_known(cls, lat: dict[str, float], info: ValidationInfo) -> dict[str, float]:
        layers = info.data.get("layers")
        if layers is None:
            return lat
        for key in lat:
            if key not in layers:
                raise _fail(key, f"layer {key!r} is not in layers")
        return lat

    @model_validator(mode="after")
    def _error_means_failure(self) -> QueryMetric:
        if self.error is not None and self.success:
            raise _fail("error", "a query with an error cannot have success=True")
        return self


class Decision(_RecordModel):
    """An auditable decision of a component that learns or tunes (DESIGN §7): what changed
    (``target``), ``old`` -> ``new``, why, and on what evidence. A component's current state is
    the last decision per target; a reset is a decision too (``action="reset"``)."""

    component: NonEmptyStr  # "learner", "tuner"
    action: NonEmptyStr  # "weight", "affinity", "reset", ...
    target: NonEmptyStr  # e.g. "user_weight/u1", "affinity/high_energy/punchy"
    old: float | None = None
    new: float | None = None
    reason: str = ""
    evidence: dict[str, float] = Field(default_factory=dict)
    user_id: NonEmptyStr | None = None
    policy: str | None = None
    ts: Timestamp | None = None


# --------------------------------------------------------------------------- kinds

Record: TypeAlias = PredictionOutcome | Fingerprint | QueryMetric | Decision
RecordModel: TypeAlias = (
    type[PredictionOutcome] | type[Fingerprint] | type[QueryMetric] | type[Decision]
)

MODEL_BY_KIND: Final[dict[str, RecordModel]] = {
    "prediction": PredictionOutcome,
    "fingerprint": Fingerprint,
    "query_metric": QueryMetric,
    "decision": Decision,
}
_KIND_BY_TYPE: Final[dict[type, str]] = {model: kind for kind, model in MODEL_BY_KIND.items()}


def kind_of(record: Record) -> str:
    """The kind name of a record instance."""
    kind = _KIND_BY_TYPE.get(type(record))
    if kind is None:
        for model, name in _KIND_BY_TYPE.items():
            if isinstance(record, model):
                return name
        raise InvalidRecordError(f"not a record: {type(record).__name__}", field="kind")
    return kind


# --------------------------------------------------------------------------- errors


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def invalid_record_error(exc: ValidationError, *, prefix: str = "") -> InvalidRecordError:
    """Turn a pydantic error into InvalidRecordError naming the first bad field's dotted path."""
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic never raises an empty ValidationError
        return InvalidRecordError(f"{prefix or 'record'}: invalid", field=prefix or None)
    first = errors[0]
    parts = [prefix] if prefix else []
    parts.extend(str(p) for p in first["loc"])
    if first["type"] == _CUSTOM_ERROR:
        extra = (first.get("ctx") or {}).get("path")
        if extra:
            parts.append(str(extra))
    field = ".".join(parts) or None
    message = f"{field or 'record'}: {first['msg']}"
    bad = first.get("input")
    if isinstance(bad, (int, float, str)) and first["type"] not in ("missing", _CUSTOM_ERROR):
        message += f" (got {_short(bad)})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return InvalidRecordError(message, field=field)


# --------------------------------------------------------------------------- JSON and updates


def validate_record(kind: str, data: Mapping[str, Any]) -> Record:
    """Build a validated record of ``kind`` from plain data (JSON-decoded or Python)."""
    model = MODEL_BY_KIND.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise InvalidRecordError(
            f"kind: unknown record kind {_short(kind)}; expected one of {', '.join(KINDS)}",
            field="kind",
        )
    if type(data) is not dict:  # exact type first: isinstance on an ABC is slow
        if not isinstance(data, Mapping):
            raise InvalidRecordError(
                f"a {kind} record must be an object, got {type(data).__name__}"
            )
        data = dict(data)
    try:
        # the model's validator itself: model_validate only forwards to it, and that call
        # measured ~0.4 us of a prediction's ~2 us
        return cast(Record, model.__pydantic_validator__.validate_python(data))
    except ValidationError as exc:
        raise invalid_record_error(exc) from exc


def record_from_json(obj: Mapping[str, Any]) -> Record:
    """Parse ``{"kind": ..., **fields}`` (a CLI/ingest line, a ``replay`` line)."""
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise InvalidRecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    if "kind" not in obj:
        raise InvalidRecordError(f"kind: missing; expected one of {', '.join(KINDS)}", field="kind")
    fields = dict(obj)  # a C-level copy; cheaper than filtering in a comprehension
    kind = fields.pop("kind")
    return validate_record(kind, fields)


def record_to_json(record: Record) -> dict[str, Any]:
    """``{"kind": ..., **fields}`` with None fields omitted; what ``record_from_json`` accepts."""
    out: dict[str, Any] = {"kind": kind_of(record)}
    out.update(record.model_dump(mode="json", exclude_none=True))
    return out


def apply_changes(record: Record, changes: Mapping[str, Any]) -> Record:
    """A new record with ``changes`` applied, re-validated; only ``MUTABLE_FIELDS`` may change."""
    kind = kind_of(record)
    allowed = MUTABLE_FIELDS[kind]
    for key in changes:
        if key not in allowed:
            raise InvalidRecordError(
                f"{key}: cannot be changed on a {kind} record; "
                f"only {', '.join(sorted(allowed))} may change",
                field=str(key),
            )
    data = record.model_dump()
    data.update(changes)
    return validate_record(kind, data)


def with_ts(record: Record, ts: float) -> Record:
    """``record`` with ``ts`` filled in (the store's time of the put) if it has none."""
    if record.ts is not None:
        return record
    if not (isinstance(ts, (int, float)) and not isinstance(ts, bool) and 0 <= ts < float("inf")):
        raise InvalidRecordError(f"ts: must be a finite time >= 0 (got {_short(ts)})", field="ts")
    # only ts changes and it was checked above, so a validated copy is not needed
    return record.model_copy(update={"ts": float(ts)})


# --------------------------------------------------------------------------- envelope


@dataclass(frozen=True, slots=True)
class Experience:
    """A stored record with its id (the LSN that created it) and value-tracking counters.

    A plain dataclass, not a model: one is built on every read, from already-validated data.
    """

    id: int
    kind: str
    ts: float
    record: Record
    updated_lsn: int
    retrieval_count: int = 0
    success_count: int = 0
    priority: float | None = None
    """An explicit sampling priority set by ``update_priorities`` (None: the formula's)."""

    @property
    def success_rate(self) -> float | None:
        """success_count / retrieval_count, or None before the first retrieval."""
        if self.retrieval_count == 0:
            return None
        return self.success_count / self.retrieval_count

    def to_json(self) -> dict[str, Any]:
        """The record as re-ingestable JSON (``replay`` output); carries the stored ``ts``."""
        out = record_to_json(self.record)
        if "ts" not in out:
            out["ts"] = self.ts
        return out

    def envelope_json(self) -> dict[str, Any]:
        """The whole envelope, for ``get``/``scan`` output; ``record`` holds the fields."""
        record = self.record.model_dump(mode="json", exclude_none=True)
        return {
            "id": self.id,
            "kind": self.kind,
            "ts": self.ts,
            "updated_lsn": self.updated_lsn,
            "retrieval_count": self.retrieval_count,
            "success_count": self.success_count,
            "record": record,
        }
