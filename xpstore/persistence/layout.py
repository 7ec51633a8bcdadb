"""The store directory: where each part lives, and the format-version marker.

::

    <store>/xpstore.json   marker: format name, format_version, store_id, created (written last)
    <store>/LOCK           writer lock (flock) holding the writer's pid
    <store>/data/          LMDB environment (data.mdb, lock.mdb)
    <store>/wal/           WAL segments <first_lsn:020d>.wal (+ *.broken copies from recovery)

The marker is written atomically after everything else exists, so a crash during creation leaves
a directory that is not (yet) a store rather than a half-made one.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from xpstore.errors import FormatVersionError, StoreNotFoundError
from xpstore.persistence import fs

FORMAT_NAME = "xpstore"
FORMAT_VERSION = 1
MARKER = "xpstore.json"
_OWN_ENTRIES = {MARKER, "LOCK", "data", "wal", MARKER + ".tmp"}


@dataclass(frozen=True, slots=True)
class Layout:
    root: Path

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def lock(self) -> Path:
        return self.root / "LOCK"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def wal(self) -> Path:
        return self.root / "wal"


@dataclass(frozen=True, slots=True)
class Marker:
    format_version: int
    store_id: int
    created: float


def read_marker(layout: Layout) -> Marker:
    """Read and check the marker; StoreNotFoundError / FormatVersionError with the path."""
    if not layout.marker.exists():
        raise StoreNotFoundError(
            f"{layout.root} is not an xpstore store (no {MARKER}); create one with "
            "Store.open(path, create=True) or `xpstore init PATH`"
        )
    try:
        data = json.loads(layout.marker.read_text())
        marker = Marker(int(data["format_version"]), int(data["store_id"]), float(data["created"]))
        name = data.get("format")
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatVersionError(f"{layout.marker}: unreadable store marker ({exc})") from exc
    if name != FORMAT_NAME:
        raise FormatVersionError(f"{layout.marker}: format is {name!r}, not {FORMAT_NAME!r}")
    if marker.format_version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{layout.root} was written by store format {marker.format_version}; this xpstore "
            f"reads format {FORMAT_VERSION} at most. Upgrade xpstore to open it."
        )
    return marker


def prepare_new(layout: Layout) -> None:
    """Check that ``layout.root`` may become a store and create its directories."""
    if layout.root.exists():
        if not layout.root.is_dir():
            raise StoreNotFoundError(f"{layout.root} exists and is not a directory")
        foreign = sorted(p.name for p in layout.root.iterdir() if p.name not in _OWN_ENTRIES)
        if foreign:
            raise StoreNotFoundError(
                f"refusing to create a store in non-empty directory {layout.root} "
                f"(found {', '.join(foreign[:5])})"
            )
    layout.root.parent.mkdir(parents=True, exist_ok=True)
    fs.mkdir(layout.root, exist_ok=True)
    fs.mkdir(layout.data, exist_ok=True)
    fs.mkdir(layout.wal, exist_ok=True)
    fs.fsync_dir(layout.root)
    if layout.root.parent.exists():
        fs.fsync_dir(layout.root.parent)


def write_marker(layout: Layout) -> Marker:
    marker = Marker(FORMAT_VERSION, secrets.randbits(63), time.time())
    payload = {
        "format": FORMAT_NAME,
        "format_version": marker.format_version,
        "store_id": marker.store_id,
        "created": marker.created,
    }
    fs.atomic_write(layout.marker, (json.dumps(payload, indent=2) + "\n").encode())
    return marker
