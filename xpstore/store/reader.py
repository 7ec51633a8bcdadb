"""The read path: the overlay's durable layer first, then LMDB in short read transactions.

Acknowledged-but-unapplied effects live in the overlay until the applier has committed them to
LMDB, so every read looks there first. Counts and scans take their overlay snapshot *before*
reading LMDB: an effect applied in between is then seen once (the snapshot has it; LMDB's copy is
skipped or filtered by LSN), never zero times.

Retrieval counts live outside the envelopes (docs/design.md, "Retrieval counts"): every read
shows the larger of the envelope's count and the ``prio`` row's (read in the same LMDB
transaction), plus the overlay's unapplied retrieval effects logged after the state it read;
the overlay's list of those is taken first, for the same reason as the snapshot above.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from xpstore.errors import InvalidArgumentError, RecordNotFoundError
from xpstore.model.codec import KIND_CODES, decode_envelope
from xpstore.model.effects import Effect, added_retrievals, counted_envelope
from xpstore.model.records import KINDS, Experience
from xpstore.model.where import compile_where
from xpstore.ops import compaction
from xpstore.persistence.lmdb_tables import from_u64, index_key
from xpstore.store.engine import Engine

__all__ = ["Reader", "kinds_arg", "record_id"]

_SCAN_CHUNK = 512


class Reader:
    """Reads of one open store (any number of threads)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    # ------------------------------------------------------------------ records
    def get(self, rid: int) -> Experience:
        """The experience envelope of record ``rid``; RecordNotFoundError if absent or deleted."""
        self._engine.check_open()
        exp = self.read_get(record_id(rid))
        if exp is None:
            raise RecordNotFoundError(f"no record with id {rid}")
        return exp

    def get_fingerprint(self, track_id: str) -> Experience:
        """The current fingerprint envelope of ``track_id``."""
        self._engine.check_open()
        rid = self.read_track(track_id)
        if rid is None:
            raise RecordNotFoundError(f"no track {track_id!r}")
        return self.get(rid)

    def read_get(self, rid: int, *, pending: bool = False) -> Experience | None:
        """The acknowledged state of ``rid`` (None: absent or deleted); ``pending``: the newest
        state, enqueued operations included (writers deriving an operation)."""
        ov = self._engine.overlay
        counted = ov.unapplied_retrievals(pending)  # first: see the module doc
        hit = ov.writer_get(rid) if pending else ov.records.get(rid)
        if hit is not None:
            exp = hit.experience()
            if exp is not None and counted:
                _add_count(exp, added_retrievals(counted, rid, hit.lsn))
            return exp
        return self.lmdb_get(rid, counted)

    def read_track(self, track_id: str) -> int | None:
        """The id of ``track_id``'s current fingerprint (None: no such live track)."""
        hit = self._engine.overlay.tracks.get(track_id)
        if hit is not None:
            return hit.track_to
        return self.lmdb_track(track_id)

    def envelopes(
        self, ids: list[int], *, pending: bool = False, counted: bool = False
    ) -> dict[int, bytes]:
        """Encoded envelopes of the live ``ids`` (absent: missing or deleted): overlay first
        (its pending layer too with ``pending``: writers deriving), then LMDB in one read
        transaction. ``counted``: each envelope carries the record's total retrieval count
        (re-encoded where it differs; the envelopes of a rewrite being derived)."""
        ov = self._engine.overlay
        extra = ov.unapplied_retrievals(pending) if counted else []
        out: dict[int, bytes] = {}
        rest: list[int] = []
        for rid in ids:
            eff = ov.writer_get(rid) if pending else ov.records.get(rid)
            if eff is None:
                rest.append(rid)
            elif eff.value is not None:
                out[rid] = eff.value
                if extra:
                    out[rid] = counted_envelope(eff.value, 0, added_retrievals(extra, rid, eff.lsn))
        tables = self._engine.tables_or_none
        if rest and tables is not None:
            with tables.reading() as txn:
                values = tables.record_values(txn, rest)
                if counted:
                    applied = tables.applied_lsn(txn)
                    stored = tables.retrieval_counts(txn, rest)
            for rid, raw in zip(rest, values, strict=True):
                if raw is not None:
                    out[rid] = raw if not counted else counted_envelope(
                        raw, stored.get(rid, 0), added_retrievals(extra, rid, applied))
        return out

    def lmdb_get(self, rid: int, counted: list[Effect] | None = None) -> Experience | None:
        """``rid`` as LMDB holds it, with the retrieval counts of ``counted`` (the overlay's
        unapplied retrieval effects, taken before this read; None: taken here) added."""
        if counted is None:
            counted = self._engine.overlay.unapplied_retrievals()
        tables = self._engine.tables
        with tables.reading() as txn:
            raw = tables.get_record(txn, rid)
            if raw is None:
                return None
            stored = tables.retrieval_count(txn, rid)
            applied = tables.applied_lsn(txn) if counted else 0
        exp = decode_envelope(rid, raw)
        total = max(exp.retrieval_count, stored) + added_retrievals(counted, rid, applied)
        _add_count(exp, total - exp.retrieval_count)
        return exp

    def lmdb_track(self, track_id: str) -> int | None:
        tables = self._engine.tables
        with tables.reading() as txn:
            return tables.get_track(txn, track_id)

    def lmdb_tracks(self, track_ids: list[str]) -> dict[str, int | None]:
        tables = self._engine.tables_or_none
        if not track_ids or tables is None:
            return {}
        with tables.reading() as txn:
            found: dict[str, int | None] = dict.fromkeys(track_ids)
            found.update(tables.get_tracks(txn, track_ids))
            return found

    # ------------------------------------------------------------------ scans and counts
    def scan(
        self,
        kind: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
        where: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> Iterator[Experience]:
        """Experiences in (ts, id) order; ``since`` inclusive, ``until`` exclusive, on ``ts``."""
        self._engine.check_open()
        kinds = kinds_arg(kind)
        predicate = compile_where(where, kinds)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):  # fmt: skip
            raise InvalidArgumentError(f"limit must be an int >= 0, got {limit!r}", field="limit")
        return self._scan(kinds, since, until, predicate, limit)

    def _scan(
        self, kinds: tuple[str, ...], since: float | None, until: float | None,
        predicate: Any, limit: int | None,
    ) -> Iterator[Experience]:  # fmt: skip
        streams = [self._scan_kind(k, since, until) for k in kinds]
        merged = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=_order)
        produced = 0
        for exp in merged:
            if limit is not None and produced >= limit:
                return
            if predicate is None or predicate(exp):
                produced += 1
                yield exp

    def _scan_kind(
        self, kind: str, since: float | None, until: float | None
    ) -> Iterator[Experience]:
        code = KIND_CODES[kind]
        lo_ts = since if since is not None else float("-inf")
        hi_ts = until if until is not None else float("inf")
        counted = self._engine.overlay.unapplied_retrievals()  # before the records: see doc
        snapshot = dict(self._engine.overlay.records)  # before LMDB reads: see module doc
        fresh = sorted(
            (
                eff
                for eff in snapshot.values()
                if eff.value is not None and eff.kind == kind and lo_ts <= eff.ts < hi_ts
            ),
            key=lambda eff: (eff.ts, eff.record_id),
        )
        decoded = (
            _add_count(exp, added_retrievals(counted, exp.id, eff.lsn))
            for eff in fresh if (exp := eff.experience()) is not None
        )  # fmt: skip
        lo = index_key(code, lo_ts, 0)
        hi = index_key(code, hi_ts, 0) if until is not None else bytes((code + 1,))
        lmdb = self._scan_lmdb(code, lo, hi, snapshot, counted)
        yield from heapq.merge(decoded, lmdb, key=_order)

    def _scan_lmdb(
        self, code: int, lo: bytes, hi: bytes, skip: Mapping[int, object], counted: list[Effect]
    ) -> Iterator[Experience]:
        while (tables := self._engine.tables_or_none) is not None:
            stored: dict[int, int] = {}
            chunk, applied = tables.index_chunk(code, lo, hi, _SCAN_CHUNK, stored)
            for key, value in chunk:
                rid = from_u64(key[9:])
                if rid not in skip:
                    exp = decode_envelope(rid, value)
                    rc = exp.retrieval_count
                    total = max(rc, stored.get(rid, 0))
                    if counted:
                        total += added_retrievals(counted, rid, applied)
                    yield _add_count(exp, total - rc) if total != rc else exp
            if len(chunk) < _SCAN_CHUNK:
                return
            lo = chunk[-1][0] + b"\0"

    def count(self, kind: str | None = None) -> int:
        """Live records (of ``kind``), acknowledged writes included."""
        self._engine.check_open()
        kinds = kinds_arg(kind)
        tables = self._engine.tables
        deltas = self._engine.overlay.count_deltas()  # first: see Overlay.count_deltas
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
            counts = tables.counts(txn)
        total = sum(counts.get(KIND_CODES[k], 0) for k in kinds)
        return total + sum(d for lsn, k, d in deltas if lsn > applied and k in kinds)

    def stats(self) -> dict[str, Any]:
        """Counts, LSNs, WAL and LMDB sizes, durability settings: a dict for humans and --json."""
        engine = self._engine
        engine.check_open()
        tables = engine.tables
        with tables.reading() as txn:
            applied = tables.applied_lsn(txn)
        wal_files = _sizes(engine.layout.wal.glob("*.wal"))
        data_file = engine.layout.data / "data.mdb"
        out: dict[str, Any] = {
            "path": str(engine.path),
            "readonly": engine.readonly,
            "counts": {k: self.count(k) for k in KINDS},
            "applied_lsn": applied,
            "durability": engine.config.wal.durability,
            "lmdb": {
                "file_bytes": data_file.stat().st_size if data_file.exists() else 0,
                **tables.stat(),
            },
            "wal": {"segments": len(wal_files), "bytes": sum(wal_files.values())},
        }
        out["lmdb"].update(compaction.lmdb_space(tables))
        out["total"] = sum(out["counts"].values())
        wal = engine.wal
        if wal is not None:
            st = wal.stats
            out["next_lsn"] = wal.next_lsn
            out["acked_lsn"] = wal.acked_lsn
            out["unapplied_ops"] = len(engine.overlay)
            out["wal"].update(
                frames=st.frames,
                syncs=st.syncs,
                ops=st.ops,
                rotations=st.rotations,
                ops_per_sync=round(st.ops / st.syncs, 2) if st.syncs else None,
            )
        return out


def kinds_arg(kind: str | None) -> tuple[str, ...]:
    """The kinds a ``kind=`` argument selects (all when None)."""
    if kind is None:
        return KINDS
    if kind not in KINDS:
        raise InvalidArgumentError(
            f"unknown kind {kind!r}; use one of {', '.join(KINDS)}", field="kind"
        )
    return (kind,)


def record_id(value: object) -> int:
    """Check an id argument: an int; out-of-range ids simply do not exist."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(f"a record id is an int, got {value!r}", field="id")
    if not 0 < value < 1 << 63:
        raise RecordNotFoundError(f"no record with id {value}")
    return value


def _sizes(paths: Iterable[Path]) -> dict[Path, int]:
    """File sizes, skipping files a concurrent checkpoint deleted after the listing."""
    out = {}
    for path in paths:
        try:
            out[path] = path.stat().st_size
        except FileNotFoundError:
            continue
    return out


def _add_count(exp: Experience, n: int) -> Experience:
    """``exp`` (just decoded, seen by no one yet) with ``n`` more retrievals counted."""
    if n:
        object.__setattr__(exp, "retrieval_count", exp.retrieval_count + n)
    return exp


def _order(exp: Experience) -> tuple[float, int]:
    return (exp.ts, exp.id)
