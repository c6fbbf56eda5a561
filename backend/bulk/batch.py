"""One batch through a model, and the reason a task failed: the same on every engine.

Its own module so that the in-process engine and the Ray engine share it without importing
each other (:func:`backend.bulk.engine.make_engine` picks the Ray engine, which needs these).
"""

from __future__ import annotations

import logging

from PIL import Image

from backend.bulk.work import BatchModel, ItemResult, WorkItem
from backend.images import ImageError

__all__ = ["describe_error", "run_batch"]

log = logging.getLogger(__name__)


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a task's failure, the same on every engine."""
    if isinstance(exc, ImageError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


def run_batch(
    model: BatchModel, items: list[WorkItem], images: list[Image.Image]
) -> list[ItemResult]:
    """``model`` over one batch; when the batch fails, item by item, so one image that breaks
    the model fails alone."""
    try:
        outputs = model.run(images)
        if len(outputs) != len(images):
            raise RuntimeError(f"the model gave {len(outputs)} outputs for {len(images)} images")
        return [ItemResult(i.task_id, v) for i, v in zip(items, outputs, strict=True)]
    except Exception:
        log.exception("a batch of %d failed; running its images one by one", len(items))
    results: list[ItemResult] = []
    for item, image in zip(items, images, strict=True):
        try:
            results.append(ItemResult(item.task_id, model.run([image])[0]))
        except Exception as exc:
            results.append(ItemResult(item.task_id, error=describe_error(exc)))
    return results
