"""Progress bars on stderr for the long commands (recover, replay, snapshot, compact, ...).

A bar is drawn only when stderr is a terminal (a log file or a pipe gets nothing), or when
``XPSTORE_PROGRESS=1`` forces it (tests; ``XPSTORE_PROGRESS=0`` turns it off). The library
reports through :data:`xpstore.model.progress.ProgressFn` (``phase, done, total, unit``); one
line per phase, redrawn in place at most every 0.1 s, with the rate and the time left::

    replaying WAL  12.0/48.0 MiB  25%  6.1 MiB/s  0:06 left
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from xpstore.model.progress import ProgressFn

_ENV = "XPSTORE_PROGRESS"
_EVERY = 0.1  # seconds between redraws


def enabled(stream: IO[str]) -> bool:
    """Whether to draw on ``stream``: a terminal, unless ``XPSTORE_PROGRESS`` says otherwise."""
    forced = os.environ.get(_ENV)
    if forced is not None and forced.strip() in ("0", "1"):
        return forced.strip() == "1"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Bar:
    """A :data:`ProgressFn` that draws one line per phase on ``stream``."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._phase: str | None = None
        self._start = 0.0
        self._drawn = 0.0
        self._last = ""

    def __call__(self, phase: str, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        if phase != self._phase:
            self.finish()
            self._phase, self._start, self._drawn = phase, now, 0.0
        elif now - self._drawn < _EVERY and (total <= 0 or done < total):
            return
        self._drawn = now
        self._last = render(phase, done, total, unit, now - self._start)
        self._stream.write("\r" + self._last + "\x1b[K")
        self._stream.flush()

    def finish(self) -> None:
        """End the current line (the last figures stay on screen)."""
        if self._last:
            self._stream.write("\n")
            self._stream.flush()
        self._phase, self._last = None, ""


def render(phase: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``phase  done/total  pct  rate  time left`` (without a total: done and rate only)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [phase]
    if total > 0:
        parts.append(f"{_amount(done, unit)}/{_amount(total, unit, with_unit=True)}")
        parts.append(f"{min(100.0, 100.0 * done / total):3.0f}%")
    else:
        parts.append(_amount(done, unit, with_unit=True))
    parts.append(f"{_amount(int(rate), unit, with_unit=True)}/s")
    if total > 0:
        left = (total - done) / rate if rate > 0 else None
        parts.append(f"{_clock(left)} left" if left is not None else "--:-- left")
    return "  ".join(parts)


def _amount(n: int, unit: str, *, with_unit: bool = False) -> str:
    if unit == "bytes":
        text = f"{n / 1048576:.1f}"
        return f"{text} MiB" if with_unit else text
    return f"{n:,} {unit}" if with_unit else f"{n:,}"


def _clock(seconds: float) -> str:
    s = max(0, round(seconds))
    hours, rest = divmod(s, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@contextmanager
def progress_bar(stream: IO[str] | None = None) -> Iterator[ProgressFn | None]:
    """A bar on stderr while the block runs (None when stderr is not a terminal)."""
    out = sys.stderr if stream is None else stream
    if not enabled(out):
        yield None
        return
    bar = Bar(out)
    try:
        yield bar
    finally:
        bar.finish()
