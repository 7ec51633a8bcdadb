"""StoreConfig: every knob of a store, its default and its valid range.

The config is persisted in the store when it is created (LMDB ``meta/config``) so that every later
open, the CLI's included, runs with the same settings. Per-open overrides (``Store.open(...,
durability="group")``) apply to that session only and are not written back.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xpstore.errors import InvalidRecordError

Durability = Literal["commit", "group", "none"]
RecoveryMode = Literal["tolerate_tail", "absolute", "point_in_time"]

MiB = 1024 * 1024
SESSION_ONLY = frozenset({"hold_applier", "recovery_mode"})
"""Knobs that apply to one open only and are never persisted with the store."""


class RetentionRule(BaseModel):
    """Keep at most ``max_count`` records of a kind and/or none older than ``max_age_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_count: int | None = Field(None, ge=0)
    max_age_s: float | None = Field(None, gt=0)


class StoreConfig(BaseModel):
    """Settings of one store. Validated on construction; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    durability: Durability = "commit"
    """``commit``: put returns after an fsync covering it; ``group``: after write(), fsync every
    ``group_commit_ms`` (an OS crash may lose that window); ``none``: never fsync (scratch)."""
    recovery_mode: RecoveryMode = "tolerate_tail"
    group_commit_ms: float = Field(2.0, gt=0, le=1000)
    segment_max_bytes: int = Field(64 * MiB, ge=64 * 1024, le=4096 * MiB)
    max_record_bytes: int = Field(1 * MiB, ge=1024, le=256 * MiB)
    max_frame_bytes: int = Field(64 * MiB, ge=64 * 1024, le=1024 * MiB)
    max_batch_records: int = Field(100_000, ge=1, le=10_000_000)
    apply_batch_ops: int = Field(10_000, ge=1, le=1_000_000)
    """The applier moves at most this many acknowledged operations into LMDB per transaction."""
    apply_interval_ms: float = Field(200.0, gt=0, le=60_000)
    hold_applier: bool = False
    """Keep acknowledged operations in the WAL and the overlay only (tests, recovery benchmarks)."""
    max_overlay_ops: int = Field(1_000_000, ge=1_000)
    """Back-pressure: writers wait when this many acknowledged operations are not yet applied."""
    map_size: int = Field(256 * MiB, ge=1 * MiB)
    """Initial LMDB map size; it doubles on MapFullError."""
    checkpoint_interval_s: float = Field(30.0, gt=0)
    wal_retain_segments: int = Field(0, ge=0)
    """Segments at or below applied_lsn kept by checkpoints (for later point-in-time restore)."""
    wal_retain_seconds: float = Field(0.0, ge=0)
    """Segments younger than this are kept by checkpoints (point-in-time restore window)."""
    snapshot_dir: str | None = None
    """Where snapshots live; None: ``<store>/snapshots``."""
    snapshot_every_records: int | None = Field(None, ge=1)
    """Take a snapshot automatically after this many acknowledged operations."""
    snapshot_every_seconds: float | None = Field(None, gt=0)
    """Take a snapshot automatically this often (when anything changed)."""
    snapshot_keep: int | None = Field(None, ge=1)
    """After an automatic snapshot, prune to this many (None: keep all)."""
    retention: dict[Literal["prediction", "fingerprint", "query_metric"], RetentionRule] = {}
    """Per-kind retention, enforced by evicting through the WAL like deletes."""
    retention_interval_s: float = Field(60.0, gt=0)
    embedding_dim: int | None = Field(None, ge=1, le=65_536)
    """Fixed dimension of Fingerprint.embedding; None: fixed by the first fingerprint with one."""

    # ------------------------------------------------------------ k-NN index (docs/index.md)
    index_mode: Literal["percentile", "zscore"] = "percentile"
    """Standardization of the 25 audio values (Auralis's 5th-95th percentile range, or std)."""
    index_audio_weight: float = Field(0.7, ge=0, le=1000)
    index_embedding_weight: float = Field(0.3, ge=0, le=1000)
    index_dim_weights: dict[str, float] | None = None
    """Per-dimension audio weights by name (all 25); None: the mode's default."""
    index_exact_below: int = Field(10_000, ge=0)
    """Below this many tracks the main index is exact (``IDMap2,Flat``)."""
    index_hnsw_below: int = Field(2_000_000, ge=0)
    """Below this many (and from ``index_exact_below``) HNSW; from here IVF-Flat."""
    index_hnsw_m: int = Field(32, ge=4, le=256)
    index_ef_construction: int = Field(128, ge=80, le=4096)
    index_ef_search: int = Field(64, ge=1, le=32_768)
    index_nprobe: int = Field(32, ge=1, le=65_536)
    index_delta_min: int = Field(256, ge=1)
    index_delta_ratio: float = Field(0.1, gt=0, le=10)
    index_delta_max: int = Field(10_000, ge=1)
    """Rebuild when the delta holds min(delta_max, max(delta_min, delta_ratio * index size))."""
    index_tombstone_ratio: float = Field(0.2, gt=0, le=1)
    """Rebuild when tombstones reach this share of the main index (and at least 64)."""
    index_drift_max: float = Field(0.5, gt=0)
    """Rebuild when the delta's means moved this many scale units from the index's stats."""
    index_auto_rebuild: bool = True
    index_build_in: Literal["auto", "thread", "process"] = "auto"
    index_process_above: int = Field(20_000, ge=0)
    """``auto`` builds in a child process from this many tracks (a thread below)."""
    index_query_threads: int = Field(1, ge=1, le=256)
    """FAISS OpenMP threads of a single-query search (1: OpenMP's fork/join costs a single
    query more than it saves, and far more on a busy machine; benchmarks.md)."""
    index_build_threads: int = Field(1, ge=1, le=256)
    """FAISS threads of a build: leave the other cores to queries."""
    index_neighbors_k: int = Field(10, ge=0, le=1000)
    """Neighbours materialized per track in LMDB after each build (0: none)."""
    index_refresh_s: float = Field(1.0, ge=0)
    """A read-only store catches its index up with LMDB at most this often."""

    # ------------------------------------------------------------ sampling (docs/sampling.md)
    priority_alpha: float = Field(0.6, ge=0, le=10)
    """P(i) = p_i**alpha / sum p**alpha (0: uniform)."""
    priority_beta: float = Field(0.4, ge=0, le=1)
    """Importance-weight exponent when ``sample(beta=None)``."""
    priority_w_confidence: float = Field(0.4, ge=0, le=1000)
    priority_w_reward: float = Field(0.4, ge=0, le=1000)
    priority_w_age: float = Field(0.2, ge=0, le=1000)
    priority_floor: float = Field(0.01, gt=0, le=1000)
    priority_age_half_life_s: float = Field(7 * 86400.0, gt=0)
    priority_value_weight: float = Field(0.5, ge=0, le=1)
    """How far the Laplace-smoothed success rate moves priority: factor in [1-w, 1+w]."""
    new_item_priority: float = Field(1.0, ge=0, le=1e6)
    """Never-sampled items get at least this priority."""
    sample_flush_retrievals: int = Field(4096, ge=1)
    """Retrieval counts bumped by sample() are logged once this many are pending (and at close)."""

    def persisted(self) -> StoreConfig:
        """The copy written into a new store: session-only knobs back at their defaults."""
        defaults = {k: StoreConfig.model_fields[k].default for k in SESSION_ONLY}
        return self.model_copy(update=defaults)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> StoreConfig:
        return cls.model_validate(json.loads(text))

    def with_overrides(self, **overrides: Any) -> StoreConfig:
        """Return a validated copy with ``overrides`` applied (None values are ignored)."""
        data = self.model_dump()
        data.update({k: v for k, v in overrides.items() if v is not None})
        return make_config(**data)


def make_config(**values: Any) -> StoreConfig:
    """Build a StoreConfig, turning pydantic's error into InvalidRecordError naming the knob."""
    try:
        return StoreConfig(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "config"
        raise InvalidRecordError(f"config {name}: {err['msg']}", field=name) from exc
