"""Small helpers shared by the tests that check "nothing on disk changed"."""

from __future__ import annotations

from pathlib import Path

# lock files a reader or a refused open may legitimately touch
_VOLATILE = {"LOCK", "lock.mdb"}


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
