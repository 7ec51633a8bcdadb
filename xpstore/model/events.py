"""The acknowledgement path's types: what a group commit hands to the overlay's subscribers.

When the WAL leader makes a group of operations durable, the overlay publishes one
:class:`Acknowledged` batch (its effects in LSN order, and the index rows the writer computed for
its fingerprints) to every subscriber before any writer of the batch returns. Subscribers (the
k-NN index, the sampler) read it and never change it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from xpstore.model.effects import Effect

__all__ = ["Acknowledged", "BulkEvent", "IndexRow", "IndexRows", "RawFingerprint", "TrackEvent"]


@dataclass(slots=True)
class RawFingerprint:
    """One fingerprint's numbers and the fields a neighbour list shows."""

    track_id: str
    audio: npt.NDArray[np.float64]  # (25,) in BATCH_FIELDS order, NaN = missing
    embedding: npt.NDArray[np.float32] | None
    metadata: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class IndexRow:
    """A fingerprint's k-NN entry, computed by the writer before it takes any lock.

    ``vector`` was embedded under embedder ``generation``; the index re-embeds ``raw`` when its
    generation has moved on since (a swap happened in between).
    """

    raw: RawFingerprint
    vector: npt.NDArray[np.float32]
    generation: int


@dataclass(frozen=True, slots=True)
class IndexRows:
    """The k-NN entries of one ``put_fingerprints`` batch, in columns (consecutive LSNs from
    the batch's first): what the writer computed before taking any lock, fed to the index in
    one call on the acknowledgement path."""

    track_ids: Sequence[str]
    audio: npt.NDArray[np.float64]  # (n, 25) in BATCH_FIELDS order, NaN = missing
    embedding: npt.NDArray[np.float32] | None  # (n, D), rows without one are zero
    has_embedding: npt.NDArray[np.bool_] | None
    vectors: npt.NDArray[np.float32]  # (n, dim)
    generation: int

    def __len__(self) -> int:
        return len(self.track_ids)


@dataclass(frozen=True, slots=True)
class BulkEvent:
    """A run of new current fingerprints ``first_lsn ..`` (:class:`IndexRows`) and the ids they
    retire, as ``(lsn, id)`` in LSN order (a retired id may be one of the run's own rows)."""

    first_lsn: int
    rows: IndexRows
    retired: list[tuple[int, int]]


@dataclass(frozen=True, slots=True)
class TrackEvent:
    """One acknowledged change of a track's current fingerprint.

    ``retired`` stops being the track's current fingerprint (None: nothing retires), ``current``
    becomes it (None: the track is gone). ``value`` is the envelope of ``current``; ``row`` its
    precomputed index entry when the writer had one.
    """

    lsn: int
    track: str
    retired: int | None
    current: int | None
    value: bytes | None
    row: IndexRow | None


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """The effects one group commit made durable, in LSN order, and their index rows by LSN."""

    effects: Sequence[Effect]
    rows: Mapping[int, IndexRow]
    bulk: Mapping[int, IndexRows] = field(default_factory=dict)
    """Columnar index rows of ``put_fingerprints`` batches, by their first LSN."""

    @property
    def last_lsn(self) -> int:
        return self.effects[-1].lsn if self.effects else 0

    def record_ids(self) -> list[int]:
        """Ids whose stored state changed (put, update, delete, counters)."""
        return [e.record_id for e in self.effects if e.record_id is not None]

    def track_events(self) -> list[TrackEvent]:
        """The track-map changes of the batch, in LSN order."""
        out = []
        for eff in self.effects:
            if eff.track is None:
                continue
            retired, current = eff.track_from, eff.track_to
            if retired is not None and retired == current:
                retired = None
            value = eff.value if current is not None and eff.record_id == current else None
            out.append(TrackEvent(eff.lsn, eff.track, retired, current, value,
                                  self.rows.get(eff.lsn)))  # fmt: skip
        return out

    def track_segments(self) -> list[list[TrackEvent] | BulkEvent]:
        """The track-map changes in LSN order, with each ``put_fingerprints`` run as one
        :class:`BulkEvent` (no event object per row) between lists of single events."""
        if not self.bulk:
            return [self.track_events()]
        out: list[list[TrackEvent] | BulkEvent] = []
        singles: list[TrackEvent] = []
        run: BulkEvent | None = None
        end = -1
        for eff in self.effects:
            lsn = eff.lsn
            rows = self.bulk.get(lsn)
            if rows is not None:
                if singles:
                    out.append(singles)
                    singles = []
                run = BulkEvent(lsn, rows, [])
                out.append(run)
                end = lsn + len(rows)
            if run is not None and lsn < end:
                retired = eff.track_from
                if retired is not None and retired != eff.track_to:
                    run.retired.append((lsn, retired))
                continue
            if eff.track is None:
                continue
            retired, current = eff.track_from, eff.track_to
            if retired is not None and retired == current:
                retired = None
            value = eff.value if current is not None and eff.record_id == current else None
            singles.append(TrackEvent(lsn, eff.track, retired, current, value,
                                      self.rows.get(lsn)))  # fmt: skip
        if singles:
            out.append(singles)
        return out
