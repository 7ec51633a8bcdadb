"""Every error xpstore raises, rooted at one base class.

The tree (each also inherits the builtin a caller would naturally catch)::

    XpStoreError
    ├── InvalidRecordError (ValueError)        bad field, bad JSON line, too large
    │   ├── RecordTooLargeError
    │   └── CodecError                         bytes that do not decode to a record/operation
    ├── InvalidArgumentError (ValueError)      a bad plain argument (k, n, beta, to_lsn, a setting)
    ├── EmptySampleError (LookupError)         nothing to sample from (empty store, kind, filter)
    ├── RecordNotFoundError (KeyError)         no such id or track
    ├── StoreNotFoundError (FileNotFoundError) path is not a store
    ├── FormatVersionError (ValueError)        written by a newer xpstore
    ├── StoreLockedError                       another process holds the writer lock
    ├── ReadOnlyStoreError                     write on a store opened read-only
    ├── StoreClosedError                       use after close()
    ├── WALWriteError (OSError)                the log cannot take writes any more
    ├── RemoveUnsupportedError                 an index backend (HNSW) cannot delete vectors
    ├── ExtraMissingError (ImportError)        an optional extra (arrow, torch, milvus) is absent
    ├── ChangesTruncatedError (LookupError)    the change feed cannot serve an LSN range any more
    ├── MilvusUnavailableError (ConnectionError) the Milvus server does not answer
    ├── IndexNotBuiltError                     no index build on library statistics to mirror
    └── StoreCorruptionError                   on-disk damage
        ├── WALCorruptionError                 a bad WAL segment or frame
        ├── LmdbCorruptionError                an LMDB data file found damaged before mapping it
        ├── SnapshotError                      a damaged snapshot, or WAL a restore lacks
        └── StatsCorruptionError               persisted embedding statistics fail their check

LMDB and OS errors are translated where they cross into xpstore (``persistence.lmdb_tables``
and ``persistence.wal``), always with ``raise ... from`` so the original stays attached.
"""

from __future__ import annotations

from pathlib import Path


class XpStoreError(Exception):
    """Base class of every xpstore error."""


class InvalidRecordError(XpStoreError, ValueError):
    """A record, update or input line failed validation; ``field`` names the culprit."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidArgumentError(XpStoreError, ValueError):
    """A plain argument (``k``, ``n``, ``beta``, ``to_lsn``, a setting) is out of range or of the
    wrong type; ``field`` names it. Records and their fields raise InvalidRecordError instead."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RecordTooLargeError(InvalidRecordError):
    """A record, frame or batch exceeds a configured size limit."""


class RecordNotFoundError(XpStoreError, KeyError):
    """No live record with that id (or no current fingerprint for that track)."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class StoreNotFoundError(XpStoreError, FileNotFoundError):
    """The path does not hold an xpstore store (and ``create`` was not asked for)."""


class FormatVersionError(XpStoreError, ValueError):
    """The store (or a file in it) was written by a format this version cannot read."""


class StoreLockedError(XpStoreError):
    """Another process holds the store's writer lock; ``pid`` names it when known."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class ReadOnlyStoreError(XpStoreError):
    """A write was attempted on a store opened with ``readonly=True``."""


class StoreClosedError(XpStoreError):
    """The store was used after ``close()``."""


class WALWriteError(XpStoreError, OSError):
    """Writing or syncing the WAL failed; the log is poisoned and refuses later writes.

    After a failed fsync the kernel may have dropped the dirty pages, so retrying could
    acknowledge data that is not on disk (the PostgreSQL "fsyncgate" lesson). Reopen the store
    to recover what was acknowledged.
    """


class StoreCorruptionError(XpStoreError):
    """On-disk data failed a checksum, a structural check or a continuity check."""


class WALCorruptionError(StoreCorruptionError):
    """A WAL segment or frame is damaged; says where, what was expected, and what to do."""

    def __init__(
        self,
        message: str,
        *,
        segment: str | None = None,
        offset: int | None = None,
        expected_lsn: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.segment = segment
        self.offset = offset
        self.expected_lsn = expected_lsn
        self.reason = reason


class LmdbCorruptionError(StoreCorruptionError):
    """An LMDB data file (``path``) is damaged in a way that is found before it is mapped: shorter
    than its meta pages say (truncated), or without valid meta pages.

    Mapping such a file and touching a page past its end kills the process with SIGBUS, so every
    open checks first. The message names the file and what to do (restore a snapshot, salvage).
    """

    def __init__(self, message: str, *, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class CodecError(InvalidRecordError):
    """Bytes handed to the codec do not decode: garbage, a wrong shape, or a newer codec version.

    Bad input, not on-disk damage; a storage layer whose checksum passed but whose payload still
    does not decode may re-raise it as a ``StoreCorruptionError`` (``from`` this error).
    """


class SnapshotError(StoreCorruptionError):
    """A snapshot cannot be trusted or used: a missing or unparsable manifest, a file whose size
    or sha256 differs from the manifest, an unknown snapshot id, or WAL that a point-in-time
    restore needs and that is no longer retained. The message names the file or LSN range.
    """


class StatsCorruptionError(StoreCorruptionError):
    """Persisted standardization statistics (k-NN index) failed their checksum or structure
    check; ``field`` names the offending key."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RemoveUnsupportedError(XpStoreError):
    """The index backend cannot delete vectors (FAISS HNSW has no ``remove_ids``): the serving
    layer handles deletes with tombstones and over-fetch or ID selectors."""


class EmptySampleError(XpStoreError, LookupError):
    """``sample`` found nothing to draw from: an empty store, kind or filter."""


class ExtraMissingError(XpStoreError, ImportError):
    """A feature needs an optional extra that is not installed; ``extra`` names it
    (``pip install "xpstore[<extra>]"``)."""

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


class ChangesTruncatedError(XpStoreError, LookupError):
    """``Store.changes(since_lsn)`` cannot serve the operations after ``since_lsn``: a checkpoint
    removed the WAL segments holding some of them (``first_lsn``: the oldest LSN the WAL still
    holds). A follower resynchronizes from a full read of the current state (docs/scale-out.md)."""

    def __init__(self, message: str, *, since_lsn: int, first_lsn: int | None) -> None:
        super().__init__(message)
        self.since_lsn = since_lsn
        self.first_lsn = first_lsn


class MilvusUnavailableError(XpStoreError, ConnectionError):
    """The Milvus server at the configured URI cannot be reached or refused a request."""


class IndexNotBuiltError(XpStoreError):
    """The store's k-NN index has no build on library statistics yet, so a follower has no
    embedding to mirror (``xpstore index rebuild PATH``, or a writer's automatic rebuild)."""
