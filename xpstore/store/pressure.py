"""Memory pressure inside the store: the actions of degradation levels 0-3 (docs/tuning.md,
"Memory pressure"). The level is decided above the store (``xpstore.tuning.ResourceMonitor``
reads psutil); this component only acts, and every action is undone by a lower level:

=====  ===========================================================================
level  what the store does (cumulative)
=====  ===========================================================================
0      normal: the answer cache at ``index.answer_cache``, the full index, background work on
1      the answer cache shrinks to the budget it is given, cold entries evicted first (the hot
       set last)
2      the answer cache is dropped; the main index is served from an SQ8 copy of its vectors
       (``index.backends.QuantizedCopy``: 1 byte per dimension, no graph); ``similar(track_id)``
       is answered from the track's precomputed neighbour list where it has one
3      background work paused: no index rebuild starts, no automatic snapshot, compaction
       refused; resumed when the level falls
=====  ===========================================================================

Going back below 2 reloads the full index from its file (checksums verified) and swaps it in
with the same ids, so answers never stop. After memory was freed the C allocator is asked to
give it back to the system (``malloc_trim``), which is what makes the drop visible in the
process's RSS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import threading
from collections.abc import Iterable
from typing import Any

from xpstore.errors import InvalidArgumentError
from xpstore.store.engine import Engine
from xpstore.store.index_service import IndexService
from xpstore.store.reader import Reader

__all__ = ["LEVELS", "Pressure", "release_memory"]

log = logging.getLogger(__name__)

LEVELS = ("normal", "warning", "critical", "emergency")
PAUSED_TASKS = frozenset({"snapshot", "compaction"})
WARNING_CACHE_SHARE = 0.25
"""Level 1 without an explicit budget: a quarter of ``index.answer_cache``."""


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:  # not glibc: nothing to trim
        log.debug("malloc_trim unavailable")


class Pressure:
    """The degradation seam of one open store (see the module docstring)."""

    def __init__(self, engine: Engine, reader: Reader, index: IndexService) -> None:
        self._engine = engine
        self._reader = reader
        self._index = index
        self._lock = threading.RLock()
        self.level = 0
        self.cache_entries: int | None = None
        """The answer-cache budget of level 1 (entries; None: ``WARNING_CACHE_SHARE``)."""
        self.hot: frozenset[int] = frozenset()
        self.quantized = False
        index.on_rebuilt.append(self._after_rebuild)

    def set_level(
        self, level: int, *, cache_entries: int | None = None, hot_tracks: Iterable[str] = ()
    ) -> dict[str, Any]:
        """Take the actions of ``level`` (0-3) and undo those of the levels above it;
        idempotent (a monitor calls it at every reading). ``hot_tracks`` are evicted last."""
        if isinstance(level, bool) or level not in range(len(LEVELS)):
            raise InvalidArgumentError(f"level must be 0-3, got {level!r}", field="level")
        with self._lock:
            before = self.level
            self.level = level
            self.cache_entries = cache_entries
            hot = [self._reader.read_track(str(t)) for t in hot_tracks]
            self.hot = frozenset(r for r in hot if r is not None)
            done = self._apply()
        if level != before:
            log.warning("memory pressure: level %d (%s) -> %d (%s): %s", before,
                        LEVELS[before], level, LEVELS[level], done)  # fmt: skip
        return done

    def status(self) -> dict[str, Any]:
        server = self._server()
        return {
            "level": self.level,
            "name": LEVELS[self.level],
            "answer_cache": None if server is None else len(server.answers),
            "answer_cache_max": None if server is None else server.answers_max,
            "quantized": self.quantized,
            "lists_first": self._index.lists_first,
            "paused": sorted(self._paused()),
        }

    # ------------------------------------------------------------------ actions
    def _apply(self) -> dict[str, Any]:
        level = self.level
        done: dict[str, Any] = {"level": level}
        server = self._server()
        freed = False
        if server is not None:
            configured = self._engine.config.index.answer_cache
            if level == 0:
                target = configured
            elif level == 1:
                budget = self.cache_entries
                if budget is None:
                    budget = int(configured * WARNING_CACHE_SHARE)
                target = min(configured, budget)
            else:
                target = 0
            server.answers_max = target
            evicted = server.shrink_answers(target, self.hot)
            done["answers_evicted"] = evicted
            freed |= evicted > 0
            if level >= 2 and not self.quantized:
                freed |= self._quantize()
            elif level < 2 and self.quantized:
                freed |= self._restore()
            done["quantized"] = self.quantized
        self._index.lists_first = level >= 2
        paused = level >= 3
        applier = self._engine.applier
        if applier is not None:
            applier.paused_tasks = PAUSED_TASKS if paused else frozenset()
        mgr = self._index.manager
        if mgr is not None and mgr.rebuilds_paused != paused:
            mgr.rebuilds_paused = paused
            if mgr.rebuilder is not None:
                mgr.rebuilder.wake()
        done["paused"] = sorted(self._paused())
        if freed:
            release_memory()
        return done

    def _quantize(self) -> bool:
        """Serve the main index from an SQ8 copy; drop the full one."""
        from xpstore.index.backends import QuantizedCopy

        server = self._server()
        if server is None:
            return False
        backend = server.main.backend
        if backend is None or isinstance(backend, QuantizedCopy):
            self.quantized = backend is not None
            return False
        if backend.kind == "ivf":  # its lists are the vectors already; nothing to gain
            return False
        copy = QuantizedCopy.of(backend)
        old = server.replace_backend(copy)
        self.quantized = True
        del old, backend  # the full index is freed here, outside the server lock
        return True

    def _restore(self) -> bool:
        """Reload the full index from its file and serve it again."""
        from xpstore.index.backends import QuantizedCopy
        from xpstore.index.index_file import load
        from xpstore.index.manager import MAIN_FILE

        server = self._server()
        mgr = self._index.manager
        if server is None or mgr is None:
            return False
        current = server.main
        if not isinstance(current.backend, QuantizedCopy):
            self.quantized = False
            return False
        path = mgr.dir / MAIN_FILE
        backend, meta = load(path)  # checksums verified before FAISS reads a byte
        build = meta.build or {}
        if current.build is None or build.get("build_id") != current.build.build_id:
            log.warning("index file %s is not build %s; serving the copy until the next "
                        "rebuild", path, current.build and current.build.build_id)  # fmt: skip
            return False
        server.replace_backend(backend)
        self.quantized = False
        return True

    def _after_rebuild(self, _info: object) -> None:
        """A rebuild swapped in a full index: quantize it again while the level asks for it."""
        with self._lock:
            if self.level >= 2:
                self.quantized = False
                if self._quantize():
                    release_memory()

    def _server(self) -> Any:
        mgr = self._index.manager
        return None if mgr is None else mgr.server

    def _paused(self) -> frozenset[str]:
        applier = self._engine.applier
        names = set(applier.paused_tasks) if applier is not None else set()
        mgr = self._index.manager
        if (mgr is not None and mgr.rebuilds_paused) or self.level >= 3:
            names.add("rebuild")
        return frozenset(names)
