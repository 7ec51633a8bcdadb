"""Prioritized sampling for a Store (issue 5): sample, update_priorities, record_feedback.

The sampler itself is :mod:`xpstore.sampling.sampler`, the model :mod:`xpstore.sampling.priority`,
and the page for users is docs/sampling.md. The sampler is attached at the first ``sample`` of a
session: it subscribes to the overlay (each acknowledged batch is queued for it, and applied
before the next draw), loads the ``prio`` rows from LMDB and lays the unapplied effects over them.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from xpstore.config import SamplingSettings, StoreConfig
from xpstore.errors import InvalidArgumentError, XpStoreError
from xpstore.model.codec import KIND_CODES, FeedbackOp, PriorityOp, RetrievalOp
from xpstore.model.records import SAMPLEABLE_KINDS, Experience
from xpstore.model.where import compile_where
from xpstore.persistence import wal as wal_mod
from xpstore.sampling.priority import PriorityModel
from xpstore.store.engine import Engine, timed
from xpstore.store.reader import Reader, kinds_arg
from xpstore.store.writer import Writer

if TYPE_CHECKING:
    from xpstore.model.effects import Effect
    from xpstore.persistence.overlay import Subscription
    from xpstore.sampling.sampler import Draw, Sampler

__all__ = ["SampleBatch", "Sampling"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleBatch:
    """One prioritized batch: ``ids[i]`` was drawn with probability ``probabilities[i]`` and
    carries importance weight ``weights[i]`` = (N·P(i))^-β / max_j (N·P(j))^-β."""

    ids: list[int]
    records: list[Experience]
    weights: npt.NDArray[np.float64]
    probabilities: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ids)


class Sampling:
    """The sampler of one open store, attached on first use."""

    def __init__(self, engine: Engine, reader: Reader, writer: Writer) -> None:
        self._engine = engine
        self._reader = reader
        self._writer = writer
        self._lock = threading.Lock()
        self._sub: Subscription | None = None
        self.sampler: Sampler | None = None
        """The attached sampler (None before the first ``sample``): a documented seam for tests
        and tools."""
        self.draw_listeners: list[Callable[[SampleBatch], None]] = []
        """Called with every drawn batch (the pattern detector counts retrievals of
        fingerprints); a listener must be cheap and must not raise."""
        engine.settings.watch(self._configure)

    # ------------------------------------------------------------------ public
    @timed("sample")
    def sample(
        self,
        n: int,
        kind: str | None,
        where: Mapping[str, Any] | None,
        beta: float | None,
        seed: int | None,
    ) -> SampleBatch:
        """See :meth:`xpstore.Store.sample`."""
        draw = self.draw(n, kind, where, beta, seed)
        cache: dict[int, Experience] = {}
        records = []
        for rid in draw.ids:
            exp = cache.get(rid)
            if exp is None:
                exp = cache[rid] = self._reader.get(rid)
            records.append(exp)
        batch = SampleBatch(draw.ids, records, draw.weights, draw.probabilities)
        for listener in self.draw_listeners:
            listener(batch)
        return batch

    def draw(
        self,
        n: int,
        kind: str | None,
        where: Mapping[str, Any] | None,
        beta: float | None,
        seed: int | None,
        count: bool = True,
    ) -> Draw:
        """The ids, probabilities and weights of ``sample`` without decoding any record (what
        the batch iterators build arrays from); ``count=False`` leaves retrieval counts alone."""
        engine = self._engine
        engine.check_open()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidArgumentError(f"n must be an int >= 1, got {n!r}", field="n")
        kinds = _sampleable(kind)
        cfg = engine.config.sampling
        if n > cfg.max_sample:
            raise InvalidArgumentError(
                f"n={n:,} is over this store's limit of {cfg.max_sample:,} draws per call "
                "(sampling.max_sample; draws are with replacement, so n is not bounded by the "
                "population): draw in several calls, or raise the limit with "
                "store.reconfigure(**{'sampling.max_sample': ...})",
                field="n",
            )
        b = cfg.beta if beta is None else beta
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b <= 1:
            raise InvalidArgumentError(f"beta must be in [0, 1], got {beta!r}", field="beta")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidArgumentError(f"seed must be an int >= 0, got {seed!r}", field="seed")
        predicate = compile_where(where, kinds)
        sampler = self.attached()
        what = f"kind {kind!r}" if kind else "the store"
        subset = None
        if predicate is not None:
            assert where is not None
            reader = self._reader
            subset = [
                (KIND_CODES[k], sampler.filter_ids(
                    k, where, predicate,
                    scan=lambda k=k: (exp.id for exp in reader.scan(k, where=where)),  # type: ignore[misc]
                    lookup=reader.read_get,
                ))
                for k in kinds
            ]  # fmt: skip
            what += f" with where={dict(where)!r}"
        draw = sampler.draw(n, kind=kind, subset=subset, beta=float(b), seed=seed, what=what,
                            count=count)  # fmt: skip
        if sampler.pending_count() >= cfg.flush_retrievals:
            self._flush_retrievals()
        return draw

    def update_priorities(self, ids: Iterable[int], priorities: Iterable[float]) -> None:
        """See :meth:`xpstore.Store.update_priorities`."""
        op = priority_op(ids, priorities)
        if op is not None:
            self._writer.submit_one(op)

    def record_feedback(
        self, ids: Iterable[int], success: bool | Sequence[bool], count_retrieval: bool
    ) -> None:
        """See :meth:`xpstore.Store.record_feedback`."""
        op = feedback_op(ids, success, count_retrieval)
        if op is not None:
            self._writer.submit_one(op)

    def probabilities(self, kind: str | None) -> dict[int, float]:
        """P(i) of every live item of ``kind`` (or the store): for checks and small stores."""
        self._engine.check_open()
        _sampleable(kind)
        return self.attached().probabilities(kind)

    def attached(self) -> Sampler:
        """The sampler, attached if this is the first use, caught up with every acknowledged
        write."""
        sampler = self.sampler
        if sampler is None:
            with self._lock:
                if self.sampler is None:
                    self.sampler = self._attach()
                sampler = self.sampler
        self._engine.check_open()
        try:
            sampler.catch_up()
        except Exception:
            log.exception("sampler update failed; rebuilding it from LMDB and the overlay")
            self._detach()
            return self.attached()
        return sampler

    def _detach(self) -> None:
        with self._lock:
            if self._sub is not None:
                self._sub.cancel()
                self._sub = None
            self.sampler = None

    def close(self) -> None:
        """At a clean close: log pending retrievals, save the RNG state and t_ref."""
        sampler = self.sampler
        if sampler is None:
            return
        engine = self._engine
        try:
            wal = engine.wal
            if not engine.readonly and wal is not None and wal.poisoned is None:
                self._flush_retrievals(timeout=wal_mod.CLOSE_TIMEOUT_S)
                engine.tables.put_meta("sampler", sampler.state())
        finally:
            self._detach()

    # ------------------------------------------------------------------ internals
    def _attach(self) -> Sampler:
        from xpstore.sampling.sampler import Sampler, fill_missing_rows

        engine = self._engine
        engine.check_open()
        sampler = Sampler(_model(engine.config.sampling))
        tables = engine.tables
        sub = None
        unapplied: list[Effect] = []
        if not engine.readonly:
            sub, unapplied = engine.overlay.subscribe(sampler.receive)
        try:
            values, applied = tables.prio_rows()
            if not engine.readonly:
                values = fill_missing_rows(tables, values)
            with tables.reading() as txn:
                state = tables.get_meta(txn, "sampler")
            sampler.load(values, state)
            sampler.loaded_lsn = applied  # held batches may repeat what LMDB has since
            sampler.on_effects([e for e in unapplied if e.lsn > applied])
        except BaseException:
            if sub is not None:
                sub.cancel()
            raise
        if sub is not None:
            sub.start()  # batches since subscribe land in the sampler's inbox
        self._sub = sub
        log.info("sampler attached: %s", sampler.size())
        return sampler

    def _flush_retrievals(self, timeout: float | None = None) -> None:
        """Log the retrieval counts ``sample`` bumped in memory (one WAL operation)."""
        sampler = self.sampler
        if sampler is None or self._engine.readonly:
            return
        pending = sampler.take_pending()
        if pending:
            ids = sorted(pending)
            try:
                _first, lsn = self._writer.submit_one(RetrievalOp(ids, [pending[i] for i in ids]),
                                                      timeout=timeout)  # fmt: skip
            except BaseException:
                sampler.forget_inflight(pending)
                raise
            self._apply_counts(lsn)

    def _apply_counts(self, lsn: int) -> None:
        """Apply the logged counts to LMDB now, in this (the drawing) thread.

        The in-place add is one LMDB call per record, and each call releases and retakes the
        GIL: on the applier's thread, beside a training loop that holds the GIL, every one of
        them waited for the loop (measured: 8-10x its CPU time in wall time, and the loop
        slowed by as much). Done here, in sequence with the draws, it costs its CPU and one
        LMDB commit. It never waits for another apply (a compaction, a snapshot): the applier's
        thread gets to them then. Failures are left to the applier's thread, which reports them."""
        applier = self._engine.applier
        if applier is None or applier.hold or applier.error is not None:
            return
        try:
            applier.try_apply_through(lsn)
        except XpStoreError:
            log.warning("applying retrieval counts failed here; the applier retries",
                        exc_info=True)  # fmt: skip

    def _configure(self, config: StoreConfig) -> None:
        """A live reconfigure of the priority model: reweigh every tree at the next draw."""
        sampler = self.sampler
        model = _model(config.sampling)
        if sampler is not None and sampler.model != model:
            sampler.set_model(model)


def _model(cfg: SamplingSettings) -> PriorityModel:
    return PriorityModel(
        w_confidence=cfg.w_confidence,
        w_reward=cfg.w_reward,
        w_age=cfg.age_half_life_s and cfg.w_age,
        floor=cfg.floor,
        age_half_life_s=cfg.age_half_life_s,
        value_weight=cfg.value_weight,
        new_item_priority=cfg.new_item_priority,
        alpha=cfg.alpha,
    )


def priority_op(ids: Iterable[int], priorities: Iterable[float]) -> PriorityOp | None:
    """The checked operation of ``update_priorities`` (None: no ids); InvalidArgumentError
    names the bad argument."""
    id_list = _ids_arg(ids)
    values = list(priorities)
    if len(values) != len(id_list):
        raise InvalidArgumentError(
            f"{len(id_list)} ids but {len(values)} priorities", field="priorities"
        )
    checked: list[float] = []
    for i, p in enumerate(values):
        ok = not isinstance(p, bool) and isinstance(p, int | float | np.floating | np.integer)
        if not ok or not math.isfinite(float(p)) or not float(p) > 0:
            raise InvalidArgumentError(
                f"priorities[{i}] must be a finite number > 0, got {p!r}",
                field=f"priorities[{i}]",
            )
        checked.append(float(p))
    return PriorityOp(id_list, checked) if id_list else None


def feedback_op(
    ids: Iterable[int], success: bool | Sequence[bool], count_retrieval: bool
) -> FeedbackOp | None:
    """The checked operation of ``record_feedback`` (None: no ids)."""
    id_list = _ids_arg(ids)
    flags = [success] * len(id_list) if isinstance(success, bool) else list(success)
    if len(flags) != len(id_list):
        raise InvalidArgumentError(
            f"{len(id_list)} ids but {len(flags)} success flags", field="success"
        )
    for i, f in enumerate(flags):
        if not isinstance(f, bool | np.bool_):
            raise InvalidArgumentError(
                f"success[{i}] must be a bool, got {f!r}", field=f"success[{i}]"
            )
    if not id_list:
        return None
    return FeedbackOp(id_list, [bool(f) for f in flags], bool(count_retrieval))


def _sampleable(kind: str | None) -> tuple[str, ...]:
    """The experience kinds ``kind=`` selects (decisions are audit records, never sampled)."""
    if kind is None:
        return SAMPLEABLE_KINDS
    kinds = kinds_arg(kind)
    if kind not in SAMPLEABLE_KINDS:
        raise InvalidArgumentError(
            f"{kind} records are not sampled; use one of {', '.join(SAMPLEABLE_KINDS)}",
            field="kind",
        )
    return kinds


def _ids_arg(ids: Iterable[int], name: str = "ids") -> list[int]:
    out = list(ids)
    for i, rid in enumerate(out):
        if isinstance(rid, bool) or not isinstance(rid, int | np.integer) or rid < 1:
            raise InvalidArgumentError(f"{name}[{i}] is not a record id: {rid!r}", field=name)
    return [int(r) for r in out]
