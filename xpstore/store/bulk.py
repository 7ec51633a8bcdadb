"""``Store.put_fingerprints``: many fingerprints in columns, one WAL frame (docs/index.md).

The bulk path for libraries: N fingerprints given as arrays are validated with numpy
(:mod:`xpstore.model.columns`: the models' own bounds, the first bad value named by row and
field, nothing written when any row is bad), encoded for all rows at once
(:func:`~xpstore.model.codec.encode_fingerprint_batch`: the bytes ``put_many`` would log for the
same records), embedded for the k-NN index in one call when it is attached, and logged as one
WAL frame with one sync (all or nothing, like ``put_many``). No pydantic model is built per row,
and the index takes the batch's vectors in one vectorized insert on the acknowledgement path.

Rows are the same records ``put_many`` would store: ``get``, ``scan``, ``similar``, recovery
and replay see no difference (``tests/test_bulk.py`` checks the bytes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from xpstore.errors import RecordTooLargeError
from xpstore.model.codec import encode_fingerprint_batch
from xpstore.model.columns import FingerprintColumns, fingerprint_columns
from xpstore.store.engine import Engine
from xpstore.store.index_service import IndexService
from xpstore.store.writer import Writer

__all__ = ["FingerprintIngest"]


class FingerprintIngest:
    """The columnar fingerprint writer of one store."""

    def __init__(self, engine: Engine, writer: Writer, index: IndexService) -> None:
        self._engine = engine
        self._writer = writer
        self._index = index

    def put(
        self,
        track_ids: Sequence[str],
        batch: Any = None,
        *,
        names: Sequence[str] | None = None,
        streaming: Any = None,
        confidence: Any = None,
        streaming_names: Sequence[str] | None = None,
        chunk_counts: Any = None,
        embeddings: Any = None,
        metadata: Sequence[Mapping[str, str] | None] | None = None,
        algorithm_version: str | int | None = None,
        ts: Any = None,
    ) -> list[int]:
        """Validate, encode and log the batch (one frame, one sync); the ids in row order.

        ``batch``: an (N, 25) matrix in ``BATCH_FIELDS`` order, or in the order ``names``
        gives, or a mapping of the 25 names to columns. ``streaming``/``confidence``: (N, 13)
        or (N, 10) matrices (``streaming_names`` or mappings likewise), ``chunk_counts`` one
        int per row (default 0). ``embeddings``: (N, D). ``metadata``: one mapping or None per
        row. ``ts``: one time per row or one for all (default: now).
        """
        engine = self._engine
        engine.writable()
        cols = fingerprint_columns(
            track_ids, batch, names=names, streaming=streaming, confidence=confidence,
            streaming_names=streaming_names, chunk_counts=chunk_counts, embeddings=embeddings,
            metadata=metadata, algorithm_version=algorithm_version, ts=ts,
            embedding_dim=self._writer.embedding_dim,
        )  # fmt: skip
        n = len(cols)
        if n == 0:
            return []
        cfg = engine.config.records
        if n > cfg.max_batch_records:
            raise RecordTooLargeError(
                f"put_fingerprints got {n} rows, over max_batch_records={cfg.max_batch_records}",
                field="records",
            )
        payloads, cuts = encode_fingerprint_batch(cols)
        _check_sizes(cols, payloads, cfg.max_record_bytes)
        rows = self._index.precompute_columns(cols)
        first, last = self._writer.submit_fingerprints(payloads, cols, rows, cuts)
        return list(range(first, last + 1))


def _check_sizes(cols: FingerprintColumns, payloads: list[bytes], limit: int) -> None:
    """RecordTooLargeError naming the first row over ``limit`` and its largest field."""
    sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=len(payloads))
    over = np.flatnonzero(sizes > limit)
    if not over.size:
        return
    row = int(over[0])
    fields = {"track_id": len(msgpack.packb(cols.track_ids[row]))}
    if cols.batch is not None:
        fields["batch"] = 3 + 9 * cols.batch.shape[1]
    if cols.streaming is not None:
        fields["streaming"] = 7 + 18 * cols.streaming.shape[1]
    if cols.embeddings is not None:
        fields["embedding"] = 3 + 9 * cols.embeddings.shape[1]
    if cols.metadata is not None and cols.metadata[row] is not None:
        fields["metadata"] = len(msgpack.packb(cols.metadata[row], use_bin_type=True))
    field = max(fields, key=lambda name: fields[name])
    raise RecordTooLargeError(
        f"records[{row}]: record encodes to {int(sizes[row]):,} bytes, over this store's limit "
        f"of {limit:,} bytes (the records.max_record_bytes setting); its largest field is "
        f"{field!r} ({fields[field]:,} bytes)",
        field=field,
    )
