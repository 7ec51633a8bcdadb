"""Small helpers shared by the tests: "nothing on disk changed", and typed views of a record."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from xpstore.model.records import Experience, Fingerprint, PredictionOutcome, QueryMetric

# lock files a reader or a refused open may legitimately touch
_VOLATILE = {"LOCK", "lock.mdb"}

RecordT = TypeVar("RecordT", PredictionOutcome, Fingerprint, QueryMetric)


def files_of(root: Path) -> dict[str, bytes]:
    """Every file's bytes under ``root`` (relative names), lock files aside."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in _VOLATILE
    }


def segments(root: Path) -> list[Path]:
    """The store's WAL segments, oldest first."""
    return sorted((root / "wal").glob("*.wal"))


def record_as(exp: Experience, kind: type[RecordT]) -> RecordT:
    """``exp.record``, which the test knows to be a ``kind``, narrowed for the type checker."""
    record = exp.record
    assert isinstance(record, kind), f"record {exp.id} is a {type(record).__name__}"
    return record
