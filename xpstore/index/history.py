"""The index's build history: one JSON line per finished build in ``<store>/index/builds.jsonl``
(build id, LSN, kind, size, duration, recall@10 probe), for ``xpstore report``'s recall-per-build
figure and for operators.

Diagnostic data, not state: nothing is decided from it, so it is appended without a sync and a
torn or garbled line (a crash mid-append) is skipped on reading. It keeps the last
:data:`KEEP` builds (rewritten atomically when it grows past twice that).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from xpstore.index.serving import BuildInfo
from xpstore.persistence import fs

__all__ = ["FILE", "KEEP", "append_build", "read_builds"]

log = logging.getLogger(__name__)

FILE = "builds.jsonl"
KEEP = 1000
_FIELDS = ("build_id", "lsn", "kind", "count", "built_at", "duration_s", "recall_at_10")


def append_build(index_dir: Path, info: BuildInfo, reason: str | None = None) -> None:
    """Append one build's line (errors are logged: the history must never fail a build)."""
    doc: dict[str, Any] = {k: getattr(info, k) for k in _FIELDS}
    doc["reason"] = reason
    path = index_dir / FILE
    try:
        fd = fs.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            fs.write_all(fd, (json.dumps(doc) + "\n").encode())
        finally:
            fs.close(fd)
        if path.stat().st_size > 2 * KEEP * 200:  # lines are ~150-200 bytes
            builds = read_builds(index_dir)
            if len(builds) > KEEP:
                text = "".join(json.dumps(b) + "\n" for b in builds[-KEEP:])
                fs.atomic_write(path, text.encode())
    except OSError:
        log.warning("could not record build %d in %s", info.build_id, path, exc_info=True)


def read_builds(index_dir: Path) -> list[dict[str, Any]]:
    """The recorded builds, oldest first; unreadable lines are skipped."""
    try:
        text = (index_dir / FILE).read_text(errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("build_id"), int):
            out.append(doc)
    return out
