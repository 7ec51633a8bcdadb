"""Parsing what the user types or feeds: JSON records, JSONL files, ``--where`` and timestamps.

Everything here validates before anything is written, and reports where input is bad the way an
editor can jump to it: ``FILE:LINE: field: message``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from xpstore.cli._errors import CliError
from xpstore.errors import InvalidRecordError
from xpstore.model.records import Record, record_from_json


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys (the last one would silently win)."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def parse_record(text: str, what: str = "JSON") -> Record:
    """One record from JSON text; CliError (exit 2) naming the bad field."""
    try:
        obj = loads(text)
    except ValueError as exc:  # JSONDecodeError is a ValueError, so is a duplicate key
        raise CliError(f"{what}: bad JSON: {exc}") from exc
    try:
        return record_from_json(obj)
    except InvalidRecordError as exc:
        raise CliError(f"{what}: {_field_message(exc)}") from exc


def record_error(what: str, exc: InvalidRecordError) -> CliError:
    """A CliError (exit 2) ``what: field: message`` for a record the store refused."""
    return CliError(f"{what}: {_field_message(exc)}")


def _field_message(exc: InvalidRecordError) -> str:
    """``field: message``; library messages mostly start with the field already."""
    text = str(exc)
    field = exc.field or "record"
    return text if text.startswith(f"{field}:") else f"{field}: {text}"


@dataclass(frozen=True, slots=True)
class BadLine:
    """An input line that did not parse or validate."""

    line: int
    field: str
    message: str

    def format(self, name: str) -> str:
        return f"{name}:{self.line}: {self.field}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "message": self.message}


@dataclass(slots=True)
class Parsed:
    """What :func:`parse_jsonl` found: the good records with their line numbers, the bad
    lines, and whether ``stop`` cut the pass short (then nothing is to be written)."""

    good: list[tuple[int, Record]]
    bad: list[BadLine]
    stopped: bool = False


def parse_jsonl(
    lines: Iterable[str],
    *,
    first_line: int = 1,
    check: Callable[[Record], None] | None = None,
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Parsed:
    """Validate every line; return the good records with their line numbers, and the bad lines.

    Blank lines are skipped, and lines before ``first_line`` (a resumed ingest). Nothing stops
    at the first error: every bad line is reported. ``check(record)`` adds the checks that
    depend on the store (``Store.check_record``: size limit, embedding dimension), so a file is
    refused whole before anything is written. ``progress(chars)`` follows the reading;
    ``stop()`` is asked at every line (Ctrl-C).
    """
    out = Parsed([], [])
    done = 0
    for number, line in enumerate(lines, start=1):
        done += len(line)
        if progress is not None and not number % 256:
            progress(done)
        if stop is not None and stop():
            out.stopped = True
            break
        if number < first_line or not line.strip():
            continue
        text = line.rstrip("\r\n")
        try:
            obj = loads(text)
        except ValueError as exc:
            out.bad.append(BadLine(number, "json", _json_message(exc)))
            continue
        try:
            record = record_from_json(obj)
            if check is not None:
                check(record)
        except InvalidRecordError as exc:
            field = exc.field or "record"
            msg = str(exc)
            message = msg[len(field) + 2 :] if msg.startswith(f"{field}: ") else msg
            out.bad.append(BadLine(number, field, message))
            continue
        out.good.append((number, record))
    if progress is not None:
        progress(done)
    return out


def _json_message(exc: ValueError) -> str:
    """A JSON error without json's own "line 1 column 5 (char 4)", which counts lines inside
    the one JSON text and so disagreed with the file's line number: the column only."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at column {exc.pos + 1}"
    return str(exc)


def parse_where(items: Iterable[str]) -> dict[str, Any]:
    """``('path__op=value', ...)`` to a where= mapping; values are JSON when they parse."""
    where: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise click.BadParameter(
                f"{item!r}: expected PATH[__OP]=VALUE, e.g. 'audio_features.energy__gt=0.6'",
                param_hint="--where",
            )
        if key in where:
            raise click.BadParameter(f"{key!r} given twice", param_hint="--where")
        where[key] = _where_value(raw)
    return where


def _where_value(raw: str) -> Any:
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except ValueError:
        return raw  # not JSON: a plain string such as warm_start


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a value a record can hold")


if TYPE_CHECKING:
    _FloatParam = click.ParamType[float]
else:  # click < 8.4's ParamType is not generic; the pyproject allows click 8.1
    _FloatParam = click.ParamType


class TimestampType(_FloatParam):
    """Seconds since the epoch, or an ISO 8601 date/time (UTC unless it names an offset)."""

    name = "TS"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                self.fail(
                    f"{value!r} is neither seconds since the epoch nor an ISO 8601 date/time",
                    param,
                    ctx,
                )
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite time", param, ctx)
        return seconds
