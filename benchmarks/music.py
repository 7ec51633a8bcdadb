"""Similar-track quality on real music (issue 11), beside a 12-line numpy baseline.

The real set (``shared/data/real_music``, 450 segments of 85 tracks; its README says where the
audio came from) is put into a fresh store as 450 fingerprints (track id = segment, batch values
in the store's units, by name). For every segment ``similar(track_id, k=3)`` is asked and the top
hit (the query itself is never returned) is a **hit** when it is another segment of the same
track: the same-track top-1 hit rate over all 450 segments (the three segments whose track has
no other segment can never hit; they count as misses, as in the set's README).

Rows, all in one run:

* ``numpy z-cosine``: the baseline of the set's README — z-score the 25 values over the file,
  L2-normalize, exact cosine, top-1 other than itself (:func:`baseline_hit_rate`, 12 lines);
* ``store <mode>``: the store with default settings except ``index.mode`` (the default mode is
  marked); answers taken before any explicit rebuild (the library statistics are in force from
  the first answer) and again after ``rebuild_index(wait=True)``: the two must agree;
* ``store learned (CV by track)``: ``fit_similarity(groups={segment: track}, folds=5)``; each
  segment scored with weights learned on folds that do not contain its track; then the same
  weights in force (``index.dim_weights="learned"``, a rebuild): in-sample, for reference only;
  and leave one collection out (weights learned on the other soundtrack packages);
* streaming validation (``--splits``, default 10): the store holds the 450 segments with both
  parts; ``calibrate_validation(tracks=<half the tracks>)``, then the other half scored as
  ``validate_streaming`` scores (``xpstore.demo.real_music.validation_split``): true pairs (a
  segment's streaming values against its own batch values) and every different-track pair;
* ``--candidates``: other standardizations computed in numpy (robust median/IQR, rank-gauss,
  log of heavy-tailed values, centred log-ratio of the band shares, whitening), the evidence
  behind the default; not store modes.

The second opinion is generated tracks (``xpstore.demo.synthetic``, 8 styles): style
precision@10 (``similar(k=10)``, share of the 10 answers in the query's style) per store mode.

    PYTHONPATH=. python benchmarks/music.py [--data PATH] [--generated 1000] [--seed 1]
                                            [--folds 5] [--candidates] [--json out.json]

Prints markdown tables and the issue's bars as PASS/MISS.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import xpstore
from xpstore import Store
from xpstore.demo.real_music import (
    Segment,
    default_path,
    fingerprints,
    load_segments,
    validation_split,
)
from xpstore.demo.synthetic import STYLES, make_fingerprint
from xpstore.index.embedding import (
    AURALIS_DIM_WEIGHTS,
    DEFAULT_MODE,
    MODES,
    AudioStats,
    HybridEmbedder,
)
from xpstore.index.similarity_fit import encode_groups, fit_weights, top1_hits
from xpstore.model.records import BATCH_FIELDS

BAR_DEFAULT = 0.62
BAR_LEARNED = 0.65
BAR_TRUE_ACCEPT = 0.70
BAR_FALSE_ACCEPT = 0.05
BAR_AUC = 0.93


def baseline_hit_rate(x: np.ndarray, tracks: np.ndarray) -> float:
    """The set README's reference: z-scored cosine over the 25 values, top-1 other than itself."""
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(tracks[s.argmax(axis=1)] == tracks))


# --------------------------------------------------------------------------- the store


def _open(root: Path, name: str, **config: Any) -> Store:
    return Store.open(root / name, create=True, durability="none", **config)


def store_hits(store: Store, segs: Sequence[Segment]) -> dict[str, str]:
    """segment -> the track of its top hit (``similar(track_id, k=3)``)."""
    out: dict[str, str] = {}
    track_of = {s.track_id: s.track for s in segs}
    for seg in segs:
        hits = store.similar(seg.track_id, k=3)
        out[seg.track_id] = track_of[hits[0].track_id] if hits else ""
    return out


def rate(top: dict[str, str], segs: Sequence[Segment], pick: Callable[[Segment], bool]) -> str:
    chosen = [s for s in segs if pick(s)]
    hits = sum(top[s.track_id] == s.track for s in chosen)
    return f"{hits / len(chosen):.3f} ({hits}/{len(chosen)})"


def hit_rate(top: dict[str, str], segs: Sequence[Segment]) -> float:
    return sum(top[s.track_id] == s.track for s in segs) / len(segs)


def real_modes(root: Path, segs: Sequence[Segment]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    fps = fingerprints(segs)
    for mode in MODES:
        with _open(root, f"real-{mode}", index_mode=mode) as store:
            store.put_many(fps)
            t0 = time.perf_counter()
            before = store_hits(store, segs)
            query_s = time.perf_counter() - t0
            store.rebuild_index(wait=True)
            after = store_hits(store, segs)
            out[mode] = {
                "before": before,
                "after": after,
                "agree": before == after,
                "ms_per_query": 1000 * query_s / len(segs),
            }
    return out


def leave_one_collection_out(segs: Sequence[Segment]) -> dict[str, float]:
    """Learned weights scored on a collection (soundtrack package) they never saw: fit on the
    other collections' segments, score this one's against the whole library (default mode)."""
    x = np.array([[s.batch[n] for n in BATCH_FIELDS] for s in segs])
    stats = AudioStats.fit(x, DEFAULT_MODE)
    lib = stats.standardize(x)
    codes, _ = encode_groups([s.track_id for s in segs], {s.track_id: s.track for s in segs})
    base = HybridEmbedder.resolve_dim_weights(DEFAULT_MODE, None)
    coll = np.array([s.collection for s in segs])
    out: dict[str, float] = {}
    hits = 0
    for c in sorted(set(coll.tolist())):
        train = np.flatnonzero(coll != c)
        w = fit_weights(lib[train], codes[train], base)
        test = np.flatnonzero(coll == c)
        got = top1_hits(lib, codes, test, w)
        out[c] = float(got.mean())
        hits += int(got.sum())
    out["all"] = hits / len(segs)
    return out


def real_learned(root: Path, segs: Sequence[Segment], folds: int, seed: int) -> dict[str, Any]:
    with _open(root, "real-learned") as store:
        store.put_many(fingerprints(segs))
        t0 = time.perf_counter()
        report = store.fit_similarity({s.track_id: s.track for s in segs}, folds=folds, seed=seed)
        fit_s = time.perf_counter() - t0
        store.reconfigure(index_dim_weights="learned")
        store.rebuild_index(wait=True)
        after = store_hits(store, segs)
        status = store.index_status()
    return {
        "report": report.to_json(),
        "cv_over_all": report.cv_hits / len(segs),
        "baseline_over_all": report.baseline_hits / len(segs),
        "in_force": after,
        "fit_s": fit_s,
        "dim_weights": status.get("dim_weights"),
        "leave_one_collection_out": leave_one_collection_out(segs),
    }


# --------------------------------------------------------------------------- numpy candidates


def _hit(v: np.ndarray, tracks: np.ndarray) -> float:
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    return float(np.mean(tracks[s.argmax(axis=1)] == tracks))


def candidates(x: np.ndarray, tracks: np.ndarray) -> dict[str, float]:
    """Standardizations tried before choosing the default (numpy, exact cosine)."""
    nd = statistics.NormalDist()
    aw = np.sqrt(np.array([AURALIS_DIM_WEIGHTS[n] for n in BATCH_FIELDS]))
    bands = [BATCH_FIELDS.index(n) for n in BATCH_FIELDS if n.endswith("_pct")]
    flat = BATCH_FIELDS.index("spectral_flatness")

    def z(a: np.ndarray) -> np.ndarray:
        return (a - a.mean(axis=0)) / np.where(a.std(axis=0) > 0, a.std(axis=0), 1.0)

    def robust(a: np.ndarray) -> np.ndarray:
        q1, med, q3 = np.percentile(a, [25, 50, 75], axis=0)
        return (a - med) / np.where(q3 - q1 > 0, q3 - q1, 1.0)

    def rank_gauss(a: np.ndarray) -> np.ndarray:
        ranks = a.argsort(axis=0).argsort(axis=0) + 1
        return np.vectorize(nd.inv_cdf)(ranks / (a.shape[0] + 1))

    def logs(a: np.ndarray, clr: bool) -> np.ndarray:
        out = a.copy()
        for j in [*bands, flat]:
            out[:, j] = np.log(a[:, j] + 0.01 * np.median(a[:, j]))
        if clr:
            out[:, bands] -= out[:, bands].mean(axis=1, keepdims=True)
        return out

    def whiten(a: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(np.cov(a.T))
        return (a - a.mean(axis=0)) @ v @ np.diag(1 / np.sqrt(np.maximum(w, 1e-9))) @ v.T

    return {
        "z-score": _hit(z(x), tracks),
        "z-score, Auralis weights": _hit(z(x) * aw, tracks),
        "robust (median / IQR)": _hit(robust(x), tracks),
        "rank-gauss (quantile -> normal)": _hit(rank_gauss(x), tracks),
        "log bands + log flatness, z-score": _hit(z(logs(x, False)), tracks),
        "log bands + log flatness, z-score, Auralis weights": _hit(z(logs(x, False)) * aw, tracks),
        "clr bands + log flatness, z-score": _hit(z(logs(x, True)), tracks),
        "clr bands + log flatness, z-score, Auralis weights (= logratio)": _hit(
            z(logs(x, True)) * aw, tracks
        ),
        "log bands + log flatness, whitened (Mahalanobis)": _hit(whiten(z(logs(x, False))), tracks),
    }


# --------------------------------------------------------------------------- validation


def validation(root: Path, segs: Sequence[Segment], splits: int) -> list[dict[str, float]]:
    """Streaming-vs-batch validation: calibrate on half the tracks, score the other half."""
    with _open(root, "validation") as store:
        store.put_many(fingerprints(segs, streaming=True))
        t0 = time.perf_counter()
        out = [validation_split(store, segs, seed) for seed in range(splits)]
        elapsed = time.perf_counter() - t0
        t1 = time.perf_counter()
        for seg in segs[:100]:
            store.validate_streaming(seg.track_id, record=False)
        per_call = (time.perf_counter() - t1) / 100
    for row in out:
        row["split_s"] = elapsed / splits
        row["ms_per_validate"] = 1000 * per_call
    return out


# --------------------------------------------------------------------------- strategies

STRATEGIES = ("fast", "accurate", "batch", "auto")


def strategies(root: Path, segs: Sequence[Segment]) -> dict[str, dict[str, dict[str, float]]]:
    """Same-track top-1 and latency of ``similar(strategy=...)``: the library holds the 450
    segments with both parts, calibrated and validated; queries are (a) each segment's
    streaming values alone, as a player has them (``fingerprint=``, confidence 1), and (b) each
    stored segment by track id. The query segment itself never counts as a hit."""
    from xpstore.model.records import Fingerprint, StreamingFingerprint

    track = {s.track_id: s.track for s in segs}
    out: dict[str, dict[str, dict[str, float]]] = {"streaming query": {}, "stored track": {}}
    with _open(root, "strategies") as store:
        store.put_many(fingerprints(segs, streaming=True))
        store.calibrate_validation()
        store.validate_all_streaming()
        queries = {
            s.track_id: Fingerprint(
                track_id=f"{s.track_id}?", streaming=StreamingFingerprint(
                    values=s.streaming, confidence=dict.fromkeys(s.streaming, 1.0), chunk_count=5)
            )
            for s in segs
        }  # fmt: skip
        for strategy in STRATEGIES:  # warm: statistics fitted, streaming space built
            store.similar(segs[0].track_id, k=3, strategy=strategy)
        for label, rows in out.items():
            for strategy in STRATEGIES:
                hits = 0
                picked: Counter[str] = Counter()
                t0 = time.perf_counter()
                for seg in segs:
                    if label == "streaming query":
                        got = store.similar(fingerprint=queries[seg.track_id], k=4,
                                            strategy=strategy)  # fmt: skip
                    else:
                        got = store.similar(seg.track_id, k=3, strategy=strategy)
                    got = [h for h in got if h.track_id != seg.track_id]
                    hits += bool(got) and track.get(got[0].track_id) == seg.track
                    picked[(got[0].strategy or "-") if got else "-"] += 1
                elapsed = time.perf_counter() - t0
                rows[strategy] = {
                    "hit_rate": hits / len(segs),
                    "ms_per_query": 1000 * elapsed / len(segs),
                    **{f"picked_{k}": float(v) for k, v in picked.items()},
                }
    return out


# --------------------------------------------------------------------------- generated tracks


def generated(root: Path, n: int, seed: int) -> dict[str, float]:
    """Style precision@10 over ``n`` generated tracks, per store mode."""
    rng = np.random.default_rng(seed)
    styles = sorted(STYLES)
    fps = [make_fingerprint(rng, f"g{i}", styles[i % len(styles)]) for i in range(n)]
    style_of = {fp.track_id: styles[i % len(styles)] for i, fp in enumerate(fps)}
    out: dict[str, float] = {}
    for mode in MODES:
        with _open(root, f"gen-{mode}", index_mode=mode) as store:
            store.put_many(fps)
            share = []
            for fp in fps:
                hits = store.similar(fp.track_id, k=10)
                share.append(np.mean([style_of[h.track_id] == style_of[fp.track_id] for h in hits]))
            out[mode] = float(np.mean(share))
    return out


# --------------------------------------------------------------------------- report


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--data", type=Path, default=None, help="segments.jsonl (default: shared)")
    p.add_argument("--generated", type=int, default=1000, help="generated tracks (0: skip)")
    p.add_argument("--seed", type=int, default=1, help="generated tracks' seed")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--no-learned", action="store_true", help="skip fit_similarity")
    p.add_argument("--candidates", action="store_true", help="also the numpy candidates")
    p.add_argument("--splits", type=int, default=10, help="validation: calibration splits")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder for the stores")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = args.data or default_path()
    if data is None:
        print("no real-music set found: pass --data PATH/segments.jsonl", file=sys.stderr)
        return 2
    segs = load_segments(data)
    x = np.array([[s.batch[n] for n in BATCH_FIELDS] for s in segs])
    tracks = np.array([s.track for s in segs])
    collections = sorted(Counter(s.collection for s in segs))
    result: dict[str, Any] = {
        "data": str(data),
        "segments": len(segs),
        "tracks": len(set(tracks.tolist())),
        "xpstore": xpstore.__version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        base = baseline_hit_rate(x, tracks)
        modes = real_modes(root, segs)
        learned = None if args.no_learned else real_learned(root, segs, args.folds, 0)
        gen = generated(root, args.generated, args.seed) if args.generated > 0 else {}
        val = validation(root, segs, args.splits) if args.splits > 0 else []
        strat = strategies(root, segs)
    result["baseline"] = base
    result["modes"] = {
        m: {"hit_rate": hit_rate(r["before"], segs), "agree": r["agree"],
            "ms_per_query": r["ms_per_query"]}
        for m, r in modes.items()
    }  # fmt: skip
    result["generated"] = {"n": args.generated, "seed": args.seed, "precision_at_10": gen}

    print(f"## Real music: same-track top-1 over {len(segs)} segments of "
          f"{result['tracks']} tracks ({data})\n")  # fmt: skip
    head = "| vectors | all | " + " | ".join(collections) + " |"
    print(head)
    print("|---" * (2 + len(collections)) + "|")
    base_nn = _baseline_top(x, tracks)
    print(_row("numpy z-cosine (baseline)", base_nn, segs, collections))
    for mode, r in modes.items():
        mark = " (default)" if mode == DEFAULT_MODE else ""
        print(_row(f"store {mode}{mark}", r["before"], segs, collections))
    if learned is not None:
        rep = learned["report"]
        cv = f"{learned['cv_over_all']:.3f} ({rep['cv_hits']}/{len(segs)})"
        print(f"| store learned, CV by track ({args.folds} folds) | {cv} |"
              + " |" * len(collections))  # fmt: skip
        print(_row("store learned, in force (in-sample)", learned["in_force"], segs, collections))
        loco = learned["leave_one_collection_out"]
        print("| learned, leave one collection out | " + f"{loco['all']:.3f} | "
              + " | ".join(f"{loco[c]:.3f}" for c in collections) + " |")  # fmt: skip
    print()
    agree = all(r["agree"] for r in modes.values())
    print(f"Answers before the first build == after rebuild_index(wait=True): {agree}; "
          f"{result['modes'][DEFAULT_MODE]['ms_per_query']:.2f} ms per similar() "
          "(first answers included).")  # fmt: skip
    if learned is not None:
        rep = learned["report"]
        result["learned"] = {k: v for k, v in learned.items() if k != "in_force"}
        result["learned"]["in_force_hit_rate"] = hit_rate(learned["in_force"], segs)
        print(f"fit_similarity: {rep['groups']} groups, {rep['tracks']} tracks, scored "
              f"{rep['scored']}; baseline {rep['baseline_hit_rate']:.3f} -> CV "
              f"{rep['cv_hit_rate']:.3f} (gain {rep['gain']:+.3f}) over the scored tracks; "
              f"{learned['fit_s']:.1f} s; build uses {learned['dim_weights']}")  # fmt: skip
        top = sorted(rep["weights"].items(), key=lambda kv: -kv[1])
        print("learned weights: " + ", ".join(f"{n} {w:.3f}" for n, w in top if w >= 0.005))
    if gen:
        print(f"\n## Generated tracks: style precision@10 over {args.generated} tracks "
              f"(seed {args.seed})\n")  # fmt: skip
        print("| mode | precision@10 |\n|---|---|")
        for mode, value in gen.items():
            mark = " (default)" if mode == DEFAULT_MODE else ""
            print(f"| {mode}{mark} | {value:.4f} |")
    if args.candidates:
        cand = candidates(x, tracks)
        result["candidates"] = cand
        print("\n## Candidates (numpy, exact cosine, same 450 segments)\n")
        print("| standardization | same-track top-1 |\n|---|---|")
        for name, value in cand.items():
            print(f"| {name} | {value:.3f} |")
    if val:
        result["validation"] = val
        print(f"\n## Streaming validation: calibrate on half the tracks, score the other half "
              f"({len(val)} splits, seeds 0-{len(val) - 1})\n")  # fmt: skip
        print("| split | calibration pairs | true pairs | different-track pairs | true accepted "
              "| different-track accepted | ROC AUC | cosine >= 0.95 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for k, r in enumerate(val):
            cells = [
                f"{r['calibration_pairs']:.0f}", f"{r['test_true_pairs']:.0f}",
                f"{r['test_false_pairs']:.0f}", f"{r['true_accept']:.3f}",
                f"{r['false_accept']:.3f}", f"{r['auc']:.3f}", f"{r['cosine_095']:.3f}",
            ]  # fmt: skip
            print(f"| {k} | " + " | ".join(cells) + " |")
        print(f"\n{val[0]['ms_per_validate']:.2f} ms per validate_streaming(track); "
              f"median cosine of true pairs {np.median([r['cosine_median'] for r in val]):.3f}")
    result["strategies"] = strat
    print("\n## Query strategies: same-track top-1 and latency per similar()\n")
    print("| query | strategy | same-track top-1 | ms per query | picked |\n|---|---|---|---|---|")
    for label, rows in strat.items():
        for strategy, r in rows.items():
            picked = ", ".join(f"{k[7:]} {int(v)}" for k, v in r.items() if k.startswith("picked_"))
            print(f"| {label} | {strategy} | {r['hit_rate']:.3f} | {r['ms_per_query']:.2f} | "
                  f"{picked} |")  # fmt: skip
    default_rate = result["modes"][DEFAULT_MODE]["hit_rate"]
    print("\n## Bars\n")
    print(f"- default settings >= {BAR_DEFAULT}: {default_rate:.3f} "
          f"{'PASS' if default_rate >= BAR_DEFAULT else 'MISS'} (baseline {base:.3f})")  # fmt: skip
    if learned is not None:
        cv_all = learned["cv_over_all"]
        print(f"- learned, CV by track >= {BAR_LEARNED}: {cv_all:.3f} "
              f"{'PASS' if cv_all >= BAR_LEARNED else 'MISS'}")  # fmt: skip
    print(f"- answers before/after the first build agree: {'PASS' if agree else 'MISS'}")
    if val:
        tar = min(r["true_accept"] for r in val)
        far = max(r["false_accept"] for r in val)
        auc = min(r["auc"] for r in val)
        ok = tar >= BAR_TRUE_ACCEPT and far <= BAR_FALSE_ACCEPT
        print(f"- validation, every split: true accepted >= {BAR_TRUE_ACCEPT} (min {tar:.3f}) "
              f"with different-track accepted <= {BAR_FALSE_ACCEPT} (max {far:.3f}): "
              f"{'PASS' if ok else 'MISS'}")  # fmt: skip
        print(f"- validation ROC AUC >= {BAR_AUC} (min {auc:.3f}): "
              f"{'PASS' if auc >= BAR_AUC else 'MISS'}")  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


def _baseline_top(x: np.ndarray, tracks: np.ndarray) -> dict[str, str]:
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T
    np.fill_diagonal(s, -np.inf)
    return dict(enumerate(tracks[s.argmax(axis=1)].tolist()))  # type: ignore[arg-type]


def _row(name: str, top: dict[Any, str], segs: Sequence[Segment], cols: list[str]) -> str:
    if 0 in top:  # the baseline's answers are keyed by position
        top = {s.track_id: top[i] for i, s in enumerate(segs)}
    cells = [rate(top, segs, lambda s: True)]
    cells += [rate(top, segs, lambda s, c=c: s.collection == c) for c in cols]  # type: ignore[misc]
    return f"| {name} | " + " | ".join(cells) + " |"


if __name__ == "__main__":
    raise SystemExit(main())
