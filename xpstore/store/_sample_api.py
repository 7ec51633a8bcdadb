"""Store methods for prioritized sampling (issue 5): sample, update_priorities, record_feedback.

A mixin of :class:`~xpstore.store.store.Store`; the sampler itself is
:mod:`xpstore.sampling.sampler`, the model
 :mod:`xpstore.sampling.priority`, and the page for users is
docs/sampling.md. The sampler is attached at the first ``sample`` of a session.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt

from xpstore.errors import InvalidRecordError, XpStoreError
from xpstore.model.codec import KIND_CODES, FeedbackOp, PriorityOp, RetrievalOp
from xpstore.model.records import Experience
from xpstore.model.where import compile_where
from xpstore.sampling.priority import PriorityModel

if TYPE_CHECKING:
    from xpstore.model.effects import Effect
    from xpstore.sampling.sampler import Sampler
    from xpstore.store.store import Store

log = logging.getLogger(__name__)

_MAX_FILTERS = 8


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


def _ids_arg(ids: Iterable[int], name: str = "ids") -> list[int]:
    out = list(ids)
    for i, rid in enumerate(out):
        if isinstance(rid, bool) or not isinstance(rid, int | np.integer) or rid < 1:
            raise InvalidRecordError(f"{name}[{i}] is not a record id: {rid!r}", field=name)
    return [int(r) for r in out]


class SampleAPI:
    """Mixed into Store; see the module docstring."""

    _sampler_obj: Sampler | None = None
    _sampler_backlog: list[Effect] | None = None
    _sampler_lock: threading.Lock | None = None
    _filters: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public
    def sample(
        self,
        n: int,
        kind: str | None = None,
        where: Mapping[str, Any] | None = None,
        beta: float | None = None,
        seed: int | None = None,
    ) -> SampleBatch:
        """Draw ``n`` experiences (with replacement) by priority: P(i) = p_i^alpha / sum p^alpha.

        ``kind`` and ``where`` (DESIGN §6 syntax) restrict the population; ``beta`` defaults to
        ``config.priority_beta``; ``seed`` restarts the sampler's RNG (its state is saved at a
        clean close, so a seeded run resumes identically after reopening). Each drawn id's
        retrieval count goes up by one (durable in batches; docs/sampling.md says the window).
        EmptySampleError when there is nothing to draw from.
        """
        store = self._as_store()
        store._check_open()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidRecordError(f"n must be an int >= 1, got {n!r}", field="n")
        kinds = store._kinds(kind)
        b = store.config.priority_beta if beta is None else beta
        if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b <= 1:
            raise InvalidRecordError(f"beta must be in [0, 1], got {beta!r}", field="beta")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidRecordError(f"seed must be an int >= 0, got {seed!r}", field="seed")
        predicate = compile_where(where, kinds)
        sampler = self._sampler()
        what = f"kind {kind!r}" if kind else "the store"
        subset = None
        if predicate is not None:
            assert where is not None
            subset = [
                (KIND_CODES[k], self._filter_ids(sampler, k, where, predicate)) for k in kinds
            ]
            what += f" with where={dict(where)!r}"
        draw = sampler.draw(n, kind=kind, subset=subset, beta=float(b), seed=seed, what=what)
        if sampler.pending_count() >= store.config.sample_flush_retrievals:
            self._flush_retrievals()
        cache: dict[int, Experience] = {}
        records = []
        for rid in draw.ids:
            exp = cache.get(rid)
            if exp is None:
                exp = store.get(rid)
                cache[rid] = exp
            records.append(exp)
        return SampleBatch(draw.ids, records, draw.weights, draw.probabilities)

    def update_priorities(self, ids: Iterable[int], priorities: Iterable[float]) -> None:
        """Set explicit priorities (replacing the formula's) through the WAL, one sync for all.

        Priorities must be finite and > 0; with repeated ids the last one wins. Unknown ids
        raise RecordNotFoundError before anything is logged.
        """
        id_list = _ids_arg(ids)
        values = list(priorities)
        if len(values) != len(id_list):
            raise InvalidRecordError(
                f"{len(id_list)} ids but {len(values)} priorities", field="priorities"
            )
        checked: list[float] = []
        for i, p in enumerate(values):
            ok = not isinstance(p, bool) and isinstance(p, int | float | np.floating | np.integer)
            if not ok or not math.isfinite(float(p)) or not float(p) > 0:
                raise InvalidRecordError(
                    f"priorities[{i}] must be a finite number > 0, got {p!r}",
                    field=f"priorities[{i}]",
                )
            checked.append(float(p))
        if id_list:
            self._submit_many(PriorityOp(id_list, checked))

    def record_feedback(
        self,
        ids: Iterable[int],
        success: bool | Sequence[bool],
        *,
        count_retrieval: bool = False,
    ) -> None:
        """Value tracking: ``success_count += 1`` for each id whose use succeeded.

        ``sample`` already counts retrievals; pass ``count_retrieval=True`` for ids the
        application retrieved some other way. Through the WAL like any write.
        """
        id_list = _ids_arg(ids)
        flags = [success] * len(id_list) if isinstance(success, bool) else list(success)
        if len(flags) != len(id_list):
            raise InvalidRecordError(
                f"{len(id_list)} ids but {len(flags)} success flags", field="success"
            )
        for i, f in enumerate(flags):
            if not isinstance(f, bool | np.bool_):
                raise InvalidRecordError(
                    f"success[{i}] must be a bool, got {f!r}", field=f"success[{i}]"
                )
        if id_list:
            self._submit_many(FeedbackOp(id_list, [bool(f) for f in flags], count_retrieval))

    def sampling_probabilities(self, kind: str | None = None) -> dict[int, float]:
        """P(i) of every live item of ``kind`` (or the store): for checks and small stores."""
        store = self._as_store()
        store._check_open()
        store._kinds(kind)
        return self._sampler().probabilities(kind)

    # ------------------------------------------------------------------ internals
    def _as_store(self) -> Store:
        return cast("Store", self)

    def _submit_many(self, op: PriorityOp | FeedbackOp | RetrievalOp) -> None:
        store = self._as_store()
        store._submit([op], [store._encode(op, 0)])

    def _sampler(self) -> Sampler:
        store = self._as_store()
        if self._sampler_obj is not None:
            return self._sampler_obj
        if self._sampler_lock is None:
            self._sampler_lock = threading.Lock()
        with self._sampler_lock:
            if self._sampler_obj is None:
                self._sampler_obj = self._attach_sampler()
        assert self._sampler_obj is not None
        store._check_open()
        return self._sampler_obj

    def _attach_sampler(self) -> Sampler:
        from xpstore.sampling.sampler import Sampler, fill_missing_rows

        store = self._as_store()
        cfg = store.config
        model = PriorityModel(
            w_confidence=cfg.priority_w_confidence,
            w_reward=cfg.priority_w_reward,
            w_age=cfg.priority_age_half_life_s and cfg.priority_w_age,
            floor=cfg.priority_floor,
            age_half_life_s=cfg.priority_age_half_life_s,
            value_weight=cfg.priority_value_weight,
            new_item_priority=cfg.new_item_priority,
            alpha=cfg.priority_alpha,
        )
        sampler = Sampler(model)
        tables = store._tables
        if tables is None:
            store._check_open()
            raise XpStoreError("store has no tables")
        ov = None if store.readonly else store._overlay
        unapplied: list[Effect] = []
        if ov is not None:
            with ov.lock:
                self._sampler_backlog = []
                ov.listeners.append(self._sampler_listener)
                unapplied = [eff for eff in ov.queue if eff.record_id is not None]
        try:
            values, applied = tables.prio_rows()
            if not store.readonly:
                values = fill_missing_rows(tables, values)
            with tables.reading() as txn:
                state = tables.get_meta(txn, "sampler")
            sampler.load(values, state)
            for eff in unapplied:
                if eff.lsn > applied:
                    sampler.apply_row(
                        eff.record_id or 0, KIND_CODES[eff.kind], eff.prio, eff.value is None
                    )
        except BaseException:
            if ov is not None:
                with ov.lock:
                    ov.listeners.remove(self._sampler_listener)
            raise
        if ov is not None:
            with ov.lock:
                backlog, self._sampler_backlog = self._sampler_backlog or [], None
                sampler.on_effects(backlog)
        log.info("sampler attached: %s", sampler.size())
        return sampler

    def _sampler_listener(self, effects: list[Effect]) -> None:
        """Overlay listener (WAL leader, under the overlay lock): never raises."""
        try:
            if self._sampler_backlog is not None:
                self._sampler_backlog.extend(e for e in effects if e.record_id is not None)
                return
            sampler = self._sampler_obj
            if sampler is not None:
                sampler.on_effects(effects)
        except Exception:
            log.exception("sampler update failed; it will be rebuilt at the next sample")
            self._sampler_obj = None

    def _filter_ids(
        self, sampler: Sampler, kind: str, where: Mapping[str, Any], predicate: Any
    ) -> npt.NDArray[np.int64]:
        """Ids of ``kind`` matching ``where``: scanned once, then kept current from the
        changed-id log (no copy of the tree per query)."""
        from xpstore.sampling.sampler import _Filter, where_key

        store = self._as_store()
        key = where_key(kind, where)
        filters = sampler.filters
        flt = filters.get(key)
        if flt is None:
            with sampler.lock:
                seen = len(sampler.changed)
                if not filters:
                    sampler.changed.clear()
                    seen = 0
            ids = {exp.id for exp in store.scan(kind, where=where)}
            flt = _Filter(kind, predicate, ids, seen)
            if len(filters) >= _MAX_FILTERS:
                filters.pop(next(iter(filters)))
            filters[key] = flt
        with sampler.lock:
            changed = sampler.changed[flt.seen :]
            flt.seen = len(sampler.changed)
        before = len(flt.ids)
        dirty = flt.array is None
        for rid in set(changed):
            exp = store._read_get(rid)
            if exp is not None and exp.kind == kind and predicate(exp):
                dirty = dirty or rid not in flt.ids
                flt.ids.add(rid)
            elif rid in flt.ids:
                flt.ids.discard(rid)
                dirty = True
        if dirty or len(flt.ids) != before or flt.array is None:
            flt.array = np.fromiter(sorted(flt.ids), dtype=np.int64, count=len(flt.ids))
        return flt.array

    def _flush_retrievals(self) -> None:
        """Log the retrieval counts ``sample`` bumped in memory (one WAL operation)."""
        sampler = self._sampler_obj
        store = self._as_store()
        if sampler is None or store.readonly:
            return
        pending = sampler.take_pending()
        if pending:
            ids = sorted(pending)
            self._submit_many(RetrievalOp(ids, [pending[i] for i in ids]))

    def _close_sampler(self) -> None:
        """At a clean close: log pending retrievals, save the RNG state and t_ref."""
        sampler = self._sampler_obj
        store = self._as_store()
        if sampler is None:
            return
        try:
            if not store.readonly and store._wal is not None and store._wal.poisoned is None:
                self._flush_retrievals()
                tables = store._tables
                if tables is not None:
                    tables.put_meta("sampler", sampler.state())
        finally:
            ov = store._overlay
            with ov.lock:
                if self._sampler_listener in ov.listeners:
                    ov.listeners.remove(self._sampler_listener)
            self._sampler_obj = None
