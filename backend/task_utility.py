"""Each predicted task's image utility: into the prediction's meta and into the task's data.

:class:`backend.utility.scorer.UtilityScorer` scores images; this module is where the scores
go, on the ``/predict`` path: the meta of each prediction now, and the task's data field
(boxloop's store, then Label Studio) in the background, so a project can flag, skip or move
low-utility tasks. A failure here never fails a prediction: it is logged and the boxes go out
without a utility.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

from PIL import Image

from backend.store import Store
from backend.utility.scorer import UtilityScorer

__all__ = ["TaskUtility", "record_fields"]

log = logging.getLogger(__name__)


class TaskUtility:
    """Scores loaded task images and records the scores where the queue can use them."""

    def __init__(
        self,
        scorer: UtilityScorer,
        store: Store,
        studio_for: Callable[[int], Any],
        background: Executor,
    ) -> None:
        self.scorer = scorer
        self.store = store
        self.studio_for = studio_for
        self.background = background

    def score(
        self,
        project_id: int | None,
        tasks: Sequence[Any],
        task_ids: Sequence[int | None],
        images: Sequence[tuple[int, Image.Image]],
    ) -> dict[int, dict[str, Any]]:
        """The prediction meta of each ``(task index, image)``, keyed by task index ({} when
        scoring failed); changed data fields are written in the background."""
        try:
            scores = self.scorer.score([image for _, image in images])
        except Exception:
            log.exception("utility scoring failed; predictions go out without it")
            return {}
        metas: dict[int, dict[str, Any]] = {}
        updates: dict[int, dict[str, Any]] = {}
        known: dict[int, dict[str, Any]] = {}
        for (i, _), score in zip(images, scores, strict=True):
            metas[i] = self.scorer.policy.meta(score)
            data, task_id = tasks[i].get("data"), task_ids[i]
            if task_id is not None and isinstance(data, dict):
                fields = self.scorer.fields(score)
                if any(data.get(k) != v for k, v in fields.items()):  # unchanged: no PATCH
                    updates[task_id], known[task_id] = fields, data
        if project_id is not None and updates:
            self.background.submit(self._record, project_id, updates, known)
        return metas

    def _record(
        self,
        project_id: int,
        fields: dict[int, dict[str, Any]],
        known: dict[int, dict[str, Any]],
    ) -> None:
        try:
            record_fields(self.store, self.studio_for(project_id), project_id, fields, known)
        except Exception:
            log.exception("project %s: storing utility scores failed", project_id)


def record_fields(
    store: Store,
    studio: Any,
    project_id: int,
    fields: Mapping[int, Mapping[str, Any]],
    known: Mapping[int, Mapping[str, Any]] | None = None,
) -> None:
    """Merge ``fields`` (e.g. the utility score) into each task's current data: boxloop's store,
    then Label Studio when ``studio`` is given.

    Why merged, never written from the caller's copy of the data: that copy (a ``/predict``
    request's, or one listed before an order scored its pool) can be older than the task, and
    writing it back undid the ranks an order had pushed since. Why Label Studio too: its data is
    what every re-sync copies into the store, so a score only the store held was gone after the
    next order. ``known``: the data of tasks the store may not hold yet (a ``/predict`` request's),
    stored with the fields; other tasks the store lacks are left to the next sync.
    """
    if store.get_project(project_id) is not None:
        rows = []
        for task_id, values in fields.items():
            data = store.get_task_data(project_id, task_id) or (known or {}).get(task_id)
            if data is not None and any(data.get(k) != v for k, v in values.items()):
                rows.append((task_id, {**data, **values}))
        store.upsert_tasks(project_id, rows)
    if studio is not None:
        from backend.labelstudio.queue import write_task_fields

        write_task_fields(studio, project_id, fields)
