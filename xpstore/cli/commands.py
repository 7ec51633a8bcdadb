"""The ``xpstore`` commands: each opens a Store, calls one or two library methods, prints.

Reading commands (get, scan, stats) open the store for writing when its writer lock is free,
so that operations a crashed writer acknowledged but did not apply are replayed first and every
acknowledged record is visible; when a live writer holds the lock they fall back to a read-only
open (which sees what that writer has applied: up to ``apply.interval_ms`` after the
acknowledgement, 200 ms by default). ``--readonly``
forces the read-only open: no lock, no recovery, no file touched.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar

import click

from xpstore import Store, StoreLockedError, __version__
from xpstore.cli._errors import EXIT_INTERRUPTED, EXIT_PROBLEM, EXIT_USAGE, CliError, XpGroup
from xpstore.cli._input import (
    BadLine,
    TimestampType,
    parse_jsonl,
    parse_record,
    parse_where,
    record_error,
)
from xpstore.cli._output import dumps, emit_json, flatten, table
from xpstore.cli._progress import progress_bar
from xpstore.config import FLAT
from xpstore.demo.run import run_demo
from xpstore.errors import InvalidRecordError
from xpstore.model.progress import ProgressFn
from xpstore.model.records import KINDS
from xpstore.persistence.layout import MARKER

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
STORE_PATH = click.Path(path_type=Path)


def json_option(func: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of text."
    )(func)


def readonly_option(func: F) -> F:
    return click.option(
        "--readonly",
        is_flag=True,
        help="Open read-only even when no writer holds the lock (no recovery replay, no lock).",
    )(func)


@contextmanager
def open_for_reading(path: Path, readonly: bool, **session: Any) -> Iterator[Store]:
    """A writer open (replays acknowledged operations) when the lock is free, else read-only.

    ``session`` overrides the store's config for a writer open (e.g. no automatic index
    rebuild: a reading command must not start work it would then wait for at close).
    """
    if readonly:
        store = Store.open(path, readonly=True)
    else:
        try:
            store = Store.open(path, **session)
        except StoreLockedError as exc:
            log.info("%s; reading what its writer has applied", exc)
            store = Store.open(path, readonly=True)
    with store:
        yield store


# --------------------------------------------------------------------------------- group


@click.group(cls=XpGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="xpstore")
@click.option("-v", "--verbose", is_flag=True, help="Log what the store does (recovery, ...).")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """xpstore: a persistent experience store (WAL + LMDB) that loses nothing acknowledged.

    \b
    Every command takes the store path first. Exit codes:
      0 done
      1 a check found a problem (lost data, no such record)
      2 usage or input error (bad arguments, bad JSON, not a store, newer format)
      3 the store is busy (another process holds the writer lock)
      4 health: the store is critical (1: a warning)

    \b
    Example:
      xpstore demo
    """
    _log_to_stderr(ctx, logging.INFO if verbose else logging.WARNING)


def _log_to_stderr(ctx: click.Context, level: int) -> None:
    """Show the library's log on stderr for this invocation only (tests invoke main repeatedly)."""
    logger = logging.getLogger("xpstore")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    ctx.call_on_close(restore)


# --------------------------------------------------------------------------------- init


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option(
    "--durability",
    type=click.Choice(["commit", "group", "none"]),
    default=None,
    help="commit (default): fsync before every acknowledgement; group: fsync every few ms "
    "(an OS crash may lose that window); none: never fsync (scratch stores).",
)
@click.option(
    "--segment-max-bytes",
    type=click.IntRange(min=64 * 1024, max=4096 * 1024 * 1024),  # WalSettings' bounds
    default=None,
    help="Rotate WAL segments at this size (default 64 MiB, at least 64 KiB, at most 4 GiB).",
)
@json_option
def init(path: Path, durability: str | None, segment_max_bytes: int | None, as_json: bool) -> None:
    """Create a new, empty store at PATH (a new or empty directory).

    The settings are persisted in the store and used by every later open.
    Exit 2 if PATH already is a store or a non-empty directory.

    \b
    Example:
      xpstore init data/xp --durability group
    """
    if (path / MARKER).exists():
        raise CliError(f"{path} already is an xpstore store")
    overrides: dict[str, Any] = {}
    if segment_max_bytes is not None:
        overrides["segment_max_bytes"] = segment_max_bytes
    with Store.open(path, create=True, durability=durability, **overrides) as store:
        settings = store.config.model_dump(mode="json")
        config = {name: settings[d.split(".")[0]][d.split(".")[1]] for name, d in FLAT.items()}
    if as_json:  # "config" by the flat names scripts already read; "settings" by section
        emit_json({"path": str(path), "config": config, "settings": settings})
    else:
        click.echo(
            f"created store {path} (durability={config['durability']}, "
            f"segment_max_bytes={config['segment_max_bytes']:,})"
        )


# --------------------------------------------------------------------------------- put


@main.command()
@click.argument("path", type=STORE_PATH)
@click.argument("record_json", metavar="JSON")
@json_option
def put(path: Path, record_json: str, as_json: bool) -> None:
    """Write one record given as JSON; print its id.

    JSON is an object with a "kind" key (prediction, fingerprint or query_metric) and the
    record's fields, as `scan` prints it. "-" reads it from stdin. "ts" defaults to now.

    \b
    Example:
      xpstore put data/xp '{"kind": "prediction", "predicted": "punchy",
        "actual": "warm", "confidence": 0.8, "context": "warm_start"}'
    """
    text = sys.stdin.read() if record_json == "-" else record_json
    record = parse_record(text)
    with Store.open(path) as store:
        try:
            store.check_record(record)  # the store's limits, named like the model's checks
        except InvalidRecordError as exc:
            raise record_error("JSON", exc) from exc
        rid = store.put(record)
    if as_json:
        emit_json({"id": rid}, indent=None)
    else:
        click.echo(rid)


# --------------------------------------------------------------------------------- ingest

class _Process:
    """Whether the commands run as the ``xpstore`` process (:func:`run`), not in-process."""

    entry = False


_PROCESS = _Process()


def run() -> None:
    """The ``xpstore`` command's process entry point (the console script, ``python -m
    xpstore.cli``): :data:`main` with the knowledge that the process ends with the command."""
    _PROCESS.entry = True
    main(prog_name="xpstore")


class _Interrupt:
    """Ctrl-C during ``ingest``: until :meth:`defer` it interrupts at once (KeyboardInterrupt:
    an interrupted open is safe, recovery is idempotent); after it, a flag that the command
    checks at every line it validates and between the batches it writes, so that it stops
    with every acknowledged batch known and can say where to resume. Only the main thread can
    install a handler; elsewhere (an embedding application) nothing changes."""

    def __init__(self) -> None:
        self.hit = False
        self._deferring = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            # in the ``xpstore`` process (:func:`run`) the command is over and the process
            # exits next: a late Ctrl-C must not turn a finished ingest into an interrupt in
            # the interpreter's teardown (exit -2, a traceback). Called in-process (tests,
            # an embedding application), the previous handler comes back
            late = signal.SIG_IGN if _PROCESS.entry else self._previous
            signal.signal(signal.SIGINT, late)

    def defer(self) -> None:
        self._deferring = True

    def _handle(self, signum: int, frame: object) -> None:
        if not self._deferring:
            raise KeyboardInterrupt
        if not self.hit:
            click.echo("\ninterrupted: stopping after the batch being written", err=True)
        self.hit = True


@main.command()
@click.argument("path", type=STORE_PATH)
@click.argument("file", type=click.File("r", encoding="utf-8"), metavar="FILE.jsonl")
@click.option(
    "--partial", is_flag=True, help="Write the valid lines even if some are bad (still exit 2)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Records per put_many (one WAL frame, one fsync each).",
)
@click.option(
    "--resume-from",
    type=click.IntRange(min=1),
    default=1,
    metavar="LINE",
    help="Skip the lines before LINE (what an interrupted ingest says to resume from).",
)
@json_option
def ingest(path: Path, file: IO[str], partial: bool, batch_size: int, resume_from: int,
           as_json: bool) -> None:
    """Write the records of a JSON Lines file.

    One record per line, as `scan` prints them ("-" reads stdin). The whole file is parsed
    and validated first, against the store's limits too (record size, embedding dimension).
    If any line is bad, nothing is written and every bad line is reported as
    FILE:LINE: field: message (exit 2). With --partial the valid lines are written, the bad
    ones reported, and the exit code is still 2 so that scripts notice. Blank lines are
    skipped. Ctrl-C stops after the batch being written (exit 130) and prints the line to
    resume from with --resume-from, so nothing is written twice.

    \b
    Example:
      xpstore scan old/xp > all.jsonl && xpstore ingest data/xp all.jsonl
    """
    name = "<stdin>" if file.name == "-" else str(file.name)
    # the handler stays deferred until the summary is out: a Ctrl-C just after the last batch
    # must not turn a finished ingest into "error: interrupted" with no line to resume from
    with _Interrupt() as interrupt:
        with Store.open(path) as store:
            interrupt.defer()
            most = store.config.records.max_batch_records
            if batch_size > most:
                raise click.BadParameter(
                    f"{batch_size:,} is over this store's {most:,} records per batch (its "
                    "records.max_batch_records setting)",
                    param_hint="--batch-size",
                )
            with progress_bar() as bar:
                parsed = parse_jsonl(
                    file, first_line=resume_from, check=store.check_record,
                    progress=_validating(bar, name, file),
                    stop=lambda: interrupt.hit,
                )
                if parsed.stopped:
                    raise _Stopped(f"interrupted while validating {name}; nothing written")
                for line in parsed.bad:
                    click.echo(line.format(name), err=True)
                if parsed.bad and not partial:
                    _ingest_summary(as_json, name, [], parsed.bad, written=False)
                    raise CliError(
                        f"{len(parsed.bad)} bad line{'s' if len(parsed.bad) != 1 else ''} in "
                        f"{name}; nothing written (--partial writes the valid lines)"
                    )
                ids, resume = _write_batches(store, parsed.good, batch_size, name, bar,
                                             lambda: interrupt.hit)  # fmt: skip
        _ingest_summary(as_json, name, ids, parsed.bad, written=True, resume=resume)
        if resume is not None:
            raise _Stopped(
                f"interrupted: lines from {resume} on were not written; to write the rest "
                f"without duplicates: xpstore ingest {path} {name} --resume-from {resume}"
            )
        if interrupt.hit:
            click.echo("interrupted after the last batch: every line was written", err=True)
    if parsed.bad:
        raise click.exceptions.Exit(EXIT_USAGE)


class _Stopped(CliError):
    """Ctrl-C took effect: exit 130 with what was done and how to go on."""

    exit_code = EXIT_INTERRUPTED


def _validating(bar: ProgressFn | None, name: str, file: IO[str]) -> Callable[[int], None] | None:
    """Progress over the file's characters (its size, when it is a regular file)."""
    if bar is None:
        return None
    try:
        total = os.fstat(file.fileno()).st_size
    except (OSError, ValueError, io.UnsupportedOperation):
        total = 0
    return lambda done: bar(f"validating {name}", done, total, "bytes")


def _write_batches(
    store: Store,
    good: list[tuple[int, Any]],
    size: int,
    name: str,
    bar: ProgressFn | None,
    stop: Callable[[], bool],
) -> tuple[list[int], int | None]:
    """Write ``good`` in batches; return the ids written and, if ``stop()`` ended it early, the
    first line not written (what ``--resume-from`` takes)."""
    ids: list[int] = []
    for start in range(0, len(good), size):
        chunk = good[start : start + size]
        if stop():
            return ids, chunk[0][0]
        try:
            ids += store.put_many([rec for _line, rec in chunk])
        except InvalidRecordError as exc:
            # store-dependent checks were done on every line; what still fails is the batch
            # as a whole (max_batch_records, max_frame_bytes) or a race with a settings change
            raise CliError(
                f"{name}:{chunk[0][0]}-{chunk[-1][0]}: batch refused: {exc}"
                f"{_written_before(ids)}; resume with --resume-from {chunk[0][0]}"
            ) from exc
        if bar is not None:
            bar(f"ingesting {name}", start + len(chunk), len(good), "records")
    return ids, None


def _written_before(ids: list[int]) -> str:
    if not ids:
        return "; nothing was written before it"
    return f"; {len(ids)} records before it were written (ids {ids[0]}..{ids[-1]})"


def _ingest_summary(
    as_json: bool, name: str, ids: list[int], bad: list[BadLine], *, written: bool,
    resume: int | None = None,
) -> None:
    if as_json:
        data: dict[str, Any] = {
            "file": name,
            "written": len(ids),
            "first_id": ids[0] if ids else None,
            "last_id": ids[-1] if ids else None,
            "bad_lines": [b.as_dict() for b in bad],
        }
        if resume is not None:  # Ctrl-C: where to go on from
            data["resume_from"] = resume
        emit_json(data)
    elif written:
        span = f" (ids {ids[0]}..{ids[-1]})" if ids else ""
        skipped = f"; skipped {len(bad)} bad lines" if bad else ""
        click.echo(f"wrote {len(ids)} records from {name}{span}{skipped}")


# --------------------------------------------------------------------------------- get


@main.command()
@click.argument("path", type=STORE_PATH)
@click.argument("record_id", metavar="ID", type=click.IntRange(min=0, max=2**64 - 1))
@readonly_option
@click.option("--json", "as_json", is_flag=True,
              help="One compact JSON object on one line (the default is indented JSON).")
def get(path: Path, record_id: int, readonly: bool, as_json: bool) -> None:
    """Print the envelope of record ID as JSON.

    Exit 1 if there is no such record. The envelope holds id, kind, ts, updated_lsn, the
    value-tracking counts and the record. If no writer holds the lock, the store is opened
    for writing so that a crashed writer's acknowledged operations are replayed first;
    otherwise (or with --readonly) it is read as that writer has applied it.

    \b
    Example:
      xpstore get data/xp 42 --json | jq .record
    """
    with open_for_reading(path, readonly) as store:
        env = store.get(record_id)
        emit_json(env.envelope_json(), indent=None if as_json else 2)


# --------------------------------------------------------------------------------- scan


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--kind", type=click.Choice(list(KINDS)), default=None, help="Only this kind.")
@click.option("--since", type=TimestampType(), default=None,
              help="ts >= this (epoch seconds or ISO 8601; UTC unless it has an offset).")
@click.option("--until", type=TimestampType(), default=None, help="ts < this.")
@click.option(
    "--where",
    "wheres",
    multiple=True,
    metavar="PATH[__OP]=VALUE",
    help="Filter on a field; OP is gt gte lt lte ne in (default: equal). VALUE is JSON when "
    "it parses (0.6, true, null, [\"a\",\"b\"] for __in), else a string. Repeat to AND.",
)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="At most N records.")
@click.option("--envelope", is_flag=True, help="Print envelopes (as `get` does), one per line.")
@readonly_option
@click.option("--json", "as_json", is_flag=True,
              help="JSON lines (what scan always prints; accepted like every command's --json).")
def scan(path: Path, kind: str | None, since: float | None, until: float | None,
         wheres: tuple[str, ...], limit: int | None, envelope: bool, readonly: bool,
         as_json: bool) -> None:
    """Print records as JSON lines, which `ingest` reads back.

    Records come in (ts, id) order; --since is inclusive, --until exclusive. Output is always
    JSON, one object per line (--json changes nothing). The store is opened as for `get`.

    \b
    Example:
      xpstore scan data/xp --kind prediction --where context=warm_start \\
        --where 'audio_features.energy__gt=0.6' --limit 10
    """
    where = parse_where(wheres)
    with open_for_reading(path, readonly) as store:
        for exp in store.scan(kind, since=since, until=until, where=where or None, limit=limit):
            click.echo(dumps(exp.envelope_json() if envelope else exp.to_json()))


# --------------------------------------------------------------------------------- stats


@main.command()
@click.argument("path", type=STORE_PATH)
@readonly_option
@json_option
def stats(path: Path, readonly: bool, as_json: bool) -> None:
    """Show record counts, LSNs, WAL and LMDB sizes.

    Also the durability setting; when this open replayed a crashed writer's log, "recovery"
    says what it did. The store is opened as for `get`.

    \b
    Example:
      xpstore stats data/xp --json
    """
    with open_for_reading(path, readonly) as store:
        data = store.stats()
        report = store.recovery_report
        if report is not None and (report.replayed_ops or report.truncated or report.warnings):
            data["recovery"] = report.as_dict()
    if as_json:
        emit_json(data)
    else:
        click.echo(table(flatten(data)))


# --------------------------------------------------------------------------------- demo


@main.command()
@click.argument("path", type=STORE_PATH, required=False)
@click.option("--records", type=click.IntRange(min=0), default=3000, show_default=True,
              help="Synthetic records to write before the crash test.")
@click.option("--tracks", type=int, default=3000, show_default=True,
              help="Generated tracks of the similar-track library (0 skips that phase).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--crash-after", type=click.IntRange(min=1), default=400, show_default=True,
              help="Kill the child writer once it has acknowledged this many records.")
@click.option("--hold-applier", is_flag=True,
              help="The child keeps everything in its WAL, so recovery replays all of it.")
@click.option("--keep", is_flag=True, help="Keep the temporary store (when PATH is not given).")
@json_option
def demo(path: Path | None, records: int, tracks: int, seed: int, crash_after: int,
         hold_applier: bool, keep: bool, as_json: bool) -> None:
    """Write and query records, crash a writer, prove nothing was lost.

    \b
    1. Writes RECORDS synthetic predictions, fingerprints and query metrics
       (batched and single puts), resolves outcomes, deletes a track, and
       shows counts, a record and a where= scan.
    2. Writes a library of TRACKS generated tracks in named styles, builds
       the k-NN index and shows similar-track lookups a person can judge.
    3. Starts `python -m xpstore.demo.crashwriter` (4 threads), kills it with
       SIGKILL mid-stream, reopens the store (WAL recovery) and checks that
       every acknowledged record is present and bit-for-bit equal.

    PATH must be new or empty; without it a temporary directory is used and removed afterwards
    (unless --keep). Exit 1 if any acknowledged record was lost.

    \b
    Example:
      xpstore demo --records 5000 --seed 7
    """
    if tracks < 0 or 0 < tracks < 100:
        raise click.BadParameter("use 0 (skip) or at least 100 tracks", param_hint="--tracks")
    temp: Path | None = None
    if path is None:
        temp = Path(tempfile.mkdtemp(prefix="xpstore-demo-"))
        path = temp / "store"
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CliError(f"{path} is not empty; the demo needs a new or empty directory")
    echo: Callable[[str], None] = (lambda _line: None) if as_json else click.echo
    try:
        result = run_demo(path, seed=seed, records=records, tracks=tracks,
                          crash_after=crash_after, hold_applier=hold_applier, echo=echo)
    finally:
        if temp is not None and not keep:
            shutil.rmtree(temp, ignore_errors=True)
    if as_json:
        data = result.as_dict()
        data["kept"] = temp is None or keep
        emit_json(data)
    elif temp is not None and keep:
        click.echo(f"store kept at {path}")
    if not result.ok:
        raise click.exceptions.Exit(EXIT_PROBLEM)
