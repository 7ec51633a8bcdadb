"""``xpstore report PATH --out DIR``: the operator's pictures of one store, as PNGs.

- ``learning.png``: the learner's reliability diagram and accuracy over the resolved outcomes
  (``xpstore.tuning.plots``);
- ``index_recall.png``: the recall@10 probe of each index build (``index/builds.jsonl``), with
  the build's size;
- ``priorities.png``: the priority sampler's distribution, per kind, as N·P(i) (1 = what a
  uniform draw would give each item) on a log axis;
- ``latency.png``: p50 (solid) and p99 (dashed) over time of ``put`` and ``similar`` from the
  profiler's stored operation summaries, and of the most frequent application query types from
  their QueryMetrics (``xpstore.tuning.profiler.latency_over_time``).

matplotlib is the optional ``plots`` extra, imported here only (Agg backend). Every figure is
drawn even without data (it says so), so the set of files does not depend on the store.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

from xpstore.errors import EmptySampleError, XpStoreError
from xpstore.index.history import read_builds
from xpstore.model.records import SAMPLEABLE_KINDS
from xpstore.store.store import Store
from xpstore.tuning import Learner
from xpstore.tuning.plots import plot_learning
from xpstore.tuning.profiler import latency_over_time

__all__ = ["DPI", "SIZES", "write_report"]

DPI = 100
SIZES = {"learning": (1000, 420), "index_recall": (800, 450), "priorities": (800, 450),
         "latency": (1000, 450)}
"""Pixel sizes of the PNGs, by figure."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise XpStoreError("report needs matplotlib: pip install 'xpstore[plots]'") from exc
    return plt


def write_report(store: Store, out: str | Path, *, policy: str = "default") -> dict[str, Path]:
    """Write every figure into ``out`` (created if missing); return name -> file."""
    plt = _pyplot()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    files["learning"] = plot_learning(Learner(store, policy=policy), folder / "learning.png")
    files["index_recall"] = _recall(plt, store, folder / "index_recall.png")
    files["priorities"] = _priorities(plt, store, folder / "priorities.png")
    files["latency"] = _latency(plt, store, folder / "latency.png")
    return files


def _figure(plt: Any, name: str) -> tuple[Any, Any]:
    w, h = SIZES[name]
    fig, ax = plt.subplots(figsize=(w / DPI, h / DPI), dpi=DPI)
    return fig, ax


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    plt.close(fig)
    return path


def _empty(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")
    ax.set_xticks([])
    ax.set_yticks([])


def _recall(plt: Any, store: Store, path: Path) -> Path:
    builds = [b for b in read_builds(store.path / "index") if b.get("recall_at_10") is not None]
    fig, ax = _figure(plt, "index_recall")
    floor = store.config.health.recall_warning
    if not builds:
        _empty(ax, "no index build with a recall probe yet")
    else:
        xs = [int(b["build_id"]) for b in builds]
        ax.plot(xs, [float(b["recall_at_10"]) for b in builds], marker="o", label="recall@10")
        ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1,
                   label=f"warning under {floor:g}")  # fmt: skip
        ax.set_ylim(min(0.5, floor - 0.05), 1.01)
        ax.set_xlabel("build")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("recall@10 vs exact search")
        size = ax.twinx()
        size.plot(xs, [int(b["count"]) for b in builds], color="tab:grey", linestyle=":",
                  label="vectors")  # fmt: skip
        size.set_ylabel("vectors")
        ax.legend(loc="lower left")
    ax.set_title("index recall probe per build")
    return _save(plt, fig, path)


def _priorities(plt: Any, store: Store, path: Path) -> Path:
    fig, ax = _figure(plt, "priorities")
    rels: dict[str, list[float]] = {}
    for kind in SAMPLEABLE_KINDS:
        if not store.count(kind):
            continue
        try:
            probs = store.sampling_probabilities(kind)
        except EmptySampleError:
            continue
        total = sum(probs.values())
        if probs and total > 0:
            n = len(probs)
            rels[kind] = [p / total * n for p in probs.values() if p > 0]
    if rels:  # one set of log-spaced bins for every kind, so the shapes compare
        lo = math.log10(min(min(v) for v in rels.values()))
        hi = math.log10(max(max(v) for v in rels.values()))
        if hi - lo < 0.2:
            lo, hi = lo - 0.1, hi + 0.1
        bins = [10 ** (lo + (hi - lo) * i / 50) for i in range(51)]
        for kind, rel in rels.items():
            ax.hist(rel, bins=bins, histtype="step", linewidth=1.5, label=f"{kind} ({len(rel)})")
        ax.set_xscale("log")
        ax.axvline(1.0, color="grey", linestyle="--", linewidth=1, label="uniform")
        ax.set_xlabel("N·P(i): sampling probability relative to uniform")
        ax.set_ylabel("items")
        ax.legend()
    else:
        _empty(ax, "nothing to sample yet")
    ax.set_title("priority sampler: distribution of P(i)")
    return _save(plt, fig, path)


def _latency(plt: Any, store: Store, path: Path) -> Path:
    series = latency_over_time(store)
    fig, ax = _figure(plt, "latency")
    if not series:
        _empty(ax, "no operation summaries or query metrics yet (the profiler logs summaries "
                   "while xpstore.Tuning is attached)")  # fmt: skip
    else:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for i, (qtype, points) in enumerate(series.items()):
            xs = [dt.datetime.fromtimestamp(p["t"], tz=dt.UTC) for p in points]
            color = colors[i % len(colors)]
            n = int(sum(p["count"] for p in points))
            ax.plot(xs, [p["p50_ms"] for p in points], color=color, marker=".",
                    label=f"{qtype} p50 ({n})")  # fmt: skip
            ax.plot(xs, [p["p99_ms"] for p in points], color=color, marker=".",
                    linestyle="--", label=f"{qtype} p99")  # fmt: skip
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_xlabel("time (UTC)")
        fig.autofmt_xdate()
        ax.legend(fontsize="small", ncol=2)
    ax.set_title("latency percentiles over time")
    return _save(plt, fig, path)
