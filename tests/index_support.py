"""Shared helpers of the similar-track tests: a library of styled tracks and an exact reference."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint
from xpstore.model.records import Fingerprint


def library(rng: np.random.Generator, n: int, prefix: str = "t", **kw: object) -> list[Fingerprint]:
    """``n`` generated fingerprints of random styles (about half with streaming values)."""
    return [make_fingerprint(rng, f"{prefix}{i}", **kw) for i in range(n)]  # type: ignore[arg-type]


def live_fingerprints(store: Store) -> dict[int, Fingerprint]:
    """Every track's current fingerprint by record id, read through the public API."""
    out: dict[int, Fingerprint] = {}
    tracks = {exp.record.track_id for exp in store.scan("fingerprint")}  # type: ignore[union-attr]
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
    server = store.parts.index.manager.server  # type: ignore[union-attr]
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
