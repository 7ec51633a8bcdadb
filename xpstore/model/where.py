"""``where=`` filters: field paths with Django-style suffixes, compiled once per query.

``{"context": "warm_start", "audio_features.energy__gt": 0.6, "ts__gte": t0}`` keeps the
experiences whose record matches every condition. Paths are dotted; the first part may name an
envelope field (``id``, ``kind``, ``ts``, ``updated_lsn``, ``retrieval_count``,
``success_count``) or a record field; later parts walk into models and mappings. A path that is
absent in a record (an optional field left unset, a missing mapping key) counts as None: it
matches ``None`` under equality and any other value under ``__ne``, and no ordering
comparison. The CLI's ``--where 'audio_features.energy__gt=0.6'`` builds the same mapping.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from xpstore.errors import InvalidRecordError
from xpstore.model.records import MODEL_BY_KIND, Experience

ENVELOPE_FIELDS = frozenset({"id", "kind", "ts", "updated_lsn", "retrieval_count", "success_count"})
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    "in": lambda a, b: a in b,
}
_ABSENT = object()
Predicate = Callable[[Experience], bool]


def compile_where(where: Mapping[str, Any] | None, kinds: tuple[str, ...]) -> Predicate | None:
    """A predicate over experiences, or None for no filter. Bad keys raise InvalidRecordError."""
    if not where:
        return None
    conditions: list[tuple[tuple[str, ...], Callable[[Any, Any], bool], Any, bool]] = []
    for key, value in where.items():
        path_text, _, suffix = key.partition("__")
        op_name = suffix or "eq"
        if op_name not in _OPS:
            raise InvalidRecordError(
                f"where: unknown operator '__{op_name}' in {key!r}; use one of "
                + ", ".join(f"__{o}" for o in _OPS),
                field=key,
            )
        if op_name == "in" and not isinstance(value, list | tuple | set | frozenset):
            raise InvalidRecordError(f"where: {key!r} needs a list of values", field=key)
        path = tuple(path_text.split("."))
        if not all(path):
            raise InvalidRecordError(f"where: empty path component in {key!r}", field=key)
        _check_root(path[0], kinds, key)
        conditions.append((path, _OPS[op_name], value, op_name == "ne"))

    def predicate(exp: Experience) -> bool:
        for path, op, value, absent_ok in conditions:
            got = _resolve(exp, path)
            if got is _ABSENT or got is None:
                # an unset value equals None (``{"actual": None}`` finds unresolved outcomes)
                # and is != anything else; it never satisfies an ordering comparison
                if value is None and op is operator.eq:
                    continue
                if not absent_ok or value is None:
                    return False
                continue
            try:
                if not op(got, value):
                    return False
            except TypeError:
                return False
        return True

    return predicate


def _check_root(root: str, kinds: tuple[str, ...], key: str) -> None:
    if root in ENVELOPE_FIELDS:
        return
    if any(root in MODEL_BY_KIND[k].model_fields for k in kinds):
        return
    raise InvalidRecordError(f"where: {key!r} names no field of kind {'/'.join(kinds)}", field=key)


def _resolve(exp: Experience, path: tuple[str, ...]) -> Any:
    root = path[0]
    current: Any = getattr(exp, root) if root in ENVELOPE_FIELDS else exp.record
    parts = path[1:] if root in ENVELOPE_FIELDS else path
    for part in parts:
        if isinstance(current, BaseModel):
            current = getattr(current, part, _ABSENT)
        elif isinstance(current, Mapping):
            current = current.get(part, _ABSENT)
        else:
            return _ABSENT
        if current is _ABSENT or current is None:
            return current
    return current
