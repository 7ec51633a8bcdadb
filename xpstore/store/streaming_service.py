"""Streaming values while a track plays, and query strategies (issue 11): ``put_streaming``,
``similar(strategy=...)``, ``streaming_cache_stats``. docs/validation.md ("Query strategies and
the streaming cache") is the user's account; the data structures are ``index.streaming``.

* ``put_streaming`` caches a player's values in memory (TTL, LRU by MB, replaced only by values
  of at least the cached confidence); ``final=True`` writes them through the WAL as the track's
  fingerprint (keeping the batch values, embedding and metadata of the current one, so nothing is
  lost; with batch values present the pair is validated at once when ``validation.auto``).
* ``strategy="fast"`` searches the streaming space: every stored fingerprint's streaming values
  and every cached entry, so a track is findable from its first chunk, before anything is
  written; ``"accurate"`` re-ranks ``k * streaming.accurate_factor`` fast candidates by batch
  values where present; ``"batch"`` is the index search (``similar`` without a strategy);
  ``"auto"`` picks by the query's streaming confidence and validation status, and every answer
  says which strategy produced it (``Neighbor.strategy``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from xpstore.config import StoreConfig
from xpstore.errors import InvalidArgumentError, InvalidRecordError, RecordNotFoundError
from xpstore.index.neighbors import Neighbor
from xpstore.index.streaming import StreamingCache, top_k
from xpstore.model.records import (
    BATCH_FIELDS,
    Fingerprint,
    StreamingFingerprint,
    record_from_json,
)
from xpstore.model.where import compile_where
from xpstore.persistence.lmdb_tables import from_u64
from xpstore.store.engine import Engine
from xpstore.store.index_service import IndexService, check_k
from xpstore.store.reader import Reader
from xpstore.store.validation_service import StreamingValidator
from xpstore.store.writer import Writer

__all__ = ["STRATEGIES", "StreamingPut", "StreamingService"]

log = logging.getLogger(__name__)

STRATEGIES = ("fast", "accurate", "batch", "auto")
MiB = 1024 * 1024
F64 = npt.NDArray[np.float64]
_COL = {name: j for j, name in enumerate(BATCH_FIELDS)}


@dataclass(frozen=True)
class StreamingPut:
    """What ``put_streaming`` did."""

    track_id: str
    cached: bool
    """True when these values are the cached ones now (False: a cached entry had a higher
    mean confidence and was kept)."""
    mean_confidence: float
    record_id: int | None = None
    """The fingerprint written through the WAL (``final=True``), else None."""
    validation: str | None = None
    """The verdict when ``final=True`` wrote streaming and batch values together."""


@dataclass
class _Query:
    stream: dict[str, float] | None
    confidence: float | None
    batch: dict[str, float] | None
    status: str | None
    track: str | None
    stored: bool


class StreamingService:
    """The streaming cache and the query strategies of one open store."""

    def __init__(
        self, engine: Engine, reader: Reader, writer: Writer, index: IndexService,
        validator: StreamingValidator,
    ) -> None:  # fmt: skip
        self._engine = engine
        self._reader = reader
        self._writer = writer
        self._index = index
        self._validator = validator
        self.batch_search: Callable[..., list[Neighbor]] = index.similar
        """What the ``batch`` strategy (and no strategy) searches with: the local index, or
        the configured backend's router (``parts.compose`` sets it; issue 16)."""
        cfg = engine.config.streaming
        self.cache = StreamingCache(int(cfg.cache_mb * MiB), cfg.ttl_s)
        self._lock = threading.Lock()
        self._space_key: tuple[int, int, int, int] | None = None
        self._space: tuple[list[str], list[int], F64, npt.NDArray[np.bool_]] | None = None
        engine.settings.watch(self._configure)

    def _configure(self, config: StoreConfig) -> None:
        self.cache.resize(int(config.streaming.cache_mb * MiB), config.streaming.ttl_s)

    # ------------------------------------------------------------------ cache
    def put(
        self, track_id: str, values: Mapping[str, float], confidence: Mapping[str, float],
        chunk_count: int, final: bool,
    ) -> StreamingPut:  # fmt: skip
        """See :meth:`xpstore.Store.put_streaming`."""
        self._engine.check_open()
        if not isinstance(track_id, str) or not track_id:
            raise InvalidArgumentError("track_id must be a non-empty string", field="track_id")
        if not isinstance(final, bool):
            raise InvalidArgumentError(f"final must be True or False, got {final!r}",
                                       field="final")  # fmt: skip
        if not isinstance(values, Mapping) or not isinstance(confidence, Mapping):
            raise InvalidRecordError("values and confidence must map names to numbers",
                                     field="values")  # fmt: skip
        try:
            sf = StreamingFingerprint(values=dict(values), confidence=dict(confidence),
                                      chunk_count=chunk_count)  # fmt: skip
        except InvalidRecordError:
            raise
        except ValueError as exc:
            raise InvalidRecordError(f"streaming: {exc}", field="streaming") from exc
        if final:
            self._engine.writable()
        cached, entry = self.cache.offer(track_id, sf.values, sf.confidence, sf.chunk_count)
        if not final:
            return StreamingPut(track_id, cached, entry.mean_confidence)
        rid = self._reader.read_track(track_id)
        current = self._reader.get(rid).record if rid is not None else None
        if isinstance(current, Fingerprint):
            fp = current.model_copy(update={"streaming": sf, "validation": None, "ts": None})
            fp = Fingerprint.model_validate(fp.model_dump(exclude_none=True))
        else:
            fp = Fingerprint(track_id=track_id, streaming=sf)
        new_id = self._writer.put_many([fp])[0]
        self.cache.pop(track_id)  # written: the store holds these values now
        verdict = None
        if fp.batch is not None and self._engine.config.validation.auto:
            verdict = self._validator.validate(track_id, None, None, True).status
        return StreamingPut(track_id, True, sf.mean_confidence(), new_id, verdict)

    def stats(self) -> dict[str, Any]:
        return self.cache.stats()

    # ------------------------------------------------------------------ strategies
    def similar(
        self,
        strategy: str | None,
        track_id: str | None,
        fingerprint: Fingerprint | Mapping[str, Any] | None,
        vector: npt.ArrayLike | None,
        **kw: Any,
    ) -> list[Neighbor]:
        """See :meth:`xpstore.Store.similar`: ``strategy`` None or ``"batch"`` is the index."""
        if strategy is None:
            return self.batch_search(track_id, fingerprint, vector, **kw)
        if strategy not in STRATEGIES:
            raise InvalidArgumentError(
                f"unknown strategy {strategy!r}; expected one of {STRATEGIES}", field="strategy"
            )
        self._engine.check_open()
        k = check_k(kw["k"])
        if strategy == "batch":
            return _tag(self.batch_search(track_id, fingerprint, vector, **kw), "batch")
        for name in ("weights", "params"):
            if kw.get(name) is not None:
                raise InvalidArgumentError(f"{name}= applies to the batch strategy only",
                                           field=name)  # fmt: skip
        if vector is not None or kw.get("precomputed"):
            raise InvalidArgumentError(
                f"strategy={strategy!r} needs a track_id or a fingerprint", field="strategy"
            )
        query = self._query(track_id, fingerprint)
        picked = strategy
        if strategy == "auto":
            picked = self._pick(query)
            if picked == "batch":
                return _tag(self.batch_search(track_id, fingerprint, None, **kw), "batch")
        if query.stream is None:
            raise InvalidArgumentError(
                f"strategy={strategy!r} needs streaming values; the query has none",
                field="strategy",
            )
        predicate = compile_where(kw.get("where"), ("fingerprint",))
        own = query.track if kw.get("exclude_self", True) else None
        hits = self._fast(query, k * (self._engine.config.streaming.accurate_factor
                                      if picked == "accurate" else 1), own, predicate)  # fmt: skip
        if picked == "accurate":
            hits = self._rerank(query, hits)
        return _tag(hits[:k], picked)

    def _pick(self, query: _Query) -> str:
        """Chosen by measurement on the real set (docs/validation.md): batch values, where the
        query has them, beat every streaming strategy, whatever the streaming confidence or
        validation (0.647 against 0.256 fast, 0.449 accurate, and 0.278 for Auralis's rule
        "fast when confident and validated"); a streaming-only query is best served by fast
        (0.256 against 0.198 accurate and 0.167 batch) unless its confidence is below
        ``accurate_confidence``, where the batch values of the candidates decide (accurate).
        A stored query whose streaming values were found ``invalid`` never uses them."""
        cfg = self._engine.config.streaming
        conf = query.confidence
        if query.batch is not None or query.stream is None or query.status == "invalid":
            return "batch"
        if conf is not None and conf >= cfg.accurate_confidence:
            return "fast"
        return "accurate"

    def _query(self, track_id: str | None, fingerprint: Any) -> _Query:
        given = [x is not None for x in (track_id, fingerprint)]
        if sum(given) != 1:
            raise InvalidArgumentError("give exactly one of track_id or fingerprint=",
                                       field="track_id")  # fmt: skip
        if track_id is not None:
            track = str(track_id)
            entry = self.cache.get(track)
            rid = self._reader.read_track(track)
            fp = self._reader.get(rid).record if rid is not None else None
            if entry is None and fp is None:
                raise RecordNotFoundError(f"no track {track!r}")
            assert fp is None or isinstance(fp, Fingerprint)
            stream = conf = None
            if entry is not None:
                stream, conf = entry.values, entry.mean_confidence
            elif fp is not None and fp.streaming is not None:
                stream, conf = dict(fp.streaming.values), fp.streaming.mean_confidence()
            status = fp.validation.status if fp is not None and fp.validation else None
            batch = fp.batch.as_dict() if fp is not None and fp.batch is not None else None
            return _Query(stream, conf, batch, status, track, fp is not None)
        if isinstance(fingerprint, Fingerprint):
            fp = fingerprint
        elif isinstance(fingerprint, Mapping):
            rec = record_from_json({"kind": "fingerprint", **fingerprint})
            assert isinstance(rec, Fingerprint)
            fp = rec
        else:
            raise InvalidArgumentError("fingerprint must be a Fingerprint or a mapping",
                                       field="fingerprint")  # fmt: skip
        stream = dict(fp.streaming.values) if fp.streaming is not None else None
        conf = fp.streaming.mean_confidence() if fp.streaming is not None else None
        status = fp.validation.status if fp.validation else None
        batch = fp.batch.as_dict() if fp.batch else None
        return _Query(stream, conf, batch, status, fp.track_id, False)

    def _unit(self, rows: F64) -> F64:
        server = self._index.serving()
        z = server.embedder.standardize(rows)
        norm = np.linalg.norm(z, axis=1, keepdims=True)
        out: F64 = np.where(norm > 1e-12, z / np.where(norm > 1e-12, norm, 1.0), 0.0)
        return out

    def _space_now(self) -> tuple[list[str], list[int], F64, npt.NDArray[np.bool_]]:
        """Tracks, record ids (-1: cache only), unit streaming vectors, has batch values."""
        from xpstore.index.rows import streaming_audio

        server = self._index.serving()
        key = (id(server), server.version, server.generation, self.cache.version)
        with self._lock:
            if self._space is not None and self._space_key == key:
                return self._space
            engine = self._engine
            if not engine.readonly:
                engine.apply_through_acked()
            tracks: list[str] = []
            ids: list[int] = []
            rows: list[F64] = []
            has_batch: list[bool] = []
            where: dict[str, int] = {}
            tables = engine.tables
            with tables.reading() as txn:
                for _key, value in tables.iter_tracks(txn):
                    rid = from_u64(value)
                    data = tables.get_record(txn, rid)
                    row = streaming_audio(data, f"record {rid}") if data is not None else None
                    if row is None:
                        continue
                    where[row.track_id] = len(tracks)
                    tracks.append(row.track_id)
                    ids.append(rid)
                    rows.append(row.audio)
                    has_batch.append(row.has_batch)
            for entry in self.cache.entries():
                audio = np.full(len(BATCH_FIELDS), np.nan)
                for name, x in entry.values.items():
                    audio[_COL[name]] = x
                at = where.get(entry.track_id)
                if at is not None:
                    rows[at] = audio  # the player's newer values win over the stored ones
                else:
                    known = self._reader.read_track(entry.track_id)
                    tracks.append(entry.track_id)
                    ids.append(known if known is not None else -1)
                    rows.append(audio)
                    has_batch.append(False)
            matrix = self._unit(np.vstack(rows)) if rows else np.zeros((0, len(BATCH_FIELDS)))
            self._space = (tracks, ids, matrix, np.array(has_batch, dtype=bool))
            self._space_key = key
            return self._space

    def _fast(self, query: _Query, k: int, own: str | None, predicate: Any) -> list[Neighbor]:
        tracks, ids, matrix, _has = self._space_now()
        assert query.stream is not None
        q = self._unit(_row(query.stream)[None, :])[0]
        exclude = tracks.index(own) if own is not None and own in tracks else None
        fetch = k if predicate is None else len(tracks)
        out: list[Neighbor] = []
        for row, score in top_k(q, matrix, fetch, exclude):
            rid = ids[row]
            if predicate is not None:
                exp = self._reader.read_get(rid) if rid >= 0 else None
                if exp is None or not predicate(exp):
                    continue
            out.append(Neighbor(tracks[row], score, rid, None))
            if len(out) >= k:
                break
        return self._with_metadata(out)

    def _rerank(self, query: _Query, hits: list[Neighbor]) -> list[Neighbor]:
        """Score each candidate by the index's audio similarity of batch values where both have
        them (the query's streaming values otherwise)."""
        q_vals = query.batch if query.batch is not None else query.stream
        assert q_vals is not None
        q = self._unit(_row(q_vals)[None, :])[0]
        rows = []
        for hit in hits:
            exp = self._reader.read_get(hit.record_id) if hit.record_id >= 0 else None
            rec = exp.record if exp is not None else None
            if isinstance(rec, Fingerprint) and rec.batch is not None:
                rows.append(_row(rec.batch.as_dict()))
            else:
                entry = self.cache.entries()
                cached = next((e.values for e in entry if e.track_id == hit.track_id), None)
                values = cached or (dict(rec.streaming.values)
                                    if isinstance(rec, Fingerprint) and rec.streaming else {})
                rows.append(_row(values))  # fmt: skip
        if not rows:
            return []
        scores = self._unit(np.vstack(rows)) @ q
        order = np.argsort(-scores, kind="stable")
        return [dataclasses.replace(hits[i], score=float(scores[i])) for i in order.tolist()]

    def _with_metadata(self, hits: list[Neighbor]) -> list[Neighbor]:
        stored = [(h.record_id, h.score) for h in hits if h.record_id >= 0]
        mapped = {n.record_id: n for n in self._index.neighbors(stored)}
        return [
            dataclasses.replace(h, metadata=mapped[h.record_id].metadata)
            if h.record_id in mapped else h
            for h in hits
        ]  # fmt: skip


def _row(values: Mapping[str, float]) -> F64:
    out = np.full(len(BATCH_FIELDS), np.nan)
    for name, x in values.items():
        j = _COL.get(name)
        if j is not None:
            out[j] = float(x)
    return out


def _tag(hits: list[Neighbor], strategy: str) -> list[Neighbor]:
    return [dataclasses.replace(h, strategy=strategy) for h in hits]
