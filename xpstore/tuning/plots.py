"""Pictures of the learner (``xpstore learn report --plot``): the reliability diagram of the
recorded confidences and the accuracy over the recent resolved outcomes.

matplotlib is an optional extra (``pip install 'xpstore[plots]'``); it is imported only here, and
only when a picture is asked for (the Agg backend: no display needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xpstore.errors import XpStoreError
from xpstore.tuning.learner import Learner

__all__ = ["plot_learning"]

BLOCK = 100
"""Resolved outcomes per point of the accuracy curve."""


def plot_learning(learner: Learner, path: str | Path, *, bins: int = 10) -> Path:
    """Write a PNG with the reliability diagram and the accuracy curve; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise XpStoreError(
            "plots need matplotlib: pip install 'xpstore[plots]'"
        ) from exc
    out = Path(path)
    cal = learner.calibration(bins)
    recent = list(learner.recent)
    fig, (rel, acc) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
    _reliability(rel, cal)
    _accuracy(acc, [w.correct for w in recent], [w.confidence for w in recent])
    fig.suptitle(f"learner ({learner.policy_name}): {learner.resolved} resolved predictions")
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out


def _reliability(ax: Any, cal: dict[str, Any]) -> None:
    rows = [r for r in cal["bins"] if r["count"]]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], marker="o",
            label="recorded confidence")  # fmt: skip
    ece = cal["ece"]
    ax.set_title("reliability" + (f" (ECE {ece:.3f})" if ece is not None else ""))
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")


def _accuracy(ax: Any, correct: list[bool], confidence: list[float]) -> None:
    xs, acc, conf = [], [], []
    for start in range(0, len(correct) - BLOCK + 1, BLOCK):
        xs.append(start + BLOCK)
        acc.append(sum(correct[start : start + BLOCK]) / BLOCK)
        conf.append(sum(confidence[start : start + BLOCK]) / BLOCK)
    ax.plot(xs, acc, label="accuracy")
    ax.plot(xs, conf, linestyle=":", label="mean confidence")
    ax.set_title(f"over the last {len(correct)} resolved outcomes, blocks of {BLOCK}")
    ax.set_xlabel("resolved outcome")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
