"""FAISS index backends: exact equals brute force, ANN recall@10 >= 0.95 on styled tracks,
removal where FAISS supports it, checksummed persistence that refuses damage before FAISS sees
it, and clear errors for bad input."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from xpstore.demo.synthetic import STYLES, sample_batch_values
from xpstore.errors import (
    FormatVersionError,
    InvalidArgumentError,
    StoreCorruptionError,
    XpStoreError,
)
from xpstore.index import backends, index_file
from xpstore.index.backends import (
    KINDS,
    MIN_EF_CONSTRUCTION,
    ExactBackend,
    HNSWBackend,
    IndexBackend,
    IVFBackend,
    RemoveUnsupportedError,
    build,
    choose_backend,
    exact_knn,
    exclusion,
    faiss_errors,
    faiss_threads,
    nlist_for,
)
from xpstore.index.embedding import AudioStats, HybridEmbedder
from xpstore.index.index_file import load, save
from xpstore.model.records import BATCH_FIELDS

log = logging.getLogger(__name__)

PER_STYLE = 1000
N_QUERIES = 300
K = 10


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _random_unit(n: int, dim: int, seed: int) -> np.ndarray:
    return _unit_rows(np.random.default_rng(seed).normal(size=(n, dim)))


@pytest.fixture(scope="module")
def styled() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, queries): tracks in every style, embedded as the store will embed them;
    queries are existing tracks' vectors plus small noise (query-by-track)."""
    rng = np.random.default_rng(7)
    values = np.vstack([sample_batch_values(rng, s, PER_STYLE) for s in STYLES])
    embedder = HybridEmbedder(AudioStats.fit(values))
    vectors = np.stack(
        [embedder.embed_parts(dict(zip(BATCH_FIELDS, row, strict=True))) for row in values]
    )
    ids = rng.permutation(10 * len(values))[: len(values)].astype(np.int64)
    picks = rng.choice(len(values), size=N_QUERIES, replace=False)
    noise = rng.normal(scale=0.02, size=(N_QUERIES, vectors.shape[1]))
    queries = _unit_rows(vectors[picks] + noise)
    return ids, vectors, queries


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


# --------------------------------------------------------------------------- exactness


def test_exact_equals_numpy_brute_force() -> None:
    dim = 32
    vectors = _random_unit(3000, dim, seed=1)
    ids = np.arange(5000, 8000, dtype=np.int64)
    queries = _random_unit(50, dim, seed=2)
    backend = build("exact", ids, vectors)
    assert isinstance(backend, ExactBackend)
    assert len(backend) == 3000
    scores, found = backend.search(queries, K)

    ip = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    order = np.argsort(-ip, axis=1)[:, :K]
    np.testing.assert_allclose(scores, np.take_along_axis(ip, order, axis=1), atol=1e-5)
    # ties aside: compare ids only where the reference's neighbouring scores are distinct
    ref_sorted = np.take_along_axis(ip, np.argsort(-ip, axis=1)[:, : K + 1], axis=1)
    gaps = np.minimum(
        np.abs(np.diff(ref_sorted, axis=1))[:, :K],
        np.abs(np.diff(ref_sorted, axis=1, prepend=np.inf))[:, :K],
    )
    distinct = gaps > 1e-5
    assert distinct.mean() > 0.9
    np.testing.assert_array_equal(found[distinct], ids[order][distinct])


def test_empty_and_oversized_k_give_missing_markers() -> None:
    backend = build("exact", np.empty(0, dtype=np.int64), np.empty((0, 8), dtype=np.float32))
    scores, ids = backend.search(_random_unit(2, 8, seed=3), 3)
    assert (ids == -1).all() and np.isneginf(scores).all()
    backend.add([4, 9], _random_unit(2, 8, seed=4))
    scores, ids = backend.search(_random_unit(1, 8, seed=5)[0], 5)  # a 1-D query is one row
    assert sorted(ids[0, :2].tolist()) == [4, 9]
    assert (ids[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()


# --------------------------------------------------------------------------- recall


@pytest.mark.parametrize(
    ("kind", "params", "search"),
    [("hnsw", {"ef_search": 64}, {"ef_search": 64}), ("ivf", {"nprobe": 16}, {"nprobe": 16})],
)
def test_ann_recall_against_exact(
    styled: tuple[np.ndarray, np.ndarray, np.ndarray],
    kind: str,
    params: dict[str, int],
    search: dict[str, int],
) -> None:
    ids, vectors, queries = styled
    exact = build("exact", ids, vectors)
    _, truth = exact.search(queries, K)

    started = time.perf_counter()
    ann = build(kind, ids, vectors, threads=2, **params)
    built = time.perf_counter() - started
    started = time.perf_counter()
    _, found = ann.search(queries, K)
    per_query_ms = (time.perf_counter() - started) * 1000 / len(queries)
    recall = _recall(found, truth)
    # the per-call path must give the same answer as the defaults it restates
    _, found_params = ann.search(queries, K, params=search)
    np.testing.assert_array_equal(found_params, found)
    log.info(
        "%s: n=%d dim=%d params=%s recall@10=%.4f build=%.2fs search=%.4f ms/query (batched)",
        kind, len(ids), vectors.shape[1], ann.params, recall, built, per_query_ms,
    )  # fmt: skip
    assert recall >= 0.95, f"{kind} recall@10 = {recall:.4f} with {ann.params}"


def test_search_params_per_call_and_default(
    styled: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    ids, vectors, queries = styled
    ivf = build("ivf", ids[:2000], vectors[:2000], nprobe=1)
    assert ivf.params == {"nlist": nlist_for(2000), "nprobe": 1}
    _, truth = build("exact", ids[:2000], vectors[:2000]).search(queries, K)
    low = _recall(ivf.search(queries, K)[1], truth)
    full = _recall(ivf.search(queries, K, params={"nprobe": ivf.params["nlist"]})[1], truth)
    assert full == pytest.approx(1.0) and low <= full
    assert ivf.faiss_index.nprobe == 1  # the per-call value changed nothing shared
    ivf.set_search_params(nprobe=8)
    assert ivf.params["nprobe"] == 8 and ivf.faiss_index.nprobe == 8

    hnsw = build("hnsw", ids[:500], vectors[:500], m=16)
    hnsw.set_search_params(ef_search=200)
    assert hnsw.params == {"m": 16, "ef_construction": 128, "ef_search": 200}
    with pytest.raises(InvalidArgumentError) as err:
        hnsw.set_search_params(nprobe=4)
    assert err.value.field == "params.nprobe"
    with pytest.raises(InvalidArgumentError) as err:
        ivf.search(queries, K, params={"ef_search": 10})
    assert err.value.field == "params.ef_search"
    with pytest.raises(InvalidArgumentError) as err:
        build("exact", ids[:10], vectors[:10]).search(queries, K, params={"nprobe": 2})
    assert err.value.field == "params.nprobe"


# --------------------------------------------------------------------------- removal


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_remove(kind: str, styled: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    ids, vectors, _ = styled
    backend = build(kind, ids[:2000], vectors[:2000])
    gone = ids[:100]
    assert backend.remove(np.concatenate([gone, [10**12]])) == 100  # an absent id is ignored
    assert len(backend) == 1900
    assert backend.remove([]) == 0
    _, found = backend.search(vectors[:100], K, params={"nprobe": 64} if kind == "ivf" else None)
    assert not np.isin(found, gone).any()
    backend.add(gone[:5], vectors[:5])  # a removed id can come back
    assert len(backend) == 1905
    _, found = backend.search(vectors[:5], 1, params={"nprobe": 64} if kind == "ivf" else None)
    assert found[:, 0].tolist() == gone[:5].tolist()


def test_hnsw_remove_raises_and_points_at_tombstones() -> None:
    backend = build("hnsw", [1, 2, 3], _random_unit(3, 8, seed=6))
    with pytest.raises(RemoveUnsupportedError, match="tombstones") as err:
        backend.remove([1])
    assert isinstance(err.value, XpStoreError)
    assert len(backend) == 3


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(
    kind: str, tmp_path: Path, styled: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> None:
    ids, vectors, queries = styled
    backend = build(kind, ids[:3000], vectors[:3000])
    stats = {"version": 1, "mode": "percentile", "checksum": "abc"}
    path = tmp_path / "main.faissx"
    written = save(backend, path, lsn=1234, stats_dict=stats)
    assert not path.with_name(path.name + ".tmp").exists()

    loaded, meta = load(path)
    assert type(loaded) is type(backend)
    assert (meta.kind, meta.dim, meta.lsn, meta.count) == (kind, backend.dim, 1234, 3000)
    assert meta.params == backend.params == loaded.params
    assert meta.stats == stats
    assert meta == written
    before = backend.search(queries, K)
    after = loaded.search(queries, K)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # the loaded index is live: it takes adds (and removes where supported)
    loaded.add([10**9], vectors[:1])
    assert len(loaded) == 3001


def test_save_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    save(build("exact", [1], _random_unit(1, 4, seed=8)), path, lsn=1)
    save(build("exact", [1, 2], _random_unit(2, 4, seed=9)), path, lsn=2)
    backend, meta = load(path)
    assert (meta.lsn, len(backend)) == (2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "main.faissx"
    save(build("hnsw", np.arange(200), _random_unit(200, 16, seed=10)), path, lsn=7)
    return path


@pytest.fixture
def no_deserialize(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object) -> None:
        pytest.fail("deserialize_index was called on an unverified file")

    monkeypatch.setattr(faiss, "deserialize_index", fail)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.usefixtures("no_deserialize")
@pytest.mark.parametrize("where", ["index_start", "index_middle", "index_end", "meta", "magic"])
def test_flipped_byte_is_corruption_before_faiss(saved: Path, where: str) -> None:
    size = saved.stat().st_size
    offset = {
        "index_start": size - 180 * 16 * 4,  # inside the stored vectors
        "index_middle": size // 2,
        "index_end": size - 1,
        "meta": index_file._HEADER.size + 5,
        "magic": 0,
    }[where]
    _flip(saved, offset)
    with pytest.raises(StoreCorruptionError, match=str(saved)):
        load(saved)


@pytest.mark.usefixtures("no_deserialize")
@pytest.mark.parametrize("keep", [0, 10, index_file._HEADER.size + 3, -1])
def test_truncated_file_is_corruption(saved: Path, keep: int) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(StoreCorruptionError, match=str(saved)):
        load(saved)


@pytest.mark.usefixtures("no_deserialize")
def test_newer_format_version_is_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    data[8:12] = (index_file.FORMAT_VERSION + 1).to_bytes(4, "little")
    saved.write_bytes(bytes(data))
    with pytest.raises(FormatVersionError, match=str(saved)):
        load(saved)


def test_meta_that_disagrees_with_index_is_corruption(saved: Path) -> None:
    """A well-checksummed file whose meta names the wrong kind is still refused (after FAISS)."""
    import hashlib
    import json

    data = saved.read_bytes()
    magic, version, meta_len, _ = index_file._HEADER.unpack_from(data)
    start = index_file._HEADER.size
    meta = json.loads(data[start : start + meta_len])
    meta["kind"] = "ivf"
    new_meta = json.dumps(meta, sort_keys=True).encode()
    digest = hashlib.sha256(new_meta).digest()
    header = index_file._HEADER.pack(magic, version, len(new_meta), digest)
    saved.write_bytes(header + new_meta + data[start + meta_len :])
    with pytest.raises(StoreCorruptionError, match="does not match"):
        load(saved)


# --------------------------------------------------------------------------- FAISS errors


def _resign_index(path: Path, blob: bytes) -> None:
    """Replace the index bytes of a saved file, with every checksum recomputed to match."""
    import hashlib
    import json

    data = path.read_bytes()
    magic, version, meta_len, _ = index_file._HEADER.unpack_from(data)
    start = index_file._HEADER.size
    meta = json.loads(data[start : start + meta_len])
    meta["index_sha256"] = hashlib.sha256(blob).hexdigest()
    meta["index_size"] = len(blob)
    new_meta = json.dumps(meta, sort_keys=True).encode()
    digest = hashlib.sha256(new_meta).digest()
    header = index_file._HEADER.pack(magic, version, len(new_meta), digest)
    path.write_bytes(header + new_meta + blob)


def test_garbage_faiss_bytes_are_corruption_with_the_faiss_error_attached(saved: Path) -> None:
    """Checksums that match garbage (a writer bug, not bit rot): FAISS refuses the bytes and the
    refusal crosses the boundary as a StoreCorruptionError naming the file."""
    _resign_index(saved, b"not a faiss index at all" * 4)
    with pytest.raises(StoreCorruptionError, match=str(saved)) as err:
        load(saved)
    assert type(err.value) is StoreCorruptionError
    assert isinstance(err.value.__cause__, RuntimeError)
    assert not isinstance(err.value.__cause__, XpStoreError)
    assert "FAISS cannot read the index" in str(err.value)


def test_search_parameter_faiss_refuses_is_an_invalid_argument() -> None:
    """``ef_search``/``nprobe`` pass our check (an int >= 1) but overflow FAISS's C++ type: the
    SWIG OverflowError arrives as an InvalidArgumentError naming the parameter."""
    hnsw = _small("hnsw")
    q = _random_unit(2, 8, seed=20)
    calls: tuple[Callable[[], object], ...] = (
        lambda: hnsw.search(q, 3, params={"ef_search": 2**31}),
        lambda: hnsw.search(q, 3, params={"ef_search": 2**31}, exclude=exclusion([1, 2])),
    )
    for call in calls:
        with pytest.raises(InvalidArgumentError) as err:
            call()
        assert err.value.field == "params.ef_search"
        assert isinstance(err.value.__cause__, OverflowError)
    with pytest.raises(InvalidArgumentError) as err:
        hnsw.set_search_params(ef_search=2**31)
    assert err.value.field == "ef_search" and isinstance(err.value.__cause__, OverflowError)
    assert hnsw.params["ef_search"] == backends.DEFAULT_EF_SEARCH  # nothing half-applied
    assert hnsw.search(q, 3)[1].shape == (2, 3)  # and the index still serves

    ivf = _small("ivf")
    with pytest.raises(InvalidArgumentError) as err:
        ivf.search(q, 3, params={"nprobe": 2**70})
    assert err.value.field == "params.nprobe" and isinstance(err.value.__cause__, OverflowError)


def test_build_parameters_faiss_refuses_are_invalid_arguments() -> None:
    vec = _random_unit(10, 4, seed=21)
    with pytest.raises(InvalidArgumentError) as err:
        build("hnsw", np.arange(10), vec, m=2**40)  # the factory string's int does not parse
    assert err.value.field == "m" and isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(InvalidArgumentError) as err:
        build("hnsw", np.arange(10), vec, ef_construction=2**40)
    assert err.value.field == "ef_construction"
    assert isinstance(err.value.__cause__, OverflowError)
    before = faiss.omp_get_max_threads()
    with pytest.raises(InvalidArgumentError) as err, faiss_threads(2**40):
        pass
    assert err.value.field == "threads" and isinstance(err.value.__cause__, OverflowError)
    assert faiss.omp_get_max_threads() == before


def test_faiss_errors_picks_the_class_and_keeps_the_cause(tmp_path: Path) -> None:
    boom = RuntimeError("Error in faiss::something: boom")
    with pytest.raises(XpStoreError) as err, faiss_errors("doing a thing"):
        raise boom
    assert type(err.value) is XpStoreError and err.value.__cause__ is boom
    assert "doing a thing" in str(err.value) and "boom" in str(err.value)
    with pytest.raises(InvalidArgumentError) as arg, faiss_errors("x", argument="nprobe"):
        raise OverflowError("in method 'nprobe_set', argument 2 of type 'size_t'")
    assert arg.value.field == "nprobe" and isinstance(arg.value.__cause__, OverflowError)
    assert isinstance(arg.value, ValueError)
    damaged = faiss_errors("reading", damaged=tmp_path / "f")
    with pytest.raises(StoreCorruptionError, match="rebuild") as bad, damaged:
        raise TypeError("wrong index type")
    assert str(tmp_path / "f") in str(bad.value)
    assert isinstance(bad.value.__cause__, TypeError)
    # an xpstore error raised inside passes through as itself, even though it is a ValueError
    mine = InvalidArgumentError("k must be >= 1", field="k")
    with pytest.raises(InvalidArgumentError) as same, faiss_errors("x", argument="nprobe"):
        raise mine
    assert same.value is mine
    with pytest.raises(MemoryError), faiss_errors("x"):  # not a FAISS failure: left alone
        raise MemoryError


@pytest.mark.parametrize("kind", KINDS)
def test_ids_reconstruct_and_exact_knn(kind: str) -> None:
    ids = np.random.default_rng(22).permutation(10_000)[:300].astype(np.int64)
    vectors = _random_unit(300, 8, seed=23)
    backend = build(kind, ids, vectors)
    np.testing.assert_array_equal(backend.ids(), np.sort(ids))
    if kind == "ivf":  # no direct map: reconstruction is refused, not crashed on
        with pytest.raises(XpStoreError, match="direct map"):
            backend.reconstruct(int(ids[0]))
    else:
        np.testing.assert_array_equal(backend.reconstruct(int(ids[5])), vectors[5])
        with pytest.raises(XpStoreError) as err:
            backend.reconstruct(10**9)  # not in the index
        assert isinstance(err.value.__cause__, RuntimeError)
    queries = _random_unit(20, 8, seed=24)
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    np.testing.assert_array_equal(exact_knn(queries, vectors, 5), truth)


def test_only_backends_imports_faiss() -> None:
    """The boundary is one module: the rest of the index reaches FAISS through it."""
    import ast

    folder = Path(backends.__file__).parent
    importers = set()
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name == "faiss" for a in node.names):
                importers.add(path.name)
            if isinstance(node, ast.ImportFrom) and node.module == "faiss":
                importers.add(path.name)
    assert importers == {"backends.py"}


# --------------------------------------------------------------------------- bad input


def _small(kind: str) -> IndexBackend:
    return build(kind, np.arange(50), _random_unit(50, 8, seed=11))


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_name_the_field(kind: str) -> None:
    backend = _small(kind)
    good = _random_unit(2, 8, seed=12)
    nan = good.copy()
    nan[1, 3] = np.nan
    inf = good.copy()
    inf[0, 0] = np.inf
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: backend.add([100, 101], _random_unit(2, 9, seed=13)), "vector"),
        (lambda: backend.add([100, 101], nan), "vector"),
        (lambda: backend.add([100, 101], good[0]), "vector"),  # add wants 2-D
        (lambda: backend.add([100, 100], good), "ids"),
        (lambda: backend.add([100], good), "ids"),
        (lambda: backend.add([-1, 100], good), "ids"),
        (lambda: backend.add([1.5, 2.5], good), "ids"),
        (lambda: backend.search(_random_unit(1, 7, seed=14), 3), "vector"),
        (lambda: backend.search(inf, 3), "vector"),
        (lambda: backend.search(nan, 3), "vector"),
        (lambda: backend.search(good, 0), "k"),
        (lambda: backend.search(good, -2), "k"),
        (lambda: backend.search(good, True), "k"),
        (lambda: backend.search(good, 2.0), "k"),  # type: ignore[arg-type]
    ]
    for call, name in cases:
        with pytest.raises(InvalidArgumentError) as err:
            call()
        assert err.value.field == name, (call, err.value)
    assert len(backend) == 50  # nothing half-added


def test_bad_build_arguments() -> None:
    vec = _random_unit(10, 4, seed=15)
    with pytest.raises(InvalidArgumentError) as err:
        build("hnsw", np.arange(10), vec, ef_construction=MIN_EF_CONSTRUCTION - 1)
    assert err.value.field == "ef_construction"
    with pytest.raises(InvalidArgumentError) as err:
        build("annoy", np.arange(10), vec)
    assert err.value.field == "kind"
    with pytest.raises(InvalidArgumentError) as err:
        build("exact", np.arange(10), vec, nprobe=3)
    assert err.value.field == "nprobe"
    with pytest.raises(InvalidArgumentError) as err:
        build("ivf", np.empty(0, dtype=np.int64), np.empty((0, 4), dtype=np.float32))
    assert err.value.field == "train_vectors"
    with pytest.raises(InvalidArgumentError) as err:
        build("ivf", np.arange(10), vec, nlist=11)
    assert err.value.field == "nlist"
    with pytest.raises(InvalidArgumentError) as err:
        save(build("exact", [1], vec[:1]), Path("unused"), lsn=-1)
    assert err.value.field == "lsn"


# --------------------------------------------------------------------------- choice, sizing


def test_choose_backend_thresholds() -> None:
    assert choose_backend(0) == "exact"
    assert choose_backend(9_999) == "exact"
    assert choose_backend(10_000) == "hnsw"
    assert choose_backend(1_999_999) == "hnsw"
    assert choose_backend(2_000_000) == "ivf"
    assert choose_backend(99, exact_below=100, hnsw_below=1000) == "exact"
    assert choose_backend(100, exact_below=100, hnsw_below=1000) == "hnsw"
    assert choose_backend(1000, exact_below=100, hnsw_below=1000) == "ivf"
    assert choose_backend(500, exact_below=100, hnsw_below=100) == "ivf"  # HNSW switched off
    with pytest.raises(InvalidArgumentError):
        choose_backend(-1)
    with pytest.raises(InvalidArgumentError):
        choose_backend(5, exact_below=10, hnsw_below=5)


def test_nlist_for_size() -> None:
    assert nlist_for(0) == 1
    assert nlist_for(10) == 1
    assert nlist_for(8000) == 8000 // 39  # capped by training points per centroid
    assert nlist_for(1_000_000) == 4000
    assert nlist_for(10**12) == 65_536


def test_build_thread_limit_is_restored() -> None:
    before = faiss.omp_get_max_threads()
    backend = build("ivf", np.arange(400), _random_unit(400, 8, seed=16), threads=1)
    assert isinstance(backend, IVFBackend)
    assert faiss.omp_get_max_threads() == before
    with pytest.raises(InvalidArgumentError) as err:
        build("exact", [1], _random_unit(1, 8, seed=17), threads=0)
    assert err.value.field == "threads"
    assert isinstance(build("hnsw", [1], _random_unit(1, 8, seed=18)), HNSWBackend)
