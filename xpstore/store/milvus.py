"""Milvus as the similarity engine (issue 16, part 1): a follower that mirrors the store's live
fingerprints into a Milvus collection, and the ``index.backend="milvus"`` query path.

The store stays the source of truth; Milvus is a follower of it (docs/scale-out.md).

**The collection.** One row per live track: ``track_id`` (primary key), ``vector`` (the
store's hybrid embedding, exactly as the local index embeds it: the statistics and weights of
the index's last build, vectorized by the same ``HybridEmbedder.embed_rows`` a build uses),
``record_id`` (the track's current fingerprint), ``lsn`` (the LSN of that record's state),
``ts`` and ``metadata`` (a JSON field, so ``where={"metadata.artist": ...}`` becomes a Milvus
boolean expression). Index: ``FLAT`` with inner product (exact, as the local exact index; a
cluster would choose HNSW/IVF and measure recall). Readers query the *alias* (``milvus.collection``,
default ``xpstore``); the follower's collections are named ``<alias>__<embedder key>``, the key
being the first 16 hex digits of a sha256 over the embedder's statistics and weights.

**The follower** (:class:`Follower`; ``xpstore sync milvus``) runs in a process that opened the
store read-only. It reads ``Store.changes`` from its high-water LSN in batches of
``milvus.batch_size`` operations, turns each batch into the set of tracks it touched (a put's
``track_id``, a ``delete_track``, the track of an updated or deleted fingerprint: looked up in the
store, or in Milvus by ``record_id`` when the store no longer has it), reads each touched track's
*current* state from the store, upserts the live ones and deletes the retired ones, and only
then records the batch's last LSN in the collection's properties (``xpstore.hwm``). Upserts and
deletes are idempotent and the state written is always the store's current one, so a SIGKILL
at any instruction resumes from the recorded LSN without loss or duplicates (the primary key is
the track). When the feed cannot serve the LSNs after the high-water mark (a checkpoint removed
them: :class:`~xpstore.errors.ChangesTruncatedError`) the follower resynchronizes from one LMDB
read (every live track upserted, every other row deleted, high-water = that read's LSN).

**Blue-green re-embedding.** When the index's embedding changes (a rebuild fitted new
statistics, new weights), the follower builds a new collection under the new key from one LMDB
read, catches it up through the feed, then switches the alias to it (Milvus's own atomic
mechanism) and drops the old one: readers see the old collection or the new one, never a
half-updated mix.

**Queries** (:class:`MilvusSimilarity`): ``similar(track_id)`` searches with the track's vector
as Milvus holds it; ``fingerprint=`` is embedded locally with the index's embedder, used only
when its key is the collection's; ``where=`` on ``track_id``, ``ts`` and ``metadata.*`` is
translated into a Milvus expression, anything else is applied afterwards on the store's records
(over-fetching ``k * milvus.overfetch``). An unreachable server, a timeout or a collection that
does not exist yet falls back to the local index with a logged warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from xpstore.config import MilvusSettings
from xpstore.errors import (
    ChangesTruncatedError,
    ExtraMissingError,
    IndexNotBuiltError,
    InvalidArgumentError,
    InvalidRecordError,
    MilvusUnavailableError,
    RecordNotFoundError,
    XpStoreError,
)
from xpstore.index.neighbors import Neighbor
from xpstore.model.records import Fingerprint
from xpstore.model.where import compile_where
from xpstore.ops.replay import ReplayItem
from xpstore.persistence.crashpoints import crash_point
from xpstore.persistence.lmdb_tables import from_u64
from xpstore.store.changes import ChangeFeed
from xpstore.store.engine import Engine
from xpstore.store.index_service import IndexService
from xpstore.store.reader import Reader

__all__ = [
    "Follower",
    "MilvusMirror",
    "MilvusSimilarity",
    "SyncReport",
    "connect",
    "embedder_key",
    "sync_status",
]

log = logging.getLogger(__name__)

HWM = "xpstore.hwm"
KEY = "xpstore.embedder"
STORE = "xpstore.store_id"
SYNCED_AT = "xpstore.synced_at"
MIN_FIT_ROWS = 32  # xpstore.index.build.MIN_FIT_ROWS (not imported: it pulls FAISS in)
_TRACK_MAX = 4096
_QUERY_PAGE = 4096
_MAX_TOPK = 16_384  # Milvus's topk limit


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as exc:
        raise ExtraMissingError(
            'Milvus needs pymilvus (and milvus-lite for a local file): pip install '
            '"xpstore[milvus]"',
            extra="milvus",
        ) from exc
    return pymilvus


def connect(uri: str, timeout_s: float) -> Any:
    """A ``MilvusClient`` for ``uri`` (a server URL or a Milvus Lite ``.db`` file); the token
    comes from ``XPSTORE_MILVUS_TOKEN`` when set. MilvusUnavailableError if it cannot connect."""
    pymilvus = _pymilvus()
    token = os.environ.get("XPSTORE_MILVUS_TOKEN", "")
    try:
        return pymilvus.MilvusClient(uri=uri, token=token, timeout=timeout_s)
    except Exception as exc:  # pymilvus raises its own tree, grpc errors and OSErrors
        raise MilvusUnavailableError(f"cannot connect to Milvus at {uri!r}: {exc}") from exc


def embedder_key(embedder: Any) -> str:
    """16 hex digits naming an embedding: statistics (their checksum), block and per-dimension
    weights, embedding dimension. Equal keys embed every fingerprint to the same vector."""
    payload = {
        "stats": embedder.stats.to_dict()["checksum"],
        "weights": embedder.weights,
        "dim_weights": embedder.dim_weights,
        "embedding_dim": embedder.embedding_dim,
    }
    raw = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


# ============================================================================ the collection


class MilvusMirror:
    """The follower's and the readers' view of one alias and its collections."""

    def __init__(self, client: Any, alias: str) -> None:
        self.client = client
        self.alias = alias

    def collection_for(self, key: str) -> str:
        return f"{self.alias}__{key}"

    def active(self) -> str | None:
        """The collection the alias points to (None: no alias yet)."""
        listed = self.client.list_aliases()
        if self.alias not in (listed.get("aliases") or []):
            return None
        info = self.client.describe_alias(alias=self.alias)
        name = info.get("collection_name") if isinstance(info, dict) else None
        return str(name) if name else None

    def load(self, collection: str) -> None:
        """Load ``collection`` for search and query (a reopened Milvus Lite, a restarted
        server, a new collection hold it released)."""
        state = self.client.get_load_state(collection).get("state")
        if getattr(state, "name", str(state)) != "Loaded":
            self.client.load_collection(collection)

    def properties(self, collection: str) -> dict[str, str]:
        desc = self.client.describe_collection(collection)
        props = desc.get("properties") or {}
        return {str(k): str(v) for k, v in props.items()}

    def hwm(self, collection: str) -> int:
        return int(self.properties(collection).get(HWM, "0"))

    def ensure(self, collection: str, dim: int, key: str, store_id: str) -> None:
        """Create ``collection`` (idempotent) with the schema and an exact inner-product index."""
        client = self.client
        if client.has_collection(collection):
            props = self.properties(collection)
            if props.get(STORE) not in (None, store_id):
                raise XpStoreError(
                    f"Milvus collection {collection!r} mirrors store {props.get(STORE)}, not "
                    f"{store_id}: use another --collection"
                )
            self.load(collection)
            return
        pm = _pymilvus()
        dt = pm.DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("track_id", dt.VARCHAR, is_primary=True, max_length=_TRACK_MAX)
        schema.add_field("vector", dt.FLOAT_VECTOR, dim=dim)
        schema.add_field("record_id", dt.INT64)
        schema.add_field("lsn", dt.INT64)
        schema.add_field("ts", dt.DOUBLE)
        schema.add_field("metadata", dt.JSON)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_collection(collection, schema=schema, index_params=index)
        client.alter_collection_properties(
            collection, properties={HWM: "0", KEY: key, STORE: store_id}
        )
        self.load(collection)

    def set_hwm(self, collection: str, lsn: int) -> None:
        self.client.alter_collection_properties(
            collection, properties={HWM: str(lsn), SYNCED_AT: f"{time.time():.3f}"}
        )

    def switch(self, collection: str) -> str | None:
        """Point the alias at ``collection`` (atomic in Milvus); return the old target."""
        old = self.active()
        if old == collection:
            return old
        if old is None:
            self.client.create_alias(collection_name=collection, alias=self.alias)
        else:
            self.client.alter_alias(collection_name=collection, alias=self.alias)
        return old

    def upsert(self, collection: str, rows: list[dict[str, Any]]) -> None:
        if rows:
            self.client.upsert(collection, rows)

    def delete(self, collection: str, tracks: Iterable[str]) -> None:
        ids = list(tracks)
        if ids:
            self.client.delete(collection, ids=ids)

    def tracks_of_records(self, collection: str, record_ids: list[int]) -> dict[int, str]:
        """record id -> track of the rows holding those records."""
        out: dict[int, str] = {}
        for i in range(0, len(record_ids), _QUERY_PAGE):
            part = record_ids[i : i + _QUERY_PAGE]
            rows = self.client.query(
                collection, filter=f"record_id in {part}", output_fields=["track_id", "record_id"]
            )
            out.update({int(r["record_id"]): str(r["track_id"]) for r in rows})
        return out

    def all_tracks(self, collection: str, max_record_id: int) -> set[str]:
        """Every primary key of ``collection`` (resync's delete pass), read in windows of
        record ids: ids are unique, so a window of ``_MAX_TOPK`` ids never holds more rows
        than one query may return (Milvus Lite has no query iterator)."""
        out: set[str] = set()
        for lo in range(0, max_record_id + 1, _MAX_TOPK):
            rows = self.client.query(
                collection, filter=f"record_id >= {lo} and record_id < {lo + _MAX_TOPK}",
                output_fields=["track_id"], limit=_MAX_TOPK,
            )  # fmt: skip
            out.update(str(r["track_id"]) for r in rows)
        return out

    def count(self, collection: str) -> int:
        rows = self.client.query(collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0


# ============================================================================ the follower


@dataclass
class SyncReport:
    """What one ``Follower.run`` did."""

    collection: str = ""
    alias: str = ""
    hwm: int = 0
    store_lsn: int = 0
    operations: int = 0
    upserted: int = 0
    deleted: int = 0
    batches: int = 0
    resyncs: int = 0
    switches: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection, "alias": self.alias, "hwm": self.hwm,
            "store_lsn": self.store_lsn, "lag_lsn": max(0, self.store_lsn - self.hwm),
            "operations": self.operations, "upserted": self.upserted, "deleted": self.deleted,
            "batches": self.batches, "resyncs": self.resyncs, "switches": self.switches,
            "seconds": round(self.seconds, 3),
        }  # fmt: skip


class Follower:
    """Mirrors one store into Milvus (see the module doc). Built over a read-only (or writer)
    store's engine, reader, index and change feed."""

    def __init__(
        self,
        engine: Engine,
        reader: Reader,
        index: IndexService,
        feed: ChangeFeed,
        mirror: MilvusMirror,
        settings: MilvusSettings,
    ) -> None:
        self._engine = engine
        self._reader = reader
        self._index = index
        self._feed = feed
        self.mirror = mirror
        self.settings = settings
        self._stamp: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ public
    def run(
        self,
        *,
        follow: bool = False,
        stop: threading.Event | None = None,
        on_batch: Callable[[SyncReport], None] | None = None,
    ) -> SyncReport:
        """Catch up (and with ``follow`` keep tailing until ``stop`` is set)."""
        report = SyncReport(alias=self.mirror.alias)
        start = time.monotonic()
        stop = stop or threading.Event()
        while True:
            try:
                self._round(report, on_batch)
            except IndexNotBuiltError as exc:
                if not follow:
                    raise
                log.warning("%s; waiting", exc)
            except XpStoreError:
                raise
            except Exception as exc:
                if not _from_milvus(exc):
                    raise
                if not follow:
                    raise MilvusUnavailableError(
                        f"Milvus refused a request or did not answer: {exc}"
                    ) from exc
                log.warning("Milvus refused a request or did not answer (%s); retrying", exc)
            report.seconds = time.monotonic() - start
            if not follow or stop.wait(self.settings.poll_s):
                return report

    # ------------------------------------------------------------------ one round
    def _round(self, report: SyncReport, on_batch: Callable[[SyncReport], None] | None) -> None:
        embedder = self._embedder()
        key = embedder_key(embedder)
        mirror = self.mirror
        target = mirror.collection_for(key)
        mirror.ensure(target, embedder.dim, key, str(self._engine.store_id))
        report.collection = target
        active = mirror.active()
        if active != target:
            # blue-green: the new collection is filled and caught up before the alias moves
            if mirror.hwm(target) == 0:
                self._resync(target, embedder, report)
            self._catch_up(target, embedder, key, report, on_batch)
            old = mirror.switch(target)
            report.switches.append(target)
            log.info("alias %r now points to %r (was %r)", mirror.alias, target, old)
            if old is not None and old != target:
                mirror.client.drop_collection(old)
        else:
            self._catch_up(target, embedder, key, report, on_batch)

    def _catch_up(self, target: str, embedder: Any, key: str, report: SyncReport,
                  on_batch: Callable[[SyncReport], None] | None) -> None:  # fmt: skip
        mirror = self.mirror
        hwm = mirror.hwm(target)
        report.store_lsn = self._feed.upto()
        try:
            batch: list[ReplayItem] = []
            for item in self._feed.changes(hwm):
                batch.append(item)
                if len(batch) >= self.settings.batch_size:
                    hwm = self._apply(target, embedder, batch, report)
                    batch = []
                    if on_batch is not None:
                        on_batch(report)
            if batch:
                hwm = self._apply(target, embedder, batch, report)
                if on_batch is not None:
                    on_batch(report)
        except ChangesTruncatedError as exc:
            log.warning("%s: resynchronizing %r from LMDB", exc, target)
            self._resync(target, embedder, report)
        report.hwm = mirror.hwm(target)

    def _apply(self, target: str, embedder: Any, batch: list[ReplayItem],
               report: SyncReport) -> int:  # fmt: skip
        """One batch: the touched tracks' current state into Milvus, then the high-water LSN."""
        tracks: set[str] = set()
        unknown: list[int] = []
        for item in batch:
            if item.op == "put" and item.kind == "fingerprint" and item.data is not None:
                tracks.add(str(item.data["track_id"]))
            elif item.op == "delete_track" and item.track_id is not None:
                tracks.add(item.track_id)
            elif item.op in ("update", "delete") and item.kind in ("fingerprint", None):
                assert item.id is not None
                exp = self._reader.read_get(item.id)
                if exp is not None and isinstance(exp.record, Fingerprint):
                    tracks.add(exp.record.track_id)
                elif exp is None:
                    unknown.append(item.id)
        if unknown:
            tracks.update(self.mirror.tracks_of_records(target, unknown).values())
        up, gone = self._write_tracks(target, embedder, sorted(tracks))
        crash_point("milvus.sync.before_hwm")
        last = batch[-1].lsn
        self.mirror.set_hwm(target, last)
        report.operations += len(batch)
        report.upserted += up
        report.deleted += gone
        report.batches += 1
        report.hwm = last
        return last

    def _write_tracks(self, target: str, embedder: Any, tracks: list[str]) -> tuple[int, int]:
        """Upsert the live ``tracks`` as the store holds them now; delete the others."""
        if not tracks:
            return 0, 0
        tables = self._engine.tables
        envelopes: list[tuple[int, bytes]] = []
        gone: list[str] = []
        with tables.reading() as txn:
            for track in tracks:
                rid = tables.get_track(txn, track)
                raw = tables.get_record(txn, rid) if rid is not None else None
                if rid is None or raw is None:
                    gone.append(track)
                else:
                    envelopes.append((rid, raw))
        rows = self._rows(embedder, envelopes)
        self.mirror.upsert(target, rows)
        crash_point("milvus.sync.after_upsert")
        self.mirror.delete(target, gone)
        return len(rows), len(gone)

    def _resync(self, target: str, embedder: Any, report: SyncReport) -> None:
        """The whole live set from one LMDB read; rows of tracks not in it are deleted."""
        tables = self._engine.tables
        live: set[str] = set()
        chunk: list[tuple[int, bytes]] = []
        with tables.reading() as txn:
            lsn = tables.applied_lsn(txn)
            for key, value in tables.iter_tracks(txn):
                rid = from_u64(value)
                raw = tables.get_record(txn, rid)
                if raw is None:
                    raise XpStoreError(f"track {key.decode()!r} points to missing record {rid}")
                live.add(key.decode())
                chunk.append((rid, raw))
                if len(chunk) >= self.settings.batch_size:
                    rows = self._rows(embedder, chunk)
                    self.mirror.upsert(target, rows)
                    report.upserted += len(rows)
                    chunk = []
        rows = self._rows(embedder, chunk)
        self.mirror.upsert(target, rows)
        report.upserted += len(rows)
        stale = self.mirror.all_tracks(target, max(lsn, self._feed.upto())) - live
        self.mirror.delete(target, stale)
        report.deleted += len(stale)
        self.mirror.set_hwm(target, lsn)
        report.resyncs += 1
        report.hwm = lsn

    def _rows(self, embedder: Any, envelopes: list[tuple[int, bytes]]) -> list[dict[str, Any]]:
        """Milvus rows of encoded fingerprint envelopes, embedded as an index build embeds."""
        if not envelopes:
            return []
        import msgpack

        from xpstore.index.rows import parse_fingerprint

        raws = [parse_fingerprint(raw, f"record {rid}") for rid, raw in envelopes]
        audio = np.vstack([r.audio for r in raws])
        emb = None
        has = None
        if embedder.embedding_dim is not None:
            emb = np.zeros((len(raws), embedder.embedding_dim), dtype=np.float32)
            has = np.zeros(len(raws), dtype=bool)
            for i, r in enumerate(raws):
                if r.embedding is not None and r.embedding.shape == (embedder.embedding_dim,):
                    emb[i] = r.embedding
                    has[i] = True
        vectors = embedder.embed_rows(audio, emb, has)
        rows = []
        for (rid, raw), r, vec in zip(envelopes, raws, vectors, strict=True):
            env = msgpack.unpackb(raw, raw=False)
            rows.append({"track_id": r.track_id, "vector": vec.tolist(), "record_id": rid,
                         "lsn": int(env[3]), "ts": float(env[2]),
                         "metadata": r.metadata or {}})  # fmt: skip
        return rows

    def _embedder(self) -> Any:
        """The embedder of the index's last build (what the local index embeds with). A
        read-only store re-reads its index when LMDB moved; a rebuild alone does not move
        LMDB, so a new ``main.faiss`` (another inode, size or mtime) re-attaches it too."""
        stamp = _file_stamp(self._engine.path / "index" / "main.faiss")
        if stamp != self._stamp and self._engine.readonly:
            self._index.close()
        self._stamp = stamp
        server = self._index.server()
        build = server.main.build
        if server.live_count() >= MIN_FIT_ROWS and (build is None or build.count < MIN_FIT_ROWS):
            raise IndexNotBuiltError(
                "the store's index has no build on library statistics yet, so there is no "
                "embedding to mirror: rebuild it (xpstore index rebuild PATH, or a writer's "
                "automatic rebuild) and sync again"
            )
        return server.main.embedder


def _from_milvus(exc: BaseException) -> bool:
    """Whether ``exc`` is the client's or the transport's (pymilvus, grpc), not a bug here."""
    return type(exc).__module__.split(".", 1)[0] in ("pymilvus", "grpc")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def sync_status(mirror: MilvusMirror, store_lsn: int, local_key: str | None) -> dict[str, Any]:
    """The follower's position against the store (``xpstore sync status``)."""
    active = mirror.active()
    out: dict[str, Any] = {"alias": mirror.alias, "collection": active, "store_lsn": store_lsn}
    if active is None:
        out.update(hwm=None, lag_lsn=None, rows=0, embedder=None, synced_at=None,
                   embedder_current=None)  # fmt: skip
        return out
    props = mirror.properties(active)
    hwm = int(props.get(HWM, "0"))
    synced = props.get(SYNCED_AT)
    out.update(
        hwm=hwm, lag_lsn=max(0, store_lsn - hwm), rows=mirror.count(active),
        embedder=props.get(KEY), synced_at=float(synced) if synced else None,
        embedder_current=None if local_key is None else props.get(KEY) == local_key,
    )  # fmt: skip
    return out


# ============================================================================ queries

_OPS = {"": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _literal(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return None


def translate_where(where: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``where=`` as a Milvus boolean expression over the collection's fields, and the part
    of it Milvus cannot evaluate (applied afterwards on the store's records)."""
    terms: list[str] = []
    rest: dict[str, Any] = {}
    for key, value in where.items():
        path, _, op = key.partition("__")
        if path in ("track_id", "ts"):
            target = path
        elif path.startswith("metadata.") and path.count(".") == 1:
            target = f'metadata[{json.dumps(path.split(".", 1)[1])}]'
        else:
            rest[key] = value
            continue
        if op == "in" and isinstance(value, list | tuple | set | frozenset):
            lits = [_literal(v) for v in value]
            if all(lit is not None for lit in lits):
                terms.append(f"{target} in [{', '.join(str(lit) for lit in lits)}]")
                continue
        elif op in _OPS:
            lit = _literal(value)
            if lit is not None:
                terms.append(f"{target} {_OPS[op]} {lit}")
                continue
        rest[key] = value
    return " and ".join(terms), rest


class MilvusSimilarity:
    """``similar()`` answered by the Milvus collection (``index.backend="milvus"``)."""

    def __init__(self, engine: Engine, reader: Reader, index: IndexService) -> None:
        self._engine = engine
        self._reader = reader
        self._index = index
        self._lock = threading.Lock()
        self._mirror: MilvusMirror | None = None
        self._uri: str | None = None
        self._loaded: str | None = None
        self._target: tuple[float, str | None, str | None] | None = None
        self._local_key: tuple[Any, str] | None = None
        self.fallbacks = 0
        """Queries the local index answered because Milvus could not (tests, metrics)."""

    def route(
        self,
        track_id: str | None,
        fingerprint: Fingerprint | Mapping[str, Any] | None,
        vector: npt.ArrayLike | None,
        **kw: Any,
    ) -> list[Neighbor]:
        """Milvus with ``index.backend="milvus"``, else local, decided per call (the store's
        own path is chosen once per settings change: ``parts.compose``)."""
        if self._engine.config.index.backend == "milvus":
            return self.similar(track_id, fingerprint, vector, **kw)
        return self._index.similar(track_id, fingerprint, vector, **kw)

    def similar(
        self,
        track_id: str | None,
        fingerprint: Fingerprint | Mapping[str, Any] | None,
        vector: npt.ArrayLike | None,
        **kw: Any,
    ) -> list[Neighbor]:
        """Milvus first; the local index when Milvus cannot answer this query."""
        self._engine.check_open()
        reason = self._unsupported(fingerprint, kw)
        if reason is None:
            try:
                hits = self._search(track_id, fingerprint, vector, **kw)
                if hits is not None:
                    return hits
                reason = "the collection does not hold this query's vector yet"
            except (InvalidArgumentError, InvalidRecordError, RecordNotFoundError):
                raise  # the caller's mistake, whichever engine answers
            except (MilvusUnavailableError, ExtraMissingError) as exc:
                reason = str(exc)
            except Exception as exc:  # grpc / pymilvus errors: the server did not answer
                reason = f"{type(exc).__name__}: {exc}"
                self._mirror = None  # reconnect next time
                self._target = None
        self.fallbacks += 1
        log.warning("similar() answered by the local index: %s", reason)
        return self._index.similar(track_id, fingerprint, vector, **kw)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _unsupported(fingerprint: Any, kw: Mapping[str, Any]) -> str | None:
        if kw.get("precomputed"):
            return "precomputed lists are the local index's"
        if kw.get("weights") is not None:
            return "per-query weights re-embed the query against the local index"
        if kw.get("params") is not None:
            return "search params are FAISS's"
        return None

    def _connection(self) -> MilvusMirror:
        cfg = self._engine.config.milvus
        if cfg.uri is None:
            raise MilvusUnavailableError("index.backend is 'milvus' but milvus.uri is not set")
        with self._lock:
            if self._mirror is None or self._uri != cfg.uri:
                self._mirror = MilvusMirror(connect(cfg.uri, cfg.timeout_s), cfg.collection)
                self._uri = cfg.uri
            return self._mirror

    def _search(
        self,
        track_id: str | None,
        fingerprint: Fingerprint | Mapping[str, Any] | None,
        vector: npt.ArrayLike | None,
        *,
        k: int,
        exclude_self: bool,
        where: Mapping[str, Any] | None,
        **_: Any,
    ) -> list[Neighbor] | None:
        from xpstore.store.index_service import check_k

        k = check_k(k)
        if sum(x is not None for x in (track_id, fingerprint, vector)) != 1:
            raise InvalidArgumentError(
                "give exactly one of track_id, fingerprint= or vector=", field="track_id"
            )
        compile_where(where, ("fingerprint",))  # bad keys raise before any request
        mirror = self._connection()
        timeout = self._engine.config.milvus.timeout_s
        alias = mirror.alias
        active, key = self._active(mirror)
        if active is None:
            return None
        local = self._index.server().main.embedder
        if self._local_key is None or self._local_key[0] is not local:
            self._local_key = (local, embedder_key(local))
        same = key == self._local_key[1]
        exclude: str | None = None
        if track_id is not None:
            track_id = str(track_id)
            if self._reader.read_track(track_id) is None:
                raise RecordNotFoundError(f"no track {track_id!r}")
            if same:  # the collection holds the local index's vectors: no round trip
                query = self._index.track_vector(track_id)
            else:
                got = mirror.client.get(alias, ids=[track_id], output_fields=["vector"],
                                        timeout=timeout)  # fmt: skip
                if not got:
                    return None
                query = np.asarray(got[0]["vector"], dtype=np.float32)
            exclude = track_id if exclude_self else None
        elif fingerprint is not None:
            if not same:
                return None
            embedded, own = self._embed_fingerprint(local, fingerprint)
            query = embedded
            exclude = own if exclude_self else None
        else:
            query = np.asarray(vector, dtype=np.float32).reshape(-1)
        expr, rest = translate_where(where or {})
        post = compile_where(rest, ("fingerprint",)) if rest else None
        limit = min(_MAX_TOPK, k * self._engine.config.milvus.overfetch + 1)
        res = mirror.client.search(
            alias, data=[query.tolist()], limit=limit, filter=expr,
            output_fields=["record_id", "metadata"], timeout=timeout,
            search_params={"metric_type": "IP"},
        )  # fmt: skip
        out: list[Neighbor] = []
        reader = self._reader
        for hit in res[0]:
            entity = hit.get("entity", {})
            track, rid = str(hit.get("track_id", hit.get("id"))), int(entity["record_id"])
            if track == exclude:
                continue  # the query's own track: dropped here, not by a filter expression
            if reader.read_track(track) != rid:
                continue  # superseded or retired in the store, not yet in Milvus
            if post is not None:
                exp = reader.read_get(rid)
                if exp is None or not post(exp):
                    continue
            out.append(Neighbor(track, float(hit["distance"]), rid, entity.get("metadata") or None))
            if len(out) >= k:
                break
        return out

    def _active(self, mirror: MilvusMirror) -> tuple[str | None, str | None]:
        """The alias's collection and its embedder key, re-read at most once a second (two
        round trips a query otherwise); the collection is loaded on first use."""
        now = time.monotonic()
        cached = self._target
        if cached is not None and now - cached[0] < 1.0:
            return cached[1], cached[2]
        active = mirror.active()
        key = mirror.properties(active).get(KEY) if active is not None else None
        if active is not None and active != self._loaded:
            mirror.load(active)
            self._loaded = active
        self._target = (now, active, key)
        return active, key

    @staticmethod
    def _embed_fingerprint(
        embedder: Any, fingerprint: Fingerprint | Mapping[str, Any]
    ) -> tuple[npt.NDArray[np.float32], str | None]:
        """The query embedded locally (the caller checked the embedder is the collection's)."""
        from xpstore.model.records import record_from_json

        fp = fingerprint if isinstance(fingerprint, Fingerprint) else record_from_json(
            {"kind": "fingerprint", **fingerprint})  # fmt: skip
        assert isinstance(fp, Fingerprint)
        return embedder.embed_query(fp), fp.track_id
