"""Batch iterators for learners (issue 16): ``Store.batches`` yields training batches as dicts
of arrays, ready for a training step, instead of lists of envelopes.

Why a separate path from ``sample``: a learner's step wants a feature matrix, not 256 pydantic
models. A prioritized batch here is the sampler's draw (ids, P(i), importance weights) plus the
drawn records' *encoded* envelopes (the overlay first, then one LMDB read transaction), unpacked
by one streaming msgpack unpacker into one list per column, each converted to numpy once: no
model is built. Feedback and priority updates go
back by id as with ``sample`` (``store.record_feedback(batch["ids"], ...)``,
``store.update_priorities(batch["ids"], ...)``). Like ``sample``, every draw bumps the drawn
items' retrieval counts (value tracking), made durable in batches of
``sampling.flush_retrievals`` and added in place to the records' ``prio`` rows (no envelope is
rewritten: docs/design.md, "Retrieval counts"); a loop that counts its uses at feedback time
(``record_feedback(..., count_retrieval=True)``) passes ``count_retrievals=False``.

The columns of every batch (docs/sampling.md, "Batches for learners"):

- ``ids`` int64 (n,): record ids; ``weights`` float32 (n,): importance weights (1 when not
  prioritized); ``probabilities`` float64 (n,): P(i) (NaN when not prioritized);
- ``features`` float32 (n, f), the names in ``FEATURES[kind]`` order (or the ``features=`` asked
  for); a value the record lacks is NaN;
- ``labels``: prediction: ``actual`` (str, "" while unresolved); fingerprint: ``track_id`` (str);
  query metric: ``success`` (bool). With ``label_names`` a prediction batch also carries
  ``label_ids`` int64 (index in ``label_names``, -1 unresolved or unknown);
- ``rewards`` float32 (n,): prediction ``reward``, query metric ``user_satisfaction``, NaN when
  absent (always NaN for fingerprints).

``as_="torch"`` turns every numeric column into a ``torch.Tensor`` (string labels stay numpy);
PyTorch is optional (the ``torch`` extra) and its absence raises a clear error at the call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from xpstore.errors import ExtraMissingError, InvalidArgumentError
from xpstore.model.codec import KIND_CODES
from xpstore.model.records import BATCH_FIELDS, SAMPLEABLE_KINDS, Experience
from xpstore.store.engine import Engine
from xpstore.store.reader import Reader
from xpstore.store.sampling_service import Sampling

__all__ = ["FEATURES", "Batches"]

FEATURES: dict[str, tuple[str, ...]] = {
    "prediction": ("energy", "brightness", "dynamics", "vocal_presence", "tempo_energy"),
    "fingerprint": BATCH_FIELDS,
    "query_metric": ("latency_ms", "memory_mb", "result_count", "concurrency", "accuracy"),
}
"""Default feature columns per kind: a prediction's ``audio_features`` (Auralis's five), a
fingerprint's 25 batch values, a query metric's numeric fields."""

_AS = ("numpy", "torch")
_NAN = math.nan


class Batches:
    """``Store.batches``: training batches from the sampler or from a scan."""

    def __init__(self, engine: Engine, reader: Reader, sampling: Sampling) -> None:
        self._engine = engine
        self._reader = reader
        self._sampling = sampling

    def batches(
        self,
        batch_size: int,
        kind: str,
        where: Mapping[str, Any] | None,
        prioritized: bool,
        as_: str,
        features: Sequence[str] | None,
        label_names: Sequence[str] | None,
        max_batches: int | None,
        seed: int | None,
        count_retrievals: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Check the arguments now (not at the first ``next``), then iterate."""
        self._engine.check_open()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgumentError(
                f"batch_size must be an int >= 1, got {batch_size!r}", field="batch_size"
            )
        if kind not in SAMPLEABLE_KINDS:
            raise InvalidArgumentError(
                f"kind must be one of {', '.join(SAMPLEABLE_KINDS)}, got {kind!r}", field="kind"
            )
        if as_ not in _AS:
            raise InvalidArgumentError(f"as_ must be 'numpy' or 'torch', got {as_!r}", field="as_")
        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0
        ):
            raise InvalidArgumentError(
                f"max_batches must be an int >= 0 or None, got {max_batches!r}",
                field="max_batches",
            )
        names = tuple(FEATURES[kind] if features is None else features)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise InvalidArgumentError(
                "features must be a non-empty sequence of field names", field="features"
            )
        convert = _torch_converter() if as_ == "torch" else None
        builder = _Builder(kind, names, label_names)
        if prioritized:
            raw = self._prioritized(batch_size, kind, where, seed, builder, count_retrievals)
        else:
            raw = self._in_order(batch_size, kind, where, builder)
        return _limited(raw, max_batches, convert)

    def _prioritized(
        self,
        batch_size: int,
        kind: str,
        where: Mapping[str, Any] | None,
        seed: int | None,
        builder: _Builder,
        count: bool,
    ) -> Iterator[dict[str, Any]]:
        first = True
        while True:
            draw = self._sampling.draw(batch_size, kind, where, None, seed if first else None,
                                       count)  # fmt: skip
            first = False
            envelopes = self._reader.envelopes(draw.ids)
            maps = dict(zip(envelopes, (env[6] for env in _unpacked(envelopes.values())),
                            strict=True))  # fmt: skip
            rows = [(rid, m) for rid in draw.ids if (m := maps.get(rid)) is not None]
            batch = builder.build(rows)
            if len(rows) == len(draw.ids):
                batch["weights"] = draw.weights.astype(np.float32)
                batch["probabilities"] = draw.probabilities
            else:  # deleted between the draw and the read: the next draw has them
                keep = [i for i, rid in enumerate(draw.ids) if rid in maps]
                batch["weights"] = draw.weights[keep].astype(np.float32)
                batch["probabilities"] = draw.probabilities[keep]
            yield batch

    def _in_order(
        self, batch_size: int, kind: str, where: Mapping[str, Any] | None, builder: _Builder
    ) -> Iterator[dict[str, Any]]:
        """One pass over ``kind`` in (ts, id) order (``scan``'s order and consistency)."""
        rows: list[tuple[int, dict[str, Any]]] = []
        for exp in self._reader.scan(kind, where=where):
            rows.append((exp.id, _record_map(exp)))
            if len(rows) == batch_size:
                yield self._uniform(builder.build(rows))
                rows = []
        if rows:
            yield self._uniform(builder.build(rows))

    @staticmethod
    def _uniform(batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["ids"])
        batch["weights"] = np.ones(n, dtype=np.float32)
        batch["probabilities"] = np.full(n, _NAN)
        return batch


def _limited(
    raw: Iterator[dict[str, Any]], max_batches: int | None, convert: Any
) -> Iterator[dict[str, Any]]:
    for done, batch in enumerate(raw):
        if max_batches is not None and done >= max_batches:
            return
        yield batch if convert is None else convert(batch)


def _record_map(exp: Experience) -> dict[str, Any]:
    """An envelope's record as the codec's record map (a fingerprint's batch positional)."""
    m = {k: v for k, v in exp.record.__dict__.items() if v is not None}
    batch = m.get("batch")
    if batch is not None:
        m["batch"] = [getattr(batch, n) for n in BATCH_FIELDS]
    return m


class _Builder:
    """Record maps -> the columns of one batch, for one kind and feature list."""

    def __init__(self, kind: str, names: tuple[str, ...], label_names: Sequence[str] | None):
        self.kind = kind
        self.code = KIND_CODES[kind]
        self.names = names
        self.label_index = None if label_names is None else {n: i for i, n in
                                                              enumerate(label_names)}  # fmt: skip
        if kind == "fingerprint":
            pos = {n: i for i, n in enumerate(BATCH_FIELDS)}
            unknown = [n for n in names if n not in pos]
            if unknown:
                raise InvalidArgumentError(
                    f"unknown fingerprint feature(s) {unknown}: the 25 batch names",
                    field="features",
                )
            self.positions = [pos[n] for n in names]

    def build(self, rows: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        """Column by column: one list per column, one numpy conversion each (a numpy
        assignment per row cost more than the values themselves)."""
        n, f = len(rows), len(self.names)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=n)
        maps = [r[1] for r in rows]
        kind, names = self.kind, self.names
        out: dict[str, Any] = {"ids": ids}
        if kind == "prediction":
            missing = [_NAN] * f
            afs = [m.get("audio_features") for m in maps]
            feats = [[af.get(x, _NAN) for x in names] if af else missing for af in afs]
            out["rewards"] = np.array([m.get("reward") for m in maps], dtype=np.float32)
            labels = [m.get("actual") or "" for m in maps]
            out["labels"] = np.array(labels, dtype=str)
            if self.label_index is not None:
                index = self.label_index
                out["label_ids"] = np.fromiter(
                    (index.get(lab, -1) for lab in labels), dtype=np.int64, count=n
                )
        elif kind == "fingerprint":
            pos = self.positions
            missing = [_NAN] * f
            batches = [m.get("batch") for m in maps]
            feats = [[b[p] for p in pos] if b is not None else missing for b in batches]
            out["rewards"] = np.full(n, np.nan, dtype=np.float32)
            out["labels"] = np.array([m["track_id"] for m in maps], dtype=str)
        else:
            feats = [[_number(m.get(x)) for x in names] for m in maps]
            out["rewards"] = np.array([m.get("user_satisfaction") for m in maps],
                                      dtype=np.float32)  # fmt: skip
            out["labels"] = np.array([bool(m.get("success")) for m in maps], dtype=bool)
        out["features"] = np.array(feats, dtype=np.float32).reshape(n, f)
        return out


def _unpacked(raws: Iterable[bytes]) -> Iterator[list[Any]]:
    """The envelopes ``raws`` decoded by one streaming unpacker (cheaper than one
    ``unpackb`` call each)."""
    data = b"".join(raws)
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    return iter(unpacker)


def _number(value: Any) -> float:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, int | float) else _NAN


def _torch_converter() -> Any:
    """A function turning a numpy batch into tensors; ExtraMissingError without PyTorch."""
    try:
        import torch
    except ImportError as exc:
        raise ExtraMissingError(
            'as_="torch" needs PyTorch: pip install "xpstore[torch]" (or torch itself), or use '
            'as_="numpy"',
            extra="torch",
        ) from exc

    def convert(batch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in batch.items():
            if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
                out[key] = torch.from_numpy(value)
            else:
                out[key] = value
        return out

    return convert
