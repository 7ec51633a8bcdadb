"""Replay a store's history in LSN order, read-only and in salvage fashion (``xpstore replay``).

For offline learners and audits. Every LSN is served from the best source there is:

- an LSN still in the WAL: the logged operation (put, update, delete, delete_track), with the
  commit time of its frame (``source: "wal"``);
- an LSN the WAL no longer holds (checkpointed away before the WAL start, or hidden by damage
  that LMDB already covers): the *live record* with that id from LMDB, as a put of its current
  state (``source: "lmdb"``: updates are folded in, deleted records are absent, no commit time).

Damage never stops the stream: an unreadable stretch of the log is skipped, the walk resumes at
the next valid frame (:class:`~xpstore.persistence.wal_reader.WalReader`), and a :class:`Gap` says
where it was (segment, offset), which LSNs it hid, which of them LMDB supplied, and whether any
operation is lost. Nothing is written: WAL files are read, LMDB is read in short read
transactions (the store may be in use by a live writer).

Decoding uses a fast path that turns the msgpack record map straight into the record's JSON
form (the form ``xpstore ingest`` reads) without building pydantic models: CRC-checked bytes need
no re-validation, and model construction plus ``model_dump`` cost more than the JSON itself.
:attr:`ReplayItem.record` validates on demand for library users who want the model.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb
import msgpack

from xpstore.config import StoreConfig
from xpstore.errors import InvalidRecordError, XpStoreError
from xpstore.model.codec import KIND_BY_CODE, KIND_CODES, envelope_head
from xpstore.model.records import (
    BATCH_FIELDS,
    KINDS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    Record,
    record_from_json,
)
from xpstore.ops.inspect import FRAME_CAP, concurrent_damage, writer_pid
from xpstore.persistence import fs
from xpstore.persistence.layout import Layout, read_marker
from xpstore.persistence.lmdb_tables import LmdbTables, from_u64, u64
from xpstore.persistence.wal import list_segments
from xpstore.persistence.wal_format import Frame
from xpstore.persistence.wal_reader import Damage, Gap, WalReader, scan_segment

log = logging.getLogger(__name__)

LMDB_CHUNK = 2000
"""Records read per LMDB read transaction when filling LSNs the WAL does not hold."""
_CODEC = 1
_CODEC_PUT = 2  # codec version 2: puts with a fixed header [2, 1, kind, ts, track, record map]
_OP_PUT, _OP_UPDATE, _OP_DELETE, _OP_DELETE_TRACK = 1, 2, 3, 4  # docs/formats.md, Operations
_MULTI_OPS = {5: ("priority", "priorities"), 6: ("feedback", "success"), 7: ("retrieval", "counts")}
_OP_SETTINGS = 8
_STREAMING_NAMES = {len(n): n for n in (STREAMING_FIELDS, STREAMING_FIELDS_NO_HARMONIC)}
_BATCH_LEN = len(BATCH_FIELDS)
_MAX_INDEX_JUMP = 1 << 24


class _BadData(ValueError):
    """An operation or envelope whose bytes passed their checksum but do not decode."""


# ============================================================================ items


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One operation of the history. ``data``: the record's JSON form for a put (with ``kind``
    and ``ts``: a line ``xpstore ingest`` accepts), the changed fields for an update."""

    lsn: int
    op: str  # put | update | delete | delete_track | priority | feedback | retrieval | settings
    source: str  # wal | lmdb (the current state of a record whose put left the WAL)
    commit_time: float | None = None
    id: int | None = None
    kind: str | None = None  # of the record (for update/delete: of its target, when known)
    ts: float | None = None  # the record's ts (of the target for update/delete, when known)
    data: dict[str, Any] | None = None
    track_id: str | None = None  # delete_track
    updated_lsn: int | None = None  # source lmdb: the LSN of the state shown

    @property
    def record(self) -> Record:
        """The put's record as a validated model (InvalidRecordError if it does not validate)."""
        if self.op != "put" or self.data is None:
            raise InvalidRecordError(f"LSN {self.lsn} is a {self.op}, not a put", field="op")
        return record_from_json(self.data)

    def to_json(self) -> dict[str, Any]:
        """The JSON line of ``xpstore replay`` (docs/cli.md)."""
        out: dict[str, Any] = {"lsn": self.lsn, "op": self.op}
        if self.op == "delete_track":
            out["track_id"] = self.track_id
            out["kind"] = self.kind
        else:
            out["id"] = self.id
            out["kind"] = self.kind
            out["ts"] = self.ts
        out["commit_time"] = self.commit_time
        out["source"] = self.source
        if self.updated_lsn is not None:
            out["updated_lsn"] = self.updated_lsn
        if self.op == "put":
            out["record"] = self.data
        elif self.op == "update":
            out["changes"] = self.data
        elif self.data is not None:  # priority / feedback / retrieval: ids and their values;
            # settings: the changed knobs by dotted name
            out.update(self.data)
        return out


# ============================================================================ record JSON


def _record_json(kind: str, m: Any, ts: float | None = None) -> dict[str, Any]:
    """``{"kind": ..., **fields}`` from an encoded record map (codec layout, docs/formats.md).

    Equal to ``record_to_json(decoded record)``: the map holds every non-None field in model
    order; only the fingerprint's positional arrays need their names back.
    """
    if type(m) is not dict:
        raise _BadData(f"a {kind} record must be encoded as a map")
    if kind == "fingerprint":
        m = _fingerprint_fields(m)
    out: dict[str, Any] = {"kind": kind}
    out.update(m)
    if "ts" not in out and ts is not None:
        out["ts"] = ts
    return out


def _fingerprint_fields(m: dict[str, Any]) -> dict[str, Any]:
    batch = m.get("batch")
    if batch is not None:
        if type(batch) is not list or len(batch) != _BATCH_LEN:
            raise _BadData(f"batch: expected an array of {_BATCH_LEN} numbers")
        m["batch"] = dict(zip(BATCH_FIELDS, batch, strict=True))
    streaming = m.get("streaming")
    if streaming is not None:
        try:
            values, conf, chunks = streaming
            names = _STREAMING_NAMES[len(values)]
            m["streaming"] = {
                "values": dict(zip(names, values, strict=True)),
                "confidence": dict(zip(names, conf, strict=True)),
                "chunk_count": chunks,
            }
        except (TypeError, ValueError, KeyError) as exc:
            raise _BadData(f"streaming: not [values, confidence, chunk_count] ({exc})") from exc
    return m


def _unpack(raw: bytes, what: str, newest: int = _CODEC) -> list[Any]:
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError) as exc:
        raise _BadData(f"{what}: not valid msgpack ({exc})") from exc
    if type(obj) is not list or len(obj) < 3 or obj[0] not in range(_CODEC, newest + 1):
        raise _BadData(f"{what}: not a codec-{_CODEC}..{newest} array")
    return obj


# ============================================================================ the stream


class _PutIndex:
    """Kind and ts of the puts read from the WAL, by LSN, in two flat arrays (a dict of a
    million entries would cost ~100 MB): updates and deletes name their target by id only."""

    def __init__(self) -> None:
        self.base: int | None = None
        self.kinds = bytearray()
        self.ts = array("d")

    def note(self, lsn: int, code: int, ts: float | None) -> None:
        if self.base is None:
            self.base = lsn
        i = lsn - self.base
        if i == len(self.kinds):  # the common case: the next LSN
            self.kinds.append(code)
            self.ts.append(math.nan if ts is None else ts)
            return
        if i < 0 or i - len(self.kinds) > _MAX_INDEX_JUMP:
            return
        if i >= len(self.kinds):
            grow = i + 1 - len(self.kinds)
            self.kinds.extend(bytes(grow))
            self.ts.extend([math.nan] * grow)
        self.kinds[i] = code
        self.ts[i] = math.nan if ts is None else ts

    def get(self, rid: int) -> tuple[str, float | None] | None:
        if self.base is None:
            return None
        i = rid - self.base
        if not 0 <= i < len(self.kinds) or self.kinds[i] == 0:
            return None
        ts = self.ts[i]
        return KIND_BY_CODE[self.kinds[i]], None if math.isnan(ts) else ts


GapCallback = Callable[[Gap], None]


@dataclass(slots=True)
class ReplayStats:
    wal_ops: int = 0
    lmdb_records: int = 0
    emitted: int = 0
    applied_lsn: int = 0
    wal_first_lsn: int | None = None
    wal_end_lsn: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "wal_ops": self.wal_ops,
            "lmdb_records": self.lmdb_records,
            "emitted": self.emitted,
            "applied_lsn": self.applied_lsn,
            "wal_first_lsn": self.wal_first_lsn,
            "wal_end_lsn": self.wal_end_lsn,
        }


@dataclass(slots=True)
class _Filter:
    lo: int
    hi: int | None
    kinds: frozenset[str] | None
    since: float | None
    until: float | None

    def kind_ok(self, kind: str | None) -> bool:
        return self.kinds is None or kind in self.kinds

    def ts_ok(self, ts: float | None) -> bool:
        if self.since is None and self.until is None:
            return True
        if ts is None:
            return False
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)


class ReplayStream:
    """Iterator of :class:`ReplayItem` in LSN order; ``gaps`` and ``stats`` fill as it runs.

    Use as a context manager (or exhaust it) so its read-only LMDB handle is released.
    """

    def __init__(
        self,
        store_path: Path,
        *,
        flt: _Filter,
        on_gap: GapCallback | None = None,
    ) -> None:
        self.path = store_path
        self.gaps: list[Gap] = []
        self.stats = ReplayStats()
        self._flt = flt
        self._on_gap = on_gap
        lay = Layout(store_path)
        self._store_id = read_marker(lay).store_id
        self._wal_dir = lay.wal
        self._tables: LmdbTables | None = None
        self._lmdb_error: str | None = None
        max_frame = FRAME_CAP
        try:
            map_size = StoreConfig().apply.map_size
            self._tables = LmdbTables(lay.data, readonly=True, map_size=map_size)
            max_frame = self._read_config_max_frame()
            with self._tables.reading() as txn:
                self.stats.applied_lsn = self._tables.applied_lsn(txn)
        except (XpStoreError, lmdb.Error) as exc:
            self._lmdb_error = str(exc)
        self._writer_live = writer_pid(store_path) is not None
        self._reader = WalReader(
            lay.wal, store_id=self._store_id, max_frame_bytes=max_frame,
            follow=self._writer_live,
        )
        self._puts = _PutIndex()
        self._gen: Generator[ReplayItem, None, None] = self._generate()

    def _read_config_max_frame(self) -> int:
        assert self._tables is not None
        with self._tables.reading() as txn:
            raw = self._tables.get_meta(txn, "config")
        try:
            return StoreConfig.from_json(raw.decode()).wal.max_frame_bytes if raw else FRAME_CAP
        except (ValueError, UnicodeDecodeError):
            return FRAME_CAP

    def last_lsn_hint(self) -> int:
        """The last LSN the store holds as far as a quick look tells: LMDB's ``applied_lsn`` or
        the newest WAL segment's last valid frame. What a progress bar needs as its total; a
        live writer moves it on meanwhile."""
        last = self.stats.applied_lsn
        segments = list_segments(self._wal_dir) if self._wal_dir.is_dir() else []
        if segments:
            first, path = segments[-1]
            try:
                scan = scan_segment(path, fs.read_bytes(path), FRAME_CAP)
            except OSError:
                return max(last, first - 1)
            end = scan.frames[-1].last_lsn if scan.frames else first - 1
            last = max(last, end)
        return last

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> ReplayStream:
        return self

    def __next__(self) -> ReplayItem:
        return next(self._gen)

    def __enter__(self) -> ReplayStream:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._gen.close()
        self._release()

    def _release(self) -> None:
        if self._tables is not None:
            self._tables.close()
            self._tables = None

    @property
    def lost(self) -> bool:
        """Whether any operation in the range could be read from no source."""
        return any(g.lost for g in self.gaps)

    def _generate(self) -> Generator[ReplayItem, None, None]:
        try:
            if self._lmdb_error is not None:
                self._gap(Gap("lmdb", "lmdb_unreadable", self._lmdb_error, None, None,
                              lost=True))
            yield from self._run()
        finally:
            self._release()

    def _run(self) -> Iterator[ReplayItem]:
        flt = self._flt
        cursor = flt.lo
        for item in self._reader:
            if isinstance(item, Damage):
                self._damage(item)
                continue
            if item.last_lsn < cursor:
                continue
            if flt.hi is not None and item.first_lsn > flt.hi:
                break
            if item.first_lsn > cursor:
                yield from self._from_lmdb(cursor, item.first_lsn - 1)
            yield from self._frame_items(item, cursor)
            cursor = item.last_lsn + 1
        self.stats.wal_first_lsn = self._reader.first_lsn
        self.stats.wal_end_lsn = self._reader.end_lsn
        if flt.hi is None or cursor <= flt.hi:
            yield from self._from_lmdb(cursor, flt.hi)

    # ------------------------------------------------------------ gaps
    def _damage(self, dmg: Damage) -> None:
        """Report the gap a damage event leaves in the range asked for, and what LMDB covers."""
        first, last = dmg.first_lsn, dmg.last_lsn
        if first is not None and not self._in_range(first, last):
            return
        applied = self._refresh_applied()
        self._gap(Gap.of(dmg, applied_lsn=applied, lmdb=self._tables is not None,
                         concurrent=concurrent_damage(dmg, self._writer_live)))

    def _refresh_applied(self) -> int:
        """applied_lsn now: a live writer's checkpoint may have moved LSNs into LMDB since."""
        if self._tables is not None:
            try:
                with self._tables.reading() as txn:
                    self.stats.applied_lsn = self._tables.applied_lsn(txn)
            except (lmdb.Error, XpStoreError):
                pass  # keep the value read at the start
        return self.stats.applied_lsn

    def _in_range(self, first: int, last: int | None) -> bool:
        hi = self._flt.hi
        return (last is None or last >= self._flt.lo) and (hi is None or first <= hi)

    def _gap(self, gap: Gap) -> None:
        self.gaps.append(gap)
        log.debug("replay %s", gap.describe())
        if self._on_gap is not None:
            self._on_gap(gap)

    # ------------------------------------------------------------ WAL
    def _frame_items(self, frame: Frame, cursor: int) -> Iterator[ReplayItem]:
        hi = self._flt.hi
        for i, raw in enumerate(frame.ops()):
            lsn = frame.first_lsn + i
            if lsn < cursor:
                continue
            if hi is not None and lsn > hi:
                return
            self.stats.wal_ops += 1
            try:
                item = self._op_item(raw, lsn, frame.commit_time)
            except _BadData as exc:
                yield from self._bad_op(frame, lsn, str(exc))
                continue
            if item is not None and self._flt.kind_ok(item.kind) and self._flt.ts_ok(item.ts):
                self.stats.emitted += 1
                yield item

    def _bad_op(self, frame: Frame, lsn: int, detail: str) -> Iterator[ReplayItem]:
        """A checksummed operation that does not decode: report it, take LMDB's record if any."""
        applied = self.stats.applied_lsn
        in_lmdb = lsn <= applied and self._tables is not None
        assert self._reader.segment is not None  # the segment of the frame being streamed
        where = f"wal/{self._reader.segment.name}+{frame.offset}"
        self._gap(Gap(where, "bad_operation", detail, lsn, lsn,
                      (lsn, lsn) if in_lmdb else None, not in_lmdb))
        if in_lmdb:
            yield from self._from_lmdb(lsn, lsn)

    def _op_item(self, raw: bytes, lsn: int, commit: float) -> ReplayItem | None:
        """Decode one WAL operation; None when the filters exclude a put (cheap early exit)."""
        obj = _unpack(raw, f"operation at LSN {lsn}", _CODEC_PUT)
        code = obj[1]
        if obj[0] == _CODEC_PUT:
            if code != _OP_PUT or len(obj) != 6:
                raise _BadData(f"operation at LSN {lsn}: codec 2 is for puts only")
            return self._put_item([obj[0], code, obj[2], obj[5]], lsn, commit)
        if code == _OP_PUT and len(obj) == 4:
            return self._put_item(obj, lsn, commit)
        if code == _OP_UPDATE and len(obj) == 4 and type(obj[2]) is int:
            if type(obj[3]) is not dict:
                raise _BadData(f"update at LSN {lsn}: changes must be a map")
            kind, ts = self._target(obj[2])
            return ReplayItem(lsn, "update", "wal", commit, obj[2], kind, ts, data=obj[3])
        if code == _OP_DELETE and len(obj) == 3 and type(obj[2]) is int:
            kind, ts = self._target(obj[2])
            return ReplayItem(lsn, "delete", "wal", commit, obj[2], kind, ts)
        if code == _OP_DELETE_TRACK and len(obj) == 3 and type(obj[2]) is str:
            return ReplayItem(lsn, "delete_track", "wal", commit, kind="fingerprint",
                              track_id=obj[2])
        multi = _MULTI_OPS.get(code) if type(code) is int else None
        if multi is not None and len(obj) in (4, 5) and type(obj[2]) is list:
            name, values = multi
            data: dict[str, Any] = {"ids": obj[2], values: obj[3]}
            if name == "feedback" and len(obj) == 5:
                data["count_retrieval"] = obj[4]
            return ReplayItem(lsn, name, "wal", commit, data=data)
        if code == _OP_SETTINGS and len(obj) == 4 and type(obj[2]) is dict:
            return ReplayItem(lsn, "settings", "wal", commit, data={"changes": obj[2]})
        raise _BadData(f"operation at LSN {lsn}: unknown op code {code!r} or wrong length")

    def _put_item(self, obj: list[Any], lsn: int, commit: float) -> ReplayItem | None:
        kind = KIND_BY_CODE.get(obj[2]) if type(obj[2]) is int else None
        m = obj[3]
        if kind is None or type(m) is not dict:
            raise _BadData(f"put at LSN {lsn}: bad kind code {obj[2]!r} or record map")
        raw_ts = m.get("ts")
        ts = float(raw_ts) if isinstance(raw_ts, int | float) else None
        self._puts.note(lsn, obj[2], ts)
        if not (self._flt.kind_ok(kind) and self._flt.ts_ok(ts)):
            return None
        return ReplayItem(lsn, "put", "wal", commit, lsn, kind, ts, data=_record_json(kind, m))

    def _target(self, rid: int) -> tuple[str | None, float | None]:
        """Kind and ts of an update/delete target: WAL puts seen, live LMDB, tombstones."""
        hit = self._puts.get(rid)
        if hit is not None:
            return hit
        tables = self._tables
        if tables is None:
            return None, None
        try:
            with tables.reading() as txn:
                raw = tables.get_record(txn, rid)
                tomb = txn.get(u64(rid), db=tables.db(b"tombstones"))
        except (lmdb.Error, XpStoreError):
            return None, None  # the kind stays unknown; a damaged LMDB is reported when read
        head = envelope_head(raw) if raw is not None else None
        if head is not None:
            return KIND_BY_CODE.get(head[0]), head[1]
        if tomb is not None and len(tomb) == 9:
            return KIND_BY_CODE.get(tomb[8]), None
        return None, None

    # ------------------------------------------------------------ LMDB
    def _from_lmdb(self, lo: int, hi: int | None) -> Iterator[ReplayItem]:
        """Live records with ids in lo..hi (hi None: all), as puts of their current state."""
        if self._tables is None:
            return
        start = lo
        while True:
            try:
                rows = self._lmdb_rows(start, hi)
            except (lmdb.Error, XpStoreError) as exc:  # damaged pages: salvage the WAL only
                self._gap(Gap("lmdb", "lmdb_unreadable", f"{type(exc).__name__}: {exc}",
                              start, hi, lost=True))
                self._release()
                return
            for rid, value in rows:
                item = self._lmdb_item(rid, value)
                if item is not None:
                    self.stats.emitted += 1
                    yield item
            if len(rows) < LMDB_CHUNK:
                return
            start = rows[-1][0] + 1

    def _lmdb_rows(self, start: int, hi: int | None) -> list[tuple[int, bytes]]:
        tables = self._tables
        if tables is None:
            return []
        rows: list[tuple[int, bytes]] = []
        with tables.reading() as txn:
            cur = txn.cursor(db=tables.db(b"records"))
            if not cur.set_range(u64(start)):
                return rows
            for key, value in cur.iternext():
                rid = from_u64(bytes(key))
                if hi is not None and rid > hi:
                    break
                rows.append((rid, bytes(value)))
                if len(rows) >= LMDB_CHUNK:
                    break
        return rows

    def _lmdb_item(self, rid: int, value: bytes) -> ReplayItem | None:
        self.stats.lmdb_records += 1
        try:
            kind, ts, updated, m = _envelope_parts(value, rid)
            if not (self._flt.kind_ok(kind) and self._flt.ts_ok(ts)):
                return None
            data = _record_json(kind, m, ts)
        except _BadData as exc:
            self._gap(Gap(f"lmdb records id={rid}", "bad_record", str(exc), rid, rid, lost=True))
            return None
        return ReplayItem(rid, "put", "lmdb", None, rid, kind, ts, data=data, updated_lsn=updated)


def _envelope_parts(value: bytes, rid: int) -> tuple[str, float, int, Any]:
    """(kind, ts, updated_lsn, record map) of an LMDB envelope (docs/formats.md)."""
    obj = _unpack(value, f"LMDB record {rid}")
    if len(obj) not in (7, 8):
        raise _BadData(f"LMDB record {rid}: expected 7 or 8 items, got {len(obj)}")
    _v, code, ts, updated, _rc, _sc, m = obj[:7]
    kind = KIND_BY_CODE.get(code) if type(code) is int else None
    if kind is None or type(ts) not in (int, float) or type(updated) is not int:
        raise _BadData(f"LMDB record {rid}: bad kind code {code!r}, ts {ts!r} or updated_lsn")
    return kind, float(ts), updated, m

def replay(
    store_path: str | Path,
    *,
    from_lsn: int | None = None,
    to_lsn: int | None = None,
    kinds: Iterable[str] | None = None,
    since: float | None = None,
    until: float | None = None,
    on_gap: GapCallback | None = None,
) -> ReplayStream:
    """Stream the operations of the store at ``store_path`` in LSN order (read-only).

    ``from_lsn``/``to_lsn`` are inclusive; ``kinds`` keeps operations on records of those kinds
    (an update/delete whose target's kind is unknown is dropped; delete_track counts as
    fingerprint); ``since`` (inclusive) and ``until`` (exclusive) filter on the record's ``ts``
    (the target's for update/delete; delete_track has none and is dropped by a time filter).
    ``on_gap`` is called with each :class:`Gap` as it is found; ``stream.gaps`` keeps them all.
    Raises InvalidRecordError for a bad range, StoreNotFoundError / FormatVersionError when the
    path is not a readable store.
    """
    flt = _make_filter(from_lsn, to_lsn, kinds, since, until)
    return ReplayStream(Path(store_path), flt=flt, on_gap=on_gap)


def _make_filter(
    from_lsn: int | None,
    to_lsn: int | None,
    kinds: Iterable[str] | None,
    since: float | None,
    until: float | None,
) -> _Filter:
    for name, value in (("from_lsn", from_lsn), ("to_lsn", to_lsn)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise InvalidRecordError(f"{name} must be an LSN >= 0, got {value!r}", field=name)
    if from_lsn is not None and to_lsn is not None and from_lsn > to_lsn:
        raise InvalidRecordError(
            f"from_lsn {from_lsn} is after to_lsn {to_lsn}: the range is empty", field="from_lsn"
        )
    kind_set = frozenset(kinds) if kinds is not None else None
    if kind_set is not None:
        unknown = sorted(k for k in kind_set if k not in KIND_CODES)
        if unknown:
            raise InvalidRecordError(
                f"unknown kind {unknown[0]!r}; use one of {', '.join(KINDS)}", field="kind"
            )
    if since is not None and until is not None and since >= until:
        raise InvalidRecordError(f"since {since} is not before until {until}", field="since")
    return _Filter(max(1, from_lsn or 1), to_lsn, kind_set or None, since, until)


__all__ = ["Gap", "ReplayItem", "ReplayStats", "ReplayStream", "replay"]

