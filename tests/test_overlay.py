"""The overlay's layers keep the newest effect per record id and per track, whatever the mix of
effects in a batch (the C-level indexing of :func:`xpstore.persistence.overlay._index`)."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from xpstore.model.effects import Effect
from xpstore.persistence.overlay import MISSING, Overlay


def _effect(lsn: int, shape: int, rid: int, track: str) -> Effect:
    """One of the shapes derive() makes: a fingerprint put, a put without a track, a delete
    retiring a track, a delete-track (no record id), a settings change (neither)."""
    if shape == 0:
        return Effect(lsn, lsn, b"v", "fingerprint", 1.0, True, track, lsn, None)
    if shape == 1:
        return Effect(lsn, lsn, b"v", "prediction", 1.0, True)
    if shape == 2:
        return Effect(lsn, rid, None, "fingerprint", 1.0, track=track, track_from=rid)
    if shape == 3:
        return Effect(lsn, track=track, track_from=rid, track_to=None)
    return Effect(lsn, meta=("config", b"{}"))


def _expected(effects: list[Effect]) -> tuple[dict[int, Effect], dict[str, Effect]]:
    records: dict[int, Effect] = {}
    tracks: dict[str, Effect] = {}
    for eff in effects:  # the per-effect loop the overlay used before
        if eff.record_id is not None:
            records[eff.record_id] = eff
        if eff.track is not None:
            tracks[eff.track] = eff
    return records, tracks


_batch = st.lists(st.tuples(st.integers(0, 4), st.integers(1, 6), st.sampled_from("abc")),
                  max_size=12)  # fmt: skip


@settings(max_examples=80, deadline=None)
@given(first=_batch, second=_batch, durable_first=st.booleans())
def test_layers_hold_the_newest_effect_per_id_and_track(
    first: list[tuple[int, int, str]], second: list[tuple[int, int, str]], durable_first: bool
) -> None:
    ov = Overlay()
    lsn = 1
    batches = []
    for spec in (first, second):
        batch = []
        for shape, rid, track in spec:
            batch.append(_effect(lsn, shape, rid, track))
            lsn += 1
        batches.append(batch)
    ov.add_pending_many(batches[0])
    if durable_first and batches[0]:
        ov.make_durable(batches[0][-1].lsn)
    ov.add_pending_many(batches[1])
    everything = batches[0] + batches[1]
    records, tracks = _expected(everything)
    for rid, eff in records.items():
        assert ov.writer_get(rid) is eff
    for track, eff in tracks.items():
        assert ov.writer_track(track) == eff.track_to
    assert ov.writer_track("zz") is MISSING
    known, missing = ov.writer_tracks({"a", "b", "c", "zz"})
    assert known == {t: eff.track_to for t, eff in tracks.items()}
    assert sorted(missing) == sorted({"a", "b", "c", "zz"} - tracks.keys())
    if everything:
        ov.make_durable(everything[-1].lsn)
    assert (ov.records, ov.tracks) == (records, tracks)
    assert list(ov.queue) == everything
    assert ov.take(5) == everything[:5]
    ov.applied(everything)
    assert not ov.records and not ov.tracks and not ov.queue


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("many"), _batch),
        st.tuples(st.just("one"), _batch.filter(lambda b: len(b) == 1)),
        st.tuples(st.just("durable"), st.floats(0, 1)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(steps=_steps)
@example(steps=[("many", [(0, 1, "a")] * 3), ("durable", 0.5), ("many", [(0, 2, "b")] * 2),
                ("durable", 1.0)])  # fmt: skip
def test_batches_singles_and_partial_moves_keep_both_layers_right(
    steps: list[tuple[str, Any]],
) -> None:
    """Any interleaving of batch parks, single parks and partial acknowledgements: the pending
    layer holds the newest still-pending effect per key, the durable layer the newest durable
    one (make_durable reuses a batch's dicts only when they cover every pending effect)."""
    ov = Overlay()
    lsn = 1
    pending: list[Effect] = []
    durable: list[Effect] = []
    for what, arg in steps:
        if what == "durable":
            if not pending:
                continue
            cut = pending[int(arg * (len(pending) - 1))].lsn
            ov.make_durable(cut)
            durable += [e for e in pending if e.lsn <= cut]
            pending = [e for e in pending if e.lsn > cut]
        else:
            batch = []
            for shape, rid, track in arg:
                batch.append(_effect(lsn, shape, rid, track))
                lsn += 1
            if what == "one":
                ov.add_pending(batch[0])
            else:
                ov.add_pending_many(batch)
            pending += batch
        p_records, p_tracks = _expected(pending)
        d_records, d_tracks = _expected(durable)
        assert (ov.records, ov.tracks) == (d_records, d_tracks)
        for rid in range(1, 7):
            assert ov.writer_get(rid) is p_records.get(rid, d_records.get(rid))
        for track in "abc":
            hit = p_tracks.get(track, d_tracks.get(track))
            assert ov.writer_track(track) == (MISSING if hit is None else hit.track_to)
    assert list(ov.queue) == durable
