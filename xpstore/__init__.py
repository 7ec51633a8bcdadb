"""xpstore: a persistent experience store for learning systems.

Every record goes through a write-ahead log into LMDB; nothing acknowledged is lost, whatever
moment the process dies at. See README.md and docs/ for the design and the guarantees.
"""

from xpstore.config import StoreConfig
from xpstore.errors import (
    ChangesTruncatedError,
    CodecError,
    EmptySampleError,
    ExtraMissingError,
    FormatVersionError,
    IndexNotBuiltError,
    InvalidArgumentError,
    InvalidRecordError,
    LmdbCorruptionError,
    MilvusUnavailableError,
    ReadOnlyStoreError,
    RecordNotFoundError,
    RecordTooLargeError,
    SnapshotError,
    StoreClosedError,
    StoreCorruptionError,
    StoreLockedError,
    StoreNotFoundError,
    WALCorruptionError,
    WALWriteError,
    XpStoreError,
)
from xpstore.index.neighbors import Neighbor
from xpstore.model.records import (
    BatchFingerprint,
    Decision,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    StreamingFingerprint,
)
from xpstore.ops.snapshots import SnapshotInfo
from xpstore.persistence.wal_recovery import RecoveryReport
from xpstore.store.sampling_service import SampleBatch
from xpstore.store.store import Store
from xpstore.tuning import Learner, Prediction, StepReport, Tuning, TuningConfig

__version__ = "0.1.0"

__all__ = [
    "BatchFingerprint",
    "ChangesTruncatedError",
    "CodecError",
    "Decision",
    "EmptySampleError",
    "Experience",
    "ExtraMissingError",
    "Fingerprint",
    "FormatVersionError",
    "IndexNotBuiltError",
    "InvalidArgumentError",
    "InvalidRecordError",
    "Learner",
    "LmdbCorruptionError",
    "MilvusUnavailableError",
    "Neighbor",
    "Prediction",
    "PredictionOutcome",
    "QueryMetric",
    "ReadOnlyStoreError",
    "RecordNotFoundError",
    "RecordTooLargeError",
    "RecoveryReport",
    "SampleBatch",
    "SnapshotError",
    "SnapshotInfo",
    "StepReport",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "StoreCorruptionError",
    "StoreLockedError",
    "StoreNotFoundError",
    "StreamingFingerprint",
    "Tuning",
    "TuningConfig",
    "WALCorruptionError",
    "WALWriteError",
    "XpStoreError",
    "__version__",
]
