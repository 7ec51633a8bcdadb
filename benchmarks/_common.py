"""What the benchmark scripts share (each script runs alone: ``python benchmarks/x.py`` puts
this folder on ``sys.path``)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_busy(*, children: bool = True) -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, and of its children
    unless ``children`` is False) so far: the share other processes took is the difference."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    t = os.times()
    own = t.user + t.system + (t.children_user + t.children_system if children else 0.0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own
