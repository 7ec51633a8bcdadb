"""Read-only operator commands (issue 3): ``wal inspect``, ``verify``, ``replay``.

None of them takes the writer lock or writes a byte: they read WAL files and open LMDB
read-only, so they work on a store that does not open and beside a live writer. The logic is in
:mod:`xpstore.ops.inspect` and :mod:`xpstore.ops.replay`; this module parses
arguments and renders.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import click

from xpstore.cli._errors import EXIT_PROBLEM, CliError
from xpstore.cli._input import TimestampType
from xpstore.cli._output import dumps, emit_json
from xpstore.cli._progress import progress_bar
from xpstore.cli.commands import STORE_PATH, json_option, main
from xpstore.model.progress import ProgressFn
from xpstore.model.records import (
    BATCH_FIELDS,
    KINDS,
    MODEL_BY_KIND,
    STREAMING_FIELDS,
)
from xpstore.ops.inspect import (
    CheckReport,
    SegmentReport,
    check_store,
    inspect_wal,
    verify_store,
    writer_pid,
)
from xpstore.ops.replay import Gap, ReplayItem, ReplayStream, replay
from xpstore.persistence.layout import Layout, read_marker
from xpstore.persistence.wal_format import SEGMENT_NAME_RE
from xpstore.store.health import record_verify

log = logging.getLogger(__name__)

_WRITE_CHUNK = 1000  # output lines per write() call


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ================================================================================ wal inspect


@main.group()
def wal() -> None:
    """Look at the write-ahead log (read-only).

    \b
    Example:
      xpstore wal inspect data/xp --frames
    """


@wal.command("inspect")
@click.argument("path", type=STORE_PATH)
@click.option("--frames", is_flag=True, help="List every valid frame of every segment.")
@json_option
def wal_inspect(path: Path, frames: bool, as_json: bool) -> None:
    """Show every WAL segment: LSN range, size, frames, commit times, first bad frame.

    PATH is a store (its wal/ directory is read) or a directory of WAL segments. Also lists
    the .broken copies recovery kept and leftover .tmp files. Nothing is modified. Exit 1 if a
    segment has a bad frame or header, belongs to another store, or breaks LSN continuity (a
    bad tail of the newest segment while a live writer holds the lock is the frame being
    written, and is not counted).

    \b
    Example:
      xpstore wal inspect data/xp --frames
    """
    wal_dir, store_id, live = _wal_target(path)
    reports = inspect_wal(wal_dir, store_id=store_id, with_frames=frames)
    segments = [r for r in reports if r.role == "segment"]
    in_flight = _in_flight_tail(segments, live)
    bad = [r for r in segments if not r.ok and r is not in_flight]
    if as_json:
        emit_json({
            "wal_dir": str(wal_dir),
            "writer_live": live,
            "segments": [r.as_dict() for r in reports],
            "problems": len(bad),
        })
    else:
        for rep in reports:
            click.echo(_segment_text(rep, in_flight=rep is in_flight))
        click.echo(_wal_summary(wal_dir, reports, len(bad)))
    if bad:
        raise click.exceptions.Exit(EXIT_PROBLEM)


def _wal_target(path: Path) -> tuple[Path, int | None, bool]:
    """(wal directory, store id or None, whether a live writer holds the store's lock)."""
    lay = Layout(path)
    if lay.marker.exists() or not path.is_dir():
        marker = read_marker(lay)  # StoreNotFoundError / FormatVersionError: exit 2
        return lay.wal, marker.store_id, writer_pid(path) is not None
    names = [p.name for p in path.iterdir()]
    if any(SEGMENT_NAME_RE.match(n) or n.endswith(".broken") for n in names):
        return path, None, False
    read_marker(lay)  # raises: neither a store nor a WAL directory
    raise CliError(f"{path} is neither a store nor a WAL directory")  # pragma: no cover


def _in_flight_tail(segments: list[SegmentReport], live: bool) -> SegmentReport | None:
    """The newest segment, if a live writer is appending to it and only its tail is bad."""
    if not live or not segments:
        return None
    last = segments[-1]
    if last.bad_reason is not None and last.resumes_at is None and not last.problems:
        return last
    return None


def _segment_text(rep: SegmentReport, *, in_flight: bool) -> str:
    lsns = (
        f"LSN {rep.first_lsn}..{rep.last_lsn}" if rep.last_lsn is not None
        else f"LSN {rep.first_lsn} (no frames)"
    )
    status = "OK" if rep.ok else ("WRITING" if in_flight else "BAD")
    label = "" if rep.role == "segment" else f" [{rep.role}]"
    lines = [
        f"{rep.name}{label}  {lsns}  frames {rep.frames:,}  bytes {rep.size:,}  "
        f"commits {_when(rep.first_commit)} .. {_when(rep.last_commit)}  {status}"
    ]
    for f in rep.frame_list or []:
        lines.append(
            f"    +{f.offset:<10} LSN {f.first_lsn}..{f.last_lsn}  count {f.count}  "
            f"size {f.size}  {_when(f.commit_time)}"
        )
    if rep.bad_reason is not None:
        where = "bad header" if rep.bad_offset == 0 else f"bad frame at +{rep.bad_offset}"
        resume = (
            f"; valid frames resume at +{rep.resumes_at}" if rep.resumes_at is not None
            else "; nothing valid after it"
        )
        note = " (the frame the live writer is writing)" if in_flight else ""
        lines.append(f"    {where}: {rep.bad_reason}: {rep.bad_detail}{resume}{note}")
    lines.extend(f"    problem: {p}" for p in rep.problems)
    return "\n".join(lines)


def _wal_summary(wal_dir: Path, reports: list[SegmentReport], problems: int) -> str:
    segs = [r for r in reports if r.role == "segment"]
    frames = sum(r.frames for r in segs)
    broken = sum(1 for r in reports if r.role == "broken")
    firsts = [r.first_lsn for r in segs if r.first_lsn is not None]
    lasts = [r.last_lsn for r in segs if r.last_lsn is not None]
    span = f"LSN {min(firsts)}..{max(lasts)}" if firsts and lasts else "no operations"
    return (
        f"{wal_dir}: {len(segs)} segments, {frames:,} frames, {span}; "
        f"{broken} .broken copies; {problems} with problems"
    )


# ================================================================================ verify


class _Bar:
    """A click progress bar over records, drawn only on a terminal (as `ingest` does)."""

    def __init__(self) -> None:
        self._bar: Any = None

    def total(self, n: int) -> None:
        if sys.stderr.isatty() and n:
            self._bar = click.progressbar(length=n, label="verifying records", file=sys.stderr)
            self._bar.__enter__()

    def progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--in-process", is_flag=True, hidden=True,
              help="Run the checks in this process (the child of a normal run).")
@click.option("--record", is_flag=True,
              help="Leave the outcome in PATH/last_verify.json for `xpstore health`.")
@json_option
def verify(path: Path, in_process: bool, record: bool, as_json: bool) -> None:
    """Check a store's integrity without modifying it; exit 1 if anything is wrong.

    \b
    Checks: WAL checksums and LSN continuity (a torn tail is named as such);
    every LMDB record decodes and validates; the kind/time index, the track
    map and the tombstones agree with the records; per-kind counts; applied_lsn
    against the WAL; every snapshot's manifest and sha256 checksums.

    Read-only (LMDB is opened read-only, WAL files are only read), so it runs beside a live
    writer. With --record (the only change it can make) it leaves its outcome in
    PATH/last_verify.json for `xpstore health`. Each problem names its place: a WAL segment and
    byte offset, a table and key, or a snapshot file. The checks run in a child process, so
    that a damaged LMDB page, on which liblmdb aborts, is reported rather than fatal. A
    progress bar is drawn on a terminal.

    \b
    Example:
      xpstore verify data/xp --json
    """
    marker = read_marker(Layout(path))  # not a store / newer format: exit 2, before any child
    if in_process:
        bar = _Bar()
        try:
            report = verify_store(path, progress=bar.progress, total=bar.total)
        finally:
            bar.close()
    else:
        report = _verify_in_child(path, marker.store_id)
        if record:
            try:
                record_verify(path, report)
            except OSError as exc:  # a read-only file system: the verdict still stands
                log.warning("could not record the outcome for `xpstore health`: %s", exc)
    if as_json:
        emit_json(report.as_dict())
    else:
        click.echo(_verify_text(report))
    if not report.ok:
        raise click.exceptions.Exit(EXIT_PROBLEM)


def _verify_in_child(path: Path, store_id: int) -> CheckReport:
    """Run ``verify --in-process`` in a child; if it dies, report that LMDB is damaged."""
    cmd = [sys.executable, "-m", "xpstore.cli", "verify", str(path), "--json", "--in-process"]
    # stderr is inherited: the child's progress bar and liblmdb's own message reach the user
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=_child_env(), check=False)
    try:
        return CheckReport.from_dict(json.loads(proc.stdout))
    except (ValueError, KeyError, TypeError):
        pass
    how = (
        f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
        else f"exit status {proc.returncode}"
    )
    report = CheckReport(str(path))
    check_store(path, tables=None, store_id=store_id, writer_live=writer_pid(path) is not None,
                report=report)
    report.add(
        f"lmdb {Layout(path).data}",
        f"the checker died reading LMDB ({how}; liblmdb's message is above): its pages are "
        "damaged; restore the store from a snapshot (`xpstore snapshot restore`)",
    )
    return report


def _child_env() -> dict[str, str]:
    """Our environment, with this xpstore importable first (as the demo's child gets it)."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def _verify_text(report: CheckReport) -> str:
    st = report.stats
    wal_st = st.get("wal", {})
    summary = (
        f"{st.get('records', 0):,} records, {wal_st.get('frames', 0):,} WAL frames in "
        f"{wal_st.get('segments', 0)} segments, {st.get('snapshots', 0)} snapshots"
    )
    lines = []
    if report.ok:
        lines.append(f"{report.path}: OK ({summary})")
    else:
        n = len(report.problems)
        lines.append(f"{report.path}: {n} problem{'s' if n != 1 else ''} ({summary})")
        lines.extend(f"  PROBLEM {p}" for p in report.problems)
    lines.extend(f"  note: {n}" for n in report.notes)
    return "\n".join(lines)


# ================================================================================ replay


@main.command("replay")
@click.argument("path", type=STORE_PATH)
@click.option("--from-lsn", type=int, default=None, help="First LSN (inclusive).")
@click.option("--to-lsn", type=int, default=None, help="Last LSN (inclusive).")
@click.option("--kind", "kinds", multiple=True, type=click.Choice(list(KINDS)),
              help="Only operations on records of this kind (repeatable).")
@click.option("--since", type=TimestampType(), default=None,
              help="Record ts >= this (epoch seconds or ISO 8601).")
@click.option("--until", type=TimestampType(), default=None, help="Record ts < this.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl",
              show_default=True, help="jsonl: one operation per line; csv: one row per put.")
@click.option("--records", "records_only", is_flag=True,
              help="jsonl: print only the records of puts, as `xpstore ingest` reads them.")
@json_option
def replay_cmd(path: Path, from_lsn: int | None, to_lsn: int | None, kinds: tuple[str, ...],
               since: float | None, until: float | None, fmt: str, records_only: bool,
               as_json: bool) -> None:
    """Stream the store's operations in LSN order (read-only, salvages damaged stores).

    LSNs still in the WAL come as logged (put, update, delete, delete_track, with the
    frame's commit time, "source":"wal"). LSNs the WAL no longer holds (checkpointed away, or
    hidden by damage LMDB covers) come as puts of the live record's CURRENT state
    ("source":"lmdb": later updates folded in, deleted records absent). A damaged stretch
    of the WAL is skipped, the walk resumes at the next valid frame, and each gap is reported
    on stderr (--json: as JSON lines). Exit 1 if operations were lost (in no source), 2 for
    bad arguments.

    \b
    Example:
      xpstore replay data/xp --kind prediction --since 2026-11-01 --records > preds.jsonl
    """
    _check_range(from_lsn, to_lsn)
    if records_only and fmt != "jsonl":
        raise CliError("--records applies to --format jsonl only")

    def on_gap(gap: Gap) -> None:
        text = dumps({"gap": gap.as_dict()}) if as_json else f"replay: {gap.describe()}"
        click.echo(text, err=True)

    stream = replay(path, from_lsn=from_lsn, to_lsn=to_lsn, kinds=kinds or None,
                    since=since, until=until, on_gap=on_gap)
    with stream, progress_bar() as bar:
        out = sys.stdout
        items = _tracked(stream, bar, from_lsn or 0, to_lsn)
        if fmt == "csv":
            _write_csv(items, out, kinds or KINDS)
        else:
            _write_jsonl(items, out, records_only)
        out.flush()
    _replay_summary(stream, as_json)
    if stream.lost:
        raise click.exceptions.Exit(EXIT_PROBLEM)


def _check_range(from_lsn: int | None, to_lsn: int | None) -> None:
    for name, value in (("--from-lsn", from_lsn), ("--to-lsn", to_lsn)):
        if value is not None and value < 0:
            raise CliError(f"{name} {value} is out of range: LSNs are >= 0")
    if from_lsn is not None and to_lsn is not None and from_lsn > to_lsn:
        raise CliError(f"--from-lsn {from_lsn} is after --to-lsn {to_lsn}: the range is empty")


_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def _tracked(
    stream: ReplayStream, bar: ProgressFn | None, lo: int, hi: int | None
) -> Iterable[ReplayItem]:
    """The stream's items, feeding the progress bar with LSNs against the store's last LSN."""
    if bar is None:
        return stream
    end = hi if hi is not None else stream.last_lsn_hint()
    total = max(0, end - max(lo, 1) + 1)

    def items() -> Iterator[ReplayItem]:
        for item in stream:
            bar("replaying", min(total, max(0, item.lsn - max(lo, 1) + 1)), total, "LSNs")
            yield item

    return items()


def _write_jsonl(stream: Iterable[ReplayItem], out: TextIO, records_only: bool) -> None:
    lines: list[str] = []
    for item in stream:
        if records_only:
            if item.op != "put":
                continue
            lines.append(_encode(item.data))
        else:
            lines.append(_encode(item.to_json()))
        if len(lines) >= _WRITE_CHUNK:
            out.write("\n".join(lines) + "\n")
            lines.clear()
    if lines:
        out.write("\n".join(lines) + "\n")


def csv_columns(kinds: tuple[str, ...] | list[str]) -> list[str]:
    """The CSV header for puts of ``kinds``: envelope columns, then dotted record fields."""
    cols = ["lsn", "id", "kind", "ts", "commit_time", "source", "updated_lsn"]
    for kind in kinds:
        for name in MODEL_BY_KIND[kind].model_fields:
            if name == "batch" and kind == "fingerprint":
                cols.extend(f"batch.{f}" for f in BATCH_FIELDS)
            elif name == "streaming" and kind == "fingerprint":
                cols.extend(f"streaming.values.{f}" for f in STREAMING_FIELDS)
                cols.extend(f"streaming.confidence.{f}" for f in STREAMING_FIELDS)
                cols.append("streaming.chunk_count")
            else:
                cols.append(name)
    return list(dict.fromkeys(cols))  # ts and shared names (track_id) once


def csv_row(item: ReplayItem, columns: list[str]) -> list[str]:
    """One CSV row: nested batch/streaming values under dotted names, other maps and lists as
    JSON text, booleans as true/false, absent values empty."""
    flat: dict[str, Any] = {
        "lsn": item.lsn, "id": item.id, "kind": item.kind, "ts": item.ts,
        "commit_time": item.commit_time, "source": item.source, "updated_lsn": item.updated_lsn,
    }
    for key, value in (item.data or {}).items():
        if key in ("kind", "ts"):
            continue
        if key in ("batch", "streaming") and isinstance(value, dict):
            _flatten_into(flat, key, value)
        else:
            flat[key] = value
    return [_cell(flat.get(c)) for c in columns]


def _flatten_into(flat: dict[str, Any], prefix: str, value: dict[str, Any]) -> None:
    for key, sub in value.items():
        name = f"{prefix}.{key}"
        if isinstance(sub, dict):
            _flatten_into(flat, name, sub)
        else:
            flat[name] = sub


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return _encode(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(stream: Iterable[ReplayItem], out: TextIO, kinds: tuple[str, ...]) -> None:
    columns = csv_columns(kinds)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for item in stream:
        if item.op == "put":
            writer.writerow(csv_row(item, columns))


def _replay_summary(stream: ReplayStream, as_json: bool) -> None:
    st = stream.stats
    if as_json:
        click.echo(dumps({"summary": {**st.as_dict(), "gaps": len(stream.gaps),
                                      "lost": stream.lost}}), err=True)
        return
    lost = " (operations lost)" if stream.lost else ""
    click.echo(
        f"replay: {st.emitted:,} operations written; {st.wal_ops:,} read from the WAL "
        f"(LSN {st.wal_first_lsn}..{st.wal_end_lsn}), {st.lmdb_records:,} records from LMDB "
        f"(current state); {len(stream.gaps)} gaps{lost}",
        err=True,
    )
