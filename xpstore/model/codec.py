"""Versioned msgpack codec for WAL operations and LMDB envelopes.

Layout (every value is a msgpack array; floats are always float64, so a decoded record is
bit-for-bit the one encoded). Codec version 2 changed the put only; the rest is version 1::

    PutOp          [2, 1, kind_code, ts, track_id or nil, record_map]       (version 2)
                   [1, 1, kind_code, record_map]                            (version 1, still read)
    UpdateOp       [1, 2, id, changes_map]
    DeleteOp       [1, 3, id]
    DeleteTrackOp  [1, 4, track_id]
    PriorityOp     [1, 5, [id, ...], [priority, ...]]
    FeedbackOp     [1, 6, [id, ...], [success (bool), ...], count_retrieval (bool)]
    RetrievalOp    [1, 7, [id, ...], [count, ...]]
    envelope       [1, kind_code, ts, updated_lsn, retrieval_count, success_count, record_map
                    (, priority)]

The envelope's eighth item is present only when ``update_priorities`` set an explicit priority;
a reader of an older xpstore refuses such an envelope (and op codes 5-7) with a clear error.

A version-2 put starts with 13 fixed bytes, ``0x96 0x02 0x01 kind 0xcb ts(f64 BE)``, then the
track id as a msgpack str (or nil), then ``record_map`` (which still holds ``ts`` and
``track_id``: the envelope is the record map as it is): replay reads kind, ts and track with
``struct`` instead of unpacking the map.

``kind_code``: prediction=1, fingerprint=2, query_metric=3. The envelope's id is its LMDB key and
is not repeated in the value.

``record_map`` is ``{field name: primitive}`` with None fields omitted (decoding restores the
defaults). Field names are kept (not numbered) so that a later codec version can add optional
fields without a migration. Two nested values are positional, because their names are fixed by
this codec version:

- ``Fingerprint.batch``: an array of the 25 floats in ``BATCH_FIELDS`` order;
- ``Fingerprint.streaming``: ``[values, confidence, chunk_count]`` where ``values`` and
  ``confidence`` are float arrays in ``STREAMING_FIELDS`` order, 13 long, or 10 long for
  ``STREAMING_FIELDS_NO_HARMONIC``.

Decoding with ``validate=True`` runs full pydantic validation (for bytes from outside). With
``validate=False`` (WAL frames and LMDB values, already checksummed) it only checks the shape and
builds the models directly, as ``model_construct`` does, nested models included. Any input that
does not decode raises :class:`~xpstore.errors.CodecError`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any, Final, TypeAlias, TypeVar

import msgpack
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

from xpstore.errors import CodecError, InvalidRecordError
from xpstore.model.columns import FingerprintColumns
from xpstore.model.records import (
    BATCH_FIELDS,
    MUTABLE_FIELDS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    BatchFingerprint,
    Decision,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    StreamingFingerprint,
    StreamingValidation,
    kind_of,
    validate_record,
)

__all__ = [
    "CODEC_VERSION",
    "KIND_BY_CODE",
    "KIND_CODES",
    "DeleteOp",
    "DeleteTrackOp",
    "FeedbackOp",
    "Op",
    "PriorityOp",
    "PutOp",
    "RetrievalOp",
    "SettingsOp",
    "UpdateOp",
    "decode_envelope",
    "decode_op",
    "encode_envelope",
    "encode_fingerprint_batch",
    "encode_fingerprint_puts",
    "encode_op",
    "envelope_at",
    "envelope_counters",
    "envelope_from_put",
    "envelope_head",
    "envelopes_from_puts",
    "field_sizes",
    "pack_envelope",
    "peek_put",
    "put_head",
]

CODEC_VERSION: Final = 2
"""The newest codec version read and written: version 2 gives the put operation a fixed-size
header (see :func:`put_head`); every other operation and the LMDB envelope are still written as
version 1, and version-1 puts (stores written before) still decode and replay."""
_V1: Final = 1  # every operation but put, and envelopes
_V2: Final = 2  # put

KIND_CODES: Final[dict[str, int]] = {
    "prediction": 1, "fingerprint": 2, "query_metric": 3, "decision": 4
}
KIND_BY_CODE: Final[dict[int, str]] = {code: kind for kind, code in KIND_CODES.items()}

_OP_PUT: Final = 1
_OP_UPDATE: Final = 2
_OP_DELETE: Final = 3
_OP_DELETE_TRACK: Final = 4
_OP_PRIORITY: Final = 5
_OP_FEEDBACK: Final = 6
_OP_RETRIEVAL: Final = 7
_OP_SETTINGS: Final = 8


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class PutOp:
    """Store a new record; its id is the LSN the WAL gives this operation."""

    record: Record


@dataclass(frozen=True, slots=True)
class UpdateOp:
    """Change mutable fields (``MUTABLE_FIELDS``) of record ``id``; the id stays."""

    id: int
    changes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeleteOp:
    """Delete record ``id`` (kept as a tombstone at this LSN)."""

    id: int


@dataclass(frozen=True, slots=True)
class DeleteTrackOp:
    """Remove ``track_id`` from fingerprint lookups; its history stays."""

    track_id: str


@dataclass(frozen=True, slots=True)
class PriorityOp:
    """Set explicit sampling priorities (``update_priorities``); one per id, in order."""

    ids: list[int]
    priorities: list[float]


@dataclass(frozen=True, slots=True)
class FeedbackOp:
    """Value tracking (``record_feedback``): success_count += success per id; with
    ``count_retrieval`` also retrieval_count += 1."""

    ids: list[int]
    success: list[bool]
    count_retrieval: bool = False


@dataclass(frozen=True, slots=True)
class RetrievalOp:
    """retrieval_count += count per id: ``sample``'s retrievals, made durable in batches."""

    ids: list[int]
    counts: list[int]


@dataclass(frozen=True, slots=True)
class SettingsOp:
    """A change of the store's persisted settings (``Store.reconfigure``, or the first embedding
    fixing ``embedding_dim``): the knobs that changed, for the audit trail, and the whole new
    settings document as JSON, so that replaying it needs nothing but this operation."""

    changes: dict[str, Any]
    config: str


Op: TypeAlias = (
    PutOp | UpdateOp | DeleteOp | DeleteTrackOp | PriorityOp | FeedbackOp | RetrievalOp
    | SettingsOp
)
MULTI_OPS: Final = (PriorityOp, FeedbackOp, RetrievalOp)
"""Operations on many ids at once: one LSN, one effect per id."""
BytesLike: TypeAlias = bytes | bytearray | memoryview
"""What the decoders take: LMDB (``buffers=True``) hands out memoryviews."""

_UPDATABLE: Final = frozenset().union(*MUTABLE_FIELDS.values())

# --------------------------------------------------------------------------- record maps

_batch_values = itemgetter(*BATCH_FIELDS)
_streaming_13 = itemgetter(*STREAMING_FIELDS)
_streaming_10 = itemgetter(*STREAMING_FIELDS_NO_HARMONIC)
_STREAMING_NAMES: Final[dict[int, tuple[str, ...]]] = {
    len(STREAMING_FIELDS): STREAMING_FIELDS,
    len(STREAMING_FIELDS_NO_HARMONIC): STREAMING_FIELDS_NO_HARMONIC,
}
_BATCH_LEN: Final = len(BATCH_FIELDS)
_STREAMING_FIELD_NAMES: Final = ("values", "confidence", "chunk_count")


def _encode_streaming(s: StreamingFingerprint) -> list[Any]:
    values, conf = s.values, s.confidence
    getter = _streaming_13 if len(values) == len(STREAMING_FIELDS) else _streaming_10
    return [list(getter(values)), list(getter(conf)), s.chunk_count]


def _record_map(record: Record) -> dict[str, Any]:
    """``{field: primitive}`` of a record, None omitted, nested models made positional."""
    out = {k: v for k, v in record.__dict__.items() if v is not None}
    if type(record) is Fingerprint:
        batch = out.get("batch")
        if batch is not None:
            out["batch"] = list(_batch_values(batch.__dict__))
        streaming = out.get("streaming")
        if streaming is not None:
            out["streaming"] = _encode_streaming(streaming)
        validation = out.get("validation")
        if validation is not None:
            out["validation"] = {k: v for k, v in validation.__dict__.items() if v is not None}
    return out


def field_sizes(record: Record) -> dict[str, int]:
    """Encoded bytes of each top-level field of ``record``: which field makes it too large."""
    return {name: len(msgpack.packb(value, use_bin_type=True))
            for name, value in _record_map(record).items()}  # fmt: skip


M = TypeVar("M", bound=BaseModel)
_setattr = object.__setattr__


def _construct(cls: type[M], values: dict[str, Any], fields_set: set[str]) -> M:
    """What ``model_construct`` does, minus its per-field alias handling (names are fixed)."""
    obj = cls.__new__(cls)
    _setattr(obj, "__dict__", values)
    _setattr(obj, "__pydantic_fields_set__", fields_set)
    _setattr(obj, "__pydantic_extra__", None)
    _setattr(obj, "__pydantic_private__", None)
    return obj


@dataclass(frozen=True, slots=True)
class _Shape:
    """Per-model field facts for the fast decode path, computed once."""

    fields: tuple[tuple[str, Any], ...]  # (name, default) in field order
    factories: tuple[tuple[str, Callable[[], Any]], ...]
    required: frozenset[str]
    known: frozenset[str]


def _shape(cls: type[BaseModel]) -> _Shape:
    fields: list[tuple[str, Any]] = []
    factories: list[tuple[str, Callable[[], Any]]] = []
    required: set[str] = set()
    for name, info in cls.model_fields.items():
        if info.is_required():
            required.add(name)
            fields.append((name, None))
        elif info.default_factory is not None:
            factory = info.default_factory
            factories.append((name, factory))  # type: ignore[arg-type]
            fields.append((name, None))
        else:
            fields.append((name, info.default))
    return _Shape(tuple(fields), tuple(factories), frozenset(required), frozenset(cls.model_fields))


_SHAPES: Final[dict[str, _Shape]] = {
    "prediction": _shape(PredictionOutcome),
    "fingerprint": _shape(Fingerprint),
    "query_metric": _shape(QueryMetric),
    "decision": _shape(Decision),
}
_VALIDATION_SHAPE: Final = _shape(StreamingValidation)


def _bad(message: str, field: str | None = None) -> CodecError:
    return CodecError(message, field=field)


def _decode_batch(raw: Any) -> BatchFingerprint:
    if type(raw) is not list or len(raw) != _BATCH_LEN:
        raise _bad(f"batch: expected an array of {_BATCH_LEN} numbers", "batch")
    values = dict(zip(BATCH_FIELDS, raw, strict=True))
    return _construct(BatchFingerprint, values, set(BATCH_FIELDS))


def _streaming_dict(raw: Any) -> dict[str, Any]:
    """``[values, confidence, chunk_count]`` back to the named mapping form."""
    if type(raw) is not list or len(raw) != 3:
        raise _bad("streaming: expected [values, confidence, chunk_count]", "streaming")
    values, conf, chunks = raw
    if type(values) is not list or type(conf) is not list or len(values) != len(conf):
        raise _bad("streaming: values and confidence must be arrays of one length", "streaming")
    names = _STREAMING_NAMES.get(len(values))
    if names is None:
        raise _bad(f"streaming: {len(values)} values; expected 13 or 10", "streaming.values")
    return {
        "values": dict(zip(names, values, strict=True)),
        "confidence": dict(zip(names, conf, strict=True)),
        "chunk_count": chunks,
    }


def _fast_record(kind: str, m: dict[str, Any]) -> Record:
    """Build a record from a trusted map without validation (shape checks only)."""
    shape = _SHAPES[kind]
    keys = m.keys()
    if not shape.required <= keys or not keys <= shape.known:
        missing = sorted(shape.required - keys)
        unknown = sorted(k for k in keys if k not in shape.known)
        culprit = (missing or unknown)[0]
        what = "missing" if missing else "unknown field"
        raise _bad(f"{culprit}: {what} in an encoded {kind} record", str(culprit))
    values = {name: m.get(name, default) for name, default in shape.fields}
    for name, factory in shape.factories:
        if name not in m:
            values[name] = factory()
    fields_set = set(keys)
    if kind == "prediction":
        return _construct(PredictionOutcome, values, fields_set)
    if kind == "query_metric":
        return _construct(QueryMetric, values, fields_set)
    if kind == "decision":
        return _construct(Decision, values, fields_set)
    batch = values["batch"]
    if batch is not None:
        values["batch"] = _decode_batch(batch)
    streaming = values["streaming"]
    if streaming is not None:
        sd = _streaming_dict(streaming)
        values["streaming"] = _construct(StreamingFingerprint, sd, set(_STREAMING_FIELD_NAMES))
    validation = values["validation"]
    if validation is not None:
        if type(validation) is not dict:
            raise _bad("validation: expected a map", "validation")
        values["validation"] = _fast_nested(StreamingValidation, _VALIDATION_SHAPE, validation)
    return _construct(Fingerprint, values, fields_set)


def _fast_nested(cls: type[M], shape: _Shape, m: dict[str, Any]) -> M:
    keys = m.keys()
    if not shape.required <= keys or not keys <= shape.known:
        culprit = sorted((shape.required - keys) | {k for k in keys if k not in shape.known})[0]
        raise _bad(f"{cls.__name__}: bad field {culprit!r} in an encoded record", str(culprit))
    values = {name: m.get(name, default) for name, default in shape.fields}
    return _construct(cls, values, set(keys))


def _validated_record(kind: str, m: dict[str, Any]) -> Record:
    data = dict(m)
    batch = data.get("batch")
    if kind == "fingerprint" and batch is not None:
        if type(batch) is not list or len(batch) != _BATCH_LEN:
            raise _bad(f"batch: expected an array of {_BATCH_LEN} numbers", "batch")
        data["batch"] = dict(zip(BATCH_FIELDS, batch, strict=True))
    streaming = data.get("streaming")
    if kind == "fingerprint" and streaming is not None:
        data["streaming"] = _streaming_dict(streaming)
    try:
        return validate_record(kind, data)
    except InvalidRecordError as exc:
        raise CodecError(f"invalid encoded {kind} record: {exc}", field=exc.field) from exc


def _decode_record(kind_code: Any, m: Any, validate: bool) -> Record:
    kind = KIND_BY_CODE.get(kind_code) if type(kind_code) is int else None
    if kind is None:
        raise _bad(f"unknown record kind code {kind_code!r}", "kind")
    if type(m) is not dict:
        raise _bad(f"a {kind} record must be encoded as a map, got {type(m).__name__}")
    return _validated_record(kind, m) if validate else _fast_record(kind, m)


# --------------------------------------------------------------------------- framing


def _pack(obj: list[Any]) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"cannot encode: {exc}") from exc


def _unpack(data: BytesLike, what: str, newest: int = _V1) -> list[Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _bad(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError) as exc:  # msgpack's Unpack*/ExtraData/FormatError/StackError
        raise _bad(f"{what}: not valid msgpack ({type(exc).__name__}: {exc})") from exc
    if type(obj) is not list or not obj:
        raise _bad(f"{what}: expected a non-empty array, got {type(obj).__name__}")
    version = obj[0]
    if type(version) is not int or not _V1 <= version <= newest:
        if type(version) is int and version > newest:
            raise _bad(
                f"{what}: written with codec version {version}, newer than this xpstore reads "
                f"(up to {newest}); upgrade xpstore to read it"
            )
        raise _bad(f"{what}: unknown codec version {version!r}")
    return obj


def _is_id(value: Any) -> bool:
    return type(value) is int and value >= 0


def encode_op(op: Op) -> bytes:
    """The WAL payload of one operation."""
    if type(op) is PutOp:
        record = op.record
        kind = KIND_CODES[kind_of(record)]
        if record.ts is None:  # never logged so (the store fills ts first): no header to give
            return _pack([_V1, _OP_PUT, kind, _record_map(record)])
        track = record.track_id if type(record) is Fingerprint else None
        return _pack([_V2, _OP_PUT, kind, float(record.ts), track, _record_map(record)])
    if type(op) is UpdateOp:
        if not _is_id(op.id) or type(op.changes) is not dict:
            raise _bad("UpdateOp needs an int id >= 0 and a dict of changes")
        return _pack([_V1, _OP_UPDATE, op.id, op.changes])
    if type(op) is DeleteOp:
        if not _is_id(op.id):
            raise _bad("DeleteOp needs an int id >= 0", "id")
        return _pack([_V1, _OP_DELETE, op.id])
    if type(op) is DeleteTrackOp:
        if type(op.track_id) is not str or not op.track_id:
            raise _bad("DeleteTrackOp needs a non-empty track_id", "track_id")
        return _pack([_V1, _OP_DELETE_TRACK, op.track_id])
    if type(op) is PriorityOp:
        return _pack([_V1, _OP_PRIORITY, list(op.ids), [float(p) for p in op.priorities]])
    if type(op) is FeedbackOp:
        return _pack(
            [_V1, _OP_FEEDBACK, list(op.ids), [bool(x) for x in op.success],
             bool(op.count_retrieval)]
        )  # fmt: skip
    if type(op) is RetrievalOp:
        return _pack([_V1, _OP_RETRIEVAL, list(op.ids), [int(c) for c in op.counts]])
    if type(op) is SettingsOp:
        return _pack([_V1, _OP_SETTINGS, dict(op.changes), op.config])
    raise _bad(f"not an operation: {type(op).__name__}")


def decode_op(data: BytesLike, *, validate: bool = True) -> Op:
    """Inverse of :func:`encode_op`; ``validate=False`` trusts checksummed WAL data."""
    obj = _unpack(data, "operation", _V2)
    n = len(obj)
    code = obj[1] if n > 1 else None
    if obj[0] == _V2:
        if code != _OP_PUT or n != 6:
            raise _bad(
                f"operation: op code {code!r} written with codec version 2, newer than this "
                "xpstore reads (version 2 defines only the put)"
            )
        return PutOp(_decode_put_v2(obj, validate))
    if code == _OP_PUT and n == 4:
        return PutOp(_decode_record(obj[2], obj[3], validate))
    if code == _OP_UPDATE and n == 4:
        rid, changes = obj[2], obj[3]
        if not _is_id(rid):
            raise _bad(f"update: bad record id {rid!r}", "id")
        if type(changes) is not dict:
            raise _bad("update: changes must be a map", "changes")
        if validate:
            for key in changes:
                if key not in _UPDATABLE:
                    raise _bad(f"{key}: not a field an update may change", str(key))
        return UpdateOp(rid, changes)
    if code == _OP_DELETE and n == 3:
        if not _is_id(obj[2]):
            raise _bad(f"delete: bad record id {obj[2]!r}", "id")
        return DeleteOp(obj[2])
    if code == _OP_DELETE_TRACK and n == 3:
        if type(obj[2]) is not str or not obj[2]:
            raise _bad(f"delete_track: bad track id {obj[2]!r}", "track_id")
        return DeleteTrackOp(obj[2])
    if (code in (_OP_PRIORITY, _OP_RETRIEVAL) and n == 4) or (code == _OP_FEEDBACK and n == 5):
        ids, values = obj[2], obj[3]
        if type(ids) is not list or type(values) is not list or len(ids) != len(values):
            raise _bad("ids and values must be arrays of one length", "ids")
        if not all(_is_id(i) for i in ids):
            raise _bad("ids must be ints >= 0", "ids")
        if code == _OP_PRIORITY:
            if not all(type(v) in (float, int) for v in values):
                raise _bad("priorities must be numbers", "priorities")
            return PriorityOp(ids, [float(v) for v in values])
        if code == _OP_RETRIEVAL:
            if not all(_is_id(v) for v in values):
                raise _bad("retrieval counts must be ints >= 0", "counts")
            return RetrievalOp(ids, values)
        if not all(type(v) is bool for v in values) or type(obj[4]) is not bool:
            raise _bad("feedback must be booleans", "success")
        return FeedbackOp(ids, values, obj[4])
    if code == _OP_SETTINGS and n == 4:
        if type(obj[2]) is not dict or type(obj[3]) is not str:
            raise _bad("settings: changes must be a map and config a string", "config")
        return SettingsOp(obj[2], obj[3])
    raise _bad(f"operation: unknown op code {code!r} or wrong length {n}")


def _decode_put_v2(obj: list[Any], validate: bool) -> Record:
    """A version-2 put; its header must agree with its record (a checksummed frame always does,
    so a disagreement is bad input, named by field)."""
    _version, _code, kind_code, ts, track, m = obj
    record = _decode_record(kind_code, m, validate)
    if type(ts) is not float or record.ts != ts:
        raise _bad(f"put: header ts {ts!r} differs from the record's {record.ts!r}", "ts")
    expected = record.track_id if type(record) is Fingerprint else None
    if track != expected:
        raise _bad(f"put: header track {track!r} differs from the record's {expected!r}",
                   "track_id")  # fmt: skip
    return record


@dataclass(frozen=True, slots=True)
class PutSummary:
    """What replaying a put needs, read without building the record's models."""

    kind: str
    ts: float
    track_id: str | None


def peek_put(data: bytes) -> PutSummary | None:
    """The kind, ts and track of an encoded PutOp, or None for any other operation.

    Recovery replays puts by copying their bytes into LMDB; decoding every record into pydantic
    models only to re-derive three fields made recovery slower than ingest.
    """
    head = put_head(data)
    if head is not None:
        kind_code, ts, track, _offset = head
        return PutSummary(KIND_BY_CODE[kind_code], ts, track)
    if data[:3] != _PUT_PREFIX:
        return None
    obj = _unpack(data, "operation")
    if len(obj) != 4 or type(obj[3]) is not dict:
        raise _bad("put: malformed operation")
    kind = KIND_BY_CODE.get(obj[2])
    raw_ts: Any = obj[3].get("ts")
    if kind is None or type(raw_ts) not in (float, int):
        raise _bad(f"put: bad kind code {obj[2]!r} or ts {raw_ts!r}")
    return PutSummary(kind, float(raw_ts),
                      obj[3].get("track_id") if kind == "fingerprint" else None)  # fmt: skip


# --------------------------------------------------------------------------- envelopes


def encode_envelope(exp: Experience) -> bytes:
    """The LMDB value of a stored record (its id is the key)."""
    record = exp.record
    kind = kind_of(record)
    if kind != exp.kind:
        raise _bad(f"envelope kind {exp.kind!r} does not match its {kind} record", "kind")
    return _pack(
        [
            _V1,
            KIND_CODES[kind],
            float(exp.ts),
            exp.updated_lsn,
            exp.retrieval_count,
            exp.success_count,
            _record_map(record),
            *(() if exp.priority is None else (float(exp.priority),)),
        ]
    )


_PUT_PREFIX: Final = bytes((0x94, _V1, _OP_PUT))  # fixarray(4), version, op code
_PUT2_PREFIX: Final = bytes((0x96, _V2, _OP_PUT))  # fixarray(6), version, op code
_PUT2_FIXED: Final = 13  # prefix, kind, 0xcb, ts: then the track (str or nil), the record map
_U8, _U16, _U32 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I")


def put_head(data: BytesLike) -> tuple[int, float, str | None, int] | None:
    """``(kind code, ts, track id, offset of the record map)`` of a version-2 put, read from its
    fixed bytes without unpacking anything; None for any other operation (a version-1 put
    included: :func:`peek_put` reads those).

    Raises CodecError when the fixed bytes say "version-2 put" but what follows is not one.
    """
    if data[:3] != _PUT2_PREFIX:
        return None
    n = len(data)
    if n < _PUT2_FIXED + 2 or data[4] != 0xCB or data[3] not in KIND_BY_CODE:
        raise _bad(f"put: bad fixed header {bytes(data[:_PUT2_FIXED])!r}")
    ts = float(_F64.unpack_from(data, 5)[0])
    tag = data[_PUT2_FIXED]
    pos = _PUT2_FIXED + 1
    if tag == 0xC0:
        track = None
    else:
        if 0xA0 <= tag <= 0xBF:
            length = tag & 0x1F
        elif tag == 0xD9:
            length, pos = _U8.unpack_from(data, pos)[0], pos + 1
        elif tag == 0xDA:
            length, pos = _U16.unpack_from(data, pos)[0], pos + 2
        elif tag == 0xDB:
            length, pos = _U32.unpack_from(data, pos)[0], pos + 4
        else:
            raise _bad(f"put: the track id after the fixed header has msgpack tag {tag:#x}",
                       "track_id")  # fmt: skip
        if pos + length >= n:
            raise _bad("put: the track id runs past the operation", "track_id")
        try:
            track = bytes(data[pos : pos + length]).decode()
        except UnicodeDecodeError as exc:
            raise _bad(f"put: track id is not UTF-8 ({exc})", "track_id") from exc
        pos += length
    if not 0x80 <= data[pos] <= 0x8F and data[pos] not in (0xDE, 0xDF):
        raise _bad(f"put: the record after the header is not a map (tag {data[pos]:#x})")
    return data[3], ts, track, pos


def _uint(n: int) -> bytes:
    """``n >= 0`` as msgpack packs it (the smallest form): envelopes stay byte-identical."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + _U8.pack(n)
    if n < 0x10000:
        return b"\xcd" + _U16.pack(n)
    if n < 0x100000000:
        return b"\xce" + _U32.pack(n)
    return b"\xcf" + n.to_bytes(8, "big")


def envelope_at(op_bytes: BytesLike, kind_code: int, map_offset: int, updated_lsn: int) -> bytes:
    """The LMDB envelope of a new record from a version-2 put whose :func:`put_head` gave
    ``map_offset`` (replay: struct slicing only; the ts bytes are copied as they are)."""
    return b"".join((
        b"\x97\x01", bytes((kind_code,)), bytes(op_bytes[4:_PUT2_FIXED]), _uint(updated_lsn),
        b"\x00\x00", bytes(op_bytes[map_offset:]),
    ))  # fmt: skip


def envelope_from_put(
    op_bytes: bytes,
    *,
    kind: str,
    ts: float,
    updated_lsn: int,
    retrieval_count: int = 0,
    success_count: int = 0,
) -> bytes:
    """The LMDB envelope of a new record, built from its encoded PutOp without re-encoding.

    Both encodings share ``record_map`` byte for byte, so the envelope is its header followed by
    the tail of the WAL payload: on the ingest path this halves the codec's work.
    """
    kind_code = KIND_CODES[kind]
    head2 = put_head(op_bytes)
    if head2 is not None:
        if head2[0] != kind_code:
            raise _bad(f"not an encoded {kind} put")
        if head2[1] == ts and ts and not retrieval_count and not success_count:
            # the usual new record: kind and ts bytes copied from the put (equal nonzero floats
            # have one encoding), no header packed (:func:`envelope_at`'s layout)
            return b"".join((b"\x97\x01", op_bytes[3:_PUT2_FIXED], _uint(updated_lsn),
                             b"\x00\x00", op_bytes[head2[3] :]))  # fmt: skip
        tail = op_bytes[head2[3] :]
    elif op_bytes[:3] == _PUT_PREFIX and op_bytes[3] == kind_code:
        tail = op_bytes[4:]
    else:
        raise _bad(f"not an encoded {kind} put")
    head = _pack([_V1, kind_code, float(ts), updated_lsn, retrieval_count, success_count])
    return b"\x97" + head[1:] + tail  # fixarray(7): the six header items + record map


def _put2_map_offset(track: str | None) -> int:
    """Where the record map of a version-2 put with this track id starts (msgpack puts nil, or a
    fixstr / str 8 / str 16 / str 32 header before the UTF-8 bytes)."""
    if track is None:
        return _PUT2_FIXED + 1
    n = len(track) if track.isascii() else len(track.encode())
    return _PUT2_FIXED + n + (1 if n < 32 else 2 if n < 0x100 else 3 if n < 0x10000 else 5)


def new_put_envelopes(
    payloads: list[bytes], kinds: Sequence[int], ts: Sequence[float],
    tracks: Sequence[str | None], first_lsn: int,
) -> list[bytes]:
    """:func:`envelope_from_put` of consecutive new records (LSNs from ``first_lsn``, no
    counters) whose version-2 puts :func:`encode_op` just made in this process, given each
    record's kind code, ts and track id (None for a record without one): the same bytes, with
    each record map's offset computed from the track id instead of parsed back (``put_many``'s
    batched derive)."""
    cuts = list(map(_put2_map_offset, tracks))
    stamps = np.asarray(ts, dtype=np.float64)
    return envelopes_from_puts(payloads, kind=kinds, ts=stamps, first_lsn=first_lsn, cuts=cuts)


_ENVELOPE_ARRAYS: Final = (0x97, 0x98)  # fixarray(7), or fixarray(8) with a stored priority
_F64 = struct.Struct(">d")


def envelope_head(raw: BytesLike) -> tuple[int, float] | None:
    """(kind code, ts) from an envelope's first 12 bytes, without decoding the record; None when
    they are not an envelope of this codec version.

    The layout is ``fixarray(7 or 8) | version | kind | 0xcb <ts f64 BE>``: the eighth item is
    the priority ``update_priorities`` stores. Checkers and replay read many records this way;
    each must accept both array sizes (verify once reported every prioritized record as damage).
    """
    if len(raw) < 12 or raw[0] not in _ENVELOPE_ARRAYS or raw[1] != _V1 or raw[3] != 0xCB:
        return None
    return raw[2], float(_F64.unpack_from(raw, 4)[0])


def envelope_counters(data: BytesLike) -> list[Any]:
    """An envelope as its msgpack list (7 or 8 items), checked just enough to rewrite its
    counters and priority without building the record's models (many-id operations)."""
    obj = _unpack(data, "envelope")
    if len(obj) not in (7, 8) or type(obj[6]) is not dict or KIND_BY_CODE.get(obj[1]) is None:
        raise _bad("envelope: malformed")
    if not (_is_id(obj[3]) and _is_id(obj[4]) and _is_id(obj[5])):
        raise _bad("envelope: updated_lsn and counters must be ints >= 0")
    return obj


def pack_envelope(obj: list[Any]) -> bytes:
    """Inverse of :func:`envelope_counters` (drops a None priority, keeping 7 items)."""
    if len(obj) == 8 and obj[7] is None:
        obj = obj[:7]
    return _pack(obj)


def decode_envelope(id: int, data: BytesLike, *, validate: bool = False) -> Experience:
    """Inverse of :func:`encode_envelope`; ``id`` is the LMDB key the value was stored under."""
    obj = _unpack(data, "envelope")
    if len(obj) not in (7, 8):
        raise _bad(f"envelope: expected 7 or 8 items, got {len(obj)}")
    _, kind_code, ts, updated_lsn, retrievals, successes, m = obj[:7]
    priority = obj[7] if len(obj) == 8 else None
    if priority is not None and type(priority) is not float:
        raise _bad(f"envelope: bad priority {priority!r}", "priority")
    if type(ts) is not float and type(ts) is not int:
        raise _bad(f"envelope: bad ts {ts!r}", "ts")
    if not (_is_id(updated_lsn) and _is_id(retrievals) and _is_id(successes)):
        raise _bad("envelope: updated_lsn and counters must be ints >= 0")
    record = _decode_record(kind_code, m, validate)
    if validate and not (0.0 <= ts < float("inf")):
        raise _bad(f"envelope: bad ts {ts!r}", "ts")
    return Experience(
        id=id,
        kind=KIND_BY_CODE[kind_code],
        ts=float(ts),
        record=record,
        updated_lsn=updated_lsn,
        retrieval_count=retrievals,
        success_count=successes,
        priority=priority,
    )


# --------------------------------------------------------------------------- columnar puts

_F64_BE: Final = np.dtype(">f8")
_KEYS: Final[dict[str, bytes]] = {
    name: msgpack.packb(name) for name in ("track_id", "batch", "streaming", "embedding",
                                           "metadata", "algorithm_version", "ts", "validation")
}  # fmt: skip


def _float_block(m: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """(n, c) float64 -> (n, 9c) bytes: each value as msgpack float 64 (0xcb + big-endian)."""
    n, c = m.shape
    out = np.empty((n, c, 9), dtype=np.uint8)
    out[:, :, 0] = 0xCB
    out[:, :, 1:] = m.astype(_F64_BE).view(np.uint8).reshape(n, c, 8)
    return out.reshape(n, c * 9)


def _array_header(n: int) -> bytes:
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + struct.pack(">H", n)


def _const(n: int, data: bytes) -> npt.NDArray[np.uint8]:
    return np.broadcast_to(np.frombuffer(data, dtype=np.uint8), (n, len(data)))


def encode_fingerprint_puts(cols: FingerprintColumns) -> list[bytes]:
    """The WAL payloads of ``PutOp(Fingerprint(...))`` for each row of ``cols``, byte for byte
    what :func:`encode_op` writes for the same records, built without a model per row.

    The record map's fixed-width parts (the float arrays, ``ts``) are laid out for all rows at
    once with numpy; only the track id and the metadata are packed per row.
    """
    return encode_fingerprint_batch(cols)[0]


def encode_fingerprint_batch(cols: FingerprintColumns) -> tuple[list[bytes], list[int]]:
    """:func:`encode_fingerprint_puts` and, per row, where its record map starts in the payload
    (what :func:`put_head` would parse back; :func:`envelopes_from_puts` takes it as ``cuts``)."""
    n = len(cols)
    if n == 0:
        return [], []
    pack = msgpack.Packer(use_bin_type=True).pack
    # fields in Fingerprint's order: track_id, batch, streaming, embedding, metadata,
    # algorithm_version, ts, validation
    fixed: list[npt.NDArray[np.uint8]] = []
    nfields = 2  # track_id, ts
    if cols.batch is not None:
        nfields += 1
        fixed += [_const(n, _KEYS["batch"] + _array_header(_BATCH_LEN)), _float_block(cols.batch)]
    if cols.streaming is not None:
        assert cols.confidence is not None and cols.chunk_counts is not None
        nfields += 1
        head = _array_header(cols.streaming.shape[1])
        fixed += [
            _const(n, _KEYS["streaming"] + b"\x93" + head), _float_block(cols.streaming),
            _const(n, head), _float_block(cols.confidence),
        ]  # fmt: skip
    # per row: prefix+ts | track id | map head | track id | fixed floats | chunk count |
    # embedding | metadata | tail, each part a column of n byte strings (or one constant),
    # joined row by row in C (map over zip: no Python code per row but the metadata's pack)
    parts: list[Iterable[bytes]] = []
    if cols.streaming is not None:
        assert cols.chunk_counts is not None
        parts += [_rows(np.hstack(fixed)), list(map(pack, cols.chunk_counts))]
        fixed = []
    if cols.embeddings is not None:
        nfields += 1
        fixed += [_const(n, _KEYS["embedding"] + _array_header(cols.embeddings.shape[1])),
                  _float_block(cols.embeddings)]  # fmt: skip
    if fixed:
        parts.append(_rows(np.hstack(fixed)))
    tail = b""
    if cols.algorithm_version is not None:
        nfields += 1
        tail = _KEYS["algorithm_version"] + pack(cols.algorithm_version)
    ts_key = tail + _KEYS["ts"]
    valid = b""
    if cols.batch is None:  # streaming only: pending validation, as the model sets it
        nfields += 1
        valid = _KEYS["validation"] + pack({"status": "pending"})
    tails = _rows(np.hstack([_const(n, ts_key), _float_block(cols.ts[:, None]), _const(n, valid)]))
    # the version-2 put header: [2, put, kind, ts (float 64), track id, record map]
    prefix = bytes((0x96, _V2, _OP_PUT, KIND_CODES["fingerprint"], 0xCB))
    ts_be = np.ascontiguousarray(cols.ts, dtype=_F64_BE).view(np.uint8).reshape(n, 8)
    pres = _rows(np.hstack([_const(n, prefix), ts_be]))
    tid_key = _KEYS["track_id"]
    tids = list(map(pack, cols.track_ids))
    cuts = list(map((len(prefix) + 8).__add__, map(len, tids)))  # the record map's start
    plain = bytes((0x80 | nfields,)) + tid_key
    if cols.metadata is None or cols.metadata.count(None) == n:
        heads: Iterable[bytes] = repeat(plain, n)
        metas: Iterable[bytes] = repeat(b"", n)
    else:
        with_meta = bytes((0x80 | (nfields + 1),)) + tid_key
        meta_key = _KEYS["metadata"]
        heads = [plain if md is None else with_meta for md in cols.metadata]
        metas = [b"" if md is None else meta_key + pack(md) for md in cols.metadata]
    rows = zip(pres, tids, heads, tids, *parts, metas, tails, strict=True)
    return list(map(b"".join, rows)), cuts


def _rows(block: npt.NDArray[np.uint8]) -> list[bytes]:
    """The rows of an (n, w) byte matrix as n byte strings (slices of one copy)."""
    w = block.shape[1]
    raw = np.ascontiguousarray(block).tobytes()
    return [raw[i : i + w] for i in range(0, len(raw), w)]


_UINT_CLASSES: Final = (  # msgpack's smallest encoding of a non-negative int: (below, marker)
    (1 << 7, None), (1 << 8, 0xCC), (1 << 16, 0xCD), (1 << 32, 0xCE), (1 << 64, 0xCF)
)


def _record_map_offset(payload: bytes) -> int:
    """Where the record map starts in an encoded put (version 2: after the fixed header and
    the track id; version 1: after four bytes)."""
    head = put_head(payload)
    return 4 if head is None else head[3]


def envelopes_from_puts(
    payloads: list[bytes],
    *,
    kind: str | Sequence[int],
    ts: npt.NDArray[np.float64],
    first_lsn: int,
    cuts: Sequence[int] | None = None,
) -> list[bytes]:
    """:func:`envelope_from_put` of consecutive new records (LSNs from ``first_lsn``, no
    counters), the same bytes, with the headers laid out for all rows at once. ``kind``: the
    records' kind name, or each record's kind code; ``cuts``: where each payload's record map
    starts, when the encoder said so (else parsed from each)."""
    n = len(payloads)
    if n == 0:
        return []
    head = np.empty((n, 4), dtype=np.uint8)
    head[:] = (0x97, _V1, 0, 0xCB)  # fixarray(7), envelope version, kind, float 64
    head[:, 2] = KIND_CODES[kind] if isinstance(kind, str) else kind
    if cuts is None:
        cuts = [_record_map_offset(p) for p in payloads]
    ts_bytes = ts.astype(_F64_BE).view(np.uint8).reshape(n, 8)
    lsns = np.arange(first_lsn, first_lsn + n, dtype=np.uint64)
    out: list[bytes] = []
    start = 0
    low = 0
    for below, marker in _UINT_CLASSES:
        end = start + int(np.count_nonzero(lsns[start:] < below)) if low < below else start
        low = below
        if end == start:
            continue
        m = end - start
        width = 1 if marker is None else 1 << (marker - 0xCC)
        parts = [head[start:end], ts_bytes[start:end]]
        if marker is not None:
            parts.append(np.full((m, 1), marker, dtype=np.uint8))
        be = lsns[start:end].astype(">u8").view(np.uint8).reshape(m, 8)[:, 8 - width :]
        parts += [be, np.zeros((m, 2), dtype=np.uint8)]  # the lsn, then counters 0, 0
        block = np.ascontiguousarray(np.hstack(parts))
        rows = zip(_rows(block), payloads[start:end], cuts[start:end], strict=True)
        out += [h + p[c:] for h, p, c in rows]
        start = end
    return out
