"""Rendering for the CLI: JSON (one line or indented) and aligned key/value tables."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click


def dumps(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON (no NaN): compact on one line for JSONL, indented for a single object."""
    if indent is None:
        return json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    return json.dumps(obj, allow_nan=False, ensure_ascii=False, indent=indent)


def emit_json(obj: Any, *, indent: int | None = 2) -> None:
    click.echo(dumps(obj, indent=indent))


def flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings to ``(dotted.key, value)`` rows, in order."""
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, list | tuple):
        return ", ".join(_cell(v) for v in value) or "-"
    return str(value)


def table(rows: list[tuple[str, Any]]) -> str:
    """Two aligned columns, numbers with thousands separators, right-aligned."""
    cells = [(k, _cell(v), isinstance(v, int | float) and not isinstance(v, bool)) for k, v in rows]
    width = max((len(k) for k, _, _ in cells), default=0)
    num_width = max((len(c) for _, c, num in cells if num), default=0)
    return "\n".join(
        f"{k.ljust(width)}  {c.rjust(num_width) if num else c}" for k, c, num in cells
    )
