"""The HTTP API's request and response models, and the error answers each route documents.

Why a module of their own: the routes live in two places (``app.py`` and the search routes of
``search_routes.py``), and both document the same error answers and return the same records
(``/status`` shows the search index job's :class:`IndexState`). Here they are defined once,
and neither route module imports the other. The models are the spec: ``GET /openapi.json`` is
generated from them, and ``tests/integration/test_openapi_schemathesis.py`` holds the server
to it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

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

from backend.ingest import MAX_ID


def _json_integer(value: Any) -> Any:
    """JSON integers only (``20`` and ``20.0``): not ``true``, not ``"20"``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be an integer")
    return value


Id = Annotated[int, Field(ge=1, le=MAX_ID), BeforeValidator(_json_integer)]


def _digits_at_most(limit: int) -> str:
    """A regex of the decimal numbers 1 to ``limit`` (no leading zero), so that the spec's
    pattern states the id range exactly: shorter numbers, then one branch per digit of
    ``limit`` where a number may first fall below it."""
    text = str(limit)
    branches = [f"[1-9][0-9]{{0,{len(text) - 2}}}"] if len(text) > 1 else []
    for i, digit in enumerate(text):
        low = "1" if i == 0 else "0"
        if digit > low or (i == len(text) - 1 and digit >= low):
            top = str(int(digit) - (0 if i == len(text) - 1 else 1))
            if top >= low:
                rest = len(text) - i - 1
                branch = text[:i] + (f"[{low}-{top}]" if top != low else low)
                branches.append(branch + (f"[0-9]{{{rest}}}" if rest else ""))
    return "(?:" + "|".join(branches) + ")"


PROJECT_KEY_PATTERN = rf"^{_digits_at_most(MAX_ID)}(\.[0-9]{{1,20}})?$"
#: A project as Label Studio names it in /setup and /predict: ``"7"`` or ``"7.1795390608"``;
#: the id part 1 to :data:`~backend.ingest.MAX_ID`, stated by the pattern itself.
ProjectKey = Annotated[
    str,
    Field(
        pattern=PROJECT_KEY_PATTERN,
        description=f"project id (1 to {MAX_ID}), or Label Studio's 'id.timestamp'",
    ),
]


#: A URL or a token: no control characters (no URL or HTTP header holds one, and PostgreSQL's
#: text columns refuse NUL, which was a 500 from /setup).
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"

#: What each pattern above means, for a 422 a user can read (pydantic would quote the regex).
PATTERN_MEANINGS: dict[str, str] = {
    PROJECT_KEY_PATTERN: f"must be a project id from 1 to {MAX_ID}, or Label Studio's "
    "'id.timestamp' form",
    NO_CONTROL_CHARACTERS: "must not contain control characters (NUL, newline, ...)",
}

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


def error_doc(description: str, model: type[BaseModel] = ErrorResponse) -> dict[str, Any]:
    return {"model": model, "description": description}


_AUTH: dict[int | str, Any] = {
    401: error_doc(
        "Credentials missing or wrong (only when BOXLOOP_AUTH_TOKEN or BOXLOOP_BASIC_AUTH_USER "
        "is set: then every route, /openapi.json and /docs included, needs them)."
    )
}
_TOO_LARGE: dict[int | str, Any] = {
    413: error_doc("Request body over BOXLOOP_MAX_REQUEST_BYTES; refused unread.")
}
_MALFORMED: dict[int | str, Any] = {
    400: error_doc("The body is not JSON (or has an invalid Content-Length).")
}
INVALID_REQUEST: dict[int | str, Any] = {
    422: error_doc("The request does not match this spec (the error names the field).")
}


def error_docs(*extra: dict[int | str, Any], body: bool = True) -> dict[int | str, Any]:
    out: dict[int | str, Any] = {**_AUTH, **_TOO_LARGE}
    if body:
        out.update({**_MALFORMED, **INVALID_REQUEST})
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
        pattern=NO_CONTROL_CHARACTERS,
        description="Label Studio's URL as it knows itself. Used for images and API calls only "
        "when BOXLOOP_LABEL_STUDIO_URL is unset and this host is on BOXLOOP_ALLOWED_IMAGE_HOSTS.",
    )
    access_token: str | None = Field(
        None,
        pattern=NO_CONTROL_CHARACTERS,
        description="Label Studio token, used when BOXLOOP_LABEL_STUDIO_TOKEN is unset.",
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
    results: list[Prediction | list[Prediction]] = Field(
        ...,
        description="One per task, in order. A task that failed (listed under `errors`) gets an "
        "empty list: Label Studio then stores no prediction for it and asks again later, where an "
        "empty prediction of this model version would be kept as the task's pre-annotation.",
    )
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
    # Loose item types, as the bulk event's items are read: a region boxloop cannot use is
    # stored and reported there, and was a 422 that lost the annotation here.
    result: list[Any] = Field(
        ...,
        description="Label Studio regions ([] when none was drawn); ones boxloop cannot use are "
        "stored and reported.",
    )
    was_cancelled: bool | None = False


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


WEBHOOK_TAGS = {*_USED_ACTIONS.values(), "other"}

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
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    owner: str | None = Field(
        None, description="who runs it: host/pid-namespace:pid:token, the server or `boxloop train`"
    )
    heartbeat_at: datetime | None = Field(
        None, description="its owner's last sign of life (every 10 s; taken over after 2 min)"
    )


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


class IndexState(BaseModel):
    """A project's last background indexing job."""

    model_config = ConfigDict(extra="allow")
    project: int
    state: Literal["idle", "queued", "running", "done", "failed"]
    done: int | None = Field(None, description="images processed (running)")
    todo: int | None = Field(None, description="images lacking a vector when the job began")
    indexed: int | None = Field(None, description="tasks in the index (done)")
    failed: int | None = Field(None, description="tasks whose image could not be read (done)")
    error: str | None = Field(None, description="why the job failed (failed)")


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
