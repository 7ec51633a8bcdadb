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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import msgpack

from xpstore.errors import CodecError, StoreCorruptionError
from xpstore.persistence import fs

__all__ = ["Neighbor", "NeighborFileWriter", "NeighborList", "decode", "encode", "read_file"]

VERSION: Final = 1
_HEAD: Final = struct.Struct(">BQQ")
_MAGIC: Final = b"XPSNBRS1"
FEED_BYTES = 1 << 20


_new = object.__new__
_set = object.__setattr__


@dataclass(frozen=True)
class Neighbor:
    """One answer of ``Store.similar``: a track, how similar it is, and its fingerprint record.

    ``score`` is the inner product of hybrid vectors: the weighted sum of per-block cosines,
    1.0 for an identical fingerprint. ``build_id`` is set when the answer came from a
    precomputed neighbour list (which build made it), None for a live search.
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
                             "metadata": metadata, "build_id": None, "strategy": None})
        return n


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
