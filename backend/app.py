"""HTTP face of boxloop: Label Studio's ML-backend protocol plus an admin surface.

Routes parse requests, pick status codes and call :class:`BoxloopService`; no
algorithm lives here. Every error is JSON ``{"error": ...}`` naming the problem,
and a bad request never takes the server down.

The OpenAPI spec (``GET /openapi.json``, ``boxloop openapi``) is exact: request
models carry their required fields, types and bounds, and every route lists each
status it can answer. ``tests/integration/test_openapi_schemathesis.py`` holds the
server to it.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import Body, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend import __version__
from backend.box_queries import BoxQueryRequest
from backend.bulk.predict import BulkPredictRequest
from backend.ingest import MAX_ID
from backend.queueing import OrderRequest
from backend.search_routes import IndexState, add_search_routes
from backend.service import BoxloopService, ServiceError
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _json_integer(value: Any) -> Any:
    """JSON integers only (``20`` and ``20.0``): not ``true``, not ``"20"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


Id = Annotated[int, Field(ge=1, le=MAX_ID), BeforeValidator(_json_integer)]
#: A project as Label Studio names it in /setup and /predict: ``"7"`` or ``"7.1795390608"``.
ProjectKey = Annotated[
    str,
    Field(
        pattern=r"^[1-9][0-9]{0,14}(\.[0-9]{1,20})?$",
        description="project id, or Label Studio's 'id.timestamp'",
    ),
]
#: A label config: XML with a <RectangleLabels> control on an <Image>.
LabelConfigXml = Annotated[
    str,
    Field(
        min_length=1,
        description="The project's label config XML; it needs a <RectangleLabels> control "
        "on an <Image> (else 422).",
        json_schema_extra={"format": "label-config"},
    ),
]


# ---------------------------------------------------------------------------------- errors
class ErrorResponse(BaseModel):
    error: str = Field(..., description="What is wrong, in words a user can act on.")


class TaskError(BaseModel):
    task: int | None = Field(..., description="The task's id (null if it had none).")
    status: int = Field(..., description="The status this task alone would get.")
    error: str


class PredictErrorResponse(ErrorResponse):
    errors: list[TaskError] = Field(
        default_factory=list,
        description="When every task failed: one entry per task (absent for a bad request).",
    )


def _err(description: str, model: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    return {"model": model, "description": description}


_AUTH: dict[int | str, Any] = {
    401: _err(
        "Credentials missing or wrong (only when BOXLOOP_AUTH_TOKEN or BOXLOOP_BASIC_AUTH_USER "
        "is set: then every route, /openapi.json and /docs included, needs them)."
    )
}
_TOO_LARGE: dict[int | str, Any] = {
    413: _err("Request body over BOXLOOP_MAX_REQUEST_BYTES; refused unread.")
}
_MALFORMED: dict[int | str, Any] = {
    400: _err("The body is not JSON (or has an invalid Content-Length).")
}
_INVALID: dict[int | str, Any] = {
    422: _err("The request does not match this spec (the error names the field).")
}


def _responses(*extra: dict[int | str, Any], body: bool = True) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {**_AUTH, **_TOO_LARGE}
    if body:
        out.update({**_MALFORMED, **_INVALID})
    for item in extra:
        out.update(item)
    return out


# ---------------------------------------------------------------------------------- /setup
class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    project: Id | ProjectKey = Field(
        ..., description="Project id, or Label Studio's 'id.timestamp'."
    )
    schema_: LabelConfigXml = Field(..., alias="schema")
    hostname: str | None = Field(
        None,
        description="Label Studio's URL as it knows itself. Used for images and API calls only "
        "when BOXLOOP_LABEL_STUDIO_URL is unset and this host is on BOXLOOP_ALLOWED_IMAGE_HOSTS.",
    )
    access_token: str | None = Field(
        None, description="Label Studio token, used when BOXLOOP_LABEL_STUDIO_TOKEN is unset."
    )


class SetupResponse(BaseModel):
    model_version: str


# ---------------------------------------------------------------------------------- /predict
class PredictTask(BaseModel):
    """A Label Studio task (more fields allowed: Label Studio sends its whole task)."""

    model_config = ConfigDict(extra="allow")
    id: Id
    data: dict[str, Any] = Field(
        ..., description="Task data; the image is under the key the label config's <Image> names."
    )


_TASKS_SCHEMA = {
    "type": "array",
    "items": PredictTask.model_json_schema(),
    "description": "Label Studio tasks. A task that cannot be served (not an object, no "
    "image, an image that cannot be fetched or decoded) fails alone: an empty result and an "
    "entry in 'errors'.",
}


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        # a label config, or a project whose stored one serves
        json_schema_extra={
            "anyOf": [
                {"required": [key], "properties": {key: {"not": {"type": "null"}}}}
                for key in ("label_config", "project")
            ]
        },
    )
    tasks: Annotated[list[Any], WithJsonSchema(_TASKS_SCHEMA)]
    project: Id | ProjectKey | None = Field(
        None, description="The project; its stored label config serves without label_config."
    )
    label_config: LabelConfigXml | None = None


class Region(BaseModel):
    model_config = ConfigDict(extra="allow")
    from_name: str
    to_name: str
    type: Literal["rectanglelabels"]
    original_width: int
    original_height: int
    value: dict[str, Any] = Field(
        ..., description="x, y, width, height (percent), rotation, rectanglelabels"
    )
    score: float | None = None


class Prediction(BaseModel):
    result: list[Region]
    score: float
    model_version: str
    meta: dict[str, Any] | None = Field(
        None, description="With image utility on: utility (0-1) and low_utility (docs/utility.md)."
    )


class PredictResponse(BaseModel):
    results: list[Prediction] = Field(..., description="One per task, in order.")
    model_version: str | None
    errors: list[TaskError] = Field(
        default_factory=list, description="Present when some tasks failed (each failed alone)."
    )


# ---------------------------------------------------------------------------------- /webhook
class ProjectObject(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id
    label_config: LabelConfigXml | None = None


ProjectRef = Annotated[
    Id | ProjectKey | ProjectObject,
    Field(description="Label Studio's project object (or its id)."),
]


class TaskRef(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id


class WebhookTask(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id
    data: dict[str, Any] | None = None


class WebhookAnnotation(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id
    task: Id | TaskRef
    result: list[dict[str, Any]] | None = Field(
        None, description="Label Studio regions; ones boxloop cannot use are stored and reported."
    )
    was_cancelled: bool = False


class AnnotationId(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Id


class AnnotationEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: Literal["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
    project: ProjectRef
    annotation: WebhookAnnotation
    task: WebhookTask | None = None


_BULK_ITEMS = (
    "Annotations as in ANNOTATION_CREATED. Each is checked alone: one that is not an annotation "
    "is listed under `rejected` in the answer and the others are stored (400 only when none is)."
)


def _array_of(model: type[BaseModel]) -> WithJsonSchema:
    """The spec shows a list of ``model``, while the server takes the items one by one: the
    webhook handler keeps the good items of a batch and names the bad ones."""
    items = {"$ref": f"#/components/schemas/{model.__name__}"}
    return WithJsonSchema({"type": "array", "items": items})


BulkAnnotations = Annotated[list[Any], _array_of(WebhookAnnotation)]
BulkTasks = Annotated[list[Any], _array_of(WebhookTask)]
BulkAnnotationIds = Annotated[list[Any], _array_of(AnnotationId)]
_BULK_DELETED = (
    "Each item is checked alone: one without an integer id is listed under `rejected` and the "
    "others are deleted (400 only when none is)."
)
_BULK_TASKS = (
    "Each task is checked alone: one without an integer id or with non-object data is listed "
    "under `rejected` and the others are recorded (400 only when none is)."
)


class AnnotationsCreatedEvent(BaseModel):
    """Label Studio sends the annotations as an ``annotation`` list and their tasks as a
    ``task`` list; ``annotations`` is accepted too."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "anyOf": [
                {"required": [key], "properties": {key: {"type": "array"}}}
                for key in ("annotation", "annotations")
            ]
        },
    )
    action: Literal["ANNOTATIONS_CREATED"]
    project: ProjectRef
    annotation: BulkAnnotations | None = Field(None, description=_BULK_ITEMS)
    annotations: BulkAnnotations | None = Field(None, description=_BULK_ITEMS)
    task: BulkTasks | None = None

    @model_validator(mode="after")
    def _has_annotations(self) -> AnnotationsCreatedEvent:
        if self.annotation is None and self.annotations is None:
            raise ValueError("ANNOTATIONS_CREATED needs an 'annotation' list")
        return self


class AnnotationsDeletedEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: Literal["ANNOTATIONS_DELETED"]
    project: ProjectRef
    annotations: BulkAnnotationIds = Field(..., description=_BULK_DELETED)


class StartTrainingEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: Literal["START_TRAINING"]
    project: ProjectRef


class TasksCreatedEvent(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: Literal["TASKS_CREATED"]
    project: ProjectRef
    tasks: BulkTasks = Field(..., description=_BULK_TASKS)


_USED_ACTIONS: dict[str, str] = {
    "ANNOTATION_CREATED": "annotation",
    "ANNOTATION_UPDATED": "annotation",
    "ANNOTATIONS_CREATED": "annotations_created",
    "ANNOTATIONS_DELETED": "annotations_deleted",
    "START_TRAINING": "start_training",
    "TASKS_CREATED": "tasks_created",
}


class OtherEvent(BaseModel):
    """Any other Label Studio event: acknowledged, not used."""

    model_config = ConfigDict(extra="allow")
    action: str = Field(..., json_schema_extra={"not": {"enum": list(_USED_ACTIONS)}})


def _webhook_kind(value: Any) -> str:
    action = value.get("action") if isinstance(value, dict) else getattr(value, "action", None)
    return _USED_ACTIONS.get(action, "other") if isinstance(action, str) else "other"


_WEBHOOK_TAGS = {*_USED_ACTIONS.values(), "other"}

WebhookPayload = Annotated[
    Annotated[AnnotationEvent, Tag("annotation")]
    | Annotated[AnnotationsCreatedEvent, Tag("annotations_created")]
    | Annotated[AnnotationsDeletedEvent, Tag("annotations_deleted")]
    | Annotated[StartTrainingEvent, Tag("start_training")]
    | Annotated[TasksCreatedEvent, Tag("tasks_created")]
    | Annotated[OtherEvent, Tag("other")],
    Discriminator(_webhook_kind),
]


class WebhookResponse(BaseModel):
    status: Literal["ok"]
    action: str
    stored: int | None = Field(None, description="annotations stored")
    deleted: int | None = Field(None, description="annotations marked deleted")
    tasks: int | None = Field(None, description="tasks recorded")
    training_job: int | None = Field(None, description="the training job queued, if any")
    warnings: list[str] | None = None
    rejected: list[str] | None = Field(
        None, description="items of a bulk event not stored, each with why (the rest are)"
    )
    ms: float = Field(..., description="time spent handling the event")


# ---------------------------------------------------------------------------------- admin
class TrainRequest(BaseModel):
    project: Id = Field(..., description="Label Studio project id.")


class TrainResponse(BaseModel):
    status: Literal["queued"]
    job: int
    project: int


class HealthResponse(BaseModel):
    status: Literal["UP"]
    model_class: str
    version: str


class JobResponse(BaseModel):
    id: int
    project: int
    status: str = Field(..., description="queued | running | succeeded | failed | interrupted")
    reason: str | None
    progress: float | None
    message: str | None
    error: str | None
    model_version: str | None


class JobRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    status: str
    reason: str | None
    progress: float | None
    message: str | None
    error: str | None
    model_version: str | None


class VersionRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    version: str
    created_at: str
    n_images: int | None
    n_annotations: int | None


class QueueRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    strategy: str
    params: dict[str, Any]
    tasks: int
    view_id: int | None
    updated_at: str


class ProjectStatus(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int
    labels: list[str]
    serving_version: str
    model_versions: list[VersionRow]
    annotations: dict[str, int]
    new_annotations_since_training: int
    train_after_new_annotations: int
    training_jobs: list[JobRow]
    queue: QueueRow | None
    search_index: IndexState = Field(..., description="the last background search index job")


class StatusResponse(BaseModel):
    projects: list[ProjectStatus]


class OrderState(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: Literal["queued", "running", "done", "failed"]
    strategy: str
    error: str | None = Field(None, description="why it failed (state failed)")


# ---------------------------------------------------------------------------------- plumbing
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
        return hmac.compare_digest(value.strip(), settings.auth_token.get_secret_value())
    if settings.basic_auth_user is not None and scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        expected = (
            settings.basic_auth_password.get_secret_value() if settings.basic_auth_password else ""
        )
        return hmac.compare_digest(user, settings.basic_auth_user) and hmac.compare_digest(
            password, expected
        )
    return False


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
        return JSONResponse(
            {"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

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
                if loc and loc[0] in _WEBHOOK_TAGS:  # the union member's tag names no field
                    loc = loc[1:]
            parts.append(f"{'.'.join(str(p) for p in loc) or 'body'}: {e.get('msg')}")
        return _error(422, "invalid request: " + "; ".join(dict.fromkeys(parts)))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get(
        "/health",
        tags=["protocol"],
        response_model=None,
        responses={200: {"model": HealthResponse}, **_responses(body=False)},
    )
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "boxloop", "version": __version__}

    @app.post(
        "/setup",
        tags=["protocol"],
        response_model=SetupResponse,
        responses=_responses(
            {
                422: _err(
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
            **_responses(
                {
                    403: _err(
                        "Every task failed; the worst: an image from a host or folder "
                        "that is not allowed.",
                        PredictErrorResponse,
                    ),
                    404: _err(
                        "The project is unknown and there is no label_config, or every "
                        "task failed, the worst: an image not found.",
                        PredictErrorResponse,
                    ),
                    413: _err(
                        "Request body over BOXLOOP_MAX_REQUEST_BYTES, or every task failed, "
                        "the worst: an image over BOXLOOP_MAX_IMAGE_PIXELS (decompression "
                        "bombs included).",
                        PredictErrorResponse,
                    ),
                    422: _err(
                        "Invalid request, a bad label config, or every task failed, the "
                        "worst: no image in the task or an undecodable one.",
                        PredictErrorResponse,
                    ),
                    502: _err(
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
            "results": [p.to_json() for p in predictions],
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
            **_responses(
                {
                    404: _err("The event's project is unknown to boxloop (no /setup yet)."),
                    422: _err(
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
        responses={200: {"model": StatusResponse}, **_responses(body=False)},
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
            **_responses({404: _err("The project is unknown to boxloop.")}),
        },
    )
    def train(body: TrainRequest) -> dict[str, Any]:
        job_id = svc.train_now(body.project)
        return {"status": "queued", "job": job_id, "project": body.project}

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
            **_responses({404: _err("The project is unknown to boxloop.")}),
        },
    )(order)

    @app.post(
        "/projects/{project_id}/bulk-predict",
        tags=["admin"],
        status_code=202,
        response_model=None,
        responses={
            202: {"description": "The run's state (its report with ?wait=true); see /status."},
            **_responses(
                {
                    404: _err("The project is unknown to boxloop."),
                    409: _err(
                        "No model pre-annotates the project, no Label Studio access, a run is "
                        "already going, or Ray was asked for without BOXLOOP_RAY_ADDRESS."
                    ),
                    422: _err("Invalid options."),
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
            **_responses(
                {
                    404: _err("The project is unknown to boxloop."),
                    409: _err("No YOLOX model to query with yet (fetch the COCO model or train)."),
                    422: _err("Invalid settings."),
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
            **_responses({404: _err("No such training job.")}, body=False),
            **_INVALID,
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
