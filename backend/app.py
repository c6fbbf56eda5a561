"""HTTP face of boxloop: Label Studio's ML-backend protocol plus an admin surface.

Routes parse requests, pick status codes and call :class:`BoxloopService`; no
algorithm lives here. Every error is JSON ``{"error": ...}`` naming the problem,
and a bad request never takes the server down.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from backend import __version__
from backend.queueing import order_request
from backend.service import BoxloopService, ServiceError
from backend.settings import Settings, get_settings

log = logging.getLogger(__name__)


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    project: int | str = Field(..., description="Project id, or Label Studio's 'id.timestamp'.")
    schema_: str = Field(..., alias="schema", description="The project's label config XML.")
    hostname: str | None = None
    access_token: str | None = None


class SetupResponse(BaseModel):
    model_version: str


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tasks: list[Any] = Field(..., description="Label Studio tasks ({id, data: {image: ...}}).")
    project: int | str | None = None
    label_config: str | None = None


class OrderBody(BaseModel):
    strategy: str | None = Field(
        None,
        description="random | similar | dissimilar | temporal (default BOXLOOP_ORDER_STRATEGY)",
    )
    extractor: str | None = Field(
        None, description="imgnet_effnet_lite0 | simnet | ... (default BOXLOOP_FEATURE_EXTRACTOR)"
    )
    batch_size: int | None = None
    seed: int | None = None
    n_seed: int = 1
    start: str = Field("labeled", description="labeled (start from labeled tasks) | random")
    pca_dim: int | None = None
    temporal_field: str | None = None
    simnet_epochs: int = 25
    push: bool = True
    uncertainty_scores: bool = False


class TrainRequest(BaseModel):
    project: int = Field(..., description="Label Studio project id.")


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


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


def create_app(settings: Settings | None = None, service: BoxloopService | None = None) -> FastAPI:
    """Build the FastAPI app. The service starts (scheduler, reconcile) with the app."""
    settings = settings or get_settings()
    svc = service or BoxloopService(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        svc.start()
        try:
            yield
        finally:
            svc.close()

    app = FastAPI(
        title="boxloop",
        version=__version__,
        description="Label Studio ML backend for object detection: pre-annotation, queue "
        "ordering and background retraining.",
        lifespan=lifespan,
    )
    app.state.service = svc

    @app.middleware("http")
    async def authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if not _credentials_ok(settings, request.headers.get("authorization")):
            return JSONResponse(
                {"error": "authentication required (basic auth or bearer token)"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="boxloop"'},
            )
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status_code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            return _error(400, f"malformed JSON body: {detail.get('ctx', {}).get('error', '')}")
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in errors
        ]
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health", tags=["protocol"])
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": "boxloop", "version": __version__}

    @app.post("/setup", tags=["protocol"], response_model=SetupResponse)
    def setup(body: SetupRequest) -> SetupResponse:
        version = svc.setup(body.project, body.schema_, body.hostname, body.access_token)
        return SetupResponse(model_version=version)

    @app.post("/predict", tags=["protocol"])
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

    @app.post("/webhook", tags=["protocol"])
    def webhook(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        started = time.perf_counter()
        outcome = svc.handle_webhook(payload)
        out = outcome.to_json()
        out["ms"] = round(1000 * (time.perf_counter() - started), 2)
        return out

    @app.get("/status", tags=["admin"])
    def status() -> dict[str, Any]:
        return svc.status()

    @app.post("/train", tags=["admin"], status_code=202)
    def train(body: TrainRequest) -> dict[str, Any]:
        job_id = svc.train_now(body.project)
        return {"status": "queued", "job": job_id, "project": body.project}

    @app.post("/projects/{project_id}/order", tags=["admin"], status_code=202)
    def order(project_id: int, body: OrderBody, wait: bool = False) -> dict[str, Any]:
        """Order the project's queue (features, order, push to Label Studio).

        Runs in the background; ``?wait=true`` answers when it is done. ``GET /status`` shows it.
        """
        request = order_request(settings, **body.model_dump())
        return svc.order_project(project_id, request, wait=wait)

    @app.get("/jobs/{job_id}", tags=["admin"])
    def job(job_id: int) -> dict[str, Any]:
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

    return app
