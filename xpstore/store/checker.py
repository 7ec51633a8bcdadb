"""Integrity checks of an open store (issue 3): ``Store.check``.

The checks themselves are :mod:`xpstore.ops.inspect`'s (they also run on a store that does not
open, for ``xpstore verify``); this only hands them the open store's handles.
"""

from __future__ import annotations

from xpstore.ops.inspect import CheckReport, Progress, check_store, writer_pid
from xpstore.store.engine import Engine

__all__ = ["Checker"]


class Checker:
    """``check()`` over one open store."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def check(self, progress: Progress | None = None) -> CheckReport:
        """See :meth:`xpstore.Store.check`."""
        engine = self._engine
        engine.check_open()
        # a writer open is the live writer itself; a read-only one may share the store with one
        live = not engine.readonly or writer_pid(engine.path) is not None
        return check_store(
            engine.path,
            tables=engine.tables,
            store_id=engine.store_id,
            writer_live=live,
            config=engine.config,
            progress=progress,
        )
