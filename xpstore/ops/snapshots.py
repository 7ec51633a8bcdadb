"""Snapshots on disk: take, list, verify, restore and prune (layout in ``docs/snapshots.md``).

::

    <snapshot_dir>/<id>/data.mdb         compacted LMDB copy (env.copy(compact=True))
    <snapshot_dir>/<id>/manifest.json    written last: LSN, counts, config, sha256 + size per file
    <snapshot_dir>/.tmp-<store>-<id>/    a snapshot being written (never listed; removed later)
    <snapshot_dir>/.del-<store>-<id>/    a snapshot being pruned (renamed away first)

A snapshot directory is built under a temporary name, every file and the directory fsynced, and
renamed into place only when complete, so a crash leaves either no snapshot or a whole one. The
LMDB copy and its LSN come from one read transaction, so the LSN is exact. Restore verifies every
checksum before it copies anything, builds the new store in a temporary sibling of the target and
renames it into place last. The point-in-time roll-forward (:func:`restore_at`) replays the
source store's retained WAL into the copy with the recovery's own
:class:`~xpstore.persistence.replayer.Replayer`; it needs the WAL and the store id, never the
source store's LMDB, so :func:`restore_from_files` restores a store whose data file is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xpstore.config import StoreConfig, make_config
from xpstore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    InvalidRecordError,
    SnapshotError,
)
from xpstore.model.progress import ProgressFn
from xpstore.persistence import fs
from xpstore.persistence import layout as layout_mod
from xpstore.persistence.crashpoints import crash_point
from xpstore.persistence.lmdb_tables import LmdbTables
from xpstore.persistence.lock import WriterLock
from xpstore.persistence.replayer import Replayer
from xpstore.persistence.wal_format import Frame
from xpstore.persistence.wal_reader import BadFrame, Damage, MissingLsns, WalReader

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "xpstore-snapshot"
SNAPSHOT_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_FILE = "data.mdb"
RESTORE_PLACES = {DATA_FILE: Path("data") / DATA_FILE}
"""Where each snapshot file goes in a restored store (the manifest may list no other file)."""

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_RESTORE_TMP = ".xpstore-restore-"

ReplayFn = Callable[[Path], None]
"""Called with the temporary restore directory after the files are in place (PITR replay)."""


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One complete snapshot: its id, the exact LSN its LMDB copy holds, and where it lies."""

    id: str
    lsn: int
    created: float
    path: Path
    counts: dict[str, int]
    store_id: int = 0
    size_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``snapshot list --json``)."""
        return {
            "id": self.id,
            "lsn": self.lsn,
            "created": self.created,
            "path": str(self.path),
            "counts": dict(self.counts),
            "store_id": self.store_id,
            "size_bytes": self.size_bytes,
        }


@dataclass(frozen=True, slots=True)
class FileEntry:
    name: str
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A parsed manifest (not yet checksum-verified) and the info it describes."""

    info: SnapshotInfo
    files: tuple[FileEntry, ...]
    manifest: dict[str, Any]


@dataclass(slots=True)
class Listing:
    """What a pass over the snapshot directory found."""

    snapshots: list[SnapshotInfo] = field(default_factory=list)
    foreign: list[SnapshotInfo] = field(default_factory=list)  # other store ids
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (directory name, reason)


# ------------------------------------------------------------------------------- helpers


def snapshot_root(store_root: Path, configured: str | None) -> Path:
    """``config.snapshot_dir`` (relative: to the store), else ``<store>/snapshots``."""
    if configured is None:
        return store_root / "snapshots"
    path = Path(configured).expanduser()
    return path if path.is_absolute() else store_root / path


def check_id(snapshot_id: str) -> str:
    """A snapshot id is a plain directory name (never a path, never hidden)."""
    if not isinstance(snapshot_id, str) or not _ID_RE.match(snapshot_id):
        raise InvalidRecordError(
            f"{snapshot_id!r} is not a snapshot id (letters, digits, '.', '_', '-'; "
            "`xpstore snapshot list` shows the ids)",
            field="snapshot_id",
        )
    return snapshot_id


def _mkdirs(path: Path) -> None:
    """Create ``path`` and missing parents through fs, syncing each parent that gained one."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):
        fs.mkdir(new, exist_ok=True)
        fs.fsync_dir(new.parent)


def _read_chunks(path: Path) -> Iterator[bytes]:
    """Stream a file through an fs-opened descriptor (snapshot files can be gigabytes)."""
    fd = fs.open_file(path, os.O_RDONLY)
    try:
        while True:
            chunk = os.read(fd, _CHUNK)
            if not chunk:
                return
            yield chunk
    finally:
        fs.close(fd)


def _sha256(path: Path, progress: ProgressFn | None = None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    total = path.stat().st_size if progress is not None else 0
    for chunk in _read_chunks(path):
        digest.update(chunk)
        size += len(chunk)
        if progress is not None:
            progress(f"hashing {path.name}", size, total, "bytes")
    return digest.hexdigest(), size


def _sync_file(path: Path) -> None:
    """fdatasync a file written by someone else (LMDB's copy runs in C, outside fs)."""
    fd = fs.open_file(path, os.O_RDONLY)
    try:
        fs.fdatasync(fd)
    finally:
        fs.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        if path.exists():
            fs.rmtree(path)
    except OSError as exc:  # cleanup after a failure must not hide the failure
        log.warning("could not remove %s: %s", path, exc)


def _new_id(created: float, lsn: int, root: Path) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(created))
    micros = round((created % 1) * 1_000_000) % 1_000_000
    base = f"{stamp}.{micros:06d}Z-{lsn}"
    candidate, n = base, 1
    while (root / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _temp_prefix(store_id: int) -> str:
    return f".tmp-{store_id:016x}-"


def _delete_prefix(store_id: int) -> str:
    return f".del-{store_id:016x}-"


def remove_temps(root: Path, store_id: int) -> list[str]:
    """Remove this store's half-written (or half-pruned) snapshot directories; return names.

    Only one writer per store can snapshot, so any such directory of ``store_id`` is left over
    from a crash. Other stores' temporaries (a shared ``snapshot_dir``) are left alone.
    """
    if not root.is_dir():
        return []
    removed = []
    prefixes = (_temp_prefix(store_id), _delete_prefix(store_id))
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(prefixes):
            fs.rmtree(entry)
            removed.append(entry.name)
    if removed:
        fs.fsync_dir(root)
        log.info("removed %d leftover temporary snapshot directories in %s", len(removed), root)
    return removed


# ------------------------------------------------------------------------------- create


def create_snapshot(
    tables: LmdbTables,
    root: Path,
    *,
    store_id: int,
    embedding_dim: int | None,
    config: Mapping[str, Any],
    kind_names: Mapping[int, str],
    progress: ProgressFn | None = None,
) -> SnapshotInfo:
    """Copy LMDB compactly into a new snapshot directory under ``root``; return its info.

    The copy is made inside one read transaction, and the LSN and counts of the manifest are read
    in that same transaction, so the snapshot holds exactly the operations up to its LSN.
    """
    _mkdirs(root)
    created = time.time()
    tmp = root / f"{_temp_prefix(store_id)}{secrets.token_hex(4)}"
    fs.mkdir(tmp)
    try:
        lsn, counts = _copy_lmdb(tables, tmp, kind_names, progress)
        data = tmp / DATA_FILE
        _sync_file(data)
        fs.fsync_dir(tmp)
        crash_point("snapshot.after_copy")
        snap_id = _new_id(created, lsn, root)
        sha, size = _sha256(data, progress)
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "store_format_version": layout_mod.FORMAT_VERSION,
            "id": snap_id,
            "store_id": store_id,
            "lsn": lsn,
            "created": created,
            "counts": counts,
            "embedding_dim": embedding_dim,
            "config": dict(config),
            "files": {DATA_FILE: {"sha256": sha, "size": size}},
        }
        fs.write_file(tmp / MANIFEST, _manifest_bytes(manifest))
        fs.fsync_dir(tmp)
        crash_point("snapshot.before_rename")
        final = root / snap_id
        fs.replace(tmp, final)
        fs.fsync_dir(root)
    except OSError as exc:
        _remove_quietly(tmp)
        raise OSError(
            exc.errno, f"snapshot not taken: {exc.strerror or exc} ({exc.filename or tmp})"
        ) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    info = SnapshotInfo(snap_id, lsn, created, final, counts, store_id, size)
    log.info("snapshot %s taken at LSN %d (%d bytes)", snap_id, lsn, size)
    return info


def _manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest with its self-checksum: an edited manifest is caught like a damaged file."""
    signed = {**manifest, "checksum": _manifest_digest(manifest)}
    return (json.dumps(signed, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def _copy_lmdb(
    tables: LmdbTables, dest: Path, kind_names: Mapping[int, str],
    progress: ProgressFn | None = None,
) -> tuple[int, dict[str, int]]:
    """env.copy(compact=True) and the applied LSN and counts, from one read transaction.

    Holding :meth:`LmdbTables.reading` also keeps a concurrent map resize out during the copy.
    """
    with tables.reading() as txn:
        lsn = tables.applied_lsn(txn)
        by_code = tables.counts(txn)
        tables.copy_compact(dest, txn=txn, progress=progress)
    counts = {name: by_code.get(code, 0) for code, name in kind_names.items()}
    return lsn, counts


# ------------------------------------------------------------------------------- read


def load(root: Path, snapshot_id: str) -> Snapshot:
    """Parse the manifest of snapshot ``snapshot_id`` (checksums are not checked here)."""
    check_id(snapshot_id)
    path = root / snapshot_id
    if not path.is_dir():
        raise SnapshotError(
            f"no snapshot {snapshot_id!r} in {root} (`xpstore snapshot list` shows the ids)"
        )
    return _parse(path)


def _parse(path: Path) -> Snapshot:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise SnapshotError(f"{mpath}: missing (an incomplete or damaged snapshot)")
    try:
        data = json.loads(fs.read_bytes(mpath))
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{mpath}: unreadable manifest ({exc})") from exc
    if not isinstance(data, dict):
        raise SnapshotError(f"{mpath}: manifest is not a JSON object")
    try:
        return _from_manifest(path, data)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, FormatVersionError | SnapshotError):
            raise
        raise SnapshotError(f"{mpath}: bad manifest field: {exc}") from exc


def _from_manifest(path: Path, data: dict[str, Any]) -> Snapshot:
    mpath = path / MANIFEST
    if data["format"] != SNAPSHOT_FORMAT:
        raise SnapshotError(f"{mpath}: format is {data['format']!r}, not {SNAPSHOT_FORMAT!r}")
    version = _int(data, "format_version")
    if version > SNAPSHOT_FORMAT_VERSION:
        raise FormatVersionError(
            f"{mpath}: snapshot format {version} is newer than this xpstore reads "
            f"({SNAPSHOT_FORMAT_VERSION}); upgrade xpstore to use it"
        )
    if data.get("checksum") != _manifest_digest(data):
        raise SnapshotError(
            f"{mpath}: manifest checksum mismatch (the manifest was edited or damaged)"
        )
    if data["id"] != path.name:
        raise SnapshotError(f"{mpath}: manifest id {data['id']!r} != directory {path.name!r}")
    created = float(data["created"])
    if not math.isfinite(created):
        raise ValueError("created is not finite")
    counts_raw = data["counts"]
    if not isinstance(counts_raw, dict):
        raise TypeError("counts is not an object")
    counts = {str(k): _int(counts_raw, k) for k in counts_raw}
    files = _files(mpath, data["files"])
    info = SnapshotInfo(
        id=path.name,
        lsn=_int(data, "lsn"),
        created=created,
        path=path,
        counts=counts,
        store_id=_int(data, "store_id"),
        size_bytes=sum(f.size for f in files),
    )
    return Snapshot(info, files, data)


def _files(mpath: Path, raw: object) -> tuple[FileEntry, ...]:
    if not isinstance(raw, dict) or DATA_FILE not in raw:
        raise SnapshotError(f"{mpath}: 'files' must be an object listing {DATA_FILE}")
    out = []
    for name, entry in sorted(raw.items()):
        if name not in RESTORE_PLACES:
            raise SnapshotError(f"{mpath}: lists an unknown file {name!r}")
        if not isinstance(entry, dict):
            raise SnapshotError(f"{mpath}: files.{name} is not an object")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise SnapshotError(f"{mpath}: files.{name}.sha256 is not a sha256 hex digest")
        out.append(FileEntry(name, sha, _int(entry, "size")))
    return tuple(out)


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def scan(root: Path, store_id: int) -> Listing:
    """Every complete snapshot of ``store_id`` in ``root``, oldest first, plus the rest.

    Temporary directories (names starting with '.') are never listed. A directory whose manifest
    is missing or does not parse goes to ``damaged`` with the reason; snapshots of another store
    (a shared ``snapshot_dir``, or the store this one was restored from) go to ``foreign``.
    """
    listing = Listing()
    if not root.is_dir():
        return listing
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            snap = _parse(entry)
        except (SnapshotError, FormatVersionError) as exc:
            listing.damaged.append((entry.name, str(exc)))
            continue
        target = listing.snapshots if snap.info.store_id == store_id else listing.foreign
        target.append(snap.info)
    for infos in (listing.snapshots, listing.foreign):
        infos.sort(key=lambda i: (i.created, i.id))
    return listing


def verify(snap: Snapshot) -> None:
    """Check every file's size and sha256 against the manifest; SnapshotError names the file."""
    for entry in snap.files:
        path = snap.info.path / entry.name
        if not path.is_file():
            raise SnapshotError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry.size:
            raise SnapshotError(
                f"{path}: size {size} != {entry.size} in {MANIFEST} (truncated or tampered)"
            )
        sha, _n = _sha256(path)
        if sha != entry.sha256:
            raise SnapshotError(
                f"{path}: sha256 {sha[:16]}... != {entry.sha256[:16]}... in {MANIFEST} "
                "(the file was damaged or tampered with)"
            )


# ------------------------------------------------------------------------------- restore


def check_target(into: Path) -> None:
    """A restore writes a new store: ``into`` must not exist or be an empty directory."""
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise InvalidRecordError(
            f"refusing to restore into {into}: it exists and is not an empty directory",
            field="into",
        )


def restore(
    snap: Snapshot,
    into: Path,
    *,
    replay: ReplayFn | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Write a new store at ``into`` from ``snap``; ``replay`` rolls it forward (PITR).

    Every checksum is verified before anything is created. The store is assembled in a temporary
    sibling of ``into`` (files copied and re-hashed, then ``replay``, then a new marker with a
    new store id) and renamed into place last; a failure or crash leaves nothing at ``into``.
    """
    into = Path(into)
    check_target(into)
    verify(snap)
    _mkdirs(into.parent)
    _remove_stale_restores(into)
    tmp = into.parent / f".{into.name}{_RESTORE_TMP}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fs.mkdir(tmp)
        for sub in ("data", "wal"):
            fs.mkdir(tmp / sub)
        for entry in snap.files:
            _copy_verified(snap.info.path / entry.name, tmp / RESTORE_PLACES[entry.name], entry,
                           progress)  # fmt: skip
        fs.fsync_dir(tmp / "data")
        fs.fsync_dir(tmp)
        crash_point("restore.after_copy")
        if replay is not None:
            replay(tmp)
        layout_mod.write_marker(layout_mod.Layout(tmp))
        crash_point("restore.before_rename")
        check_target(into)  # again: someone may have written there meanwhile
        fs.replace(tmp, into)
        fs.fsync_dir(into.parent)
    except BaseException:
        _remove_quietly(tmp)
        raise
    log.info("restored snapshot %s (LSN %d) into %s", snap.info.id, snap.info.lsn, into)
    return into


def _copy_verified(
    src: Path, dst: Path, entry: FileEntry, progress: ProgressFn | None = None
) -> None:
    """Copy and hash in one pass; a file that changed since :func:`verify` is refused."""
    digest = hashlib.sha256()
    size = 0
    fd = fs.open_file(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for chunk in _read_chunks(src):
            digest.update(chunk)
            size += len(chunk)
            fs.write_all(fd, chunk)
            if progress is not None:
                progress(f"copying {entry.name}", size, entry.size, "bytes")
        fs.fdatasync(fd)
    finally:
        fs.close(fd)
    if size != entry.size or digest.hexdigest() != entry.sha256:
        raise SnapshotError(f"{src}: changed while it was being restored (checksum mismatch)")


def _remove_stale_restores(into: Path) -> None:
    """Remove temporaries of earlier restores into ``into`` whose process is gone."""
    prefix = f".{into.name}{_RESTORE_TMP}"
    for entry in into.parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        log.info("removing %s, left over by an interrupted restore", entry)
        fs.rmtree(entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not restoring into it now (restores are not reentrant)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------- prune


def remove(info: SnapshotInfo, root: Path) -> None:
    """Delete a snapshot: rename it to a hidden name first, so a crash never leaves it listed
    half-deleted, then remove the tree."""
    doomed = root / f"{_delete_prefix(info.store_id)}{info.id}"
    fs.replace(info.path, doomed)
    fs.fsync_dir(root)
    fs.rmtree(doomed)


# ------------------------------------------------------------------------------- WAL


def wal_frames(
    wal_dir: Path, *, store_id: int, from_lsn: int, max_frame_bytes: int
) -> Iterator[Frame]:
    """The retained WAL's frames that hold any LSN >= ``from_lsn``, in LSN order.

    Raises SnapshotError naming the missing LSN range when the segment holding ``from_lsn`` is
    gone (a checkpoint deleted it) or damage hides LSNs the restore needs. It ends at the end of
    the log: the first bad frame of the newest segment (a torn tail, or a frame being written).
    """
    reader = WalReader(wal_dir, store_id=store_id, max_frame_bytes=max_frame_bytes,
                       start_lsn=from_lsn, skip_older=True)
    for item in reader:
        if isinstance(item, Frame):
            if item.last_lsn >= from_lsn:
                yield item
        elif isinstance(item, BadFrame) and item.segment == reader.listed[-1][1]:
            return
        elif _before_oldest(item, reader):
            raise _not_retained(wal_dir, from_lsn, item.last_lsn)
        else:
            _pitr_damage(wal_dir, item, from_lsn)
    if not reader.listed:
        raise _not_retained(wal_dir, from_lsn, None)


def _before_oldest(damage: Damage, reader: WalReader) -> bool:
    """LSNs missing before the oldest segment read: a checkpoint deleted the one holding them."""
    oldest = reader.listed[0][1]
    return isinstance(damage, MissingLsns) and (damage.segment, damage.offset) == (oldest, 0)


def _not_retained(wal_dir: Path, from_lsn: int, hi: int | None) -> SnapshotError:
    """The WAL starts after ``from_lsn`` (at ``hi + 1``; None: there is no segment at all)."""
    oldest = f"the oldest retained segment starts at LSN {hi + 1}" if hi is not None else "none"
    span = f"{from_lsn}..{hi}" if hi is not None else f"{from_lsn} onward"
    return SnapshotError(
        f"point-in-time restore needs LSNs {span} from the WAL in {wal_dir}, which are no "
        f"longer retained ({oldest}); raise wal_retain_seconds / wal_retain_segments or "
        "restore a newer snapshot"
    )


def _pitr_damage(wal_dir: Path, damage: Damage, from_lsn: int) -> None:
    """Raise unless ``damage`` hides no LSN the restore needs (then only log it)."""
    if damage.offset == 0 and not isinstance(damage, MissingLsns):
        raise SnapshotError(f"{damage.segment}: not a valid segment of this store's WAL "
                            f"({damage.reason}: {damage.detail})")
    first, last = damage.first_lsn, damage.last_lsn
    if first is None or (last is not None and last < from_lsn):
        log.warning("%s: %s: %s (no LSN the restore needs is lost)", damage.where,
                    damage.reason, damage.detail)
        return
    hi = "the end" if last is None else str(last)
    raise SnapshotError(
        f"the WAL in {wal_dir} lacks LSNs {first}..{hi} ({damage.where}: {damage.reason}: "
        f"{damage.detail}); point-in-time restore cannot cross the gap"
    )


# ------------------------------------------------------------------------------- point in time


@dataclass(frozen=True, slots=True)
class WalSource:
    """The retained WAL of the store a snapshot came from: what a point-in-time restore rolls
    the copy forward through (the store's LMDB is never read)."""

    wal_dir: Path
    store_id: int
    max_frame_bytes: int

    def frames(self, from_lsn: int) -> Iterator[Frame]:
        return wal_frames(self.wal_dir, store_id=self.store_id, from_lsn=from_lsn,
                          max_frame_bytes=self.max_frame_bytes)  # fmt: skip


def restore_at(
    snap: Snapshot,
    into: Path,
    wal: WalSource,
    *,
    to_lsn: int | None = None,
    to_time: float | None = None,
    map_size: int,
    progress: ProgressFn | None = None,
) -> Path:
    """Restore ``snap`` into ``into`` and roll it forward through ``wal`` to exactly ``to_lsn``,
    or through every frame committed at or before ``to_time``; neither: the snapshot as it is.

    The WAL is checked to hold every LSN needed before anything is copied. Raises SnapshotError
    (damaged snapshot, WAL no longer retained) and InvalidArgumentError (bad arguments, an LSN
    outside the WAL).
    """
    lsn, when = lsn_arg(to_lsn), time_arg(to_time)
    if lsn is not None and when is not None:
        raise InvalidArgumentError("give to_lsn or to_time, not both", field="to_lsn")
    check_target(into)
    stop = _pitr_stop(snap, wal, lsn, when)
    after = snap.info.lsn

    def replay(tmp: Path) -> None:
        _replay_into(tmp / "data", wal, after, stop, map_size, progress)

    return restore(snap, into, replay=replay if stop > after else None, progress=progress)


def restore_from_files(
    store_root: Path,
    snapshot_id: str,
    into: Path,
    *,
    to_lsn: int | None = None,
    to_time: float | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """:func:`restore_at` for a store that cannot be opened (its LMDB data file is damaged):
    the store id comes from its marker, the snapshots from ``<store>/snapshots`` and the WAL
    limits from the snapshot's own manifest, so nothing reads the store's LMDB."""
    lay = layout_mod.Layout(store_root)
    marker = layout_mod.read_marker(lay)
    if to_lsn is not None and to_time is not None:
        raise InvalidArgumentError("give to_lsn or to_time, not both", field="to_lsn")
    check_target(into)
    snap = load(snapshot_root(store_root, None), snapshot_id)
    cfg = manifest_config(snap)
    wal = WalSource(lay.wal, marker.store_id, cfg.wal.max_frame_bytes)
    return restore_at(snap, into, wal, to_lsn=to_lsn, to_time=to_time,
                      map_size=cfg.apply.map_size, progress=progress)  # fmt: skip


def manifest_config(snap: Snapshot) -> StoreConfig:
    """The store's settings as the snapshot recorded them (defaults if they do not parse)."""
    raw = snap.manifest.get("config")
    try:
        return make_config(**raw) if isinstance(raw, dict) else make_config()
    except (InvalidArgumentError, ValueError, TypeError):
        log.warning("snapshot %s: its recorded config does not parse; using defaults",
                    snap.info.id)  # fmt: skip
        return make_config()


def snapshot_problems(root: Path, store_id: int, *, checksums: bool = True) -> list[str]:
    """One message per damaged snapshot directory in ``root``; empty when all is well."""
    listing = scan(root, store_id)
    problems = [f"snapshot {name}: {reason}" for name, reason in listing.damaged]
    if checksums:
        for info in listing.snapshots + listing.foreign:
            try:
                verify(load(root, info.id))
            except SnapshotError as exc:
                problems.append(f"snapshot {info.id}: {exc}")
    return problems


def newest_verified(root: Path, store_id: int) -> Snapshot | None:
    """The newest snapshot of ``store_id`` in ``root`` whose every checksum holds (a salvage's
    starting point when the store's own LMDB is damaged); damaged ones are logged and skipped."""
    for info in reversed(scan(root, store_id).snapshots):
        try:
            snap = load(root, info.id)
            verify(snap)
        except SnapshotError as exc:
            log.warning("snapshot %s cannot be used: %s", info.id, exc)
            continue
        return snap
    return None


def copy_data(snap: Snapshot, data_dir: Path) -> None:
    """Copy the snapshot's (verified) LMDB file into ``data_dir``, re-hashing it on the way."""
    for entry in snap.files:
        _copy_verified(snap.info.path / entry.name, data_dir / entry.name, entry)
    fs.fsync_dir(data_dir)


def lsn_arg(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"to_lsn must be an integer >= 0, got {value!r}", field="to_lsn")
    return value


def time_arg(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgumentError(
            f"to_time must be a finite number of seconds since the epoch, got {value!r}",
            field="to_time",
        )
    return float(value)


def _pitr_stop(snap: Snapshot, wal: WalSource, to_lsn: int | None, to_time: float | None) -> int:
    """The last LSN a restore replays to; checks the WAL holds all of it before any copy."""
    after = snap.info.lsn
    rolls = to_time is not None or (to_lsn is not None and to_lsn != after)
    if rolls and snap.info.store_id != wal.store_id:
        raise SnapshotError(
            f"snapshot {snap.info.id} belongs to store {snap.info.store_id:#x}, not this one "
            f"({wal.store_id:#x}): its WAL is not here, so it restores only as it is"
        )
    if to_lsn is not None:
        return _stop_at_lsn(snap, wal, to_lsn)
    if to_time is not None:
        return _stop_at_time(snap, wal, to_time)
    return after


def _stop_at_lsn(snap: Snapshot, wal: WalSource, to_lsn: int) -> int:
    after = snap.info.lsn
    if to_lsn < after:
        raise InvalidArgumentError(
            f"to_lsn {to_lsn} is before snapshot {snap.info.id}'s LSN {after}; restore an "
            "older snapshot",
            field="to_lsn",
        )
    end = after
    if to_lsn > after:
        for frame in wal.frames(after + 1):
            end = frame.last_lsn
            if end >= to_lsn:
                break
    if end < to_lsn:
        raise InvalidArgumentError(
            f"to_lsn {to_lsn} is beyond the end of this store's WAL (last LSN {end})",
            field="to_lsn",
        )
    return to_lsn


def _stop_at_time(snap: Snapshot, wal: WalSource, to_time: float) -> int:
    after = snap.info.lsn
    if after > 0 and to_time < snap.info.created:
        # the snapshot may already hold operations committed after to_time: check the frame
        # that holds its LSN
        try:
            first = next(iter(wal.frames(after)), None)
        except SnapshotError as exc:
            raise SnapshotError(
                f"snapshot {snap.info.id} was taken after to_time and the WAL around its LSN "
                f"{after} is gone, so it cannot be shown to hold nothing newer; restore an "
                f"older snapshot ({exc})"
            ) from exc
        if first is None or first.commit_time > to_time:
            raise InvalidArgumentError(
                f"snapshot {snap.info.id} already holds operations committed after to_time "
                f"{to_time} (LSN {after}); restore an older snapshot",
                field="to_time",
            )
    stop = after
    for frame in wal.frames(after + 1):
        if frame.commit_time > to_time:
            break
        stop = frame.last_lsn
    return stop


def _replay_into(
    data_dir: Path, wal: WalSource, after: int, stop: int, map_size: int,
    progress: ProgressFn | None,
) -> None:
    """Roll the LMDB copy in ``data_dir`` forward through LSNs ``after+1 .. stop``."""
    tables = LmdbTables(data_dir, readonly=False, map_size=map_size)
    try:
        replayer = Replayer(tables)
        last = after
        for frame in wal.frames(after + 1):
            if frame.first_lsn > stop:
                break
            ops = frame.ops()
            skip = max(0, after + 1 - frame.first_lsn)
            keep = ops[skip : stop - frame.first_lsn + 1]
            if keep:
                replayer.apply_frame(frame.first_lsn + skip, keep)
                last = frame.first_lsn + skip + len(keep) - 1
                if progress is not None:
                    progress(f"rolling forward to LSN {stop}", last - after, stop - after, "LSNs")
        if last != stop:
            raise SnapshotError(f"the WAL ended at LSN {last} before the target LSN {stop}")
        replayer.flush(force=True)
        tables.sync()
    finally:
        tables.close()


# ------------------------------------------------------------------------------- in place

IN_PLACE_JOURNAL = "RESTORE-IN-PLACE.json"
IN_PLACE_NEW = ".restore-new"
IN_PLACE_OLD = ".restore-old"


def in_place_staging(root: Path) -> Path:
    """Where an in-place restore builds the new store (inside the store: same file system).

    A staging directory without a journal is an abandoned attempt and is removed here.
    """
    staging = root / IN_PLACE_NEW
    if not (root / IN_PLACE_JOURNAL).exists():
        fs.unlink(root / f"{IN_PLACE_JOURNAL}.tmp", missing_ok=True)  # its atomic_write's temp
        if staging.exists():
            fs.rmtree(staging)
            fs.fsync_dir(root)
    return staging


def swap_in_place(root: Path) -> None:
    """Replace the store at ``root`` by the one staged in ``<root>/.restore-new``.

    Takes the writer lock (StoreLockedError if a writer has the store open), writes the journal
    (the commit point), then rolls forward with :func:`finish_in_place`.
    """
    staging = root / IN_PLACE_NEW
    if not (staging / layout_mod.MARKER).is_file():
        raise SnapshotError(f"{staging}: no complete staged store to swap in")
    lock = WriterLock(root / "LOCK")
    lock.acquire()
    try:
        body = json.dumps({"new": IN_PLACE_NEW, "old": IN_PLACE_OLD, "started": time.time()})
        fs.atomic_write(root / IN_PLACE_JOURNAL, body.encode() + b"\n")
        _roll_forward(root)
    finally:
        lock.release()


def finish_in_place(root: Path) -> bool:
    """Complete an in-place restore that a crash interrupted; True if there was one.

    Safe to call on every writer open: without the journal it does nothing. Takes the writer
    lock (StoreLockedError if a live writer holds it; that writer's open already finished it).
    """
    if not (root / IN_PLACE_JOURNAL).is_file():
        return False
    lock = WriterLock(root / "LOCK")
    lock.acquire()
    try:
        if not (root / IN_PLACE_JOURNAL).is_file():
            return False
        log.warning("finishing an interrupted in-place restore of %s", root)
        _roll_forward(root)
    finally:
        lock.release()
    return True


def _roll_forward(root: Path) -> None:
    """Idempotent steps, each one rename: every crash point resumes here.

    The old marker goes out first and the new one comes in last, so in between the directory is
    not a store at all (an open fails with "no xpstore.json" rather than seeing a mix).
    """
    new, old = root / IN_PLACE_NEW, root / IN_PLACE_OLD
    marker = layout_mod.MARKER
    fs.mkdir(old, exist_ok=True)
    fs.fsync_dir(root)
    if (root / marker).exists() and (new / marker).exists():
        fs.replace(root / marker, old / marker)
        fs.fsync_dir(root)
    for sub in ("wal", "data"):
        if not (new / sub).exists():
            continue
        if (root / sub).exists():
            if (old / sub).exists():
                fs.rmtree(old / sub)
            fs.replace(root / sub, old / sub)
        fs.replace(new / sub, root / sub)
        fs.fsync_dir(root)
    if (new / marker).exists():
        fs.replace(new / marker, root / marker)
        fs.fsync_dir(root)
    for leftover in (new, old):
        if leftover.exists():
            fs.rmtree(leftover)
    fs.unlink(root / IN_PLACE_JOURNAL, missing_ok=True)
    fs.fsync_dir(root)
