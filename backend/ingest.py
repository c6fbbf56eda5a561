"""Turning Label Studio annotation payloads into stored annotations.

Shared by the webhook handler and by reconciliation (pulling annotations through
the SDK after missed webhooks), so both paths store exactly the same thing.
Nothing is ever dropped: an annotation whose boxes cannot be parsed (unknown
label, missing sizes) is stored raw with its ``parse_error``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.labelstudio.convert import (
    AnnotationParseError,
    LabelConfig,
    regions_to_boxes,
)
from backend.store import Store


@dataclass(frozen=True)
class IngestResult:
    annotation_id: int
    task_id: int
    revision: int
    changed: bool
    parse_error: str | None


class AnnotationPayloadError(ValueError):
    """The annotation object itself is malformed (no id, no task, result not a list)."""


def ingest_annotation(
    store: Store,
    project_id: int,
    config: LabelConfig,
    annotation: dict[str, Any],
    *,
    task: dict[str, Any] | None = None,
    source: str = "webhook",
) -> IngestResult:
    """Validate the envelope, parse boxes where possible, and commit to the store."""
    if not isinstance(annotation, dict):
        raise AnnotationPayloadError("annotation must be a JSON object")
    annotation_id = annotation.get("id")
    task_ref = annotation.get("task")
    task_id = task_ref.get("id") if isinstance(task_ref, dict) else task_ref
    if task_id is None and task is not None:
        task_id = task.get("id")
    if not isinstance(annotation_id, int) or not isinstance(task_id, int):
        raise AnnotationPayloadError("annotation needs integer 'id' and 'task' fields")
    result = annotation.get("result")
    if result is None:
        result = []
    if not isinstance(result, list):
        raise AnnotationPayloadError(f"annotation {annotation_id}: 'result' must be a list")
    if task is not None and isinstance(task.get("data"), dict):
        store.upsert_tasks(project_id, [(task_id, task["data"])])
    parse_error: str | None = None
    boxes = None
    try:
        parsed = regions_to_boxes(result, config)
        boxes = parsed if parsed.image_size != (0, 0) else None
    except AnnotationParseError as exc:
        parse_error = str(exc)
    revision, changed = store.upsert_annotation(
        project_id,
        annotation_id,
        task_id,
        result,
        boxes,
        parse_error=parse_error,
        was_cancelled=bool(annotation.get("was_cancelled", False)),
        source=source,
    )
    return IngestResult(annotation_id, task_id, revision, changed, parse_error)


def ingest_many(
    store: Store,
    project_id: int,
    config: LabelConfig,
    items: Iterable[dict[str, Any]],
    source: str,
) -> list[IngestResult]:
    return [ingest_annotation(store, project_id, config, a, source=source) for a in items]
