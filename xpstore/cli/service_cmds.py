"""CLI commands (issue 13): ``xpstore health``, ``metrics``, ``serve`` and ``report``, thin
layers over ``Store.health``, the Prometheus collector, the HTTP service and the report's
pictures (docs/service.md, docs/cli.md).

``health``, ``metrics`` and ``report`` open the store read-only: they take no lock, replay
nothing and change nothing, so they run beside a live writer. ``health`` has its own exit codes:
0 healthy, 1 warning, 4 critical (a store that cannot be opened, e.g. damaged, is critical with
the reason); 2 and 3 keep their meanings (usage error; busy).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from xpstore import Store
from xpstore.cli._errors import EXIT_CRITICAL, EXIT_PROBLEM
from xpstore.cli._output import emit_json
from xpstore.cli.commands import STORE_PATH, json_option, main
from xpstore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    StoreLockedError,
    StoreNotFoundError,
    XpStoreError,
)
from xpstore.tuning import Learner
from xpstore.tuning.observe import watch_learner

log = logging.getLogger(__name__)

_HEALTH_EXIT = {"healthy": 0, "warning": EXIT_PROBLEM, "critical": EXIT_CRITICAL}
_MARK = {"healthy": "ok  ", "warning": "WARN", "critical": "CRIT"}
_USAGE = (StoreNotFoundError, FormatVersionError, InvalidArgumentError, StoreLockedError)


def _watch(store: Store, policy: str) -> None:
    """The learner's check and metrics, when the store holds predictions."""
    if store.count("prediction"):
        learner = Learner(store, policy=policy)
        watch_learner(store, lambda: learner)


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--policy", type=click.Choice(["fixed", "seed", "default"]), default="default",
              show_default=True, help="The learner policy whose accuracy is checked.")
@json_option
def health(path: Path, policy: str, as_json: bool) -> None:
    """Check a store's health (exit 0 healthy, 1 warning, 4 critical).

    \b
    Checks: WAL size and checkpoint age, applier lag, fsync p99, index
    staleness and recall, memory level, free disk and LMDB map, answer-cache
    hit rate, prediction accuracy, the last verify. Thresholds are the store's
    `health.*` settings (docs/service.md). Opens read-only: runs beside a live
    writer, whose process-only figures (fsync, lag) it cannot see.

    \b
    Example:
      xpstore health data/xp --json
    """
    try:
        store = Store.open(path, readonly=True)
    except _USAGE:
        raise
    except (XpStoreError, OSError) as exc:  # damaged, unreadable: the verdict is critical
        report: dict[str, Any] = {
            "status": "critical", "path": str(path), "readonly": True,
            "checks": {"open": {"status": "critical", "message": f"cannot open: {exc}",
                                "value": type(exc).__name__}},
        }  # fmt: skip
    else:
        with store:
            _watch(store, policy)
            report = store.health()
    if as_json:
        emit_json(report)
    else:
        click.echo(f"{report['status']}: {path}")
        for name, row in report["checks"].items():
            click.echo(f"  {_MARK[row['status']]} {name:<20} {row['message']}")
    code = _HEALTH_EXIT[report["status"]]
    if code:
        raise click.exceptions.Exit(code)


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--policy", type=click.Choice(["fixed", "seed", "default"]), default="default",
              show_default=True, help="The learner policy whose figures are exported.")
@json_option
def metrics(path: Path, policy: str, as_json: bool) -> None:
    """Print the store's Prometheus metrics once (--json: as a dict).

    Opens read-only: the figures a writer measures in its own process (latencies, lag) are
    served by that process (`xpstore serve --writable`, or `store.metrics()` in it).

    \b
    Example:
      xpstore metrics data/xp | grep xpstore_records
    """
    with Store.open(path, readonly=True) as store:
        _watch(store, policy)
        if store.count("fingerprint"):
            store.index_status()  # attach the index, so its figures are in the one print
        if as_json:
            emit_json(store.metrics())
        else:
            click.echo(store.parts.metrics.text().decode(), nl=False)


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help="File holding the bearer token that mutating endpoints require.")
@click.option("--writable", is_flag=True,
              help="Open the store for writing (takes the writer lock); default read-only.")
@click.option("--policy", type=click.Choice(["fixed", "seed", "default"]), default="default",
              show_default=True, help="The learner policy the /learning endpoints use.")
@click.option("--max-body", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Largest request body in bytes (larger: 413).")
@click.option("--tuning/--no-tuning", default=True, show_default=True,
              help="Attach self-tuning (/tuning/*, the resource monitor's memory check).")
def serve(path: Path, host: str, port: int, token_file: Path | None, writable: bool,
          policy: str, max_body: int, tuning: bool) -> None:  # fmt: skip
    """Serve health, metrics, similar tracks and learning over HTTP (until SIGTERM).

    Needs the serve extra (pip install 'xpstore[serve]'). Endpoints and errors:
    docs/service.md; the OpenAPI document is at /openapi.json.

    \b
    Example:
      xpstore serve data/xp --port 8080
      curl -s localhost:8080/similar/track-42?k=5
    """
    try:
        from xpstore.service.server import serve as run
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise XpStoreError(f"serve needs the serve extra: pip install 'xpstore[serve]' ({exc})"
                           ) from exc  # fmt: skip
    run(path, host=host, port=port, token_file=token_file, writable=writable, policy=policy,
        max_body_bytes=max_body, log_level="info", tuning=tuning)  # fmt: skip


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Directory to write the PNGs into (created if missing).")
@click.option("--policy", type=click.Choice(["fixed", "seed", "default"]), default="default",
              show_default=True, help="The learner policy whose figures are drawn.")
@json_option
def report(path: Path, out: Path, policy: str, as_json: bool) -> None:
    """Draw the operator's pictures (PNGs) into a directory.

    Learner reliability and accuracy, the index's recall per build, the sampler's priority
    distribution. Needs the plots extra (pip install 'xpstore[plots]'). Opens read-only.

    \b
    Example:
      xpstore report data/xp --out report/
    """
    from xpstore.service.report import write_report

    with Store.open(path, readonly=True) as store:
        written = write_report(store, out, policy=policy)
    if as_json:
        emit_json({"out": str(out), "files": {k: str(v) for k, v in written.items()}})
        return
    for name, file in written.items():
        click.echo(f"{name:<12} {file}")
