"""Serving similar-track queries: the main index, an exact delta, and tombstones (DESIGN §5).

State, all in memory:

* ``main``: an immutable :class:`MainIndex` (a FAISS backend built from LMDB at LSN ``A``, the
  embedder whose statistics built it, and the sorted ids it holds). Nothing ever mutates a
  published main index, so concurrent searches need no lock (FAISS allows concurrent searches
  on an unchanging index, and releases the GIL inside them).
* ``delta``: the fingerprints acknowledged since ``A`` (and any the main index lacked when it was
  loaded), exact, in append-only numpy buffers (:class:`~xpstore.index.delta.Delta`).
* ``tombs``: ids in ``main`` that are no longer a track's current fingerprint (superseded,
  deleted, or the track deleted). HNSW cannot remove, so searches over-fetch and filter, and
  fall back to a FAISS ID selector when filtering leaves too few.

The live set is ``(main - tombs) + delta``; the two are disjoint. Record ids are fingerprint
LSNs and a record's values never change (an update may only change ``metadata``), so an id names
one vector for ever.

Updates arrive on the acknowledgement path: after the sync the WAL leader moves the commit's
effects into the overlay's durable layer (``Overlay.make_durable``), which publishes them as one
``Acknowledged`` batch to its subscribers; ``IndexManager._on_durable`` hands the batch's
``TrackEvent``s to :meth:`IndexServer.apply_events`, all before any writer of the commit
returns. So a fingerprint is findable as soon as its ``put`` returns and a retired one is gone as
soon as the ``put`` / ``delete_track`` that retired it returns. The writer computed the vector
already (``IndexManager.precompute``, outside every lock); ``apply_events`` only inserts it,
re-embedding only if a swap changed the statistics in between.

Every retirement is remembered with its LSN until LMDB holds it (:meth:`IndexServer.prune_retired`),
because a rebuild (``Rebuilder.rebuild`` in ``index.manager``) reads LMDB at some LSN ``A`` while
retirements keep arriving. :meth:`IndexServer.swap` installs the new main index under the lock:
tombstones become the retirements newer than ``A`` of ids the new index holds, the delta keeps only
ids newer than ``A`` (re-embedded if the statistics changed), and it returns the old index for
the caller to drop after the lock is released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from xpstore.errors import XpStoreError
from xpstore.index.backends import (
    Exclusion,
    IndexBackend,
    exclusion,
    faiss_threads,
    query_threads,
)
from xpstore.index.delta import Delta
from xpstore.index.embedding import HybridEmbedder
from xpstore.index.rows import RawFingerprint, parse_fingerprint
from xpstore.model.events import BulkEvent, TrackEvent

__all__ = ["BuildInfo", "Found", "IndexServer", "MainIndex"]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_SEARCH_KEY = {"hnsw": "ef_search", "ivf": "nprobe"}

Found = tuple[list[int], list[float], list[str | None]]
"""A single-query search's answers, best first: record ids, scores, and the tracks memory knows
(None where it does not)."""


@dataclass(frozen=True)
class BuildInfo:
    """What one build produced; kept in the index file's meta (``build``)."""

    build_id: int
    lsn: int
    kind: str
    count: int
    params: dict[str, Any]
    built_at: float
    duration_s: float
    recall_at_10: float | None
    stats_mode: str
    neighbors_k: int
    embedder: dict[str, Any] | None = None
    """The embedder's settings the build used (block weights, per-dimension weights by name and
    where they came from), so a later open embeds the delta exactly as the file was built, even
    after the settings changed; None in files written before this was recorded."""

    def to_json(self) -> dict[str, Any]:
        return {
            "build_id": self.build_id,
            "lsn": self.lsn,
            "kind": self.kind,
            "count": self.count,
            "params": self.params,
            "built_at": self.built_at,
            "duration_s": self.duration_s,
            "recall_at_10": self.recall_at_10,
            "stats_mode": self.stats_mode,
            "neighbors_k": self.neighbors_k,
            "embedder": self.embedder,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BuildInfo:
        return cls(
            build_id=int(raw["build_id"]),
            lsn=int(raw["lsn"]),
            kind=str(raw["kind"]),
            count=int(raw["count"]),
            params=dict(raw["params"]),
            built_at=float(raw["built_at"]),
            duration_s=float(raw["duration_s"]),
            recall_at_10=None if raw["recall_at_10"] is None else float(raw["recall_at_10"]),
            stats_mode=str(raw["stats_mode"]),
            neighbors_k=int(raw["neighbors_k"]),
            embedder=dict(raw["embedder"]) if raw.get("embedder") is not None else None,
        )


@dataclass(frozen=True)
class MainIndex:
    """A published main index; never mutated (see module doc). ``backend`` None: no build yet."""

    backend: IndexBackend | None
    embedder: HybridEmbedder
    ids: I64  # sorted
    build: BuildInfo | None
    generation: int  # bumps at every swap; vectors embedded under another one are re-embedded
    tracks: npt.NDArray[np.object_] | None = None
    """The track id of each of ``ids`` (same positions; None for an id no longer live when it
    was read), so an answer needs no LMDB read for its track. None: not known."""

    @cached_property
    def by_position(self) -> bool:
        """FAISS's position ``i`` holds ``ids[i]`` (a build adds its vectors in id order): a
        single query is then searched by position and named with two array lookups, without
        the id map's lookup and a binary search of ``ids`` per answer. Checked once per main
        index against the id map itself, so an index that was built otherwise is served by
        id, as before."""
        backend = self.backend
        if backend is None or self.tracks is None:
            return False
        held = backend.position_ids()
        return held is not None and bool(np.array_equal(held, self.ids))

    def track_ids(self, rids: I64) -> list[str | None]:
        """The tracks of ``rids`` (ids of this index) from memory; None where unknown."""
        if self.tracks is None or not rids.size or not self.ids.size:
            return [None] * int(rids.size)
        pos = np.minimum(np.searchsorted(self.ids, rids), self.ids.shape[0] - 1)
        out: list[str | None] = self.tracks[pos].tolist()
        for j in np.flatnonzero(self.ids[pos] != rids).tolist():
            out[j] = None  # not an id of this index
        return out

    def __contains__(self, rid: int) -> bool:
        i = int(np.searchsorted(self.ids, rid))
        return i < self.ids.shape[0] and int(self.ids[i]) == rid

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class _State:
    """main, delta and tombstones, published together: a search reads one consistent triple
    (a swap replaces all three at once; adds and retirements change the current delta and
    tombstone set in place, under the server lock)."""

    main: MainIndex
    delta: Delta
    tombs: set[int]


class IndexServer:
    """The live similar-track index of one open store (see module doc). Thread-safe."""

    def __init__(self, main: MainIndex, delta: Delta, tombs: set[int]) -> None:
        self.lock = threading.Lock()
        self._state = _State(main, delta, tombs)
        self._building = False
        self._retired: list[tuple[int, int]] = []  # (lsn, id), LSN order; see prune_retired
        self.version = 0  # bumps on every mutation (selector cache key)
        self._selector: tuple[int, Exclusion] | None = None
        self.on_change: Callable[[], None] | None = None  # the rebuilder's trigger check
        self.query_threads: int | None = 1  # FAISS threads of a single-query search
        self.answers: dict[int, tuple[str, dict[str, Any] | None]] = {}
        """id -> (track id, metadata) of recent answers (bounded; an update of a record's
        metadata drops its entry, see ``forget``): mapping ids to tracks without LMDB."""
        self.answers_max = 100_000
        self.answers_epoch = 0
        """Bumps at every acknowledged batch (``touch``): a read of answers' metadata that saw
        it move remembers nothing, since what it read may be older than the batch."""
        self.search_defaults: dict[str, int] = {}
        """``ef_search`` / ``nprobe`` every search uses unless its caller gives ``params``
        (``index.ef_search`` / ``index.nprobe``, live): a per-call FAISS parameter, so a change
        needs no lock and no rebuild; only the key the main index's kind knows is passed."""

    # ------------------------------------------------------------ state
    @property
    def main(self) -> MainIndex:
        return self._state.main

    @property
    def delta(self) -> Delta:
        return self._state.delta

    @property
    def tombs(self) -> set[int]:
        return self._state.tombs

    @property
    def embedder(self) -> HybridEmbedder:
        return self.main.embedder

    @property
    def generation(self) -> int:
        return self.main.generation

    def live_count(self) -> int:
        return len(self.main) - len(self.tombs) + len(self.delta)

    def track_ids(self, rids: list[int]) -> list[str | None]:
        """The tracks of live ids from memory (the delta's map, the main index's array); None
        where neither knows one."""
        st = self._state
        tracks = st.delta.tracks
        out = [tracks.get(rid) for rid in rids]
        unnamed = [j for j, t in enumerate(out) if t is None]
        if unnamed:
            named = st.main.track_ids(np.array([rids[j] for j in unnamed], dtype=np.int64))
            for j, t in zip(unnamed, named, strict=True):
                out[j] = t
        return out

    def is_live(self, rid: int) -> bool:
        st = self._state
        if rid in st.delta.pos:
            return True
        return rid not in st.tombs and rid in st.main

    def remember(
        self, rid: int, value: tuple[str, dict[str, Any] | None]
    ) -> tuple[str, dict[str, Any] | None]:
        answers = self.answers
        if len(answers) >= self.answers_max:
            try:
                del answers[next(iter(answers))]  # oldest first
            except (StopIteration, KeyError, RuntimeError):
                answers.clear()
        answers[rid] = value
        return value

    def shrink_answers(self, max_entries: int, hot: set[int] | frozenset[int] = frozenset()) -> int:
        """Evict answer-cache entries down to ``max_entries``: entries outside ``hot`` first
        (oldest first), the hot ones last; return how many were evicted (memory pressure)."""
        answers = self.answers
        excess = len(answers) - max(0, max_entries)
        if excess <= 0:
            return 0
        victims = [rid for rid in list(answers) if rid not in hot][:excess]
        if len(victims) < excess:
            victims += [rid for rid in list(answers) if rid in hot][: excess - len(victims)]
        for rid in victims:
            answers.pop(rid, None)
        return len(victims)

    def replace_backend(self, backend: IndexBackend) -> IndexBackend | None:
        """Serve the same ids from another backend (a quantized copy under memory pressure,
        or the full index reloaded from its file when pressure falls): same embedder, build
        and generation, so the delta and tombstones stay valid. Returns the old backend for
        the caller to drop outside the lock."""
        with self.lock:
            st = self._state
            old = st.main
            main = MainIndex(backend, old.embedder, old.ids, old.build, old.generation,
                             old.tracks)  # fmt: skip
            self._state = _State(main, st.delta, st.tombs)
            self._selector = None
            self.version += 1
        return old.backend

    def _params_for(
        self, backend: IndexBackend, params: dict[str, int] | None
    ) -> dict[str, int] | None:
        """The caller's params, else the live search defaults this backend's kind knows."""
        if params is not None or not self.search_defaults:
            return params
        key = _SEARCH_KEY.get(backend.kind)
        if key is None or key not in self.search_defaults:
            return None
        value = self.search_defaults[key]
        return None if backend.params.get(key) == value else {key: value}

    def touch(self) -> None:
        """An acknowledged batch arrived (before ``forget`` of its ids): see ``answers_epoch``."""
        self.answers_epoch += 1

    def forget(self, rids: Iterable[int]) -> None:
        """Drop cached answers of records whose metadata changed (or that were deleted)."""
        self.answers_epoch += 1
        answers = self.answers
        for rid in rids:
            answers.pop(rid, None)

    # ------------------------------------------------------------ mutations
    def _add_locked(self, rid: int, raw: RawFingerprint, vec: F32 | None, generation: int) -> None:
        """A new current fingerprint (vector computed by the writer under ``generation``)."""
        if rid in self.main:
            self.tombs.discard(rid)  # a catch-up replaying an id the index already has
        elif rid not in self.delta.pos:
            if vec is None or generation != self.main.generation:
                vec = self.main.embedder.embed_rows(
                    raw.audio[None, :],
                    raw.embedding[None, :] if raw.embedding is not None else None,
                    None if raw.embedding is None else np.ones(1, dtype=bool),
                )[0]
            self.delta.add(rid, raw, vec)
        self.version += 1

    def _retire_locked(self, rid: int, lsn: int) -> None:
        """``rid`` is no longer a track's current fingerprint (as of ``lsn``)."""
        if not self.delta.remove(rid) and rid in self.main:
            self.tombs.add(rid)
        self._retired.append((lsn, rid))
        self.version += 1

    def apply_events(self, events: Iterable[TrackEvent]) -> None:
        """Apply acknowledged track changes in LSN order (the index row when the writer
        computed one, else the fingerprint's numbers read from its envelope)."""
        with self.lock:
            for ev in events:
                if ev.retired is not None:
                    self._retire_locked(ev.retired, ev.lsn)
                if ev.current is None:
                    continue
                if ev.row is not None:
                    self._add_locked(ev.current, ev.row.raw, ev.row.vector, ev.row.generation)
                elif ev.value is not None:
                    raw = parse_fingerprint(ev.value, f"record {ev.current}")
                    self._add_locked(ev.current, raw, None, -1)
                else:
                    raise XpStoreError(f"track event at LSN {ev.lsn} sets a track without a value")
        self._changed()

    def apply_bulk(self, event: BulkEvent) -> None:
        """A ``put_fingerprints`` run: its rows enter the delta in one vectorized call, then
        the ids it retires leave (in LSN order; one may be a row of the run itself)."""
        rows = event.rows
        n = len(rows)
        ids = np.arange(event.first_lsn, event.first_lsn + n, dtype=np.int64)
        with self.lock:
            main = self.main
            vecs = rows.vectors
            if rows.generation != main.generation:
                vecs = main.embedder.embed_rows(rows.audio, rows.embedding, rows.has_embedding)
            keep = np.ones(n, dtype=bool)
            if len(main):
                inside = np.isin(ids, main.ids)
                for rid in ids[inside].tolist():
                    self.tombs.discard(rid)  # a catch-up replaying ids the index already has
                keep &= ~inside
            pos = self.delta.pos
            if pos:
                keep &= np.fromiter((r not in pos for r in ids.tolist()), dtype=bool, count=n)
            tids = list(rows.track_ids)
            if keep.all():
                self.delta.add_many(ids, tids, rows.audio, rows.embedding, rows.has_embedding,
                                    vecs)  # fmt: skip
            else:
                sel = np.flatnonzero(keep)
                self.delta.add_many(
                    ids[sel], [tids[i] for i in sel.tolist()], rows.audio[sel],
                    None if rows.embedding is None else rows.embedding[sel],
                    None if rows.has_embedding is None else rows.has_embedding[sel], vecs[sel],
                )  # fmt: skip
            for lsn, rid in event.retired:
                self._retire_locked(rid, lsn)
            self.version += 1
        self._changed()

    def _changed(self) -> None:
        hook = self.on_change
        if hook is not None:
            hook()

    # ------------------------------------------------------------ rebuilds
    def prune_retired(self, applied_lsn: int) -> None:
        """Forget retirements LMDB already holds (``lsn <= applied_lsn``).

        Every retirement is remembered with its LSN until then, because a build reads LMDB at
        some ``A >= applied_lsn`` and must tombstone exactly the retirements after ``A`` of ids
        it includes, including ones acknowledged before the build started.
        """
        with self.lock:
            keep = [(at, rid) for at, rid in self._retired if at > applied_lsn]
            self._retired = keep

    def begin_build(self) -> None:
        with self.lock:
            self._building = True

    def abort_build(self) -> None:
        with self.lock:
            self._building = False

    def swap(
        self,
        backend: IndexBackend,
        embedder: HybridEmbedder,
        build: BuildInfo,
        ids: I64,
        tracks: npt.NDArray[np.object_] | None = None,
    ) -> MainIndex:
        """Install a main index built from LMDB at ``build.lsn``; returns the old one.

        Vectors for the delta's survivors under the new statistics are computed before the
        lock; only those that arrived meanwhile are embedded under it.
        """
        lsn = build.lsn
        pre = self._embed_delta(embedder, lambda rid: rid > lsn)
        with self.lock:
            old = self.main
            main = MainIndex(backend, embedder, np.sort(ids), build, old.generation + 1, tracks)
            self._retired = [(at, rid) for at, rid in self._retired if at > lsn]
            tombs = {rid for _at, rid in self._retired if rid in main}
            missing = [rid for rid in self.delta.pos if rid > lsn and rid not in pre]
            if missing:
                pre.update(self._embed_delta(embedder, set(missing).__contains__, locked=True))
            self._state = _State(main, self.delta.rebuilt(lambda rid: rid > lsn, pre), tombs)
            self._building = False
            self._selector = None
            self.version += 1
        log.info(
            "index swap: build %d (%s, %d vectors, lsn %d); delta %d, tombstones %d",
            build.build_id, build.kind, len(main), lsn, len(self.delta), len(tombs),
        )  # fmt: skip
        return old

    def refit(
        self,
        embedder: HybridEmbedder,
        extra: list[tuple[int, RawFingerprint]],
        generation: int,
    ) -> bool:
        """Serve everything from the delta, embedded with ``embedder`` (statistics fitted on the
        library), with no main index: the state before the first build that fitted statistics.

        ``extra`` are the live entries of a main index built on the prior statistics (too few
        tracks to fit), to move into the delta. Vectors are computed before the lock; entries
        that arrived meanwhile are embedded under it. Returns False (and changes nothing) when
        the main index is no longer generation ``generation`` (a build swapped in meanwhile).
        """
        pre = self._embed_delta(embedder, lambda _rid: True)
        if extra:
            audio = np.vstack([raw.audio for _rid, raw in extra])
            emb = None
            has = None
            if embedder.embedding_dim is not None:
                emb = np.zeros((len(extra), embedder.embedding_dim), dtype=np.float32)
                has = np.zeros(len(extra), dtype=bool)
                for i, (_rid, raw) in enumerate(extra):
                    if raw.embedding is not None and raw.embedding.shape[0] == emb.shape[1]:
                        emb[i] = raw.embedding
                        has[i] = True
            vecs = embedder.embed_rows(audio, emb, has)
            pre.update({rid: vecs[i] for i, (rid, _raw) in enumerate(extra)})
        with self.lock:
            old = self._state
            if old.main.generation != generation:
                return False
            main = MainIndex(None, embedder, np.zeros(0, dtype=np.int64), None, generation + 1,
                             np.zeros(0, dtype=object))  # fmt: skip
            delta = Delta(embedder.dim, embedder.embedding_dim)
            for rid, raw in extra:
                if rid in old.main and rid not in old.tombs:
                    delta.add(rid, raw, pre[rid])
            missing = [rid for rid in old.delta.pos if rid not in pre]
            if missing:
                pre.update(self._embed_delta(embedder, set(missing).__contains__, locked=True))
            src = old.delta
            for rid, row in sorted(src.pos.items(), key=lambda kv: kv[1]):
                raw = RawFingerprint(
                    src.tracks[rid], src.audio_row(row), src.embedding_row(row), None
                )
                delta.add(rid, raw, pre[rid])
            self._state = _State(main, delta, set())
            self._selector = None
            self.version += 1
        log.info(
            "index statistics refitted on the library (%d fingerprints, %s): delta %d",
            embedder.stats.count, embedder.stats.mode, len(delta),
        )  # fmt: skip
        return True

    def _embed_delta(
        self, embedder: HybridEmbedder, keep: Callable[[int], bool], *, locked: bool = False
    ) -> dict[int, F32]:
        """New vectors for the delta entries ``keep`` accepts (``locked``: caller holds lock)."""
        if locked:
            rows = self.delta.rows()
        else:
            with self.lock:
                rows = self.delta.rows()
        if not len(rows):
            return {}
        mask = np.array([keep(int(r)) for r in rows.ids], dtype=bool)
        rows = rows.select(mask)
        if not len(rows):
            return {}
        vecs = embedder.embed_rows(rows.audio, rows.embedding, rows.has_embedding)
        return {int(r): vecs[i] for i, r in enumerate(rows.ids)}

    # ------------------------------------------------------------ queries
    def vector_of(self, rid: int) -> F32 | None:
        """The stored vector of live id ``rid`` (None if not live or not reconstructible)."""
        st = self._state
        vec = st.delta.vector(rid)
        if vec is not None:
            return vec
        main = st.main
        if main.backend is None or rid in st.tombs:
            return None
        try:  # an id the index lacks fails inside FAISS: no lookup of our own first
            return main.backend.reconstruct(rid)
        except XpStoreError as exc:  # absent, or an IVF index (no direct map): re-embed
            log.debug("no stored vector for id %d: %s", rid, exc)
            return None

    def search(
        self,
        queries: F32,
        k: int,
        *,
        exclude: Iterable[set[int]] | None = None,
        accept: Callable[[int], bool] | None = None,
        params: dict[str, int] | None = None,
    ) -> list[list[tuple[int, float]]]:
        """The best ``k`` live (id, score) per query row, by inner product, best first.

        ``exclude`` gives each row's ids to leave out (the query track itself); ``accept`` is a
        filter on ids (``where=``). Over-fetches and retries with more until ``k`` survive or
        everything was seen.
        """
        st = self._state  # one consistent (main, delta, tombstones) for the whole search
        main, delta = st.main, st.delta
        m = queries.shape[0]
        excl = list(exclude) if exclude is not None else [set() for _ in range(m)]
        total = len(main) + delta.rows_used
        fetch = k + max((len(e) for e in excl), default=0)
        if accept is None:
            fetch += min(len(st.tombs), k)
        else:
            fetch = max(fetch * 4, 64)
        results: list[list[tuple[int, float]] | None] = [None] * m
        todo = list(range(m))
        use_selector = False
        while todo:
            fetch = min(fetch, max(total, 1))
            q = queries[todo]
            with faiss_threads(self.query_threads if len(todo) == 1 else None):
                cand = self._candidates(st, q, fetch, params, use_selector)
            again: list[int] = []
            for j, row in enumerate(todo):
                got = self._filter(cand[j], st, excl[row], accept, k)
                exhausted = fetch >= total
                if len(got) >= k or exhausted:
                    results[row] = got[:k]
                else:
                    again.append(row)
            if not again:
                break
            todo = again
            if accept is None and not use_selector and main.backend is not None:
                use_selector = True  # tombstones crowded the top: let FAISS skip them
            else:
                fetch *= 4
        return [r if r is not None else [] for r in results]

    def _candidates(
        self,
        st: _State,
        q: F32,
        fetch: int,
        params: dict[str, int] | None,
        use_selector: bool,
    ) -> list[list[tuple[int, float, bool]]]:
        """(id, score, from main) per query row, best first."""
        main, delta = st.main, st.delta
        pairs: list[list[tuple[int, float, bool]]] = [[] for _ in range(q.shape[0])]
        if main.backend is not None and len(main):
            kk = min(fetch, len(main))
            params = self._params_for(main.backend, params)
            if use_selector and st.tombs:
                scores, ids = self._search_selector(main, q, kk, params)
            else:
                scores, ids = main.backend.search(q, kk, params=params)
            rows = zip(ids.tolist(), scores.tolist(), strict=True)
            for j, (row_ids, row_scores) in enumerate(rows):
                pairs[j] = [
                    (i, sc, True) for i, sc in zip(row_ids, row_scores, strict=True) if i >= 0
                ]
        if delta.rows_used:
            ds, di = delta.search(q, min(fetch, delta.rows_used))
            for j, (row_ids, row_scores) in enumerate(zip(di.tolist(), ds.tolist(), strict=True)):
                pairs[j].extend(
                    (i, sc, False) for i, sc in zip(row_ids, row_scores, strict=True) if i >= 0
                )
                pairs[j].sort(key=lambda t: -t[1])
        return pairs

    def search_one(
        self,
        q: F32,
        k: int,
        exclude: set[int],
        params: dict[str, int] | None = None,
    ) -> Found | None:
        """One query without a filter, the fast path: FAISS on the checked ``(1, dim)`` query
        directly, the delta merged in numpy, tracks from memory; ``(ids, scores, tracks)`` best
        first (a track None where memory does not know it). None when tombstones or ``exclude``
        crowded the top so that fewer than ``k`` survived: :meth:`search` handles that."""
        st = self._state
        main, delta, tombs = st.main, st.delta, st.tombs
        view = delta.view
        n_main = main.ids.shape[0]
        total = n_main + view.n
        fetch = k + len(exclude)
        if tombs:
            fetch += min(len(tombs), k)
        if fetch > total:
            fetch = max(total, 1)
        sm = im = None
        backend = main.backend
        if backend is not None and n_main:
            query_threads(self.query_threads)
            if not view.n and main.by_position:
                sm, pm = backend.search_one(
                    q, min(fetch, n_main), self._params_for(backend, params), positions=True
                )
                return self._main_by_position(st, sm[0], pm[0], k, exclude, fetch < total)
            sm, im = backend.search_one(q, min(fetch, n_main), self._params_for(backend, params))
            if not view.n:
                return self._main_only(st, sm[0], im[0], k, exclude, fetch < total)
        if not view.n:
            return [], [], []
        # the exact delta, inline: on a small delta numpy's per-call cost is the search
        ds = view.vecs[: view.n] @ q[0]
        di = view.ids[: view.n]
        if view.n > fetch:
            top = np.argpartition(-ds, fetch - 1)[:fetch]
            ds, di = ds[top], di[top]
        n_main = 0 if im is None else im.shape[1]
        ids = di if im is None else np.concatenate((im[0], di))
        scores = ds if sm is None else np.concatenate((sm[0], ds))
        order = np.argsort(-scores, kind="stable")
        ids, scores = ids[order], scores[order]
        from_main = (order < n_main).tolist()
        out: list[tuple[int, float]] = []
        now = self._state
        pos = delta.pos
        for j, (rid, score) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True)):
            if rid < 0 or rid in exclude:
                continue
            if (rid in tombs) if from_main[j] else (rid not in pos):
                continue
            if now is not st and not self.is_live(rid):
                continue
            out.append((rid, score))
            if len(out) >= k:
                break
        if len(out) < k and fetch < total:
            return None
        rids = [rid for rid, _score in out]
        return rids, [score for _rid, score in out], self.track_ids(rids)

    def _main_by_position(
        self, st: _State, scores: F32, pos: I64, k: int, exclude: set[int], more: bool
    ) -> Found | None:
        """:meth:`_main_only` of a search by position (``MainIndex.by_position``): ids and
        tracks are read at the positions FAISS answered (-1, no answer, reads as id -1)."""
        main = st.main
        assert main.tracks is not None  # by_position holds only with tracks
        held = main.ids.take(pos, mode="clip").tolist()
        names = main.tracks.take(pos, mode="clip").tolist()
        rids = held
        at = pos.tolist()
        if min(at) < 0:  # fewer answers than asked: FAISS pads with -1 (held reads ids[0])
            rids = [-1 if p < 0 else rid for p, rid in zip(at, held, strict=True)]
        elif len(at) == k and not exclude and not st.tombs and self._state is st:
            return rids, scores.tolist(), names  # the usual single query: nothing to drop
        return self._main_named(st, scores.tolist(), rids, held, names, k, exclude, more)

    def _main_only(
        self, st: _State, scores: F32, ids: I64, k: int, exclude: set[int], more: bool
    ) -> Found | None:
        """:meth:`search_one`'s answers when the delta is empty (the state after a build):
        tracks by position in the main index's sorted ids, checked, in one numpy call each."""
        main = st.main
        sorted_ids = main.ids
        pos = sorted_ids.searchsorted(ids)
        held = sorted_ids.take(pos, mode="clip").tolist()
        names = (main.tracks.take(pos, mode="clip").tolist() if main.tracks is not None
                 else [None] * len(held))  # fmt: skip
        return self._main_named(st, scores.tolist(), ids.tolist(), held, names, k, exclude, more)

    def _main_named(
        self,
        st: _State,
        vals: list[float],
        rids: list[int],
        held: list[int],
        names: list[str | None],
        k: int,
        exclude: set[int],
        more: bool,
    ) -> Found | None:
        """The answers of a main-only search: ``held[j]`` is the id whose track ``names[j]``
        is, the answer's own id when they agree (an id FAISS answered that ``held`` lacks
        gets no track from memory)."""
        tombs = st.tombs
        now = self._state
        if now is st and not tombs and held == rids:
            # no tombstone, no swap, every id found (no -1 padding): only ``exclude`` (the
            # query track itself, usually at the top) to drop, then the first k as they are
            if exclude:
                for j in [j for j, rid in enumerate(rids) if rid in exclude][::-1]:
                    del rids[j], vals[j], names[j]
            if len(rids) == k:  # the usual case: FAISS was asked for exactly k
                return rids, vals, names
            if len(rids) > k:
                return rids[:k], vals[:k], names[:k]
            return None if more else (rids, vals, names)
        out_i: list[int] = []
        out_s: list[float] = []
        out_t: list[str | None] = []
        for rid, score, have, name in zip(rids, vals, held, names, strict=True):
            if rid < 0 or rid in exclude or rid in tombs:
                continue
            if now is not st and not self.is_live(rid):
                continue
            out_i.append(rid)
            out_s.append(score)
            out_t.append(name if have == rid else None)
            if len(out_i) >= k:
                return out_i, out_s, out_t
        return None if more else (out_i, out_s, out_t)

    def _search_selector(
        self, main: MainIndex, q: F32, k: int, params: dict[str, int] | None
    ) -> tuple[F32, I64]:
        """A main-index search that skips tombstones inside FAISS (an ``IDSelectorNot``)."""
        with self.lock:
            cached = self._selector
            if cached is None or cached[0] != self.version:
                tomb_arr = np.fromiter(self.tombs, dtype=np.int64, count=len(self.tombs))
                cached = (self.version, exclusion(tomb_arr))
                self._selector = cached
        backend = main.backend
        assert backend is not None
        return backend.search(q, k, params=params, exclude=cached[1])

    def _filter(
        self,
        cands: list[tuple[int, float, bool]],
        st: _State,
        exclude: set[int],
        accept: Callable[[int], bool] | None,
        k: int,
    ) -> list[tuple[int, float]]:
        """Live candidates, checked against the search's state and then against the current
        one (a swap or a retirement may have happened while FAISS searched)."""
        out: list[tuple[int, float]] = []
        seen: set[int] = set()
        now = self._state
        tombs, pos = st.tombs, st.delta.pos
        for rid, score, from_main in cands:
            if rid in seen or rid in exclude:
                continue
            seen.add(rid)
            if (rid in tombs) if from_main else (rid not in pos):
                continue
            if now is not st and not self.is_live(rid):
                continue
            if accept is not None and not accept(rid):
                continue
            out.append((rid, score))
            if len(out) >= k:
                break
        return out

    # ------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        main = self.main
        build = main.build
        return {
            "kind": build.kind if build is not None else None,
            "size": len(main),
            "delta": len(self.delta),
            "tombstones": len(self.tombs),
            "live": self.live_count(),
            "lsn": build.lsn if build is not None else None,
            "build_id": build.build_id if build is not None else None,
            "built_at": build.built_at if build is not None else None,
            "build_seconds": build.duration_s if build is not None else None,
            "recall_at_10": build.recall_at_10 if build is not None else None,
            "params": build.params if build is not None else {},
            "stats_mode": main.embedder.stats.mode,
            "stats_count": main.embedder.stats.count,
            "dim_weights": (
                str(build.embedder.get("dim_weights_source"))
                if build is not None and build.embedder is not None
                else None
            ),
            "building": self._building,
            "age_s": time.time() - build.built_at if build is not None else None,
        }
