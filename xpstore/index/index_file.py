"""The index file: a FAISS index and its meta in one checksummed container (DESIGN §5).

One container file, written atomically (temp file, fdatasync, rename, fsync of the directory),
never pickled::

    magic b"XPSFAISS" | u32 version | u32 meta length | sha256(meta) | meta JSON | index bytes

The meta JSON holds format, version, kind, dim, lsn, count, params, the sha256 and length of the
index bytes, and the embedding statistics. ``load`` checks the header, the meta checksum and the
index checksum *before* handing any bytes to ``faiss.deserialize_index``: a damaged file is a
``StoreCorruptionError`` naming it, never a crash inside FAISS. The backends themselves are
:mod:`xpstore.index.backends`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import numpy as np

from xpstore.errors import FormatVersionError, InvalidArgumentError
from xpstore.index.backends import (
    BACKENDS,
    BackendKind,
    IndexBackend,
    corrupt_index_file,
    faiss,
    faiss_errors,
)
from xpstore.persistence import fs

__all__ = ["FORMAT", "FORMAT_VERSION", "IndexMeta", "load", "read_meta", "save"]

log = logging.getLogger(__name__)

FORMAT: Final = "xpstore-faiss-index"
FORMAT_VERSION: Final = 1
_MAGIC: Final = b"XPSFAISS"
_HEADER: Final = struct.Struct("<8sII32s")  # magic, version, meta length, sha256(meta)




@dataclass(frozen=True)
class IndexMeta:
    """What an index file says about itself; ``lsn`` is the last log position it covers."""

    kind: BackendKind
    dim: int
    lsn: int
    count: int
    params: dict[str, Any]
    index_sha256: str
    index_size: int
    saved_at: float
    stats: dict[str, Any] | None = None
    build: dict[str, Any] | None = None  # the serving layer's BuildInfo (optional key)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "kind": self.kind,
            "dim": self.dim,
            "lsn": self.lsn,
            "count": self.count,
            "params": self.params,
            "index_sha256": self.index_sha256,
            "index_size": self.index_size,
            "saved_at": self.saved_at,
            "stats": self.stats,
            "build": self.build,
        }


def save(
    backend: IndexBackend,
    path: str | os.PathLike[str],
    *,
    lsn: int,
    stats_dict: Mapping[str, Any] | None = None,
    build: Mapping[str, Any] | None = None,
) -> IndexMeta:
    """Write ``backend`` and its meta to ``path`` atomically (old file or new, never half).

    Serializing reads the index: the caller excludes mutations for the duration.
    """
    if isinstance(lsn, bool) or not isinstance(lsn, int) or lsn < 0:
        raise InvalidArgumentError(f"lsn must be an int >= 0, got {lsn!r}", field="lsn")
    target = Path(path)
    with faiss_errors(f"serializing the {backend.kind} index for {target}"):
        serialized = faiss.serialize_index(backend.faiss_index)
    blob = np.asarray(serialized, dtype=np.uint8).tobytes()
    meta = IndexMeta(
        kind=backend.kind,
        dim=backend.dim,
        lsn=lsn,
        count=len(backend),
        params=backend.params,
        index_sha256=hashlib.sha256(blob).hexdigest(),
        index_size=len(blob),
        saved_at=time.time(),
        stats=dict(stats_dict) if stats_dict is not None else None,
        build=dict(build) if build is not None else None,
    )
    meta_bytes = json.dumps(meta.to_json(), sort_keys=True, allow_nan=False).encode()
    header = _HEADER.pack(
        _MAGIC, FORMAT_VERSION, len(meta_bytes), hashlib.sha256(meta_bytes).digest()
    )
    tmp = target.with_name(target.name + ".tmp")
    fs.write_file(tmp, header + meta_bytes + blob)
    fs.replace(tmp, target)
    fs.fsync_dir(target.parent)
    log.info(
        "saved %s index to %s: %d vectors, lsn %d, %d bytes",
        meta.kind,
        target,
        meta.count,
        lsn,
        _HEADER.size + len(meta_bytes) + len(blob),
    )
    return meta


_META_KEYS: Final = frozenset(
    {"format", "version", "kind", "dim", "lsn", "count", "params", "index_sha256",
     "index_size", "saved_at", "stats"}
)  # fmt: skip


def _parse_meta(path: Path, raw: Mapping[str, Any]) -> IndexMeta:
    """Check the meta's fields (its checksum already matched, so a failure is a writer bug)."""
    missing = sorted(_META_KEYS - set(raw))
    if missing:
        raise corrupt_index_file(path, f"meta lacks field {missing[0]!r}")
    if raw["format"] != FORMAT:
        raise corrupt_index_file(
            path, f"meta field 'format' is {raw['format']!r}, expected {FORMAT!r}"
        )
    if raw["kind"] not in BACKENDS:
        raise corrupt_index_file(path, f"meta field 'kind' is unknown: {raw['kind']!r}")
    for name in ("version", "dim", "lsn", "count", "index_size"):
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise corrupt_index_file(path, f"meta field {name!r} is invalid: {value!r}")
    params, stats, sha = raw["params"], raw["stats"], raw["index_sha256"]
    if not isinstance(params, dict):
        raise corrupt_index_file(path, "meta field 'params' is not an object")
    if not (stats is None or isinstance(stats, dict)):
        raise corrupt_index_file(path, "meta field 'stats' is not an object")
    build = raw.get("build")
    if not (build is None or isinstance(build, dict)):
        raise corrupt_index_file(path, "meta field 'build' is not an object")
    if not isinstance(sha, str) or len(sha) != 64:
        raise corrupt_index_file(path, f"meta field 'index_sha256' is invalid: {sha!r}")
    if not isinstance(raw["saved_at"], int | float):
        raise corrupt_index_file(path, f"meta field 'saved_at' is invalid: {raw['saved_at']!r}")
    return IndexMeta(
        kind=cast(BackendKind, raw["kind"]),
        dim=raw["dim"],
        lsn=raw["lsn"],
        count=raw["count"],
        params=params,
        index_sha256=sha,
        index_size=raw["index_size"],
        saved_at=float(raw["saved_at"]),
        stats=stats,
        build=build,
        version=raw["version"],
    )


def _wrap_index(path: Path, index: Any, meta: IndexMeta) -> IndexBackend:
    """Wrap a deserialized index, checking it agrees with its meta."""
    with faiss_errors("index does not match its meta", damaged=path):
        dim, count = int(index.d), int(index.ntotal)
    if dim != meta.dim or count != meta.count:
        raise corrupt_index_file(
            path,
            f"index has dim {dim} and {count} vectors, meta says {meta.dim} and {meta.count}",
        )
    with faiss_errors("index does not match its meta", damaged=path):
        return BACKENDS[meta.kind]._from_faiss(index, meta.dim, meta.params)


def _read_header(target: Path, data: bytes) -> tuple[IndexMeta, int]:
    """Check the header and the meta (its checksum first); returns the meta and its end."""
    if len(data) < _HEADER.size:
        raise corrupt_index_file(target, f"truncated: {len(data)} bytes, shorter than the header")
    magic, version, meta_len, meta_sha = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise corrupt_index_file(target, f"bad magic {magic!r}")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"index file {target} has format version {version}, newer than this xpstore reads "
            f"({FORMAT_VERSION})"
        )
    if version < 1:
        raise corrupt_index_file(target, f"invalid format version {version}")
    meta_end = _HEADER.size + meta_len
    if meta_end > len(data):
        raise corrupt_index_file(
            target, f"truncated: meta needs {meta_end} bytes, file has {len(data)}"
        )
    meta_bytes = data[_HEADER.size : meta_end]
    if hashlib.sha256(meta_bytes).digest() != meta_sha:
        raise corrupt_index_file(target, "meta checksum mismatch")
    try:
        raw = json.loads(meta_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise corrupt_index_file(target, f"meta is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise corrupt_index_file(target, "meta is not a JSON object")
    return _parse_meta(target, raw), meta_end


def read_meta(path: str | os.PathLike[str]) -> IndexMeta:
    """Only the meta of an index file (checksum verified), without reading the index bytes."""
    target = Path(path)
    with open(target, "rb") as fh:
        head = fh.read(_HEADER.size)
        if len(head) == _HEADER.size and head[:8] == _MAGIC:
            head += fh.read(_HEADER.unpack(head)[2])
    return _read_header(target, head)[0]


def load(path: str | os.PathLike[str]) -> tuple[IndexBackend, IndexMeta]:
    """Read an index written by ``save``; every checksum is verified before FAISS sees a byte.

    Damage (bad magic, truncation, checksum mismatch, a meta that disagrees with the index) is a
    ``StoreCorruptionError`` naming the file; a newer format is a ``FormatVersionError``.
    """
    target = Path(path)
    data = fs.read_bytes(target)
    meta, meta_end = _read_header(target, data)
    blob = memoryview(data)[meta_end:]
    if len(blob) != meta.index_size:
        raise corrupt_index_file(
            target, f"index is {len(blob)} bytes, meta says {meta.index_size} (truncated?)"
        )
    actual = hashlib.sha256(blob).hexdigest()
    if actual != meta.index_sha256:
        raise corrupt_index_file(
            target,
            f"index checksum mismatch: stored {meta.index_sha256[:16]}..., "
            f"computed {actual[:16]}...",
        )
    with faiss_errors("FAISS cannot read the index", damaged=target):
        index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    backend = _wrap_index(target, index, meta)
    log.info(
        "loaded %s index from %s: %d vectors, lsn %d", meta.kind, target, len(backend), meta.lsn
    )
    return backend, meta
