"""The guided demo behind ``xpstore demo``: realistic writes, similar tracks, then a real crash.

Phase 1 writes a few thousand synthetic records of all three kinds (batched and single puts),
resolves some predictions' outcomes with updates, retires a track, and shows counts, a record and
a filtered scan. Phase 2 adds a library of generated tracks in eight named styles (title, artist
and style in each fingerprint's metadata), builds the similar-track index and asks it for the
tracks nearest to one of them: the answer is a table whose styles, tempos and loudness a person
judges at a glance, backed by the same-style share over a sample of queries, a lookup by raw
audio values, a precomputed neighbour list, and a deleted track leaving the answers at once.
Phase 3 is the point of the project: a child process (``python -m xpstore.demo.crashwriter``, which
never imports FAISS) writes from four threads and prints ``ACK <id> <thread> <seq>`` after each
acknowledged put; the demo kills it with SIGKILL mid-stream, reopens the store (WAL recovery),
and checks that every acknowledged record is there, equal to the record the child was asked to
write, and that every record written before the crash (phases 1 and 2) is unchanged.

The logic lives here, not in the CLI, so tests can run it; ``echo`` receives the human report.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from xpstore.demo.crashwriter import record_for
from xpstore.demo.synthetic import STYLES, make_fingerprint, make_mixed
from xpstore.errors import RecordNotFoundError, XpStoreError
from xpstore.index.neighbors import Neighbor
from xpstore.model.records import KINDS, Fingerprint, PredictionOutcome, Record
from xpstore.persistence.layout import MARKER
from xpstore.store.store import Store

log = logging.getLogger(__name__)

Echo = Callable[[str], None]

DEMO_T0 = 1_690_000_000.0
"""Timestamps of the demo's phase-1 records start here (about one a second), so runs repeat."""
_BATCH = 500
_SINGLE_PUTS = 100
_UPDATES = 50
_CHILD_THREADS = 4
_CHILD_BATCH = 8
_READY_TIMEOUT_S = 60.0
_ACK_TIMEOUT_S = 60.0

LIBRARY_T0 = DEMO_T0 + 5_000_000.0
"""Timestamps of the phase-2 track library start here (one a second): after phase 1's records,
before the crash child's (which start at 1_700_000_000)."""
MIN_TRACKS = 100
"""The smallest library phase 2 builds (0 skips the phase)."""
_K = 10
_HNSW_FROM = 1000
"""Phase 2 opens its session with ``index_exact_below`` at this, so a library of a few thousand
tracks gets an HNSW index (and a recall figure worth reading) rather than the exact one."""
_SAMPLE_QUERIES = 200
_RAW_FIELDS = ("tempo_bpm", "lufs", "crest_db", "bass_mid_ratio", "transient_density")
"""The raw audio values of the lookup by values (a style's means)."""
_RAW_STYLES = ("drum_and_bass", "ambient")
"""The style whose typical values the lookup by values asks for: the first that is not the
query's style, so the two lookups show different corners of the library."""


@dataclass
class SimilarReport:
    """What phase 2 showed: the library, the index, one lookup and how well styles cluster."""

    tracks: int
    """Tracks generated and written in phase 2."""
    indexed: int = 0
    """Live tracks the index holds (phase 1's fingerprinted tracks too)."""
    kind: str = ""
    """The main index's kind (``exact``, ``hnsw``, ``ivf``)."""
    build_id: int | None = None
    build_seconds: float | None = None
    recall_at_10: float | None = None
    """Recall of the built index against exact search, measured by the build on a probe."""
    style_counts: dict[str, int] = field(default_factory=dict)
    """Live tracks per style, over everything the index holds."""
    query: str = ""
    query_style: str = ""
    neighbors: list[str] = field(default_factory=list)
    """Track ids of the query's top-10 answer, best first."""
    neighbor_styles: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    same_style: float = 0.0
    """Share of the query's neighbours in the query's style."""
    base_rate: float = 0.0
    """Share of the query's style among the library's tracks (what chance would give)."""
    sample_queries: int = 0
    sample_same_style: float = 0.0
    """Same-style share of the top-10 answers over ``sample_queries`` random library tracks."""
    sample_by_style: dict[str, float] = field(default_factory=dict)
    raw_query: dict[str, float] = field(default_factory=dict)
    raw_style: str = ""
    """The style whose typical values ``raw_query`` holds."""
    raw_styles: list[str] = field(default_factory=list)
    """Styles of the answer to ``similar(fingerprint=raw_query)``."""
    precomputed: list[str] = field(default_factory=list)
    """The query's precomputed neighbour list (track ids), as the last build stored it."""
    precomputed_builds: list[int | None] = field(default_factory=list)
    """Which build made each precomputed answer."""
    deleted: str = ""
    """The track removed with ``delete_track`` (the query's best neighbour)."""
    after_delete: list[str] = field(default_factory=list)
    """The query's live answer right after the delete."""
    after_delete_precomputed: list[str] = field(default_factory=list)
    """The query's precomputed list right after the delete (no rebuild in between)."""


@dataclass
class DemoResult:
    """What the demo did and found; ``ok`` is False when an acknowledged record was lost."""

    path: str
    seed: int
    written: int = 0
    """Records written in phase 1 (puts; updates and the delete_track not counted)."""
    updated: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Live records per kind after phase 1."""
    warm_energetic: int = 0
    """Phase-1 warm_start predictions with audio_features.energy > 0.6 (the where= example)."""
    acked: int = 0
    """Records the child acknowledged before it was killed."""
    recovered: int = 0
    """Records of the child present after recovery (acknowledged or not: at least ``acked``)."""
    lost: list[int] = field(default_factory=list)
    """Acknowledged ids missing after recovery."""
    mismatched: list[int] = field(default_factory=list)
    """Acknowledged ids present but not equal to what the child wrote."""
    damaged_before: list[int] = field(default_factory=list)
    """Ids written before the crash (phases 1 and 2) missing or changed after it."""
    checked_before: int = 0
    """Records written before the crash (live at the end of phase 2) checked after it."""
    replayed_ops: int = 0
    truncated: list[dict[str, Any]] = field(default_factory=list)
    """Torn WAL tails cut off by recovery (segment and byte offset)."""
    recovery: dict[str, object] = field(default_factory=dict)
    similar: SimilarReport | None = None
    """Phase 2 (similar tracks); None when the demo ran with ``tracks=0``."""
    learning: dict[str, float] = field(default_factory=dict)
    """Phase 4: accuracy over the simulated listeners' second half, per policy (fixed, default)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: write, similar (phase 2, when run), crash (child run), recover (reopen),
    verify, learn (phase 4, when run), total."""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.mismatched or self.damaged_before) and self.acked > 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _quiet(_line: str) -> None:
    """Default echo: say nothing."""


def run_demo(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    records: int = 3000,
    tracks: int = 3000,
    crash_after: int = 400,
    hold_applier: bool = False,
    listeners: int = 6,
    echo: Echo = _quiet,
) -> DemoResult:
    """Run the three phases on a new store at ``path`` and return what was checked.

    ``records``: mixed records of phase 1; ``tracks``: the size of phase 2's track library (0
    skips phase 2, otherwise at least ``MIN_TRACKS``). ``crash_after`` acknowledged records (at
    least) are awaited before the SIGKILL; ``hold_applier`` makes the child keep everything in
    its WAL so recovery replays all of it. ``listeners`` simulated listeners (0 skips it) show
    the learner beating the fixed 70/30 baseline in phase 4. Raises ValueError if ``path``
    already holds something, XpStoreError/OSError on failures that are not about lost data (the
    child not starting, for instance).
    """
    root = Path(path)
    if (root / MARKER).exists() or (root.exists() and any(root.iterdir())):
        raise ValueError(f"{root} is not empty; the demo needs a new or empty directory")
    if records < 0 or crash_after < 1:
        raise ValueError("records must be >= 0 and crash_after >= 1")
    if tracks != 0 and tracks < MIN_TRACKS:
        raise ValueError(f"tracks must be 0 (no similar-track phase) or >= {MIN_TRACKS}")
    result = DemoResult(path=str(root), seed=seed)
    start = time.perf_counter()
    before = _phase_one(root, seed, records, result, echo)
    result.timings["write"] = round(time.perf_counter() - start, 3)
    if tracks:
        t = time.perf_counter()
        before = _phase_similar(root, seed, tracks, result, echo)
        result.timings["similar"] = round(time.perf_counter() - t, 3)
    acks = _phase_crash(root, seed, crash_after, hold_applier, result, echo)
    _phase_verify(root, seed, acks, before, result, echo)
    _report(result, echo)
    if listeners:
        t = time.perf_counter()
        _phase_learning(seed, listeners, result, echo)
        result.timings["learn"] = round(time.perf_counter() - t, 3)
    result.timings["total"] = round(time.perf_counter() - start, 3)
    echo(
        "== " + ("OK: nothing acknowledged was lost" if result.ok else "FAILED")
        + f" (total {result.timings['total']:.2f} s)"
    )
    return result


def _phase_learning(seed: int, listeners: int, result: DemoResult, echo: Echo) -> None:
    """Simulated listeners predict -> record -> resolve against a scratch store per policy."""
    from xpstore.demo.listeners import simulate

    n = 400
    echo(f"== phase 4: learning: {listeners} simulated listeners x {n} tracks each, the fixed "
         "70/30 split against the learner (its own scratch stores)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xpstore-demo-learn-") as tmp:
        for policy in ("fixed", "default"):
            with Store.open(Path(tmp) / policy, create=True, durability="none") as store:
                res = simulate(store, policy, listeners=listeners, interactions=n, seed=seed,
                               last=n // 2, block=n // 4)  # fmt: skip
            result.learning[policy] = round(res.accuracy_last, 3)
            curve = " -> ".join(f"{a:.0%}" for a in res.curve)
            echo(f"   {policy:<8} accuracy by quarter: {curve}; "
                 f"second half {res.accuracy_last:.1%}")  # fmt: skip
    gain = result.learning["default"] - result.learning["fixed"]
    echo(f"   the learner is {gain * 100:+.1f} points over the fixed baseline (docs/learning.md)")


# ---------------------------------------------------------------------------- phase 1


def _phase_one(
    root: Path, seed: int, n: int, result: DemoResult, echo: Echo
) -> dict[int, Record]:
    """Write, update, delete, query; return every live record by id (to check after the crash)."""
    rng = np.random.default_rng(seed)
    recs = make_mixed(rng, n, t0=DEMO_T0)
    n_single = min(_SINGLE_PUTS, n // 10)
    bulk, singles = recs[: n - n_single], recs[n - n_single :]
    echo(f"== phase 1: writing {n} synthetic records to {root}")
    with Store.open(root, create=True) as store:
        ids: list[int] = []
        t = time.perf_counter()
        for i in range(0, len(bulk), _BATCH):
            ids += store.put_many(bulk[i : i + _BATCH])
        t_bulk = time.perf_counter() - t
        t = time.perf_counter()
        ids += [store.put(r) for r in singles]
        t_single = time.perf_counter() - t
        result.written = len(ids)
        echo(
            f"   put_many: {len(bulk)} records in batches of up to {_BATCH}, "
            f"{t_bulk * 1000:.0f} ms; put: {len(singles)} single records, {t_single * 1000:.0f} ms"
            f" (durability={store.config.wal.durability})"
        )
        result.updated = _resolve_outcomes(store, ids, recs, rng)
        echo(f"   update: resolved the outcome (actual, reward) of {result.updated} predictions")
        _retire_track(store, recs, echo)
        result.counts = {k: store.count(k) for k in KINDS}
        echo("   live records: " + ", ".join(f"{k} {v}" for k, v in result.counts.items()))
        if ids:
            env = store.get(ids[0])
            echo(f"   get({ids[0]}): a {env.kind}, ts {env.ts:.0f}: {_brief(env.record)}")
        where = {"context": "warm_start", "audio_features.energy__gt": 0.6}
        hits = list(store.scan("prediction", where=where))
        result.warm_energetic = len(hits)
        echo(f"   scan(kind='prediction', where={where}): {len(hits)} records, e.g.")
        for env in hits[:2]:
            echo(f"     id {env.id}: {_brief(env.record)}")
        before = {env.id: env.record for env in store.scan()}
    return before


def _resolve_outcomes(
    store: Store, ids: list[int], recs: list[Record], rng: np.random.Generator
) -> int:
    """Resolve some unresolved predictions, as an application does once the user chose."""
    done = 0
    for rid, rec in zip(ids, recs, strict=True):
        if done >= _UPDATES:
            break
        if isinstance(rec, PredictionOutcome) and rec.actual is None:
            correct = bool(rng.random() < 0.3 + 0.6 * rec.confidence)
            actual = rec.predicted if correct else ("warm" if rec.predicted != "warm" else "bright")
            store.update(rid, actual=actual, reward=1.0 if correct else -0.5)
            done += 1
    return done


def _retire_track(store: Store, recs: list[Record], echo: Echo) -> None:
    track = next((r.track_id for r in recs if isinstance(r, Fingerprint)), None)
    if track is None:
        return
    store.delete_track(track)
    try:
        store.get_fingerprint(track)
        echo(f"   delete_track({track!r}): still visible (unexpected)")
    except RecordNotFoundError:
        echo(f"   delete_track({track!r}): no longer found by get_fingerprint; history kept")


def _brief(record: Record) -> str:
    if isinstance(record, PredictionOutcome):
        energy = (record.audio_features or {}).get("energy")
        extra = f", energy {energy:.2f}" if energy is not None else ""
        return (
            f"predicted {record.predicted!r}, actual {record.actual!r}, "
            f"confidence {record.confidence:.2f}, context {record.context!r}{extra}"
        )
    data = record.model_dump(exclude_none=True)
    keys = list(data)[:4]
    return ", ".join(f"{k}={_clip(data[k])}" for k in keys)


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------- phase 2


def _phase_similar(
    root: Path, seed: int, n: int, result: DemoResult, echo: Echo
) -> dict[int, Record]:
    """Write the track library, build the index, show lookups; return every live record by id.

    The parent does this work (FAISS is imported here, never in the crash child).
    """
    rng = np.random.default_rng([seed, 2])
    styles = list(STYLES)
    library = [
        make_fingerprint(
            rng, f"lib-{i:05d}", style=styles[int(rng.integers(len(styles)))],
            ts=LIBRARY_T0 + i,
        )
        for i in range(n)
    ]  # fmt: skip
    rep = SimilarReport(tracks=n)
    result.similar = rep
    echo(f"== phase 2: similar tracks: a library of {n} generated tracks in {len(styles)} styles")
    with Store.open(root, index_exact_below=_HNSW_FROM) as store:
        t = time.perf_counter()
        for i in range(0, n, _BATCH):
            store.put_many(library[i : i + _BATCH])
        t_put = time.perf_counter() - t
        status = store.rebuild_index()
        rep.indexed = int(status["live"])
        rep.kind = str(status["kind"])
        rep.build_id = status["build_id"]
        rep.build_seconds = status["build_seconds"]
        rep.recall_at_10 = status["recall_at_10"]
        rep.style_counts = _style_counts(store)
        echo(
            f"   put_many: {n} fingerprints (title, artist, style in their metadata), "
            f"{t_put * 1000:.0f} ms"
        )
        echo(f"   rebuild_index(): {_describe_index(rep)}")
        query = library[int(rng.integers(n))]
        _show_lookup(store, query, rep, echo)
        _sample_lookups(store, library, rng, rep, echo)
        _raw_lookup(store, rep, echo)
        _precomputed_and_delete(store, rep, echo)
        before = {env.id: env.record for env in store.scan()}
    return before


def _style_of(metadata: dict[str, Any] | None) -> str:
    return str((metadata or {}).get("style", "?"))


def _style_counts(store: Store) -> dict[str, int]:
    """Live tracks per style: each track's current fingerprint, deleted tracks left out."""
    tracks = {env.record.track_id for env in store.scan("fingerprint")
              if isinstance(env.record, Fingerprint)}  # fmt: skip
    counts: Counter[str] = Counter()
    for track in tracks:
        try:
            fp = store.get_fingerprint(track).record
        except RecordNotFoundError:
            continue
        assert isinstance(fp, Fingerprint)
        counts[_style_of(fp.metadata)] += 1
    return dict(sorted(counts.items()))


def _describe_index(rep: SimilarReport) -> str:
    text = f"{rep.kind} index over {rep.indexed} tracks (phase 1's included)"
    if rep.build_seconds is not None:
        text += f", built in {rep.build_seconds:.2f} s"
    if rep.recall_at_10 is not None:
        text += f", recall@10 {rep.recall_at_10:.2f} against exact search"
    return text


def _share(styles: Sequence[str], style: str) -> float:
    return sum(s == style for s in styles) / len(styles) if styles else 0.0


def _show_lookup(store: Store, query: Fingerprint, rep: SimilarReport, echo: Echo) -> None:
    """The query track, its top 10 as a table, and the one-line judgement."""
    rep.query = query.track_id
    rep.query_style = _style_of(query.metadata)
    echo(f"   similar({query.track_id!r}): {_describe_track(query)}")
    hits = store.similar(query.track_id, k=_K)
    rep.neighbors = [h.track_id for h in hits]
    rep.neighbor_styles = [_style_of(h.metadata) for h in hits]
    rep.scores = [round(h.score, 4) for h in hits]
    for line in _table(store, hits):
        echo("     " + line)
    total = sum(rep.style_counts.values())
    rep.same_style = _share(rep.neighbor_styles, rep.query_style)
    rep.base_rate = rep.style_counts.get(rep.query_style, 0) / total if total else 0.0
    same = sum(s == rep.query_style for s in rep.neighbor_styles)
    one_in = f"1 in {1 / rep.base_rate:.0f}" if rep.base_rate else "none"
    others = Counter(s for s in rep.neighbor_styles if s != rep.query_style).most_common()
    echo(
        f"   {same} of {len(hits)} neighbours are {rep.query_style}, like the query"
        + (" (the others: " + ", ".join(f"{s} x{c}" for s, c in others) + ")" if others else "")
        + f"; {rep.query_style} is {one_in} of the library's tracks ({rep.base_rate:.0%})"
    )


def _describe_track(fp: Fingerprint) -> str:
    meta = fp.metadata or {}
    text = f"{meta.get('title', '?')!r} by {meta.get('artist', '?')}, {_style_of(meta)}"
    if fp.batch is not None:
        text += f", {fp.batch.tempo_bpm:.0f} BPM, {fp.batch.lufs:.1f} LUFS"
    return text


def _table(store: Store, hits: Sequence[Neighbor]) -> list[str]:
    """Rank, title, artist, style, tempo, loudness, score: enough to judge the answer by eye."""
    rows = [("#", "title", "artist", "style", "BPM", "LUFS", "score")]
    for rank, hit in enumerate(hits, 1):
        meta = hit.metadata or {}
        fp = store.get(hit.record_id).record
        batch = fp.batch if isinstance(fp, Fingerprint) else None
        rows.append((
            str(rank), str(meta.get("title", "?")), str(meta.get("artist", "?")),
            _style_of(meta),
            f"{batch.tempo_bpm:.0f}" if batch is not None else "-",
            f"{batch.lufs:.1f}" if batch is not None else "-",
            f"{hit.score:.3f}",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 4, 5, 6}
    return [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _sample_lookups(
    store: Store,
    library: Sequence[Fingerprint],
    rng: np.random.Generator,
    rep: SimilarReport,
    echo: Echo,
) -> None:
    """The same-style share over many random queries, overall and per style."""
    picks = rng.choice(len(library), size=min(_SAMPLE_QUERIES, len(library)), replace=False)
    by_style: dict[str, list[float]] = {}
    for i in sorted(picks.tolist()):
        fp = library[i]
        style = _style_of(fp.metadata)
        styles = [_style_of(h.metadata) for h in store.similar(fp.track_id, k=_K)]
        by_style.setdefault(style, []).append(_share(styles, style))
    shares = [s for values in by_style.values() for s in values]
    rep.sample_queries = len(shares)
    rep.sample_same_style = round(float(np.mean(shares)), 4) if shares else 0.0
    means = {style: round(float(np.mean(v)), 3) for style, v in by_style.items()}
    rep.sample_by_style = dict(sorted(means.items(), key=lambda kv: (-kv[1], kv[0])))
    total = sum(rep.style_counts.values())
    chance = max(rep.style_counts.values()) / total if total else 0.0
    echo(
        f"   over {rep.sample_queries} random library tracks as queries, "
        f"{rep.sample_same_style:.0%} of the top-{_K} neighbours share the query's style "
        f"(no style is more than {chance:.0%} of the library); by style:"
    )
    echo("     " + ", ".join(f"{s} {v:.0%}" for s, v in rep.sample_by_style.items()))


def _raw_lookup(store: Store, rep: SimilarReport, echo: Echo) -> None:
    """``similar(fingerprint={...})`` with a style's typical values for a few audio names."""
    rep.raw_style = next((s for s in _RAW_STYLES if s != rep.query_style), _RAW_STYLES[0])
    mean = STYLES[rep.raw_style].mean
    rep.raw_query = {name: round(float(mean[name]), 2) for name in _RAW_FIELDS}
    hits = store.similar(fingerprint=rep.raw_query, k=_K)
    rep.raw_styles = [_style_of(h.metadata) for h in hits]
    counts = Counter(rep.raw_styles).most_common()
    echo(f"   similar(fingerprint={rep.raw_query}) (typical {rep.raw_style} values):")
    echo(f"     styles of the {len(hits)} answers: " + ", ".join(f"{s} x{c}" for s, c in counts))


def _precomputed_and_delete(store: Store, rep: SimilarReport, echo: Echo) -> None:
    """The build's stored list for the query; then delete its best neighbour and ask again."""
    stored = store.similar(rep.query, k=_K, precomputed=True)
    rep.precomputed = [h.track_id for h in stored]
    rep.precomputed_builds = [h.build_id for h in stored]
    same = len(set(rep.precomputed) & set(rep.neighbors))
    builds = sorted({b for b in rep.precomputed_builds if b is not None})
    echo(
        f"   similar({rep.query!r}, precomputed=True): the list of build "
        f"{', '.join(map(str, builds)) or '?'}, read from LMDB (one key, no FAISS); "
        f"{same} of its {len(stored)} tracks are in the live answer"
    )
    if not rep.neighbors:
        return
    rep.deleted = rep.neighbors[0]
    store.delete_track(rep.deleted)
    rep.after_delete = [h.track_id for h in store.similar(rep.query, k=_K)]
    rep.after_delete_precomputed = [
        h.track_id for h in store.similar(rep.query, k=_K, precomputed=True)
    ]
    gone = rep.deleted not in rep.after_delete and rep.deleted not in rep.after_delete_precomputed
    new = [t for t in rep.after_delete if t not in rep.neighbors]
    echo(
        f"   delete_track({rep.deleted!r}) (neighbour #1): "
        + ("gone at once from the live answer and the precomputed list, no rebuild"
           if gone else "STILL IN AN ANSWER (unexpected)")
        + (f"; {new[0]!r} moved into the live top {_K}" if new else "")
    )  # fmt: skip


# ---------------------------------------------------------------------------- phase 3


@dataclass(frozen=True, slots=True)
class Ack:
    id: int
    thread: int
    seq: int


def _child_env() -> dict[str, str]:
    """The environment of the child: ours, with this xpstore importable first."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    """Copy the child's stdout into a queue, then None at EOF."""
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


def _phase_crash(
    root: Path, seed: int, crash_after: int, hold: bool, result: DemoResult, echo: Echo
) -> list[Ack]:
    """Start the crash writer, wait for ``crash_after`` ACKs, SIGKILL it; return every ACK."""
    cmd = [
        sys.executable, "-m", "xpstore.demo.crashwriter", str(root),
        "--threads", str(_CHILD_THREADS), "--seed", str(seed), "--batch", str(_CHILD_BATCH),
    ]
    if hold:
        cmd.append("--hold-applier")
    echo(f"== phase 3: crash test: {_CHILD_THREADS} writer threads in a child process")
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err, subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_child_env()
    ) as child:
        assert child.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        pump = threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True)
        pump.start()
        acks: list[Ack] = []
        try:
            _await_acks(lines, acks, crash_after, child, err)
            os.kill(child.pid, signal.SIGKILL)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
        pump.join(timeout=_ACK_TIMEOUT_S)
        _drain(lines, acks)  # ACKs printed between our last read and the kill count too
        code = child.returncode
    result.acked = len(acks)
    result.timings["crash"] = round(time.perf_counter() - t, 3)
    echo(
        f"   child pid {child.pid} acknowledged {len(acks)} records; killed with SIGKILL "
        f"(exit {code}) after {result.timings['crash']:.2f} s"
    )
    return acks


def _await_acks(
    lines: queue.Queue[str | None],
    acks: list[Ack],
    target: int,
    child: subprocess.Popen[str],
    err: IO[str],
) -> None:
    """Read READY, then ACK lines until ``target`` of them; raise if the child fails first."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    ready = False
    while len(acks) < target:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(remaining, 0.001))
        except queue.Empty:
            raise XpStoreError(
                f"crash writer produced {len(acks)} ACKs in {_READY_TIMEOUT_S:.0f} s; giving up"
            ) from None
        if line is None:
            child.wait()
            err.seek(0)
            raise XpStoreError(
                f"crash writer exited with {child.returncode} before it was killed: "
                + (err.read().strip().splitlines() or ["(no output)"])[-1]
            )
        if not ready:
            ready = line.strip() == "READY"
            deadline = time.monotonic() + _ACK_TIMEOUT_S
            continue
        ack = _parse_ack(line)
        if ack is not None:
            acks.append(ack)


def _drain(lines: queue.Queue[str | None], acks: list[Ack]) -> None:
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return
        if line is None:
            return
        ack = _parse_ack(line)
        if ack is not None:
            acks.append(ack)


def _parse_ack(line: str) -> Ack | None:
    """An ``ACK id thread seq`` line; a partial last line (cut by the kill) is not an ACK."""
    if not line.endswith("\n"):
        return None
    parts = line.split()
    if len(parts) != 4 or parts[0] != "ACK":
        return None
    return Ack(int(parts[1]), int(parts[2]), int(parts[3]))


# ---------------------------------------------------------------------------- verify


def _phase_verify(
    root: Path,
    seed: int,
    acks: list[Ack],
    before: dict[int, Record],
    result: DemoResult,
    echo: Echo,
) -> None:
    """Reopen (recovery), then check every ACK and every record written before the crash."""
    echo("== recovery: reopening the store")
    t = time.perf_counter()
    with Store.open(root) as store:
        result.timings["recover"] = round(time.perf_counter() - t, 3)
        report = store.recovery_report
        if report is not None:
            result.recovery = report.as_dict()
            result.replayed_ops = report.replayed_ops
            result.truncated = [{"segment": s, "offset": o} for s, o in report.truncated]
        t = time.perf_counter()
        for ack in acks:
            try:
                got = store.get(ack.id).record
            except RecordNotFoundError:
                result.lost.append(ack.id)
                continue
            if got != record_for(seed, ack.thread, ack.seq):
                result.mismatched.append(ack.id)
        for rid, rec in before.items():
            try:
                if store.get(rid).record != rec:
                    result.damaged_before.append(rid)
            except RecordNotFoundError:
                result.damaged_before.append(rid)
        total = store.count()
        result.recovered = total - len(before)
        result.checked_before = len(before)
        result.timings["verify"] = round(time.perf_counter() - t, 3)


def _report(result: DemoResult, echo: Echo) -> None:
    echo(
        f"   reopened in {result.timings['recover'] * 1000:.0f} ms: replayed "
        f"{result.replayed_ops} WAL operations"
        + (
            "; truncated a torn tail at "
            + ", ".join(f"{t['segment']}@{t['offset']}" for t in result.truncated)
            if result.truncated
            else "; no torn tail"
        )
    )
    echo(
        f"   acknowledged {result.acked}, recovered {result.recovered} records of the child "
        f"(writes completed but not yet acknowledged may survive too)"
    )
    ok_acks = result.acked - len(result.lost) - len(result.mismatched)
    echo(
        f"   every acknowledged record present and equal: {ok_acks}/{result.acked}; "
        f"records written before the crash unchanged: "
        f"{result.checked_before - len(result.damaged_before)}/{result.checked_before}"
    )
    if result.lost:
        echo(f"   LOST {len(result.lost)} acknowledged records, e.g. ids {result.lost[:10]}")
    if result.mismatched:
        echo(f"   {len(result.mismatched)} records differ, e.g. ids {result.mismatched[:10]}")
    if result.damaged_before:
        echo(
            f"   {len(result.damaged_before)} records written before the crash missing or "
            f"changed, e.g. "
            f"ids {result.damaged_before[:10]}"
        )
