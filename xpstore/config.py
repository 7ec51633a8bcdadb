"""StoreConfig: every knob of a store, grouped by the component that uses it, with its default,
its valid range and how it may change.

The config is persisted in the store (LMDB ``meta/config``, a JSON document) so that every later
open, the CLI's included, runs with the same settings. It changes in two ways only:

- per-open overrides (``Store.open(..., durability="group")``) apply to that session and are not
  written back;
- ``Store.reconfigure(**changes)`` logs the new document through the WAL (durable like any write)
  and applies what it can to the running store (:data:`LIVE`); a knob that needs a reopen is
  refused with an error that says so, and the session-only knobs are never persisted.

Knobs have two spellings: dotted by section (``"index.ef_search"``, ``config.index.ef_search``)
and the flat names stores were created with before sections existed (``index_ef_search``,
``durability``, ``hold_applier``), which every entry point still accepts (:data:`FLAT`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xpstore.errors import InvalidArgumentError

Durability = Literal["commit", "group", "none"]
RecoveryMode = Literal["tolerate_tail", "absolute", "point_in_time"]
Kind = Literal["prediction", "fingerprint", "query_metric"]

MiB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RetentionRule(_Section):
    """Keep at most ``max_count`` records of a kind and/or none older than ``max_age_s``."""

    max_count: int | None = Field(None, ge=0)
    max_age_s: float | None = Field(None, gt=0)


class WalSettings(_Section):
    """The write-ahead log (persistence/wal.py) and its checkpoints."""

    durability: Durability = "commit"
    """``commit``: put returns after an fsync covering it; ``group``: after write(), fsync every
    ``group_commit_ms`` (an OS crash may lose that window); ``none``: never fsync (scratch)."""
    recovery_mode: RecoveryMode = "tolerate_tail"
    """Session only: how an open treats a damaged log (docs/recovery.md)."""
    group_commit_ms: float = Field(2.0, gt=0, le=1000)
    segment_max_bytes: int = Field(64 * MiB, ge=64 * 1024, le=4096 * MiB)
    max_frame_bytes: int = Field(64 * MiB, ge=64 * 1024, le=1024 * MiB)
    preallocate_bytes: int = Field(4 * MiB, ge=0, le=1024 * MiB)
    """Zeros written ahead of the active segment's frames, so a commit's fdatasync overwrites
    instead of extending the file (docs/formats.md); 0: append-only segments."""
    checkpoint_interval_s: float = Field(30.0, gt=0)
    retain_segments: int = Field(0, ge=0)
    """Segments at or below applied_lsn kept by checkpoints (for later point-in-time restore)."""
    retain_seconds: float = Field(0.0, ge=0)
    """Segments younger than this are kept by checkpoints (point-in-time restore window)."""


class RecordSettings(_Section):
    """Limits the writer checks before anything is logged."""

    max_record_bytes: int = Field(1 * MiB, ge=1024, le=256 * MiB)
    max_batch_records: int = Field(100_000, ge=1, le=10_000_000)
    embedding_dim: int | None = Field(None, ge=1, le=65_536)
    """Fixed dimension of Fingerprint.embedding; None: fixed by the first fingerprint with one
    (logged through the WAL as a settings change in that fingerprint's frame)."""


class ApplySettings(_Section):
    """The applier (overlay -> LMDB) and LMDB itself."""

    batch_ops: int = Field(10_000, ge=1, le=1_000_000)
    """The applier moves at most this many acknowledged operations into LMDB per transaction."""
    interval_ms: float = Field(200.0, gt=0, le=60_000)
    hold: bool = False
    """Session only: keep acknowledged operations in the WAL and the overlay (tests, benchmarks)."""
    max_overlay_ops: int = Field(1_000_000, ge=1_000)
    """Back-pressure: writers wait when this many acknowledged operations are not yet applied."""
    map_size: int = Field(256 * MiB, ge=1 * MiB)
    """Initial LMDB map size; it doubles on MapFullError."""


class SnapshotSettings(_Section):
    """Automatic snapshots (docs/snapshots.md)."""

    dir: str | None = None
    """Where snapshots live; None: ``<store>/snapshots``."""
    every_records: int | None = Field(None, ge=1)
    """Take a snapshot automatically after this many acknowledged operations."""
    every_seconds: float | None = Field(None, gt=0)
    """Take a snapshot automatically this often (when anything changed)."""
    keep: int | None = Field(None, ge=1)
    """After an automatic snapshot, prune to this many (None: keep all)."""


class RetentionSettings(_Section):
    """Per-kind retention, enforced by evicting through the WAL like deletes."""

    rules: dict[Kind, RetentionRule] = {}
    interval_s: float = Field(60.0, gt=0)


class LearnedWeights(_Section):
    """Per-dimension audio weights learned by ``Store.fit_similarity`` (docs/index.md, "Learned
    similarity"), with what they were learned on and how much they gained, cross-validated by
    group. Written only by ``fit_similarity`` (through the WAL, as a settings change); used by
    builds only while ``index.dim_weights == "learned"``."""

    version: int = Field(ge=1)
    """Increases with every fit of this store."""
    mode: Literal["logratio", "percentile", "zscore"]
    """The standardization the weights apply to (a build in another mode refuses them)."""
    stats_checksum: str
    """The library statistics (``AudioStats`` checksum) the fit standardized with."""
    stats_count: int = Field(ge=0)
    weights: dict[str, float]
    """All 25 batch names, >= 0, summing to 1."""
    groups: int = Field(ge=0)
    tracks: int = Field(ge=0)
    folds: int = Field(ge=2)
    baseline_hit_rate: float = Field(ge=0, le=1)
    """Same-group top-1 over the grouped tracks with the weights in force before the fit."""
    cv_hit_rate: float = Field(ge=0, le=1)
    """The same, each track scored with weights learned on folds without its group."""
    gain: float
    """``cv_hit_rate - baseline_hit_rate``."""
    fitted_at: float


class IndexSettings(_Section):
    """The k-NN index (docs/index.md). A reconfigure reaches the rebuild triggers, the query
    threads, the search defaults (``ef_search``, ``nprobe``), the answer cache and the read-only
    refresh at once; the embedding, the index kind and its graph at the next build
    (``similar(params=...)`` sets the search knobs of one query)."""

    mode: Literal["logratio", "percentile", "zscore"] = "logratio"
    """Standardization of the 25 audio values: ``logratio`` (log-ratios of the band shares, log
    flatness, then z-scores; chosen on real music), Auralis's 5th-95th percentile range, or std."""
    audio_weight: float = Field(0.7, ge=0, le=1000)
    embedding_weight: float = Field(0.3, ge=0, le=1000)
    dim_weights: dict[str, float] | Literal["learned"] | None = None
    """Per-dimension audio weights by name (all 25); ``"learned"``: the weights of ``learned``
    (``Store.fit_similarity``); None: the mode's default."""
    learned: LearnedWeights | None = None
    """The last ``fit_similarity`` result (set by it only; see :class:`LearnedWeights`)."""
    exact_below: int = Field(10_000, ge=0)
    """Below this many tracks the main index is exact (``IDMap2,Flat``)."""
    hnsw_below: int = Field(2_000_000, ge=0)
    """Below this many (and from ``exact_below``) HNSW; from here IVF-Flat."""
    hnsw_m: int = Field(32, ge=4, le=256)
    ef_construction: int = Field(128, ge=80, le=4096)
    ef_search: int = Field(64, ge=1, le=32_768)
    nprobe: int = Field(32, ge=1, le=65_536)
    delta_min: int = Field(256, ge=1)
    delta_ratio: float = Field(0.1, gt=0, le=10)
    delta_max: int = Field(10_000, ge=1)
    """Rebuild when the delta holds min(delta_max, max(delta_min, delta_ratio * index size))."""
    tombstone_ratio: float = Field(0.2, gt=0, le=1)
    """Rebuild when tombstones reach this share of the main index (and at least 64)."""
    drift_max: float = Field(0.5, gt=0)
    """Rebuild when the delta's means moved this many scale units from the index's stats."""
    auto_rebuild: bool = True
    build_in: Literal["auto", "thread", "process"] = "auto"
    process_above: int = Field(20_000, ge=0)
    """``auto`` builds in a child process from this many tracks (a thread below)."""
    query_threads: int = Field(1, ge=1, le=256)
    """FAISS OpenMP threads of a single-query search (1: OpenMP's fork/join costs a single
    query more than it saves, and far more on a busy machine; benchmarks.md)."""
    build_threads: int = Field(1, ge=1, le=256)
    """FAISS threads of a build: leave the other cores to queries."""
    neighbors_k: int = Field(10, ge=0, le=1000)
    """Neighbours materialized per track in LMDB after each build (0: none)."""
    refresh_s: float = Field(1.0, ge=0)
    """A read-only store catches its index up with LMDB at most this often."""
    backend: Literal["faiss", "milvus"] = "faiss"
    """What answers ``similar()``: the local FAISS index, or the Milvus collection a follower
    (``xpstore sync milvus``) mirrors this store into (``milvus.uri``; docs/scale-out.md). With
    ``milvus`` an unreachable server falls back to the local index with a logged warning."""
    answer_cache: int = Field(100_000, ge=0, le=100_000_000)
    """Entries of the answer cache (record id -> track and metadata of recent answers, so an
    answer needs no LMDB read); live. The auto-tuner and the memory monitor move it."""


class ValidationCalibration(_Section):
    """The streaming-vs-batch calibration in force (docs/validation.md), written only by
    ``Store.calibrate_validation`` (through the WAL, as a settings change)."""

    version: int = Field(ge=1)
    source: Literal["library", "prior"]
    """``library``: fitted on this store's fingerprints with both parts; ``prior``: too few of
    them (``reason`` says how many), the documented prior (``index.validation_prior``)."""
    reason: str | None = None
    target_far: float = Field(gt=0, lt=0.5)
    model: dict[str, Any]
    """``ValidationModel.to_json()``: standardization and per-metric locations and scales."""
    threshold: float
    """On cohort-normalized scores."""
    raw_threshold: float
    """On raw scores (no cohort: the prior on a store with too few batch fingerprints)."""
    cohort: list[int] = []
    """Record ids of the batch fingerprints the scores are normalized against."""
    true_pairs: int = Field(ge=0)
    false_pairs: int = Field(ge=0)
    auc: float | None = None
    accept_rate: float | None = None
    """Share of the calibration's true pairs accepted."""
    false_accept_rate: float | None = None
    calibrated_at: float


class ValidationSettings(_Section):
    """Streaming-vs-batch validation (docs/validation.md)."""

    target_far: float = Field(0.05, gt=0, lt=0.5)
    """The share of different-track pairs a calibration accepts (its threshold's quantile)."""
    min_pairs: int = Field(30, ge=2)
    """Fewer fingerprints with both parts than this: calibrate to the documented prior."""
    cohort_size: int = Field(100, ge=0, le=10_000)
    """Batch fingerprints drawn from the library to normalize scores against (0: raw scores)."""
    auto: bool = True
    """Validate when batch values arrive for a track whose fingerprint was streaming-only."""
    calibration: ValidationCalibration | None = None
    """Set by ``calibrate_validation`` only; None: the prior applies until a calibration."""


class StreamingSettings(_Section):
    """The streaming cache and query strategies (docs/validation.md)."""

    cache_mb: float = Field(64.0, gt=0, le=1_000_000)
    """The in-memory cache of streaming values holds at most this many MiB (LRU beyond)."""
    ttl_s: float = Field(300.0, gt=0)
    """A cached entry not updated for this long is dropped (Auralis's TTL)."""
    accurate_factor: int = Field(4, ge=1, le=1000)
    """``strategy="accurate"`` re-ranks ``k * accurate_factor`` fast candidates."""
    accurate_confidence: float = Field(0.6, ge=0, le=1)
    """``auto``, for a query with streaming values only: ``fast`` at or above this mean
    confidence, ``accurate`` below it (a query with batch values: ``batch``)."""


class SamplingSettings(_Section):
    """Prioritized sampling (docs/sampling.md)."""

    alpha: float = Field(0.6, ge=0, le=10)
    """P(i) = p_i**alpha / sum p**alpha (0: uniform)."""
    beta: float = Field(0.4, ge=0, le=1)
    """Importance-weight exponent when ``sample(beta=None)``."""
    w_confidence: float = Field(0.4, ge=0, le=1000)
    w_reward: float = Field(0.4, ge=0, le=1000)
    w_age: float = Field(0.2, ge=0, le=1000)
    floor: float = Field(0.01, gt=0, le=1000)
    age_half_life_s: float = Field(7 * 86400.0, gt=0)
    value_weight: float = Field(0.5, ge=0, le=1)
    """How far the Laplace-smoothed success rate moves priority: factor in [1-w, 1+w]."""
    new_item_priority: float = Field(1.0, ge=0, le=1e6)
    """Never-sampled items get at least this priority."""
    flush_retrievals: int = Field(4096, ge=1)
    """Retrieval counts bumped by sample() are logged once this many are pending (and at close)."""
    max_sample: int = Field(1_000_000, ge=1, le=1_000_000_000)
    """The largest ``n`` one ``sample()`` call draws. Draws are with replacement, so ``n`` is not
    bounded by the population: without a limit a typo (``-n 1000000000``) asks for tens of GB."""


class HealthSettings(_Section):
    """Thresholds of ``store.health()`` (docs/service.md, "Health"): a check is ``warning`` past
    its warning threshold and ``critical`` past its critical one."""

    window_s: float = Field(300.0, gt=0, le=86_400)
    """The recent window of latency figures (fsync p99) and of the answer-cache hit rate."""
    wal_bytes_warning: int = Field(1024 * MiB, ge=0)
    wal_bytes_critical: int = Field(8192 * MiB, ge=0)
    """WAL on disk: a checkpoint that no longer runs lets it grow without bound."""
    checkpoint_age_warning_s: float = Field(300.0, gt=0)
    checkpoint_age_critical_s: float = Field(3600.0, gt=0)
    """Age of the oldest WAL segment a checkpoint could already have deleted."""
    lag_ops_warning: int = Field(100_000, ge=1)
    lag_ops_critical: int = Field(900_000, ge=1)
    """Applier lag (acknowledged minus applied LSN); writers wait at ``apply.max_overlay_ops``."""
    fsync_p99_warning_s: float = Field(0.1, gt=0)
    fsync_p99_critical_s: float = Field(1.0, gt=0)
    fsync_min_count: int = Field(20, ge=1)
    """Fewer fsyncs than this in the window: too few to judge a p99 (healthy, says so)."""
    index_delta_warning: float = Field(2.0, gt=0)
    """Delta size over the size that triggers a rebuild: past this, rebuilds do not keep up."""
    index_tombstone_warning: float = Field(0.4, gt=0, le=1)
    """Tombstones as a share of the main index (a rebuild is due at ``index.tombstone_ratio``)."""
    recall_warning: float = Field(0.9, ge=0, le=1)
    recall_critical: float = Field(0.7, ge=0, le=1)
    """The last build's recall@10 probe against exact search."""
    memory_warning_pct: float = Field(85.0, gt=0, le=100)
    memory_critical_pct: float = Field(95.0, gt=0, le=100)
    """System memory in use (psutil), the memory check's levels 2 and 3."""
    disk_free_warning_bytes: int = Field(2048 * MiB, ge=0)
    disk_free_critical_bytes: int = Field(256 * MiB, ge=0)
    """Free space on the store's file system (LMDB doubles its map when full)."""
    cache_hit_warning: float = Field(0.7, ge=0, le=1)
    cache_hit_critical: float = Field(0.5, ge=0, le=1)
    cache_min_queries: int = Field(50, ge=1)
    """The answer-cache hit rate of the query metrics (``cache_hit``) in the window; judged
    from this many queries."""
    accuracy_warning: float = Field(0.4, ge=0, le=1)
    accuracy_min_outcomes: int = Field(100, ge=1)
    """Prediction accuracy over the learner's recent resolved outcomes, judged from this many."""
    verify_age_warning_s: float | None = Field(None, gt=0)
    """Warn when the last ``verify`` is older than this (None: its age is only reported)."""


class MilvusSettings(_Section):
    """The Milvus follower and the ``milvus`` similarity backend (docs/scale-out.md)."""

    uri: str | None = None
    """Where Milvus answers: ``http://host:19530`` (a server or cluster), or a local ``.db``
    file (Milvus Lite, one process at a time)."""
    collection: str = Field("xpstore", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
    """The alias readers query; the follower's collections are ``<collection>__<embedder>``."""
    timeout_s: float = Field(5.0, gt=0, le=600)
    """Per-request timeout of a query; past it the local index answers (with a warning)."""
    batch_size: int = Field(1000, ge=1, le=100_000)
    """Operations the follower reads before it writes to Milvus and records its high-water LSN."""
    poll_s: float = Field(0.5, gt=0, le=3600)
    """How often ``--follow`` looks for new operations when it is caught up."""
    overfetch: int = Field(4, ge=1, le=100)
    """A ``where=`` Milvus cannot evaluate is applied after a search of ``k * overfetch``."""


def _check_index(index: IndexSettings) -> None:
    """Cross-field rules of the index section (InvalidArgumentError naming the knob)."""
    if index.dim_weights != "learned":
        return
    learned = index.learned
    if learned is None:
        raise InvalidArgumentError(
            'index.dim_weights="learned" needs learned weights: run store.fit_similarity() first',
            field="index.dim_weights",
        )
    if learned.mode != index.mode:
        raise InvalidArgumentError(
            f"the learned weights apply to mode {learned.mode!r}, not {index.mode!r}: fit them "
            "again under this mode, or set index.dim_weights to None",
            field="index.dim_weights",
        )


SECTIONS: dict[str, type[_Section]] = {
    "wal": WalSettings,
    "records": RecordSettings,
    "apply": ApplySettings,
    "snapshots": SnapshotSettings,
    "retention": RetentionSettings,
    "index": IndexSettings,
    "sampling": SamplingSettings,
    "validation": ValidationSettings,
    "streaming": StreamingSettings,
    "health": HealthSettings,
    "milvus": MilvusSettings,
}

_RENAMED = {
    "hold_applier": "apply.hold",
    "max_overlay_ops": "apply.max_overlay_ops",
    "map_size": "apply.map_size",
    "wal_retain_segments": "wal.retain_segments",
    "wal_retain_seconds": "wal.retain_seconds",
    "retention": "retention.rules",
    "retention_interval_s": "retention.interval_s",
    "sample_flush_retrievals": "sampling.flush_retrievals",
    "new_item_priority": "sampling.new_item_priority",
}
_PREFIXES = (("index_", "index"), ("priority_", "sampling"), ("snapshot_", "snapshots"),
             ("apply_", "apply"), ("validation_", "validation"),
             ("streaming_", "streaming"), ("health_", "health"), ("milvus_", "milvus"))  # fmt: skip


def _flat_names() -> dict[str, str]:
    """Flat (pre-section) knob name -> dotted name."""
    out: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for name in cls.model_fields:
            dotted = f"{section}.{name}"
            flat = name
            for prefix, sec in _PREFIXES:
                if sec == section:
                    flat = prefix + name
            out[flat] = dotted
    for flat, dotted in _RENAMED.items():
        stale = next((k for k, v in out.items() if v == dotted), None)
        if stale is not None:
            del out[stale]
        out[flat] = dotted
    return out


FLAT: dict[str, str] = _flat_names()
"""Every flat knob name -> its dotted name (``"index_ef_search"`` -> ``"index.ef_search"``)."""

SESSION_ONLY = frozenset({"wal.recovery_mode", "apply.hold"})
MANAGED = frozenset({"index.learned", "validation.calibration"})
"""Persisted state that a store method writes (``fit_similarity``, ``calibrate_validation``),
never set by hand."""
"""Knobs that apply to one open only and are never persisted with the store."""

LIVE = frozenset(
    {f"snapshots.{n}" for n in SnapshotSettings.model_fields}
    | {f"retention.{n}" for n in RetentionSettings.model_fields}
    | {f"index.{n}" for n in IndexSettings.model_fields}
    | {f"sampling.{n}" for n in SamplingSettings.model_fields}
    | {f"validation.{n}" for n in ValidationSettings.model_fields}
    | {f"streaming.{n}" for n in StreamingSettings.model_fields}
    | {f"health.{n}" for n in HealthSettings.model_fields}
    | {f"milvus.{n}" for n in MilvusSettings.model_fields}
    | {"records.max_record_bytes", "records.max_batch_records", "apply.batch_ops",
       "apply.interval_ms", "apply.max_overlay_ops", "wal.checkpoint_interval_s",
       "wal.retain_segments", "wal.retain_seconds"}
)  # fmt: skip
"""Knobs ``Store.reconfigure`` applies to a running store (index build knobs: at the next
build). Every other persisted knob needs a reopen: reconfigure refuses it and says so."""


def dotted(name: str) -> str:
    """The dotted name of a knob given flat or dotted; InvalidArgumentError if unknown."""
    if name in FLAT:
        return FLAT[name]
    section, _, field = name.partition(".")
    cls = SECTIONS.get(section)
    if cls is None or field not in cls.model_fields:
        raise InvalidArgumentError(f"unknown setting {name!r}", field=name)
    return name


class StoreConfig(BaseModel):
    """Settings of one store, in sections. Validated on construction; unknown keys are refused.

    Accepts nested sections (``{"index": {"ef_search": 96}}``), dotted keys
    (``{"index.ef_search": 96}``) and flat names (``{"index_ef_search": 96}``) alike.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    wal: WalSettings = WalSettings()
    records: RecordSettings = RecordSettings()
    apply: ApplySettings = ApplySettings()
    snapshots: SnapshotSettings = SnapshotSettings()
    retention: RetentionSettings = RetentionSettings()
    index: IndexSettings = IndexSettings()
    sampling: SamplingSettings = SamplingSettings()
    validation: ValidationSettings = ValidationSettings()
    streaming: StreamingSettings = StreamingSettings()
    health: HealthSettings = HealthSettings()
    milvus: MilvusSettings = MilvusSettings()

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Fold flat and dotted keys into their sections (old stores persisted flat JSON)."""
        if not isinstance(data, Mapping):
            return data
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key in SECTIONS and not (key == "retention" and _is_rules(value)):
                section = value.model_dump() if isinstance(value, BaseModel) else value
                if isinstance(section, Mapping):
                    out.setdefault(key, {}).update(section)
                else:
                    out[key] = section  # let pydantic name the bad type
                continue
            name: str = FLAT.get(key) or str(key)
            sec, _, field = name.partition(".")
            if not field:
                out[key] = value  # unknown: extra="forbid" names it
                continue
            out.setdefault(sec, {})[field] = value
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> StoreConfig:
        _check_index(self.index)
        return self

    def get(self, name: str) -> Any:
        """The value of a knob by flat or dotted name."""
        section, _, field = dotted(name).partition(".")
        return getattr(getattr(self, section), field)

    def persisted(self) -> StoreConfig:
        """The copy written into a store: session-only knobs back at their defaults."""
        return self.changed({k: _default(k) for k in SESSION_ONLY})

    def changed(self, changes: Mapping[str, Any]) -> StoreConfig:
        """A validated copy with ``changes`` (flat or dotted names) applied."""
        data = self.model_dump()
        for name, value in changes.items():
            section, _, field = dotted(name).partition(".")
            data[section][field] = value
        return make_config(**data)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> StoreConfig:
        return make_config(**json.loads(text))

    def with_overrides(self, **overrides: Any) -> StoreConfig:
        """Return a validated copy with ``overrides`` applied (None values are ignored)."""
        return self.changed({k: v for k, v in overrides.items() if v is not None})


def dotted_items(values: Mapping[str, Any] | StoreConfig) -> dict[str, Any]:
    """Knobs given by section, dotted or flat name (or a whole StoreConfig) -> dotted names."""
    data = values.model_dump() if isinstance(values, StoreConfig) else values
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS and not (key == "retention" and _is_rules(value)):
            section = value.model_dump() if isinstance(value, BaseModel) else value
            if not isinstance(section, Mapping):
                raise InvalidArgumentError(f"config {key}: expected a mapping of knobs", field=key)
            for name, v in section.items():
                out[dotted(f"{key}.{name}")] = v
        else:
            out[dotted(key)] = value
    return out


def _is_rules(value: Any) -> bool:
    """``retention={"prediction": {...}}`` (flat) rather than a retention section."""
    if isinstance(value, RetentionSettings):
        return False
    return isinstance(value, Mapping) and not set(value) & set(RetentionSettings.model_fields)


def _default(name: str) -> Any:
    section, _, field = name.partition(".")
    return SECTIONS[section].model_fields[field].default


def make_config(**values: Any) -> StoreConfig:
    """Build a StoreConfig, turning pydantic's error into InvalidArgumentError naming the knob."""
    try:
        return StoreConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidArgumentError):
            raise cause from exc
        name = ".".join(str(p) for p in err["loc"]) or "config"
        raise InvalidArgumentError(f"config {name}: {err['msg']}", field=name) from exc
