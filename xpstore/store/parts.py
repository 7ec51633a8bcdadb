"""The components a Store composes, and how they are wired (docs/design.md, "Components, not
mixins"). ``Store.__init__`` calls :func:`compose`; ``store.parts`` is the documented seam."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from xpstore.config import StoreConfig
from xpstore.persistence.applier import MaintenanceTask
from xpstore.persistence.telemetry import Telemetry
from xpstore.store.batches import Batches
from xpstore.store.bulk import FingerprintIngest
from xpstore.store.changes import ChangeFeed
from xpstore.store.checker import Checker
from xpstore.store.engine import Engine
from xpstore.store.export import Exporter
from xpstore.store.health import Health
from xpstore.store.index_service import IndexService
from xpstore.store.maintenance import Maintenance, RetentionTask
from xpstore.store.metrics import Metrics
from xpstore.store.milvus import MilvusSimilarity
from xpstore.store.pressure import Pressure
from xpstore.store.reader import Reader
from xpstore.store.sampling_service import Sampling
from xpstore.store.similarity import SimilarityLearner
from xpstore.store.snapshot_service import AutoSnapshotTask, Snapshots
from xpstore.store.streaming_service import StreamingService
from xpstore.store.validation_service import StreamingValidator, ValidationTask
from xpstore.store.writer import Writer

__all__ = ["StoreParts", "compose"]


@dataclass(frozen=True)
class StoreParts:
    """The components a Store composes: the documented seam for tests, operators' tools and
    capabilities built on a store (learner, tuner). docs/design.md describes each one."""

    engine: Engine
    reader: Reader
    writer: Writer
    index: IndexService
    sampling: Sampling
    maintenance: Maintenance
    snapshots: Snapshots
    checker: Checker
    tasks: Mapping[str, MaintenanceTask]
    """The background tasks the applier schedules, by name (``"snapshot"``, ``"retention"``)."""
    similarity: SimilarityLearner
    """``fit_similarity``: learned per-dimension weights (issue 11)."""
    validation: StreamingValidator
    """Streaming-vs-batch validation (issue 11)."""
    streaming: StreamingService
    """The streaming cache and the query strategies (issue 11)."""
    bulk: FingerprintIngest
    """``put_fingerprints``: fingerprints in columns, one frame (issue 15)."""
    health: Health
    """The health checks (``register_check``; docs/service.md, issue 13)."""
    metrics: Metrics
    """The Prometheus collector (``register_collector``, ``text()``; issue 13)."""
    batches: Batches
    """``Store.batches``: training batches as arrays (issue 16)."""
    export: Exporter
    """``Store.to_arrow`` and ``xpstore export`` (issue 16)."""
    changes: ChangeFeed
    """``Store.changes``: the operations in LSN order, for followers (issue 16)."""
    milvus: MilvusSimilarity
    """``similar()`` through Milvus when ``index.backend="milvus"`` (issue 16)."""
    pressure: Pressure
    """Memory-pressure actions, levels 0-3 (issue 12; the level comes from
    ``xpstore.tuning.ResourceMonitor``)."""

    @property
    def telemetry(self) -> Telemetry:
        """Operation latencies and counters since open (``put``, ``wal.fsync``, ``apply``,
        ``similar``, ``sample``, ``snapshot``, ``index.rebuild``; docs/design.md)."""
        return self.engine.telemetry


def compose(engine: Engine) -> StoreParts:
    """Build every component over an opened engine and register the applier's tasks."""
    reader = Reader(engine)
    writer = Writer(engine, reader)
    index = IndexService(engine, reader)
    writer.row_source = index.precompute
    writer.rows_wanted = index.attached
    maintenance = Maintenance(engine, reader, writer)
    snapshots = Snapshots(engine)
    validator = StreamingValidator(engine, reader, writer)
    sampling = Sampling(engine, reader, writer)
    health = Health(engine, reader, index)
    tasks: dict[str, MaintenanceTask] = {
        "snapshot": AutoSnapshotTask(engine, snapshots),
        "retention": RetentionTask(engine, maintenance),
        "validation": ValidationTask(engine, validator),
    }
    streaming = StreamingService(engine, reader, writer, index, validator)
    milvus = MilvusSimilarity(engine, reader, index)

    def route(config: StoreConfig) -> None:
        """Point the similarity path at the configured backend when the settings change,
        not at every call (a router per call cost ~0.05x of a first ask at 20k tracks)."""
        use_milvus = config.index.backend == "milvus"
        streaming.batch_search = milvus.similar if use_milvus else index.similar

    route(engine.config)
    engine.settings.watch(route)
    parts = StoreParts(
        engine, reader, writer, index, sampling, maintenance, snapshots,
        Checker(engine), tasks, SimilarityLearner(engine, writer), validator, streaming,
        FingerprintIngest(engine, writer, index),
        health, Metrics(engine, reader, index, sampling, health),
        Batches(engine, reader, sampling), Exporter(engine), ChangeFeed(engine), milvus,
        Pressure(engine, reader, index),
    )  # fmt: skip
    if engine.applier is not None:
        snapshots.clean_temps()
        for task in tasks.values():
            engine.applier.add_task(task)
    return parts
