"""Precomputed neighbour lists: their LMDB value format and the file a build hands them over in.

After every build each track's ``k`` nearest other tracks are written to the LMDB table
``neighbors`` (key: track id, UTF-8), as Auralis keeps its ``similarity_graph`` table, so a
read-only process or a UI lists similar tracks with one key lookup and no FAISS. Value::

    u8 version (1) | u64 BE build id | u64 BE lsn | msgpack [[track_id, record_id, score], ...]

The fixed prefix lets a sweep drop lists of older builds without decoding them.

A build in a child process writes the lists to a file first::

    magic b"XPSNBRS1" | sha256(payload) (32 bytes) | payload

``payload`` is a msgpack stream of ``[key, value]`` pairs. The parent verifies the checksum
before it reads one pair, and writes them to LMDB in chunks of short transactions.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import msgpack

from xpstore.errors import CodecError, StoreCorruptionError
from xpstore.persistence import fs

__all__ = [
    "MetadataFetch",
    "MetadataLoad",
    "Neighbor",
    "NeighborFileWriter", "NeighborList",
    "decode",
    "encode",
    "read_file",
]

VERSION: Final = 1
_HEAD: Final = struct.Struct(">BQQ")
_MAGIC: Final = b"XPSNBRS1"
FEED_BYTES = 1 << 20


_new = object.__new__
_set = object.__setattr__

MetadataFetch = Callable[[Any, list[int]], dict[int, dict[str, Any] | None]]
"""``fetch(context, record_ids)``: the metadata of the live ids (an id missing: record gone)."""

_LOAD_LOCK = threading.Lock()  # loads are rare (a metadata read) and short: one lock for all


class MetadataLoad:
    """The metadata of one call's answers, read together at the first access of any of them.

    ``similar`` returns its answers before their metadata is read: most callers of a first
    ask read ids and scores only, and the read (a transaction, a get and an envelope decode
    per answer) cost as much as the search. The first ``Neighbor.metadata`` access of any
    answer of the call reads all of them with one ``fetch(context, ids)``; every later access,
    of any of them, returns what that read found, without reading again. Thread-safe: a second
    thread waits for the first one's read. The answers point to their load, never the
    reverse, so a load lives exactly as long as an answer that still needs it.
    """

    __slots__ = ("__weakref__", "_context", "_fetch", "_found", "_ids")

    def __init__(self, fetch: MetadataFetch, context: Any = None) -> None:
        self._fetch = fetch
        self._context = context
        self._ids: list[int] = []
        self._found: dict[int, dict[str, Any] | None] | None = None

    def neighbor(self, track_id: str, score: float, record_id: int) -> Neighbor:
        """An answer whose ``metadata`` this load reads (at the first access of any)."""
        n = _new(Neighbor)
        # build_id and strategy are None: the class defaults, not stored per answer
        _set(n, "__dict__", {"track_id": track_id, "score": score, "record_id": record_id,
                             "_load": self})  # fmt: skip
        self._ids.append(record_id)
        return n

    def answers(self, record_ids: list[int], scores: list[float], tracks: list[str]
                ) -> list[Neighbor]:  # fmt: skip
        """:meth:`neighbor` of each (in one loop: it runs for every answer of a first ask)."""
        out: list[Neighbor] = []
        append = out.append
        for rid, score, track in zip(record_ids, scores, tracks, strict=True):
            n = _new(Neighbor)
            _set(n, "__dict__", {"track_id": track, "score": score, "record_id": rid,
                                 "_load": self})  # fmt: skip
            append(n)
        self._ids.extend(record_ids)
        return out

    @property
    def done(self) -> bool:
        return self._found is not None

    def get(self, record_id: int) -> dict[str, Any] | None:
        """The metadata of one of the answers (reading all of them first if not done)."""
        found = self._found
        if found is None:
            found = self.load()
        return found.get(record_id)

    def load(self) -> dict[int, dict[str, Any] | None]:
        """Read the metadata of every answer of the call (once; later calls return it)."""
        with _LOAD_LOCK:
            found = self._found
            if found is None:
                found = self._fetch(self._context, list(self._ids)) if self._ids else {}
                self._found = found
            return found


@dataclass(frozen=True)
class Neighbor:
    """One answer of ``Store.similar``: a track, how similar it is, and its fingerprint record.

    ``score`` is the inner product of hybrid vectors: the weighted sum of per-block cosines,
    1.0 for an identical fingerprint. ``build_id`` is set when the answer came from a
    precomputed neighbour list (which build made it), None for a live search.

    ``metadata`` of a live-search answer may be read lazily (:class:`MetadataLoad`): at the
    first access of any answer's ``metadata`` of the call, for all of them in one read, as the
    record is then (an ``update`` in between shows; a record deleted in between reads None);
    a store's ``close`` reads what is still pending, so answers outlive their store. Equality,
    ``repr``, ``dataclasses.replace``/``asdict``, copying and pickling read it like any caller.
    """

    track_id: str
    score: float
    record_id: int
    metadata: dict[str, Any] | None
    build_id: int | None = None
    strategy: str | None = None
    """Which query strategy produced the answer (``similar(strategy=...)``); None without one.
    ``record_id`` is -1 for a track known only from the streaming cache (nothing written)."""

    @classmethod
    def of(cls, track_id: str, score: float, record_id: int,
           metadata: dict[str, Any] | None) -> Neighbor:  # fmt: skip
        """A live-search answer, built without the frozen dataclass's per-field
        ``object.__setattr__`` (ten of those per query cost as much as the result mapping)."""
        n = _new(cls)
        _set(n, "__dict__", {"track_id": track_id, "score": score, "record_id": record_id,
                             "metadata": metadata})  # build_id, strategy: the class's None
        return n

    if not TYPE_CHECKING:  # mypy keeps checking attribute names on Neighbor

        def __getattr__(self, name: str) -> Any:
            """Only reached for ``metadata`` not read yet (a lazy answer): read it now."""
            if name == "metadata":
                d = self.__dict__
                load = d.get("_load")
                if load is not None:
                    value = load.get(d["record_id"])
                    d["metadata"] = value
                    d.pop("_load", None)
                    return value
                if "metadata" in d:  # another thread read it just now
                    return d["metadata"]
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and copying carry the metadata, read first if it was still pending."""
        self.metadata  # noqa: B018 - the access reads a pending load
        return {k: v for k, v in self.__dict__.items() if k != "_load"}


def cached_answers(
    record_ids: list[int], scores: list[float], values: list[tuple[str, dict[str, Any] | None]]
) -> list[Neighbor]:
    """``Neighbor.of`` of each (record id, score, (track, metadata)) in one loop: a query
    whose answers are all in the answer cache builds them with their metadata at once."""
    out: list[Neighbor] = []
    append = out.append
    for rid, score, (track, meta) in zip(record_ids, scores, values, strict=True):
        n = _new(Neighbor)
        _set(n, "__dict__", {"track_id": track, "score": score, "record_id": rid,
                             "metadata": meta})  # fmt: skip
        append(n)
    return out


@dataclass(frozen=True)
class NeighborList:
    """A decoded list: which build made it, the LSN it covers, and (track, id, score) items."""

    build_id: int
    lsn: int
    items: list[tuple[str, int, float]]


def encode(build_id: int, lsn: int, items: list[tuple[str, int, float]]) -> bytes:
    return _HEAD.pack(VERSION, build_id, lsn) + msgpack.packb(
        [[t, r, s] for t, r, s in items], use_bin_type=True
    )


def build_of(value: bytes) -> int:
    """The build id of an encoded list, read from its prefix only (-1 if malformed)."""
    if len(value) < _HEAD.size or value[0] != VERSION:
        return -1
    return int(_HEAD.unpack_from(value)[1])


def decode(value: bytes, where: str) -> NeighborList:
    if len(value) < _HEAD.size:
        raise CodecError(f"{where}: neighbour list shorter than its header")
    version, build_id, lsn = _HEAD.unpack_from(value)
    if version != VERSION:
        raise CodecError(f"{where}: neighbour list version {version}, expected {VERSION}")
    try:
        raw = msgpack.unpackb(value[_HEAD.size :], raw=False, use_list=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"{where}: neighbour list does not decode: {exc}") from exc
    items: list[tuple[str, int, float]] = []
    if type(raw) is not list:
        raise CodecError(f"{where}: neighbour list is not an array")
    for it in raw:
        if (
            type(it) is not list
            or len(it) != 3
            or type(it[0]) is not str
            or type(it[1]) is not int
            or type(it[2]) not in (float, int)
        ):
            raise CodecError(f"{where}: malformed neighbour entry {it!r}")
        items.append((it[0], it[1], float(it[2])))
    return NeighborList(int(build_id), int(lsn), items)


class NeighborFileWriter:
    """Streams ``[key, value]`` pairs into a temporary file; ``close`` seals it with a checksum."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(path.name + ".tmp")
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(_MAGIC + bytes(32))
        self._sha = hashlib.sha256()
        self._packer = msgpack.Packer(use_bin_type=True)
        self.count = 0

    def add(self, track_id: str, value: bytes) -> None:
        chunk = self._packer.pack([track_id.encode(), value])
        self._sha.update(chunk)
        self._fh.write(chunk)
        self.count += 1

    def close(self) -> None:
        self._fh.seek(len(_MAGIC))
        self._fh.write(self._sha.digest())
        self._fh.flush()
        os_fd = self._fh.fileno()
        fs.fdatasync(os_fd)
        self._fh.close()
        fs.replace(self._tmp, self.path)

    def __enter__(self) -> NeighborFileWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self.close()
        else:
            self._fh.close()
            self._tmp.unlink(missing_ok=True)


def read_file(path: Path, chunk: int = 5000) -> Iterator[list[tuple[bytes, bytes]]]:
    """Chunks of (key, value) pairs from a neighbour file, after verifying its checksum."""
    data = fs.read_bytes(path)
    if len(data) < len(_MAGIC) + 32 or data[: len(_MAGIC)] != _MAGIC:
        raise StoreCorruptionError(f"neighbour file {path}: bad header")
    stored = data[len(_MAGIC) : len(_MAGIC) + 32]
    payload = memoryview(data)[len(_MAGIC) + 32 :]
    if hashlib.sha256(payload).digest() != stored:
        raise StoreCorruptionError(f"neighbour file {path}: checksum mismatch")
    # fed in slices: msgpack's Unpacker refuses more than max_buffer_size (100 MiB) at once,
    # and a million tracks' lists are larger than that
    unpacker = msgpack.Unpacker(raw=False, use_list=True)
    out: list[tuple[bytes, bytes]] = []
    for start in range(0, len(payload), FEED_BYTES):
        unpacker.feed(payload[start : start + FEED_BYTES])
        for pair in unpacker:
            if type(pair) is not list or len(pair) != 2:
                raise StoreCorruptionError(f"neighbour file {path}: malformed entry")
            out.append((bytes(pair[0]), bytes(pair[1])))
            if len(out) >= chunk:
                yield out
                out = []
    if unpacker.tell() != len(payload):
        raise StoreCorruptionError(f"neighbour file {path}: truncated entry at the end")
    if out:
        yield out
