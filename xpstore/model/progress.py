"""Progress of long operator operations (recovery replay, salvage, snapshot copies, restores,
compaction), reported through one callback type so that the CLI can draw a bar over any of them.

The library never draws anything itself: it calls ``progress(phase, done, total, unit)`` now and
then (``phase`` a short label such as ``"replaying WAL"``; ``done`` and ``total`` counted in
``unit``: ``"bytes"``, or what is counted, such as ``"LSNs"`` or ``"records"``; ``total`` is 0
when unknown). Callers pass None for no reporting.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressFn"]

ProgressFn = Callable[[str, int, int, str], None]
"""``progress(phase, done, total, unit)``: called from the thread doing the work (or, for a copy
made in C, a thread watching its output file); must be cheap: the CLI's bar redraws at most ten
times a second and returns at once otherwise."""
