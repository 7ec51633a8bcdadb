"""Learned similarity for a Store (issue 11): ``Store.fit_similarity``.

Reads every live fingerprint (LMDB after the applier caught up), standardizes the audio values
with the statistics the next build would fit, learns per-dimension weights from the groups the
caller gives (``index.similarity_fit``), measures them cross-validated by group, and logs the
result through the WAL as the ``index.learned`` setting. Nothing else changes unless the caller
asks (``use=True``, or later ``reconfigure(index_dim_weights="learned")``): builds use the learned
weights only while ``index.dim_weights == "learned"``, from the next build on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xpstore.config import LearnedWeights, StoreConfig
from xpstore.errors import InvalidArgumentError
from xpstore.index.embedding import AudioStats, HybridEmbedder
from xpstore.index.similarity_fit import (
    MAX_TRAIN,
    cross_validate,
    encode_groups,
    fit_weights,
    scorable,
    top1_hits,
    train_rows,
)
from xpstore.model.records import BATCH_FIELDS
from xpstore.store.engine import Engine
from xpstore.store.writer import Writer

__all__ = ["SimilarityLearner", "SimilarityReport"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimilarityReport:
    """What ``fit_similarity`` learned and what it is worth (hit rates: same-group top-1 over
    the scored tracks, against the whole library)."""

    version: int
    weights: dict[str, float]
    """Per-dimension weights by batch name (sum 1), stored as ``index.learned``."""
    baseline_hit_rate: float
    """With the weights in force before the fit."""
    cv_hit_rate: float
    """Each track scored with weights learned on folds without its group."""
    gain: float
    in_sample_hit_rate: float
    """With the final weights (learned on every group): optimistic, for comparison only."""
    folds: int
    groups: int
    tracks: int
    scored: int
    """Tracks scored: members of groups with at least two tracks (a lone track has no
    same-group neighbour to find)."""
    baseline_hits: int
    cv_hits: int
    mode: str
    stats_checksum: str
    used: bool
    """True when ``use=True`` also set ``index.dim_weights = "learned"`` (next build)."""

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class SimilarityLearner:
    """Learns per-dimension audio weights for one writable store."""

    def __init__(self, engine: Engine, writer: Writer) -> None:
        self._engine = engine
        self._writer = writer

    def fit(
        self, groups: Mapping[str, Hashable], folds: int, use: bool, seed: int
    ) -> SimilarityReport:
        """See :meth:`xpstore.Store.fit_similarity`."""
        engine = self._engine
        engine.writable()
        groups = _check_groups(groups)
        folds = _check_int(folds, "folds", 2)
        seed = _check_int(seed, "seed", 0)
        if not isinstance(use, bool):
            raise InvalidArgumentError(f"use must be True or False, got {use!r}", field="use")
        from xpstore.index.build import read_live

        engine.apply_through_acked()  # LMDB then holds every acknowledged fingerprint
        _lsn, rows = read_live(engine.tables, engine.embedding_dim)
        live = set(rows.track_ids)
        for track in groups:
            if track not in live:
                raise InvalidArgumentError(
                    f"groups names track {track!r}, which has no current fingerprint",
                    field=f"groups[{track!r}]",
                )
        cfg = engine.config.index
        stats = AudioStats.fit(rows.audio, cfg.mode)
        library = stats.standardize(rows.audio)
        codes, _labels = encode_groups(rows.track_ids, dict(groups))
        baseline = _weights_in_force(engine.config)
        cv = cross_validate(library, codes, baseline, folds=folds, seed=seed)
        grouped = np.flatnonzero(codes >= 0)
        if grouped.shape[0] > MAX_TRAIN:
            log.info("fit_similarity: training on %d of %d grouped tracks", MAX_TRAIN,
                     grouped.shape[0])  # fmt: skip
        train = train_rows(grouped, codes, MAX_TRAIN, seed)
        final = fit_weights(library[train], codes[train], baseline)
        in_sample = top1_hits(library, codes, scorable(codes), final)
        weights = {name: float(w) for name, w in zip(BATCH_FIELDS, final.tolist(), strict=True)}
        previous = cfg.learned.version if cfg.learned is not None else 0
        learned = LearnedWeights(
            version=previous + 1,
            mode=cfg.mode,
            stats_checksum=stats.to_dict()["checksum"],
            stats_count=stats.count,
            weights=weights,
            groups=len(set(codes[grouped].tolist())),
            tracks=int(grouped.shape[0]),
            folds=folds,
            baseline_hit_rate=cv.baseline_hit_rate,
            cv_hit_rate=cv.cv_hit_rate,
            gain=cv.cv_hit_rate - cv.baseline_hit_rate,
            fitted_at=time.time(),
        )
        changes: dict[str, Any] = {"index.learned": learned.model_dump()}
        if use:
            changes["index.dim_weights"] = "learned"
        self._writer.log_settings(changes)
        log.info(
            "fit_similarity v%d: %d groups, %d tracks, same-group top-1 %.3f -> %.3f "
            "(cross-validated, %d folds)",
            learned.version, learned.groups, learned.tracks, cv.baseline_hit_rate,
            cv.cv_hit_rate, folds,
        )  # fmt: skip
        return SimilarityReport(
            version=learned.version,
            weights=weights,
            baseline_hit_rate=cv.baseline_hit_rate,
            cv_hit_rate=cv.cv_hit_rate,
            gain=learned.gain,
            in_sample_hit_rate=float(in_sample.mean()) if in_sample.size else 0.0,
            folds=folds,
            groups=learned.groups,
            tracks=learned.tracks,
            scored=cv.scored,
            baseline_hits=cv.baseline_hits,
            cv_hits=cv.cv_hits,
            mode=cfg.mode,
            stats_checksum=learned.stats_checksum,
            used=use,
        )


def _weights_in_force(config: StoreConfig) -> np.ndarray[Any, Any]:
    """The per-dimension weights the next build would use, as an array (sum 1)."""
    cfg = config.index
    dim: Mapping[str, float] | None
    if cfg.dim_weights == "learned":
        assert cfg.learned is not None
        dim = cfg.learned.weights
    elif isinstance(cfg.dim_weights, Mapping):
        dim = cfg.dim_weights
    else:
        dim = None
    return HybridEmbedder.resolve_dim_weights(cfg.mode, dim)


def _check_groups(groups: object) -> dict[str, Hashable]:
    if not isinstance(groups, Mapping):
        raise InvalidArgumentError(
            f"groups must map track ids to group labels, got {type(groups).__name__}",
            field="groups",
        )
    out: dict[str, Hashable] = {}
    for track, label in groups.items():
        if not isinstance(track, str):
            raise InvalidArgumentError(f"groups key {track!r} is not a track id", field="groups")
        if label is None or (isinstance(label, float) and not math.isfinite(label)):
            raise InvalidArgumentError(
                f"groups[{track!r}] must be a group label, got {label!r}",
                field=f"groups[{track!r}]",
            )
        try:
            hash(label)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"groups[{track!r}] must be hashable, got {type(label).__name__}",
                field=f"groups[{track!r}]",
            ) from exc
        out[track] = label
    return out


def _check_int(value: object, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{name} must be an int >= {low}, got {value!r}", field=name)
    return value
