"""A hypothesis state machine: random put / put_many / update / delete / delete_track /
close-reopen sequences against an in-memory model, on a real store in a temp directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.helpers import record_as
from tests.strategies import records
from xpstore import Fingerprint, PredictionOutcome, RecordNotFoundError, Store
from xpstore.model.records import Record

TRACKS = st.sampled_from(["t1", "t2", "t3"])


def _fixed_dim(record: Record) -> Record:
    """A store fixes one embedding dimension; give every generated embedding dimension 3."""
    if isinstance(record, Fingerprint) and record.embedding is not None:
        return record.model_copy(update={"embedding": (record.embedding * 3)[:3]})
    return record


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="xpstore-stateful-"))
        self.path = self.dir / "store"
        self.held = False
        # the model has no background validation: a batch fingerprint replacing a
        # streaming-only one would be validated by a maintenance task at a moment of its own
        # (tests/test_validation.py covers that), racing the invariant below
        self.store = Store.open(self.path, create=True, durability="none", validation_auto=False)
        self.model: dict[int, Record] = {}  # id -> record (with ts as stored)
        self.tracks: dict[str, int] = {}
        self.max_id = 0

    def _remember(self, rid: int) -> None:
        assert rid > self.max_id, "ids must increase and never be reused"
        self.max_id = rid
        rec = self.store.get(rid).record
        self.model[rid] = rec
        if isinstance(rec, Fingerprint):
            self.tracks[rec.track_id] = rid

    @rule(record=records())
    def put(self, record: Record) -> None:
        self._remember(self.store.put(_fixed_dim(record)))

    @rule(batch=st.lists(records(), min_size=1, max_size=5))
    def put_many(self, batch: list[Record]) -> None:
        for rid in self.store.put_many([_fixed_dim(r) for r in batch]):
            self._remember(rid)

    @rule(track=TRACKS, record=records())
    def put_fingerprint_for_known_track(self, track: str, record: Record) -> None:
        if isinstance(record, Fingerprint):
            self._remember(
                self.store.put(_fixed_dim(record).model_copy(update={"track_id": track}))
            )

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.model)))
        self.store.delete(rid)
        rec = self.model.pop(rid)
        if isinstance(rec, Fingerprint) and self.tracks.get(rec.track_id) == rid:
            del self.tracks[rec.track_id]

    @rule(rid=st.integers(min_value=1, max_value=10_000))
    def delete_missing(self, rid: int) -> None:
        if rid in self.model:
            return
        try:
            self.store.delete(rid)
        except RecordNotFoundError:
            return
        raise AssertionError(f"deleting missing id {rid} did not raise")

    @precondition(lambda self: any(isinstance(r, PredictionOutcome) for r in self.model.values()))
    @rule(
        data=st.data(),
        actual=st.sampled_from(["warm", "bright", None]),
        reward=st.one_of(st.none(), st.floats(-1, 1)),
    )
    def update(self, data: st.DataObject, actual: str | None, reward: float | None) -> None:
        ids = sorted(i for i, r in self.model.items() if isinstance(r, PredictionOutcome))
        rid = data.draw(st.sampled_from(ids))
        exp = self.store.update(rid, actual=actual, reward=reward)
        assert exp.id == rid
        self.model[rid] = exp.record
        updated = record_as(exp, PredictionOutcome)
        assert updated.actual == actual and updated.reward == reward

    @precondition(lambda self: bool(self.tracks))
    @rule(data=st.data())
    def delete_track(self, data: st.DataObject) -> None:
        track = data.draw(st.sampled_from(sorted(self.tracks)))
        self.store.delete_track(track)
        del self.tracks[track]

    @rule(hold=st.booleans())
    def reopen(self, hold: bool) -> None:
        self.store.close()
        self.held = hold
        self.store = Store.open(self.path, durability="none", hold_applier=hold)

    @invariant()
    def matches_model(self) -> None:
        assert self.store.count() == len(self.model)
        scanned = {e.id: e.record for e in self.store.scan()}
        assert scanned == self.model
        for track, rid in self.tracks.items():
            assert self.store.get_fingerprint(track).id == rid

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
