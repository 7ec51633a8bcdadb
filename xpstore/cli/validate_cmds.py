"""CLI command (issue 11), registered on the ``xpstore`` group: ``validate``, a thin layer over
``Store.calibrate_validation``, ``Store.validate_streaming`` and ``Store.validate_all_streaming``
(see docs/validation.md and docs/cli.md). It writes (verdicts, a calibration): it needs the
writer lock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from xpstore import Store
from xpstore.cli._output import emit_json, table
from xpstore.cli.commands import STORE_PATH, json_option, main


@main.command()
@click.argument("path", type=STORE_PATH)
@click.argument("track_ids", nargs=-1, metavar="[TRACK_ID]...")
@click.option(
    "--calibrate", is_flag=True,
    help="Calibrate first on the store's fingerprints that have both streaming and batch values.",
)  # fmt: skip
@click.option(
    "--target-far", type=click.FloatRange(min=0, max=0.5, min_open=True, max_open=True),
    default=None, help="With --calibrate: the false-accept rate to calibrate to "
    "(default: the store's validation.target_far, 0.05).",
)  # fmt: skip
@click.option(
    "--all", "revalidate", is_flag=True,
    help="Without TRACK_IDs: validate every fingerprint with both parts again, not only those "
    "without a verdict under the calibration in force.",
)  # fmt: skip
@json_option
def validate(
    path: Path,
    track_ids: tuple[str, ...],
    calibrate: bool,
    target_far: float | None,
    revalidate: bool,
    as_json: bool,
) -> None:
    """Check streaming values against batch values, by name, and record the verdicts.

    With TRACK_IDs: validate each track's streaming values against its batch values and
    write the verdict (valid/invalid, score, calibration) into its fingerprint's `validation`
    field. Without: validate every fingerprint that has both and no verdict yet under the
    calibration in force. `scan --where validation.status=invalid` lists the failures. Exit 1
    if a track does not exist, 2 if one lacks streaming or batch values.

    \b
    Example:
      xpstore validate data/xp --calibrate
      xpstore validate data/xp track-42 --json
    """
    out: dict[str, Any] = {}
    with Store.open(path) as store:
        if calibrate:
            cal = store.calibrate_validation(target_far=target_far)
            out["calibration"] = {
                k: v for k, v in cal.model_dump().items() if k not in ("model", "cohort")
            }
            out["calibration"]["cohort"] = len(cal.cohort)
        if track_ids:
            out["results"] = [store.validate_streaming(t).to_json() for t in track_ids]
        else:
            out["counts"] = store.validate_all_streaming(only_unvalidated=not revalidate)
    if as_json:
        emit_json(out)
        return
    if "calibration" in out:
        cal_rows = [(f"calibration.{k}", v) for k, v in out["calibration"].items()]
        click.echo(table(cal_rows))
        click.echo("")
    if "counts" in out:
        click.echo(table(list(out["counts"].items())))
    for res in out.get("results", []):
        click.echo(
            f"{res['track_id']}: {res['status']} (score {res['score']:.2f}, threshold "
            f"{res['threshold']:.2f}, cosine {res['cosine']:.3f}, confidence {res['quality']}, "
            f"calibration {res['calibration']} {res['source']})"
        )
        for name, m in res["metrics"].items():
            kind = "rel" if m["relative"] else "abs"
            flag = "" if m["typical"] else "  <- atypical"
            click.echo(f"  {name:24s} streaming {m['streaming']:.4g}  batch {m['batch']:.4g}  "
                       f"{kind} error {m['error']:.3g}{flag}")  # fmt: skip
