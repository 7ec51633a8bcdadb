"""Shared helpers of the similar-track tests: a library of styled tracks and an exact reference."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypedDict, Unpack

import numpy as np
import numpy.typing as npt

from tests.helpers import record_as
from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint
from xpstore.index.manager import IndexManager, Rebuilder
from xpstore.index.serving import IndexServer
from xpstore.model.records import Fingerprint


class FingerprintOptions(TypedDict, total=False):
    """The keyword options of :func:`~xpstore.demo.synthetic.make_fingerprint`."""

    style: str | None
    with_streaming: bool | None
    embedding_dim: int | None
    with_batch: bool
    ts: float | None


def library(
    rng: np.random.Generator, n: int, prefix: str = "t", **kw: Unpack[FingerprintOptions]
) -> list[Fingerprint]:
    """``n`` generated fingerprints of random styles (about half with streaming values)."""
    return [make_fingerprint(rng, f"{prefix}{i}", **kw) for i in range(n)]


def index_manager(store: Store) -> IndexManager:
    """The store's index manager (attached by an earlier query, rebuild or status call)."""
    manager = store.parts.index.manager
    assert manager is not None, "no index attached"
    return manager


def index_server(store: Store) -> IndexServer:
    """The attached index's server, as ``store.parts.index.manager.server``."""
    server = index_manager(store).server
    assert server is not None, "the index manager has no server"
    return server


def index_rebuilder(store: Store) -> Rebuilder:
    """The attached index's background rebuilder (a writable store's)."""
    rebuilder = index_manager(store).rebuilder
    assert rebuilder is not None, "the index manager has no rebuilder"
    return rebuilder


def vector_of(server: IndexServer, record_id: int) -> npt.NDArray[np.float32]:
    """``server.vector_of(record_id)`` of a record the test knows is live (never None)."""
    vector = server.vector_of(record_id)
    assert vector is not None, f"record {record_id} has no vector in the index"
    return vector


def live_fingerprints(store: Store) -> dict[int, Fingerprint]:
    """Every track's current fingerprint by record id, read through the public API."""
    out: dict[int, Fingerprint] = {}
    tracks = {record_as(exp, Fingerprint).track_id for exp in store.scan("fingerprint")}
    for track in tracks:
        try:
            exp = store.get_fingerprint(track)
        except KeyError:
            continue
        assert isinstance(exp.record, Fingerprint)
        out[exp.id] = exp.record
    return out


def exact_top(
    store: Store, query: np.ndarray, k: int, exclude: Iterable[int] = ()
) -> list[tuple[int, float]]:
    """Brute force over the live fingerprints with the index's own embedder: (id, score)."""
    server = index_server(store)
    live = live_fingerprints(store)
    ids = np.array(sorted(set(live) - set(exclude)), dtype=np.int64)
    vecs = server.embedder.embed_many([live[int(i)] for i in ids])
    scores = vecs @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(ids[i]), float(scores[i])) for i in order]


def same_up_to_ties(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Equal id lists, except that ids whose scores tie at the boundary may differ."""
    if len(got) != len(want):
        return False
    for (gi, gs), (wi, ws) in zip(got, want, strict=True):
        if gi != wi and abs(gs - ws) > 1e-5:
            return False
    return abs(got[-1][1] - want[-1][1]) < 1e-5 if got else True
