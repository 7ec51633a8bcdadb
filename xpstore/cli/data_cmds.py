"""CLI commands of issue 16: ``xpstore export`` (columnar files for analytics) and ``xpstore
sync`` (a Milvus follower). Thin layers over ``store.parts.export`` and
:mod:`xpstore.store.milvus` (docs/export.md, docs/scale-out.md)."""

from __future__ import annotations

from pathlib import Path

import click

from xpstore.cli._input import parse_where
from xpstore.cli._output import emit_json
from xpstore.cli._progress import progress_bar
from xpstore.cli.commands import STORE_PATH, json_option, main, open_for_reading, readonly_option
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
