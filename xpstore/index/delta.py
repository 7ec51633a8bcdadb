"""The serving layer's exact delta: the fingerprints acknowledged since the main index was built.

Append-only numpy buffers of ids, hybrid vectors and raw audio values; a removal marks its row's
id -1 and compaction happens at a swap (:meth:`Delta.rebuilt`). Mutations run under the index
server's lock; searches read a :class:`_DeltaView` (rows below ``n`` never change) without it.
An attach adopts the arrays it decoded (``add_many(owned=True)``) instead of copying them.
See :mod:`xpstore.index.serving` for how the delta, the main index and the tombstones make the
live set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from xpstore.index.rows import FingerprintRows, RawFingerprint

__all__ = ["Delta"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_MIN_CAP = 64


@dataclass(frozen=True)
class _DeltaView:
    """What a search reads: rows below ``n`` of these buffers never change (ids may turn -1)."""

    ids: I64
    vecs: F32
    n: int


@dataclass
class Delta:
    """Exact store of recent vectors: append-only buffers, removal by id -1, compaction on swap.

    Mutations happen under the server's lock; searches read a :class:`_DeltaView` without it.
    """

    dim: int
    embedding_dim: int | None
    pos: dict[int, int] = field(default_factory=dict)  # live id -> row
    tracks: dict[int, str] = field(default_factory=dict)  # live id -> track id
    _ids: I64 = field(init=False)
    _vecs: F32 = field(init=False)
    _audio: npt.NDArray[np.float64] = field(init=False)
    _emb: F32 | None = field(init=False)
    _has: npt.NDArray[np.bool_] = field(init=False)
    view: _DeltaView = field(init=False)

    def __post_init__(self) -> None:
        self._alloc(_MIN_CAP)
        self.view = _DeltaView(self._ids, self._vecs, 0)

    def _alloc(self, cap: int) -> None:
        self._ids = np.full(cap, -1, dtype=np.int64)
        self._vecs = np.zeros((cap, self.dim), dtype=np.float32)
        # not filled: every add writes whole rows, and nothing reads a row past ``view.n``
        # (a fill would touch every page: 0.3-0.6 s for the million rows of a first attach)
        self._audio = np.empty((cap, 25))
        self._emb = np.zeros((cap, self.embedding_dim), np.float32) if self.embedding_dim else None
        self._has = np.zeros(cap, dtype=bool)

    def __len__(self) -> int:
        return len(self.pos)

    @property
    def rows_used(self) -> int:
        return self.view.n

    def add(self, rid: int, raw: RawFingerprint, vec: F32) -> None:
        if rid in self.pos:
            return
        n = self.view.n
        if n == self._ids.shape[0]:
            self._grow(max(_MIN_CAP, 2 * n))
        self._vecs[n] = vec
        self._audio[n] = raw.audio
        emb = raw.embedding
        if self._emb is not None and emb is not None and emb.shape[0] == self._emb.shape[1]:
            self._emb[n] = emb
            self._has[n] = True
        self._ids[n] = rid  # last: a reader that sees the id sees its vector
        self.pos[rid] = n
        self.tracks[rid] = raw.track_id
        self.view = _DeltaView(self._ids, self._vecs, n + 1)

    def add_many(
        self,
        ids: I64,
        track_ids: list[str],
        audio: npt.NDArray[np.float64],
        emb: F32 | None,
        has: npt.NDArray[np.bool_] | None,
        vecs: F32,
        *,
        owned: bool = False,
    ) -> None:
        """:meth:`add` of many new ids at once (none of them in the delta yet). ``owned``: the
        caller hands ``audio`` and ``vecs`` over (never to write them again), and an empty
        delta keeps them as its buffers instead of copying them (an attach's library)."""
        m = ids.shape[0]
        if m == 0:
            return
        n = self.view.n
        if owned and n == 0 and m > _MIN_CAP and vecs.dtype == np.float32 and (
            audio.dtype == np.float64
        ):
            self._take(audio, vecs)
        else:
            if n + m > self._ids.shape[0]:  # doubling, but a first bulk add gets m + 1/8
                self._grow(max(_MIN_CAP, 2 * n, n + m + m // 8))
            self._vecs[n : n + m] = vecs
            self._audio[n : n + m] = audio
        known = self._emb
        if known is not None and emb is not None and has is not None and (
            emb.shape[1] == known.shape[1]
        ):
            known[n : n + m] = emb
            self._has[n : n + m] = has
        self._ids[n : n + m] = ids  # last: a reader that sees an id sees its vector
        keys = ids.tolist()
        self.pos.update(zip(keys, range(n, n + m), strict=True))
        self.tracks.update(zip(keys, track_ids, strict=True))
        self.view = _DeltaView(self._ids, self._vecs, n + m)

    def _take(self, audio: npt.NDArray[np.float64], vecs: F32) -> None:
        """An empty delta's first bulk add (an attach's whole library) keeps the caller's
        arrays as its buffers, full, instead of copying ~300 MB per million rows into new
        ones: the next add grows them. The caller hands them over and never writes to them
        again; the small buffers (ids, flags, embeddings) are made here as usual."""
        m = vecs.shape[0]
        self._alloc(0)
        self._ids = np.full(m, -1, dtype=np.int64)
        self._vecs = np.ascontiguousarray(vecs)
        self._audio = np.ascontiguousarray(audio)
        self._has = np.zeros(m, dtype=bool)
        if self.embedding_dim:
            self._emb = np.zeros((m, self.embedding_dim), np.float32)

    def _grow(self, cap: int) -> None:
        n = self.view.n
        old = (self._ids, self._vecs, self._audio, self._emb, self._has)
        self._alloc(cap)
        self._ids[:n] = old[0][:n]
        self._vecs[:n] = old[1][:n]
        self._audio[:n] = old[2][:n]
        if self._emb is not None and old[3] is not None:
            self._emb[:n] = old[3][:n]
        self._has[:n] = old[4][:n]

    def remove(self, rid: int) -> bool:
        row = self.pos.pop(rid, None)
        if row is None:
            return False
        self.tracks.pop(rid, None)
        self._ids[row] = -1
        return True

    def audio_row(self, row: int) -> npt.NDArray[np.float64]:
        return np.asarray(self._audio[row], dtype=np.float64)

    def embedding_row(self, row: int) -> F32 | None:
        if self._emb is not None and self._has[row]:
            return np.asarray(self._emb[row], dtype=np.float32)
        return None

    def vector(self, rid: int) -> F32 | None:
        row = self.pos.get(rid)
        return None if row is None else self._vecs[row].copy()

    def rows(self) -> FingerprintRows:
        """The live entries as rows (to re-embed them under new statistics)."""
        live = np.array(sorted(self.pos.values()), dtype=np.int64)
        return FingerprintRows(
            self._ids[live].copy(),
            [self.tracks[int(r)] for r in self._ids[live]],
            self._audio[live].copy(),
            self._emb[live].copy() if self._emb is not None else None,
            self._has[live].copy(),
        )

    def rebuilt(self, keep: Callable[[int], bool], vectors: dict[int, F32] | None) -> Delta:
        """A compact copy holding the live ids ``keep`` accepts (with new vectors if given)."""
        out = Delta(self.dim, self.embedding_dim)
        for rid, row in sorted(self.pos.items(), key=lambda kv: kv[1]):
            if not keep(rid):
                continue
            emb = None
            if self._emb is not None and self._has[row]:
                emb = self._emb[row]
            raw = RawFingerprint(self.tracks[rid], self._audio[row], emb, None)
            vec = vectors[rid] if vectors is not None else self._vecs[row]
            out.add(rid, raw, vec)
        return out

    def search(self, q: F32, k: int) -> tuple[F32, I64]:
        """Exact top ``k`` (scores, ids) per query row over the live entries; -1 pads."""
        view = self.view
        m = q.shape[0]
        if m == 1 and view.n:
            return self._search_one(q[0], k, view)
        out_s = np.full((m, k), -np.inf, dtype=np.float32)
        out_i = np.full((m, k), -1, dtype=np.int64)
        if view.n == 0:
            return out_s, out_i
        scores = q @ view.vecs[: view.n].T  # (m, n)
        ids = view.ids[: view.n].copy()
        scores[:, ids < 0] = -np.inf
        kk = min(k, view.n)
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        top = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        out_s[:, :kk] = np.take_along_axis(scores, best, axis=1)
        out_i[:, :kk] = ids[best]
        out_i[out_s == -np.inf] = -1
        return out_s, out_i


    @staticmethod
    def _search_one(q: F32, k: int, view: _DeltaView) -> tuple[F32, I64]:
        """:meth:`search` of one query, in 1-D (the general form's axis bookkeeping costs a
        single query more than the search itself on a small delta)."""
        n = view.n
        scores = view.vecs[:n] @ q
        ids = view.ids[:n]
        scores[ids < 0] = -np.inf
        kk = min(k, n)
        top = np.argpartition(-scores, kk - 1)[:kk] if kk < n else np.arange(n)
        top = top[np.argsort(-scores[top], kind="stable")]
        out_s = np.full((1, k), -np.inf, dtype=np.float32)
        out_i = np.full((1, k), -1, dtype=np.int64)
        out_s[0, :kk] = scores[top]
        out_i[0, :kk] = ids[top]
        out_i[out_s == -np.inf] = -1
        return out_s, out_i
