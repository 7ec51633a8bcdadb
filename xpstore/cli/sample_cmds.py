"""CLI command (issue 5): ``xpstore sample``, a thin layer over ``Store.sample`` (docs/cli.md).

It opens the store as ``get`` does: for writing when the lock is free (the drawn items'
retrieval counts are then recorded, and logged at close), read-only beside a live writer (the
draw is the same, but nothing is recorded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xpstore.cli._input import parse_where
from xpstore.cli._output import dumps, emit_json
from xpstore.cli.commands import STORE_PATH, json_option, main, open_for_reading, readonly_option
from xpstore.model.records import KINDS


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("-n", "n", type=click.IntRange(min=1), default=32, show_default=True,
              help="How many experiences to draw, with replacement (at most the store's "
              "sampling.max_sample, 1,000,000 by default).")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Only this kind.")
@click.option("--where", "wheres", multiple=True, metavar="PATH[__OP]=VALUE",
              help="Only records matching, as scan's --where. Repeat to AND.")
@click.option("--beta", type=click.FloatRange(0, 1), default=None,
              help="Importance-weight exponent (default: the store's priority_beta).")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Restart the sampler's random stream from this seed.")
@readonly_option
@json_option
def sample(path: Path, n: int, kind: str | None, wheres: tuple[str, ...], beta: float | None,
           seed: int | None, readonly: bool, as_json: bool) -> None:
    """Draw experiences by priority: P(i) = p_i^alpha / sum p^alpha.

    Prints id, kind, probability, importance weight and the record, one row per draw; with
    --json one object per line (JSONL): {"id", "kind", "probability", "weight", "record"}.

    \b
    Example:
      xpstore sample data/xp -n 8 --kind prediction --where context=warm_start --seed 7
    """
    where = parse_where(wheres)
    with open_for_reading(path, readonly, index_auto_rebuild=False) as store:
        limit = store.config.sampling.max_sample
        if n > limit:
            raise click.BadParameter(
                f"{n:,} is over this store's limit of {limit:,} draws per call "
                "(its sampling.max_sample setting; draws are with replacement): draw in "
                "several calls",
                param_hint="-n",
            )
        batch = store.sample(n, kind=kind, where=where or None, beta=beta, seed=seed)
    rows: list[dict[str, Any]] = [
        {
            "id": rid,
            "kind": exp.kind,
            "probability": float(p),
            "weight": float(w),
            "record": exp.to_json(),
        }
        for rid, exp, p, w in zip(
            batch.ids, batch.records, batch.probabilities, batch.weights, strict=True
        )
    ]
    if as_json:
        for row in rows:
            emit_json(row, indent=None)
        return
    width = max(len(str(r["id"])) for r in rows)
    click.echo(f"{'id'.rjust(width)}  {'kind':<12}  {'P':>9}  {'weight':>6}  record")
    for r in rows:
        click.echo(
            f"{str(r['id']).rjust(width)}  {r['kind']:<12}  {r['probability']:9.6f}  "
            f"{r['weight']:6.3f}  {dumps(r['record'])[:90]}"
        )
