"""Label Studio webhooks: annotations and tasks into the store, training scheduled as due.

Nothing a webhook carries is dropped: an annotation whose boxes cannot be parsed is stored with
the reason (and skipped by training), and an envelope that is not what Label Studio sends gets a
:class:`~backend.errors.ServiceError` naming what is wrong. In a bulk event
(``ANNOTATIONS_CREATED``, ``ANNOTATIONS_DELETED``, ``TASKS_CREATED``) each item stands alone: a
malformed one is reported under ``rejected`` and the others are applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backend.errors import ServiceError
from backend.ingest import (
    MAX_ID,
    AnnotationPayloadError,
    ingest_annotation,
    label_studio_id,
    save_label_config,
    stored_label_config,
)
from backend.labelstudio.convert import LabelConfigError, parse_label_config
from backend.store import Project, Store

__all__ = ["WebhookHandler", "WebhookOutcome", "parse_project_id"]

T = TypeVar("T")


@dataclass
class WebhookOutcome:
    action: str
    stored: int = 0
    deleted: int = 0
    tasks: int = 0
    training_job: int | None = None
    warnings: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    """Items of a bulk event that could not be stored, each with why; the others are stored."""

    def to_json(self) -> dict[str, Any]:
        # an unknown action is echoed as sent; a lone surrogate in it cannot be encoded as UTF-8
        action = self.action.encode("utf-8", "backslashreplace").decode("utf-8")
        out: dict[str, Any] = {"status": "ok", "action": action}
        for key in ("stored", "deleted", "tasks"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.training_job is not None:
            out["training_job"] = self.training_job
        if self.warnings:
            out["warnings"] = self.warnings
        if self.rejected:
            out["rejected"] = self.rejected
        return out


def parse_project_id(value: Any) -> int | None:
    """Label Studio sends the project as ``7`` or ``"7.1795390608"`` (id.timestamp); None when
    it is neither, or its id is out of range (1 to :data:`~backend.ingest.MAX_ID`)."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        value = int(head) if head.isdigit() and len(head) <= 10 else None
    return label_studio_id(value) if isinstance(value, int) else None


def _task_row(task: Any) -> tuple[int, dict[str, Any] | None]:
    """``(id, data)`` of a task as TASKS_CREATED lists it (data None: not sent, the stored data
    stays); ValueError saying what is wrong."""
    if not isinstance(task, dict):
        raise ValueError("a task must be a JSON object")
    task_id = label_studio_id(task.get("id"))
    if task_id is None:
        raise ValueError(f"a task needs an integer 'id' (1 to {MAX_ID})")
    data = task.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"task {task_id}: 'data' must be a JSON object")
    return task_id, data


def _annotation_id(item: Any) -> int:
    """The id of an item of ANNOTATIONS_DELETED; ValueError saying what is wrong."""
    annotation_id = label_studio_id(item.get("id") if isinstance(item, dict) else None)
    if annotation_id is None:
        raise ValueError(f"an annotation needs an integer 'id' (1 to {MAX_ID})")
    return annotation_id


def _good_items(
    items: list[Any], parse: Callable[[Any], T], outcome: WebhookOutcome, none_done: str
) -> list[T]:
    """``parse`` of every item that parses; the others go to ``outcome.rejected`` with why (one
    bad item must not cost the batch its good ones). A 400 when items came and none parsed."""
    good: list[T] = []
    for index, item in enumerate(items):
        try:
            good.append(parse(item))
        except ValueError as exc:
            outcome.rejected.append(f"item {index}: {exc}")
    if items and not good:
        raise ServiceError(400, f"{none_done}: " + "; ".join(outcome.rejected))
    return good


class WebhookHandler:
    """Applies webhook payloads to the store; the service passes in how to schedule work."""

    def __init__(
        self,
        store: Store,
        *,
        schedule_training: Callable[[int], int | None],
        request_training: Callable[[int], int],
        tasks_created: Callable[[int, list[int]], None],
        annotation_stored: Callable[[int, int], None] | None = None,
    ) -> None:
        self.store = store
        self._schedule_training = schedule_training
        self._request_training = request_training
        self._tasks_created = tasks_created
        self._annotation_stored = annotation_stored

    def handle(self, payload: dict[str, Any]) -> WebhookOutcome:
        """Store the annotations or tasks ``payload`` carries and schedule training as due."""
        action = payload.get("action")
        if not isinstance(action, str):
            raise ServiceError(400, "webhook payload has no 'action'")
        outcome = WebhookOutcome(action)
        if action not in {
            "ANNOTATION_CREATED",
            "ANNOTATION_UPDATED",
            "ANNOTATIONS_CREATED",
            "ANNOTATIONS_DELETED",
            "START_TRAINING",
            "TASKS_CREATED",
        }:
            outcome.warnings.append(f"action {action!a:.80} is not used by boxloop")
            return outcome
        project = self._webhook_project(payload)
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            self._store_annotation(project, payload.get("annotation"), payload.get("task"), outcome)
        elif action == "ANNOTATIONS_CREATED":
            # Label Studio sends the list under "annotation" and their tasks as a "task" list;
            # "annotations" is read too, and both when both come (one was silently dropped)
            lists = [payload.get(key) for key in ("annotation", "annotations")]
            if not any(isinstance(listed, list) for listed in lists):
                raise ServiceError(400, "ANNOTATIONS_CREATED needs an 'annotation' list")
            annotations = [a for listed in lists if isinstance(listed, list) for a in listed]
            tasks = payload.get("task")
            listed = tasks if isinstance(tasks, list) else []
            by_id = {label_studio_id(t.get("id")): t for t in listed if isinstance(t, dict)}
            for index, item in enumerate(annotations):
                ref = item.get("task") if isinstance(item, dict) else None
                task_id = label_studio_id(ref.get("id") if isinstance(ref, dict) else ref)
                task = by_id.get(task_id) if task_id is not None else None
                try:
                    self._store_annotation(project, item, task, outcome)
                except ServiceError as exc:
                    # one bad item must not cost the batch's good annotations
                    outcome.rejected.append(f"item {index}: {exc.message}")
            if annotations and not outcome.stored:
                raise ServiceError(
                    400,
                    "no annotation of the batch could be stored: " + "; ".join(outcome.rejected),
                )
        elif action == "ANNOTATIONS_DELETED":
            items = payload.get("annotations")
            if not isinstance(items, list):
                raise ServiceError(400, "ANNOTATIONS_DELETED needs an 'annotations' list")
            ids = _good_items(
                items, _annotation_id, outcome, "no annotation of the batch could be deleted"
            )
            outcome.deleted = self.store.delete_annotations(project.id, ids)
        elif action == "TASKS_CREATED":
            items = payload.get("tasks")
            if not isinstance(items, list):
                raise ServiceError(400, "TASKS_CREATED needs a 'tasks' list")
            rows = _good_items(items, _task_row, outcome, "no task of the batch could be recorded")
            self.store.upsert_tasks(project.id, rows)
            outcome.tasks = len(rows)
            if rows:
                self._tasks_created(project.id, [r[0] for r in rows])
        if action == "START_TRAINING":
            outcome.training_job = self._request_training(project.id)
        elif action != "TASKS_CREATED":
            outcome.training_job = self._schedule_training(project.id)
        return outcome

    def _webhook_project(self, payload: dict[str, Any]) -> Project:
        raw = payload.get("project")
        project_id = parse_project_id(raw)
        if project_id is None:
            annotation = payload.get("annotation")
            if isinstance(annotation, dict):
                project_id = parse_project_id(annotation.get("project"))
        if project_id is None:
            raise ServiceError(400, "webhook payload names no project")
        stored = self.store.get_project(project_id)
        label_config = raw.get("label_config") if isinstance(raw, dict) else None
        if isinstance(label_config, str) and label_config.strip():
            try:
                config = parse_label_config(label_config)
            except LabelConfigError as exc:
                if stored is None:
                    raise ServiceError(422, f"project {project_id}: {exc}") from exc
            else:
                if stored is None or stored.label_config != label_config:
                    stored = save_label_config(self.store, project_id, label_config, config, None)
        if stored is None:
            raise ServiceError(
                404,
                f"project {project_id} is unknown to boxloop: connect it as an ML backend "
                "(Label Studio calls /setup) before sending webhooks",
            )
        return stored

    def _store_annotation(
        self, project: Project, annotation: Any, task: Any, outcome: WebhookOutcome
    ) -> None:
        config = stored_label_config(project)
        try:
            result = ingest_annotation(
                self.store,
                project.id,
                config,
                annotation,
                task=task if isinstance(task, dict) else None,
            )
        except AnnotationPayloadError as exc:
            raise ServiceError(400, str(exc)) from exc
        outcome.stored += 1
        if self._annotation_stored is not None and not result.parse_error:
            self._annotation_stored(project.id, result.task_id)
        if result.parse_error:
            outcome.warnings.append(
                f"annotation {result.annotation_id} stored but not usable for training: "
                f"{result.parse_error}"
            )
