"""The streaming cache (TTL, LRU by bytes, counters, confidence-gated replacement), put_streaming
(written through the WAL when final) and the query strategies of ``similar``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xpstore import (
    Fingerprint,
    InvalidArgumentError,
    InvalidRecordError,
    RecordNotFoundError,
    Store,
)
from xpstore.demo.synthetic import STYLES, make_fingerprint
from xpstore.index.streaming import StreamingCache, entry_bytes
from xpstore.model.records import STREAMING_FIELDS


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


VALUES = dict.fromkeys(STREAMING_FIELDS, 0.5)


def _conf(x: float) -> dict[str, float]:
    return dict.fromkeys(STREAMING_FIELDS, x)


def test_cache_replaces_only_with_rising_confidence() -> None:
    cache = StreamingCache(max_bytes=1 << 20, ttl_s=60, clock=Clock())
    assert cache.offer("a", VALUES, _conf(0.4), 2)[0]
    better = {**VALUES, "tempo_bpm": 120.0}
    assert cache.offer("a", better, _conf(0.6), 3)[0]
    kept, entry = cache.offer("a", VALUES, _conf(0.5), 4)  # less confident: ignored
    assert not kept and entry.values["tempo_bpm"] == 120.0 and entry.chunk_count == 3
    got = cache.get("a")
    assert got is not None and got.mean_confidence == pytest.approx(0.6)
    assert cache.get("b") is None
    stats = cache.stats()
    assert (stats["stored"], stats["replaced"], stats["ignored"]) == (1, 1, 1)
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 1, 1)


def test_cache_ttl_counts_from_the_last_update() -> None:
    clock = Clock()
    cache = StreamingCache(max_bytes=1 << 20, ttl_s=10, clock=clock)
    cache.offer("a", VALUES, _conf(0.5), 1)
    clock.now = 6
    cache.offer("b", VALUES, _conf(0.5), 1)
    assert cache.get("a") is not None  # a read does not extend the TTL
    clock.now = 10
    assert cache.get("a") is None and cache.get("b") is not None
    cache.offer("b", VALUES, _conf(0.9), 2)  # an update does
    clock.now = 19
    assert cache.get("b") is not None
    clock.now = 20
    assert cache.get("b") is None
    assert cache.stats()["expired"] == 2 and cache.stats()["bytes"] == 0


def test_cache_evicts_least_recently_used_beyond_its_size() -> None:
    size = entry_bytes("t0", len(VALUES))
    cache = StreamingCache(max_bytes=3 * size, ttl_s=60, clock=Clock())
    for name in ("t0", "t1", "t2"):
        cache.offer(name, VALUES, _conf(0.5), 1)
    assert cache.get("t0") is not None  # t1 is now the least recently used
    cache.offer("t3", VALUES, _conf(0.5), 1)
    assert [e.track_id for e in cache.entries()] == ["t2", "t0", "t3"]
    assert cache.stats()["evicted"] == 1 and cache.stats()["bytes"] == 3 * size
    cache.resize(size, 60)
    assert [e.track_id for e in cache.entries()] == ["t3"]


def _styled(seed: int = 2, per: int = 12) -> list[Fingerprint]:
    rng = np.random.default_rng(seed)
    return [
        make_fingerprint(rng, f"{style}-{i}", style, with_streaming=True)
        for style in sorted(STYLES) for i in range(per)
    ]  # fmt: skip


def test_put_streaming_is_findable_at_once_and_written_when_final(store_path: Path) -> None:
    fps = _styled()
    probe = fps[0]
    assert probe.streaming is not None and probe.batch is not None
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps[1:])
        lsn = store.parts.engine.writable().acked_lsn
        out = store.put_streaming("live", probe.streaming.values, _conf(0.5), 2)
        assert out.cached and out.record_id is None
        assert store.parts.engine.writable().acked_lsn == lsn  # nothing written yet
        hits = store.similar("live", k=5, strategy="fast")
        assert hits and all(h.strategy == "fast" for h in hits)
        assert hits[0].metadata is not None and probe.metadata is not None
        assert hits[0].metadata["style"] == probe.metadata["style"]
        with pytest.raises(RecordNotFoundError):
            store.similar("live", k=5)  # the batch index knows nothing of it yet
        assert store.streaming_cache_stats()["hits"] >= 1
        final = store.put_streaming("live", probe.streaming.values, _conf(0.9), 5, final=True)
        assert final.record_id is not None and final.validation is None  # no batch values
        assert store.streaming_cache_stats()["entries"] == 0
        stored = store.get_fingerprint("live").record
        assert isinstance(stored, Fingerprint) and stored.streaming is not None
        assert stored.validation is not None and stored.validation.status == "pending"
        # a track with batch values keeps them; the pair is validated at once
        both = store.put_streaming(fps[1].track_id, probe.streaming.values, _conf(1.0), 5,
                                   final=True)  # fmt: skip
        assert both.validation in ("valid", "invalid")
        kept = store.get_fingerprint(fps[1].track_id).record
        assert isinstance(kept, Fingerprint) and kept.batch == fps[1].batch
    with Store.open(store_path) as store:  # durable
        rec = store.get_fingerprint("live").record
        assert isinstance(rec, Fingerprint) and rec.streaming is not None


def test_each_strategy_answers_and_says_which(store_path: Path) -> None:
    fps = _styled(3)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many(fps)
        t = fps[0].track_id
        batch = store.similar(t, k=5, strategy="batch")
        assert [h.track_id for h in batch] == [h.track_id for h in store.similar(t, k=5)]
        assert all(h.strategy == "batch" for h in batch)
        fast = store.similar(t, k=5, strategy="fast")
        accurate = store.similar(t, k=5, strategy="accurate")
        assert len(fast) == len(accurate) == 5 and t not in {h.track_id for h in fast}
        assert [h.score for h in accurate] == sorted((h.score for h in accurate), reverse=True)
        pool = store.similar(t, k=5 * store.config.streaming.accurate_factor, strategy="fast")
        assert {h.track_id for h in accurate} <= {h.track_id for h in pool}  # re-ranked fast
        assert fps[0].metadata is not None
        style = fps[0].metadata["style"]
        # auto: batch values win where the query has them; streaming-only: fast, or accurate
        # when the confidence is low
        assert store.similar(t, k=3, strategy="auto")[0].strategy == "batch"
        rec = store.get_fingerprint(t).record
        assert isinstance(rec, Fingerprint) and rec.streaming is not None
        store.put_streaming("q", rec.streaming.values, _conf(0.95), 5)
        assert store.similar("q", k=3, strategy="auto")[0].strategy == "fast"
        store.put_streaming("low", rec.streaming.values, _conf(0.1), 1)
        assert store.similar("low", k=3, strategy="auto")[0].strategy == "accurate"
        store.put_streaming("low", rec.streaming.values, _conf(0.7), 3)  # confidence rose
        assert store.similar("low", k=3, strategy="auto")[0].strategy == "fast"
        where = store.similar(t, k=3, strategy="fast", where={"metadata.style": style})
        assert all(h.metadata and h.metadata.get("style") == style for h in where)


def test_strategies_refuse_bad_input(store_path: Path) -> None:
    rng = np.random.default_rng(4)
    batch_only = make_fingerprint(rng, "b", with_streaming=False)
    with Store.open(store_path, create=True, durability="none") as store:
        store.put_many([batch_only, *_styled(5, 3)])
        cases: list[tuple[dict[str, Any], str]] = [
            ({"strategy": "fastest"}, "strategy"),
            ({"strategy": "fast"}, "strategy"),  # b has no streaming values
            ({"strategy": "fast", "weights": {"audio": 1}}, "weights"),
            ({"strategy": "accurate", "params": {"ef_search": 8}}, "params"),
            ({"strategy": "fast", "precomputed": True}, "strategy"),
        ]
        for kwargs, field in cases:
            with pytest.raises(InvalidArgumentError) as err:
                store.similar("b", k=3, **kwargs)
            assert err.value.field == field
        with pytest.raises(InvalidArgumentError):
            store.similar(vector=np.ones(25), k=3, strategy="fast")
        for bad, field in [
            ({"track_id": ""}, "track_id"),
            ({"final": "yes"}, "final"),
        ]:
            args = {"track_id": "x", "values": VALUES, "confidence": _conf(0.5),
                    "chunk_count": 1, **bad}  # fmt: skip
            with pytest.raises(InvalidArgumentError) as err:
                store.put_streaming(**args)  # type: ignore[arg-type]
            assert err.value.field == field
        with pytest.raises(InvalidRecordError):
            store.put_streaming("x", {"tempo_bpm": 1.0}, {"tempo_bpm": 1.0}, 1)
        with pytest.raises(InvalidRecordError):
            store.put_streaming("x", VALUES, _conf(1.5), 1)
        assert store.streaming_cache_stats()["entries"] == 0
        store.reconfigure(streaming_cache_mb=0.001, streaming_ttl_s=5)
        assert store.streaming_cache_stats()["max_bytes"] == int(0.001 * 1024 * 1024)
