"""``Store.put_fingerprints``: the columnar bulk path (issue 15).

What it must guarantee: the records are the ones ``put_many`` would store (the WAL payloads and
LMDB envelopes byte for byte), a bad value anywhere refuses the whole batch naming its row and
field with nothing written, the k-NN index serves the batch as soon as the call returns, and a
SIGKILL during a call leaves each batch wholly present or wholly absent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import files_of
from xpstore import Store
from xpstore.demo.synthetic import STYLES, sample_batch_values
from xpstore.errors import InvalidRecordError, RecordNotFoundError, RecordTooLargeError
from xpstore.model.codec import (
    PutOp,
    decode_op,
    encode_fingerprint_batch,
    encode_fingerprint_puts,
    encode_op,
    envelope_from_put,
    envelopes_from_puts,
    put_head,
)
from xpstore.model.columns import FingerprintColumns, fingerprint_columns
from xpstore.model.priority_rows import fingerprint_inputs, inputs_for
from xpstore.model.records import (
    BATCH_FIELDS,
    METADATA_MAX_KEY_CHARS,
    METADATA_MAX_KEYS,
    METADATA_MAX_VALUE_CHARS,
    STREAMING_FIELDS,
    STREAMING_FIELDS_NO_HARMONIC,
    Fingerprint,
)

T0 = 1.7e9
_STREAM_IDX = [BATCH_FIELDS.index(n) for n in STREAMING_FIELDS]


def _values(n: int, seed: int = 0) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng(seed)
    styles = list(STYLES)
    return np.vstack([sample_batch_values(rng, styles[i % len(styles)]) for i in range(n)])


def _model(cols: FingerprintColumns, i: int) -> Fingerprint:
    """Row ``i`` of ``cols`` as the model put_many would be given."""
    d: dict[str, Any] = {"track_id": cols.track_ids[i], "ts": float(cols.ts[i])}
    if cols.batch is not None:
        d["batch"] = dict(zip(BATCH_FIELDS, cols.batch[i].tolist(), strict=True))
    if cols.streaming is not None:
        assert cols.confidence is not None and cols.chunk_counts is not None
        names = cols.streaming_names
        d["streaming"] = {
            "values": dict(zip(names, cols.streaming[i].tolist(), strict=True)),
            "confidence": dict(zip(names, cols.confidence[i].tolist(), strict=True)),
            "chunk_count": cols.chunk_counts[i],
        }
    if cols.embeddings is not None:
        d["embedding"] = cols.embeddings[i].tolist()
    if cols.metadata is not None and cols.metadata[i] is not None:
        d["metadata"] = cols.metadata[i]
    if cols.algorithm_version is not None:
        d["algorithm_version"] = cols.algorithm_version
    return Fingerprint(**d)


def _shapes(n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    b = _values(n)
    s = b[:, _STREAM_IDX]
    c = rng.uniform(0, 1, (n, 13))
    no_harm = [STREAMING_FIELDS.index(x) for x in STREAMING_FIELDS_NO_HARMONIC]
    meta = [{"title": f"t{i}", "artist": "a"} if i % 3 else None for i in range(n)]
    return [
        {"batch": b},
        {"batch": b, "metadata": meta, "algorithm_version": 8},
        {"streaming": s, "confidence": c, "chunk_counts": np.arange(n) * 300},
        {"batch": b, "streaming": s, "confidence": c, "embeddings": rng.normal(size=(n, 20)),
         "metadata": meta},
        {"streaming": s[:, no_harm], "confidence": c[:, no_harm],
         "embeddings": rng.normal(size=(n, 4))},
    ]  # fmt: skip


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("shape", range(5))
def test_payloads_are_put_manys_bytes(shape: int) -> None:
    n = 9
    kw = _shapes(n)[shape]
    cols = fingerprint_columns([f"tr{i}" for i in range(n)], ts=T0 + np.arange(n), **kw)
    got = encode_fingerprint_puts(cols)
    for i in range(n):
        expected = encode_op(PutOp(_model(cols, i)))
        assert got[i] == expected
        assert decode_op(got[i]) == decode_op(expected)
    assert fingerprint_inputs(100, cols.ts, cols.confidence) == [
        inputs_for(_model(cols, i), 100 + i, float(cols.ts[i])) for i in range(n)
    ]


@pytest.mark.parametrize("n", [1, 8, 30])
@pytest.mark.parametrize("first", [0, 120, 250, 65_530, 2**32 - 3, 2**40])
def test_envelopes_match_the_single_record_builder(first: int, n: int) -> None:
    cols = fingerprint_columns([f"t{i}" for i in range(n)], _values(n), ts=T0 + np.arange(n))
    payloads, cuts = encode_fingerprint_batch(cols)
    assert payloads == encode_fingerprint_puts(cols)
    assert cuts == [put_head(p)[3] for p in payloads]  # type: ignore[index]
    got = envelopes_from_puts(payloads, kind="fingerprint", ts=cols.ts, first_lsn=first)
    assert envelopes_from_puts(payloads, kind="fingerprint", ts=cols.ts, first_lsn=first,
                               cuts=cuts) == got  # fmt: skip
    assert got == [
        envelope_from_put(p, kind="fingerprint", ts=float(t), updated_lsn=first + i)
        for i, (p, t) in enumerate(zip(payloads, cols.ts, strict=True))
    ]


_finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
    meta=st.lists(
        st.none() | st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=8),
                                    max_size=3),
        min_size=6, max_size=6,
    ),
    tids=st.lists(st.text(min_size=1, max_size=12), min_size=6, max_size=6),
    ts=st.floats(0, 2e10),
    dim=st.none() | st.integers(1, 40),
)  # fmt: skip
def test_any_valid_batch_encodes_like_the_models(
    n: int, seed: int, meta: list[Any], tids: list[str], ts: float, dim: int | None
) -> None:
    rng = np.random.default_rng(seed)
    emb = None if dim is None else rng.normal(size=(n, dim)) * 10.0 ** rng.integers(-5, 5)
    cols = fingerprint_columns(tids[:n], _values(n, seed), embeddings=emb, metadata=meta[:n],
                               ts=ts)  # fmt: skip
    got, cuts = encode_fingerprint_batch(cols)
    assert got == [encode_op(PutOp(_model(cols, i))) for i in range(n)]
    assert cuts == [put_head(p)[3] for p in got]  # type: ignore[index]


# --------------------------------------------------------------------------- the store


def test_stored_like_put_many(tmp_path: Path) -> None:
    n = 40
    kw = _shapes(n)[3]
    tids = [f"tr{i % 30}" for i in range(n)]  # ten tracks put twice in the batch
    cols = fingerprint_columns(tids, ts=T0 + np.arange(n), **kw)
    with Store.open(tmp_path / "bulk", create=True) as a, \
            Store.open(tmp_path / "many", create=True) as b:  # fmt: skip
        ids_a = a.put_fingerprints(tids, ts=T0 + np.arange(n), **kw)
        ids_b = b.put_many([_model(cols, i) for i in range(n)])
        assert ids_a == ids_b
        assert a.embedding_dim == b.embedding_dim == 20
        for rid in ids_a:  # from the overlay, before the applier ran
            assert a.get(rid) == b.get(rid)
        for t in set(tids):
            assert a.get_fingerprint(t) == b.get_fingerprint(t)
        a.flush()
        b.flush()
        ta, tb = a.parts.engine.tables, b.parts.engine.tables
        with ta.reading() as xa, tb.reading() as xb:
            for rid in ids_a:
                assert bytes(ta.get_record(xa, rid) or b"") == bytes(tb.get_record(xb, rid) or b"")
            for t in set(tids):
                assert ta.get_track(xa, t) == tb.get_track(xb, t)
        assert a.count("fingerprint") == b.count("fingerprint") == n
        assert [e.id for e in a.scan("fingerprint")] == [e.id for e in b.scan("fingerprint")]
    with Store.open(tmp_path / "bulk") as a:
        assert a.get_fingerprint("tr3").id == ids_a[33]


def test_recovered_after_a_reopen_with_the_applier_held(tmp_path: Path) -> None:
    n = 50
    vals = _values(n)
    with Store.open(tmp_path / "s", create=True, hold_applier=True) as s:
        ids = s.put_fingerprints([f"t{i}" for i in range(n)], vals, ts=T0)
    with Store.open(tmp_path / "s") as s:
        assert s.count("fingerprint") == n
        fp = s.get(ids[7]).record
        assert isinstance(fp, Fingerprint) and fp.batch is not None
        assert fp.batch.as_dict() == dict(zip(BATCH_FIELDS, vals[7].tolist(), strict=True))


def test_names_and_mappings_give_the_same_records(store: Store) -> None:
    vals = _values(5)
    perm = np.random.default_rng(3).permutation(25)
    names = [BATCH_FIELDS[j] for j in perm]
    a = store.put_fingerprints(["a", "b", "c", "d", "e"], vals, ts=T0)
    b = store.put_fingerprints(["a", "b", "c", "d", "e"], vals[:, perm], names=names, ts=T0)
    c = store.put_fingerprints(["a", "b", "c", "d", "e"],
                               {name: vals[:, j] for j, name in enumerate(BATCH_FIELDS)}, ts=T0)
    for i in range(5):
        ra, rb, rc = (store.get(x[i]).record for x in (a, b, c))
        assert ra == rb == rc


def test_index_serves_the_batch_at_once(tmp_path: Path) -> None:
    n = 300
    vals = _values(n, seed=4)
    tids = [f"t{i}" for i in range(n)]
    with Store.open(tmp_path / "bulk", create=True, index_auto_rebuild=False) as a, \
            Store.open(tmp_path / "many", create=True, index_auto_rebuild=False) as b:  # fmt: skip
        a.put_fingerprints(tids[:50], vals[:50], ts=T0)
        b.put_many([{"kind": "fingerprint", "track_id": t, "ts": T0,
                     "batch": dict(zip(BATCH_FIELDS, v.tolist(), strict=True))}
                    for t, v in zip(tids[:50], vals[:50], strict=True)])  # fmt: skip
        a.similar("t0", k=3)  # attach: the next batches go through the ack path
        b.similar("t0", k=3)
        # the second batch supersedes t0..t9 and repeats t60 within itself
        tids2 = tids[:10] + tids[50:] + ["t60"]
        vals2 = np.vstack([vals[100:110], vals[50:], vals[61:62]])
        a.put_fingerprints(tids2, vals2, ts=T0 + 1)
        b.put_many([{"kind": "fingerprint", "track_id": t, "ts": T0 + 1,
                     "batch": dict(zip(BATCH_FIELDS, v.tolist(), strict=True))}
                    for t, v in zip(tids2, vals2, strict=True)])  # fmt: skip
        assert a.index_status()["live"] == b.index_status()["live"] == n
        for t in ("t0", "t5", "t60", "t200"):
            ha, hb = a.similar(t, k=10), b.similar(t, k=10)
            assert [(h.track_id, h.record_id) for h in ha] == [
                (h.track_id, h.record_id) for h in hb
            ]
            assert np.allclose([h.score for h in ha], [h.score for h in hb])
        assert a.get_fingerprint("t60").id == a.parts.reader.read_track("t60")
        assert all(h.track_id != "t60" or h.record_id == a.get_fingerprint("t60").id
                   for h in a.similar("t61", k=50))  # fmt: skip


def test_first_embedding_fixes_the_dimension(store: Store) -> None:
    vals = _values(3)
    store.put_fingerprints(["a", "b", "c"], vals, embeddings=np.ones((3, 6)))
    assert store.embedding_dim == 6
    with pytest.raises(InvalidRecordError) as err:
        store.put_fingerprints(["d"], vals[:1], embeddings=np.ones((1, 5)))
    assert err.value.field == "embedding"


# --------------------------------------------------------------------------- bad input


def _bad_cases() -> list[tuple[dict[str, Any], str, str]]:
    """(arguments over 6 rows, field, text in the message)."""
    vals = _values(6)
    nan = vals.copy()
    nan[3, BATCH_FIELDS.index("tempo_bpm")] = np.nan
    low = vals.copy()
    low[4, BATCH_FIELDS.index("lufs")] = 0.5
    late = vals.copy()
    late[5, 0] = 2.0
    late[2, 24] = -1.5  # the earlier row is the one named
    s = vals[:, _STREAM_IDX]
    c = np.full((6, 13), 0.5)
    badc = c.copy()
    badc[1, 2] = 1.5
    bads = s.copy()
    bads[2, STREAMING_FIELDS.index("tempo_bpm")] = -3.0
    tids = [f"t{i}" for i in range(6)]
    return [
        ({"track_ids": tids, "batch": nan}, "batch.tempo_bpm", "records[3]"),
        ({"track_ids": tids, "batch": low}, "batch.lufs", "records[4]"),
        ({"track_ids": tids, "batch": late}, "batch.phase_correlation", "records[2]"),
        ({"track_ids": tids, "batch": vals[:, :24]}, "batch", "25 columns"),
        ({"track_ids": tids[:5], "batch": vals}, "batch", "5 rows"),
        ({"track_ids": tids, "batch": vals.astype(str)}, "batch", "numbers"),
        ({"track_ids": tids, "batch": vals, "names": [*BATCH_FIELDS[:24], "tempo"]},
         "batch.tempo", "unknown"),
        ({"track_ids": tids, "batch": {n: vals[:, j] for j, n in enumerate(BATCH_FIELDS[1:])}},
         "batch.sub_bass_pct", "missing"),
        ({"track_ids": [*tids[:5], ""], "batch": vals}, "track_id", "records[5]"),
        ({"track_ids": tids, "streaming": s, "confidence": badc},
         "streaming.confidence.peak_consistency", "records[1]"),
        ({"track_ids": tids, "streaming": bads, "confidence": c},
         "streaming.values.tempo_bpm", "records[2]"),
        ({"track_ids": tids, "streaming": s}, "confidence", "confidence"),
        ({"track_ids": tids, "streaming": s, "confidence": c, "chunk_counts": [-1] * 6},
         "streaming.chunk_count", "records[0]"),
        ({"track_ids": tids}, "batch", "batch or streaming"),
        ({"track_ids": tids, "batch": vals, "embeddings": np.full((6, 3), np.inf)},
         "embedding", "records[0]"),
        ({"track_ids": tids, "batch": vals, "metadata": [None] * 5 + [{"a": 3}]},
         "metadata.a", "records[5]"),
        ({"track_ids": tids, "batch": vals, "metadata": [{"": "x"}] + [None] * 5},
         "metadata", "records[0]"),
        ({"track_ids": tids, "batch": vals, "metadata": [None] * 3}, "metadata", "6"),
        # the batch-wide checks find these; the row-by-row pass names the first bad row
        ({"track_ids": tids, "batch": vals,
          "metadata": [{"a": "x"}] * 4 + [{"a": "y" * (METADATA_MAX_VALUE_CHARS + 1)}] * 2},
         "metadata.a", "records[4]"),
        ({"track_ids": tids, "batch": vals,
          "metadata": [None, None, {f"k{i}": "v" for i in range(METADATA_MAX_KEYS + 1)},
                       None, None, {"a": "b"}]},
         "metadata", "records[2]"),
        ({"track_ids": tids, "batch": vals,
          "metadata": [{"a": "b"}, {"k" * (METADATA_MAX_KEY_CHARS + 1): "v"}, *[None] * 4]},
         "metadata", "records[1]"),
        ({"track_ids": tids, "batch": vals, "metadata": [*[{"a": "b"}] * 3, {7: "v"}, None, None]},
         "metadata", "records[3]"),
        ({"track_ids": tids, "batch": vals, "metadata": [{"a": "b"}, None, "title", *[None] * 3]},
         "metadata", "records[2]"),
        ({"track_ids": tids, "batch": vals, "ts": [T0] * 5 + [-1.0]}, "ts", "records[5]"),
        ({"track_ids": tids, "batch": vals, "algorithm_version": 1.5}, "algorithm_version",
         "string"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_row_and_field_and_writes_nothing(store_path: Path, case: int) -> None:
    kwargs, field, text = _bad_cases()[case]
    with Store.open(store_path, create=True) as s:
        s.put_fingerprints(["keep"], _values(1))
        s.flush()
        before = files_of(store_path)
        with pytest.raises(InvalidRecordError) as err:
            s.put_fingerprints(**kwargs)
        assert err.value.field == field
        assert text in str(err.value)
        assert s.count() == 1
        assert s.stats()["acked_lsn"] == s.get_fingerprint("keep").id
    assert files_of(store_path).keys() == before.keys()


def test_metadata_mappings_of_any_type_are_stored_as_dicts(store: Store) -> None:
    meta: list[Any] = [types.MappingProxyType({"title": "a"}), {}, None, {"title": "d" * 4096}]
    ids = store.put_fingerprints(["a", "b", "c", "d"], _values(4), metadata=meta)
    got = [store.get(rid).record for rid in ids]
    assert [fp.metadata for fp in got if isinstance(fp, Fingerprint)] == [
        {"title": "a"}, {}, None, {"title": "d" * 4096}
    ]


def test_reads_during_and_after_bulk_batches_match_put_many(tmp_path: Path) -> None:
    """Two batches superseding tracks within and across batches, then deletes: every read
    (get, get_fingerprint, scan, count, similar) agrees with put_many of the same records, from
    the overlay (applier held), after the apply, and after a reopen (WAL replay)."""
    n = 30
    vals = _values(2 * n, seed=5)
    first = [f"t{i}" for i in range(n)]
    second = [f"t{i}" for i in range(0, n, 2)] + ["t1", "u0", "t1"]  # t1 twice, a new track
    batches = [(first, vals[:n], T0), (second, vals[n : n + len(second)], T0 + 1)]

    def fill(s: Store, bulk: bool) -> list[int]:
        ids: list[int] = []
        for tids, v, ts in batches:
            if bulk:
                ids += s.put_fingerprints(tids, v, ts=ts, metadata=[{"t": t} for t in tids])
            else:
                ids += s.put_many([{"kind": "fingerprint", "track_id": t, "ts": ts,
                                    "metadata": {"t": t},
                                    "batch": dict(zip(BATCH_FIELDS, row.tolist(), strict=True))}
                                   for t, row in zip(tids, v, strict=True)])  # fmt: skip
        s.delete_track("t3")
        s.delete(ids[5])  # t5's only fingerprint
        s.delete(ids[0])  # t0's first, superseded one
        return ids

    def reads(s: Store, ids: list[int]) -> list[Any]:
        live = {t: s.get_fingerprint(t).id for t in {*first, *second} - {"t3", "t5"}}
        got = [s.get(rid) for rid in ids if rid not in (ids[5], ids[0])]
        scan = [(e.id, e.record) for e in s.scan("fingerprint")]
        near = [(h.track_id, h.record_id) for h in s.similar("t2", k=8)]
        return [live, got, scan, s.count("fingerprint"), near]

    for hold in (True, False):
        a_path, b_path = tmp_path / f"bulk{hold}", tmp_path / f"many{hold}"
        with Store.open(a_path, create=True, hold_applier=hold, index_auto_rebuild=False) as a, \
                Store.open(b_path, create=True, hold_applier=hold,
                           index_auto_rebuild=False) as b:  # fmt: skip
            ids_a, ids_b = fill(a, True), fill(b, False)
            assert ids_a == ids_b
            assert a.get_fingerprint("t1").id == ids_a[-1]
            assert a.count("fingerprint") == n + len(second) - 2
            with pytest.raises(RecordNotFoundError):
                a.get_fingerprint("t3")
            assert reads(a, ids_a) == reads(b, ids_b)
            if not hold:
                a.flush()
                b.flush()
                assert reads(a, ids_a) == reads(b, ids_b)
        with Store.open(a_path, index_auto_rebuild=False) as a, \
                Store.open(b_path, index_auto_rebuild=False) as b:  # fmt: skip
            assert reads(a, ids_a) == reads(b, ids_b)


def test_size_limits_are_enforced(tmp_path: Path) -> None:
    vals = _values(3)
    with Store.open(tmp_path / "s", create=True, max_record_bytes=1024,
                    max_batch_records=4) as s:  # fmt: skip
        with pytest.raises(RecordTooLargeError) as err:
            s.put_fingerprints(["a", "b", "c"], vals,
                               metadata=[None, {"notes": "x" * 2000}, None])  # fmt: skip
        assert err.value.field == "metadata" and "records[1]" in str(err.value)
        with pytest.raises(RecordTooLargeError):
            s.put_fingerprints([f"t{i}" for i in range(5)], _values(5))
        assert s.count() == 0
        assert s.put_fingerprints([], np.zeros((0, 25))) == []


# --------------------------------------------------------------------------- crashes

_CHILD = """
import sys
import numpy as np
from xpstore import Store
from xpstore.demo.synthetic import sample_batch_values
path, n, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "hold"
with Store.open(path, create=True, hold_applier=hold) as s:
    b = 0
    while True:
        vals = sample_batch_values(np.random.default_rng(b), "techno", n)
        ids = s.put_fingerprints([f"b{b}-{i}" for i in range(n)], vals, ts=1.7e9 + b,
                                 metadata=[{"batch": str(b)}] * n)
        print(b, ids[0], ids[-1], flush=True)
        b += 1
"""


@pytest.mark.parametrize("seed", range(3))
def test_sigkill_during_put_fingerprints_keeps_each_batch_whole(tmp_path: Path,
                                                                seed: int) -> None:  # fmt: skip
    """A real writer is killed mid-stream: every acknowledged batch is back bit for bit, the
    batch in flight is all there or not at all, and ids go on without repeating. With seed 2
    the child's applier is held, so recovery replays every batch from the WAL."""
    path = tmp_path / "s"
    n = 400
    hold = "hold" if seed == 2 else "apply"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(n), hold],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    acked: list[tuple[int, int, int]] = []
    target = 2 + seed * 3
    try:
        while len(acked) < target:
            line = proc.stdout.readline()
            if not line:
                break
            b, first, last = map(int, line.split())
            acked.append((b, first, last))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        _, raw_err = proc.communicate(timeout=30)  # reads and closes both pipes
        err = raw_err.decode()
    assert len(acked) == target, err
    with Store.open(path) as s:
        fps = list(s.scan("fingerprint"))
        by_batch: dict[int, list[Fingerprint]] = {}
        for exp in fps:
            fp = exp.record
            assert isinstance(fp, Fingerprint) and fp.metadata is not None
            by_batch.setdefault(int(fp.metadata["batch"]), []).append(fp)
        for b, first, last in acked:
            got = by_batch.pop(b)
            assert len(got) == n == last - first + 1
            vals = sample_batch_values(np.random.default_rng(b), "techno", n)
            for i, fp in enumerate(sorted(got, key=lambda f: int(f.track_id.split("-")[1]))):
                assert fp.batch is not None
                assert fp.batch.as_dict() == dict(zip(BATCH_FIELDS, vals[i].tolist(),
                                                      strict=True))  # fmt: skip
        assert set(by_batch) <= {len(acked)}  # at most the batch in flight
        for rest in by_batch.values():
            assert len(rest) == n  # all or nothing
        top = max(e.id for e in fps)
        more = s.put_fingerprints(["after"], sample_batch_values(np.random.default_rng(0),
                                                                 "techno", 1))  # fmt: skip
        assert more[0] > top
