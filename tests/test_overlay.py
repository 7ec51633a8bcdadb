"""The overlay's layers keep the newest effect per record id and per track, whatever the mix of
effects in a batch (the C-level indexing of :func:`xpstore.persistence.overlay._index`)."""

from __future__ import annotations

from hypothesis import given, settings
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


def _expected(effects: list[Effect]) -> tuple[dict[int, Effect], dict[str, tuple[int, int | None]]]:
    records: dict[int, Effect] = {}
    tracks: dict[str, tuple[int, int | None]] = {}
    for eff in effects:  # the per-effect loop the overlay used before
        if eff.record_id is not None:
            records[eff.record_id] = eff
        if eff.track is not None:
            tracks[eff.track] = (eff.lsn, eff.track_to)
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
    for track, (_lsn, to) in tracks.items():
        assert ov.writer_track(track) == to
    assert ov.writer_track("zz") is MISSING
    known, missing = ov.writer_tracks({"a", "b", "c", "zz"})
    assert known == {t: to for t, (_lsn, to) in tracks.items()}
    assert sorted(missing) == sorted({"a", "b", "c", "zz"} - tracks.keys())
    if everything:
        ov.make_durable(everything[-1].lsn)
    assert (ov.records, ov.tracks) == (records, tracks)
    assert list(ov.queue) == everything
    assert ov.take(5) == everything[:5]
    ov.applied(everything)
    assert not ov.records and not ov.tracks and not ov.queue
