"""Turning Label Studio annotation payloads into stored annotations.

Shared by the webhook handler and by reconciliation (pulling annotations through
the SDK after missed webhooks), so both paths store exactly the same thing.
Nothing is ever dropped: an annotation whose boxes cannot be parsed (unknown
label, missing sizes) is stored raw with its ``parse_error``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from backend.boxes import Boxes
from backend.labelstudio.convert import (
    AnnotationParseError,
    LabelConfig,
    LabelConfigError,
    MissingImageSize,
    parse_label_config,
    regions_to_boxes,
)
from backend.store import Project, Store, StoredReading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestResult:
    annotation_id: int
    task_id: int
    revision: int
    changed: bool
    parse_error: str | None


#: The largest id boxloop takes, for projects, tasks and annotations alike: Label Studio's ids are
#: Django ``AutoField``s (32-bit signed), and so are the store's id columns on PostgreSQL
#: (``INTEGER``). A larger id could not come from Label Studio, and PostgreSQL would refuse it
#: with a 500 instead of the 4xx that names it. The HTTP spec's ``Id`` and path ids use it too.
MAX_ID = 2**31 - 1


def cli_project_id(text: str) -> int:
    """An argparse ``type``: a project id as Label Studio has them (1 to :data:`MAX_ID`)."""
    try:
        value = label_studio_id(int(text))
    except ValueError:  # not a number at all
        value = None
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a project id (1 to {MAX_ID})")
    return value


class AnnotationPayloadError(ValueError):
    """The annotation object itself is malformed (no id, no task, result not a list)."""


def label_studio_id(value: Any) -> int | None:
    """``value`` as an id (``7`` or ``7.0``, 1 to :data:`MAX_ID`), or None when it is not one.
    ``True`` is not an id, although Python counts it as an int."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    return int(value) if 1 <= value <= MAX_ID else None


def parse_boxes(
    result: list[dict[str, Any]], config: LabelConfig
) -> tuple[Boxes | None, str | None]:
    """``(boxes, None)`` of an annotation's result under ``config``, or ``(None, why not)``.
    Boxes are None too when no region tells the image size (an empty annotation, or Label
    Studio left the sizes out): training reads those at the loaded image's size."""
    try:
        parsed = regions_to_boxes(result, config)
    except MissingImageSize:  # read at training, at the loaded image's size
        return None, None
    except AnnotationParseError as exc:
        return None, str(exc)
    return (parsed if parsed.image_size != (0, 0) else None), None


def reads_differently(before: Project | None, config: LabelConfig) -> bool:
    """Whether stored annotations of ``before`` would parse otherwise under ``config``: another
    rectangle control, image, label list (stored boxes index the label list they were read
    with, so a reordered list would silently swap their classes) or label aliases (an alias
    added makes results that carry it readable)."""
    if before is None:
        return False
    if (before.from_name, before.to_name, list(before.labels)) != (
        config.from_name,
        config.to_name,
        list(config.labels),
    ):
        return True
    return stored_label_config(before).aliases != config.aliases


def stored_label_config(project: Project) -> LabelConfig:
    """The project's stored label config, parsed. A config stored by a version that read
    configs more loosely (the parser refuses it now) reads as that version read it, from the
    project's columns: parsed as is, every webhook of the project was a 500 after an upgrade,
    and each annotation it carried was lost (Label Studio sends a webhook once)."""
    try:
        return parse_label_config(project.label_config)
    except LabelConfigError:
        return LabelConfig(
            project.from_name, project.to_name, project.image_key, tuple(project.labels)
        )


def reparse_annotations(store: Store, project_id: int, config: LabelConfig) -> int:
    """Read every stored annotation of the project again from its raw result, after its label
    config changed; returns how many now read differently.

    Why: the store keeps each annotation's boxes as label indices of the config it arrived
    under, and training takes them from there. After an admin reorders, adds or removes labels
    they would train the wrong classes; an annotation that named a label the config lacked
    becomes usable once the label is added (and counts as new work for the training trigger),
    and one naming a removed label is kept, raw, but no longer trained on (its ``parse_error``
    says why).
    """
    changed, usable_now = read_anew(store.stored_readings(project_id), config)
    if not changed:
        return 0
    return store.replace_parsed_boxes(project_id, changed, renew=usable_now)


def read_anew(
    readings: Iterable[StoredReading], config: LabelConfig
) -> tuple[dict[int, tuple[int, Boxes | None, str | None]], list[int]]:
    """The annotations of ``readings`` that read differently under ``config``, as
    :meth:`Store.replace_parsed_boxes` takes them, and the ids of those among them that became
    usable (a parse error before, none now): :func:`reparse_annotations` short of the store."""
    changed: dict[int, tuple[int, Boxes | None, str | None]] = {}
    usable_now: list[int] = []  # new training data: count it for the training trigger
    for stored in readings:  # each decoded as it comes (see Store.stored_readings)
        boxes, parse_error = parse_boxes(stored.result, config)
        if parse_error != stored.parse_error or not _reads_as_stored(boxes, stored.boxes):
            changed[stored.annotation_id] = (stored.revision, boxes, parse_error)
            if stored.parse_error is not None and parse_error is None:
                usable_now.append(stored.annotation_id)
    return changed, usable_now


def _reads_as_stored(boxes: Boxes | None, stored: dict[str, Any] | None) -> bool:
    """Whether ``boxes`` equal the stored ones (``stored``: :meth:`Boxes.to_dict`'s JSON) as
    ``Boxes`` compare them (``==``: labels, image size, corners within 1e-3), building ``Boxes``
    of the stored JSON only where the lists themselves cannot tell."""
    if boxes is None or stored is None:
        return boxes is None and stored is None
    labels = stored.get("labels")
    if (
        isinstance(labels, list)
        and all(type(label) is int for label in labels)
        and labels != boxes.labels.tolist()
    ):
        return False  # other labels (a reordered list) or another number of boxes
    if boxes.to_dict() == stored:
        return True  # what storing them would write: equal once read back
    return Boxes.from_dict(stored) == boxes


def save_label_config(
    store: Store, project_id: int, label_config: str, config: LabelConfig, hostname: str | None
) -> Project:
    """Store a project's label config (``/setup``); when stored annotations read differently
    under it, read them all again (:func:`reparse_annotations`)."""
    before = store.get_project(project_id)
    project = store.upsert_project(
        project_id,
        label_config=label_config,
        from_name=config.from_name,
        to_name=config.to_name,
        image_key=config.image_key,
        labels=config.labels,
        hostname=hostname,
    )
    if reads_differently(before, config):
        changed = reparse_annotations(store, project_id, config)
        log.info("project %s: label config changed, %d annotations read anew", project_id, changed)
    return project


def ingest_annotation(
    store: Store,
    project_id: int,
    config: LabelConfig,
    annotation: dict[str, Any],
    *,
    task: dict[str, Any] | None = None,
    source: str = "webhook",
    keep_newer_than: int | None = None,
) -> IngestResult:
    """Validate the envelope, parse boxes where possible, and commit to the store (a stored row
    whose revision is above ``keep_newer_than`` stays: see :meth:`Store.upsert_annotation`)."""
    if not isinstance(annotation, dict):
        raise AnnotationPayloadError("annotation must be a JSON object")
    annotation_id = label_studio_id(annotation.get("id"))
    task_ref = annotation.get("task")
    task_value = task_ref.get("id") if isinstance(task_ref, dict) else task_ref
    if task_value is None and task is not None:
        task_value = task.get("id")
    task_id = label_studio_id(task_value)
    if annotation_id is None or task_id is None:
        raise AnnotationPayloadError(
            f"annotation needs integer 'id' and 'task' fields (1 to {MAX_ID})"
        )
    result = annotation.get("result")
    if result is None:  # Label Studio always sends it ([] when nothing was drawn); read as [],
        # an update without it replaced the stored boxes with "no object on this image"
        raise AnnotationPayloadError(
            f"annotation {annotation_id}: 'result' is missing (a list of regions, [] for none)"
        )
    if not isinstance(result, list):
        raise AnnotationPayloadError(f"annotation {annotation_id}: 'result' must be a list")
    cancelled = annotation.get("was_cancelled")
    if cancelled is not None and not isinstance(cancelled, bool):
        raise AnnotationPayloadError(
            f"annotation {annotation_id}: 'was_cancelled' must be a boolean"
        )
    if task is not None and isinstance(task.get("data"), dict):
        if task.get("id") in (None, task_id):
            store.upsert_tasks(project_id, [(task_id, task["data"])])
        else:  # another task's data: it would put this annotation's boxes on that image
            log.warning(
                "annotation %s of task %s came with the data of task %r; that data is not stored",
                annotation_id,
                task_id,
                task.get("id"),
            )
    boxes, parse_error = parse_boxes(result, config)
    revision, changed = store.upsert_annotation(
        project_id,
        annotation_id,
        task_id,
        result,
        boxes,
        parse_error=parse_error,
        was_cancelled=bool(cancelled),
        source=source,
        keep_newer_than=keep_newer_than,
    )
    now = store.get_project(project_id) if changed else None
    if now is not None and reads_differently(now, config):
        # A /setup stored another label config while this annotation was parsed under the one
        # read before: its re-read of the stored annotations may have run before this write, so
        # this one is read again here. (Either this check sees the new config, or the /setup
        # stored it after this write and re-reads this annotation itself.)
        current = stored_label_config(now)
        boxes, parse_error = parse_boxes(result, current)
        store.replace_parsed_boxes(project_id, {annotation_id: (revision, boxes, parse_error)})
    return IngestResult(annotation_id, task_id, revision, changed, parse_error)


def ingest_many(
    store: Store,
    project_id: int,
    config: LabelConfig,
    items: Iterable[dict[str, Any]],
    source: str,
) -> list[IngestResult]:
    return [ingest_annotation(store, project_id, config, a, source=source) for a in items]
