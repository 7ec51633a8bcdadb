"""``xpstore serve``: open a store and run the app (:mod:`xpstore.service.app`) under uvicorn.

uvicorn owns the signals while it serves: SIGTERM or SIGINT stop accepting connections, let the
requests in flight finish, and return here, where the store is closed (a writable store flushes
the WAL, drains the applier and releases its lock) and the process exits with status 0.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from pathlib import Path
from types import FrameType

from xpstore.errors import InvalidArgumentError
from xpstore.store.store import Store
from xpstore.tuning.tuning import Tuning

__all__ = ["read_token", "serve"]

log = logging.getLogger(__name__)


def read_token(path: str | os.PathLike[str]) -> bytes:
    """The bearer token in ``path`` (surrounding whitespace stripped); InvalidArgumentError
    naming the file when it is missing or empty. Warns when others may read it."""
    p = Path(path)
    try:
        raw = p.read_bytes().strip()
        mode = p.stat().st_mode
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read the token file {p}: {exc.strerror}",
                                   field="token_file") from None  # fmt: skip
    if len(raw) < 16:
        raise InvalidArgumentError(f"the token in {p} is shorter than 16 bytes",
                                   field="token_file")  # fmt: skip
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by other users (chmod 600 it)", p)
    return raw


def serve(
    path: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    token_file: str | os.PathLike[str] | None = None,
    writable: bool = False,
    policy: str = "default",
    max_body_bytes: int | None = None,
    log_level: str = "info",
    tuning: bool = True,
) -> None:
    """Serve the store at ``path`` until SIGTERM/SIGINT; read-only unless ``writable``;
    ``tuning`` attaches :class:`~xpstore.tuning.tuning.Tuning` (``/tuning/*``, the resource
    monitor's memory check, the tuner's metrics)."""
    import uvicorn

    from xpstore.service.app import MAX_BODY_BYTES, create_app

    token = read_token(token_file) if token_file is not None else None
    store = Store.open(path, readonly=not writable)
    tuner: Tuning | None = None
    try:
        tuner = Tuning(store) if tuning else None
        app = create_app(store, token=token, policy=policy, tuning=tuner,
                         max_body_bytes=max_body_bytes or MAX_BODY_BYTES)  # fmt: skip
        if store.count("fingerprint"):
            store.index_status()  # attach the index now, not on the first query
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                access_log=False, lifespan="off")  # fmt: skip
        log.info("serving %s (%s) on http://%s:%d", path,
                 "read-only" if store.readonly else "writable", host, port)  # fmt: skip
        # uvicorn restores the handlers it found and raises the signal again once it has shut
        # down; with the defaults that kills the process before the store is closed. The
        # handlers it finds are these, which only note the signal: the store closes, we return
        previous = {sig: signal.signal(sig, _note) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            uvicorn.Server(config).run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        try:
            if tuner is not None:
                tuner.close()
        finally:
            store.close()
        log.info("store %s closed", path)


def _note(sig: int, frame: FrameType | None) -> None:
    log.info("received %s while closing; the close finishes first", signal.Signals(sig).name)
