"""CLI commands (issue 12): ``xpstore profile`` and ``xpstore tune status|run|enable|disable|
history``, thin layers over ``xpstore.Tuning`` (docs/tuning.md, docs/cli.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xpstore import Store, Tuning
from xpstore.cli._output import emit_json
from xpstore.cli.commands import STORE_PATH, json_option, main, open_for_reading, readonly_option
from xpstore.tuning.profiler import Profiler

STRATEGY = click.Choice(["latency", "throughput", "cost", "balanced"])


def strategy_option(func: Any) -> Any:
    return click.option("--strategy", type=STRATEGY, default=None,
                        help="Set the tuner's strategy first (durable).")(func)  # fmt: skip


@main.command()
@click.argument("path", type=STORE_PATH)
@click.option("--type", "query_type", default=None, help="One query type (default: all).")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Only the last H hours of the 24 h window.")
@click.option("--top", type=click.IntRange(1, 1000), default=10, show_default=True,
              help="Trending and slow queries listed.")
@readonly_option
@json_option
def profile(path: Path, query_type: str | None, hours: float | None, top: int, readonly: bool,
            as_json: bool) -> None:  # fmt: skip
    """Query latency and rates per type and layer, from the stored QueryMetrics.

    The store's own operation summaries appear as types ``store.*``.

    \b
    Example:
      xpstore profile data/xp --type semantic --hours 1
    """
    with open_for_reading(path, readonly, index_auto_rebuild=False) as store:
        prof = Profiler(store, background=False)
        try:
            out = prof.profile(query_type, hours=hours, top=top)
        finally:
            prof.close()
    if as_json:
        emit_json(out)
        return
    if not out["types"]:
        click.echo("no query metrics in the window")
        return
    click.echo(f"{'type':<22} {'count':>8} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7} "
               f"{'cache':>6} {'speedup':>8}")  # fmt: skip
    for qt, row in out["types"].items():
        if "count" not in row:
            continue
        click.echo(f"{qt:<22} {row['count']:>8} {_num(row['p50_ms'])} {_num(row['p99_ms'])} "
                   f"{_pct(row['error_rate'])} {_pct(row['cache_hit_rate'], 6)} "
                   f"{_num(row['parallel_speedup'], 8)}")  # fmt: skip
        for layer, lrow in row["layers"].items():
            click.echo(f"  {layer:<20} {lrow['count']:>8} {_num(lrow['p50_ms'])} "
                       f"{_num(lrow['p99_ms'])}")  # fmt: skip
    if out["trending"]:
        click.echo("trending:")
        for t in out["trending"]:
            click.echo(f"  {t['count']:>6}  [{t['query_type']}] {t['query_text']}")


def _num(v: float | None, width: int = 9) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.2f}"


def _pct(v: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if v is None else f"{v * 100:>{width - 1}.1f}%"


@main.group()
def tune() -> None:
    """The auto-tuner: status, one run now, enable or disable it, its decisions.

    \b
    Example:
      xpstore tune run data/xp --strategy latency
    """


def _tuning(store: Store, strategy: str | None) -> Tuning:
    return Tuning(store, strategy=strategy, background=False, monitor=False, prewarm=False)


@tune.command()
@click.argument("path", type=STORE_PATH)
@strategy_option
@json_option
def status(path: Path, strategy: str | None, as_json: bool) -> None:
    """Enabled, strategy, the knobs in force, the change awaiting its judgement.

    \b
    Example:
      xpstore tune status data/xp --json
    """
    with Store.open(path, index_auto_rebuild=False) as store, _tuning(store, strategy) as t:
        out = t.tuner.status()
    if as_json:
        emit_json(out)
        return
    state = "enabled" if out["enabled"] else "disabled"
    click.echo(f"tuner {state}, strategy {out['strategy']}, recall floor {out['recall_floor']}")
    for knob, value in out["knobs"].items():
        click.echo(f"  {knob:<22} {value}")
    for p in out["pending"]:
        click.echo(f"awaiting judgement: {p['target']} {p['old']} -> {p['new']} ({p['reason']})")


@tune.command()
@click.argument("path", type=STORE_PATH)
@strategy_option
@json_option
def run(path: Path, strategy: str | None, as_json: bool) -> None:
    """Judge the last change, then make at most one new one (logged as decisions).

    \b
    Example:
      xpstore tune run data/xp
    """
    with Store.open(path) as store, _tuning(store, strategy) as t:
        out = t.tuner.run()
    if as_json:
        emit_json(out)
        return
    judged, change = out["judged"], out["change"]
    if judged is not None:
        click.echo(f"{judged['action']} {', '.join(judged['targets'])}: {judged['reason']}")
    if change is not None:
        knobs = ", ".join(f"{k}={v}" for k, v in change["knobs"].items())
        click.echo(f"changed {knobs}: {change['reason']}")
    if judged is None and change is None:
        click.echo("nothing to change")


@tune.command()
@click.argument("path", type=STORE_PATH)
@strategy_option
@json_option
def enable(path: Path, strategy: str | None, as_json: bool) -> None:
    """Let the tuner run in the background wherever ``Tuning`` is attached.

    \b
    Example:
      xpstore tune enable data/xp --strategy balanced
    """
    with Store.open(path, index_auto_rebuild=False) as store, _tuning(store, strategy) as t:
        t.tuner.enable()
        out = {"enabled": True, "strategy": t.tuner.strategy}
    if as_json:
        emit_json(out)
    else:
        click.echo(f"tuner enabled, strategy {out['strategy']}")


@tune.command()
@click.argument("path", type=STORE_PATH)
@strategy_option
@json_option
def disable(path: Path, strategy: str | None, as_json: bool) -> None:
    """Stop background tuning (``tune run`` still works).

    \b
    Example:
      xpstore tune disable data/xp
    """
    with Store.open(path, index_auto_rebuild=False) as store, _tuning(store, strategy) as t:
        t.tuner.disable()
        out = {"enabled": False, "strategy": t.tuner.strategy}
    if as_json:
        emit_json(out)
    else:
        click.echo("tuner disabled")


@tune.command()
@click.argument("path", type=STORE_PATH)
@readonly_option
@json_option
def history(path: Path, readonly: bool, as_json: bool) -> None:
    """Every decision of the tuner, oldest first: knob, old -> new, strategy, why.

    \b
    Example:
      xpstore tune history data/xp --json
    """
    from xpstore.tuning.tuner import COMPONENT

    with open_for_reading(path, readonly, index_auto_rebuild=False) as store:
        rows = []
        for exp in store.scan("decision", where={"component": COMPONENT}):
            rec = exp.record
            rows.append({"id": exp.id, "ts": exp.ts, **rec.model_dump(
                include={"action", "target", "old", "new", "reason", "evidence", "policy"})})
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no tuner decisions")
    for r in rows:
        click.echo(f"{r['id']:>8}  {r['action']:<9} {r['target']:<24} {r['old']} -> {r['new']}"
                   f"  [{r['policy']}] {r['reason']}")  # fmt: skip
