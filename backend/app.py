"""HTTP face of boxloop: Label Studio's ML-backend protocol plus an admin surface.

Routes parse requests, pick status codes and call :class:`BoxloopService`; no
algorithm lives here. Every error is JSON ``{"error": ...}`` naming the problem,
and a bad request never takes the server down.

The OpenAPI spec (``GET /openapi.json``, ``boxloop openapi``) is exact: request
models (:mod:`backend.api_models`) carry their required fields, types and bounds,
and every route lists each status it can answer.
``tests/integration/test_openapi_schemathesis.py`` holds the server to it, on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import __version__, api_models
from backend.api_models import (
    INVALID_REQUEST,
    PATTERN_MEANINGS,
    WEBHOOK_TAGS,
    HealthResponse,
    JobResponse,
    OrderState,
    PredictErrorResponse,
    PredictRequest,
    PredictResponse,
    SetupRequest,
    SetupResponse,
    StatusResponse,
    TrainRequest,
    TrainResponse,
    WebhookPayload,
    WebhookResponse,
    error_doc,
    error_docs,
)
from backend.box_queries import BoxQueryRequest
from backend.bulk.predict import BulkPredictRequest
from backend.ingest import MAX_ID
from backend.queueing import OrderRequest
from backend.search_routes import add_search_routes
from backend.service import BoxloopService, ServiceError
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)

#: How pydantic names a union member in an error's location: ``constrained-str``, ``int``,
#: ``function-before[_json_integer(), constrained-int]``.
_UNION_MEMBER = re.compile(r"^((constrained-)?(str|int|float|bool)|[\w-]+\[.*\])$")


#: The request models' class names: pydantic puts the union member's (``ProjectObject``) in an
#: error's location, where it reads as a field of the payload.
_MODEL_NAMES = frozenset(
    name
    for name, value in vars(api_models).items()
    if isinstance(value, type) and issubclass(value, BaseModel)
)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


class RequestBodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body over the limit of {limit} bytes (BOXLOOP_MAX_REQUEST_BYTES); "
            "send fewer tasks per request",
        )


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413, before reading them.

    A ``Content-Length`` over the limit is answered at once: no byte of the body is read and the
    app is not called. A body without one (chunked) is counted as the app reads it and refused
    at the first chunk that crosses the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _error(400, "invalid Content-Length header")(scope, receive, send)
                return
            if length > self.max_bytes:
                too_large = RequestBodyTooLarge(self.max_bytes)
                await _error(413, too_large.detail)(scope, receive, send)
                return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise RequestBodyTooLarge(self.max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except RequestBodyTooLarge as exc:  # read outside FastAPI's own handling
            if started:
                raise
            await _error(413, exc.detail)(scope, receive, send)


def _credentials_ok(settings: Settings, header: str | None) -> bool:
    if settings.auth_token is None and settings.basic_auth_user is None:
        return True
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if settings.auth_token is not None and scheme.lower() == "bearer":
        return _same(value.strip(), settings.auth_token.get_secret_value())
    if settings.basic_auth_user is not None and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        expected = (
            settings.basic_auth_password.get_secret_value() if settings.basic_auth_password else ""
        )
        same_user = _same(user, settings.basic_auth_user)
        return _same(password, expected) and same_user  # both compared: no early answer
    return False


def _same(given: str, expected: str) -> bool:
    """A constant-time comparison of UTF-8 bytes: ``compare_digest`` refuses non-ASCII ``str``
    with a TypeError (a header holding "é" was a 500, and a non-ASCII password never matched)."""
    encode = lambda text: text.encode("utf-8", "surrogateescape")  # noqa: E731
    return hmac.compare_digest(encode(given), encode(expected))


class Authenticate:
    """Every request needs the configured credentials (none configured: open).

    Pure ASGI, so nothing of the request is read before the check and errors raised while the
    app reads the body (a body over the limit) reach the app's handlers unwrapped.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if not _credentials_ok(self.settings, header.decode("latin-1") if header else None):
                refused = JSONResponse(
                    {"error": "authentication required (basic auth or bearer token)"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="boxloop"'},
                )
                await refused(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _security_schemes(settings: Settings) -> dict[str, Any]:
    schemes: dict[str, Any] = {}
    if settings.auth_token is not None:
        schemes["bearerAuth"] = {"type": "http", "scheme": "bearer"}
    if settings.basic_auth_user is not None:
        schemes["basicAuth"] = {"type": "http", "scheme": "basic"}
    return schemes


def create_app(settings: Settings | None = None, service: BoxloopService | None = None) -> FastAPI:
    """Build the FastAPI app. The service starts (scheduler, reconcile) with the app."""
    settings = settings or get_settings()
    svc = service or BoxloopService(settings)
    # one typed order request for HTTP and the CLI, its defaults from this server's settings
    order_model = OrderRequest.for_settings(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        search = _app.state.search
        svc.on_tasks_created.append(search.tasks_created)  # before start: reconcile calls it
        svc.start()
        try:
            yield
        finally:
            svc.on_tasks_created.remove(search.tasks_created)
            search.close()
            svc.close()

    description = (
        "Label Studio ML backend for object detection: pre-annotation, queue ordering and "
        'background retraining. Every error is JSON {"error": ...}.'
    )
    app = FastAPI(title="boxloop", version=__version__, description=description, lifespan=lifespan)
    app.state.service = svc

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(
                title=app.title, version=app.version, description=description, routes=app.routes
            )
            schemes = _security_schemes(settings)
            if schemes:
                spec.setdefault("components", {})["securitySchemes"] = schemes
                spec["security"] = [{name: []} for name in schemes]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    app.add_middleware(Authenticate, settings=settings)
    # outermost: an oversized body is refused before authentication or anything else reads it
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status_code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if detail == "There was an error parsing the body":  # FastAPI's words for bad UTF-8
            detail = "the request body cannot be read as JSON (is it UTF-8?)"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            return _error(400, f"malformed JSON body: {detail.get('ctx', {}).get('error', '')}")
        parts = []
        for e in errors:
            loc = list(e.get("loc", ()))
            if loc[:1] == ["body"]:
                loc = loc[1:]
                if loc and loc[0] in WEBHOOK_TAGS:  # the union member's tag names no field
                    loc = loc[1:]
            # nor does a union member's type or validator chain (``constrained-str``, ``...[...]``)
            loc = [
                p
                for p in loc
                if not (isinstance(p, str) and (_UNION_MEMBER.match(p) or p in _MODEL_NAMES))
            ]
            message = e.get("msg")
            if e.get("type") == "string_pattern_mismatch":
                message = PATTERN_MEANINGS.get(e.get("ctx", {}).get("pattern"), message)
            parts.append(f"{'.'.join(str(p) for p in loc) or 'body'}: {message}")
        return _error(422, "invalid request: " + "; ".join(dict.fromkeys(parts)))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get(
        "/health",
        tags=["protocol"],
        response_model=None,
        responses={200: {"model": HealthResponse}, **error_docs(body=False)},
    )
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "boxloop", "version": __version__}

    @app.post(
        "/setup",
        tags=["protocol"],
        response_model=SetupResponse,
        responses=error_docs(
            {
                422: error_doc(
                    "Invalid request, or a label config without <RectangleLabels> on an <Image>."
                )
            }
        ),
    )
    def setup(body: SetupRequest) -> SetupResponse:
        version = svc.setup(body.project, body.schema_, body.hostname, body.access_token)
        return SetupResponse(model_version=version)

    @app.post(
        "/predict",
        tags=["protocol"],
        response_model=None,
        responses={
            200: {
                "model": PredictResponse,
                "description": "Predictions; tasks that failed alone are listed in 'errors'.",
            },
            **error_docs(
                {
                    403: error_doc(
                        "Every task failed; the worst: an image from a host or folder "
                        "that is not allowed.",
                        PredictErrorResponse,
                    ),
                    404: error_doc(
                        "The project is unknown and there is no label_config, or every "
                        "task failed, the worst: an image not found.",
                        PredictErrorResponse,
                    ),
                    413: error_doc(
                        "Request body over BOXLOOP_MAX_REQUEST_BYTES, or every task failed, "
                        "the worst: an image over BOXLOOP_MAX_IMAGE_PIXELS (decompression "
                        "bombs included).",
                        PredictErrorResponse,
                    ),
                    422: error_doc(
                        "Invalid request, a bad label config, or every task failed, the "
                        "worst: no image in the task or an undecodable one.",
                        PredictErrorResponse,
                    ),
                    502: error_doc(
                        "Every task failed, the worst: the image host (Label Studio) "
                        "failed or answered something that is not an image.",
                        PredictErrorResponse,
                    ),
                }
            ),
        },
    )
    def predict(body: PredictRequest) -> JSONResponse:
        predictions = svc.predict(body.tasks, body.label_config, body.project)
        failed = [p for p in predictions if p.error is not None]
        errors = [{"task": p.task_id, "status": p.status_code, "error": p.error} for p in failed]
        if predictions and len(failed) == len(predictions):
            worst = max(p.status_code for p in failed)
            return _error(worst, str(failed[0].error), errors=errors)
        version = predictions[0].model_version if predictions else None
        content: dict[str, Any] = {
            # a failed task gets no prediction ([]), not an empty one of this version: Label
            # Studio keeps that and never asks for the task again at this version
            "results": [[] if p.error is not None else p.to_json() for p in predictions],
            "model_version": version,
        }
        if errors:
            content["errors"] = errors
        return JSONResponse(content)

    @app.post(
        "/webhook",
        tags=["protocol"],
        response_model=None,
        responses={
            200: {"model": WebhookResponse},
            **error_docs(
                {
                    404: error_doc("The event's project is unknown to boxloop (no /setup yet)."),
                    422: error_doc(
                        "Invalid event, or an unknown project whose label config "
                        "boxloop cannot use."
                    ),
                }
            ),
        },
    )
    def webhook(payload: Annotated[WebhookPayload, Body()]) -> dict[str, Any]:
        started = time.perf_counter()
        outcome = svc.handle_webhook(payload.model_dump(by_alias=True, exclude_unset=True))
        out = outcome.to_json()
        out["ms"] = round(1000 * (time.perf_counter() - started), 2)
        return out

    @app.get(
        "/status",
        tags=["admin"],
        response_model=None,
        responses={200: {"model": StatusResponse}, **error_docs(body=False)},
    )
    def status() -> dict[str, Any]:
        out = svc.status()
        for project in out["projects"]:  # the search routes' state, beside the service's
            project["search_index"] = app.state.search.index_state(project["id"])
        return out

    @app.post(
        "/train",
        tags=["admin"],
        status_code=202,
        response_model=None,
        responses={
            202: {"model": TrainResponse, "description": "Training queued."},
            **error_docs({404: error_doc("The project is unknown to boxloop.")}),
        },
    )
    def train(body: TrainRequest) -> dict[str, Any]:
        job = svc.train_now(body.project)
        return {"status": "queued", "job": job.id, "project": body.project}

    def order(
        project_id: Annotated[int, Path(ge=1, le=MAX_ID)],
        body: Any = None,
        wait: Annotated[bool, Query(description="answer when the order is done")] = False,
    ) -> dict[str, Any]:
        """Order the project's queue (features, order, push to Label Studio).

        Runs in the background; ``?wait=true`` answers when it is done. ``GET /status`` shows it.
        Fields left out take this server's settings (``BOXLOOP_ORDER_*``), as ``boxloop order``.
        """
        request = body if body is not None else order_model()
        return svc.order_project(project_id, request, wait=wait)

    # the body's class is built from this server's settings, so it is set here, not in the source
    order.__annotations__["body"] = Annotated[order_model | None, Body()]
    app.post(
        "/projects/{project_id}/order",
        tags=["admin"],
        status_code=202,
        response_model=None,
        responses={
            202: {"model": OrderState, "description": "The ordering job's state."},
            **error_docs({404: error_doc("The project is unknown to boxloop.")}),
        },
    )(order)

    @app.post(
        "/projects/{project_id}/bulk-predict",
        tags=["admin"],
        status_code=202,
        response_model=None,
        responses={
            202: {"description": "The run's state (its report with ?wait=true); see /status."},
            **error_docs(
                {
                    404: error_doc("The project is unknown to boxloop."),
                    409: error_doc(
                        "No model pre-annotates the project, no Label Studio access, a run is "
                        "already going, or Ray was asked for without BOXLOOP_RAY_ADDRESS."
                    ),
                    422: error_doc("Invalid options."),
                }
            ),
        },
    )
    def bulk_predict(
        project_id: Annotated[int, Path(ge=1, le=MAX_ID)],
        body: Annotated[BulkPredictRequest | None, Body()] = None,
        wait: Annotated[bool, Query(description="answer when the run is done")] = False,
    ) -> dict[str, Any]:
        """Pre-annotate every task that has no prediction of the serving version, pushing
        predictions to Label Studio in batches (resumable; progress in /status)."""
        return svc.run_bulk_predict(project_id, body or BulkPredictRequest(), wait=wait)

    @app.post(
        "/projects/{project_id}/box-queries",
        tags=["admin"],
        status_code=202,
        response_model=None,
        responses={
            202: {"description": "The episode's state (the episode itself with ?wait=true)."},
            **error_docs(
                {
                    404: error_doc("The project is unknown to boxloop."),
                    409: error_doc(
                        "No YOLOX model to query with yet (fetch the COCO model or train)."
                    ),
                    422: error_doc("Invalid settings."),
                }
            ),
        },
    )
    def box_queries(
        project_id: Annotated[int, Path(ge=1, le=MAX_ID)],
        body: Annotated[BoxQueryRequest | None, Body()] = None,
        wait: Annotated[bool, Query(description="answer when the episode is done")] = False,
    ) -> dict[str, Any]:
        """A box-level active-learning episode: query the K most informative predicted boxes,
        pre-annotate their tasks with the queried boxes marked, and order the queue by them."""
        return svc.run_box_queries(project_id, body or BoxQueryRequest(), wait=wait)

    @app.get(
        "/jobs/{job_id}",
        tags=["admin"],
        response_model=None,
        responses={
            200: {"model": JobResponse},
            **error_docs({404: error_doc("No such training job.")}, body=False),
            **INVALID_REQUEST,
        },
    )
    def job(job_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> dict[str, Any]:
        record = svc.store.get_job(job_id)
        if record is None:
            raise ServiceError(404, f"no training job {job_id}")
        return {
            "id": record.id,
            "project": record.project_id,
            "status": record.status,
            "reason": record.reason,
            "progress": record.progress,
            "message": record.message,
            "error": record.error,
            "model_version": record.model_version,
        }

    add_search_routes(app, svc)  # POST /projects/{id}/search (docs/search.md)
    return app
