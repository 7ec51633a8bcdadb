"""The shared real-music set: 450 segments of 85 real tracks (``shared/data/real_music``).

Each line of ``segments.jsonl`` holds a segment's 25-value batch fingerprint (20 s) and 13-value
streaming fingerprint (its first 5 s), keyed by name, in natural units (band shares in %, Hz,
onsets/s, dB). :data:`UNIT_SCALE` is the set's documented linear map to the store's units (DESIGN
§3), applied **by name**. The set's README says where the audio came from and how each value was
computed. Used by ``benchmarks/music.py``, the tests that read the set, and the validation
calibration checks; never by the core.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from xpstore.model.records import (
    BATCH_FIELDS,
    STREAMING_FIELDS,
    BatchFingerprint,
    Fingerprint,
    StreamingFingerprint,
)
from xpstore.store.store import Store

__all__ = [
    "ENV_VAR",
    "UNIT_SCALE",
    "Segment",
    "default_path",
    "fingerprints",
    "load_segments",
    "validation_split",
]

ENV_VAR: Final = "XPSTORE_REAL_MUSIC"
"""Overrides where ``segments.jsonl`` is looked for (a file or its folder)."""

UNIT_SCALE: Final[Mapping[str, float]] = {
    **{name: 0.01 for name in BATCH_FIELDS if name.endswith("_pct")},
    "spectral_centroid": 1 / 8000,
    "spectral_rolloff": 1 / 10000,
    "transient_density": 0.1,
    "dynamic_range_variation": 0.1,
    "loudness_variation_std": 0.2,
}
"""Natural units -> the store's units, by name (every other value is taken as it is)."""


@dataclass(frozen=True)
class Segment:
    """One segment, values in the store's units, keyed by name."""

    track_id: str
    """``<collection>/<file stem>#<segment index>``: the store's track id of the segment."""
    track: str
    """``<collection>/<file stem>``: segments of one track are each other's true neighbours."""
    collection: str
    segment: int
    batch: dict[str, float]
    streaming: dict[str, float]


def default_path() -> Path | None:
    """``segments.jsonl`` from ``$XPSTORE_REAL_MUSIC``, else ``../shared/data/real_music/``
    beside the repository (where CI puts a copy of ``shared/``); None when absent."""
    given = os.environ.get(ENV_VAR)
    candidates = [Path(given)] if given else []
    repo = Path(__file__).resolve().parents[2]
    candidates.append(repo.parent / "shared" / "data" / "real_music")
    for candidate in candidates:
        path = candidate / "segments.jsonl" if candidate.is_dir() else candidate
        if path.is_file():
            return path
    return None


def _scaled(values: Mapping[str, Any], names: Sequence[str], where: str) -> dict[str, float]:
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{where}: value {missing[0]!r} is missing")
    return {name: float(values[name]) * UNIT_SCALE.get(name, 1.0) for name in names}


def load_segments(path: str | os.PathLike[str]) -> list[Segment]:
    """Every segment of ``path`` (``segments.jsonl``), in file order, in the store's units."""
    out: list[Segment] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            where = f"{path}:{lineno}"
            out.append(
                Segment(
                    track_id=str(obj["track_id"]),
                    track=str(obj["track"]),
                    collection=str(obj["collection"]),
                    segment=int(obj["segment"]),
                    batch=_scaled(obj["batch"], BATCH_FIELDS, where),
                    streaming=_scaled(obj["streaming"], STREAMING_FIELDS, where),
                )
            )
    return out


def fingerprints(
    segments: Sequence[Segment], *, batch: bool = True, streaming: bool = False
) -> list[Fingerprint]:
    """One fingerprint per segment (track id = segment id), with the parts asked for. The set
    has no per-value confidence; streaming values get confidence 1 (a whole 5 s analysis)."""
    out: list[Fingerprint] = []
    for seg in segments:
        stream = None
        if streaming:
            stream = StreamingFingerprint(
                values=dict(seg.streaming),
                confidence=dict.fromkeys(seg.streaming, 1.0),
                chunk_count=5,
            )
        out.append(
            Fingerprint(
                track_id=seg.track_id,
                batch=BatchFingerprint(**seg.batch) if batch else None,
                streaming=stream,
                metadata={"track": seg.track, "collection": seg.collection},
            )
        )
    return out


def validation_split(store: Store, segments: Sequence[Segment], seed: int) -> dict[str, float]:
    """Issue 11's protocol on a store holding ``segments`` with both parts: calibrate on half
    the tracks (drawn with ``seed``), score the other half. True pairs: each held-out segment's
    streaming values against its own batch values; different-track pairs: against every other
    held-out segment of another track. Scored exactly as ``validate_streaming`` scores (the
    calibration's model, its cohort less the streaming segment's own batch), vectorized."""
    from xpstore.index.validation import MIN_COHORT, ValidationModel, auc, cosine, rows_of

    tracks = sorted({s.track for s in segments})
    rng = np.random.default_rng(seed)
    calib = {tracks[i] for i in rng.permutation(len(tracks))[: len(tracks) // 2].tolist()}
    cal = store.calibrate_validation(tracks=[s.track_id for s in segments if s.track in calib])
    model = ValidationModel.from_json(cal.model)
    test = [s for s in segments if s.track not in calib]
    stream = rows_of([s.streaming for s in test])
    batch = rows_of([{n: s.batch[n] for n in STREAMING_FIELDS} for s in test])
    rid_of = {s.track_id: store.get_fingerprint(s.track_id).id for s in test}
    cohort_rows = []
    for rid in cal.cohort:
        rec = store.get(rid).record
        assert isinstance(rec, Fingerprint) and rec.batch is not None
        cohort_rows.append(rec.batch.as_dict())
    cohort = rows_of(cohort_rows)
    where = {rid: k for k, rid in enumerate(cal.cohort)}
    own = np.array([where.get(rid_of[s.track_id], -1) for s in test], dtype=np.int64)
    n = len(test)
    grid_i, grid_j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    i, j = grid_i.ravel(), grid_j.ravel()
    labels = np.array([s.track for s in test])
    true = i == j
    false = labels[i] != labels[j]
    raw = model.raw_scores(stream[i], batch[j])
    if cohort.shape[0] >= MIN_COHORT:
        mean, spread = model.cohort_stats(stream, cohort, own)
        scores = (raw - mean[i]) / spread[i]
        threshold = cal.threshold
    else:
        scores, threshold = raw, cal.raw_threshold
    cos = np.array([cosine(model, stream[k], batch[k]) for k in range(n)])
    return {
        "calibration_tracks": float(len(calib)),
        "calibration_pairs": float(cal.true_pairs),
        "test_true_pairs": float(true.sum()),
        "test_false_pairs": float(false.sum()),
        "true_accept": float(np.mean(scores[true] >= threshold)),
        "false_accept": float(np.mean(scores[false] >= threshold)),
        "auc": auc(scores[true], scores[false]),
        "cosine_median": float(np.median(cos)),
        "cosine_095": float(np.mean(cos >= 0.95)),
    }
