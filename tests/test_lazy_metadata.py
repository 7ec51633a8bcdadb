"""Answers' metadata read lazily (issue 15, item 3): ``similar`` returns its answers before their
metadata is read; the first access of any answer's ``metadata`` reads all of the call's in one
read, as the records are then; ``close`` reads what is still pending. These tests pin what a
reader sees: the same values an eager read gives, the documented behaviour across updates,
deletes, the answer cache, ``similar_many``, copies, threads and ``close``."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from tests.index_support import index_server, library
from xpstore import Fingerprint, InvalidArgumentError, Store
from xpstore.index.neighbors import MetadataLoad, Neighbor
from xpstore.store.index_service import _check_vector
from xpstore.store.reader import Reader

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUIET: dict[str, Any] = {"index_auto_rebuild": False}


def _stored_metadata(st: Store, rid: int) -> dict[str, Any] | None:
    record = st.get(rid).record
    assert isinstance(record, Fingerprint)
    return dict(record.metadata) if record.metadata else None


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[int]]]:
    """Every envelope read of the store's reader (ids per call), the read itself unchanged."""
    calls: list[list[int]] = []
    original = Reader.envelopes

    def counted(self: Reader, ids: list[int], **kw: Any) -> dict[int, bytes]:
        calls.append(list(ids))
        return original(self, ids, **kw)

    monkeypatch.setattr(Reader, "envelopes", counted)
    yield calls


def _store(tmp_path: Path, n: int = 300, *, build: bool = True) -> Store:
    st = Store.open(tmp_path / "s", create=True, **QUIET)
    st.put_many(library(np.random.default_rng(5), n))
    if build:
        st.rebuild_index()
    return st


@pytest.mark.parametrize("build", [True, False], ids=["main index", "delta only"])
def test_lazy_metadata_equals_the_stored_metadata_and_is_read_once_per_call(
    tmp_path: Path, reads: list[list[int]], build: bool
) -> None:
    with _store(tmp_path, build=build) as st:
        for t in ("t0", "t7", "t42"):
            hits = st.similar(t, k=10)
            assert len(hits) == 10
            reads.clear()
            got = [h.metadata for h in hits]
            assert len(reads) == 1 and sorted(reads[0]) == sorted(h.record_id for h in hits)
            assert got == [_stored_metadata(st, h.record_id) for h in hits]
            assert all(m is not None and "style" in m for m in got)
            reads.clear()
            assert [h.metadata for h in hits] == got  # read once: no second read
            assert all(h.metadata is m for h, m in zip(hits, got, strict=True))
            assert reads == []


def test_nothing_is_read_when_nobody_reads_metadata(tmp_path: Path, reads: list[list[int]]) -> None:
    with _store(tmp_path) as st:
        server = index_server(st)
        query = st.track_vector("t3")
        reads.clear()
        before = dict(st.parts.telemetry.counters())
        hits = st.similar(vector=query, k=10)
        assert hits[0].track_id == "t3" and all(h.score <= 1.0 + 1e-5 for h in hits)
        assert reads == [] and server.answers == {}
        after = st.parts.telemetry.counters()
        assert after.get("answers.misses", 0.0) == before.get("answers.misses", 0.0)


def test_an_update_between_the_call_and_the_first_access_shows_then_stays_fixed(
    tmp_path: Path,
) -> None:
    with _store(tmp_path) as st:
        hits = st.similar("t1", k=5)
        target = hits[2]
        st.update(target.record_id, metadata={"title": "Renamed", "artist": "Someone"})
        # the first access reads the record as it is then (the documented choice)
        assert target.metadata == {"title": "Renamed", "artist": "Someone"}
        assert hits[0].metadata == _stored_metadata(st, hits[0].record_id)
        # once read, fixed: a later update does not change an answer already read
        st.update(target.record_id, metadata={"title": "Again"})
        assert target.metadata == {"title": "Renamed", "artist": "Someone"}
        assert st.similar("t1", k=5)[2].metadata == {"title": "Again"}


def test_deleted_records_and_tracks_between_the_call_and_the_access(tmp_path: Path) -> None:
    with _store(tmp_path) as st:
        hits = st.similar("t2", k=6)
        gone, retired = hits[1], hits[3]
        retired_meta = _stored_metadata(st, retired.record_id)
        st.delete(gone.record_id)  # the record itself is gone: nothing left to read
        st.delete_track(retired.track_id)  # the track leaves lookups, its record stays
        assert gone.metadata is None
        assert (gone.track_id, gone.record_id) == (hits[1].track_id, hits[1].record_id)
        assert retired.metadata == retired_meta is not None
        for h in (hits[0], hits[2], hits[4], hits[5]):
            assert h.metadata == _stored_metadata(st, h.record_id)
        # and a new call no longer returns either
        again = {h.record_id for h in st.similar("t2", k=300)}
        assert gone.record_id not in again and retired.record_id not in again


def test_the_answer_cache_is_filled_by_a_read_and_serves_the_next_call(
    tmp_path: Path, reads: list[list[int]]
) -> None:
    with _store(tmp_path) as st:
        server = index_server(st)
        first = st.similar("t4", k=8)
        assert server.answers == {}  # not read: nothing cached
        metas = [h.metadata for h in first]
        assert set(server.answers) == {h.record_id for h in first}
        reads.clear()
        second = st.similar("t4", k=8)
        assert [h.metadata for h in second] == metas and reads == []  # from the cache
        assert second == first
        # an update drops the entry on the acknowledgement path: the next read is fresh
        st.update(first[0].record_id, metadata={"title": "New"})
        assert first[0].record_id not in server.answers
        third = st.similar("t4", k=8)
        assert third[0].metadata == {"title": "New"}
        assert [h.metadata for h in third[1:]] == metas[1:]


def test_a_read_racing_an_acknowledgement_leaves_no_stale_cache_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The update lands between the envelope read and the cache fill (injected): the value the
    read returned may be the old one, but the cache must not keep it."""
    with _store(tmp_path) as st:
        server = index_server(st)
        hits = st.similar("t5", k=4)
        target = hits[0].record_id
        original = Reader.envelopes
        fired: list[bool] = []

        def racing(self: Reader, ids: list[int], **kw: Any) -> dict[int, bytes]:
            out = original(self, ids, **kw)
            if not fired:
                fired.append(True)
                st.update(target, metadata={"title": "Raced"})
            return out

        monkeypatch.setattr(Reader, "envelopes", racing)
        assert hits[0].metadata is not None and hits[0].metadata != {"title": "Raced"}
        assert fired and target not in server.answers
        assert st.similar("t5", k=4)[0].metadata == {"title": "Raced"}


def test_similar_many_reads_every_row_in_one_read(tmp_path: Path, reads: list[list[int]]) -> None:
    with _store(tmp_path) as st:
        vecs = np.vstack([st.track_vector(f"t{i}") for i in range(5)])
        rows = st.similar_many(vecs, k=7)
        assert [len(r) for r in rows] == [7] * 5
        reads.clear()
        assert rows[3][2].metadata == _stored_metadata(st, rows[3][2].record_id)
        assert len(reads) == 1
        assert set(reads[0]) == {h.record_id for row in rows for h in row}
        assert [[h.metadata for h in r] for r in rows] == [
            [_stored_metadata(st, h.record_id) for h in r] for r in rows
        ]
        assert len(reads) == 1


def test_answers_outlive_their_store(tmp_path: Path, reads: list[list[int]]) -> None:
    st = _store(tmp_path)
    kept = st.similar("t6", k=5)
    rows = st.similar_many(np.vstack([st.track_vector("t8")]), k=3)
    want = [_stored_metadata(st, h.record_id) for h in kept]
    reads.clear()
    st.close()  # reads what is still pending, while LMDB is open
    assert len(reads) == 2
    assert [h.metadata for h in kept] == want
    assert all(h.metadata is not None for h in rows[0])


def test_copies_pickles_equality_and_replace_carry_the_metadata(tmp_path: Path) -> None:
    with _store(tmp_path) as st:
        views: list[Callable[[Neighbor], Any]] = [
            copy.copy,
            copy.deepcopy,
            lambda n: pickle.loads(pickle.dumps(n)),
            lambda n: dataclasses.replace(n, strategy="batch"),
        ]
        for view in views:
            h = st.similar("t9", k=3)[1]
            other = view(h)
            want = _stored_metadata(st, h.record_id)
            assert other.metadata == want and h.metadata == want
            assert "_load" not in vars(other)
        a, b = st.similar("t9", k=3), st.similar("t9", k=3)
        assert a == b  # equality reads both sides
        h = st.similar("t9", k=3)[0]
        assert dataclasses.asdict(h)["metadata"] == _stored_metadata(st, h.record_id)
        assert "metadata=" in repr(st.similar("t9", k=3)[0])
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            getattr(h, "nope")  # noqa: B009 - the lazy __getattr__ must not swallow names


def test_threads_reading_one_call_share_one_read(tmp_path: Path, reads: list[list[int]]) -> None:
    with _store(tmp_path) as st:
        hits = st.similar("t10", k=10)
        reads.clear()
        seen: list[list[Any]] = []
        start = threading.Barrier(6)

        def reader() -> None:
            start.wait()
            seen.append([h.metadata for h in hits])

        threads = [threading.Thread(target=reader) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(reads) == 1 and len(seen) == 6
        assert all(all(a is b for a, b in zip(s, seen[0], strict=True)) for s in seen)


def test_a_load_that_is_never_read_is_freed_with_its_answers(tmp_path: Path) -> None:
    with _store(tmp_path) as st:
        service = st.parts.index
        for i in range(20):
            st.similar(f"t{i}", k=5)  # answers dropped at once
        assert len(service._pending) == 0
        kept = st.similar("t0", k=5)
        assert len(service._pending) == 1
        assert kept[0].metadata is not None


def test_a_metadata_load_reads_nothing_for_no_answers() -> None:
    fetched: list[list[int]] = []

    def fetch(_context: Any, ids: list[int]) -> dict[int, dict[str, Any] | None]:
        fetched.append(ids)
        return {i: {"i": i} for i in ids}

    load = MetadataLoad(fetch)
    assert load.load() == {} and fetched == [] and load.done
    other = MetadataLoad(fetch, "ctx")
    n = other.neighbor("a", 0.5, 3)
    assert not other.done and n.metadata == {"i": 3} and fetched == [[3]]


def test_vector_checks_accept_extreme_finite_vectors_and_refuse_bad_ones(tmp_path: Path) -> None:
    """The one-reduction check must not refuse a finite vector whose values are extreme or
    cancel out, and must refuse NaN, infinity and zeros as before."""
    with _store(tmp_path, 60, build=False) as st:
        base = st.track_vector("t0")
        for scale in (1e30, 1e-30):
            hits = st.similar(vector=base * np.float32(scale), k=3, exclude_self=False)
            assert hits[0].track_id == "t0"
        for bad, msg in ((np.full_like(base, np.nan), "NaN"), (np.zeros_like(base), "zeros")):
            with pytest.raises(InvalidArgumentError, match=msg):
                st.similar(vector=bad, k=3)
        inf = base.copy()
        inf[0] = np.inf
        with pytest.raises(InvalidArgumentError, match="infinity"):
            st.similar(vector=inf, k=3)
        cancel = np.zeros_like(base)
        cancel[0], cancel[1] = 1.0, -1.0  # nonzero, but its values sum to exactly zero
        assert len(st.similar(vector=cancel, k=3)) == 3
        both = base.copy()
        both[0], both[1] = np.inf, -np.inf  # the sum is NaN, not infinite: still refused
        with pytest.raises(InvalidArgumentError, match="infinity"):
            st.similar(vector=both, k=3)
        strided = np.repeat(base, 2)[::2]  # not contiguous: copied, same answers
        assert [h.record_id for h in st.similar(vector=strided, k=3)] == [
            h.record_id for h in st.similar(vector=base, k=3)
        ]


@pytest.mark.parametrize("dim", [25, 64, 65, 537])
def test_vector_check_is_the_same_for_short_and_long_vectors(dim: int) -> None:
    """Short vectors are summed as Python floats, long ones by numpy: both accept every finite
    vector with a nonzero value and refuse NaN, infinities and zeros, without a warning."""
    rng = np.random.default_rng(dim)
    good = rng.normal(size=dim).astype(np.float32)
    cancel = np.zeros(dim, dtype=np.float32)
    cancel[0], cancel[-1] = 3.0, -3.0
    big = np.full(dim, np.finfo(np.float32).max, dtype=np.float32)
    tiny = np.full(dim, np.finfo(np.float32).smallest_subnormal, dtype=np.float32)
    for v in (good, cancel, big, -big, tiny):
        assert _check_vector(v, dim) is v
    for value, msg in ((np.nan, "NaN"), (np.inf, "infinity"), (-np.inf, "infinity")):
        bad = good.copy()
        bad[dim // 2] = value
        with pytest.raises(InvalidArgumentError, match=msg):
            _check_vector(bad, dim)
    both = good.copy()
    both[0], both[-1] = np.inf, -np.inf
    with pytest.raises(InvalidArgumentError, match="infinity"):
        _check_vector(both, dim)
    with pytest.raises(InvalidArgumentError, match="zeros"):
        _check_vector(np.zeros(dim, dtype=np.float32), dim)
    with pytest.raises(InvalidArgumentError, match="dimension"):
        _check_vector(good[:-1], dim)


def test_search_one_refuses_a_query_faiss_would_misread(tmp_path: Path) -> None:
    with _store(tmp_path) as st:
        backend = index_server(st).main.backend
        assert backend is not None
        q = np.ascontiguousarray(st.track_vector("t0")[None, :])
        scores, ids = backend.search_one(q, 3)
        assert ids.shape == (1, 3) and scores.shape == (1, 3)
        bad: list[Any] = [q.astype(np.float64), q[:, :-1].copy(), np.vstack([q, q])[:, ::1].T]
        for query in bad:
            with pytest.raises(InvalidArgumentError, match="C-contiguous float32"):
                backend.search_one(query, 3)


def test_a_quantized_copy_keeps_the_tracks_in_memory(tmp_path: Path) -> None:
    with _store(tmp_path) as st:
        server = index_server(st)
        tracks = server.main.tracks
        backend = server.main.backend
        assert tracks is not None and backend is not None
        server.replace_backend(backend)
        assert server.main.tracks is tracks


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=hs.lists(
        hs.tuples(hs.integers(0, 9), hs.sampled_from(["update", "delete", "keep"])),
        max_size=8,
    )
)
def test_lazy_metadata_shows_each_record_as_of_the_first_access(
    changes: list[tuple[int, str]],
) -> None:
    """Property: whatever updates and deletes happen between the call and the first access,
    each answer's metadata is its record's metadata at that access (None once deleted), and
    equals what an eager read at that moment returns."""
    with tempfile.TemporaryDirectory() as d, _store(Path(d), 80, build=False) as st:
        hits = st.similar("t0", k=10)
        deleted: set[int] = set()
        for j, op in changes:
            rid = hits[j].record_id
            if rid in deleted:
                continue
            if op == "update":
                st.update(rid, metadata={"title": f"v{j}", "n": str(len(deleted))})
            elif op == "delete":
                st.delete(rid)
                deleted.add(rid)
        want = [None if h.record_id in deleted else _stored_metadata(st, h.record_id)
                for h in hits]  # fmt: skip
        assert [h.metadata for h in hits] == want


def test_answers_partly_in_the_answer_cache_read_only_the_rest_at_the_first_access(
    tmp_path: Path, reads: list[list[int]]
) -> None:
    """A call whose answers the cache holds in part stays lazy: its first metadata access
    takes the cached ones from the cache (counted as hits) and reads only the others."""
    with _store(tmp_path) as st:
        server = index_server(st)
        first = st.similar("t1", k=10)
        [h.metadata for h in first]  # fills the cache with these ten
        cached = {h.record_id for h in first}
        assert cached <= server.answers.keys()
        # a query whose answers overlap the cached ones without all being cached
        for t in (f"t{i}" for i in range(2, 300)):
            hits = st.similar(t, k=10)
            overlap = cached & {h.record_id for h in hits}
            if overlap and len(overlap) < len(hits):
                break
        else:
            pytest.fail("no query overlapping the cache in part")
        assert all("_load" in h.__dict__ for h in hits)  # nothing read yet
        before = dict(st.parts.telemetry.counters())
        reads.clear()
        got = [h.metadata for h in hits]
        after = st.parts.telemetry.counters()
        rest = sorted(h.record_id for h in hits if h.record_id not in cached)
        assert [sorted(r) for r in reads] == [rest]
        assert after.get("answers.hits", 0.0) - before.get("answers.hits", 0.0) == len(overlap)
        assert after.get("answers.misses", 0.0) - before.get("answers.misses", 0.0) == len(rest)
        assert got == [_stored_metadata(st, h.record_id) for h in hits]
