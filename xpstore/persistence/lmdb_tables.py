"""LMDB, the source of truth: the tables, their keys, batched apply, map growth, error mapping.

Tables (named databases of one environment; layouts in ``docs/formats.md``):

``meta``         ``applied_lsn``, ``config``, ``embedding_dim``, per-kind live counts
``records``      id (u64 BE) -> encoded :class:`~xpstore.model.records.Experience`
``by_kind_ts``   kind u8 | sortable ts (8 B) | id u64 BE -> empty: time-ordered scans per kind
``tracks``       track_id (UTF-8) -> id of the track's current fingerprint
``tombstones``   id -> lsn of the delete | kind u8 (so followers can catch up after truncation)
``track_tombs``  track_id -> lsn of the delete_track | id of the fingerprint it retired
``neighbors``    track_id -> a track's precomputed nearest neighbours (``index.neighbors``);
                 derived data written after each index build, never through the WAL
``prio``         id -> the record's 40-byte priority-input row (``model.priority_rows``), written in
                 the same transaction as the record; what sampling trees are rebuilt from. Its
                 ``retrieval_count`` plus the record's unfolded ``retrievals`` is the record's
                 count: retrievals are never added by rewriting the envelope
``retrievals``   LSN -> one logged flush of retrieval counts (ids, counts), until it is folded
                 into the ``prio`` rows (:mod:`xpstore.persistence.retrievals`)
``fprows``       id -> a fingerprint record's fixed-width row of numbers (``model.fprows``),
                 written in the same transaction as the record; what the k-NN index attaches
                 from without decoding envelopes. Complete (one row per fingerprint record)
                 once ``meta`` holds ``fprows``: new stores from their creation, older ones
                 after :meth:`LmdbTables.fill_fprows`

LMDB rules followed here (from its docs and py-lmdb's issues): one Environment per path per
process (the registry below), ``reader_check()`` on open, every write transaction inside ``with``,
``MapFullError`` -> abort, double the map, retry, with no transaction of this process open
(readers hold :meth:`LmdbTables.reading`, the resize takes it exclusively), and
``MapResizedError`` in a reader -> ``set_mapsize(0)`` and retry. ``sync=True, metasync=False``:
data pages are synced at every commit, the meta page lazily; after a power loss LMDB may fall
back to the previous transaction, whose ``applied_lsn`` is older, and the WAL replays the
difference. Before WAL segments are deleted the checkpoint calls ``env.sync(True)``.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import lmdb
import numpy as np

from xpstore.errors import StoreCorruptionError, XpStoreError
from xpstore.model.fprows import FP_CODE, rows_or_none
from xpstore.model.priority_rows import INPUT_DTYPE
from xpstore.model.progress import ProgressFn
from xpstore.persistence.lmdb_changes import (
    Change,
    MetaSet,
    NewRecords,
    RecordDelete,
    RecordPut,
    RetrievalCounts,
    TrackDelete,
    TrackSet,
)
from xpstore.persistence.lmdb_datafile import DATA_FILE
from xpstore.persistence.lmdb_env import REGISTRY, translate
from xpstore.persistence.retrievals import RetrievalLog, add_in_place

log = logging.getLogger(__name__)

T = TypeVar("T")

_U64 = struct.Struct(">Q")
_TOMB = struct.Struct(">QB")
_TRACK_TOMB = struct.Struct(">QQ")
_U32_MAX = (1 << 32) - 1
_RC = struct.Struct("<I")
_RC_AT = 28  # offset of retrieval_count in a prio row (model/priority_rows.py)
_DB_NAMES = (b"meta", b"records", b"by_kind_ts", b"tracks", b"tombstones", b"track_tombs")
# added by later issues: a read-only open of an older store lacks them, and that is not damage
_OPTIONAL_DBS = (b"neighbors", b"prio", b"fprows", b"retrievals")
_MAX_DBS = len(_DB_NAMES) + len(_OPTIONAL_DBS) + 2


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return int(_U64.unpack(b)[0])


def ts_key(ts: float) -> bytes:
    """8 bytes whose unsigned order is the float order (negative values included)."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", ts))
    bits = bits ^ 0xFFFFFFFFFFFFFFFF if bits >> 63 else bits | (1 << 63)
    return _U64.pack(bits)


def index_key(kind_code: int, ts: float, rid: int) -> bytes:
    return bytes((kind_code,)) + ts_key(ts) + _U64.pack(rid)


FPROWS_KEY = b"fprows"
FPROWS_COMPLETE = b"1"


@dataclass(frozen=True, slots=True)
class LiveRows(Generic[T]):
    """What :meth:`LmdbTables.read_live_rows` read in one transaction: the ``tracks`` table's
    keys (track ids, decoded, in key order) and its values joined (u64 BE record ids, aligned),
    the ``fprows`` rows decoded chunk by chunk (none when the table is not ``complete``), and
    the ``fpstats`` meta entry (None: none) and the fingerprint count of ``meta``."""

    applied_lsn: int
    complete: bool
    track_names: list[str]
    track_ids: bytes
    rows: list[T]
    stats: bytes | None
    fingerprints: int


def u64_keys(ids: Sequence[int] | np.ndarray[Any, Any]) -> list[bytes]:
    """``[u64(i) for i in ids]``, built in one numpy pass."""
    raw = np.asarray(ids, dtype=">u8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def index_keys(kind_codes: Sequence[int], ts: Sequence[float], ids: Sequence[int]) -> list[bytes]:
    """``[index_key(k, t, i) ...]`` in one numpy pass (the same order-preserving ts bits)."""
    n = len(ids)
    bits = np.asarray(ts, dtype=np.float64).view(np.uint64)
    top = np.uint64(1 << 63)
    bits = np.where(bits >= top, ~bits, bits | top)
    arr = np.empty((n, 17), dtype=np.uint8)
    arr[:, 0] = kind_codes
    arr[:, 1:9] = bits.astype(">u8").view(np.uint8).reshape(n, 8)
    arr[:, 9:] = np.asarray(ids, dtype=">u8").view(np.uint8).reshape(n, 8)
    raw = arr.tobytes()
    return [raw[i : i + 17] for i in range(0, n * 17, 17)]

class LmdbTables:
    """The store's LMDB environment and tables; thread-safe."""

    def __init__(self, path: Path, *, readonly: bool, map_size: int, lock: bool = True) -> None:
        """``lock=False`` (read-only only): do not use ``lock.mdb`` at all, so that nothing of
        the store changes, not even its reader table; safe only while no writer commits (a
        writer may then reuse pages this reader is reading). ``verify`` uses it when no writer
        holds the store's lock, and checks again with the lock if one took it meanwhile."""
        self.path = path
        self.readonly = readonly
        self.env = REGISTRY.open(path, readonly=readonly, map_size=map_size, lock=lock,
                                 max_dbs=_MAX_DBS)
        self._gate = threading.Condition(threading.Lock())
        self._readers = 0
        self._resizing = False
        self.retrievals = RetrievalLog(lambda: self._dbs)
        try:
            if readonly:
                # py-lmdb: in a read-only environment, handles opened inside a caller's read
                # transaction are not usable afterwards; let it manage its own transaction
                self._dbs = {n: self.env.open_db(n, create=False) for n in _DB_NAMES}
                for n in _OPTIONAL_DBS:
                    try:
                        self._dbs[n] = self.env.open_db(n, create=False)
                    except lmdb.NotFoundError:
                        log.debug("LMDB at %s has no %s table (older store)", path, n.decode())
            else:
                with self.env.begin(write=True) as txn:
                    self._dbs = {
                        n: self.env.open_db(n, txn=txn, create=True)
                        for n in _DB_NAMES + _OPTIONAL_DBS
                    }
                    meta = self._dbs[b"meta"]
                    if (txn.stat(self._dbs[b"records"])["entries"] == 0
                            and txn.get(FPROWS_KEY, db=meta) is None):  # fmt: skip
                        # no record yet: every fingerprint will get its row as it is applied
                        txn.put(FPROWS_KEY, FPROWS_COMPLETE, db=meta)
        except lmdb.NotFoundError as exc:
            REGISTRY.close(path)
            raise StoreCorruptionError(f"LMDB at {path} lacks an xpstore table: {exc}") from exc
        except lmdb.Error as exc:
            REGISTRY.close(path)
            raise translate(exc, "opening tables") from exc

    def close(self) -> None:
        REGISTRY.close(self.path)

    # ----------------------------------------------------------- read side
    @contextmanager
    def reading(self, *, buffers: bool = False) -> Iterator[lmdb.Transaction]:
        """A short read transaction; keeps a concurrent map resize out while it is open.
        ``buffers``: values are memoryviews into the map, valid only inside the block."""
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._readers += 1
        try:
            for attempt in range(3):
                try:
                    txn = (self.env.begin(write=False, buffers=True) if buffers
                           else self.env.begin(write=False, buffers=False))  # fmt: skip
                    break
                except lmdb.MapResizedError:
                    # another process grew the map: adopt its size, then retry
                    self.env.set_mapsize(0)
                    if attempt == 2:
                        raise
                except lmdb.Error as exc:
                    raise translate(exc, "read transaction") from exc
            try:
                yield txn
            finally:
                txn.abort()
        finally:
            with self._gate:
                self._readers -= 1
                if self._readers == 0:
                    self._gate.notify_all()

    def db(self, name: bytes) -> Any:
        return self._dbs[name]

    def get_meta(self, txn: lmdb.Transaction, key: str) -> bytes | None:
        value = txn.get(key.encode(), db=self._dbs[b"meta"])
        return bytes(value) if value is not None else None

    def applied_lsn(self, txn: lmdb.Transaction) -> int:
        raw = self.get_meta(txn, "applied_lsn")
        return from_u64(raw) if raw else 0

    def counts(self, txn: lmdb.Transaction) -> dict[int, int]:
        raw = self.get_meta(txn, "counts")
        return {int(k): v for k, v in json.loads(raw).items()} if raw else {}

    def get_record(self, txn: lmdb.Transaction, rid: int) -> bytes | None:
        value = txn.get(u64(rid), db=self._dbs[b"records"])
        return bytes(value) if value is not None else None

    def get_track(self, txn: lmdb.Transaction, track_id: str) -> int | None:
        value = txn.get(track_id.encode(), db=self._dbs[b"tracks"])
        return from_u64(bytes(value)) if value is not None else None

    def record_values(self, txn: lmdb.Transaction, ids: Sequence[int]) -> list[bytes | None]:
        """The envelopes of ``ids`` in their order (None: absent), keys packed in one pass."""
        get = txn.get
        db = self._dbs[b"records"]
        return cast(list[bytes | None], [get(key, db=db) for key in u64_keys(ids)])

    def get_records(self, txn: lmdb.Transaction, ids: Sequence[int]) -> dict[int, bytes]:
        """The envelopes of those of ``ids`` that exist (one C call: catch-ups read many)."""
        keys = u64_keys(sorted(ids))
        found = txn.cursor(db=self._dbs[b"records"]).getmulti(keys)
        return {from_u64(bytes(key)): bytes(value) for key, value in found}

    def get_tracks(self, txn: lmdb.Transaction, track_ids: Iterable[str]) -> dict[str, int]:
        """The current record ids of those of ``track_ids`` the track map holds (one C call)."""
        keys = sorted(map(str.encode, track_ids))
        found = txn.cursor(db=self._dbs[b"tracks"]).getmulti(keys)
        return {bytes(key).decode(): from_u64(bytes(value)) for key, value in found}

    def retrieval_count(self, txn: lmdb.Transaction, rid: int) -> int:
        """The ``prio`` row's retrieval count of ``rid`` (0 without a row)."""
        db = self._dbs.get(b"prio")
        value = txn.get(u64(rid), db=db) if db is not None else None
        if value is None:
            return 0
        rc = int(_RC.unpack_from(value, _RC_AT)[0])
        agg = self.retrievals.unfolded(txn)
        return min(rc + int(agg.lookup([rid])[0]), _U32_MAX) if agg is not None else rc

    def retrieval_counts(self, txn: lmdb.Transaction, ids: Sequence[int]) -> dict[int, int]:
        """The ``prio`` rows' retrieval counts of those of ``ids`` that have a row (one C call).
        A record's count is the larger of this and its envelope's (docs/formats.md)."""
        found_ids, found_rc = self.retrieval_count_rows(txn, sorted(ids))
        return dict(zip(found_ids.tolist(), found_rc.tolist(), strict=True))

    def retrieval_count_rows(
        self, txn: lmdb.Transaction, ids: Sequence[int] | np.ndarray[Any, Any]
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(ids, retrieval counts) of the ``prio`` rows of ``ids`` (sorted) that have one, in
        id order, as arrays (the export reads a chunk's with one C call)."""
        db = self._dbs.get(b"prio")
        empty = np.zeros(0, np.int64)
        if db is None or not len(ids):
            return empty, empty
        found = txn.cursor(db=db).getmulti(u64_keys(ids))
        if not found:
            return empty, empty
        rows = np.frombuffer(b"".join(v for _k, v in found), dtype=INPUT_DTYPE)
        rc = rows["rc"].astype(np.int64)
        agg = self.retrievals.unfolded(txn)
        if agg is not None:
            rc = np.minimum(rc + agg.lookup(rows["id"]), _U32_MAX)
        return rows["id"].astype(np.int64), rc

    def prio_rows(self) -> tuple[list[bytes], int]:
        """Every priority-input row of the ``prio`` table (id order; each row repeats its id),
        and the applied_lsn of the one read transaction they were read in. Values only: one
        C-level iteration, no per-row Python work (the sampler's rebuild on open)."""
        db = self._dbs.get(b"prio")
        with self.reading() as txn:
            applied = self.applied_lsn(txn)
            if db is None:
                return [], applied
            values = cast(list[bytes], list(txn.cursor(db=db).iternext(keys=False, values=True)))
            agg = self.retrievals.unfolded(txn)
        if agg is not None and values:  # rows with unfolded counts: rare after a clean close
            rows = np.frombuffer(b"".join(values), dtype=INPUT_DTYPE)
            more = agg.lookup(rows["id"])
            hits = np.flatnonzero(more)
            if len(hits):
                rows = rows[hits].copy()
                rows["rc"] = np.minimum(rows["rc"].astype(np.int64) + more[hits], _U32_MAX)
                size = INPUT_DTYPE.itemsize
                raw = rows.tobytes()
                for j, i in enumerate(hits.tolist()):
                    values[i] = raw[j * size : (j + 1) * size]
        return values, applied

    def put_prio(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Fill in priority-input rows (rows a crash recovery's fast replay did not write)."""
        db = self._dbs[b"prio"]
        self._write(lambda txn: txn.cursor(db=db).putmulti(list(items)))

    def fprows_complete(self, txn: lmdb.Transaction) -> bool:
        """Whether ``fprows`` holds a row for every fingerprint record (see the module doc)."""
        return b"fprows" in self._dbs and self.get_meta(txn, "fprows") == FPROWS_COMPLETE

    def read_live_rows(
        self, decode: Callable[[list[bytes], int, int], T], chunk: int = 65_536
    ) -> LiveRows[T]:
        """The track map and the ``fprows`` values, read in one read transaction (consistent
        with each other and with its ``applied_lsn``), in C-level iterations; the values are
        handed to ``decode(values, offset, total)`` ``chunk`` at a time, so only one chunk of
        them is held at once (bytes: joining a million memoryviews measured twice as slow)."""
        db = self._dbs.get(b"fprows")
        with self.reading() as txn:
            applied = self.applied_lsn(txn)
            complete = self.fprows_complete(txn)
            tracks = self._dbs[b"tracks"]
            keys = txn.cursor(db=tracks).iternext(keys=True, values=False)
            names = [str(k, "utf-8") for k in keys]
            ids = b"".join(txn.cursor(db=tracks).iternext(keys=False, values=True))
            parts: list[T] = []
            if db is not None and complete:
                total = int(txn.stat(db)["entries"])
                values = txn.cursor(db=db).iternext(keys=False, values=True)
                offset = 0
                while batch := cast(list[bytes], list(itertools.islice(values, chunk))):
                    parts.append(decode(batch, offset, total))
                    offset += len(batch)
            stats = self.get_meta(txn, "fpstats")
            fingerprints = self.counts(txn).get(FP_CODE, 0)
        return LiveRows(applied, complete, names, ids, parts, stats, fingerprints)

    def fill_fprows(self, chunk: int = 65_536) -> int:
        """Write the ``fprows`` table afresh, one row per fingerprint record, and mark it
        complete, in one write transaction (a store written before the table existed: done
        once, at the first attach of a writer). Returns how many rows were written."""
        written = 0

        def fill(txn: lmdb.Transaction) -> None:
            nonlocal written
            written = 0
            records, rows = self._dbs[b"records"], self._dbs[b"fprows"]
            txn.drop(rows, delete=False)  # rows left over by an older xpstore go too
            cur = txn.cursor(db=self._dbs[b"by_kind_ts"])
            ids: list[int] = []
            if cur.set_range(bytes((FP_CODE,))):
                for key in cur.iternext(keys=True, values=False):
                    if key[0] != FP_CODE:
                        break
                    ids.append(from_u64(bytes(key[9:])))
            ids.sort()
            for lo in range(0, len(ids), chunk):
                keys = u64_keys(ids[lo : lo + chunk])
                found = txn.cursor(db=records).getmulti(keys)
                got = [from_u64(bytes(k)) for k, _v in found]
                values = rows_or_none(got, [bytes(v) for _k, v in found])
                items = [(u64(r), v) for r, v in zip(got, values, strict=True) if v is not None]
                txn.cursor(db=rows).putmulti(items)
                written += len(items)
            txn.put(FPROWS_KEY, FPROWS_COMPLETE, db=self._dbs[b"meta"])

        self._write(fill)
        log.info("fprows: wrote the rows of %d fingerprint records (a store written before them)",
                 written)  # fmt: skip
        return written

    def put_fprows(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Rewrite ``fprows`` rows (ones an attach found damaged), in one short transaction;
        only where the record still exists, so a row never outlives its record."""
        db, records = self._dbs[b"fprows"], self._dbs[b"records"]

        def put(txn: lmdb.Transaction) -> None:
            for key, value in items:
                if txn.get(key, db=records) is not None:
                    txn.put(key, value, db=db)

        self._write(put)

    def iter_tracks(self, txn: lmdb.Transaction) -> Iterator[tuple[bytes, bytes]]:
        """Every (track_id UTF-8, current fingerprint id u64 BE) pair, in key order."""
        cur = txn.cursor(db=self._dbs[b"tracks"])
        for key, value in cur.iternext(keys=True, values=True):
            yield bytes(key), bytes(value)

    def get_neighbors(self, txn: lmdb.Transaction, track_id: str) -> bytes | None:
        """The encoded precomputed neighbour list of ``track_id`` (None: none stored)."""
        db = self._dbs.get(b"neighbors")
        if db is None:
            return None
        value = txn.get(track_id.encode(), db=db)
        return bytes(value) if value is not None else None

    def put_neighbors(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Write neighbour lists, one short write transaction per call (the caller chunks, so
        the applier's transactions interleave). Derived data: it bypasses the WAL and does not
        touch ``applied_lsn``."""
        db = self._dbs[b"neighbors"]
        self._write(lambda txn: txn.cursor(db=db).putmulti(list(items)))

    def sweep_neighbors(self, keep: Callable[[bytes], bool], chunk: int = 10_000) -> int:
        """Delete neighbour lists whose value fails ``keep`` (lists of an older build, of
        tracks gone since); in chunks of short transactions. Returns how many went."""
        db = self._dbs[b"neighbors"]
        removed = 0
        start = b""
        while True:
            doomed: list[bytes] = []
            last: bytes | None = None
            with self.reading() as txn:
                cur = txn.cursor(db=db)
                if not cur.set_range(start):
                    break
                for n, (key, value) in enumerate(cur.iternext(keys=True, values=True)):
                    if n >= chunk:
                        break
                    last = bytes(key)
                    if not keep(bytes(value)):
                        doomed.append(last)
            if doomed:
                self._write(lambda txn, d=doomed: [txn.delete(k, db=db) for k in d])
                removed += len(doomed)
            if last is None or n < chunk:
                break
            start = last + b"\0"
        return removed

    def index_chunk(
        self, kind_code: int, lo: bytes, hi: bytes, limit: int,
        counts: dict[int, int] | None = None,
    ) -> tuple[list[tuple[bytes, bytes]], int]:  # fmt: skip
        """Up to ``limit`` (index key, record value) pairs with lo <= key < hi, in key order.

        Returns the pairs and the ``applied_lsn`` of the transaction they were read in. Scans
        read in chunks of short transactions so a long iteration never pins LMDB pages.
        ``counts`` is filled with the records' ``prio`` retrieval counts (same transaction).
        """
        out: list[tuple[bytes, bytes]] = []
        with self.reading() as txn:
            applied = self.applied_lsn(txn)
            cur = txn.cursor(db=self._dbs[b"by_kind_ts"])
            records = self._dbs[b"records"]
            if not cur.set_range(lo):
                return out, applied
            for raw_key in cur.iternext(keys=True, values=False):
                key = bytes(raw_key)
                if key >= hi or len(out) >= limit:
                    break
                value = txn.get(key[9:], db=records)
                if value is None:
                    raise StoreCorruptionError(
                        f"index entry kind={kind_code} id={from_u64(key[9:])} has no record"
                    )
                out.append((key, bytes(value)))
            if counts is not None:
                counts.update(self.retrieval_counts(txn, [from_u64(k[9:]) for k, _v in out]))
        return out, applied

    # ---------------------------------------------------------- write side
    def put_meta(self, key: str, value: bytes) -> None:
        self._write(lambda txn: txn.put(key.encode(), value, db=self._dbs[b"meta"]))

    def apply(self, changes: Sequence[Change], applied_lsn: int) -> None:
        """Apply ``changes`` and record ``applied_lsn`` in one synced transaction (idempotent)."""
        self._write(lambda txn: self._apply_txn(txn, changes, applied_lsn))

    def _apply_txn(self, txn: lmdb.Transaction, changes: Sequence[Change], applied: int) -> None:
        current = self.applied_lsn(txn)
        if applied <= current:
            return  # already applied: replay after a crash is idempotent
        counts = self.counts(txn)
        if all(isinstance(ch, RecordPut | TrackSet | NewRecords | RetrievalCounts)
               for ch in changes):  # fmt: skip
            run: list[Change] = []  # in LSN order: counts add to the rows written before them
            added: list[RetrievalCounts] = []
            for ch in changes:
                if isinstance(ch, RetrievalCounts):
                    if run:
                        self._apply_puts(txn, run, counts)
                        run = []
                    added.append(ch)
                else:
                    if added:
                        self._add_retrievals(txn, added, current)
                        added = []
                    run.append(ch)
            if run:
                self._apply_puts(txn, run, counts)
            if added:
                self._add_retrievals(txn, added, current)
        else:
            flat: list[Change] = []
            for ch in changes:
                flat += ch.expand() if isinstance(ch, NewRecords) else [ch]
            self._apply_mixed(txn, flat, counts, current)
        meta = self._dbs[b"meta"]
        txn.put(b"counts", json.dumps({str(k): v for k, v in counts.items()}).encode(), db=meta)
        txn.put(b"applied_lsn", u64(applied), db=meta)

    def _apply_puts(
        self, txn: lmdb.Transaction, changes: Sequence[Change], counts: dict[int, int]
    ) -> None:
        """The ingest fast path: only puts and track updates, one ``putmulti`` per table.

        Each LMDB call releases and retakes the GIL; per-record calls made the applier slow the
        writers down (benchmarks/ingest.py profile), so the common case goes in bulk.
        """
        recs: list[tuple[bytes, bytes]] = []
        index: list[tuple[bytes, bytes]] = []
        tracks: list[tuple[bytes, bytes]] = []
        prio: list[tuple[bytes, bytes]] = []
        fp_ids: list[int] = []
        fp_values: list[bytes] = []
        fprows: list[tuple[bytes, bytes]] = []
        for ch in changes:
            if isinstance(ch, NewRecords):
                keys = u64_keys(ch.ids)
                recs += zip(keys, ch.values, strict=True)
                if FP_CODE in ch.kind_codes:
                    given = ch.fprows or [None] * len(ch.ids)
                    for i, code in enumerate(ch.kind_codes):
                        if code != FP_CODE:
                            continue
                        row = given[i]
                        if row is not None:
                            fprows.append((keys[i], row))
                        else:
                            fp_ids.append(ch.ids[i])
                            fp_values.append(ch.values[i])
                prio += [(k, p) for k, p in zip(keys, ch.prio, strict=True) if p is not None]
                index += [(k, b"") for k in index_keys(ch.kind_codes, ch.ts, ch.ids)]
                for code, added in Counter(ch.kind_codes).items():
                    counts[code] = counts.get(code, 0) + added
                tracks += ch.tracks
            elif isinstance(ch, RecordPut):
                recs.append((u64(ch.id), ch.value))
                if ch.prio is not None:
                    prio.append((u64(ch.id), ch.prio))
                if ch.kind_code == FP_CODE:
                    fp_ids.append(ch.id)
                    fp_values.append(ch.value)
                if ch.is_new:
                    index.append((index_key(ch.kind_code, ch.ts, ch.id), b""))
                    counts[ch.kind_code] = counts.get(ch.kind_code, 0) + 1
            else:
                assert isinstance(ch, TrackSet)
                tracks.append((ch.track_id.encode(), u64(ch.id)))
        fp_rows = rows_or_none(fp_ids, fp_values)
        fprows += [(k, r) for k, r in zip(u64_keys(fp_ids), fp_rows, strict=True) if r is not None]
        prio = self.retrievals.less_unfolded(txn, prio)  # rewrites' totals include them
        for name, items in (
            (b"records", recs), (b"by_kind_ts", index), (b"tracks", tracks), (b"prio", prio),
            (b"fprows", fprows),
        ):
            if items:
                txn.cursor(db=self._dbs[name]).putmulti(items)
        ttombs = self._dbs[b"track_tombs"]
        if tracks and txn.stat(ttombs)["entries"]:
            for key, _value in tracks:
                txn.delete(key, db=ttombs)

    def _add_retrievals(
        self, txn: lmdb.Transaction, chs: Sequence[RetrievalCounts], applied: int
    ) -> None:
        """Log the counts of ``chs`` (consecutive operations, summed) as one entry of the
        ``retrievals`` table, folded into the rows later (:mod:`.retrievals`).

        Ids without a ``prio`` row (a put a fast recovery replay wrote, a decision) are counted
        in place now instead, and an id that no longer exists is skipped. Only an operation
        above ``applied`` (the LSN LMDB already holds) counts."""
        chs = [ch for ch in chs if ch.lsn > applied and ch.counts]
        if not chs:
            return
        if len(chs) == 1:
            total: Mapping[int, int] = chs[0].counts
        else:
            summed: dict[int, int] = dict(chs[0].counts)
            for ch in chs[1:]:
                for rid, n in ch.counts.items():
                    summed[rid] = summed.get(rid, 0) + n
            total = summed
        ids = np.fromiter(sorted(total), dtype=np.uint64, count=len(total))
        found = txn.cursor(db=self._dbs[b"prio"]).getmulti(u64_keys(ids))
        have = np.frombuffer(b"".join([v for _k, v in found]), dtype=INPUT_DTYPE)["id"]
        if len(have):
            counts = np.fromiter(map(total.__getitem__, have.tolist()), dtype=np.int64,
                                 count=len(have))  # fmt: skip
            self.retrievals.append(txn, chs[-1].lsn, have.astype(np.uint64), counts)
        if len(have) < len(ids):
            rowless = set(total).difference(have.tolist())
            add_in_place(txn, self._dbs, {rid: total[rid] for rid in rowless})

    def _apply_mixed(
        self, txn: lmdb.Transaction, changes: Sequence[Change], counts: dict[int, int],
        applied: int,
    ) -> None:  # fmt: skip
        records, index = self._dbs[b"records"], self._dbs[b"by_kind_ts"]
        tracks, tombs, ttombs = (
            self._dbs[b"tracks"],
            self._dbs[b"tombstones"],
            self._dbs[b"track_tombs"],
        )
        prio, fprows = self._dbs[b"prio"], self._dbs[b"fprows"]
        fp_puts = [ch for ch in changes if isinstance(ch, RecordPut) and ch.kind_code == FP_CODE]
        fp_rows = iter(rows_or_none([ch.id for ch in fp_puts], [ch.value for ch in fp_puts]))
        for ch in changes:
            if isinstance(ch, RecordPut):
                txn.put(u64(ch.id), ch.value, db=records)
                if ch.prio is not None:
                    ((key, prow),) = self.retrievals.less_unfolded(txn, [(u64(ch.id), ch.prio)])
                    txn.put(key, prow, db=prio)
                if ch.kind_code == FP_CODE:  # in order: a later delete in the batch wins
                    row = next(fp_rows)
                    if row is not None:
                        txn.put(u64(ch.id), row, db=fprows)
                    else:
                        txn.delete(u64(ch.id), db=fprows)
                if ch.is_new:
                    txn.put(index_key(ch.kind_code, ch.ts, ch.id), b"", db=index)
                    counts[ch.kind_code] = counts.get(ch.kind_code, 0) + 1
            elif isinstance(ch, RecordDelete):
                txn.delete(u64(ch.id), db=prio)
                txn.delete(u64(ch.id), db=fprows)
                if txn.delete(u64(ch.id), db=records):
                    txn.delete(index_key(ch.kind_code, ch.ts, ch.id), db=index)
                    counts[ch.kind_code] = counts.get(ch.kind_code, 0) - 1
                txn.put(u64(ch.id), _TOMB.pack(ch.lsn, ch.kind_code), db=tombs)
            elif isinstance(ch, TrackSet):
                txn.put(ch.track_id.encode(), u64(ch.id), db=tracks)
                txn.delete(ch.track_id.encode(), db=ttombs)
            elif isinstance(ch, MetaSet):
                txn.put(ch.key.encode(), ch.value, db=self._dbs[b"meta"])
            elif isinstance(ch, RetrievalCounts):
                self._add_retrievals(txn, [ch], applied)
            else:
                assert isinstance(ch, TrackDelete), "NewRecords are expanded before this"
                txn.delete(ch.track_id.encode(), db=tracks)
                txn.put(ch.track_id.encode(), _TRACK_TOMB.pack(ch.lsn, ch.former_id), db=ttombs)

    def _write(self, fn: Any) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    fn(txn)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as exc:
                raise translate(exc, "write transaction") from exc

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """No read transaction of this process is open inside, and none can start.

        What ``set_mapsize`` needs, and what closing and reopening the environment needs.
        """
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._resizing = True
            while self._readers:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._resizing = False
                self._gate.notify_all()

    def _grow(self) -> None:
        with self.exclusive():
            new = self.env.info()["map_size"] * 2
            self.env.set_mapsize(new)
            log.info("LMDB map grown to %d MiB", new >> 20)

    def reopen_around(self, action: Callable[[], None]) -> None:
        """Close the environment, run ``action`` (which may swap the files), open it again.

        The LmdbTables object stays the same, so the store and the applier keep their
        references; readers of this process wait at the gate meanwhile. The caller keeps
        writers out. The environment is reopened even when ``action`` fails, but never created
        afresh where the store's data file is missing.
        """
        with self.exclusive():
            map_size = int(self.env.info()["map_size"])
            REGISTRY.close(self.path)
            self.retrievals.forget()
            try:
                action()
            finally:
                if not (self.path / "data.mdb").exists():
                    raise XpStoreError(
                        f"{self.path / 'data.mdb'} is missing after a failed file swap; "
                        "reopen the store for writing to restore it"
                    )
                self.env = REGISTRY.open(self.path, readonly=False, map_size=map_size,
                                             max_dbs=_MAX_DBS)
                try:
                    with self.env.begin(write=True) as txn:
                        self._dbs = {
                            n: self.env.open_db(n, txn=txn, create=True)
                            for n in _DB_NAMES + _OPTIONAL_DBS
                        }
                except lmdb.Error as exc:
                    raise translate(exc, "reopening tables") from exc

    def live_bytes(self) -> int:
        """Bytes of the pages every B-tree uses, plus the two meta pages: about what a compact
        copy writes (compaction's estimate of its output; ``stats()``'s live bytes)."""
        env = self.env
        psize = int(env.stat()["psize"])
        pages = 2 + _tree_pages(env.stat())  # the main tree names the tables
        with self.reading() as txn:
            for db in self._dbs.values():
                pages += _tree_pages(txn.stat(db))
        return pages * psize

    def copy_compact(
        self,
        dest: Path,
        *,
        txn: lmdb.Transaction | None = None,
        progress: ProgressFn | None = None,
        phase: str = "copying LMDB",
    ) -> None:
        """``env.copy(dest, compact=True)`` (inside ``txn`` if given), translating LMDB errors.

        The copy is one call into C, so ``progress`` is fed by a thread that watches the size of
        the file being written against :meth:`live_bytes`, every 0.2 s.
        """
        total = self.live_bytes() if progress is not None else 0
        with _watch_size(dest / DATA_FILE, total, phase, progress):
            try:
                self.env.copy(str(dest), compact=True, txn=txn)
            except lmdb.Error as exc:
                raise translate(exc, f"copying LMDB into {dest}") from exc

    def shared_refs(self) -> int:
        """How many Store objects of this process share this environment."""
        return REGISTRY.refs(self.path)

    def fold_retrievals(self) -> int:
        """Fold the logged retrieval counts into the ``prio`` rows now (a clean close does, so
        that a store at rest holds its counts in the rows); the number of records counted."""
        folded = [0]

        def fold(txn: lmdb.Transaction) -> None:
            folded[0] = self.retrievals.fold(txn)

        if self._dbs.get(b"retrievals") is not None:
            self._write(fold)
        return folded[0]

    def sync(self) -> None:
        """Force data and meta pages to disk (before WAL segments may be deleted)."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise translate(exc, "sync") from exc

    def stat(self) -> dict[str, Any]:
        info = self.env.info()
        with self.reading() as txn:
            entries = {n.decode(): txn.stat(db)["entries"] for n, db in self._dbs.items()}
        return {"map_size": info["map_size"], "last_txnid": info["last_txnid"], "entries": entries}


def _tree_pages(stat: Mapping[str, Any]) -> int:
    return int(stat["branch_pages"]) + int(stat["leaf_pages"]) + int(stat["overflow_pages"])


@contextmanager
def _watch_size(
    path: Path, total: int, phase: str, progress: ProgressFn | None, every: float = 0.2
) -> Iterator[None]:
    """Report ``path``'s size as progress while the block runs (a copy made in C)."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def size() -> int:
        try:
            return path.stat().st_size
        except OSError:
            return 0

    def watch() -> None:
        while not stop.wait(every):
            progress(phase, size(), total, "bytes")

    watcher = threading.Thread(target=watch, name="xpstore-copy-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    done = size()
    progress(phase, done, max(total, done), "bytes")
