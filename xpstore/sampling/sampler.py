"""Prioritized sampling of stored experiences (DESIGN §6; docs/sampling.md).

In memory, per kind: the record ids in ascending order (ids are LSNs, so new records append),
their priority-input rows (``model.priority_rows``) as a structured numpy array, and a
:class:`~xpstore.sampling.sumtree.SumTree` of ``p ** alpha`` over the same slots (a deleted record's
slot keeps weight 0). Whole-store sampling draws each position's kind in proportion to the
kinds' totals (stratified), then an item within the kind (stratified): ``P(i) = w_i / Σ w``.

The sampler is a cache. It is attached at the first ``sample`` of a session: the rows are read
from the LMDB ``prio`` table in one transaction (arrays, no record is decoded), rows a recovery
replay did not write are filled in from their records, and the overlay's unapplied effects are
laid over them; from then on it subscribes to the overlay: each acknowledged batch is queued by
the WAL leader (an append) and applied to the trees before the next draw (:meth:`Sampler.catch_up`),
so sampling work never lengthens a writer's acknowledgement.

Durability: ``update_priorities`` and ``record_feedback`` are WAL operations like any write.
Retrieval counts bumped by ``sample`` are applied in memory at once and made durable in batches
(a ``RetrievalOp`` every ``sample_flush_retrievals`` retrievals, and at a clean close): a crash
loses at most that many counts, and those items may again count as never sampled. A logged
``RetrievalOp`` comes back as an effect of counts to add: the counts this sampler logged itself
(``inflight`` until then) are already in its rows and are not added twice; counts logged by
others (the access-pattern detector) are added. The RNG state,
``t_ref`` and the counters are saved in LMDB ``meta/sampler`` at a clean close, so a seeded run
resumes with the same batches after close and reopen.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from xpstore.errors import EmptySampleError, InvalidRecordError
from xpstore.model.codec import KIND_BY_CODE, KIND_CODES, decode_envelope
from xpstore.model.priority_rows import INPUT_DTYPE, inputs_for
from xpstore.model.records import SAMPLEABLE_KINDS
from xpstore.sampling.priority import PriorityModel
from xpstore.sampling.sumtree import SumTree, importance_weights

if TYPE_CHECKING:
    from xpstore.model.effects import Effect
    from xpstore.model.events import Acknowledged
    from xpstore.persistence.lmdb_tables import LmdbTables

__all__ = ["MAX_FILTERS", "Draw", "Sampler", "fill_missing_rows"]

MAX_FILTERS = 8
"""``where=`` filters whose id sets a sampler keeps current (the oldest is dropped first)."""

log = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
_REFRESH_FRACTION = 1.0 / 32  # of the age half-life: how far t_ref may lag the newest ts


@dataclass
class _Kind:
    """One kind's slots: ids ascending, input rows, and the tree of p**alpha."""

    ids: I64 = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    cols: npt.NDArray[Any] = field(default_factory=lambda: np.zeros(0, dtype=INPUT_DTYPE))
    n: int = 0
    tree: SumTree = field(default_factory=SumTree)

    def slots_of(self, rids: I64) -> I64:
        """Slots of ``rids`` (-1 where absent)."""
        ids = self.ids[: self.n]
        pos = np.searchsorted(ids, rids)
        pos = np.minimum(pos, max(self.n - 1, 0))
        ok = (self.n > 0) & (ids[pos] == rids) if self.n else np.zeros(len(rids), dtype=bool)
        return np.where(ok, pos, -1).astype(np.int64)

    def extend(self, rids: I64, rows: npt.NDArray[Any]) -> int:
        """Append ids (ascending, above every present id) and their rows; the first new slot."""
        need = self.n + int(rids.shape[0])
        if need > self.ids.shape[0]:
            cap = max(1024, 2 * need)
            ids = np.zeros(cap, dtype=np.int64)
            cols = np.zeros(cap, dtype=INPUT_DTYPE)
            ids[: self.n] = self.ids[: self.n]
            cols[: self.n] = self.cols[: self.n]
            self.ids, self.cols = ids, cols
        first = self.n
        self.ids[first:need] = rids
        self.cols[first:need] = rows
        self.n = need
        return first


@dataclass(frozen=True)
class Draw:
    """One batch: ids, P(i) of each, importance weights normalized by their global maximum."""

    ids: list[int]
    probabilities: F64
    weights: F64


class Sampler:
    """The in-memory sampling state of one open store (see module doc). Thread-safe."""

    def __init__(self, model: PriorityModel) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.kinds: dict[int, _Kind] = {KIND_CODES[k]: _Kind() for k in SAMPLEABLE_KINDS}
        self.t_ref = 0.0
        self.newest_ts = 0.0
        self.rng = np.random.default_rng()
        self.pending: dict[int, int] = {}  # id -> retrievals not yet logged
        self.pending_n = 0  # sum of pending
        self.inflight: list[dict[int, int]] = []  # logged by take_pending, effect not seen yet
        self.loaded_lsn = 0  # the LMDB state load() read: older effects are in it already
        self.draws = 0
        self.batches = 0
        self.changed: list[tuple[int, bool]] = []
        """(id, only its counters changed) since filter caches last caught up."""
        self.filters: dict[str, _Filter] = {}
        self._inbox: list[Acknowledged] = []
        self._inbox_lock = threading.Lock()

    # ------------------------------------------------------------ loading
    def load(self, values: list[bytes], state: bytes | None = None) -> None:
        """Build every kind's arrays and tree from ``prio`` table rows (key order = id order),
        with the RNG, t_ref and counters of ``state`` (saved at the last clean close)."""
        restored = self._restore_state(state)
        if not values:
            return
        rows = np.frombuffer(b"".join(values), dtype=INPUT_DTYPE)
        ids = rows["id"].astype(np.int64)
        self.newest_ts = float(rows["ts"].max())
        if not restored:
            self.t_ref = self.newest_ts
        kinds = rows["kind"]
        for code, kind in self.kinds.items():
            mask = kinds == code
            kind.ids = ids[mask]  # boolean indexing copies: the arrays are ours to grow
            kind.cols = rows[mask]
            kind.n = int(kind.ids.shape[0])
            kind.tree = SumTree.from_weights(self.model.weights(kind.cols, self.t_ref))

    def _restore_state(self, raw: bytes | None) -> bool:
        """RNG, t_ref and counters saved by :meth:`state` at the last clean close."""
        if not raw:
            return False
        try:
            data = json.loads(raw)
            rng = np.random.default_rng()
            rng.bit_generator.state = data["rng"]
            self.rng = rng
            self.t_ref = float(data["t_ref"])
            self.draws = int(data["draws"])
            self.batches = int(data["batches"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("sampler state in LMDB is unreadable (%s); starting a fresh RNG", exc)
            return False
        return True

    def state(self) -> bytes:
        return json.dumps(
            {"rng": self.rng.bit_generator.state, "t_ref": self.t_ref, "draws": self.draws,
             "batches": self.batches}
        ).encode()  # fmt: skip

    def set_model(self, model: PriorityModel) -> None:
        """Adopt new priority knobs (a live reconfigure): every tree is reweighed."""
        with self.lock:
            self.model = model
            self._reweigh_all()

    def _reweigh_all(self) -> None:
        """Every slot's weight again at the new ``t_ref``; an emptied slot (a deleted record
        keeps its slot and its row) stays empty."""
        for kind in self.kinds.values():
            if kind.n:
                weights = self.model.weights(kind.cols[: kind.n], self.t_ref)
                weights[kind.tree.get(np.arange(kind.n)) <= 0.0] = 0.0
                kind.tree = SumTree.from_weights(weights)

    # ------------------------------------------------------------ changes
    def receive(self, batch: Acknowledged) -> None:
        """Overlay subscriber: queue the batch (the WAL leader only appends to a list; the trees
        are updated by :meth:`catch_up` on the sampling side, off the acknowledgement path)."""
        with self._inbox_lock:
            self._inbox.append(batch)

    def catch_up(self) -> None:
        """Apply the queued acknowledged batches, in order (before every draw or query)."""
        with self._inbox_lock:
            batches, self._inbox = self._inbox, []
        for batch in batches:
            self.on_effects(batch.effects)

    def on_effects(self, effects: Sequence[Effect]) -> None:
        """Overlay listener: upsert or remove the rows of changed records, add retrieval counts
        (LSN order; an effect at or below :attr:`loaded_lsn` is in the loaded rows already).

        Vectorized per kind (the WAL leader calls this for every commit while the sampler is
        attached, so a 10k-record put_many must not cost 10k Python-level tree updates).
        """
        groups: dict[int, list[tuple[int, bytes | None, bool]]] = {}
        kinds = self.kinds
        changed: set[int] = set()
        loaded = self.loaded_lsn
        for eff in effects:
            if eff.lsn <= loaded:
                continue
            if eff.retrievals is not None:
                with self.lock:  # rows before the counts: counts add to the rows they follow
                    for code, items in groups.items():
                        self._apply_batch(code, items, changed)
                    self._add_logged(eff.retrievals)
                groups, changed = {}, set()
            elif eff.record_id is not None:
                code = KIND_CODES[eff.kind]
                if code in kinds:  # decisions are not sampled
                    groups.setdefault(code, []).append((eff.record_id, eff.prio,
                                                        eff.value is None))  # fmt: skip
                    if not eff.counters_only:  # a counter never changes what where= matches
                        changed.add(eff.record_id)
        if not groups:
            return
        with self.lock:
            for code, items in groups.items():
                self._apply_batch(code, items, changed)

    def _add_logged(self, counts: Mapping[int, int]) -> None:
        """Under the lock: a logged ``RetrievalOp``'s counts, less those this sampler counted
        already (its own ``inflight`` ones: usually the whole operation, the oldest in
        flight, recognized at once)."""
        inflight = self.inflight
        if inflight and counts == inflight[0]:
            del inflight[0]
        else:
            add: dict[int, int] = {}
            for rid, n in counts.items():
                left = n
                for own in inflight:  # in flight, but not this operation: some ids are ours
                    mine = own.get(rid, 0)
                    if mine:
                        take = min(mine, left)
                        left -= take
                        if mine > take:
                            own[rid] = mine - take
                        else:
                            del own[rid]
                        if not left:
                            break
                if left:
                    add[rid] = left
            self.inflight = [own for own in inflight if own]
            if add:
                self._bump(np.fromiter(add, dtype=np.int64, count=len(add)),
                           np.fromiter(add.values(), dtype=np.int64, count=len(add)))  # fmt: skip
        if self.filters:  # where= on retrieval_count: the ids must be looked at again
            self.changed.extend((rid, True) for rid in counts)

    def _counted_here(self, rid: int) -> int:
        """Retrievals of ``rid`` in this sampler's rows that no logged effect has brought."""
        n = self.pending.get(rid, 0)
        for own in self.inflight:
            n += own.get(rid, 0)
        return n

    def apply_row(self, rid: int, kind_code: int, prio: bytes | None, deleted: bool) -> None:
        with self.lock:
            self._apply_batch(kind_code, [(rid, prio, deleted)], {rid})

    def _apply_batch(
        self, code: int, items: list[tuple[int, bytes | None, bool]], changed: set[int]
    ) -> None:
        kind = self.kinds[code]
        last: dict[int, tuple[bytes | None, bool]] = {}
        for rid, prio, deleted in items:  # the last change of an id wins
            if deleted or prio is not None:
                last[rid] = (prio, deleted)
        if not last:
            return
        ups = [(rid, prio) for rid, (prio, deleted) in last.items() if not deleted and prio]
        gone = np.array([rid for rid, (_p, deleted) in last.items() if deleted], dtype=np.int64)
        touched: list[I64] = []
        if ups:
            rids = np.array([rid for rid, _ in ups], dtype=np.int64)
            rows = np.frombuffer(b"".join(p for _, p in ups), dtype=INPUT_DTYPE).copy()
            if self.pending or self.inflight:  # counted here, not in the row yet
                here = self._counted_here
                extra = np.array([here(r) for r in rids.tolist()], dtype=np.int64)
                rows["rc"] = np.minimum(rows["rc"].astype(np.int64) + extra, (1 << 32) - 1)
            slots = kind.slots_of(rids)
            old = slots >= 0
            kind.cols[slots[old]] = rows[old]
            new_rids = rids[~old]
            if new_rids.size:
                order = np.argsort(new_rids, kind="stable")
                if kind.n and int(new_rids[order[0]]) < int(kind.ids[kind.n - 1]):
                    raise InvalidRecordError(
                        f"record {int(new_rids[order[0]])} arrived out of id order", field="id"
                    )
                first = kind.extend(new_rids[order], rows[~old][order])
                slots[np.flatnonzero(~old)[order]] = np.arange(first, kind.n)
            self.newest_ts = max(self.newest_ts, float(rows["ts"].max()))
            touched.append(slots)
        if touched:
            all_slots = np.unique(np.concatenate(touched))
            kind.tree.set(all_slots, self.model.weights(kind.cols[all_slots], self.t_ref))
        if gone.size:
            slots = kind.slots_of(gone)
            slots = slots[slots >= 0]
            if slots.size:
                kind.tree.set(slots, np.zeros(slots.size))
            for rid in gone.tolist():
                self.pending_n -= self.pending.pop(rid, 0)
                for own in self.inflight:
                    own.pop(rid, None)
        if self.filters:
            self.changed.extend((rid, rid not in changed) for rid in last)

    # ------------------------------------------------------------ filters
    def filter_ids(
        self,
        kind: str,
        where: Mapping[str, Any],
        predicate: Callable[[Any], bool],
        scan: Callable[[], Iterable[int]],
        lookup: Callable[[int], Any],
    ) -> I64:
        """Ids of ``kind`` matching ``where``: ``scan()`` once, then kept current from the
        changed-id log (``lookup(id)`` gives a changed record's current state, None if gone).
        At most :data:`MAX_FILTERS` filters are cached."""
        key = where_key(kind, where)
        flt = self.filters.get(key)
        if flt is None:
            with self.lock:
                seen = len(self.changed)
                if not self.filters:
                    self.changed.clear()
                    seen = 0
            flt = _Filter(kind, predicate, set(scan()), seen)
            if len(self.filters) >= MAX_FILTERS:
                self.filters.pop(next(iter(self.filters)))
            self.filters[key] = flt
        with self.lock:
            pending_log = self.changed[flt.seen :]
            flt.seen = len(self.changed)
        # a counter-only change cannot change a filter that does not look at counters
        counters = any(_root(k) in _COUNTER_FIELDS for k in where)
        changed = [rid for rid, only in pending_log if counters or not only]
        dirty = flt.array is None
        for rid in set(changed):
            exp = lookup(rid)
            if exp is not None and exp.kind == kind and predicate(exp):
                dirty = dirty or rid not in flt.ids
                flt.ids.add(rid)
            elif rid in flt.ids:
                flt.ids.discard(rid)
                dirty = True
        if dirty or flt.array is None:
            flt.array = np.fromiter(sorted(flt.ids), dtype=np.int64, count=len(flt.ids))
        return flt.array

    # ------------------------------------------------------------ sampling
    def maybe_refresh(self) -> None:
        """Move t_ref to the newest ts when it lags by more than 1/32 of the half-life."""
        lag = self.newest_ts - self.t_ref
        if lag > self.model.age_half_life_s * _REFRESH_FRACTION:
            self.t_ref = self.newest_ts
            self._reweigh_all()

    def draw(
        self,
        n: int,
        *,
        kind: str | None,
        subset: list[tuple[int, I64]] | None,
        beta: float,
        seed: int | None,
        what: str,
        count: bool = True,
    ) -> Draw:
        """Draw ``n`` ids (with replacement), stratified, with probabilities and weights;
        ``count``: bump the drawn items' retrieval counts (value tracking)."""
        with self.lock:
            if seed is not None:
                self.rng = np.random.default_rng(seed)
            self.maybe_refresh()
            codes = [KIND_CODES[kind]] if kind is not None else sorted(self.kinds)
            slots: list[tuple[int, I64]] = []  # the drawn slots of each kind
            if subset is not None:
                out = self._draw_subset(subset, n, beta, what, slots)
            else:
                out = self._draw_trees(codes, n, beta, what, slots)
            self.draws += n
            self.batches += 1
            if count:
                self._count(slots)
            return out

    def _draw_trees(
        self, codes: list[int], n: int, beta: float, what: str, drawn: list[tuple[int, I64]]
    ) -> Draw:
        totals = np.array([self.kinds[c].tree.total for c in codes], dtype=np.float64)
        grand = float(totals.sum())
        if not grand > 0:
            raise EmptySampleError(f"nothing to sample: {what} is empty")
        u = (np.arange(n) + self.rng.random(n)) / n * grand
        which = np.minimum(np.searchsorted(np.cumsum(totals), u, side="right"), len(codes) - 1)
        ids = np.zeros(n, dtype=np.int64)
        probs = np.zeros(n, dtype=np.float64)
        count = 0
        min_w = np.inf
        for j, code in enumerate(codes):
            tree = self.kinds[code].tree
            count += len(tree)
            if tree.total > 0:
                min_w = min(min_w, tree.min_weight)
            pos = np.flatnonzero(which == j)
            if not pos.size:
                continue
            slots = tree.sample(int(pos.size), self.rng)
            kind = self.kinds[code]
            ids[pos] = kind.ids[slots]
            probs[pos] = tree.get(slots) / grand
            drawn.append((code, slots))
        weights = importance_weights(probs, count, beta, float(min_w) / grand)
        return Draw(ids.tolist(), probs, weights)

    def _draw_subset(
        self, parts: list[tuple[int, I64]], n: int, beta: float, what: str,
        drawn: list[tuple[int, I64]],
    ) -> Draw:  # fmt: skip
        """Sample among the given ids of the given kinds (a ``where=`` filter's matches)."""
        all_ids: list[I64] = []
        all_w: list[F64] = []
        all_slots: list[tuple[int, I64]] = []
        for code, subset in parts:
            kind = self.kinds[code]
            slots = kind.slots_of(subset) if kind.n else np.zeros(0, dtype=np.int64)
            slots = slots[slots >= 0]
            w = kind.tree.get(slots) if slots.size else np.zeros(0)
            live = w > 0
            all_ids.append(kind.ids[slots[live]])
            all_w.append(w[live])
            all_slots.append((code, slots[live]))
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, dtype=np.int64)
        w = np.concatenate(all_w) if all_w else np.zeros(0)
        total = float(w.sum())
        if not total > 0:
            raise EmptySampleError(f"nothing to sample: {what} matches no live record")
        cum = np.cumsum(w)
        u = (np.arange(n) + self.rng.random(n)) / n * cum[-1]
        pick = np.minimum(np.searchsorted(cum, u, side="right"), w.shape[0] - 1)
        probs = w[pick] / total
        weights = importance_weights(probs, int(w.shape[0]), beta, float(w.min()) / total)
        start = 0
        for code, slots in all_slots:  # the picks of each kind, as slots of its tree
            end = start + int(slots.shape[0])
            mine = pick[(pick >= start) & (pick < end)]
            if mine.size:
                drawn.append((code, slots[mine - start]))
            start = end
        return Draw(ids[pick].tolist(), probs, weights)

    def _count(self, drawn: list[tuple[int, I64]]) -> None:
        """Retrievals of the drawn slots (per kind): in memory now (they move priority),
        logged later in batches."""
        pending = self.pending
        get = pending.get
        for code, slots in drawn:
            kind = self.kinds[code]
            uniq, counts = np.unique(slots, return_counts=True)
            self._bump_slots(kind, uniq, counts)
            for rid, c in zip(kind.ids[uniq].tolist(), counts.tolist(), strict=True):
                pending[rid] = get(rid, 0) + c
            self.pending_n += int(slots.shape[0])

    def _bump(self, rids: I64, counts: I64) -> None:
        """Under the lock: add ``counts`` to the retrieval counts of ``rids`` and reweigh."""
        for kind in self.kinds.values():
            if not kind.n:
                continue
            slots = kind.slots_of(rids)
            hit = slots >= 0
            if hit.any():  # a deleted record keeps its slot at weight 0: it stays there
                hit[hit] = kind.tree.get(slots[hit]) > 0
            if not hit.any():
                continue
            uniq, inverse = np.unique(slots[hit], return_inverse=True)
            added = np.bincount(inverse, weights=counts[hit]).astype(np.int64)
            self._bump_slots(kind, uniq, added)

    def _bump_slots(self, kind: _Kind, uniq: I64, added: I64) -> None:
        """Under the lock: add ``added`` retrievals to the distinct ``uniq`` slots, reweigh."""
        rc = kind.cols["rc"]
        rc[uniq] = np.minimum(rc[uniq].astype(np.int64) + added, (1 << 32) - 1)
        kind.tree.set(uniq, self.model.weights(kind.cols[uniq], self.t_ref))

    def take_pending(self) -> dict[int, int]:
        """The retrievals counted since the last call, to be logged now: they are
        ``inflight`` until their logged effect comes back (see the module doc)."""
        with self.lock:
            out, self.pending, self.pending_n = self.pending, {}, 0
            if out:
                self.inflight.append(dict(out))
            return out

    def forget_inflight(self, counts: Mapping[int, int]) -> None:
        """``counts`` were not logged after all (the WAL refused them): expect no effect."""
        with self.lock:
            self.inflight = [own for own in self.inflight if own != counts]

    def pending_count(self) -> int:
        return self.pending_n

    def probabilities(self, kind: str | None = None) -> dict[int, float]:
        """P(i) of every live item (tests, small stores)."""
        with self.lock:
            self.maybe_refresh()
            codes = [KIND_CODES[kind]] if kind is not None else sorted(self.kinds)
            grand = sum(self.kinds[c].tree.total for c in codes)
            out: dict[int, float] = {}
            for c in codes:
                k = self.kinds[c]
                if not k.n:
                    continue
                w = k.tree.get(np.arange(k.n))
                for rid, wi in zip(k.ids[: k.n].tolist(), w.tolist(), strict=True):
                    if wi > 0:
                        out[rid] = wi / grand
            return out

    def size(self) -> dict[str, int]:
        return {KIND_BY_CODE[c]: len(k.tree) for c, k in self.kinds.items()}


@dataclass
class _Filter:
    """The ids of one kind matching one ``where=``, kept current from the changed-id log."""

    kind: str
    predicate: Callable[[Any], bool]
    ids: set[int]
    seen: int  # position in Sampler.changed already processed
    array: I64 | None = None  # ids sorted, rebuilt only when the set changed


def fill_missing_rows(tables: LmdbTables, values: list[bytes]) -> list[bytes]:
    """Rows for records that have none (puts a recovery replay copied without computing them).

    Free when the tables agree in size (the common case); otherwise compares the ``records``
    table's keys with the rows' ids and decodes only the records that lack a row.
    """
    with tables.reading() as txn:
        counts = tables.counts(txn)
    if sum(counts.get(KIND_CODES[k], 0) for k in SAMPLEABLE_KINDS) == len(values):
        return values
    have = set(np.frombuffer(b"".join(values), dtype=INPUT_DTYPE)["id"].tolist())
    missing: list[tuple[bytes, bytes]] = []
    with tables.reading() as txn:
        cur = txn.cursor(db=tables.db(b"records"))
        for key, value in cur.iternext(keys=True, values=True):
            rid = int.from_bytes(bytes(key), "big")
            if rid in have:
                continue
            exp = decode_envelope(rid, bytes(value))
            row = inputs_for(exp.record, rid, exp.ts, exp.retrieval_count, exp.success_count,
                             exp.priority)  # fmt: skip
            if row is not None:  # None: not a sampled kind
                missing.append((bytes(key), row))
    if not missing:
        return values
    for start in range(0, len(missing), 10_000):
        tables.put_prio(missing[start : start + 10_000])
    log.info("sampling: filled %d missing priority-input rows", len(missing))
    rows = values + [row for _key, row in missing]
    rows.sort(key=lambda v: int.from_bytes(v[:8], "little"))
    return rows


_COUNTER_FIELDS = frozenset({"retrieval_count", "success_count", "updated_lsn"})


def _root(key: str) -> str:
    return key.partition("__")[0].partition(".")[0]


def where_key(kind: str, where: Mapping[str, Any]) -> str:
    return kind + "|" + json.dumps(where, sort_keys=True, default=repr)

