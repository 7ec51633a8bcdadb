"""CLI commands (issue 3), registered on the ``xpstore`` group: ``snapshot create|list|restore|
prune``, a thin layer over ``Store.snapshot``, ``list_snapshots``, ``restore_snapshot`` and
``prune_snapshots`` (see docs/snapshots.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from xpstore import LmdbCorruptionError, SnapshotInfo, Store
from xpstore.cli._errors import EXIT_PROBLEM, CliError
from xpstore.cli._input import TimestampType
from xpstore.cli._output import emit_json, table
from xpstore.cli._progress import progress_bar
from xpstore.cli.commands import STORE_PATH, main
from xpstore.ops import snapshots as snap_mod
from xpstore.persistence.layout import Layout, read_marker
from xpstore.persistence.lock import WriterLock

_JSON_KEY = "xpstore.snapshot.json"


def _json_flag(func: Any) -> Any:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
    )(func)


def _wants_json(ctx: click.Context, as_json: bool) -> bool:
    """``xpstore snapshot --json list P`` and ``xpstore snapshot list P --json`` both work."""
    return as_json or bool(ctx.meta.get(_JSON_KEY))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _finish_pending(path: Path) -> None:
    """Complete an in-place restore a crash interrupted, before anything opens the store."""
    if snap_mod.finish_in_place(path):
        click.echo(f"finished an interrupted in-place restore of {path}", err=True)


@main.group()
@_json_flag
@click.pass_context
def snapshot(ctx: click.Context, as_json: bool) -> None:
    """Take, list, restore and prune snapshots of a store.

    A snapshot is a compacted copy of the store's LMDB at an exact LSN, with a manifest of
    checksums, in <store>/snapshots/ (or the store's snapshot_dir). Restores verify every
    checksum and write a new store; with --to-lsn / --to-time they roll it forward through the
    store's retained WAL (point-in-time restore). See docs/snapshots.md.

    \b
    Example:
      xpstore snapshot create data/xp
      xpstore snapshot restore data/xp 20250101T120000.000000Z-42 --into data/xp-restored
    """
    ctx.meta[_JSON_KEY] = as_json


@snapshot.command("create")
@click.argument("path", type=STORE_PATH)
@_json_flag
@click.pass_context
def create(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Take a snapshot now and print its id and LSN.

    Every acknowledged operation is applied first, so the snapshot holds everything written
    before the command. Needs the writer lock (exit 3 while another process writes: call
    Store.snapshot() there, or configure automatic snapshots).

    \b
    Example:
      xpstore snapshot create data/xp --json
    """
    _finish_pending(path)
    with progress_bar() as bar:
        store = Store.open(path, progress=bar)
        with store:
            info = store.snapshot(progress=bar)
    if _wants_json(ctx, as_json):
        emit_json(info.as_dict())
    else:
        click.echo(f"snapshot {info.id} at LSN {info.lsn} ({info.size_bytes:,} bytes)")


@snapshot.command("list")
@click.argument("path", type=STORE_PATH)
@click.option("--verify", is_flag=True, help="Also check every file's sha256 (reads them all).")
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help="Also list snapshots of other stores found in the directory.",
)
@_json_flag
@click.pass_context
def list_(ctx: click.Context, path: Path, verify: bool, show_all: bool, as_json: bool) -> None:
    """List the store's complete snapshots, oldest first.

    Half-written snapshots are never listed. Damaged ones (no or a bad manifest; with
    --verify also a checksum mismatch) are reported on stderr and make the exit code 1.
    The store is opened read-only.

    \b
    Example:
      xpstore snapshot list data/xp --verify
    """
    _finish_pending(path)
    try:
        with Store.open(path, readonly=True) as store:
            root, store_id = store.snapshot_dir, store.store_id
    except LmdbCorruptionError as exc:  # the snapshots are what an operator needs now
        _warn_files_only(exc)
        root = snap_mod.snapshot_root(path, None)
        store_id = read_marker(Layout(path)).store_id
    listing = snap_mod.scan(root, store_id)
    problems = snap_mod.snapshot_problems(root, store_id, checksums=verify)
    infos = listing.snapshots + (listing.foreign if show_all else [])
    if _wants_json(ctx, as_json):
        emit_json(
            {
                "path": str(path),
                "snapshot_dir": str(root),
                "snapshots": [i.as_dict() for i in infos],
                "problems": problems,
            }
        )
    else:
        _print_list(infos, root)
    for problem in problems:
        click.echo(f"damaged: {problem}", err=True)
    if problems:
        raise click.exceptions.Exit(EXIT_PROBLEM)


def _print_list(infos: list[SnapshotInfo], root: Path) -> None:
    if not infos:
        click.echo(f"no snapshots in {root}")
        return
    rows = [("id", "lsn", "created", "records", "bytes")]
    for i in infos:
        rows.append(
            (
                i.id,
                f"{i.lsn:,}",
                _when(i.created),
                f"{sum(i.counts.values()):,}",
                f"{i.size_bytes:,}",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for row in rows:
        click.echo(
            "  ".join(
                cell.ljust(w) if c in (0, 2) else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


@snapshot.command("restore")
@click.argument("path", type=STORE_PATH)
@click.argument("snapshot_id")
@click.option(
    "--into",
    "into",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the restored store here (a new or empty directory).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Replace the store at PATH itself (no writer may have it open).",
)
@click.option(
    "--to-lsn",
    type=click.IntRange(min=0),
    default=None,
    help="Roll forward through the retained WAL up to and including this LSN.",
)
@click.option(
    "--to-time",
    type=TimestampType(),
    default=None,
    help="Roll forward through every WAL frame committed at or before this time "
    "(epoch seconds or ISO 8601).",
)
@_json_flag
@click.pass_context
def restore(
    ctx: click.Context,
    path: Path,
    snapshot_id: str,
    into: Path | None,
    in_place: bool,
    to_lsn: int | None,
    to_time: float | None,
    as_json: bool,
) -> None:
    """Restore SNAPSHOT_ID into a new store (--into DIR) or over PATH (--in-place).

    Every checksum in the manifest is verified before any file is used (exit 1 naming the
    file if one differs). The new store is built beside its target and renamed into place
    when complete; it gets a new store id. --to-lsn / --to-time replay the source store's
    retained WAL after the snapshot (exit 1 naming the LSN range if it is gone). --in-place
    needs the writer lock; the old data and WAL of PATH are discarded, its snapshots stay.

    \b
    Example:
      xpstore snapshot restore data/xp 20250101T120000.000000Z-42 \\
        --into data/xp-yesterday --to-time 2025-01-01T18:00:00
    """
    if (into is None) == (not in_place):
        raise CliError("give exactly one of --into DIR and --in-place")
    if to_lsn is not None and to_time is not None:
        raise CliError("give --to-lsn or --to-time, not both")
    _finish_pending(path)
    if in_place:
        target = _restore_in_place(path, snapshot_id, to_lsn, to_time)
    else:
        assert into is not None
        target = _restore_into(path, snapshot_id, into, to_lsn, to_time)
    with Store.open(target, readonly=True) as restored:
        st = restored.stats()
        store_id = restored.store_id
    data = {
        "snapshot": snapshot_id,
        "into": str(target),
        "in_place": in_place,
        "restored_lsn": st["applied_lsn"],
        "counts": st["counts"],
        "total": st["total"],
        "store_id": store_id,
    }
    if _wants_json(ctx, as_json):
        emit_json(data)
    else:
        click.echo(
            f"restored snapshot {snapshot_id} into {target}: {st['total']:,} records, "
            f"LSN {st['applied_lsn']:,}"
        )


def _warn_files_only(exc: LmdbCorruptionError) -> None:
    click.echo(f"warning: {exc}", err=True)
    click.echo("warning: not opening the store; reading its marker, snapshots and WAL directly",
               err=True)  # fmt: skip


def _restore_into(
    path: Path, snapshot_id: str, into: Path, to_lsn: int | None, to_time: float | None
) -> Path:
    """Restore into a new store; from the files alone when the store's LMDB is damaged."""
    with progress_bar() as bar:
        try:
            store = Store.open(path, readonly=True)
        except LmdbCorruptionError as exc:
            _warn_files_only(exc)
            return snap_mod.restore_from_files(path, snapshot_id, into, to_lsn=to_lsn,
                                               to_time=to_time, progress=bar)  # fmt: skip
        with store:
            return store.restore_snapshot(snapshot_id, into, to_lsn=to_lsn, to_time=to_time,
                                          progress=bar)  # fmt: skip


def _restore_in_place(
    path: Path, snapshot_id: str, to_lsn: int | None, to_time: float | None
) -> Path:
    """Stage the restored store inside PATH under the writer lock, then swap it in."""
    with progress_bar() as bar:
        try:
            store = Store.open(path)  # the writer lock: nobody else has the store open to write
        except LmdbCorruptionError as exc:
            _warn_files_only(exc)
            lock = WriterLock(Layout(path).lock)
            lock.acquire()
            try:
                staging = snap_mod.in_place_staging(path)
                snap_mod.restore_from_files(path, snapshot_id, staging, to_lsn=to_lsn,
                                            to_time=to_time, progress=bar)  # fmt: skip
            finally:
                lock.release()
        else:
            with store:
                staging = snap_mod.in_place_staging(path)
                store.restore_snapshot(snapshot_id, staging, to_lsn=to_lsn, to_time=to_time,
                                       progress=bar)  # fmt: skip
    snap_mod.swap_in_place(path)
    return path


@snapshot.command("prune")
@click.argument("path", type=STORE_PATH)
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    required=True,
    help="How many of the newest snapshots to keep.",
)
@_json_flag
@click.pass_context
def prune(ctx: click.Context, path: Path, keep: int, as_json: bool) -> None:
    """Delete all but the newest --keep snapshots of the store.

    Needs the writer lock (exit 3 while another process writes). Damaged snapshot
    directories are left alone for an operator to look at.

    \b
    Example:
      xpstore snapshot prune data/xp --keep 3
    """
    _finish_pending(path)
    with Store.open(path) as store:
        removed = store.prune_snapshots(keep)
        left = store.list_snapshots()
    if _wants_json(ctx, as_json):
        emit_json({"removed": [i.as_dict() for i in removed], "kept": [i.id for i in left]})
    else:
        click.echo(table([("removed", [i.id for i in removed]), ("kept", [i.id for i in left])]))
