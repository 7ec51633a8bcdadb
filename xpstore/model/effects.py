"""What an operation does to the store's state: :class:`Effect` and :func:`derive`.

:func:`derive` is the one place where the meaning of an operation is defined. It runs when a
writer enqueues an operation (against the newest state, so an update or delete of a missing id
fails before anything is logged) and again when recovery or a point-in-time restore replays the
WAL (against LMDB), so the live path and the replay paths cannot disagree.

Retrieval counts are the one state kept outside the envelopes (docs/design.md, "Retrieval
counts"): a ``RetrievalOp`` derives one effect that *adds* counts (:attr:`Effect.retrievals`),
which the applier adds in place to the records' ``prio`` rows, so counting a draw costs no
envelope rewrite. A record's retrieval count is therefore the larger of its envelope's and its
``prio`` row's, plus the unapplied retrieval effects logged after the state read
(:func:`added_retrievals`); every view an operation is derived against shows that total.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any, cast

from xpstore.errors import RecordNotFoundError
from xpstore.model.codec import (
    KIND_BY_CODE,
    KIND_CODES,
    DeleteOp,
    DeleteTrackOp,
    FeedbackOp,
    Op,
    PriorityOp,
    PutOp,
    RetrievalOp,
    SettingsOp,
    UpdateOp,
    decode_envelope,
    encode_envelope,
    envelope_counters,
    envelope_from_put,
    new_put_envelopes,
    pack_envelope,
)
from xpstore.model.priority_rows import (
    fingerprint_confidence,
    inputs_for,
    inputs_from_map,
    new_inputs,
)
from xpstore.model.records import (
    Decision,
    Experience,
    Fingerprint,
    PredictionOutcome,
    QueryMetric,
    Record,
    apply_changes,
    kind_of,
)

_PLAIN: frozenset[type] = frozenset({PredictionOutcome, QueryMetric, Decision})
"""Record types that are exactly not fingerprints (no isinstance needed)."""


@dataclass(slots=True)
class Effect:
    """The state change of one operation (one LSN), with the new state already encoded.

    Holding envelope bytes rather than model objects keeps the overlay cheap for the garbage
    collector (a validated record is about ten tracked objects; bytes are none), and leaves the
    applier nothing to encode. Readers decode on demand, exactly as they do from LMDB.
    """

    lsn: int
    record_id: int | None = None
    value: bytes | None = None  # envelope of record_id's new state; None with record_id: deleted
    kind: str = ""  # kind of record_id (of the new state, or of the deleted record)
    ts: float = 0.0  # ts of record_id (never changes for an id)
    is_new: bool = False
    track: str | None = None
    track_to: int | None = None  # the track's new current fingerprint id; None: retired
    track_from: int | None = None
    prio: bytes | None = None  # the record's new priority-input row (model/priority_rows.py)
    meta: tuple[str, bytes] | None = None  # a ``meta`` table entry to set (SettingsOp: config)
    counters_only: bool = False  # only counters or the priority changed (many-id operations)
    retrievals: dict[int, int] | None = None  # RetrievalOp: id -> count to add (no record_id)
    fprow: bytes | None = None  # a new fingerprint's ``fprows`` row, when the writer had it in
    # columns (model/fprows.py); None: the applier computes it from ``value``

    def count_delta(self) -> tuple[str, int] | None:
        if self.is_new:
            return self.kind, 1
        if self.record_id is not None and self.value is None:
            return self.kind, -1
        return None

    def experience(self) -> Experience | None:
        """The decoded new state (None for a delete or a track-only effect)."""
        if self.record_id is None or self.value is None:
            return None
        return decode_envelope(self.record_id, self.value)


class StateView:
    """Lookups an operation is derived against (writer view, reader view, replay view).

    The experiences and envelopes a view returns carry the record's *total* retrieval count
    (see the module doc): a rewrite derived from them writes that total into the new envelope
    and ``prio`` row."""

    def __init__(
        self,
        get: Callable[[int], Experience | None],
        track: Callable[[str], int | None],
        get_raw_many: Callable[[list[int]], dict[int, bytes]] | None = None,
    ) -> None:
        self.get = get
        self.track = track
        self.get_raw_many = get_raw_many  # encoded envelopes of live ids (absent: missing)


def derive(op: Op, lsn: int, view: StateView, payload: bytes) -> Effect:
    """The effect of ``op`` (encoded as ``payload``) at ``lsn``.

    Raises RecordNotFoundError for a missing target and InvalidRecordError for a bad update.
    """
    if isinstance(op, PutOp):
        record = op.record
        ts = record.ts
        assert ts is not None, "the store fills ts before logging"
        # exact type first: a record model's isinstance goes through ABCMeta
        fp = type(record) is Fingerprint or (
            type(record) not in _PLAIN and isinstance(record, Fingerprint)
        )
        track = cast(Fingerprint, record).track_id if fp else None
        eff = derive_put(lsn, payload, kind_of(record), ts, track, view)
        eff.prio = inputs_for(record, lsn, ts)
        return eff
    if isinstance(op, UpdateOp):
        prev = _require(view, op.id)
        new = replace(prev, record=apply_changes(prev.record, op.changes), updated_lsn=lsn)
        return _rewrite(lsn, new)
    if isinstance(op, DeleteOp):
        prev = _require(view, op.id)
        eff = Effect(lsn, record_id=op.id, value=None, kind=prev.kind, ts=prev.ts)
        if isinstance(prev.record, Fingerprint) and view.track(prev.record.track_id) == op.id:
            eff.track, eff.track_from, eff.track_to = prev.record.track_id, op.id, None
        return eff
    if isinstance(op, SettingsOp):
        return Effect(lsn, meta=("config", op.config.encode()))
    if isinstance(op, DeleteTrackOp):
        current = view.track(op.track_id)
        if current is None:
            raise RecordNotFoundError(f"no track {op.track_id!r} (or it was already deleted)")
        return Effect(lsn, track=op.track_id, track_from=current, track_to=None)
    raise TypeError(f"unknown operation {op!r}")


def derive_all(op: Op, lsn: int, view: StateView, payload: bytes) -> list[Effect]:
    """The effects of ``op``: one, or one per id for the many-id operations (same LSN).

    Ids repeated in one operation apply in order (the last priority wins; feedback counts
    each occurrence). Raises RecordNotFoundError naming the first missing id. A
    ``RetrievalOp`` is one effect of counts to add, derived without reading any state (an id
    deleted meanwhile simply has no row to add to).
    """
    if isinstance(op, RetrievalOp):
        return [Effect(lsn, retrievals=retrieval_counts(op.ids, op.counts))]
    if not isinstance(op, PriorityOp | FeedbackOp):
        return [derive(op, lsn, view, payload)]
    if view.get_raw_many is not None:
        return _derive_many_raw(op, lsn, view.get_raw_many(sorted(set(op.ids))))
    seen: dict[int, Experience] = {}
    out: list[Effect] = []
    for i, rid in enumerate(op.ids):
        prev = seen.get(rid)
        if prev is None:
            prev = _require(view, rid)
        if isinstance(op, PriorityOp):
            new = replace(prev, priority=float(op.priorities[i]), updated_lsn=lsn)
        else:
            rc = prev.retrieval_count + (1 if op.count_retrieval else 0)
            sc = prev.success_count + (1 if op.success[i] else 0)
            new = replace(prev, retrieval_count=max(rc, sc), success_count=sc, updated_lsn=lsn)
        seen[rid] = new
        eff = _rewrite(lsn, new)
        eff.counters_only = True
        out.append(eff)
    return out


def retrieval_counts(ids: Sequence[int], counts: Sequence[int]) -> dict[int, int]:
    """id -> the sum of its counts (an id may repeat in a ``RetrievalOp``); zeros dropped."""
    out = dict(zip(ids, counts, strict=True))
    if len(out) != len(ids):  # repeated ids (the sampler's own operations have none)
        out = {}
        get = out.get
        for rid, n in zip(ids, counts, strict=True):
            out[rid] = get(rid, 0) + int(n)
    if any(n <= 0 for n in out.values()):
        out = {rid: n for rid, n in out.items() if n > 0}
    return out


def added_retrievals(effects: Sequence[Effect], rid: int, after_lsn: int) -> int:
    """The counts that the retrieval effects among ``effects`` (unapplied, LSN order) add to
    ``rid`` after a state read at ``after_lsn`` (an overlay effect's LSN or LMDB's
    ``applied_lsn``)."""
    total = 0
    for eff in effects:
        counts = eff.retrievals
        if counts is not None and eff.lsn > after_lsn:
            total += counts.get(rid, 0)
    return total


def counted_envelope(raw: bytes, stored: int, added: int) -> bytes:
    """Envelope ``raw`` carrying the record's total retrieval count: the larger of its own and
    ``stored`` (its ``prio`` row's), plus ``added`` (unapplied retrievals); re-encoded only
    where that differs (what a view hands to :func:`derive_all`)."""
    if not stored and not added:
        return raw
    obj = envelope_counters(raw)
    total = max(obj[4], stored) + added
    if total == obj[4]:
        return raw
    obj[4] = total
    return pack_envelope(obj)


def _derive_many_raw(op: PriorityOp | FeedbackOp, lsn: int, raws: dict[int, bytes]) -> list[Effect]:
    """derive_all for a many-id operation on encoded envelopes: the counters and priority are
    rewritten in the msgpack list, no record model is built (10k ids per call is the norm)."""
    lists: dict[int, list[Any]] = {}
    out: list[Effect] = []
    for i, rid in enumerate(op.ids):
        obj = lists.get(rid)
        if obj is None:
            raw = raws.get(rid)
            if raw is None:
                raise RecordNotFoundError(f"no record with id {rid}")
            obj = envelope_counters(raw)
            if len(obj) == 7:
                obj.append(None)
            lists[rid] = obj
        if isinstance(op, PriorityOp):
            obj[7] = float(op.priorities[i])
        else:
            obj[5] += 1 if op.success[i] else 0
            obj[4] = max(obj[4] + (1 if op.count_retrieval else 0), obj[5])
        obj[3] = lsn
        kind = KIND_BY_CODE[obj[1]]
        ts = float(obj[2])
        eff = Effect(lsn, record_id=rid, value=pack_envelope(obj), kind=kind, ts=ts,
                     counters_only=True)
        eff.prio = inputs_from_map(kind, obj[6], rid, ts, obj[4], obj[5], obj[7])
        out.append(eff)
    return out


def _rewrite(lsn: int, new: Experience) -> Effect:
    """The effect of rewriting an existing record as ``new`` (same id, same ts)."""
    eff = Effect(lsn, record_id=new.id, value=encode_envelope(new), kind=new.kind, ts=new.ts)
    eff.prio = inputs_for(
        new.record, new.id, new.ts, new.retrieval_count, new.success_count, new.priority
    )
    return eff


def derive_put(
    lsn: int, payload: bytes, kind: str, ts: float, track_id: str | None, view: StateView
) -> Effect:
    """derive() of a put from its summary (recovery: no record models are built)."""
    value = envelope_from_put(payload, kind=kind, ts=ts, updated_lsn=lsn)
    eff = Effect(lsn, record_id=lsn, value=value, kind=kind, ts=ts, is_new=True)
    if track_id is not None:
        eff.track, eff.track_from, eff.track_to = track_id, view.track(track_id), lsn
    return eff


def _require(view: StateView, rid: int) -> Experience:
    exp = view.get(rid)
    if exp is None:
        raise RecordNotFoundError(f"no record with id {rid}")
    return exp


def derive_fingerprint_puts(
    first: int,
    envelopes: Sequence[bytes],
    track_ids: Sequence[str],
    ts: Sequence[float],
    prio: Sequence[bytes],
    view: StateView,
    fprows: Sequence[bytes] | None = None,
) -> list[Effect]:
    """:func:`derive` of consecutive fingerprint puts from ``first`` (``put_fingerprints``),
    given their envelopes (``codec.envelopes_from_puts``): the same effects, built from the
    columns without a record model. A track put twice in the batch is superseded by its later
    row, as separate puts would be."""
    n = len(envelopes)
    lsns = range(first, first + n)
    retired = list(map(view.track, track_ids))  # each track's id before the batch
    if len(set(track_ids)) < n:  # a track put twice: its later row retires the earlier one
        latest: dict[str, int] = {}
        for i, tid in enumerate(track_ids):
            before = latest.get(tid)
            if before is not None:
                retired[i] = before
            latest[tid] = first + i
    # one Effect per row, built by map (no Python loop around the constructor)
    effects = list(map(Effect, lsns, lsns, envelopes, repeat("fingerprint"), ts, repeat(True),
                       track_ids, lsns, retired, prio))  # fmt: skip
    if fprows is not None:
        for eff, row in zip(effects, fprows, strict=True):
            eff.fprow = row
    return effects


PutFacts = tuple[str, float, "str | None", float, float, "int | None"]
"""What deriving a new record's put needs of its model: kind, ts, track id (fingerprints),
priority confidence and absolute reward, embedding dimension (fingerprints with one)."""


def put_facts(record: Record) -> PutFacts:
    """The :data:`PutFacts` of ``record`` (its ts filled in): taken while the model is fresh,
    so a large ``put_many`` need not keep a thousand models until its frame is logged. Only
    the four models themselves: the writer stores a subclass as its kind before this, and the
    attributes are read directly (a call per fact measured ~0.9 µs a record)."""
    t = type(record)
    ts: float = record.ts  # type: ignore[assignment]  # filled in by the writer
    if t is PredictionOutcome:
        r = record.reward  # type: ignore[union-attr]
        return ("prediction", ts, None, record.confidence,  # type: ignore[union-attr]
                0.0 if r is None else min(abs(r), 3.0e38), None)  # fmt: skip
    if t is QueryMetric:
        return "query_metric", ts, None, record.accuracy, 0.0, None  # type: ignore[union-attr]
    if t is Fingerprint:
        emb = record.embedding  # type: ignore[union-attr]
        return ("fingerprint", ts, record.track_id,  # type: ignore[union-attr]
                fingerprint_confidence(record), 0.0,  # type: ignore[arg-type]
                None if emb is None else len(emb))  # fmt: skip
    if t is Decision:
        return "decision", ts, None, 0.0, 0.0, None
    raise TypeError(f"not one of the four record models: {t.__name__}")


@dataclass(frozen=True, slots=True)
class PutRun:
    """A run of new records' puts in columns: their encoded payloads and :data:`PutFacts`,
    no models (``put_many``'s path; :func:`derive_new_puts` derives it)."""

    payloads: list[bytes]
    kinds: tuple[str, ...]
    ts: tuple[float, ...]
    tracks: tuple[str | None, ...]
    conf: tuple[float, ...]
    reward: tuple[float, ...]
    dims: list[tuple[int, int]]
    """(position, embedding dimension) of the fingerprints that carry an embedding."""

    @classmethod
    def of(cls, payloads: list[bytes], facts: Sequence[PutFacts]) -> PutRun:
        """The run of ``payloads`` whose records gave ``facts`` (row for row)."""
        if len(payloads) != len(facts) or not facts:
            raise ValueError(f"a put run needs one fact row per payload, at least one "
                             f"(got {len(payloads)} payloads, {len(facts)} rows)")  # fmt: skip
        kinds, ts, tracks, conf, reward, dims = zip(*facts, strict=True)
        with_dim = ([(i, d) for i, d in enumerate(dims) if d is not None]
                    if dims.count(None) != len(dims) else [])  # fmt: skip
        return cls(payloads, kinds, ts, tracks, conf, reward, with_dim)

    def __len__(self) -> int:
        return len(self.payloads)


def put_run(records: Sequence[Record], payloads: list[bytes]) -> PutRun:
    """The :class:`PutRun` of ``records`` (ts filled in) and their encoded payloads."""
    return PutRun.of(payloads, list(map(put_facts, records)))


def derive_new_puts(first: int, run: PutRun, view: StateView) -> list[Effect]:
    """:func:`derive` of consecutive puts from ``first`` (``put_many``'s batched path), given
    their columns: the same effects, with the envelopes and priority rows built in columns. A
    track put twice in the batch is superseded by its later put, as separate puts would be."""
    n = len(run)
    lsns = range(first, first + n)
    tracks = run.tracks
    to: list[int | None] = [None] * n
    retired: list[int | None] = [None] * n
    latest: dict[str, int] = {}
    lookup = view.track
    for i, tid in enumerate(tracks):
        if tid is not None:
            before = latest.get(tid)
            retired[i] = lookup(tid) if before is None else before
            to[i] = latest[tid] = first + i
    kinds = run.kinds
    values = new_put_envelopes(run.payloads, [KIND_CODES[k] for k in kinds], run.ts, tracks,
                               first)  # fmt: skip
    prio = new_inputs(first, kinds, run.ts, run.conf, run.reward)
    return list(map(Effect, lsns, lsns, values, kinds, run.ts, repeat(True), tracks, to, retired,
                    prio))  # fmt: skip
