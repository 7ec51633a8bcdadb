"""CLI commands of issue 16: ``xpstore export`` (columnar files for analytics) and ``xpstore
sync`` (a Milvus follower). Thin layers over ``store.parts.export`` and
:mod:`xpstore.store.milvus` (docs/export.md, docs/scale-out.md)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from xpstore import Store
from xpstore.cli._input import parse_where
from xpstore.cli._output import emit_json, table
from xpstore.cli._progress import progress_bar
from xpstore.cli.commands import STORE_PATH, json_option, main, open_for_reading, readonly_option
from xpstore.config import MilvusSettings
from xpstore.model.records import KINDS
from xpstore.store.export import DEFAULT_ROW_GROUP, FORMATS


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="parquet",
              show_default=True, help="File format: Parquet, Arrow IPC (Feather v2) or JSONL.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Directory to write <kind>.<ext> files and export.json into (created).")
@click.option("--kind", "kinds", type=click.Choice(KINDS), multiple=True,
              help="Only this kind (repeat for several; default: every kind).")
@click.option("--where", "wheres", multiple=True, metavar="PATH[__OP]=VALUE",
              help="Only records matching, as scan's --where. Repeat to AND.")
@click.option("--since", type=float, default=None, help="Only records with ts >= SINCE.")
@click.option("--until", type=float, default=None, help="Only records with ts < UNTIL.")
@click.option("--row-group-size", type=click.IntRange(min=1), default=DEFAULT_ROW_GROUP,
              show_default=True, help="Rows per Parquet row group / Arrow record batch.")
@readonly_option
@json_option
def export(path: Path, fmt: str, out: Path, kinds: tuple[str, ...], wheres: tuple[str, ...],
           since: float | None, until: float | None, row_group_size: int, readonly: bool,
           as_json: bool) -> None:  # fmt: skip
    """Export experiences as columnar files, one per kind, from one consistent read.

    Columns: id, ts, lsn, retrieval_count, success_count, priority, then the record's fields
    flattened with dots (audio_features.energy, batch.lufs, ...). Needs pyarrow
    (pip install "xpstore[arrow]").

    \b
    Example:
      xpstore export data/xp --format parquet --out exports/today --kind prediction
    """
    where = parse_where(wheres)
    with open_for_reading(path, readonly, index_auto_rebuild=False) as store, \
            progress_bar() as bar:  # fmt: skip
        report = store.parts.export.export(out, fmt, kinds or None, where or None, since,
                                           until, row_group_size, bar)  # fmt: skip
    if as_json:
        emit_json(dict(report))
        return
    click.echo(f"exported at LSN {report['lsn']} into {out}:")
    for kind, info in report["kinds"].items():
        click.echo(f"  {kind:<13} {info['rows']:>10,} rows  {info['file']}")


# ------------------------------------------------------------------------------ sync


@main.group()
def sync() -> None:
    """Mirror the store into Milvus, and report how far behind the mirror is.

    \b
    Example:
      xpstore sync milvus data/xp --uri http://milvus:19530 --follow
      xpstore sync status data/xp --uri http://milvus:19530
    """


def _follower_parts(store: Store, uri: str | None, collection: str | None,
                    batch_size: int | None, poll: float | None) -> tuple[Any, Any]:  # fmt: skip
    from xpstore.store.milvus import Follower, MilvusMirror, connect

    cfg = store.config.milvus
    changes = {k: v for k, v in {"uri": uri, "collection": collection, "batch_size": batch_size,
                                 "poll_s": poll}.items() if v is not None}  # fmt: skip
    try:
        settings = MilvusSettings.model_validate({**cfg.model_dump(), **changes})
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from exc
    if settings.uri is None:
        raise click.BadParameter("no Milvus URI: give --uri (or set milvus.uri in the store)",
                                 param_hint="--uri")  # fmt: skip
    mirror = MilvusMirror(connect(settings.uri, settings.timeout_s), settings.collection)
    p = store.parts
    return Follower(p.engine, p.reader, p.index, p.changes, mirror, settings), mirror


@sync.command("milvus")
@click.argument("path", type=STORE_PATH)
@click.option("--uri", default=None, help="Milvus URI: http://host:19530, or a Milvus Lite "
              ".db file (default: the store's milvus.uri).")
@click.option("--collection", default=None, help="The alias readers query (default: the "
              "store's milvus.collection, 'xpstore').")
@click.option("--follow", is_flag=True, help="Keep tailing the store after catching up "
              "(until SIGINT/SIGTERM).")
@click.option("--batch-size", type=click.IntRange(min=1, max=100_000), default=None,
              help="Operations per Milvus write and high-water mark (default: milvus.batch_size).")
@click.option("--poll", type=click.FloatRange(min=0.01), default=None,
              help="Seconds between looks for new operations with --follow (milvus.poll_s).")
@json_option
def sync_milvus(path: Path, uri: str | None, collection: str | None, follow: bool,
                batch_size: int | None, poll: float | None, as_json: bool) -> None:  # fmt: skip
    """Mirror the store's live fingerprints into a Milvus collection (a read-only follower).

    Reads the change feed from the collection's high-water LSN, writes in batches and records
    the LSN after each; a killed follower resumes without loss or duplicates. A new embedding
    (an index rebuild) is written to a new collection and the alias switched to it.

    \b
    Example:
      xpstore sync milvus data/xp --uri http://milvus:19530 --collection tracks --follow
    """
    stop = threading.Event()
    with Store.open(path, readonly=True) as store:
        follower, _mirror = _follower_parts(store, uri, collection, batch_size, poll)
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGINT, signal.SIGTERM)}  # fmt: skip
        try:
            report = follower.run(follow=follow, stop=stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if as_json:
        emit_json(report.as_dict())
        return
    d = report.as_dict()
    click.echo(f"{d['alias']} -> {d['collection']}: high-water LSN {d['hwm']} (store at "
               f"{d['store_lsn']}, lag {d['lag_lsn']}); {d['operations']} operations, "
               f"{d['upserted']} upserted, {d['deleted']} deleted, {d['resyncs']} resyncs, "
               f"{d['seconds']} s")  # fmt: skip


@sync.command("status")
@click.argument("path", type=STORE_PATH)
@click.option("--uri", default=None, help="Milvus URI (default: the store's milvus.uri).")
@click.option("--collection", default=None, help="The alias (default: milvus.collection).")
@json_option
def sync_status_cmd(path: Path, uri: str | None, collection: str | None, as_json: bool) -> None:
    """How far the Milvus mirror is behind the store: its high-water LSN, the store's LSN
    and the lag between them, rows, and whether it holds the index's current embedding.

    \b
    Example:
      xpstore sync status data/xp --uri http://milvus:19530
    """
    from xpstore.store.milvus import embedder_key, sync_status

    with Store.open(path, readonly=True) as store:
        _follower, mirror = _follower_parts(store, uri, collection, None, None)
        key = embedder_key(store.parts.index.server().main.embedder)
        out = sync_status(mirror, store.parts.changes.upto(), key)
    if as_json:
        emit_json(out)
        return
    click.echo(table([(k, v) for k, v in out.items()]))
