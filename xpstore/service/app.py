"""The HTTP service's ASGI app (FastAPI): health, metrics, similar tracks, records, learning,
self-tuning.

:func:`create_app` wraps one open :class:`~xpstore.Store`; ``xpstore serve`` runs it under
uvicorn (:mod:`xpstore.service.server`). The endpoints and their error answers are in
docs/service.md; the OpenAPI document is served at ``/openapi.json``.

- Every error is JSON ``{"error": message, "field": name-or-null}`` with a 4xx status for bad
  input (400 a bad value, 404 nothing there, 413 a body over the limit, 422 a parameter out of
  range) and never a traceback; 503 when the store cannot answer (closed, critical health).
- Mutating endpoints need the store opened writable (``--writable``) *and* the bearer token of
  ``--token-file``, compared in constant time (``hmac.compare_digest``); otherwise they answer
  403 before anything is touched.
- ``/tuning/*`` answer from the :class:`~xpstore.tuning.tuning.Tuning` the service attached
  (``xpstore serve`` attaches one unless ``--no-tuning``); without one they answer 503.
- ``GET /similar`` runs on the event loop: a search is ~0.1 ms of FAISS and a thread hop costs
  as much as that; everything slower (stats, health, metrics, learning) runs in the thread pool.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from xpstore import __version__
from xpstore.errors import (
    EmptySampleError,
    InvalidArgumentError,
    InvalidRecordError,
    ReadOnlyStoreError,
    RecordNotFoundError,
    StoreClosedError,
    XpStoreError,
)
from xpstore.index.neighbors import Neighbor
from xpstore.store.store import Store
from xpstore.tuning import Learner
from xpstore.tuning.observe import watch_learner
from xpstore.tuning.tuning import Tuning

__all__ = ["MAX_BODY_BYTES", "MAX_K", "ServiceError", "create_app", "parse_where"]

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_BODY_BYTES = 1 << 20
"""Request bodies over this many bytes are refused with 413 (``--max-body``)."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServiceError(Exception):
    """An error answer: HTTP status, message, the field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


class ErrorBody(BaseModel):
    error: str
    field: str | None = None


class SimilarBody(BaseModel):
    """``POST /similar``: a fingerprint (the record's fields) or a hybrid vector."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: dict[str, Any] | None = None
    vector: list[float] | None = None
    k: int = Field(10, ge=1, le=MAX_K)
    where: dict[str, Any] | None = None
    exclude_self: bool = True


class NeighborOut(BaseModel):
    track_id: str
    score: float
    record_id: int
    metadata: dict[str, Any] | None = None
    build_id: int | None = None


class SimilarAnswer(BaseModel):
    """What the similar endpoints answer, best first."""

    query: str | None = None
    k: int
    neighbors: list[NeighborOut]


class ResetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = Field(None, description="Reset one listener; null: everything.")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 403, 404, 413, 422, 503)
}


def parse_where(values: list[str]) -> dict[str, Any] | None:
    """``where`` query parameters: one JSON object, or ``key=value`` items (the value read as
    JSON when it parses, else as a string), the CLI's ``--where`` syntax."""
    out: dict[str, Any] = {}
    for raw in values:
        text = raw.strip()
        if text.startswith("{"):
            try:
                doc = json.loads(text)
            except ValueError as exc:
                raise ServiceError(400, f"where is not valid JSON: {exc}", "where") from None
            if not isinstance(doc, dict):
                raise ServiceError(400, "where must be a JSON object", "where")
            out.update(doc)
            continue
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise ServiceError(400, f"where item {raw!r} is not key=value", "where")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out or None


class _BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length or, for a chunked
    body, by reading it here first (bodies are small: the limit is 1 MiB by default), then
    handing the app the buffered body. The app's own body parsing would turn any error raised
    mid-read into a generic 400."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        seen = 0
        first: Message | None = None
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: let the app see it
                first = msg
                break
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                await self._refuse(send)
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break

        async def replay() -> Message:
            nonlocal first
            if first is not None:
                msg, first = first, None
                return msg
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"error": f"the request body is over {self.limit} bytes",
                           "field": "body"}).encode()  # fmt: skip
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


class _Learning:
    """The learner the service answers from. A read-only service rebuilds it from the store
    when the writer's LMDB moved and ``refresh_s`` passed (a rebuild scans the outcomes)."""

    def __init__(self, store: Store, policy: str, refresh_s: float) -> None:
        self.store = store
        self.policy = policy
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._learner: Learner | None = None
        self._lsn = -1
        self._at = 0.0

    def get(self) -> Learner:
        with self._lock:
            now = time.monotonic()
            learner = self._learner
            if learner is not None and (not self.store.readonly or now - self._at < self.refresh_s):
                return learner
            lsn = self.store.parts.engine.applied_lsn()
            if learner is None or lsn != self._lsn:
                learner = self._learner = Learner(self.store, policy=self.policy)
                self._lsn = lsn
            self._at = now
            return learner


def create_app(
    store: Store,
    *,
    token: bytes | None = None,
    policy: str = "default",
    max_body_bytes: int = MAX_BODY_BYTES,
    learner_refresh_s: float = 30.0,
    tuning: Tuning | None = None,
) -> FastAPI:
    """The app over ``store`` (writable iff the store is open for writing); ``token`` guards
    the mutating endpoints (None: they always answer 403); ``tuning`` (attached to ``store``
    by the caller, who closes it) answers ``/tuning/*`` (None: 503)."""
    learning = _Learning(store, policy, learner_refresh_s)
    watch_learner(store, learning.get)
    app = FastAPI(
        title="xpstore",
        version=__version__,
        description="Health, metrics, similar tracks and learning figures of one xpstore "
        "store (docs/service.md).",
    )
    app.add_middleware(_BodyLimit, limit=max_body_bytes)

    # -------------------------------------------------------------- errors
    def error(status: int, message: str, field: str | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "field": field}, status_code=status)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error(exc.status, str(exc), exc.field)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # unknown paths (404), wrong methods (405) and the framework's own refusals
        return error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
        if first.get("type") == "json_invalid":
            return error(400, f"the body is not valid JSON: {first.get('msg')}", "body")
        field = ".".join(loc) or ("body" if "body" in first.get("loc", ()) else None)
        return error(422, f"{field or 'request'}: {first.get('msg', 'invalid')}", field)

    @app.exception_handler(XpStoreError)
    async def _store_error(request: Request, exc: XpStoreError) -> JSONResponse:
        if isinstance(exc, InvalidArgumentError | InvalidRecordError):
            return error(400, str(exc), getattr(exc, "field", None) or _record_field(exc))
        if isinstance(exc, RecordNotFoundError | EmptySampleError):
            return error(404, str(exc.args[0]) if exc.args else str(exc), None)
        if isinstance(exc, ReadOnlyStoreError):
            return error(403, str(exc), None)
        if isinstance(exc, StoreClosedError):
            return error(503, str(exc), None)
        log.error("request %s failed: %s", request.url.path, exc)
        return error(503, str(exc), None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the service's log")

    # -------------------------------------------------------------- guards
    def mutating(request: Request) -> None:
        """Writable store and the right bearer token, else 403 (nothing is touched)."""
        if store.readonly:
            raise ServiceError(403, "the service opened the store read-only; start it with "
                               "--writable to allow changes")  # fmt: skip
        if token is None:
            raise ServiceError(403, "no token is configured (--token-file): changes refused")
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)
        if not ok:
            raise ServiceError(403, "a valid bearer token is needed (Authorization: Bearer ...)",
                               "authorization")  # fmt: skip

    # -------------------------------------------------------------- operators
    @app.get("/metrics", response_class=Response, tags=["operators"],
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})  # fmt: skip
    def metrics() -> Response:
        """Prometheus text exposition of every metric."""
        return Response(store.parts.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", tags=["operators"], responses=ERRORS)
    def health() -> JSONResponse:
        """Every check; 200 when healthy or warning, 503 when critical."""
        report = store.health()
        return JSONResponse(report, status_code=503 if report["status"] == "critical" else 200)

    @app.get("/health/{check}", tags=["operators"], responses=ERRORS)
    def health_check(check: Annotated[str, Path(description="A check name.")]) -> JSONResponse:
        """One check; 404 for an unknown one."""
        if check not in store.parts.health.names():
            raise ServiceError(404, f"no health check {check!r}; the checks are "
                               f"{', '.join(store.parts.health.names())}", "check")  # fmt: skip
        result = store.parts.health.check(check)
        return JSONResponse({"check": check, **result.as_dict()},
                            status_code=503 if result.status == "critical" else 200)  # fmt: skip

    @app.get("/stats", tags=["store"], responses=ERRORS)
    def stats() -> dict[str, Any]:
        """Counts, LSNs, WAL and LMDB sizes (``store.stats()``)."""
        return store.stats()

    @app.get("/index/status", tags=["store"], responses=ERRORS)
    def index_status() -> dict[str, Any]:
        """The k-NN index: kind, size, delta, tombstones, last build (``store.index_status()``)."""
        return store.index_status()

    @app.get("/records/{record_id}", tags=["store"], responses=ERRORS)
    def record(record_id: Annotated[int, Path(ge=1, description="A record id (its LSN).")]
               ) -> dict[str, Any]:  # fmt: skip
        """One experience envelope; 404 when there is no such record."""
        return store.get(record_id).envelope_json()

    # -------------------------------------------------------------- similar tracks
    # the similar endpoints serialize their answer themselves (json.dumps of plain values):
    # FastAPI's response validation and encoding cost more than the search (benchmarks.md)
    answer = {200: {"model": SimilarAnswer}, **ERRORS}

    @app.get("/similar/{track_id}", tags=["similar"], responses=answer, response_model=None,
             openapi_extra={"parameters": SIMILAR_GET_PARAMETERS})  # fmt: skip
    async def similar_get(request: Request) -> Response:
        """The ``k`` tracks most similar to ``track_id``; 404 for an unknown track.

        The query is parsed here, not by FastAPI's dependency machinery (half the request's
        cost at this size; benchmarks.md): the parameters are declared for the OpenAPI
        document by hand and checked with the same errors FastAPI's checks give."""
        track_id: str = request.path_params["track_id"]
        params = request.query_params
        k = _int_param(params.get("k"), "k", 10, 1, MAX_K)
        precomputed = _bool_param(params.get("precomputed"), "precomputed")
        where = params.getlist("where")
        flt = parse_where(where) if where else None
        try:
            hits = store.similar(track_id, k=k, where=flt, precomputed=precomputed)
        except RecordNotFoundError as exc:
            raise ServiceError(404, str(exc.args[0]) if exc.args else str(exc), "track_id"
                               ) from None  # fmt: skip
        return _json({"query": track_id, "k": k, "neighbors": [_neighbor(n) for n in hits]})

    @app.post("/similar", tags=["similar"], responses=answer, response_model=None)
    def similar_post(body: SimilarBody) -> Response:
        """The ``k`` tracks most similar to a fingerprint (its fields) or a hybrid vector."""
        if (body.fingerprint is None) == (body.vector is None):
            raise ServiceError(400, "give exactly one of fingerprint and vector", "fingerprint")
        hits = store.similar(fingerprint=body.fingerprint, vector=body.vector, k=body.k,
                             where=body.where, exclude_self=body.exclude_self)  # fmt: skip
        return _json({"query": None, "k": body.k, "neighbors": [_neighbor(n) for n in hits]})

    # -------------------------------------------------------------- learning
    @app.get("/learning/accuracy", tags=["learning"], responses=ERRORS)
    def learning_accuracy(
        by: Annotated[str | None, Query(pattern="^(label|context|user)$")] = None,
        window: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Accuracy all time and over the recent window, overall or by label/context/user."""
        lrn = learning.get()
        return {"policy": lrn.policy_name, "resolved": lrn.resolved, "by": by,
                "accuracy": lrn.accuracy(by=by, window=window)}  # fmt: skip

    @app.get("/learning/weights", tags=["learning"], responses=ERRORS)
    def learning_weights(user: str | None = None) -> dict[str, Any]:
        """The blend weights of ``user`` (404 for an unknown one) or the global default."""
        lrn = learning.get()
        if user is not None and user not in lrn.habits and user not in lrn.user_weight:
            raise ServiceError(404, f"unknown user {user!r}", "user")
        return {"policy": lrn.policy_name, "user": user, **lrn.weights(user)}

    @app.post("/learning/reset", tags=["learning"], responses=ERRORS,
              dependencies=[Depends(mutating)])  # fmt: skip
    def learning_reset(body: ResetBody | None = None) -> dict[str, Any]:
        """Reset learned weights and affinities (one listener or all): durable decisions.
        Needs ``--writable`` and the bearer token."""
        user = body.user if body is not None else None
        lrn = learning.get()
        if user is not None and user not in lrn.user_weight:
            raise ServiceError(404, f"no learned weight for user {user!r}", "user")
        decisions = lrn.reset(user_id=user)
        return {"reset": user or "all", "decisions": len(decisions)}

    # -------------------------------------------------------------- self-tuning
    def attached() -> Tuning:
        if tuning is None:
            raise ServiceError(503, "self-tuning is not attached to this service (it was "
                               "started with --no-tuning)")  # fmt: skip
        return tuning

    def tuner_status() -> dict[str, Any]:
        t = attached()
        if store.readonly:  # follow the writer's decisions (a few records: cheap)
            t.tuner.refresh()
        return {**t.tuner.status(), "memory": t.monitor.status()}

    @app.get("/tuning/status", tags=["tuning"], responses=ERRORS)
    def tuning_status() -> dict[str, Any]:
        """Enabled, strategy, recall floor, the knobs in force, the change awaiting its
        judgement, and the resource monitor's memory level (``tuner.status()``)."""
        return tuner_status()

    @app.post("/tuning/enable", tags=["tuning"], responses=ERRORS,
              dependencies=[Depends(mutating)])  # fmt: skip
    def tuning_enable() -> dict[str, Any]:
        """Turn background tuning on (a durable decision); the status after it. Needs
        ``--writable`` and the bearer token."""
        attached().tuner.enable()
        return tuner_status()

    @app.post("/tuning/disable", tags=["tuning"], responses=ERRORS,
              dependencies=[Depends(mutating)])  # fmt: skip
    def tuning_disable() -> dict[str, Any]:
        """Turn background tuning off (a durable decision); the status after it. Needs
        ``--writable`` and the bearer token."""
        attached().tuner.disable()
        return tuner_status()

    @app.get("/tuning/history", tags=["tuning"], responses=ERRORS)
    def tuning_history(
        limit: Annotated[int, Query(ge=1, le=100_000, description="The newest this many.")] = 1000,
    ) -> dict[str, Any]:  # fmt: skip
        """The tuner's decisions, oldest first (``tuner.history()``): the newest ``limit``."""
        history = attached().tuner.history()
        return {"total": len(history), "decisions": history[-limit:]}

    return app


SIMILAR_GET_PARAMETERS: list[dict[str, Any]] = [
    {"name": "track_id", "in": "path", "required": True, "schema": {"type": "string"},
     "description": "The track whose neighbours are wanted."},
    {"name": "k", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10},
     "description": "How many neighbours."},
    {"name": "where", "in": "query", "required": False,
     "schema": {"type": "array", "items": {"type": "string"}},
     "description": 'A JSON object, or key=value items: where=metadata.artist="A"'},
    {"name": "precomputed", "in": "query", "required": False,
     "schema": {"type": "boolean", "default": False},
     "description": "Answer from the neighbour lists of the last build (faster, older)."},
]  # fmt: skip
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _int_param(raw: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ServiceError(422, f"{name}: Input should be a valid integer", name) from None
    if not lo <= value <= hi:
        raise ServiceError(422, f"{name}: Input should be in [{lo}, {hi}]", name)
    return value


def _bool_param(raw: str | None, name: str) -> bool:
    if raw is None:
        return False
    low = raw.lower()
    if low in _TRUE or low in _FALSE:
        return low in _TRUE
    raise ServiceError(422, f"{name}: Input should be a valid boolean", name)


def _json(doc: dict[str, Any]) -> Response:
    return Response(json.dumps(doc, separators=(",", ":")), media_type="application/json")


def _neighbor(n: Neighbor) -> dict[str, Any]:
    return {"track_id": n.track_id, "score": n.score, "record_id": n.record_id,
            "metadata": n.metadata, "build_id": n.build_id}  # fmt: skip


def _record_field(exc: Exception) -> str | None:
    """The field an InvalidRecordError names, when it carries one."""
    field = getattr(exc, "field", None)
    if isinstance(field, str):
        return field
    loc = getattr(exc, "loc", None)
    if isinstance(loc, tuple | list) and loc:
        return ".".join(str(p) for p in loc)
    return None

