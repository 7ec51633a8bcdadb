"""Learned similarity: per-dimension audio weights from tracks known to belong together.

The model is the index's own: standardized audio values ``s`` (``HybridEmbedder.standardize``
without weights), scaled per dimension by ``a_j`` (the weight is ``a_j²``, renormalized to sum
1), L2-normalized, compared by cosine. :func:`fit_weights` chooses ``a`` to make each track's
same-group tracks its nearest neighbours: a neighbourhood-components objective (Goldberger et al.,
NCA) over cosines, ``p_ij = softmax_j≠i(cos_ij / τ)`` and the loss ``-mean_i log Σ_{j in group(i)}
p_ij``, minimized by Adam with a fixed number of steps from the weights in force (so a fit that
learns nothing leaves them where they were). Gradients are exact (written out below), numpy only.

:func:`cross_validate` says what the weights are worth on groups they never saw: groups are split
into ``folds`` by group (every member of a group in one fold), weights are learned on the other
folds' tracks only and each held-out track is scored against the **whole library** embedded with
them: a hit when its nearest other track is in its group. No group is ever both trained on and
scored (``tests/test_similarity.py`` checks it with a recording fit).

Sizes: the objective is ``O(n²)`` per step in the training tracks, so training uses at most
``max_train`` tracks (whole groups, drawn with the seed); scoring is one matrix product per fold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from xpstore.errors import InvalidArgumentError

__all__ = [
    "MAX_TRAIN",
    "CrossValidation",
    "FitFn",
    "assign_folds",
    "cross_validate",
    "encode_groups",
    "fit_weights",
    "scorable",
    "top1_hits",
    "train_rows",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
FitFn = Callable[[FloatArray, IntArray, FloatArray], FloatArray]
"""``fit(standardized rows, group codes, initial weights) -> weights`` (sum 1)."""

TAU: Final = 0.2
"""Softmax temperature over cosines."""
STEPS: Final = 100
LEARNING_RATE: Final = 0.03
MAX_TRAIN: Final = 3000
"""At most this many tracks enter one fit (whole groups, drawn with the seed)."""
_EPS: Final = 1e-12


def _loss_grad(
    a: FloatArray, x: FloatArray, groups: IntArray, tau: float
) -> tuple[float, FloatArray]:
    """The NCA-over-cosines loss and its gradient in the per-dimension scales ``a``."""
    v = x * a
    norm = np.maximum(np.linalg.norm(v, axis=1, keepdims=True), _EPS)
    u = v / norm
    s = u @ u.T / tau
    np.fill_diagonal(s, -np.inf)
    same = groups[:, None] == groups[None, :]
    np.fill_diagonal(same, False)
    anchor = same.any(axis=1)
    if not anchor.any():
        return 0.0, np.zeros_like(a)
    e = np.exp(s - s.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    e_same = np.where(same, e, 0.0)
    s_same = e_same.sum(axis=1, keepdims=True)
    q = np.where(anchor[:, None], e_same / np.maximum(s_same, 1e-300), 0.0)
    loss = float(-(np.log(np.maximum(s_same[:, 0], 1e-300)) - np.log(e.sum(axis=1)))[anchor].mean())
    g = np.where(anchor[:, None], p - q, 0.0) / anchor.sum()  # dloss/ds
    du = (g + g.T) @ u / tau
    dv = (du - u * np.sum(du * u, axis=1, keepdims=True)) / norm
    return loss, np.sum(dv * x, axis=0)


def fit_weights(
    x: FloatArray,
    groups: IntArray,
    init: FloatArray,
    *,
    tau: float = TAU,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
) -> FloatArray:
    """Per-dimension weights (sum 1) that pull same-group rows of ``x`` together.

    ``x``: standardized, unweighted rows ``(n, d)``; ``groups``: one code per row; ``init``:
    the starting weights (``d``, sum 1). Deterministic.
    """
    a = np.sqrt(np.asarray(init, dtype=np.float64))
    m = np.zeros_like(a)
    v = np.zeros_like(a)
    b1, b2 = 0.9, 0.999
    first = last = None
    for t in range(1, steps + 1):
        loss, g = _loss_grad(a, x, groups, tau)
        first = loss if first is None else first
        last = loss
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        a = a - learning_rate * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + 1e-8)
    w = a * a
    total = float(w.sum())
    if not total > 0:
        return np.asarray(init, dtype=np.float64)
    log.debug("similarity fit: %d rows, loss %.4f -> %.4f", x.shape[0], first or 0.0, last or 0.0)
    return np.asarray(w / total, dtype=np.float64)


def _unit_rows(x: FloatArray, w: FloatArray) -> FloatArray:
    v = x * np.sqrt(w)
    out: FloatArray = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), _EPS)
    return out


def top1_hits(
    library: FloatArray,
    codes: IntArray,
    queries: IntArray,
    weights: FloatArray,
    *,
    chunk: int = 1024,
) -> npt.NDArray[np.bool_]:
    """For each row index in ``queries``: is its nearest other library row in its group?

    ``codes`` gives each library row's group (-1: in no group, never a hit).
    """
    u = _unit_rows(library, weights)
    out = np.zeros(queries.shape[0], dtype=bool)
    for lo in range(0, queries.shape[0], chunk):
        rows = queries[lo : lo + chunk]
        s = u[rows] @ u.T
        s[np.arange(rows.shape[0]), rows] = -np.inf
        best = np.argmax(s, axis=1)
        out[lo : lo + chunk] = (codes[best] == codes[rows]) & (codes[rows] >= 0)
    return out


def assign_folds(codes: IntArray, folds: int, seed: int) -> dict[int, int]:
    """Group code -> fold: whole groups, sizes balanced (largest groups first, each to the
    currently smallest fold; ties broken by a seeded shuffle)."""
    labels, sizes = np.unique(codes[codes >= 0], return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(labels.shape[0])
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(folds, dtype=np.int64)
    out: dict[int, int] = {}
    for i in order.tolist():
        f = int(np.argmin(load))
        out[int(labels[i])] = f
        load[f] += int(sizes[i])
    return out


@dataclass
class CrossValidation:
    """What :func:`cross_validate` measured."""

    folds: int
    scored: int
    """Tracks scored (members of groups with at least two tracks in the library)."""
    baseline_hits: int
    cv_hits: int
    fold_weights: list[FloatArray] = field(default_factory=list)
    trained: list[set[int]] = field(default_factory=list)
    """Per fold, the group codes the fit saw."""
    tested: list[set[int]] = field(default_factory=list)
    """Per fold, the group codes scored."""

    @property
    def baseline_hit_rate(self) -> float:
        return self.baseline_hits / self.scored if self.scored else 0.0

    @property
    def cv_hit_rate(self) -> float:
        return self.cv_hits / self.scored if self.scored else 0.0


def scorable(codes: IntArray) -> IntArray:
    """Row indices of members of groups with at least two rows."""
    labels, counts = np.unique(codes[codes >= 0], return_counts=True)
    multi = set(labels[counts >= 2].tolist())
    return np.array([i for i, c in enumerate(codes.tolist()) if c in multi], dtype=np.int64)


def train_rows(rows: IntArray, codes: IntArray, cap: int, seed: int) -> IntArray:
    """``rows``, or whole groups of them drawn with ``seed`` up to ``cap`` rows."""
    if rows.shape[0] <= cap:
        return rows
    rng = np.random.default_rng(seed)
    labels = np.unique(codes[rows])
    keep: list[int] = []
    for label in rng.permutation(labels).tolist():
        members = rows[codes[rows] == label]
        if len(keep) + members.shape[0] > cap:
            continue
        keep.extend(members.tolist())
    return np.sort(np.array(keep, dtype=np.int64))


def cross_validate(
    library: FloatArray,
    codes: IntArray,
    baseline: FloatArray,
    *,
    folds: int,
    seed: int = 0,
    fit: FitFn | None = None,
    max_train: int = MAX_TRAIN,
) -> CrossValidation:
    """Same-group top-1 hit rate with ``baseline`` weights, and with weights learned by fold.

    ``library``: standardized unweighted rows of every live track; ``codes``: each row's group
    (-1: none). Every member of a group with at least two rows is scored once, with weights
    learned on the folds that do not hold its group.
    """
    fitter: FitFn = fit if fit is not None else fit_weights
    scored = scorable(codes)
    n_groups = np.unique(codes[scored]).shape[0]
    if folds < 2 or folds > n_groups:
        raise InvalidArgumentError(
            f"folds must be between 2 and the number of groups with at least two tracks "
            f"({n_groups}), got {folds}",
            field="folds",
        )
    fold_of = assign_folds(codes, folds, seed)
    row_fold = np.array([fold_of.get(c, -1) for c in codes.tolist()], dtype=np.int64)
    base = top1_hits(library, codes, scored, baseline)
    cv = CrossValidation(folds, int(scored.shape[0]), int(base.sum()), 0)
    grouped = np.flatnonzero(codes >= 0)
    for f in range(folds):
        train = grouped[row_fold[grouped] != f]
        train = train_rows(train, codes, max_train, seed + 1 + f)
        test = scored[row_fold[scored] == f]
        weights = fitter(library[train], codes[train], baseline)
        cv.fold_weights.append(weights)
        cv.trained.append(set(codes[train].tolist()))
        cv.tested.append(set(codes[test].tolist()))
        cv.cv_hits += int(top1_hits(library, codes, test, weights).sum())
    return cv


def encode_groups(
    track_ids: Sequence[str], groups: dict[str, Hashable]
) -> tuple[IntArray, list[Hashable]]:
    """Row codes for ``track_ids`` (-1 for tracks in no group) and the labels by code."""
    labels: dict[Hashable, int] = {}
    codes = np.full(len(track_ids), -1, dtype=np.int64)
    for i, track in enumerate(track_ids):
        if track in groups:
            codes[i] = labels.setdefault(groups[track], len(labels))
    return codes, list(labels)
