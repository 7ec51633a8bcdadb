"""``xpstore recover``: open a damaged store under an explicit recovery policy, and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xpstore import Store
from xpstore.cli._errors import CliError
from xpstore.cli._output import emit_json
from xpstore.cli._progress import progress_bar
from xpstore.cli.commands import STORE_PATH, json_option, main
from xpstore.ops.salvage import salvage_store
from xpstore.persistence.wal_recovery import RECOVERY_MODES, RecoveryReport


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option(
    "--mode", type=click.Choice(RECOVERY_MODES), default="tolerate_tail", show_default=True,
    help="What to do with WAL damage (see docs/recovery.md).",
)
@click.option("--to-lsn", type=click.IntRange(min=0), default=None,
              help="point_in_time only: keep the WAL up to this LSN, set the rest aside.")
@click.option("--into", type=STORE_PATH, default=None,
              help="salvage only: the NEW store to write (the damaged one is never modified).")
@json_option
def recover(path: Path, mode: str, to_lsn: int | None, into: Path | None, as_json: bool) -> None:
    """Open a store under a recovery policy and print what it kept and dropped.

    \b
    tolerate_tail   truncate a torn tail (keeping a .broken copy); refuse other damage
    absolute        refuse any damage
    point_in_time   keep the consistent prefix (up to --to-lsn if given); set the rest aside
    salvage         copy everything readable into a new store (--into); report every gap

    \b
    Example:
      xpstore recover data/xp --mode point_in_time
      xpstore recover data/xp --mode salvage --into data/xp-salvaged
    """
    if mode == "salvage":
        if into is None:
            raise CliError("--mode salvage needs --into DIR (it never modifies the damaged store)")
        with progress_bar() as bar:
            report: RecoveryReport | None = salvage_store(path, into, progress=bar)
        count_path = into
    else:
        if into is not None:
            raise CliError("--into is for --mode salvage only")
        if to_lsn is not None and mode != "point_in_time":
            raise CliError("--to-lsn needs --mode point_in_time")
        with progress_bar() as bar:
            store = Store.open(path, recovery_mode=mode, to_lsn=to_lsn, progress=bar)
        with store:
            report = store.recovery_report
        count_path = path
    assert report is not None
    with Store.open(count_path, readonly=True) as store:
        records = store.count()
    _show(report, records, count_path, as_json)


def _show(report: RecoveryReport, records: int, where: Path, as_json: bool) -> None:
    data: dict[str, Any] = {"store": str(where), "records": records, **report.as_dict()}
    if as_json:
        emit_json(data)
        return
    click.echo(f"recovered {where} under mode {report.mode}: {records} live records")
    click.echo(f"  LMDB held LSNs up to {report.applied_lsn}; replayed {report.replayed_ops} "
               f"operations from {report.frames} WAL frames; last LSN {report.last_lsn}")
    for seg, offset in report.truncated:
        click.echo(f"  truncated torn tail of {seg} at offset {offset}")
    if report.dropped_lsns:
        lo, hi = report.dropped_lsns
        click.echo(f"  dropped LSNs {lo}..{hi} (set aside, not deleted)")
    for gap in report.gaps:
        last = "end" if gap.last_lsn is None else gap.last_lsn
        click.echo(f"  gap: LSNs {gap.first_lsn}..{last} unreadable ({gap.reason} at "
                   f"{gap.where})")
    for name in report.broken_copies:
        click.echo(f"  kept a copy of the damaged bytes: wal/{name}")
    for warning in report.warnings:
        click.echo(f"  warning: {warning}")
    if not (report.truncated or report.dropped_lsns or report.gaps or report.warnings):
        click.echo("  the WAL was clean: nothing dropped")
