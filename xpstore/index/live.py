"""The live library in columns: what an attach with no index file (and a build) reads.

:func:`read_library` reads, in one LMDB read transaction, the track map (two C-level cursor
passes: keys, then the u64 ids joined into one buffer) and the ``fprows`` table
(``model.fprows``: one fixed-width row per fingerprint record, decoded with ``np.frombuffer``
per chunk). Nothing is decoded per record in Python except the track names. Rows the table
lacks (a store written before it, opened read-only; a row whose check word fails) are decoded
from their envelopes, as before the table existed, and written back where the store is open
for writing.

The library's statistics are cached in ``meta`` under ``fpstats`` with the *digest* of the set
they were fitted on (the sum of the live rows' check words, the count, the mode and the fit's
version): an attach whose live set has the same digest uses them instead of fitting again.
The entry is derived data, written outside the WAL; a stale or damaged one is only ignored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from xpstore.errors import XpStoreError
from xpstore.index.embedding import AudioStats, ScalingMode
from xpstore.index.rows import FingerprintRows
from xpstore.model.fprows import (
    RowColumns,
    decode_into,
    decode_rows,
    empty_columns,
    row_id,
    rows_for_envelopes,
    set_digest,
)
from xpstore.persistence.lmdb_tables import LiveRows, LmdbTables, u64_keys

__all__ = ["FIT_VERSION", "Library", "LiveSet", "aligned_names", "read_library"]

log = logging.getLogger(__name__)

FIT_VERSION: Final = 2
"""Version of :meth:`AudioStats.fit` with ids (part of the cache key of ``fpstats``); 2: a
library over ``embedding.FIT_ROWS`` rows is fitted on every k-th row."""
_CHUNK: Final = 65_536
I64 = npt.NDArray[np.int64]


@dataclass
class LiveSet:
    """The track map as arrays: record ids ascending and each one's track id (aligned)."""

    rids: I64
    names: npt.NDArray[np.object_]

    def __len__(self) -> int:
        return int(self.rids.shape[0])

    @classmethod
    def from_table(cls, names: list[str], ids: bytes) -> LiveSet:
        """From the track map's keys (decoded) and its values joined (u64 BE ids)."""
        rids = np.frombuffer(ids, dtype=">u8").astype(np.int64)
        arr = np.empty(len(names), dtype=object)
        arr[:] = names
        return cls._sorted(rids, arr)

    @classmethod
    def _sorted(cls, rids: I64, names: npt.NDArray[np.object_]) -> LiveSet:
        if rids.shape[0] > 1 and not bool((rids[1:] > rids[:-1]).all()):
            order = np.argsort(rids, kind="stable")
            rids, names = rids[order], names[order]
        return cls(rids, names)

    def overlaid(self, changes: dict[str, tuple[int, int | None]]) -> LiveSet:
        """With the overlay's unapplied track changes (track -> (lsn, new id or None))."""
        if not changes:
            return self
        keep = np.fromiter((n not in changes for n in self.names.tolist()), bool, len(self))
        added = [(rid, t) for t, (_lsn, rid) in changes.items() if rid is not None]
        names = np.empty(len(added), dtype=object)
        names[:] = [t for _rid, t in added]
        rids = np.concatenate([self.rids[keep], np.array([r for r, _t in added], np.int64)])
        return self._sorted(rids, np.concatenate([self.names[keep], names]))

    def as_dict(self) -> dict[str, int]:
        return dict(zip(self.names.tolist(), self.rids.tolist(), strict=True))


def aligned_names(ids: I64, live: LiveSet) -> npt.NDArray[np.object_]:
    """The track of each of ``ids`` (sorted); None where an id is not live."""
    out = np.full(ids.shape[0], None, dtype=object)
    if not len(live) or not ids.size:
        return out
    pos = np.minimum(np.searchsorted(live.rids, ids), live.rids.shape[0] - 1)
    hit = live.rids[pos] == ids
    out[hit] = live.names[pos[hit]]
    return out


@dataclass
class Library:
    """What :func:`read_library` returns: the live set, the rows of ``wanted`` ids (in the
    order of ``wanted``), the cached statistics' entry, and where the rows came from."""

    applied_lsn: int
    live: LiveSet
    rows: FingerprintRows
    digest: int
    stats_entry: bytes | None
    from_table: int
    from_envelopes: int

    def cached_stats(self, mode: ScalingMode) -> AudioStats | None:
        """The ``fpstats`` statistics when they were fitted on exactly these rows."""
        return cached_stats(self.stats_entry, self.digest, len(self.rows), mode)


def read_library(
    tables: LmdbTables,
    embedding_dim: int | None,
    wanted: Any,
    *,
    overlay_values: dict[int, bytes] | None = None,
    overlay_tracks: dict[str, tuple[int, int | None]] | None = None,
    writable: bool = False,
) -> Library:
    """The live set and the rows of the live ids ``wanted`` selects (a callable given the
    sorted live ids, returning the sorted ids whose rows are needed).

    Rows come from ``fprows`` (``overlay_values``, the unapplied envelopes, win over it); the
    rest from the envelopes in LMDB. ``writable``: an incomplete table is filled first, and
    rows found damaged are rewritten."""
    started = time.perf_counter()
    if writable:
        with tables.reading() as txn:
            complete = tables.fprows_complete(txn)
        if not complete:
            tables.fill_fprows()
    got = _read(tables, embedding_dim)
    if got.complete and sum(len(p) + len(p.bad) for p in got.rows) != got.fingerprints:
        # rows missing or left over (an older xpstore wrote to the store after the table was
        # filled): fill it again where we may, else read every envelope
        log.warning("fprows: %d rows for %d fingerprint records; %s",
                    sum(len(p) + len(p.bad) for p in got.rows), got.fingerprints,
                    "writing them again" if writable else "reading the envelopes")  # fmt: skip
        if writable:
            tables.fill_fprows()
            got = _read(tables, embedding_dim)
        else:
            got = replace(got, complete=False, rows=[])
    live = LiveSet.from_table(got.track_names, got.track_ids).overlaid(overlay_tracks or {})
    need: I64 = np.asarray(wanted(live.rids), dtype=np.int64)
    names = aligned_names(need, live)
    table = got.rows[0] if got.rows else empty_columns(0, embedding_dim)
    if table.bad:
        log.warning("fprows: %d rows fail their check (ids %s...); reading those records' "
                    "envelopes instead", len(table.bad), table.bad[:5])  # fmt: skip
    ov = overlay_values or {}
    if not ov and table.ids.shape == need.shape and np.array_equal(table.ids, need):
        # every live row, nothing in the overlay: the table's columns are the rows (no copy)
        rows = FingerprintRows(need, names.tolist(), table.audio, table.embedding,
                               table.has_embedding)  # fmt: skip
        check, n_env = table.check, 0
    else:
        rows, check, n_env = _gather(tables, table, need, names, ov, embedding_dim,
                                     writable and got.complete)  # fmt: skip
    log.info("live library read in %.2f s: %d tracks, %d rows from fprows, %d from envelopes",
             time.perf_counter() - started, len(live), len(rows) - n_env, n_env)  # fmt: skip
    return Library(got.applied_lsn, live, rows, set_digest(check), got.stats,
                   len(rows) - n_env, n_env)  # fmt: skip


def _read(tables: LmdbTables, embedding_dim: int | None) -> LiveRows[RowColumns]:
    """``read_live_rows`` decoding every row into one preallocated set of columns (no
    concatenation of chunks); rows that fail their check are left out, listed in ``bad``."""
    held: list[RowColumns] = []
    goods: list[npt.NDArray[np.bool_]] = []
    bad: list[int] = []

    def decode(values: list[bytes], offset: int, total: int) -> None:
        if not held:
            held.append(empty_columns(total, embedding_dim))
        good = decode_into(values, held[0], offset)
        goods.append(good)
        bad.extend(row_id(values[i]) for i in np.flatnonzero(~good).tolist())

    got = tables.read_live_rows(decode, _CHUNK)
    cols = held[0] if held else empty_columns(0, embedding_dim)
    if bad:
        cols = cols.take(np.flatnonzero(np.concatenate(goods)))
        cols.bad = bad
    return LiveRows(got.applied_lsn, got.complete, got.track_names, got.track_ids,
                    [cols] if held else [], got.stats, got.fingerprints)  # fmt: skip


def _gather(
    tables: LmdbTables,
    table: RowColumns,
    need: I64,
    names: npt.NDArray[np.object_],
    ov: dict[int, bytes],
    embedding_dim: int | None,
    repair: bool,
) -> tuple[FingerprintRows, npt.NDArray[np.uint64], int]:
    """The rows of ``need`` (sorted ids): from ``table`` where it has them and the overlay
    does not, else from the envelopes. Returns the rows, their check words and how many came
    from envelopes (ids whose record vanished meanwhile are left out)."""
    n = need.shape[0]
    if table.ids.size:
        pos = np.minimum(np.searchsorted(table.ids, need), table.ids.shape[0] - 1)
        hit = table.ids[pos] == need
    else:
        pos = np.zeros(n, dtype=np.int64)
        hit = np.zeros(n, dtype=bool)
    if ov:
        hit &= ~np.isin(need, np.fromiter(ov, np.int64, len(ov)))
    audio = np.empty((n, table.audio.shape[1]))
    emb = np.zeros((n, embedding_dim), np.float32) if embedding_dim else None
    has = np.zeros(n, dtype=bool)
    check = np.zeros(n, dtype=np.uint64)
    src = pos[hit]
    audio[hit] = table.audio[src]
    if emb is not None and table.embedding is not None:
        emb[hit] = table.embedding[src]
    has[hit] = table.has_embedding[src]
    check[hit] = table.check[src]
    rest = need[~hit]
    rows = FingerprintRows(need, names.tolist(), audio, emb, has)
    if not rest.size:
        return rows, check, 0
    slow = _from_envelopes(tables, rest, ov, embedding_dim, repair)
    at = np.flatnonzero(~hit)
    found = np.isin(rest, slow.ids)
    keep = np.ones(n, dtype=bool)
    keep[at[~found]] = False  # deleted since the track map was read: the overlay says so later
    at = at[found]
    audio[at] = slow.audio
    if emb is not None and slow.embedding is not None:
        emb[at] = slow.embedding
    has[at] = slow.has_embedding
    check[at] = slow.check
    if not keep.all():
        rows, check = rows.select(keep), check[keep]
    return rows, check, int(at.shape[0])


def _concat(parts: list[RowColumns], embedding_dim: int | None) -> RowColumns:
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return empty_columns(0, embedding_dim)
    embs = [p.embedding for p in parts]
    return RowColumns(
        np.concatenate([p.ids for p in parts]),
        np.vstack([p.audio for p in parts]),
        None if embs[0] is None else np.vstack(embs),  # type: ignore[arg-type]
        np.concatenate([p.has_embedding for p in parts]),
        np.concatenate([p.check for p in parts]),
        [],
    )


def _from_envelopes(
    tables: LmdbTables,
    ids: I64,
    ov: dict[int, bytes],
    embedding_dim: int | None,
    repair: bool,
) -> RowColumns:
    """Rows of ``ids`` (sorted) decoded from their envelopes (the overlay's first), in chunks;
    with ``repair`` the rows of LMDB's records are written back to ``fprows``."""
    parts: list[RowColumns] = []
    for lo in range(0, ids.shape[0], _CHUNK):
        chunk = ids[lo : lo + _CHUNK].tolist()
        with tables.reading() as txn:
            found = tables.get_records(txn, [r for r in chunk if r not in ov])
        datas = []
        present = []
        for rid in chunk:
            data = ov.get(rid) or found.get(rid)
            if data is None:  # deleted since the track map was read: the overlay says so later
                log.warning("track map names record %d, which is missing; skipped", rid)
                continue
            present.append(rid)
            datas.append(data)
        chunk = present
        encoded = rows_for_envelopes(chunk, datas)
        if repair:
            stored = [(k, v) for k, v, r in zip(u64_keys(chunk), encoded, chunk, strict=True)
                      if r not in ov]  # fmt: skip
            if stored:
                tables.put_fprows(stored)
        parts.append(decode_rows(encoded, embedding_dim))
    return _concat(parts, embedding_dim)


# ----------------------------------------------------------------------------- stats cache


def cached_stats(
    entry: bytes | None, digest: int, count: int, mode: ScalingMode
) -> AudioStats | None:
    """The statistics of an ``fpstats`` entry if its key matches; None (logged) otherwise."""
    if entry is None:
        return None
    try:
        obj = json.loads(entry)
        key = (obj["fit"], obj["digest"], obj["count"], obj["mode"])
        if key != (FIT_VERSION, digest, count, mode):
            return None
        return AudioStats.from_dict(obj["stats"])
    except (ValueError, KeyError, TypeError, XpStoreError) as exc:
        log.warning("fpstats: cached statistics not usable (%s); fitting them again", exc)
        return None


def stats_entry(stats: AudioStats, digest: int, count: int) -> bytes:
    """The ``fpstats`` meta value caching ``stats`` for the live set of this digest."""
    return json.dumps({"fit": FIT_VERSION, "digest": digest, "count": count,
                       "mode": stats.mode, "stats": stats.to_dict()}).encode()  # fmt: skip
