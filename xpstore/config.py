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
