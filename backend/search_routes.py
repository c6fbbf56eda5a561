"""HTTP face of search: ``POST /projects/{id}/search`` and ``.../search/index`` (parsing and
status codes only).

Kept out of ``app.py`` so that the search routes are one call there; the work happens in
:class:`backend.search_service.SearchService`. Errors are the app's JSON ``{"error": ...}``:
404 unknown project, 409 no search model (or no searchable task), 422 a bad query.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

from fastapi import Body, FastAPI, Path
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from backend.api_models import INVALID_REQUEST, IndexState, error_doc, error_docs
from backend.errors import ServiceError
from backend.images import ImageError, load_image
from backend.ingest import MAX_ID
from backend.search_page import PAGE
from backend.search_service import SearchService
from backend.service import BoxloopService

__all__ = ["SearchRequest", "add_search_routes"]


class SearchRequest(BaseModel):
    """A canvas of objects: each ``{box: {x, y, width, height} in percent, label | strokes}``."""

    model_config = ConfigDict(extra="forbid")

    objects: list[dict[str, Any]] = Field(
        min_length=1, max_length=16, description="objects: box (percent) and label or strokes"
    )
    k: int | None = Field(None, ge=1, le=10_000, description="results (BOXLOOP_SEARCH_TOP_K)")
    front: bool = Field(False, description="move the results to the front of the queue")


class SearchHit(BaseModel):
    task: int
    score: float


class SearchResponse(BaseModel):
    project: int
    results: list[SearchHit]
    model: str
    index: dict[str, Any]
    without_features: list[int]
    moved_to_front: bool


def add_search_routes(app: FastAPI, svc: BoxloopService) -> SearchService:
    """Register the search routes on ``app``; returns the service behind them."""
    search = SearchService(
        svc.settings,
        svc.store,
        image_source_for=svc.studio.image_source_of,
        push_order=svc.queue.push,
    )
    app.state.search = search

    @app.post(
        "/projects/{project_id}/search",
        tags=["admin"],
        response_model=SearchResponse,
        responses=error_docs(
            {
                404: error_doc("The project is unknown to boxloop."),
                409: error_doc("No search model, or no task with a readable image to search."),
                422: error_doc("Invalid query (the error names the field)."),
            }
        ),
    )
    def search_project(
        project_id: Annotated[int, Path(ge=1, le=MAX_ID)],
        body: Annotated[SearchRequest, Body()],
    ) -> dict[str, Any]:
        """Top-k tasks whose images hold the drawn objects in the drawn layout (docs/search.md).

        The first search of a pool computes its images' vectors (then only new tasks').
        """
        outcome = search.search(project_id, {"objects": body.objects}, k=body.k, front=body.front)
        return outcome.to_json()

    @app.post(
        "/projects/{project_id}/search/index",
        tags=["admin"],
        status_code=202,
        response_model=IndexState,
        response_model_exclude_none=True,
        responses=error_docs(
            {
                404: error_doc("The project is unknown to boxloop."),
                409: error_doc("No search model."),
            }
        ),
    )
    def index_project(project_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> dict[str, Any]:
        """Compute the search vectors of every task lacking one, and update the index, in the
        background (a job already running is left to finish). Follow it with GET."""
        return search.index_in_background(project_id)

    @app.get(
        "/projects/{project_id}/search/index",
        tags=["admin"],
        response_model=IndexState,
        response_model_exclude_none=True,
        responses={**error_docs(body=False), **INVALID_REQUEST},
    )
    def index_state(project_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> dict[str, Any]:
        """The last indexing job of the project since the server started."""
        return search.index_state(project_id)

    @app.get(
        "/search",
        tags=["admin"],
        response_class=HTMLResponse,
        responses=error_docs(body=False),
    )
    def search_page() -> HTMLResponse:
        """The search canvas: draw boxes and strokes, see the thumbnails that come back."""
        return HTMLResponse(PAGE)

    @app.get(
        "/projects/{project_id}/search/labels",
        tags=["admin"],
        responses={
            **error_docs(
                {
                    404: error_doc("The project is unknown to boxloop."),
                    409: error_doc("No search model."),
                },
                body=False,
            ),
            **INVALID_REQUEST,
        },
    )
    def search_labels(project_id: Annotated[int, Path(ge=1, le=MAX_ID)]) -> dict[str, Any]:
        """The class names a class-only object may use (the search model's)."""
        if svc.store.get_project(project_id) is None:  # as every other route of a project
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        return {"project": project_id, "labels": search.labels()}

    @app.get(
        "/projects/{project_id}/tasks/{task_id}/thumbnail",
        tags=["admin"],
        response_class=Response,
        responses={
            200: {"content": {"image/jpeg": {}}},
            **error_docs(
                {
                    404: error_doc("Unknown project or task, or the image is not found."),
                    403: error_doc("The image is on a host or folder that is not allowed."),
                    413: error_doc("The image is over BOXLOOP_MAX_IMAGE_PIXELS / _BYTES."),
                    422: error_doc("The task's image cannot be decoded."),
                    502: error_doc("The image host failed or answered something not an image."),
                },
                body=False,
            ),
            **INVALID_REQUEST,
        },
    )
    def thumbnail(
        project_id: Annotated[int, Path(ge=1, le=MAX_ID)],
        task_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    ) -> Response:
        """A task's image, at most 192 px a side, as JPEG (for the canvas page's results)."""
        project = svc.store.get_project(project_id)
        if project is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        data = svc.store.get_task_data(project_id, task_id)  # not every task's: one a thumbnail
        if data is None:
            raise ServiceError(404, f"task {task_id} of project {project_id} is unknown to boxloop")
        reference = data.get(project.image_key)
        if not isinstance(reference, str):
            raise ServiceError(404, f"task {task_id} of project {project_id} has no image")
        try:
            image = load_image(reference, svc.studio.image_source(project))
        except ImageError as exc:
            raise ServiceError(exc.status_code, exc.message) from None
        image.thumbnail((192, 192))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=85)
        return Response(out.getvalue(), media_type="image/jpeg")

    return search
