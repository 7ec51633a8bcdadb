"""Retrieval counts: logged as appended entries, folded into the ``prio`` rows rarely.

Adding a flush of counts to the rows in place dirtied about one ``prio`` leaf page per count at
1M records (~14 MB per flush of 4096, synced at commit, on the drawing thread): the counted
training loop ran at a third of the uncounted one. Now a flush is **one entry** of the
``retrievals`` table (key: the operation's LSN, u64 BE; value: the ids, sorted, as u64 LE, then
their counts as u32 LE), a few sequential pages, and the entries are **folded** into the rows in
one sorted pass once they hold :data:`FOLD_COUNTS` counts or :data:`FOLD_ENTRIES` entries, and at
a clean close. ``meta/retrievals`` (``>QQQQ``: entries, counts, first LSN, last LSN) says what
the table holds, in the same transaction as the table.

A record's count is then ``max(envelope's, row's + unfolded)``, where *unfolded* sums the
record's entries (the reads in :mod:`xpstore.persistence.lmdb_tables` add it). Three rules keep
that exact (docs/design.md, "Retrieval counts"):

- an entry holds only ids that had a ``prio`` row when it was appended (the others, rare: a
  decision, a put a fast recovery wrote without its row, get the old in-place treatment);
- a rewrite of a record (a put, a feedback, a priority update) carries the total count, derived
  against views that include the unfolded counts, so its new row is written with the record's
  unfolded sum taken off (the entries are all older than the rewrite: the applier goes in LSN
  order);
- an entry is keyed by its LSN and only appended above ``applied_lsn``: recovery re-appending one
  is a no-op, where an in-place add would count twice.

Readers get the sum from an in-memory aggregate cached by the ``meta`` state they read, so a
reader in any transaction sees exactly the entries of that transaction.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, cast

import lmdb
import numpy as np
import numpy.typing as npt

from xpstore.model.codec import KIND_BY_CODE, envelope_counters, pack_envelope
from xpstore.model.priority_rows import INPUT_DTYPE, inputs_from_map

__all__ = ["FOLD_COUNTS", "FOLD_ENTRIES", "RetrievalLog", "Unfolded", "add_in_place"]

FOLD_COUNTS: Final = 1 << 18
"""Counts the table holds before a fold (a fold rewrites at most every ``prio`` page once)."""
FOLD_ENTRIES: Final = 512
"""Entries the table holds before a fold (bounds a cold reader's first aggregate)."""

META_KEY: Final = b"retrievals"
_META: Final = struct.Struct(">QQQQ")
_U64: Final = struct.Struct(">Q")
_U32_MAX: Final = (1 << 32) - 1
_CACHED: Final = 4

U64s = npt.NDArray[np.uint64]
I64s = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Unfolded:
    """The summed unfolded counts of one table state: ids sorted, their counts aligned."""

    ids: U64s
    counts: I64s

    def lookup(self, ids: npt.ArrayLike) -> I64s:
        """The unfolded count of each of ``ids`` (0 where none)."""
        q = np.asarray(ids, dtype=np.uint64)
        pos = np.searchsorted(self.ids, q)
        pos[pos == len(self.ids)] = 0
        hit = self.ids[pos] == q if len(self.ids) else np.zeros(len(q), bool)
        return np.where(hit, self.counts[pos] if len(self.ids) else 0, 0).astype(np.int64)

    def merged(self, ids: U64s, counts: I64s) -> Unfolded:
        """This plus one entry (``ids`` sorted, unique); new arrays, this one unchanged."""
        pos = np.searchsorted(self.ids, ids)
        inside = pos < len(self.ids)
        have = np.zeros(len(ids), bool)
        have[inside] = self.ids[pos[inside]] == ids[inside]
        summed = self.counts.copy()
        np.add.at(summed, pos[have], counts[have])
        new = ~have
        return Unfolded(np.insert(self.ids, pos[new], ids[new]),
                        np.insert(summed, pos[new], counts[new]))  # fmt: skip


_EMPTY = Unfolded(np.zeros(0, np.uint64), np.zeros(0, np.int64))


def _entry(value: bytes | memoryview) -> tuple[U64s, I64s]:
    n = len(value) // 12
    ids = np.frombuffer(value, dtype="<u8", count=n).astype(np.uint64)
    counts = np.frombuffer(value, dtype="<u4", count=n, offset=8 * n).astype(np.int64)
    return ids, counts


class RetrievalLog:
    """The ``retrievals`` table of one environment and the cache of its aggregates."""

    def __init__(self, dbs: Callable[[], Mapping[bytes, Any]]) -> None:
        self._tables = dbs  # the environment's current handles (a reopen replaces them)
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, int, int], Unfolded] = {}
        self.fold_counts = FOLD_COUNTS
        self.fold_entries = FOLD_ENTRIES

    def forget(self) -> None:
        """Drop the cached aggregates (the environment was replaced: a restore, a compaction)."""
        with self._lock:
            self._cache.clear()

    def state(self, txn: lmdb.Transaction) -> tuple[int, int, int, int]:
        """(entries, counts, first LSN, last LSN) of the table in ``txn``."""
        raw = txn.get(META_KEY, db=self._tables()[b"meta"])
        return cast(tuple[int, int, int, int], _META.unpack(bytes(raw))) if raw else (0, 0, 0, 0)

    def unfolded(self, txn: lmdb.Transaction) -> Unfolded | None:
        """The aggregate of the entries ``txn`` sees (None: none)."""
        entries, _counts, first, last = self.state(txn)
        if not entries:
            return None
        key = (entries, first, last)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        cur = txn.cursor(db=self._tables()[b"retrievals"])
        parts = [_entry(v) for v in cur.iternext(keys=False)]
        ids = np.concatenate([p[0] for p in parts])
        counts = np.concatenate([p[1] for p in parts])
        uids, inverse = np.unique(ids, return_inverse=True)
        agg = Unfolded(uids, np.bincount(inverse, weights=counts, minlength=len(uids))
                       .astype(np.int64))  # fmt: skip
        self._remember(key, agg)
        return agg

    def _remember(self, key: tuple[int, int, int], agg: Unfolded) -> None:
        with self._lock:
            self._cache[key] = agg
            while len(self._cache) > _CACHED:
                del self._cache[next(iter(self._cache))]

    def append(self, txn: lmdb.Transaction, lsn: int, ids: U64s, counts: I64s) -> None:
        """Log ``counts`` of ``ids`` (sorted, unique, each with a ``prio`` row) at ``lsn``;
        folds when the table is full."""
        before = self.unfolded(txn) or _EMPTY
        entries, total, first, last = self.state(txn)
        assert lsn > last, "entries are appended in LSN order"
        value = ids.astype("<u8").tobytes() + np.minimum(counts, _U32_MAX).astype("<u4").tobytes()
        txn.put(_U64.pack(lsn), value, db=self._tables()[b"retrievals"])
        entries, total = entries + 1, total + int(counts.sum())
        first = first if first else lsn
        txn.put(META_KEY, _META.pack(entries, total, first, lsn), db=self._tables()[b"meta"])
        self._remember((entries, first, lsn), before.merged(ids, counts))
        if total >= self.fold_counts or entries >= self.fold_entries:
            self.fold(txn)

    def fold(self, txn: lmdb.Transaction) -> int:
        """Add every entry to its rows and empty the table; the number of records counted."""
        agg = self.unfolded(txn)
        if agg is None:
            return 0
        total = dict(zip(agg.ids.tolist(), agg.counts.tolist(), strict=True))
        add_in_place(txn, self._tables(), total)
        txn.drop(self._tables()[b"retrievals"], delete=False)
        txn.delete(META_KEY, db=self._tables()[b"meta"])
        return len(total)

    def less_unfolded(
        self, txn: lmdb.Transaction, rows: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """``(key, prio row)`` pairs of rewritten records, each row's count less the record's
        unfolded counts (the rewrite's total includes them; the entries stay until the fold)."""
        agg = self.unfolded(txn)
        if agg is None or not rows:
            return rows
        arr = np.frombuffer(b"".join([r for _k, r in rows]), dtype=INPUT_DTYPE)
        less = agg.lookup(arr["id"])
        hits = np.flatnonzero(less)
        if not len(hits):
            return rows
        arr = arr.copy()
        arr["rc"][hits] = np.maximum(arr["rc"][hits].astype(np.int64) - less[hits], 0)
        out = list(rows)
        size = INPUT_DTYPE.itemsize
        raw = arr.tobytes()
        for i in hits.tolist():
            out[i] = (rows[i][0], raw[i * size : (i + 1) * size])
        return out


def add_in_place(txn: lmdb.Transaction, dbs: Mapping[bytes, Any], total: Mapping[int, int]) -> None:
    """Add ``total`` (id -> count) to the records' ``prio`` rows in place (u32, saturating).

    A record without a row (a put a fast recovery replay wrote, a store older than the table)
    gets its row now, from its envelope; a kind without rows (a decision) has the count written
    into its envelope. An id that no longer exists is skipped."""
    keys = [_U64.pack(i) for i in sorted(total)]
    prio = dbs[b"prio"]
    found = cast(list[tuple[bytes, bytes]], txn.cursor(db=prio).getmulti(keys))
    items: list[tuple[bytes, bytes]] = []
    if found:
        rows = np.frombuffer(b"".join([v for _k, v in found]), dtype=INPUT_DTYPE).copy()
        add = np.fromiter(map(total.__getitem__, rows["id"].tolist()), dtype=np.int64,
                          count=rows.shape[0])  # fmt: skip
        rows["rc"] = np.minimum(rows["rc"].astype(np.int64) + add, _U32_MAX)
        raw = rows.tobytes()
        size = INPUT_DTYPE.itemsize
        starts = range(0, len(raw), size)
        items = [(k, raw[j : j + size]) for j, (k, _v) in zip(starts, found, strict=True)]
    if len(found) < len(keys):
        have = {k for k, _v in found}
        records = dbs[b"records"]
        for key in keys:
            if key in have:
                continue
            value = txn.get(key, db=records)
            if value is None:
                continue  # deleted after it was drawn: its count has nowhere to go
            rid = _U64.unpack(key)[0]
            obj = envelope_counters(bytes(value))
            if len(obj) == 7:
                obj.append(None)
            rc = obj[4] + total[rid]
            row = inputs_from_map(KIND_BY_CODE[obj[1]], obj[6], rid, float(obj[2]), rc,
                                  obj[5], obj[7])  # fmt: skip
            if row is not None:
                items.append((key, row))
            else:
                obj[4] = rc
                txn.put(key, pack_envelope(obj), db=records)
        items.sort()
    if items:
        txn.cursor(db=prio).putmulti(items)
