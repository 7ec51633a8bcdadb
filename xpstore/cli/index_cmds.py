"""CLI commands (issue 4), registered on the ``xpstore`` group: ``similar`` and ``index status|
rebuild``, a thin layer over ``Store.similar``, ``Store.index_status`` and ``Store.rebuild_index``
(see docs/cli.md).

``similar`` and ``index status`` read: they open the store as ``get`` does (for writing when the
lock is free, read-only beside a live writer). ``index rebuild`` needs the writer lock. With
``--no-wait`` it starts ``xpstore index rebuild PATH`` as a detached process and returns: a build
requested in this process would be stopped when the command closes the store.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from xpstore import Neighbor, Store
from xpstore.cli._input import parse_where
from xpstore.cli._output import emit_json, flatten
from xpstore.cli.commands import STORE_PATH, json_option, main, open_for_reading, readonly_option

# metadata shown as columns of the `similar` table, when a neighbour's fingerprint has them
_META_COLUMNS = ("title", "artist", "style")


# ================================================================================ similar


@main.command()
@click.argument("path", type=STORE_PATH)
@click.argument("track_id")
@click.option(
    "-k",
    "k",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many similar tracks to list (at least 1).",
)
@click.option(
    "--precomputed",
    is_flag=True,
    help="Read the track's neighbour list stored by the last index build (no index search).",
)
@click.option(
    "--where",
    "wheres",
    multiple=True,
    metavar="PATH[__OP]=VALUE",
    help="Only tracks whose fingerprint record matches, as scan's --where "
    "(e.g. 'metadata.style=techno'). Repeat to AND.",
)
@readonly_option
@json_option
def similar(
    path: Path,
    track_id: str,
    k: int,
    precomputed: bool,
    wheres: tuple[str, ...],
    readonly: bool,
    as_json: bool,
) -> None:
    """List the K tracks most similar to TRACK_ID, best first.

    Similarity is the score of the hybrid vectors (audio values and the embedding, when the
    fingerprints have one): 1.000 for an identical fingerprint. The track itself is left out.
    --precomputed reads the list the last index build stored for the track (exit 1 if it has
    none: a track added after that build); its answers name the build. Exit 1 if there is no
    track TRACK_ID. The store is opened as for `get`.

    \b
    Example:
      xpstore similar data/xp track-42 -k 5 --where metadata.style=techno
    """
    where = parse_where(wheres)
    with open_for_reading(path, readonly, index_auto_rebuild=False) as store:
        hits = store.similar(track_id, k=k, where=where or None, precomputed=precomputed)
    if as_json:
        emit_json({"query": track_id, "k": k, "neighbors": [_neighbor_json(n) for n in hits]})
    elif not hits:
        click.echo(f"no similar tracks for {track_id!r}")
    else:
        click.echo(_neighbor_table(hits))


def _neighbor_json(n: Neighbor) -> dict[str, Any]:
    return {
        "track_id": n.track_id,
        "score": n.score,
        "record_id": n.record_id,
        "metadata": n.metadata,
        "build_id": n.build_id,
    }


def _neighbor_table(hits: list[Neighbor]) -> str:
    meta = [c for c in _META_COLUMNS if any(n.metadata and c in n.metadata for n in hits)]
    rows = [["rank", "track_id", "score", *meta]]
    for rank, n in enumerate(hits, start=1):
        values = n.metadata or {}
        rows.append(
            [str(rank), n.track_id, f"{n.score:.3f}", *(_text(values.get(c)) for c in meta)]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    numeric = {0, 2}  # rank and score: right-aligned
    return "\n".join(
        "  ".join(
            cell.rjust(w) if c in numeric else cell.ljust(w)
            for c, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


# ================================================================================ index


@main.group()
def index() -> None:
    """Show or rebuild the similar-track index.

    \b
    Example:
      xpstore index status data/xp
      xpstore index rebuild data/xp
    """


@index.command("status")
@click.argument("path", type=STORE_PATH)
@readonly_option
@json_option
def index_status(path: Path, readonly: bool, as_json: bool) -> None:
    """Show the index: kind, size, delta, tombstones, LSN, last build and its recall.

    "size" counts the vectors of the main index, "delta" those added since its build (searched
    exactly beside it), "tombstones" the main-index entries deleted or replaced since. The
    store is opened as for `get`; a read-only open shows the index file the writer saved and
    the fingerprints it has applied to LMDB.

    \b
    Example:
      xpstore index status data/xp --json
    """
    with open_for_reading(path, readonly, index_auto_rebuild=False) as store:
        status = store.index_status()
    _print_status(status, as_json)


@index.command("rebuild")
@click.argument("path", type=STORE_PATH)
@click.option(
    "--no-wait",
    is_flag=True,
    help="Start the rebuild in a detached background process and return at once.",
)
@json_option
def index_rebuild(path: Path, no_wait: bool, as_json: bool) -> None:
    """Rebuild the index from every acknowledged fingerprint, then show its status.

    Needs the writer lock (exit 3 while another process writes: call Store.rebuild_index()
    there). The new index replaces the old one only when complete, and is saved in the store's
    index/ directory together with each track's precomputed neighbour list. --no-wait checks
    that the lock is free, starts `xpstore index rebuild PATH` as a detached process (its
    output goes to a log file it names) and returns; `index status` shows the build once done.

    \b
    Example:
      xpstore index rebuild data/xp
    """
    if no_wait:
        _rebuild_detached(path, as_json)
        return
    with Store.open(path) as store:
        click.echo(f"rebuilding the index of {path} ...", err=True)
        started = time.monotonic()
        status = store.rebuild_index(wait=True)
    click.echo(f"index rebuilt in {time.monotonic() - started:.2f} s", err=True)
    _print_status(status, as_json)


def _rebuild_detached(path: Path, as_json: bool) -> None:
    """Start ``xpstore index rebuild PATH`` in its own session, its output to a log file."""
    with Store.open(path):  # exit 2 when PATH is not a store, 3 while a writer holds the lock
        pass
    fd, log_name = tempfile.mkstemp(prefix="xpstore-index-rebuild-", suffix=".log")
    argv = [
        sys.executable, "-m", "xpstore.cli", "-v",
        "index", "rebuild", str(path.resolve()), "--json",
    ]  # fmt: skip
    try:
        pid = os.posix_spawn(
            sys.executable,
            argv,
            dict(os.environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,  # not stopped by the terminal's Ctrl-C or hangup
        )
    finally:
        os.close(fd)
    if as_json:
        emit_json({"path": str(path), "started": True, "pid": pid, "log": log_name})
    else:
        click.echo(
            f"index rebuild of {path} started in the background (pid {pid}, log {log_name}); "
            f"`xpstore index status {path}` shows the build once it is done"
        )


# ================================================================================ output


def _print_status(status: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        emit_json(dict(status))
        return
    rows = flatten(status)
    width = max((len(key) for key, _ in rows), default=0)
    for key, value in rows:
        click.echo(f"{(key + ':').ljust(width + 1)} {_status_value(key, value)}")


def _status_value(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key == "built_at" and isinstance(value, int | float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if key in ("age_s", "build_seconds") and isinstance(value, int | float):
        return f"{value:.3f} s"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, Mapping):
        return "-" if not value else ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
