"""Plain reads of an LMDB data file's two meta pages, before anything maps it.

LMDB maps the whole file and trusts the newer meta page's last page number; a truncated file
kills the process with SIGBUS at the first touch past its end. :func:`check_data_file` refuses
such a file with an error naming it (every open of the store's tables calls it first), and
``verify`` reads the meta pages with :func:`read_meta_pages`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from xpstore.errors import LmdbCorruptionError

__all__ = ["DATA_FILE", "MetaPage", "check_data_file", "read_meta_pages"]

DATA_FILE = "data.mdb"

# LMDB's meta page (lmdb.h / mdb.c, 64-bit builds): a 16-byte page header (pgno u64, pad u16,
# flags u16, lower/upper u16 x2), then MDB_meta: magic u32, version u32, address ptr, mapsize
# size_t, two MDB_db of 48 bytes (the first one's md_pad holds the page size), last_pg u64,
# txnid u64. Pages 0 and 1 are the two meta pages, written alternately; the newer txnid wins.
_META_MAGIC = 0xBEEFC0DE
_META_VERSION = 1
_P_META = 0x08
_META_FLAGS = struct.Struct("=H")  # at 10
_META_HEAD = struct.Struct("=II")  # magic, version at 16
_META_PSIZE = struct.Struct("=I")  # at 40: mm_dbs[FREE_DBI].md_pad
_META_TAIL = struct.Struct("=QQ")  # last_pg, txnid at 136
_META_BYTES = 152
_FIRST_READ = 4096  # LMDB reads the first meta page from a buffer of at least this size


@dataclass(frozen=True, slots=True)
class MetaPage:
    """One of LMDB's two meta pages, as :func:`read_meta_pages` found it."""

    number: int
    page_size: int
    last_page: int
    txnid: int

    @property
    def needs_bytes(self) -> int:
        """The smallest file that holds every page this meta page refers to."""
        return (self.last_page + 1) * self.page_size


def read_meta_pages(data_file: Path) -> list[MetaPage]:
    """LMDB's two meta pages of ``data_file``, read with plain file reads (never mapped).

    Raises LmdbCorruptionError naming the file when either page is missing or is not an LMDB
    meta page of the version py-lmdb writes: LMDB itself refuses such a file too.
    """
    with open(data_file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(_FIRST_READ)
        metas = [_meta_page(data_file, 0, first, size)]
        f.seek(metas[0].page_size)
        metas.append(_meta_page(data_file, 1, f.read(_META_BYTES), size))
    return metas


def _meta_page(data_file: Path, number: int, raw: bytes, size: int) -> MetaPage:
    advice = _RESTORE_ADVICE
    if len(raw) < _META_BYTES:
        raise LmdbCorruptionError(
            f"LMDB data file {data_file} is damaged: {size:,} bytes is too short to hold its two "
            f"meta pages (truncated?); {advice}",
            path=data_file,
        )
    magic, version = _META_HEAD.unpack_from(raw, 16)
    (flags,) = _META_FLAGS.unpack_from(raw, 10)
    (psize,) = _META_PSIZE.unpack_from(raw, 40)
    if magic != _META_MAGIC or not flags & _P_META:
        raise LmdbCorruptionError(
            f"{data_file} is not an LMDB data file: meta page {number} has no LMDB magic "
            f"(found {magic:#010x}); {advice}",
            path=data_file,
        )
    if version != _META_VERSION or psize < 512 or psize > 65536 or psize & (psize - 1):
        raise LmdbCorruptionError(
            f"LMDB data file {data_file} is damaged: meta page {number} has version {version} "
            f"and page size {psize}; {advice}",
            path=data_file,
        )
    last, txnid = _META_TAIL.unpack_from(raw, 136)
    return MetaPage(number, psize, last, txnid)


_RESTORE_ADVICE = (
    "restore a snapshot (`xpstore snapshot restore PATH ID --into NEW`) or salvage it from a "
    "snapshot and the WAL (`xpstore recover PATH --mode salvage --into NEW`); docs/recovery.md"
)


def check_data_file(env_dir: Path) -> None:
    """Refuse an LMDB data file in ``env_dir`` that is shorter than its meta pages say.

    LMDB maps the whole file and trusts the meta page's last page number: touching a page past
    the end of a truncated file kills the process with SIGBUS, no error returned. So every open
    goes through this check first (plain reads of the two meta pages): the file must hold at
    least ``(last_pg + 1) * page_size`` bytes of the newer meta page. A missing or empty file is
    fine (a writer open creates it). Raises LmdbCorruptionError naming the file.
    """
    data_file = env_dir / DATA_FILE
    try:
        size = data_file.stat().st_size
    except FileNotFoundError:
        return
    if size == 0 or struct.calcsize("P") != 8:
        return  # empty: LMDB initializes it; the layout above is the 64-bit one
    newest = max(read_meta_pages(data_file), key=lambda m: m.txnid)
    if size < newest.needs_bytes:
        raise LmdbCorruptionError(
            f"LMDB data file {data_file} is damaged: it has {size:,} bytes but its meta page "
            f"(transaction {newest.txnid}) refers to pages up to {newest.last_page} of "
            f"{newest.page_size} bytes, {newest.needs_bytes:,} bytes in all: it was truncated. "
            f"It was not opened (mapping it would crash the process); {_RESTORE_ADVICE}",
            path=data_file,
        )
