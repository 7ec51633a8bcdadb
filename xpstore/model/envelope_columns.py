"""Envelopes straight into columns: a vectorized msgpack reader for the export (issue 16).

``msgpack.unpackb`` of an envelope builds a Python object per key and value (~2 µs a record on
the 2-core VM) and pyarrow then walks those objects again to infer and convert them; together
that was most of an export's time. This reader does neither: the envelopes of a chunk are joined
into one byte buffer, and all records advance through their tokens *in lockstep*, one map entry
per step, with numpy doing each step for every record at once. A key is identified by its
encoded bytes (≤ 32, looked up in a small hash table of the keys seen so far), a value's extent
comes from its type byte, and the values stay where they are until the end, when each column is
decoded in one gather (floats and integers read big-endian out of the buffer, strings as Arrow
offsets plus the gathered bytes).

The columns are the ones pyarrow infers from the decoded record maps (what the export did
before, and still does for anything this reader does not take): a key no record carries has no
column; nested maps flatten to ``parent.child`` columns, ordered by first appearance (record
order, then entry order) as pyarrow's struct inference orders them; integers are int64, floats
float64, an integer/float mix float64; arrays become list columns. What it does *not* take
returns ``None`` (the caller then decodes the slow way, which raises whatever error that input
deserves): a key over 31 bytes, binary or extension values, a column mixing strings with
numbers, containers inside arrays, integers outside int64 (or beyond 2**53 beside floats), an
envelope of another layout. UTF-8 of string values is left to the caller to check (Arrow's
``validate(full=True)``). Nothing here imports pyarrow: the result is numpy arrays.

Layout read (model/codec.py): ``[1, kind_code, ts, updated_lsn, retrieval_count, success_count,
record_map (, priority)]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from xpstore.model.codec import KIND_CODES
from xpstore.model.records import STREAMING_FIELDS, STREAMING_FIELDS_NO_HARMONIC

__all__ = ["Column", "EnvelopeColumns", "EnvelopeDecoder", "ListColumn"]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]
F64 = npt.NDArray[np.float64]
BOOL = npt.NDArray[np.bool_]

# value classes by type byte
_BAD, _NIL, _BOOL, _INT, _FLOAT, _STR, _MAP, _ARRAY = range(8)
_CLASS = np.zeros(256, np.int8)
_SIZE = np.zeros(256, np.int64)  # the whole token's bytes, for fixed-size tokens
_WIDTH = np.zeros(256, np.int64)  # payload bytes of a multi-byte number
_CLASS[0x00:0x80], _SIZE[0x00:0x80] = _INT, 1
_CLASS[0xE0:0x100], _SIZE[0xE0:0x100] = _INT, 1
_CLASS[0x80:0x90] = _MAP
_CLASS[0x90:0xA0] = _ARRAY
_CLASS[0xA0:0xC0], _SIZE[0xA0:0xC0] = _STR, 1 + np.arange(32)  # fixstr: header + bytes
_CLASS[0xC0], _SIZE[0xC0] = _NIL, 1
_CLASS[0xC2:0xC4], _SIZE[0xC2:0xC4] = _BOOL, 1
for _t, _w in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8), (0xD0, 1), (0xD1, 2), (0xD2, 4),
               (0xD3, 8)):  # fmt: skip
    _CLASS[_t], _SIZE[_t], _WIDTH[_t] = _INT, 1 + _w, _w
_CLASS[0xCA], _SIZE[0xCA] = _FLOAT, 5
_CLASS[0xCB], _SIZE[0xCB] = _FLOAT, 9
_CLASS[0xD9:0xDC] = _STR
_CLASS[0xDC:0xDE] = _ARRAY
_CLASS[0xDE:0xE0] = _MAP

_KEY_MAX: Final = 32  # a key token (header + bytes) longer than this is not taken
_KEY_MASKS: Final = np.where(np.arange(_KEY_MAX)[None, :] < np.arange(_KEY_MAX + 1)[:, None],
                             0xFF, 0).astype(np.uint8)  # row k keeps a token's first k bytes
_MASK64: Final = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)  # low k bytes
_MASK_W0: Final = _MASK64[np.minimum(np.arange(_KEY_MAX + 1), 8)]  # token length -> its bytes
_MASK_W1: Final = _MASK64[np.clip(np.arange(_KEY_MAX + 1) - 8, 0, 8)]  # in words 0 and 1
_PAD: Final = 40  # zero bytes after the last envelope, so every window read stays inside
_HASH_MULTIPLIERS: Final = (  # odd 64-bit constants (golden ratio, xxhash's primes)
    np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
    np.uint64(0x165667B19E3779F9), np.uint64(0xD6E8FEB86659FD93),
)  # fmt: skip
_INT53: Final = 2**53
_FINGERPRINT: Final = KIND_CODES["fingerprint"]
_STREAMING_COUNTS: Final = (len(STREAMING_FIELDS), len(STREAMING_FIELDS_NO_HARMONIC))
_FIXSTR_TOKEN: Final = np.zeros(256, np.intp)
_FIXSTR_TOKEN[0xA0:0xC0] = 1 + np.arange(32)


class _Unsupported(Exception):
    """Input outside what this reader takes; never leaves the module (the caller gets None)."""


@dataclass(frozen=True)
class Column:
    """One flat column: ``kind`` is null, bool, int, float or str. ``values`` holds bool,
    int64 or float64 values (zero where not ``valid``); a str column has ``offsets`` (int64,
    n + 1) into ``data`` (its UTF-8 bytes, not yet checked) instead."""

    kind: str
    valid: BOOL
    values: npt.NDArray[np.generic] | None = None
    offsets: I64 | None = None
    data: U8 | None = None


@dataclass(frozen=True)
class ListColumn:
    """A list column: row i holds ``items[offsets[i]:offsets[i + 1]]``; null where not valid."""

    valid: BOOL
    offsets: I64
    items: Column


@dataclass(frozen=True)
class EnvelopeColumns:
    """A chunk of envelopes as columns: the envelope's fields, then the record's flattened
    fields (dotted names, pyarrow's inference order; the record map's top-level ``ts`` is left
    out: the envelope's ``ts`` is the same)."""

    ts: F64
    lsn: I64
    retrieval_count: I64
    success_count: I64
    priority: F64
    has_priority: BOOL
    fields: list[tuple[str, Column | ListColumn]]


_ABSENT: Final = 0xC1  # msgpack's one unused type byte: "this row has no such key"


@dataclass
class _Node:
    """What one path of the record maps collected. A map: per key id and row, where its value
    is and its type byte (dense tables over the chunk's rows, scattered into step by step and
    read per key at the end). A list: its calls' elements."""

    n_rows: int
    pos: I64 = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    typ: U8 = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    children: dict[tuple[int, int], _Node] = field(default_factory=dict)  # (key id, class)
    positional: bool = False  # a codec array read as a map (a fingerprint's streaming)
    # list nodes: per call (rows, counts, element positions in row-major order, their types)
    lists: list[tuple[I64, I64, I64, U8]] = field(default_factory=list)

    def record(self, kid: I64, rows: I64, vp: I64, t: U8, keys: int) -> None:
        """One entry of the maps at ``rows``: keys ``kid`` (< ``keys``), values at ``vp`` of
        types ``t``."""
        have = len(self.typ)
        if keys > have:
            grow = max(keys, 2 * have, 8) - have
            n = self.n_rows
            self.pos = np.vstack([self.pos.reshape(have, n), np.zeros((grow, n), np.int64)])
            self.typ = np.vstack([self.typ.reshape(have, n),
                                  np.full((grow, n), _ABSENT, np.uint8)])  # fmt: skip
        flat = kid * self.n_rows
        flat += rows
        self.pos.reshape(-1)[flat] = vp
        self.typ.reshape(-1)[flat] = t


class _Reader:
    def __init__(self, raws: list[bytes], keys: _KeyTable) -> None:
        lengths = np.fromiter(map(len, raws), np.int64, len(raws))
        size = int(lengths.sum())
        joined = b"".join(raws) + bytes(_PAD + (-size) % 8)
        self.buf: U8 = np.frombuffer(joined, np.uint8)
        self.words = np.frombuffer(joined, "<u8")  # the same bytes as aligned 8-byte words
        self.lengths = lengths
        self.starts: I64 = np.zeros(len(raws), np.int64)
        np.cumsum(lengths[:-1], out=self.starts[1:])
        self.ends: I64 = self.starts + lengths  # no read may pass its record's end
        self.win_key = sliding_window_view(self.buf, _KEY_MAX)  # rare long keys only
        self.keys = keys
        self.top: _Node | None = None
        self.streaming_kid = -1  # set for fingerprints: their "streaming" is positional

    # ----------------------------------------------------------------- scalars
    def le64(self, pos: I64) -> npt.NDArray[np.uint64]:
        """The 8 bytes at each of ``pos`` as a little-endian uint64: two aligned word reads
        and shifts (a fancy index of 8-byte windows costs five times as much)."""
        shift = ((pos & 7) << 3).astype(np.uint64)
        word = pos >> 3
        lo: npt.NDArray[np.uint64] = self.words[word]
        hi: npt.NDArray[np.uint64] = self.words[word + 1]
        lo >>= shift
        hi <<= np.uint64(1)  # two shifts: a shift by 64 (when aligned) must give 0
        hi <<= np.uint64(63) - shift
        lo |= hi
        return lo

    def be64(self, pos: I64) -> npt.NDArray[np.uint64]:
        """The 8 bytes at ``pos`` as big-endian uint64 (a shorter number is in the top bytes)."""
        return self.le64(pos).byteswap()

    def ints(self, pos: I64, t: U8) -> I64:
        """Integer tokens at ``pos`` (type bytes ``t``, all of class int) as int64."""
        out = t.astype(np.int64)
        out[t >= 0xE0] -= 256
        wide = np.flatnonzero(_WIDTH[t] > 0)
        if wide.size:
            tw = t[wide]
            shift = (64 - 8 * _WIDTH[tw]).astype(np.uint64)
            word = self.be64(pos[wide] + 1)
            unsigned = tw <= 0xCF
            value = np.where(unsigned, word >> shift, (word.view(np.int64) >> shift.view(
                np.int64)).view(np.uint64))  # fmt: skip
            if (unsigned & (value > np.uint64(2**63 - 1))).any():
                raise _Unsupported("an integer beyond int64")
            out[wide] = value.view(np.int64)
        return out

    def floats(self, pos: I64, t: U8) -> F64:
        out = np.empty(len(pos), np.float64)
        double = t == 0xCB
        if double.all():
            out[:] = self.be64(pos + 1).view(np.float64)
            return out
        out[double] = self.be64(pos[double] + 1).view(np.float64)
        single = ~double
        out[single] = (self.be64(pos[single] + 1) >> np.uint64(32)).astype(np.uint32).view(
            np.float32)  # fmt: skip
        return out

    def numbers(self, pos: I64) -> tuple[F64, I64, npt.NDArray[np.int8]]:
        """Number tokens at ``pos`` as float64 (an int converted), their sizes and classes."""
        t = self.buf[pos]
        cls = _CLASS[t]
        if not np.isin(cls, (_INT, _FLOAT)).all():
            raise _Unsupported("an envelope number of another type")
        out = np.empty(len(pos), np.float64)
        f = cls == _FLOAT
        out[f] = self.floats(pos[f], t[f])
        i = ~f
        if i.any():
            out[i] = self.ints(pos[i], t[i])
        return out, _SIZE[t], cls

    def lengths_of(self, pos: I64, t: U8, cls: npt.NDArray[np.int8]) -> tuple[I64, I64]:
        """(header bytes, element count or byte length) of str/map/array tokens."""
        n = np.zeros(len(pos), np.int64)
        h = np.ones(len(pos), np.int64)
        fix = (t >= 0x80) & (t <= 0xBF)
        n[fix] = t[fix] & np.where(cls[fix] == _STR, 0x1F, 0x0F)
        long = ~fix
        if long.any():
            tl = t[long]
            one = tl == 0xD9
            two = (tl == 0xDA) | (tl == 0xDC) | (tl == 0xDE)
            width = np.where(one, 1, np.where(two, 2, 4))
            word = self.be64(pos[long] + 1)
            n[long] = (word >> (64 - 8 * width).astype(np.uint64)).astype(np.int64)
            h[long] = 1 + width
        return h, n

    # ----------------------------------------------------------------- structure
    def extents(self, node: _Node, kid: I64, rows: I64, vp: I64) -> tuple[I64, U8]:
        """End positions of the values at ``vp`` (their keys ``kid``), parsing containers."""
        t = self.buf[vp]
        size = _SIZE[t]
        end = vp + size
        var = np.flatnonzero(size == 0)  # longer strings, containers (and what is refused)
        if var.size:
            cls = _CLASS[t]
            vcls = cls[var]
            if (vcls == _BAD).any():
                raise _Unsupported("a binary or extension value")
            h, n = self.lengths_of(vp[var], t[var], vcls)
            s = vcls == _STR
            end[var[s]] = vp[var[s]] + h[s] + n[s]
            nested = var[~s]
            if nested.size:
                ncls = vcls[~s]
                nkid = kid[nested]
                tag = nkid * 8 + ncls
                for both in np.flatnonzero(np.bincount(tag)).tolist():
                    k, c = divmod(int(both), 8)
                    sel = nested[tag == both]
                    child = node.children.get((k, c))
                    if child is None:
                        child = node.children[(k, c)] = _Node(node.n_rows)
                    hs, ns = self.lengths_of(vp[sel], t[sel], cls[sel])
                    start = vp[sel] + hs
                    if c == _MAP:
                        end[sel] = self.map(child, rows[sel], start, ns)
                    elif k == self.streaming_kid and node is self.top:
                        child.positional = True
                        end[sel] = self.streaming(child, rows[sel], start, ns)
                    else:
                        end[sel] = self.array(child, rows[sel], start, ns)
        if (end > self.ends[rows]).any():
            raise _Unsupported("a value that runs past its record")
        return end, t

    def map(self, node: _Node, rows: I64, p: I64, n: I64) -> I64:
        """Parse maps (``n`` entries from ``p``) in lockstep; their end positions."""
        if (p + 2 * n > self.ends[rows]).any():  # an entry takes two bytes at least
            raise _Unsupported("a map longer than its record")
        p = p.copy()
        steps = int(n.max()) if len(n) else 0
        for j in range(steps):
            live = n > j
            act = None if live.all() else np.flatnonzero(live)
            kp = p if act is None else p[act]
            r = rows if act is None else rows[act]
            kid, vp = self.keys.read(self, kp)
            end, t = self.extents(node, kid, r, vp)
            node.record(kid, r, vp, t, len(self.keys.names))
            if act is None:
                p = end
            else:
                p[act] = end
        return p

    def streaming(self, node: _Node, rows: I64, start: I64, n: I64) -> I64:
        """A fingerprint's ``[values, confidence, chunk_count]`` (codec: the 13 or 10 floats
        in ``STREAMING_FIELDS`` order) read as the map ``{values: {name: v}, confidence:
        {name: c}, chunk_count: n}`` that the export flattens."""
        if (n != 3).any():
            raise _Unsupported("streaming: not [values, confidence, chunk_count]")
        p = start
        names = [self.keys.id_of(name) for name in STREAMING_FIELDS]
        for part in ("values", "confidence"):
            t = self.buf[p]
            cls = _CLASS[t]
            h, count = self.lengths_of(p, t, cls)
            if (cls != _ARRAY).any() or not np.isin(count, _STREAMING_COUNTS).all():
                raise _Unsupported("streaming: values of another shape")
            if (p + h + 9 * count > self.ends[rows]).any():
                raise _Unsupported("streaming: values that run past their record")
            kid = self.keys.id_of(part)
            node.record(np.full(len(p), kid), rows, p, np.full(len(p), 0x80, np.uint8),
                        len(self.keys.names))  # fmt: skip
            child = node.children.get((kid, _MAP))
            if child is None:
                child = node.children[(kid, _MAP)] = _Node(node.n_rows)
            for e, name in enumerate(names):  # the 10 names are the first 10 of the 13
                live = np.flatnonzero(count > e)
                vp = p[live] + h[live] + 9 * e
                vt = self.buf[vp]
                if (vt != 0xCB).any():
                    raise _Unsupported("streaming: a value that is not a float64")
                child.record(np.full(len(live), name), rows[live], vp, vt, len(self.keys.names))
            p = p + h + 9 * count
        t = self.buf[p]
        if (_CLASS[t] != _INT).any():
            raise _Unsupported("streaming: a chunk count that is not an integer")
        count_kid = self.keys.id_of("chunk_count")
        node.record(np.full(len(p), count_kid), rows, p, t, len(self.keys.names))
        return p + _SIZE[t]

    def array(self, node: _Node, rows: I64, start: I64, n: I64) -> I64:
        """Parse arrays of scalars (``n`` elements from ``start``); their end positions."""
        if (start + n > self.ends[rows]).any():  # an element takes a byte at least
            raise _Unsupported("an array longer than its record")
        total = int(n.sum())
        first = np.zeros(len(n), np.int64)
        np.cumsum(n[:-1], out=first[1:])
        owner = np.repeat(np.arange(len(n)), n)
        # the codec's common case: every element a float64 (9 bytes), read in one go
        pos = start[owner] + 9 * (np.arange(total) - first[owner])
        fits = not (start + 9 * n > self.ends[rows]).any()
        if total and fits and (self.buf[pos] == 0xCB).all():
            node.lists.append((rows, n, pos, self.buf[pos]))
            return start + 9 * n
        pos = np.empty(total, np.int64)
        p = start.copy()
        for j in range(int(n.max()) if len(n) else 0):
            act = np.flatnonzero(n > j)
            vp = p[act]
            t = self.buf[vp]
            cls = _CLASS[t]
            if ((cls == _BAD) | (cls >= _MAP)).any():
                raise _Unsupported("a container or binary value inside an array")
            end = vp + _SIZE[t]
            s = np.flatnonzero(cls == _STR)
            if s.size:
                h, ln = self.lengths_of(vp[s], t[s], cls[s])
                end[s] = vp[s] + h + ln
            if (end > self.ends[rows[act]]).any():
                raise _Unsupported("an array element that runs past its record")
            pos[first[act] + j] = vp
            p[act] = end
        node.lists.append((rows, n, pos, self.buf[pos]))
        return p

    # ----------------------------------------------------------------- columns
    def columns(self, node: _Node, n_rows: int, prefix: str,
                out: list[tuple[str, Column | ListColumn]]) -> None:  # fmt: skip
        """``node``'s flattened columns, first-seen order, appended to ``out``."""
        if not node.typ.size:
            return
        present = node.typ != _ABSENT
        keys = np.flatnonzero(present.any(axis=1))
        # first seen: the lowest byte position, as values lie in record order, then entry order
        first = np.where(present[keys], node.pos[keys], np.iinfo(np.int64).max).min(axis=1)
        for k in keys[np.argsort(first, kind="stable")].tolist():
            name = self.keys.names[k]
            # the record's top-level ts is the envelope's: built (so that what pyarrow would
            # refuse is refused here too) but not kept
            into = [] if not prefix and name == "ts" else out
            rows = np.flatnonzero(present[k])
            gt = node.typ[k, rows]
            gcls = _CLASS[gt]
            kinds = _classes(gcls) - {_NIL}
            path = prefix + name
            if kinds == {_MAP}:
                self.columns(node.children[(k, _MAP)], n_rows, path + ".", into)
            elif kinds == {_ARRAY} and node.children[(k, _ARRAY)].positional:
                self.columns(node.children[(k, _ARRAY)], n_rows, path + ".", into)
            elif kinds == {_ARRAY}:
                into.append((path, self.list_column(node.children[(k, _ARRAY)], n_rows)))
            elif _MAP in kinds or _ARRAY in kinds:
                raise _Unsupported(f"{path}: containers mixed with scalars")
            else:
                keep = gcls != _NIL
                if not keep.all():
                    rows, gt = rows[keep], gt[keep]
                into.append((path, self.leaf(rows, node.pos[k, rows], gt, n_rows)))

    def leaf(self, rows: I64, vp: I64, t: U8, n_rows: int) -> Column:
        """The scalars at ``vp`` placed at ``rows`` of an ``n_rows`` column."""
        cls = _CLASS[t]
        kinds = _classes(cls)
        valid = np.zeros(n_rows, np.bool_)
        valid[rows] = True
        if not kinds:
            return Column("null", valid)
        if kinds == {_STR}:
            h, n = self.lengths_of(vp, t, cls)
            lengths = np.zeros(n_rows, np.int64)
            lengths[rows] = n
            src = np.zeros(n_rows, np.int64)
            src[rows] = vp + h
            offsets = np.zeros(n_rows + 1, np.int64)
            np.cumsum(lengths, out=offsets[1:])
            total = int(offsets[-1])
            gather = np.repeat(src - offsets[:-1], lengths) + np.arange(total)
            return Column("str", valid, offsets=offsets, data=self.buf[gather])
        if kinds == {_BOOL}:
            values: npt.NDArray[np.generic] = np.zeros(n_rows, np.bool_)
            values[rows] = t == 0xC3
            return Column("bool", valid, values)
        if kinds == {_INT}:
            values = np.zeros(n_rows, np.int64)
            values[rows] = self.ints(vp, t)
            return Column("int", valid, values)
        if kinds <= {_INT, _FLOAT}:
            f = cls == _FLOAT
            got = np.empty(len(vp), np.float64)
            got[f] = self.floats(vp[f], t[f])
            if not f.all():
                whole = self.ints(vp[~f], t[~f])
                if ((whole > _INT53) | (whole < -_INT53)).any():
                    raise _Unsupported("an integer beside floats beyond 2**53")
                got[~f] = whole
            values = np.zeros(n_rows, np.float64)
            values[rows] = got
            return Column("float", valid, values)
        raise _Unsupported("a column of mixed types")

    def list_column(self, node: _Node, n_rows: int) -> ListColumn:
        rows = np.concatenate([c[0] for c in node.lists])
        counts = np.concatenate([c[1] for c in node.lists])
        pos = np.concatenate([c[2] for c in node.lists])
        t = np.concatenate([c[3] for c in node.lists])
        first = np.zeros(len(counts), np.int64)
        np.cumsum(counts[:-1], out=first[1:])
        valid = np.zeros(n_rows, np.bool_)
        valid[rows] = True
        lengths = np.zeros(n_rows, np.int64)
        lengths[rows] = counts
        src = np.zeros(n_rows, np.int64)
        src[rows] = first
        offsets = np.zeros(n_rows + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        total = int(offsets[-1])
        order = np.repeat(src - offsets[:-1], lengths) + np.arange(total)
        et = t[order]
        keep = _CLASS[et] != _NIL
        idx = np.arange(total)
        items = self.leaf(idx[keep], pos[order][keep], et[keep], total)
        return ListColumn(valid, offsets, items)


def _classes(cls: npt.NDArray[np.int8]) -> set[int]:
    """The value classes present (a count, not a sort)."""
    return set(np.flatnonzero(np.bincount(cls, minlength=8)).tolist())


class _KeyTable:
    """Map keys -> small ids through an open hash table on the first 16 bytes of the key's
    token (its header, which holds the length, and its UTF-8 bytes), rebuilt collision-free
    when a new key arrives (a kind has a few dozen keys); a key over 15 bytes is also checked
    in full (up to 32 bytes of token)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.ids: dict[bytes, int] = {}  # token -> id
        # per key id, then one sentinel that matches nothing (an all-zero token): empty slots
        self.w0 = np.zeros(1, np.uint64)
        self.w1 = np.zeros(1, np.uint64)
        self.full = np.zeros((1, _KEY_MAX), np.uint8)
        self.bits = 10
        self.seed = 0
        self.slots = np.zeros(1 << self.bits, np.int64)

    def _hash(self, w0: npt.NDArray[np.uint64], w1: npt.NDArray[np.uint64]) -> I64:
        h = (w1 * _HASH_MULTIPLIERS[1]) ^ w0
        h *= _HASH_MULTIPLIERS[0] + np.uint64(2 * self.seed)
        h >>= np.uint64(64 - self.bits)
        return h.astype(np.intp)

    def id_of(self, name: str) -> int:
        """The id of key ``name`` (a short one: ≤ 31 bytes), learnt if new."""
        body = name.encode()
        token = bytes([0xA0 | len(body)]) + body
        if token not in self.ids:
            self._add(token)
        return self.ids[token]

    def _add(self, token: bytes) -> None:
        fix = (token[0] & 0xE0) == 0xA0
        try:
            self.names.append((token[1:] if fix else token[2:]).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _Unsupported("a key that is not UTF-8") from exc
        padded = np.frombuffer(token.ljust(_KEY_MAX, b"\0"), np.uint8)
        words = padded[:16].view("<u8")
        k = len(self.names) - 1  # the sentinel moves up one
        self.ids[token] = k
        self.w0 = np.insert(self.w0, k, words[0])
        self.w1 = np.insert(self.w1, k, words[1])
        self.full = np.insert(self.full, k, padded, axis=0)
        keys = len(self.names)
        pairs = zip(self.w0[:keys].tolist(), self.w1[:keys].tolist(), strict=True)
        if len(set(pairs)) < keys:
            raise _Unsupported("two long keys alike in their first 16 bytes")
        while True:
            slots = self._hash(self.w0[:keys], self.w1[:keys])
            if len(np.unique(slots)) == keys:
                break
            self.seed += 1
            if self.seed % 8 == 0:
                self.bits += 1
        self.slots = np.full(1 << self.bits, keys, np.intp)
        self.slots[slots] = np.arange(keys)

    def read(self, reader: _Reader, kp: I64) -> tuple[I64, I64]:
        """Key ids of the key tokens at ``kp`` and the positions of their values."""
        buf = reader.buf
        kt = buf[kp]
        tok = _FIXSTR_TOKEN[kt]  # header + bytes of a fixstr key, 0 for any other type
        if len(tok) and tok.min() == 0:
            fix = tok > 0
            if not (fix | (kt == 0xD9)).all():
                raise _Unsupported("a map key that is not a short string")
            tok = np.where(fix, tok, buf[kp + 1].astype(np.intp) + 2)
        longest = int(tok.max()) if len(tok) else 0
        if longest > _KEY_MAX:
            raise _Unsupported("a map key over 31 bytes")
        w0 = reader.le64(kp)
        w0 &= _MASK_W0[tok]
        w1 = reader.le64(kp + 8)
        w1 &= _MASK_W1[tok]
        while True:
            kid = self.slots[self._hash(w0, w1)]
            ok = (self.w0[kid] == w0) & (self.w1[kid] == w1)
            if longest > 16:
                long = np.flatnonzero(ok & (tok > 16))
                whole = reader.win_key[kp[long]] & _KEY_MASKS[tok[long]]
                ok[long] = (self.full[kid[long]] == whole).all(axis=1)
            if ok.all():
                return kid, kp + tok
            i = int(np.argmin(ok))  # a new key (a chunk brings a handful): learn it, look again
            self._add(bytes(buf[kp[i] : kp[i] + tok[i]]))


class EnvelopeDecoder:
    """Decodes chunks of one kind's envelopes; the keys it learnt stay for the next chunk."""

    def __init__(self, code: int) -> None:
        self.code = code
        self._keys = _KeyTable()

    def decode(self, raws: list[bytes]) -> EnvelopeColumns | None:
        """The envelopes ``raws`` (all of this decoder's kind) as columns, or None where they
        hold something this reader does not take (the caller decodes those the slow way)."""
        if not raws:
            return None
        try:
            return _decode(_Reader(raws, self._keys), self.code)
        except (_Unsupported, IndexError):  # IndexError: damaged bytes read past the buffer
            return None


def _decode(r: _Reader, code: int) -> EnvelopeColumns:
    raws_n = len(r.lengths)
    buf, s = r.buf, r.starts
    head = buf[s]
    if not (((head == 0x97) | (head == 0x98)) & (buf[s + 1] == 1) & (buf[s + 2] == code)).all():
        raise _Unsupported("an envelope of another layout")
    p = s + 3
    ts, size, _ = r.numbers(p)
    p = p + size
    counters = []
    for _ in range(3):
        value, size, cls = r.numbers(p)
        if (cls != _INT).any():
            raise _Unsupported("a counter that is not an integer")
        counters.append(r.ints(p, buf[p]))
        p = p + size
    t = buf[p]
    cls = _CLASS[t]
    if (cls != _MAP).any():
        raise _Unsupported("a record that is not a map")
    h, n = r.lengths_of(p, t, cls)
    n_rows = raws_n
    top = r.top = _Node(n_rows)
    if code == _FINGERPRINT:
        r.streaming_kid = r.keys.id_of("streaming")
    end = r.map(top, np.arange(n_rows), p + h, n)
    has_priority = head == 0x98
    priority = np.zeros(n_rows, np.float64)
    if has_priority.any():
        at = end[has_priority]
        value, size, _ = r.numbers(at)
        priority[has_priority] = value
        end[has_priority] = at + size
    if not (end == s + r.lengths).all():
        raise _Unsupported("an envelope with bytes after its last item")
    fields: list[tuple[str, Column | ListColumn]] = []
    r.columns(top, n_rows, "", fields)
    return EnvelopeColumns(ts, counters[0], counters[1], counters[2], priority, has_priority,
                           fields)  # fmt: skip
