"""Fingerprint rows: the raw numbers an index is built from, read without pydantic.

A build reads every live fingerprint; decoding a million envelopes into models would cost more
than the FAISS build itself, so this module reads the msgpack map directly (the codec's layout:
``batch`` is the 25 values in ``BATCH_FIELDS`` order, ``streaming`` is ``[values, confidence,
chunk_count]`` with 13 or 10 values in their canonical order) into column arrays:

* ``audio``: ``(n, 25)`` float64, NaN where a value is missing (a streaming-only track has 13);
* ``embedding``: ``(n, dim)`` float32, or None when the store has no embedding block;
* ``has_embedding``: which rows carry one.

The same rows feed :meth:`HybridEmbedder.embed_rows`, so a vector built here and one built from
a model by ``HybridEmbedder.embed`` are equal (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from xpstore.errors import CodecError
from xpstore.model.events import RawFingerprint
from xpstore.model.fprows import (
    BATCH_AT,
    EMB_KEY,
    audio_row,
    float_runs,
    parse_fingerprint,
)
from xpstore.model.records import BATCH_FIELDS, Fingerprint

__all__ = [
    "FingerprintRows",
    "RawFingerprint",
    "StreamingRow",
    "envelope_track",
    "parse_fingerprint",
    "raw_from_model",
    "rows_from_envelopes",
    "streaming_audio",
]

AUDIO_DIM: Final = len(BATCH_FIELDS)
_audio_row = audio_row
_COL: Final = {name: j for j, name in enumerate(BATCH_FIELDS)}


def envelope_track(data: bytes | memoryview) -> tuple[str, dict[str, Any] | None]:
    """Only the track id and metadata of an encoded fingerprint envelope (result mapping: no
    arrays built, it runs for every answer of every query)."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"not a msgpack envelope: {exc}") from exc
    m = obj[6] if type(obj) is list and len(obj) in (7, 8) else None
    track = m.get("track_id") if type(m) is dict else None
    if type(track) is not str:
        raise CodecError("not an encoded fingerprint envelope", field="track_id")
    meta = m.get("metadata")  # type: ignore[union-attr]
    return track, meta if type(meta) is dict else None


def raw_from_model(fp: Fingerprint) -> RawFingerprint:
    """The same numbers from a model (the write path, which has the model in hand)."""
    row = np.full(AUDIO_DIM, np.nan)
    if fp.batch is not None:
        row[:] = [getattr(fp.batch, n) for n in BATCH_FIELDS]
    elif fp.streaming is not None:
        for name, value in fp.streaming.values.items():
            row[_COL[name]] = value
    emb = np.asarray(fp.embedding, dtype=np.float32) if fp.embedding is not None else None
    return RawFingerprint(fp.track_id, row, emb, dict(fp.metadata) if fp.metadata else None)


_BATCH_AT: Final = BATCH_AT
_EMB_KEY: Final = EMB_KEY
_float_runs = float_runs


def rows_from_envelopes(
    ids: Sequence[int], track_ids: Sequence[str], datas: Sequence[bytes],
    embedding_dim: int | None,
) -> FingerprintRows:  # fmt: skip
    """:class:`FingerprintRows` of many encoded fingerprint envelopes, the batch values (and
    embeddings) decoded in numpy rather than one msgpack decode per record: what attaching an
    index with no index file reads for every live fingerprint (12-16 s at a million tracks
    record by record). Rows without batch values, or with an embedding of another form, are
    parsed one by one with :func:`parse_fingerprint`."""
    n = len(datas)
    audio, ok = _float_runs(datas, _BATCH_AT, AUDIO_DIM)
    emb = None
    has = np.zeros(n, dtype=bool)
    if embedding_dim:
        head = bytes((0x90 | embedding_dim,)) if embedding_dim < 16 else (
            b"\xdc" + embedding_dim.to_bytes(2, "big"))  # fmt: skip
        values, has = _float_runs(datas, _EMB_KEY + head, embedding_dim)
        with np.errstate(over="ignore"):  # beyond float32's range: inf, as parse_fingerprint
            emb = values.astype(np.float32)
        emb[~has] = 0.0
    slow = np.flatnonzero(~ok).tolist()
    for i in slow:
        raw = parse_fingerprint(datas[i], f"record {ids[i]}")
        audio[i] = raw.audio
        if emb is not None and raw.embedding is not None and raw.embedding.shape[0] == emb.shape[1]:
            emb[i] = raw.embedding
            has[i] = True
    return FingerprintRows(np.asarray(ids, dtype=np.int64).reshape(n), list(track_ids), audio,
                           emb, has)  # fmt: skip


@dataclass
class FingerprintRows:
    """Column arrays of many fingerprints (see module doc); ``ids`` are record ids."""

    ids: npt.NDArray[np.int64]
    track_ids: list[str]
    audio: npt.NDArray[np.float64]
    embedding: npt.NDArray[np.float32] | None
    has_embedding: npt.NDArray[np.bool_]
    metadata: list[dict[str, Any] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @classmethod
    def from_raw(
        cls,
        ids: Sequence[int],
        raws: Sequence[RawFingerprint],
        embedding_dim: int | None,
        *,
        keep_metadata: bool = False,
    ) -> FingerprintRows:
        """Stack rows; embeddings of another dimension than the store's are ignored."""
        n = len(raws)
        audio = np.empty((n, AUDIO_DIM))
        emb = np.zeros((n, embedding_dim), dtype=np.float32) if embedding_dim else None
        has = np.zeros(n, dtype=bool)
        for i, raw in enumerate(raws):
            audio[i] = raw.audio
            ok = emb is not None and raw.embedding is not None
            if ok and raw.embedding.shape[0] == emb.shape[1]:  # type: ignore[union-attr]
                emb[i] = raw.embedding  # type: ignore[index]
                has[i] = True
        return cls(
            np.asarray(ids, dtype=np.int64).reshape(n),
            [r.track_id for r in raws],
            audio,
            emb,
            has,
            [r.metadata for r in raws] if keep_metadata else [],
        )

    @classmethod
    def concat(cls, parts: Sequence[FingerprintRows]) -> FingerprintRows:
        """The rows of ``parts`` one after another (all with or all without embeddings)."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls(np.zeros(0, dtype=np.int64), [], np.zeros((0, AUDIO_DIM)), None,
                       np.zeros(0, dtype=bool))  # fmt: skip
        embs = [p.embedding for p in parts]
        return cls(
            np.concatenate([p.ids for p in parts]),
            [t for p in parts for t in p.track_ids],
            np.vstack([p.audio for p in parts]),
            None if embs[0] is None else np.vstack(embs),  # type: ignore[arg-type]
            np.concatenate([p.has_embedding for p in parts]),
        )

    def select(self, mask: npt.NDArray[np.bool_]) -> FingerprintRows:
        """The rows where ``mask`` holds."""
        idx = np.flatnonzero(mask)
        return FingerprintRows(
            self.ids[idx],
            [self.track_ids[i] for i in idx],
            self.audio[idx],
            self.embedding[idx] if self.embedding is not None else None,
            self.has_embedding[idx],
            [self.metadata[i] for i in idx] if self.metadata else [],
        )



def streaming_audio(data: bytes | memoryview, where: str = "record") -> StreamingRow | None:
    """The streaming values of an encoded fingerprint envelope as a 25-column row (NaN where
    absent) with their mean confidence, or None when it has none (``similar(strategy="fast")``)."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"{where}: not a msgpack envelope: {exc}") from exc
    m = obj[6] if type(obj) is list and len(obj) in (7, 8) else None
    if type(m) is not dict or type(m.get("track_id")) is not str:
        raise CodecError(f"{where}: not an encoded fingerprint envelope", field="track_id")
    streaming = m.get("streaming")
    if streaming is None:
        return None
    row = _audio_row(None, streaming, where)
    conf = streaming[1]
    mean = float(sum(conf) / len(conf)) if conf else 0.0
    return StreamingRow(m["track_id"], row, mean, m.get("batch") is not None)


@dataclass(frozen=True)
class StreamingRow:
    """A stored fingerprint's streaming values (25 columns, NaN where absent)."""

    track_id: str
    audio: npt.NDArray[np.float64]
    mean_confidence: float
    has_batch: bool
