"""Settings in sections, changed through one door: ``Store.reconfigure`` logs the new settings
document through the WAL, applies live knobs at once and refuses the rest; the first embedding
fixes ``embedding_dim`` the same way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from xpstore import (
    InvalidArgumentError,
    InvalidRecordError,
    ReadOnlyStoreError,
    Store,
    StoreConfig,
)
from xpstore.config import FLAT, LIVE, SESSION_ONLY, dotted, make_config
from xpstore.demo.synthetic import make_fingerprint, make_prediction
from xpstore.persistence.lmdb_tables import LmdbTables

REPO = Path(__file__).resolve().parents[1]


def child(script: str, *args: object) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (a real process, killed for real)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XPSTORE_CRASH_AT", None)
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


# ------------------------------------------------------------------------- the config itself


def test_flat_dotted_and_sectioned_names_are_one_setting() -> None:
    a = make_config(index_ef_search=96, durability="group", retention={"prediction": {
        "max_count": 5}})  # fmt: skip
    b = make_config(**{"index.ef_search": 96, "wal.durability": "group",
                       "retention.rules": {"prediction": {"max_count": 5}}})  # fmt: skip
    c = StoreConfig(index={"ef_search": 96}, wal={"durability": "group"},
                    retention={"rules": {"prediction": {"max_count": 5}}})  # fmt: skip
    assert a == b == c
    assert a.get("index_ef_search") == a.get("index.ef_search") == a.index.ef_search == 96
    assert StoreConfig.from_json(a.to_json()) == a


def test_every_flat_name_maps_to_a_field_and_back() -> None:
    for flat, name in FLAT.items():
        assert dotted(flat) == name
        assert dotted(name) == name
    names = set(FLAT.values())
    assert names >= SESSION_ONLY and names >= LIVE
    with pytest.raises(InvalidArgumentError) as err:
        dotted("index.nope")
    assert err.value.field == "index.nope"


def test_a_config_persisted_flat_by_an_older_version_still_reads() -> None:
    old = '{"durability": "group", "index_ef_search": 77, "priority_alpha": 0.3, ' \
          '"retention": {"fingerprint": {"max_count": 9}}, "hold_applier": false}'
    cfg = StoreConfig.from_json(old)
    assert cfg.wal.durability == "group" and cfg.index.ef_search == 77
    assert cfg.sampling.alpha == 0.3 and cfg.retention.rules["fingerprint"].max_count == 9


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(InvalidArgumentError) as err:
        make_config(index_ef_search=0)
    assert err.value.field == "index.ef_search"
    with pytest.raises(InvalidArgumentError):
        make_config(no_such_knob=1)


# ------------------------------------------------------------------------- reconfigure


def test_reconfigure_is_durable_and_live(store_path: Path) -> None:
    rng = np.random.default_rng(1)
    with Store.open(store_path, create=True) as store:
        ids = store.put_many([make_prediction(rng) for _ in range(20)])
        prios = [1.0 + i for i in range(len(ids))]
        store.update_priorities(ids, prios)
        before = store.stats()["next_lsn"]
        cfg = store.reconfigure(priority_alpha=0.0, **{"index.ef_search": 96})
        assert cfg.sampling.alpha == 0.0 and cfg.index.ef_search == 96
        assert store.config == cfg
        assert store.stats()["next_lsn"] == before + 1  # one logged operation
        probs = store.sampling_probabilities("prediction")  # alpha 0: uniform
        assert set(probs) == set(ids)
        assert np.allclose(list(probs.values()), 1 / len(ids))
        store.reconfigure(priority_alpha=1.0)  # live on an attached sampler too: P ~ priority
        probs = store.sampling_probabilities("prediction")
        assert np.allclose([probs[i] for i in ids], np.array(prios) / sum(prios))
    with Store.open(store_path) as store:
        assert store.config.sampling.alpha == 1.0 and store.config.index.ef_search == 96


def test_reconfigure_reaches_the_running_components(store_path: Path) -> None:
    rng = np.random.default_rng(2)
    with Store.open(store_path, create=True, apply_interval_ms=60_000) as store:
        store.put_many([make_prediction(rng, ts=1000.0 + i) for i in range(10)])
        assert store.apply_retention() == {}
        store.reconfigure(retention={"prediction": {"max_count": 4}})
        assert store.apply_retention() == {"prediction": 6}
        task = store.parts.tasks["snapshot"]
        assert not task.due()
        store.reconfigure(snapshot_every_records=1)
        assert task.due()
        assert store.config.apply.interval_ms == 60_000  # the session's override stays
        store.reconfigure(apply_interval_ms=50)  # ... until the knob itself is changed
        assert store.config.apply.interval_ms == 50


def test_reconfigure_refuses_what_needs_a_reopen_and_changes_nothing(store_path: Path) -> None:
    with Store.open(store_path, create=True) as store:
        store.put(make_prediction(np.random.default_rng(3)))
        before = (store.stats()["next_lsn"], store.config)
        for name, value in [("durability", "none"), ("segment_max_bytes", 1 << 20),
                            ("map_size", 1 << 30), ("embedding_dim", 8)]:  # fmt: skip
            with pytest.raises(InvalidArgumentError, match="reopen") as err:
                store.reconfigure(**{name: value})
            assert err.value.field == name
        with pytest.raises(InvalidArgumentError, match="one session"):
            store.reconfigure(hold_applier=True)
        with pytest.raises(InvalidArgumentError) as err:
            store.reconfigure(index_ef_search=0)
        assert err.value.field == "index.ef_search"
        with pytest.raises(InvalidArgumentError):
            store.reconfigure(nonsense=1)
        assert (store.stats()["next_lsn"], store.config) == before
    with Store.open(store_path, readonly=True) as ro, pytest.raises(ReadOnlyStoreError):
        ro.reconfigure(index_ef_search=80)


RECONFIGURE_CHILD = """
import os, signal, sys
from xpstore import Store
store = Store.open(sys.argv[1], hold_applier=True)
store.reconfigure(index_ef_search=123, retention_interval_s=5.0)
print("ACKED", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_an_acknowledged_reconfigure_survives_a_sigkill(store_path: Path) -> None:
    Store.open(store_path, create=True).close()
    proc = child(RECONFIGURE_CHILD, store_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "ACKED" in proc.stdout
    with Store.open(store_path, readonly=True) as ro:  # LMDB never saw it: only the WAL has it
        assert ro.config.index.ef_search == 64
    with Store.open(store_path) as store:  # replayed
        assert store.config.index.ef_search == 123
        assert store.config.retention.interval_s == 5.0


# ------------------------------------------------------------------------- embedding_dim


EMBEDDING_CHILD = """
import os, signal, sys
import numpy as np
from xpstore import Store
from xpstore.demo.synthetic import make_fingerprint
store = Store.open(sys.argv[1], hold_applier=True)
store.put(make_fingerprint(np.random.default_rng(0), "t1", embedding_dim=6))
print("ACKED", store.embedding_dim, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_first_embedding_fixes_the_dimension_through_the_wal(store_path: Path) -> None:
    Store.open(store_path, create=True).close()
    proc = child(EMBEDDING_CHILD, store_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "ACKED 6" in proc.stdout
    with Store.open(store_path) as store:
        assert store.embedding_dim == 6 and store.config.records.embedding_dim == 6
        rng = np.random.default_rng(1)
        with pytest.raises(InvalidRecordError, match="dimension 4"):
            store.put(make_fingerprint(rng, "t2", embedding_dim=4))
        store.put(make_fingerprint(rng, "t2", embedding_dim=6))


def test_two_first_embeddings_at_once_agree_on_one_dimension(store_path: Path) -> None:
    rng = np.random.default_rng(2)
    with Store.open(store_path, create=True) as store:
        fps = {d: [make_fingerprint(rng, f"d{d}-{i}", embedding_dim=d) for i in range(20)]
               for d in (4, 5)}  # fmt: skip
        errors: dict[int, list[Exception]] = {4: [], 5: []}
        start = threading.Barrier(2)

        def writer(dim: int) -> None:
            start.wait()
            for fp in fps[dim]:
                try:
                    store.put(fp)
                except InvalidRecordError as exc:
                    errors[dim].append(exc)

        threads = [threading.Thread(target=writer, args=(d,)) for d in (4, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        dim = store.embedding_dim
        assert dim in (4, 5)
        other = 9 - dim
        assert len(errors[other]) == 20 and errors[dim] == []  # every loser refused, none lost
        assert store.count("fingerprint") == 20


def test_a_legacy_embedding_dim_key_is_read_as_the_setting(store_path: Path) -> None:
    Store.open(store_path, create=True).close()
    tables = LmdbTables(store_path / "data", readonly=False, map_size=1 << 24)
    try:
        tables.put_meta("embedding_dim", b"12")  # how stores before sections kept it
    finally:
        tables.close()
    with Store.open(store_path) as store:
        assert store.embedding_dim == 12


def test_settings_changes_are_in_the_history(store_path: Path) -> None:
    from xpstore.ops.replay import replay

    with Store.open(store_path, create=True, hold_applier=True) as store:
        store.put(make_fingerprint(np.random.default_rng(4), "t1", embedding_dim=3))
        store.reconfigure(priority_alpha=0.25)
    items = [item.to_json() for item in replay(store_path)]
    settings = [i for i in items if i["op"] == "settings"]
    assert [s["changes"] for s in settings] == [{"records.embedding_dim": 3},
                                                {"sampling.alpha": 0.25}]  # fmt: skip
    assert [i["op"] for i in items] == ["put", "settings", "settings"]
    assert [i["lsn"] for i in items] == [1, 2, 3]  # the dimension is logged in the put's frame
