"""WAL segment and frame layout: encoding, decoding and validation (no I/O policy here).

The layout is documented in ``docs/formats.md``. In short::

    segment = header(56 B) frame*
    header  = magic "XPWALSEG" | version u32 | flags u32 | store_id u64 | salt u32 | reserved u32
              | first_lsn u64 | created f64 | header_crc u32 | pad u32
    frame   = crc u32 | length u32 | first_lsn u64 | count u32 | type u8 | flags u8 | rsv u16
              | commit_time f64 | payload[length] | zero pad to a multiple of 8
    payload = (op_length u32 | op bytes){count}

All integers are little-endian. ``crc`` is CRC32C over the segment's salt followed by the frame
from ``length`` to the end of the payload: a frame copied from another segment (another salt) or
left over from an older file never validates. One frame is one group commit; its operations have
the consecutive LSNs ``first_lsn .. first_lsn + count - 1``.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from itertools import chain

import google_crc32c
import numpy as np

SEGMENT_MAGIC = b"XPWALSEG"
SEGMENT_VERSION = 2
"""The newest segment format read. Version 2 adds the preallocated flag; append-only segments
are still written as version 1, so an older xpstore reads them, and refuses a preallocated one
as a newer version instead of taking its zeros for damage."""
SEGMENT_SUFFIX = ".wal"
SEGMENT_NAME_RE = re.compile(r"^(\d{20})\.wal$")

_HEADER = struct.Struct("<8sIIQIIQdII")
HEADER_SIZE = _HEADER.size  # 56
_FRAME = struct.Struct("<IIQIBBHd")
FRAME_HEADER_SIZE = _FRAME.size  # 32
_OP_LEN = struct.Struct("<I")
FRAME_TYPE_OPS = 1

if google_crc32c.implementation != "c":  # pragma: no cover - depends on the wheel installed
    raise ImportError(
        "google-crc32c is using its pure-Python fallback, which is ~100x slower; "
        "install a wheel with the C extension"
    )

assert HEADER_SIZE % 8 == 0 and FRAME_HEADER_SIZE % 8 == 0


def crc32c(data: bytes | memoryview, start: int = 0) -> int:
    """CRC32C of ``data`` continuing from ``start`` (0 for a fresh checksum).

    The C extension takes only ``bytes``; a memoryview slice is copied first (cheap next to
    reading the segment).
    """
    return int(google_crc32c.extend(start, data if isinstance(data, bytes) else bytes(data)))


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:020d}{SEGMENT_SUFFIX}"


def padded(n: int) -> int:
    return (n + 7) & ~7


FLAG_PREALLOCATED = 1
"""Segment header flag: the file is zero-filled ahead of its frames, so zeros after the last
frame are unwritten space (the end of the segment's log), not a zeroed frame."""


@dataclass(frozen=True, slots=True)
class SegmentHeader:
    version: int
    store_id: int
    salt: int
    first_lsn: int
    created: float
    flags: int = 0

    @property
    def preallocated(self) -> bool:
        return bool(self.flags & FLAG_PREALLOCATED)

    @property
    def salt_bytes(self) -> bytes:
        return struct.pack("<I", self.salt)


def encode_header(
    store_id: int, salt: int, first_lsn: int, created: float, flags: int = 0
) -> bytes:
    version = 2 if flags & FLAG_PREALLOCATED else 1
    body = _HEADER.pack(
        SEGMENT_MAGIC, version, flags, store_id, salt, 0, first_lsn, created, 0, 0
    )
    crc = crc32c(body[: HEADER_SIZE - 8])
    return body[: HEADER_SIZE - 8] + struct.pack("<II", crc, 0)


class HeaderError(ValueError):
    """A segment header that cannot be trusted; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def decode_header(data: bytes | memoryview) -> SegmentHeader:
    if len(data) < HEADER_SIZE:
        raise HeaderError(
            "truncated_header", f"segment header needs {HEADER_SIZE} bytes, has {len(data)}"
        )
    magic, version, flags, store_id, salt, _rsv, first_lsn, created, crc, _pad = (
        _HEADER.unpack_from(data)
    )
    if magic != SEGMENT_MAGIC:
        raise HeaderError("bad_magic", f"not a WAL segment (magic {bytes(magic)!r})")
    if crc32c(bytes(data[: HEADER_SIZE - 8])) != crc:
        raise HeaderError("header_crc_mismatch", "segment header checksum mismatch")
    if version > SEGMENT_VERSION:
        raise HeaderError(
            "newer_version",
            f"segment format version {version} is newer than supported ({SEGMENT_VERSION})",
        )
    if flags & ~FLAG_PREALLOCATED or (flags and version < 2):
        raise HeaderError(
            "newer_version", f"segment flags {flags:#x} unknown to segment format {version}"
        )
    return SegmentHeader(version, store_id, salt, first_lsn, created, flags)


def zero_tail(data: bytes, offset: int) -> bool:
    """Whether every byte of ``data`` from ``offset`` on is zero (unwritten preallocated space).
    The first word is looked at first: where a frame starts it is never zero (its length is at
    least 4), so a whole segment is not counted through to answer no."""
    if any(data[offset : offset + 8]):
        return False
    return data.count(0, offset) == len(data) - offset


def encode_frame(salt_bytes: bytes, first_lsn: int, ops: list[bytes], commit_time: float) -> bytes:
    """One frame holding ``ops`` (encoded operations) with LSNs from ``first_lsn``."""
    # lengths and operations interleaved by one C-level join (no Python code per operation)
    heads = map(_OP_LEN.pack, map(len, ops))
    payload = b"".join(chain.from_iterable(zip(heads, ops, strict=True)))
    length = len(payload)
    head = _FRAME.pack(0, length, first_lsn, len(ops), FRAME_TYPE_OPS, 0, 0, commit_time)
    crc = crc32c(payload, crc32c(head[4:], crc32c(salt_bytes)))
    pad = padded(FRAME_HEADER_SIZE + length) - FRAME_HEADER_SIZE - length
    return b"".join((struct.pack("<I", crc), head[4:], payload, b"\0" * pad))


def frame_size(ops: list[bytes]) -> int:
    return padded(FRAME_HEADER_SIZE + 4 * len(ops) + sum(map(len, ops)))


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int
    first_lsn: int
    count: int
    commit_time: float
    size: int  # bytes on disk, padding included
    payload: memoryview

    @property
    def last_lsn(self) -> int:
        return self.first_lsn + self.count - 1

    def ops(self) -> list[bytes]:
        """The encoded operations, in LSN order."""
        out: list[bytes] = []
        view = self.payload
        pos = 0
        for _ in range(self.count):
            (n,) = _OP_LEN.unpack_from(view, pos)
            out.append(bytes(view[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return out


class FrameError(ValueError):
    """A frame that fails validation at ``offset``; ``reason`` is a short tag."""

    def __init__(self, offset: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.offset = offset
        self.reason = reason


def decode_frame(data: memoryview, offset: int, salt_bytes: bytes, max_frame_bytes: int) -> Frame:
    """Validate and decode the frame at ``offset`` or raise :class:`FrameError`."""
    remaining = len(data) - offset
    if remaining < FRAME_HEADER_SIZE:
        raise FrameError(
            offset, "truncated_header", f"{remaining} bytes left, a frame header needs 32"
        )
    crc, length, first_lsn, count, ftype, _flags, _rsv, commit_time = _FRAME.unpack_from(
        data, offset
    )
    if crc == 0 and length == 0 and count == 0:
        raise FrameError(offset, "zeroed", "zero-filled frame header (unwritten or zeroed space)")
    if length > max_frame_bytes or count == 0 or count * 4 > length:
        raise FrameError(offset, "bad_length", f"implausible length {length} / count {count}")
    end = offset + FRAME_HEADER_SIZE + length
    if end > len(data):
        raise FrameError(
            offset, "truncated_payload", f"payload of {length} bytes runs past end of file"
        )
    actual = crc32c(data[offset + 4 : end], crc32c(salt_bytes))
    if actual != crc:
        raise FrameError(offset, "crc_mismatch", f"checksum {actual:#010x} != stored {crc:#010x}")
    if ftype != FRAME_TYPE_OPS:
        raise FrameError(offset, "bad_type", f"unknown frame type {ftype}")
    payload = data[offset + FRAME_HEADER_SIZE : end]
    _check_payload(payload, count, offset)
    return Frame(offset, first_lsn, count, commit_time, padded(FRAME_HEADER_SIZE + length), payload)


def _check_payload(payload: memoryview, count: int, offset: int) -> None:
    pos = 0
    for _ in range(count):
        if pos + 4 > len(payload):
            raise FrameError(offset, "bad_payload", "operation table runs past the payload")
        (n,) = _OP_LEN.unpack_from(payload, pos)
        pos += 4 + n
    if pos != len(payload):
        raise FrameError(
            offset, "bad_payload", f"operations cover {pos} of {len(payload)} payload bytes"
        )


def find_valid_frame(
    data: bytes, start: int, salt_bytes: bytes, min_lsn: int, max_frame_bytes: int
) -> Frame | None:
    """The first valid frame at an 8-aligned offset > ``start`` with first_lsn >= ``min_lsn``.

    The WAL reader resumes here after a bad frame, which is also how a torn tail (nothing valid
    follows) is told from damage in the middle of the log. Candidate offsets are filtered with
    numpy on the LSN field before any checksum is computed, so a 64 MiB segment is searched in
    milliseconds.
    """
    first = padded(start + 1)
    if first + FRAME_HEADER_SIZE > len(data):
        return None
    n_words = (len(data) - first) // 8
    words = np.frombuffer(data, dtype="<u8", count=n_words, offset=first)
    # the LSN field is the second 8-byte word of a frame header
    lsns = words[1:]
    hits = np.nonzero((lsns >= min_lsn) & (lsns < min_lsn + (1 << 40)))[0]
    view = memoryview(data)
    for idx in hits.tolist():
        offset = first + 8 * idx
        try:
            frame = decode_frame(view, offset, salt_bytes, max_frame_bytes)
        except FrameError:
            continue
        return frame
    return None
