"""CLI commands (issue 10): ``xpstore learn report|step|reset|simulate``, thin layers over
``xpstore.tuning.Learner`` and the listener simulator (docs/learning.md, docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xpstore import Store
from xpstore.cli._output import emit_json
from xpstore.cli.commands import STORE_PATH, json_option, main, open_for_reading, readonly_option
from xpstore.tuning import Learner

POLICY = click.Choice(["fixed", "seed", "default"])


def policy_option(func: Any) -> Any:
    return click.option("--policy", type=POLICY, default="default", show_default=True,
                        help="The learner policy whose state to use.")(func)  # fmt: skip


@main.group()
def learn() -> None:
    """Report on, step, reset or simulate the affinity learner.

    \b
    Example:
      xpstore learn report data/xp --by user
    """


@learn.command()
@click.argument("path", type=STORE_PATH)
@click.option("--by", type=click.Choice(["label", "context", "user"]), default=None,
              help="Accuracy per predicted label, context or user.")
@click.option("--window", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Recent resolved outcomes for the windowed figures.")
@click.option("--plot", "plot", type=click.Path(path_type=Path), default=None,
              help="Also draw the reliability diagram and the accuracy curve into this PNG "
                   "(needs the plots extra: matplotlib).")
@policy_option
@readonly_option
@json_option
def report(path: Path, by: str | None, window: int, plot: Path | None, policy: str,
           readonly: bool, as_json: bool) -> None:  # fmt: skip
    """Accuracy (overall and per key, windowed and all time), calibration, weights and rules.

    \b
    Example:
      xpstore learn report data/xp --by context --json
    """
    with open_for_reading(path, readonly, index_auto_rebuild=False) as store:
        lrn = Learner(store, policy=policy)
        out: dict[str, Any] = {
            "policy": policy,
            "resolved": lrn.resolved,
            "accuracy": lrn.accuracy(window=window),
            "calibration": lrn.calibration(),
            "weights": {"global": lrn.weights(),
                        "users": {u: lrn.weights(u) for u in sorted(lrn.user_weight)}},
            "rules": lrn.rules(),
        }  # fmt: skip
        if by is not None:
            out["by"] = {by: lrn.accuracy(by=by, window=window)}
        if plot is not None:
            from xpstore.tuning.plots import plot_learning

            out["plot"] = str(plot_learning(lrn, plot))
    if as_json:
        emit_json(out)
        return
    acc = out["accuracy"]
    cal = out["calibration"]
    click.echo(f"policy {policy}: {lrn.resolved} resolved predictions")
    click.echo(f"accuracy: all time {_pct(acc['all_time'])}, last {acc['window_size']} "
               f"{_pct(acc['window'])}")  # fmt: skip
    ece, brier = cal["ece"], cal["brier"]
    if ece is not None:
        click.echo(f"calibration over the last {cal['n']}: ECE {ece:.3f}, Brier {brier:.3f}")
    g = out["weights"]["global"]
    click.echo(f"global weights: user {g['user_weight']:.2f}, audio {g['audio_weight']:.2f}; "
               f"{len(out['weights']['users'])} listeners with their own")  # fmt: skip
    if plot is not None:
        click.echo(f"wrote {plot}")
    if by is not None:
        click.echo(f"by {by}:")
        for key, row in out["by"][by].items():
            click.echo(f"  {key:<20} all time {_pct(row['all_time'])}  "
                       f"window {_pct(row['window'])}")  # fmt: skip


def _pct(row: dict[str, Any]) -> str:
    acc = row["accuracy"]
    return "-" if acc is None else f"{acc * 100:.1f}% of {row['n']}"


@learn.command()
@click.argument("path", type=STORE_PATH)
@click.option("--batch", type=click.IntRange(min=1, max=100_000), default=256, show_default=True,
              help="Resolved predictions drawn by priority.")
@policy_option
@json_option
def step(path: Path, batch: int, policy: str, as_json: bool) -> None:
    """One prioritized replay step: learn from a batch, write feedback and priorities back.

    \b
    Example:
      xpstore learn step data/xp --batch 256
    """
    with Store.open(path) as store:
        rep = Learner(store, policy=policy, batch_size=batch).step()
    data = {"sampled": rep.sampled, "mean_loss": rep.mean_loss if rep.sampled else None,
            "decisions": rep.decisions,
            "changed": [{"target": t, "old": o, "new": n} for t, o, n in rep.changed]}  # fmt: skip
    if as_json:
        emit_json(data)
    elif not rep.sampled:
        click.echo("no resolved predictions to learn from")
    else:
        click.echo(f"replayed {rep.sampled} outcomes, mean loss {rep.mean_loss:.3f}; "
                   f"{rep.decisions} decisions logged")  # fmt: skip


@learn.command()
@click.argument("path", type=STORE_PATH)
@click.option("--user", default=None, help="Reset one listener's weight only.")
@policy_option
@json_option
def reset(path: Path, user: str | None, policy: str, as_json: bool) -> None:
    """Back to the defaults (70/30 and the default rules), logged as decisions.

    \b
    Example:
      xpstore learn reset data/xp --user u1
    """
    with Store.open(path) as store:
        done = Learner(store, policy=policy).reset(user)
    if as_json:
        emit_json({"decisions": [d.target for d in done]})
    else:
        click.echo(f"reset {len(done)} targets" + (f" of user {user}" if user else ""))


@learn.command()
@click.argument("path", type=STORE_PATH)
@click.option("--listeners", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--interactions", type=click.IntRange(1, 1_000_000), default=5000,
              show_default=True, help="Per listener.")
@click.option("--policy", "policies", type=click.Choice(["fixed", "seed", "default", "oracle"]),
              multiple=True, help="Repeat to compare; default: all four.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@json_option
def simulate(path: Path, listeners: int, interactions: int, policies: tuple[str, ...],
             seed: int, as_json: bool) -> None:  # fmt: skip
    """Run simulated listeners (docs/learning.md) against a new store per policy under PATH.

    Each policy gets its own store, PATH/<policy>, created with durability none (the accuracy
    is the point, not the disk); prints accuracy over each listener's last 1000 interactions.

    \b
    Example:
      xpstore learn simulate /tmp/sim --listeners 5 --interactions 1000
    """
    from xpstore.demo.listeners import simulate as run

    if path.exists() and any(path.iterdir()):
        raise click.UsageError(f"{path} exists and is not empty")
    rows = []
    for pol in policies or ("fixed", "seed", "default", "oracle"):
        with Store.open(path / pol, create=True, durability="none") as store:
            res = run(store, pol, listeners=listeners, interactions=interactions, seed=seed,
                      last=min(1000, interactions))  # fmt: skip
        rows.append({"policy": pol, "accuracy_last": res.accuracy_last,
                     "accuracy_all": res.accuracy_all, "ece": res.ece})  # fmt: skip
    if as_json:
        emit_json({"listeners": listeners, "interactions": interactions, "results": rows})
        return
    click.echo(f"{'policy':<8}  {'last':>6}  {'all':>6}  {'ECE':>6}")
    for r in rows:
        ece = "-" if r["ece"] is None else f"{r['ece']:.3f}"
        click.echo(f"{r['policy']:<8}  {r['accuracy_last']:6.3f}  {r['accuracy_all']:6.3f}  "
                   f"{ece:>6}")  # fmt: skip
