"""CLI commands (issue 3), registered on the ``xpstore`` group: compact, retention."""

from __future__ import annotations

from pathlib import Path

import click

from xpstore import Store
from xpstore.cli._output import emit_json
from xpstore.cli._progress import progress_bar
from xpstore.cli.commands import STORE_PATH, json_option, main


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@main.command()
@click.argument("path", type=STORE_PATH)
@json_option
def compact(path: Path, as_json: bool) -> None:
    """Rewrite LMDB compactly and swap it in; LMDB never shrinks by itself.

    The store's LMDB file keeps every page it ever used; this copies the live data into a new,
    compact file and swaps it in. Writers wait while it runs. It needs the writer lock (exit 3
    while another process holds it) and free disk space for a copy of the live data. A crash at
    any moment leaves the old or the new file, complete. Reader processes should reopen the
    store afterwards.

    \b
    Example:
      xpstore compact data/xp --json
    """
    with progress_bar() as bar:
        store = Store.open(path, progress=bar)
        with store:
            report = store.compact(progress=bar)
    if as_json:
        emit_json({"path": str(path), **report.as_dict()})
        return
    saved = report.before_bytes - report.after_bytes
    share = 100.0 * saved / report.before_bytes if report.before_bytes else 0.0
    click.echo(
        f"compacted {path}: {_size(report.before_bytes)} -> {_size(report.after_bytes)} "
        f"({share:.0f}% smaller) in {report.seconds:.2f} s"
    )


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option(
    "--now",
    type=float,
    default=None,
    help="Evaluate max_age_s against this Unix time instead of the clock (audits, tests).",
)
@json_option
def retention(path: Path, now: float | None, as_json: bool) -> None:
    """Apply the store's retention rules now; print the evictions per kind.

    The rules are the store's `retention` config (per kind: max_count and/or max_age_s); a
    writer applies them by itself every `retention_interval_s`. Evictions are logged in the
    WAL like deletes.

    \b
    Example:
      xpstore retention data/xp --json
    """
    with Store.open(path) as store:
        evicted = store.apply_retention(now)
    if as_json:
        emit_json({"path": str(path), "evicted": evicted})
        return
    if not evicted:
        click.echo(f"{path}: no retention rules configured")
        return
    for kind, n in evicted.items():
        click.echo(f"{kind}: evicted {n}")
