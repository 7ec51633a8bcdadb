"""Exit codes, and the one place where xpstore errors become them (DESIGN §9).

| exit | meaning |
|------|---------|
| 0    | done |
| 1    | a check found a problem: lost or corrupt data, a record or track that does not exist |
| 2    | usage or input error: bad arguments, bad JSON, a path that is not a store, a newer format |
| 3    | the store is busy: another process holds the writer lock (the message names its pid) |
| 4    | ``health`` only: the store is critical (a check, or it cannot be opened)  |
| 130  | interrupted by Ctrl-C (SIGINT); ``ingest`` says which line to resume from |

Every command runs inside :class:`XpGroup`, whose ``invoke`` maps the exceptions below, prints
``error: <message>`` on stderr and exits; expected errors never print a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

import click

from xpstore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    InvalidRecordError,
    RecordNotFoundError,
    StoreLockedError,
    StoreNotFoundError,
    XpStoreError,
)

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_CRITICAL = 4  # `health`: critical (0 healthy and 1 warning reuse 0 and 1)
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C

EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    # first match wins: the specific classes before the bases they share
    (StoreLockedError, EXIT_BUSY),
    (RecordNotFoundError, EXIT_PROBLEM),
    (InvalidRecordError, EXIT_USAGE),
    (InvalidArgumentError, EXIT_USAGE),
    (StoreNotFoundError, EXIT_USAGE),
    (FormatVersionError, EXIT_USAGE),
    (XpStoreError, EXIT_PROBLEM),  # corruption, WAL write failure, ...
    (OSError, EXIT_PROBLEM),  # the environment: permissions, a full disk
)


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code for an exception the CLI expects, or None (a bug: let it show)."""
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return None


class CliError(click.ClickException):
    """A usage or input error the CLI itself detects; printed like a mapped library error."""

    exit_code = EXIT_USAGE

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


class XpGroup(click.Group):
    """The command group; maps library errors to exit codes for every subcommand."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # `xpstore scan ... | head`: the reader left; stop quietly, like other filters
            try:  # keep the interpreter's final flush from failing again
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            except (OSError, ValueError):  # no real file descriptor (CliRunner)
                pass
            ctx.exit(EXIT_PROBLEM)
        except KeyboardInterrupt:
            # click would print "Aborted!" and exit 1; a shell expects 130 after Ctrl-C. Every
            # store the command opened was closed on the way out (close is bounded)
            click.echo("\nerror: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (XpStoreError, OSError) as exc:
            code = exit_code_for(exc)
            if code is None:  # pragma: no cover - the table ends with both bases
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(code)
