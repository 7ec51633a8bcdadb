"""The changes the applier hands :class:`~xpstore.persistence.lmdb_tables.LmdbTables` to
apply in one transaction: records put or deleted, track map entries, settings, a columnar run
of new records (the ingest fast path), and retrieval counts to log. Plain data, in LSN order;
what each one does to which table is ``LmdbTables.apply``'s."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "Change",
    "MetaSet",
    "NewRecords",
    "RecordDelete",
    "RecordPut",
    "RetrievalCounts",
    "TrackDelete",
    "TrackSet",
]


@dataclass(slots=True)
class RecordPut:
    id: int
    kind_code: int
    ts: float
    value: bytes
    is_new: bool  # a new id (count and index it) or a rewrite of an existing one
    prio: bytes | None = None  # its priority-input row (store/priority.py); None: unchanged


@dataclass(slots=True)
class RecordDelete:
    id: int
    kind_code: int
    ts: float
    lsn: int


@dataclass(slots=True)
class TrackSet:
    track_id: str
    id: int


@dataclass(slots=True)
class TrackDelete:
    track_id: str
    lsn: int
    former_id: int


@dataclass(slots=True)
class MetaSet:
    """Set a ``meta`` entry in the same transaction (a logged settings change)."""

    key: str
    value: bytes


@dataclass(slots=True)
class NewRecords:
    """A run of new records in columns (the ingest fast path: keys are built with numpy and
    each table gets one ``putmulti``), with the track map entries they set, in LSN order."""

    ids: list[int]
    kind_codes: list[int]
    ts: list[float]
    values: list[bytes]
    prio: list[bytes | None]
    tracks: list[tuple[bytes, bytes]]  # (track id, u64 record id)
    fprows: list[bytes | None] | None = None  # rows the writer computed (None: from values)

    def expand(self) -> list[RecordPut | TrackSet]:
        """The same changes one by one (for a batch that also holds deletes or settings)."""
        out: list[RecordPut | TrackSet] = [
            RecordPut(rid, code, ts, value, True, prio)
            for rid, code, ts, value, prio in zip(
                self.ids, self.kind_codes, self.ts, self.values, self.prio, strict=True
            )
        ]
        out += [TrackSet(key.decode(), int.from_bytes(value, "big")) for key, value in self.tracks]
        return out


@dataclass(slots=True)
class RetrievalCounts:
    """Retrievals to add to records' counts (a ``RetrievalOp`` at ``lsn``): in place in their
    ``prio`` rows (docs/design.md, "Retrieval counts")."""

    lsn: int
    counts: Mapping[int, int]  # id -> count to add


Change = (
    RecordPut | RecordDelete | TrackSet | TrackDelete | MetaSet | NewRecords | RetrievalCounts
)
