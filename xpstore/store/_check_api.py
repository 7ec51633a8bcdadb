"""Store methods for integrity checks (issue 3): check.

A mixin of :class:`~xpstore.store.store.Store`, kept in its own module so the facade stays small.
The checks themselves are :mod:`xpstore.ops.inspect`'s (they also run on a store that
does not open, for ``xpstore verify``); this only hands them the open store's handles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from xpstore.errors import StoreClosedError
from xpstore.ops.inspect import CheckReport, Progress, check_store, writer_pid

if TYPE_CHECKING:
    from xpstore.store.store import Store


class CheckAPI:
    """Mixed into Store; see the module docstring."""

    def check(self, *, progress: Progress | None = None) -> CheckReport:
        """Verify the WAL, every LMDB record, the indexes, counts and snapshots; modify nothing.

        Safe while this store (or another process) writes: records are checked in short read
        transactions and the cross-table checks in one. ``report.ok`` is True when no problem
        was found; ``report.problems`` says where (segment+offset, table and key) and what.
        ``progress(n)`` is called after each batch of ``n`` records. It runs in this process:
        on some damaged LMDB pages liblmdb aborts the process (a C assertion), which is why
        ``xpstore verify`` runs the same checks in a child process.
        """
        store = cast("Store", self)
        store._check_open()
        tables = store._tables
        if tables is None:
            raise StoreClosedError(f"store {store.path} is closed")
        # a writer open is the live writer itself; a read-only one may share the store with one
        live = not store.readonly or writer_pid(store.path) is not None
        return check_store(
            store.path,
            tables=tables,
            store_id=store.store_id,
            writer_live=live,
            config=store.config,
            progress=progress,
        )
