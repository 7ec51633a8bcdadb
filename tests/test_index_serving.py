"""Similar-track lookup through the store: read-your-writes, retirements, exactness against brute
force, catch-up on open, read-only processes, neighbour lists, bad input (issue 4)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from tests.helpers import record_as
from tests.index_support import (
    exact_top,
    index_manager,
    index_server,
    library,
    live_fingerprints,
    same_up_to_ties,
    vector_of,
)
from xpstore import (
    Fingerprint,
    InvalidArgumentError,
    InvalidRecordError,
    ReadOnlyStoreError,
    RecordNotFoundError,
    Store,
)
from xpstore.demo.synthetic import make_fingerprint
from xpstore.index.embedding import HybridEmbedder
from xpstore.index.index_file import read_meta
from xpstore.index.neighbors import Neighbor

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

QUIET: dict[str, Any] = {"index_auto_rebuild": False}  # rebuild only when a test says so


def _pairs(hits: Sequence[Neighbor]) -> list[tuple[int, float]]:
    return [(h.record_id, h.score) for h in hits]


def test_a_fingerprint_is_findable_as_soon_as_put_returns(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        st.put_many(library(rng, 200))
        st.rebuild_index()
        assert st.index_status()["size"] == 200
        fp = make_fingerprint(rng, "fresh")
        rid = st.put(fp)
        hits = st.similar(fingerprint=fp, k=1, exclude_self=False)
        assert hits[0].record_id == rid and hits[0].track_id == "fresh"
        assert math.isclose(hits[0].score, 1.0, abs_tol=1e-5)
        assert st.index_status()["delta"] == 1  # served from the delta, no rebuild


def test_superseded_and_deleted_tracks_are_never_returned(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        fps = library(rng, 300)
        ids = st.put_many(fps)
        st.rebuild_index()
        # supersede t0 (in the main index) with a copy of t1's values: the old id must go
        old = ids[0]
        new = st.put(fps[1].model_copy(update={"track_id": "t0", "ts": None}))
        hits = st.similar(vector=st.track_vector("t1"), k=300, exclude_self=False)
        got = {h.record_id for h in hits}
        assert old not in got and new in got and ids[1] in got
        # delete_track of a main-index track, and of a delta track
        st.delete_track("t2")
        st.delete_track("t0")
        hits = st.similar(vector=st.track_vector("t1"), k=300, exclude_self=False)
        got_tracks = {h.track_id for h in hits}
        assert "t2" not in got_tracks and "t0" not in got_tracks
        assert len(hits) == 298
        # deleting the current fingerprint record retires it as well
        st.delete(ids[3])
        assert all(h.record_id != ids[3] for h in st.similar("t1", k=300))
        with pytest.raises(RecordNotFoundError):
            st.similar("t3")


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_answers_equal_brute_force_over_the_live_set(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(3)
    cfg = {**QUIET, "index_exact_below": 10_000 if kind == "exact" else 0}
    with Store.open(tmp_path / "s", create=True, embedding_dim=8, **cfg) as st:
        st.put_many(library(rng, 1500, embedding_dim=8))
        st.rebuild_index()
        assert st.index_status()["kind"] == kind
        st.put_many(library(rng, 100, prefix="new", embedding_dim=8))  # delta
        for t in range(0, 1500, 7):
            st.delete_track(f"t{t}")  # tombstones
        agree = 0
        for q in range(20):
            query = st.track_vector(f"t{q * 7 + 1}")
            got = _pairs(st.similar(vector=query, k=10, exclude_self=False))
            want = exact_top(st, query, 10)
            if kind == "exact":
                assert same_up_to_ties(got, want), (got, want)
            agree += len({g for g, _ in got} & {w for w, _ in want})
        if kind == "hnsw":
            assert agree / 200 >= 0.95


def test_tombstones_crowding_the_top_fall_back_to_an_id_selector(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    with Store.open(tmp_path / "s", create=True, index_exact_below=0, **QUIET) as st:
        fps = library(rng, 600, style="techno")
        ids = st.put_many(fps)
        st.rebuild_index()
        query = vector_of(index_server(st), ids[0])
        first = st.similar(vector=query, k=40, exclude_self=False)
        for h in first[1:]:  # delete the 39 nearest other tracks
            st.delete_track(h.track_id)
        hits = st.similar(vector=query, k=10, exclude_self=False)
        gone = {h.record_id for h in first[1:]}
        assert len(hits) == 10 and not gone & {h.record_id for h in hits}
        want = exact_top(st, query, 10)
        assert len({h.record_id for h in hits} & {w for w, _ in want}) >= 9


def test_writes_before_the_first_query_are_caught_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = tmp_path / "s"
    with Store.open(path, create=True, **QUIET) as st:
        st.put_many(library(rng, 400))
        st.rebuild_index()
    meta = read_meta(path / "index" / "main.faiss")
    assert meta.count == 400 and meta.build is not None
    with Store.open(path, **QUIET) as st:  # writes while no index is attached
        st.put_many(library(rng, 50, prefix="late"))
        st.delete_track("t7")
        st.put(make_fingerprint(rng, "t8"))  # supersedes t8
    with Store.open(path, **QUIET) as st:
        status = st.index_status()
        assert status["size"] == 400 and status["delta"] == 51 and status["tombstones"] == 2
        assert status["live"] == len(live_fingerprints(st)) == 449
        late = st.get_fingerprint("late3")
        hit = st.similar(fingerprint=record_as(late, Fingerprint), k=1, exclude_self=False)[0]
        assert hit.record_id == late.id
        assert all(h.track_id != "t7" for h in st.similar("t9", k=449))


def test_a_damaged_index_file_is_not_used_and_answers_stay_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(6)
    path = tmp_path / "s"
    with Store.open(path, create=True, **QUIET) as st:
        st.put_many(library(rng, 300))
        st.rebuild_index()
    f = path / "index" / "main.faiss"
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with Store.open(path, **QUIET) as st:
        q = index_server(st).vector_of(1) if st.parts.index.manager else None
        assert q is None
        status = st.index_status()
        assert "checksum" in caplog.text
        assert status["size"] == 0 and status["delta"] == 300  # all exact, from LMDB
        query = st.track_vector("t5")
        assert same_up_to_ties(_pairs(st.similar(vector=query, k=10, exclude_self=False)),
                               exact_top(st, query, 10))


def test_an_index_file_of_another_store_or_from_the_future_is_removed_at_open(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(7)
    a, b = tmp_path / "a", tmp_path / "b"
    for p in (a, b):
        with Store.open(p, create=True, **QUIET) as st:
            st.put_many(library(rng, 50))
            st.rebuild_index()
    (b / "index" / "main.faiss").write_bytes((a / "index" / "main.faiss").read_bytes())
    with Store.open(b, **QUIET) as st:
        assert not (b / "index" / "main.faiss").exists()
        assert st.index_status()["delta"] == 50


def test_read_only_processes_use_the_file_and_catch_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    path = tmp_path / "s"
    with Store.open(path, create=True, **QUIET) as writer:
        writer.put_many(library(rng, 200))
        writer.rebuild_index()
        writer.flush()
        with Store.open(path, readonly=True, index_refresh_s=0) as reader:
            assert reader.index_status()["size"] == 200
            assert len(reader.similar("t3", k=5)) == 5
            with pytest.raises(ReadOnlyStoreError):
                reader.rebuild_index()
            rid = writer.put(make_fingerprint(rng, "newcomer"))
            writer.flush()
            hit = reader.similar(vector=index_server(writer).vector_of(rid), k=1,
                                 exclude_self=False)[0]
            assert hit.track_id == "newcomer"


@pytest.mark.parametrize("where", ["thread", "process"])
def test_builds_in_a_thread_and_in_a_child_process_agree(tmp_path: Path, where: str) -> None:
    rng = np.random.default_rng(9)
    with Store.open(tmp_path / "s", create=True, index_build_in=where, index_exact_below=0,
                    **QUIET) as st:
        st.put_many(library(rng, 800))
        status = st.rebuild_index()
        assert status["kind"] == "hnsw" and status["size"] == 800
        assert status["recall_at_10"] is not None and status["recall_at_10"] >= 0.95
        assert status["stats_count"] == 800  # statistics fitted on the library itself
        hits = st.similar("t0", k=5, precomputed=True)
        assert len(hits) == 5 and {h.build_id for h in hits} == {status["build_id"]}
        live = st.similar("t0", k=5)
        assert [h.track_id for h in hits] == [h.track_id for h in live]
        assert not list((tmp_path / "s" / "index").glob("build-*"))


def test_precomputed_lists_skip_retired_neighbours_and_say_their_build(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        st.put_many(library(rng, 100))
        first = st.rebuild_index()["build_id"]
        hits = st.similar("t0", k=5, precomputed=True)
        st.delete_track(hits[0].track_id)
        again = st.similar("t0", k=5, precomputed=True)
        assert hits[0].track_id not in {h.track_id for h in again}
        assert len(again) == 5 and all(h.build_id == first for h in again)
        st.put(make_fingerprint(rng, "after"))
        with pytest.raises(RecordNotFoundError, match="no precomputed neighbour list"):
            st.similar("after", precomputed=True)
        second = st.rebuild_index()["build_id"]
        assert second > first
        assert st.similar("after", k=3, precomputed=True)[0].build_id == second
        # lists of the old build are swept: every stored list is of the new build
        from xpstore.index import neighbors as nbrs

        tables = st.parts.engine.tables
        with tables.reading() as txn:
            cur = txn.cursor(db=tables.db(b"neighbors"))
            builds = {nbrs.build_of(bytes(v)) for _k, v in cur.iternext()}
        assert builds == {second}


def test_where_and_weights_and_raw_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    with Store.open(tmp_path / "s", create=True, embedding_dim=6, **QUIET) as st:
        st.put_many(library(rng, 400, embedding_dim=6))
        hits = st.similar("t0", k=10, where={"metadata.style": "jazz"})
        assert hits and all(h.metadata is not None and h.metadata["style"] == "jazz" for h in hits)
        audio_only = st.similar("t0", k=10, weights={"audio": 1.0, "embedding": 0.0})
        fp = record_as(st.get_fingerprint("t0"), Fingerprint)
        server = index_server(st)
        q = server.embedder.embed_query(fp, {"audio": 1.0, "embedding": 0.0})
        want = exact_top(st, q, 10, exclude=[st.get_fingerprint("t0").id])
        assert same_up_to_ties(_pairs(audio_only), want)
        raw = st.similar(fingerprint={"tempo_bpm": 174.0, "lufs": -6.0, "bass_pct": 0.3}, k=5)
        assert len(raw) == 5 and raw[0].score >= raw[-1].score


def test_bad_input_gets_clear_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        st.put_many(library(rng, 20))
        # a plain argument (k, vector, which query, weights, params) is an InvalidArgumentError;
        # a fingerprint's values and where= keys name record fields (InvalidRecordError)
        arg, rec = InvalidArgumentError, InvalidRecordError
        cases: list[tuple[dict[str, Any], type[InvalidArgumentError | InvalidRecordError],
                          str | None]] = [
            (dict(vector=np.ones(7)), arg, "vector"),
            (dict(vector=np.full(25, np.nan)), arg, "vector"),
            (dict(vector=np.zeros(25)), arg, "vector"),
            (dict(track_id="t1", k=0), arg, "k"),
            (dict(track_id="t1", k=-3), arg, "k"),
            (dict(track_id="t1", k=True), arg, "k"),
            (dict(track_id="t1", vector=np.ones(25)), arg, "track_id"),
            (dict(), arg, "track_id"),
            (dict(vector=np.ones(25), weights={"audio": 1.0}), arg, "weights"),
            (dict(track_id="t1", weights={"sound": 1.0}), arg, "weights.sound"),
            (dict(track_id="t1", weights={"audio": -1.0}), arg, "weights.audio"),
            (dict(fingerprint={"tempo": 120.0}), rec, "tempo"),
            (dict(fingerprint={"tempo_bpm": float("nan")}), rec, "tempo_bpm"),
            (dict(track_id="t1", where={"metadata.style__zz": 1}), rec, None),
            (dict(vector=np.ones(25), precomputed=True), arg, "precomputed"),
        ]
        for kwargs, cls, field in cases:
            with pytest.raises(cls) as err:
                st.similar(**kwargs)
            error = err.value  # one of the two (mypy joins the pair to XpStoreError)
            assert isinstance(error, InvalidArgumentError | InvalidRecordError)
            if field is not None:
                assert error.field == field, (kwargs, error.field)
        with pytest.raises(RecordNotFoundError, match="nosuch"):
            st.similar("nosuch")
        with pytest.raises(arg, match="2-D"):
            st.similar_many(np.ones(25))
        before = st.index_status()
        assert before["live"] == 20  # nothing changed
        st.rebuild_index()  # params reach the backend only once there is a main index
        for params, field in [({"nprobe": 0}, "params.nprobe"), ({"lists": 3}, "params.lists")]:
            with pytest.raises(InvalidArgumentError) as err:
                st.similar("t1", params=params)
            assert err.value.field == field


def test_similar_many_matches_single_queries(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        ids = st.put_many(library(rng, 300))
        server = index_manager(st).server if st.parts.index.manager else None
        assert server is None  # attached lazily
        st.similar("t0", k=1)
        server = index_server(st)
        q = np.vstack([vector_of(server, r) for r in ids[:16]])
        many = st.similar_many(q, k=5)
        for row, hits in zip(q, many, strict=True):
            assert [h.record_id for h in hits] == [
                h.record_id for h in st.similar(vector=row, k=5, exclude_self=False)
            ]


def test_status_is_json_ready(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        st.put_many(library(rng, 30))
        st.rebuild_index()
        status = json.loads(json.dumps(st.index_status()))
        for key in ("kind", "size", "delta", "tombstones", "lsn", "built_at", "build_seconds",
                    "recall_at_10"):
            assert key in status
        assert status["lsn"] == 30 and status["kind"] == "exact"


def test_a_swap_embeds_fingerprints_that_arrive_while_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A put landing between the swap's two embedding passes (a race in the wild) is embedded
    under the swap's lock and stays findable; the swap does not deadlock on its own lock."""
    from xpstore.index.serving import IndexServer

    rng = np.random.default_rng(15)
    original = IndexServer._embed_delta
    arrived: list[int] = []

    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        st.put_many(library(rng, 100))
        st.rebuild_index()
        st.put_many(library(rng, 5, prefix="d"))  # in the delta, newer than the next build

        def racing(
            self: IndexServer, embedder: HybridEmbedder, keep: Callable[[int], bool], **kw: Any
        ) -> dict[int, npt.NDArray[np.float32]]:
            out = original(self, embedder, keep, **kw)
            if not arrived:  # after the first pass read the delta, before the lock is taken
                arrived.append(st.put(make_fingerprint(rng, "racer")))
            return out

        monkeypatch.setattr(IndexServer, "_embed_delta", racing)
        status = st.rebuild_index(timeout=30)
        assert arrived and status["delta"] >= 1
        fp = st.get_fingerprint("racer")
        hit = st.similar(fingerprint=record_as(fp, Fingerprint), k=1, exclude_self=False)[0]
        assert hit.record_id == fp.id and math.isclose(hit.score, 1.0, abs_tol=1e-5)


@pytest.mark.parametrize("path", ["general", "fast"])
def test_a_search_spanning_a_swap_never_returns_an_id_retired_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The search reads main, delta and tombstones as one snapshot: mixing the old main with
    the new (shorter) tombstone set once returned a deleted track (found by the concurrency
    test; reproduced here deterministically by swapping in the middle of a search). Both the
    general search and the single-query fast path (``IndexServer.search_one``) are checked."""
    from xpstore.index.backends import IndexBackend
    from xpstore.index.serving import IndexServer

    rng = np.random.default_rng(16)
    with Store.open(tmp_path / "s", create=True, index_exact_below=0, **QUIET) as st:
        ids = st.put_many(library(rng, 300))
        st.rebuild_index()
        x = ids[5]
        query = index_server(st).vector_of(x)
        st.delete_track("t5")  # a tombstone of the current main index
        original = IndexServer._candidates
        fired: list[bool] = []

        def racing(
            self: IndexServer, *args: Any, **kwargs: Any
        ) -> list[list[tuple[int, float, bool]]]:
            out = original(self, *args, **kwargs)
            if not fired:
                fired.append(True)
                st.rebuild_index(timeout=60)  # swap while this search holds the old state
            return out

        original_one = IndexBackend.search_one

        def racing_one(self: IndexBackend, *args: Any, **kwargs: Any) -> Any:
            out = original_one(self, *args, **kwargs)
            if not fired:
                fired.append(True)
                st.rebuild_index(timeout=60)
            return out

        if path == "general":
            monkeypatch.setattr(IndexServer, "search_one", lambda *a, **kw: None)
            monkeypatch.setattr(IndexServer, "_candidates", racing)
        else:
            monkeypatch.setattr(IndexBackend, "search_one", racing_one)
        hits = st.similar(vector=query, k=5, exclude_self=False)
        assert fired and len(hits) == 5
        assert x not in {h.record_id for h in hits}


def test_answers_show_metadata_updated_after_they_were_cached(tmp_path: Path) -> None:
    rng = np.random.default_rng(17)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        ids = st.put_many(library(rng, 50))
        first = st.similar("t0", k=3)
        target = first[0]
        assert target.metadata is not None  # read: the answers' metadata is cached now
        assert target.record_id in index_server(st).answers
        st.update(target.record_id, metadata={"title": "Renamed", "artist": "Someone"})
        again = st.similar("t0", k=3)
        assert again[0].record_id == target.record_id
        assert again[0].metadata == {"title": "Renamed", "artist": "Someone"}
        assert len(ids) == 50


def test_neighbour_files_are_read_in_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msgpack refuses to buffer more than 100 MiB at once; a million tracks' lists are more,
    so the reader feeds the payload in slices (here 64 bytes, so entries straddle slices)."""
    from xpstore.index import neighbors as nbrs

    path = tmp_path / "n.bin"
    with nbrs.NeighborFileWriter(path) as w:
        for i in range(500):
            w.add(f"t{i}", nbrs.encode(3, 99, [(f"t{j}", j, 0.5) for j in range(i % 7)]))
    monkeypatch.setattr(nbrs, "FEED_BYTES", 64)
    pairs = [p for chunk in nbrs.read_file(path, chunk=37) for p in chunk]
    assert len(pairs) == 500 and pairs[499][0] == b"t499"
    assert nbrs.decode(pairs[6][1], "t6").items == [(f"t{j}", j, 0.5) for j in range(6)]


def test_rows_read_in_columns_equal_rows_read_one_by_one(tmp_path: Path) -> None:
    """Attaching without an index file reads every live fingerprint with
    ``rows_from_envelopes`` (numpy decodes the values); it must agree with the per-record
    decoder on every form: batch, streaming only, an embedding of the store's dimension, and
    a track id full of characters that look like msgpack markers."""
    from xpstore.index.rows import parse_fingerprint, rows_from_envelopes

    rng = np.random.default_rng(21)
    recs: list[Any] = []
    for i in range(40):
        fp = make_fingerprint(rng, f"t{i}\u00a9embedding\u00dc", with_batch=i % 5 != 0,
                              embedding_dim=6 if i % 2 else None)  # fmt: skip
        recs.append(fp)
    with Store.open(tmp_path / "s", create=True) as st:
        ids = st.put_many(recs)
        st.flush()
        tables = st.parts.engine.tables
        with tables.reading() as txn:
            found = tables.get_records(txn, ids)
        datas = [found[r] for r in ids]
    rows = rows_from_envelopes(ids, [r.track_id for r in recs], datas, 6)
    for i, data in enumerate(datas):
        raw = parse_fingerprint(data)
        assert np.array_equal(rows.audio[i], raw.audio, equal_nan=True)
        assert rows.has_embedding[i] == (raw.embedding is not None)
        if raw.embedding is not None:
            assert rows.embedding is not None
            assert np.array_equal(rows.embedding[i], raw.embedding)


def test_a_delta_that_adopts_an_attachs_arrays_behaves_as_one_that_copied_them() -> None:
    """An attach hands its library's arrays to an empty delta (``owned=True``): no copy at
    attach; adds after it grow the buffers, removals and reads see the same rows as a delta
    that copied everything, and the caller's arrays are never written to."""
    from xpstore.index.delta import Delta
    from xpstore.model.events import RawFingerprint

    rng = np.random.default_rng(7)
    m, dim, edim = 300, 33, 8
    ids = np.arange(10, 10 + m, dtype=np.int64)
    tracks = [f"t{i}" for i in range(m)]
    audio = rng.uniform(size=(m, 25))
    emb = rng.standard_normal((m, edim)).astype(np.float32)
    has = rng.random(m) < 0.5
    vecs = rng.standard_normal((m, dim)).astype(np.float32)
    kept = (audio.copy(), vecs.copy())
    adopted, copied = Delta(dim, edim), Delta(dim, edim)
    adopted.add_many(ids, tracks, audio, emb, has, vecs, owned=True)
    copied.add_many(ids, tracks, audio, emb, has, vecs)
    assert adopted._vecs is vecs and copied._vecs is not vecs  # the point of adopting
    more = [(RawFingerprint(f"new{k}", rng.uniform(size=25), None, None),
             rng.standard_normal(dim).astype(np.float32)) for k in range(5)]  # fmt: skip
    for delta in (adopted, copied):
        for k, (raw, vec) in enumerate(more):  # past the adopted buffers' end: they grow
            delta.add(1000 + k, raw, vec)
        assert delta.remove(12) and not delta.remove(12)
    np.testing.assert_array_equal(audio, kept[0])
    np.testing.assert_array_equal(vecs, kept[1])
    a, c = adopted.rows(), copied.rows()
    assert a.ids.tolist() == c.ids.tolist() and a.track_ids == c.track_ids
    np.testing.assert_array_equal(a.audio, c.audio)
    np.testing.assert_array_equal(a.has_embedding, c.has_embedding)
    assert a.embedding is not None and c.embedding is not None
    np.testing.assert_array_equal(a.embedding[a.has_embedding], c.embedding[c.has_embedding])
    for rid in (10, 11, 200, 1004):
        np.testing.assert_array_equal(adopted.vector(rid), copied.vector(rid))
    assert adopted.vector(12) is None and len(adopted) == len(copied) == m + 4
    va, vc = adopted.view, copied.view
    assert va.n == vc.n == m + 5
    np.testing.assert_array_equal(va.ids[: va.n], vc.ids[: vc.n])
    np.testing.assert_array_equal(va.vecs[: va.n], vc.vecs[: vc.n])


def test_a_live_ef_search_reaches_single_queries(tmp_path: Path) -> None:
    """``index.ef_search`` changed at run time is what every single query searches with, as if
    each passed it in ``params`` (the single-query fast path once searched with the value the
    index was built with, so the tuner's efSearch changes never reached ``similar``)."""
    rng = np.random.default_rng(21)
    with Store.open(tmp_path / "s", create=True, **{**QUIET, "index_exact_below": 0}) as st:
        st.put_many(library(rng, 2000))
        st.rebuild_index()
        assert st.index_status()["kind"] == "hnsw"
        queries = [f"t{i}" for i in range(0, 2000, 40)]
        by_ef: dict[int, list[list[int]]] = {}
        for ef in (10, 400, 10):
            st.reconfigure(index_ef_search=ef)
            implicit = [[h.record_id for h in st.similar(t, k=10)] for t in queries]
            explicit = [[h.record_id for h in st.similar(t, k=10, params={"ef_search": ef})]
                        for t in queries]  # fmt: skip
            assert implicit == explicit, ef
            assert by_ef.setdefault(ef, implicit) == implicit  # and back again
        assert by_ef[10] != by_ef[400]  # the knob moves answers: it is the one searched with


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_single_queries_by_position_answer_as_the_search_by_id(tmp_path: Path, kind: str) -> None:
    """A build adds its vectors in id order, so a single query searches FAISS by position and
    names the answers from the main index's arrays; a backend whose positions are in another
    order (checked against its id map) is searched by id, with the same answers."""
    rng = np.random.default_rng(31)
    cfg = {**QUIET, "index_exact_below": 10_000 if kind == "exact" else 0}
    with Store.open(tmp_path / "s", create=True, **cfg) as st:
        st.put_many(library(rng, 400))
        st.rebuild_index()
        server = index_server(st)
        main = server.main
        assert main.backend is not None and main.backend.kind == kind
        assert main.by_position
        queries = [st.track_vector(f"t{i}") for i in range(0, 400, 23)]
        by_position = [_pairs(st.similar(vector=q, k=10)) for q in queries]
        for got, q in zip(by_position, queries, strict=True):
            assert len(got) == 10
            if kind == "exact":
                assert same_up_to_ties(got, exact_top(st, q, 10)), got
        names = {h.record_id: h.track_id for q in queries for h in st.similar(vector=q, k=10)}
        live = live_fingerprints(st)
        assert names == {rid: live[rid].track_id for rid in names}
        # the same vectors added in reverse id order: positions no longer follow the ids
        ids, vecs = main.backend.vectors()
        flipped = type(main.backend).create(main.backend.dim)
        if kind == "hnsw":
            flipped = type(main.backend).create(main.backend.dim, **main.backend.params)
        flipped.add(ids[::-1].copy(), vecs[::-1].copy())
        server.replace_backend(flipped)
        assert not server.main.by_position
        by_id = [_pairs(st.similar(vector=q, k=10)) for q in queries]
        for a, b in zip(by_position, by_id, strict=True):
            if kind == "exact":
                assert same_up_to_ties(a, b), (a, b)
            else:  # another graph: nearly the same answers
                assert len({r for r, _ in a} & {r for r, _ in b}) >= 8


def test_a_search_by_position_drops_the_padding_of_a_short_answer(tmp_path: Path) -> None:
    """FAISS pads a short answer with position -1; it must not read as the id at position 0
    (``take`` clips -1 to 0), nor be answered."""
    rng = np.random.default_rng(32)
    with Store.open(tmp_path / "s", create=True, **QUIET) as st:
        st.put_many(library(rng, 30))
        st.rebuild_index()
        server = index_server(st)
        state = server._state
        first = int(server.main.ids[0])
        pos = np.array([5, 2, -1, -1], dtype=np.int64)
        scores = np.array([0.9, 0.8, -np.inf, -np.inf], dtype=np.float32)
        found = server._main_by_position(state, scores, pos, 4, set(), more=False)
        assert found is not None
        rids, vals, tracks = found
        assert rids == [int(server.main.ids[5]), int(server.main.ids[2])] and first not in rids
        names = server.main.tracks
        assert names is not None and tracks == [names[5], names[2]]
        assert vals == pytest.approx([0.9, 0.8])
        # a caller that may look further gets None (the general search then runs)
        assert server._main_by_position(state, scores, pos, 4, set(), more=True) is None
