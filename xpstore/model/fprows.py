"""Fingerprint rows: the fixed-width numbers of each stored fingerprint (LMDB table ``fprows``).

Attaching the k-NN index with no index file needs the 25 audio values (and the optional
embedding) of every live fingerprint. Decoding a million msgpack envelopes for that took most
of the 12-26 s of the first answer (docs/benchmarks.md), so the applier keeps one row per
fingerprint record in the table ``fprows``, written in the same LMDB transaction as the record
(as the ``prio`` table keeps the sampling inputs): the attach reads the table's values in one
cursor pass into one ``np.frombuffer``. The row is a pure function of the record's envelope
(:func:`rows_for_envelopes`), so recovery, salvage and point-in-time restore, which apply the
same record changes, rebuild it exactly; ``check`` recomputes it and compares.

Layout of a row (little-endian, 8-byte words; docs/formats.md)::

    id u64 | emb_len u32 | version u16 (1) | flags u16 (0)
    | audio 25 x f64 (BATCH_FIELDS order, NaN = missing)
    | embedding emb_len x f32, zero-padded to a multiple of 8 bytes
    | check u64

``check = SEED + sum(word_i * K_i) mod 2**64`` over every preceding 8-byte word, ``K_i`` the odd
constants :data:`_K` (splitmix64 of ``i``, low bit set): any change of one word changes it, an
all-zero row fails it, and numpy verifies a million rows in one vectorized pass. The sum of the
``check`` words of a set of rows is the set's digest (the fitted statistics are kept with it).

The envelope parsing lives here too (``parse_fingerprint``: the codec's map read directly,
without pydantic), so that the persistence layer can compute rows and ``index.rows`` reuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from xpstore.errors import CodecError
from xpstore.model.codec import KIND_CODES
from xpstore.model.events import RawFingerprint
from xpstore.model.records import BATCH_FIELDS, STREAMING_FIELDS, STREAMING_FIELDS_NO_HARMONIC

__all__ = [
    "FP_CODE",
    "ROW_VERSION",
    "RowColumns",
    "audio_row",
    "decode_into",
    "decode_rows",
    "empty_columns",
    "encode_rows",
    "float_runs",
    "parse_fingerprint",
    "row_id",
    "rows_for_envelopes",
    "rows_or_none",
    "set_digest",
]

Buffer = bytes | memoryview
AUDIO_DIM: Final = len(BATCH_FIELDS)
FP_CODE: Final = KIND_CODES["fingerprint"]
ROW_VERSION: Final = 1
_HEAD_WORDS: Final = 2  # id; emb_len | version | flags
_AUDIO_AT: Final = _HEAD_WORDS * 8
_FIXED: Final = _AUDIO_AT + AUDIO_DIM * 8 + 8  # head, audio, check: 224 bytes with no embedding
_MAX_EMB: Final = 65_535
_SEED: Final = np.uint64(0x6A09E667F3BCC908)


def _splitmix(n: int) -> npt.NDArray[np.uint64]:
    x = (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x | np.uint64(1)


_K: Final = _splitmix(_HEAD_WORDS + AUDIO_DIM + (4 * _MAX_EMB + 7) // 8)

_COL: Final = {name: j for j, name in enumerate(BATCH_FIELDS)}
_STREAM_COLS: Final = {
    len(STREAMING_FIELDS): np.array([_COL[n] for n in STREAMING_FIELDS]),
    len(STREAMING_FIELDS_NO_HARMONIC): np.array([_COL[n] for n in STREAMING_FIELDS_NO_HARMONIC]),
}


# ----------------------------------------------------------------------------- envelopes


def audio_row(batch: Any, streaming: Any, where: str) -> npt.NDArray[np.float64]:
    """The 25 audio values of an encoded record map's ``batch`` / ``streaming`` (NaN: absent)."""
    row = np.full(AUDIO_DIM, np.nan)
    if batch is not None:
        if type(batch) is not list or len(batch) != AUDIO_DIM:
            raise CodecError(f"{where}: batch is not {AUDIO_DIM} numbers", field="batch")
        row[:] = batch
    elif streaming is not None:
        if type(streaming) is not list or len(streaming) != 3 or type(streaming[0]) is not list:
            raise CodecError(f"{where}: malformed streaming values", field="streaming")
        cols = _STREAM_COLS.get(len(streaming[0]))
        if cols is None:
            raise CodecError(
                f"{where}: {len(streaming[0])} streaming values; expected 13 or 10",
                field="streaming.values",
            )
        row[cols] = streaming[0]
    return row


def parse_fingerprint(data: bytes | memoryview, where: str = "record") -> RawFingerprint:
    """The raw numbers of an encoded fingerprint *envelope* (an LMDB ``records`` value)."""
    try:
        obj = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"{where}: not a msgpack envelope: {exc}") from exc
    ok = type(obj) is list and len(obj) in (7, 8) and obj[1] == FP_CODE
    if not ok or type(obj[6]) is not dict:
        raise CodecError(f"{where}: not an encoded fingerprint envelope")
    m = obj[6]
    track = m.get("track_id")
    if type(track) is not str:
        raise CodecError(f"{where}: fingerprint without a track_id", field="track_id")
    emb = m.get("embedding")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, quietly
        embedding = np.asarray(emb, dtype=np.float32) if emb is not None else None
    meta = m.get("metadata")
    return RawFingerprint(
        track, audio_row(m.get("batch"), m.get("streaming"), where), embedding,
        meta if type(meta) is dict else None,
    )  # fmt: skip


BATCH_AT: Final = msgpack.packb("batch") + b"\xdc\x00\x19"  # key, array16 of 25 floats
EMB_KEY: Final = msgpack.packb("embedding")
_F64_BE: Final = np.dtype(">f8")


def float_runs(datas: Sequence[bytes], marker: bytes, count: int) -> tuple[
        npt.NDArray[np.float64], npt.NDArray[np.bool_]]:  # fmt: skip
    """The ``count`` msgpack float64s that follow ``marker`` in each envelope, decoded for all
    rows at once; ``ok`` is False where a row does not have them in that form (the caller
    decodes those rows one by one). Valid UTF-8 never holds ``marker`` (0xdc 0x00 is not a
    UTF-8 sequence), and each float's 0xcb tag is checked, so a row is never misread."""
    n = len(datas)
    width = 9 * count
    chunks = []
    ok = np.zeros(n, dtype=bool)
    blank = bytes(width)
    for i, data in enumerate(datas):
        at = data.find(marker, 12)
        if at < 0 or at + len(marker) + width > len(data):
            chunks.append(blank)
            continue
        start = at + len(marker)
        chunks.append(data[start : start + width])
        ok[i] = True
    raw = np.frombuffer(b"".join(chunks), dtype=np.uint8).reshape(n, count, 9)
    ok &= (raw[:, :, 0] == 0xCB).all(axis=1)
    values = np.ascontiguousarray(raw[:, :, 1:]).view(_F64_BE).reshape(n, count)
    return values.astype(np.float64), ok


# ----------------------------------------------------------------------------- rows


def _words(n_emb: int) -> int:
    """8-byte words of a row before its check word."""
    return _HEAD_WORDS + AUDIO_DIM + (4 * n_emb + 7) // 8


def encode_rows(
    ids: Sequence[int] | npt.NDArray[np.int64],
    audio: npt.NDArray[np.float64],
    embeddings: Sequence[npt.NDArray[np.float32] | None] | npt.NDArray[Any] | None = None,
) -> list[bytes]:
    """The table rows of fingerprint records ``ids`` with these audio rows ``(n, 25)`` and
    embeddings (each row's own, any length; None: none; or one ``(n, D)`` array), one
    ``bytes`` per record."""
    n = len(ids)
    if isinstance(embeddings, np.ndarray):
        with np.errstate(over="ignore"):  # as parse_fingerprint casts the envelope's values
            emb32 = np.asarray(embeddings, dtype=np.float32)
        return _encode_block(np.asarray(ids, dtype=np.int64), audio, emb32)
    if embeddings is None or (type(embeddings) is list and all(e is None for e in embeddings)):
        # no row has an embedding (the usual put): one block, no per-row bookkeeping
        return _encode_block(np.asarray(ids, dtype=np.int64), audio,
                             np.zeros((n, 0), dtype=np.float32))  # fmt: skip
    emb_list: Sequence[npt.NDArray[np.float32] | None] = embeddings
    lens = np.fromiter((0 if e is None else e.shape[0] for e in emb_list), np.int64, count=n)
    if lens.size and int(lens.max()) > _MAX_EMB:
        raise CodecError(f"an embedding of {int(lens.max())} values is too long for a row")
    out: list[bytes] = [b""] * n
    id_arr = np.asarray(ids, dtype=np.int64)
    for width_emb in np.unique(lens).tolist():
        sel = np.flatnonzero(lens == width_emb)
        words = _words(width_emb)
        block = np.zeros((sel.shape[0], words + 1), dtype=np.uint64)
        block[:, 0] = id_arr[sel].astype(np.uint64)
        block[:, 1] = np.uint64(width_emb) | (np.uint64(ROW_VERSION) << np.uint64(32))
        block[:, _HEAD_WORDS : _HEAD_WORDS + AUDIO_DIM] = (
            np.ascontiguousarray(audio[sel], dtype="<f8").view(np.uint64)
        )
        if width_emb:
            emb = np.zeros((sel.shape[0], (words - _HEAD_WORDS - AUDIO_DIM) * 2), dtype="<f4")
            emb[:, :width_emb] = np.stack([emb_list[i] for i in sel.tolist()])  # type: ignore[misc]
            block[:, _HEAD_WORDS + AUDIO_DIM : words] = emb.view(np.uint64)
        with np.errstate(over="ignore"):
            block[:, words] = _check_words(block[:, :words])
        raw = block.astype("<u8").tobytes()
        size = (words + 1) * 8
        for j, i in enumerate(sel.tolist()):
            out[i] = raw[j * size : (j + 1) * size]
    return out


def _encode_block(
    ids: npt.NDArray[np.int64], audio: npt.NDArray[np.float64], emb: npt.NDArray[np.float32]
) -> list[bytes]:
    """:func:`encode_rows` where every row has an embedding of the same length (one block)."""
    n, dim = emb.shape
    if dim > _MAX_EMB:
        raise CodecError(f"an embedding of {dim} values is too long for a row")
    words = _words(dim)
    block = np.zeros((n, words + 1), dtype=np.uint64)
    block[:, 0] = ids.astype(np.uint64)
    block[:, 1] = np.uint64(dim) | (np.uint64(ROW_VERSION) << np.uint64(32))
    block[:, _HEAD_WORDS : _HEAD_WORDS + AUDIO_DIM] = np.ascontiguousarray(
        audio, dtype="<f8").view(np.uint64)  # fmt: skip
    pad = np.zeros((n, (words - _HEAD_WORDS - AUDIO_DIM) * 2), dtype="<f4")
    pad[:, :dim] = emb
    block[:, _HEAD_WORDS + AUDIO_DIM : words] = pad.view(np.uint64)
    with np.errstate(over="ignore"):
        block[:, words] = _check_words(block[:, :words])
    raw = block.astype("<u8").tobytes()
    size = (words + 1) * 8
    return [raw[i : i + size] for i in range(0, n * size, size)]


def rows_for_envelopes(ids: Sequence[int], datas: Sequence[bytes]) -> list[bytes]:
    """:func:`encode_rows` of encoded fingerprint envelopes (the applier, at every put or
    rewrite of a fingerprint): the batch values are read in columns; rows with streaming
    values only, or with an embedding, are parsed one by one. Raises CodecError naming the
    record for an envelope that is not a fingerprint's."""
    rows = _rows(ids, datas, strict=True)
    return rows  # type: ignore[return-value]


def rows_or_none(ids: Sequence[int], datas: Sequence[bytes]) -> list[bytes | None]:
    """:func:`rows_for_envelopes`, with None for an envelope that does not parse (the applier
    and the table's fill never refuse a record over its derived row; ``check`` reports it)."""
    return _rows(ids, datas, strict=False)


def _rows(ids: Sequence[int], datas: Sequence[bytes], *, strict: bool) -> list[bytes | None]:
    n = len(datas)
    audio, ok = float_runs(datas, BATCH_AT, AUDIO_DIM)
    embs: list[npt.NDArray[np.float32] | None] = [None] * n
    failed: list[int] = []
    for i, data in enumerate(datas):
        if not ok[i] or data.find(EMB_KEY, 12) >= 0:
            try:
                raw = parse_fingerprint(data, f"record {ids[i]}")
            except (CodecError, ValueError, TypeError, OverflowError):
                if strict:
                    raise
                failed.append(i)
                continue
            audio[i] = raw.audio
            embs[i] = raw.embedding
    out: list[bytes | None] = list(encode_rows(ids, audio, embs))
    for i in failed:
        out[i] = None
    return out


@dataclass
class RowColumns:
    """Rows of the ``fprows`` table decoded into columns (sorted by ``ids`` when read in key
    order). ``embedding`` holds only embeddings of length ``embedding_dim`` (``has``); rows
    whose check word or header is wrong are left out and their ids listed in ``bad``."""

    ids: npt.NDArray[np.int64]
    audio: npt.NDArray[np.float64]
    embedding: npt.NDArray[np.float32] | None
    has_embedding: npt.NDArray[np.bool_]
    check: npt.NDArray[np.uint64]
    bad: list[int]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, idx: npt.NDArray[np.intp]) -> RowColumns:
        """The rows at positions ``idx``."""
        return RowColumns(
            self.ids[idx], self.audio[idx],
            self.embedding[idx] if self.embedding is not None else None,
            self.has_embedding[idx], self.check[idx], [],
        )  # fmt: skip


def empty_columns(n: int, embedding_dim: int | None) -> RowColumns:
    """Columns for ``n`` rows, to be filled by :func:`decode_into`."""
    return RowColumns(
        np.zeros(n, dtype=np.int64), np.empty((n, AUDIO_DIM)),
        np.zeros((n, embedding_dim), np.float32) if embedding_dim else None,
        np.zeros(n, dtype=bool), np.zeros(n, dtype=np.uint64), [],
    )  # fmt: skip


def _check_words(words: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """The check word of each row of ``words`` (n, w): ``_SEED + sum(word_i * _K[i])`` mod
    2^64 (one ``einsum``: 4x a product and a sum; the same in any order, modulo 2^64)."""
    k = _K[: words.shape[1]]
    with np.errstate(over="ignore"):
        out: npt.NDArray[np.uint64] = _SEED + np.einsum("ij,j->i", words, k, dtype=np.uint64)
    return out


def decode_into(values: Sequence[Buffer], cols: RowColumns, offset: int) -> npt.NDArray[np.bool_]:
    """Decode and verify table rows (values as read, bytes or memoryviews) into ``cols`` at
    rows ``offset...``: one ``np.frombuffer`` per row width (one when every row has the same
    embedding length). Returns which rows passed their check word and header.

    The common case first: every row the width of the first (the table of one store, whose
    fingerprints share an embedding length), read as one block without measuring each row; it
    stands only if every row passes (a chunk of mixed widths read that way misaligns, and its
    rows fail their check words), else the rows are grouped by their lengths."""
    n = len(values)
    if n and len(values[0]) >= _FIXED and not len(values[0]) % 8:
        joined = b"".join(values)
        width = len(values[0])
        if len(joined) == n * width:
            good = _decode_block(np.frombuffer(joined, dtype="<u8").reshape(n, width // 8),
                                 cols, slice(offset, offset + n))  # fmt: skip
            if good.all():
                return good
    lens = np.fromiter(map(len, values), np.int64, count=n)
    widths = np.unique(lens).tolist()
    good = np.zeros(n, dtype=bool)
    for width in widths:
        sel = np.flatnonzero(lens == width) if len(widths) > 1 else np.arange(n)
        group = [values[i] for i in sel.tolist()] if len(widths) > 1 else values
        if width < _FIXED or width % 8:
            continue
        block = np.frombuffer(b"".join(group), dtype="<u8").reshape(sel.shape[0], width // 8)
        good[sel] = _decode_block(block, cols, sel + offset)
    return good


def _decode_block(
    block: npt.NDArray[np.uint64], cols: RowColumns, at: slice | npt.NDArray[np.intp]
) -> npt.NDArray[np.bool_]:
    """Rows of one width (``block``: n x words + 1) into ``cols`` at ``at``; which pass."""
    words = block.shape[1] - 1
    head = block[:, 1]
    n_emb = (head & np.uint64(0xFFFFFFFF)).astype(np.int64)
    good: npt.NDArray[np.bool_] = (
        (_check_words(block[:, :words]) == block[:, words])
        & ((head >> np.uint64(32)) == np.uint64(ROW_VERSION))
        & (_HEAD_WORDS + AUDIO_DIM + (4 * n_emb + 7) // 8 == words)
    )
    cols.ids[at] = block[:, 0].astype(np.int64)
    cols.audio[at] = block[:, _HEAD_WORDS : _HEAD_WORDS + AUDIO_DIM].view("<f8")
    cols.check[at] = block[:, words]
    if cols.embedding is not None:
        dim = cols.embedding.shape[1]
        # only rows that pass: a damaged header may claim ``dim`` values in a row too short
        # to hold them (a failing row's embedding is never read)
        match = (n_emb == dim) & good
        cols.has_embedding[at] = match
        if match.any():
            e = block[:, _HEAD_WORDS + AUDIO_DIM : words].view("<f4")[:, :dim]
            if isinstance(at, slice):
                cols.embedding[at][match] = e[match]
            else:
                cols.embedding[at[match]] = e[match]
    return good


def decode_rows(values: Sequence[Buffer], embedding_dim: int | None) -> RowColumns:
    """The columns of table rows (values as read, in key order: ids ascending), verified;
    rows that fail are left out and their (claimed) ids listed in ``bad``."""
    cols = empty_columns(len(values), embedding_dim)
    good = decode_into(values, cols, 0)
    return select_good(cols, good, values)


def select_good(cols: RowColumns, good: npt.NDArray[np.bool_], values: Sequence[Buffer]
                ) -> RowColumns:  # fmt: skip
    """``cols`` without the rows ``good`` refuses (``values``: the rows as read, aligned)."""
    if good.all():
        return cols
    bad = [row_id(values[i]) for i in np.flatnonzero(~good).tolist()]
    out = cols.take(np.flatnonzero(good))
    out.bad = bad
    return out


def row_id(value: Buffer) -> int:
    """The id word of a (bad) row, or -1 when the row is too short to hold one."""
    return int.from_bytes(bytes(value[:8]), "little") if len(value) >= 8 else -1


def set_digest(check: npt.NDArray[np.uint64]) -> int:
    """The digest of a set of rows: the sum of their check words mod 2**64 (order-free)."""
    return int(check.sum(dtype=np.uint64)) if check.size else 0
