"""Each predicted task's image utility: into the prediction's meta and into the task's data.

:class:`backend.utility.scorer.UtilityScorer` scores images; this module is where the scores
go, on the ``/predict`` path: the meta of each prediction now, and the task's data field
(boxloop's store, then Label Studio) in the background, so a project can flag, skip or move
low-utility tasks. A failure here never fails a prediction: it is logged and the boxes go out
without a utility.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from PIL import Image

from backend.store import Store
from backend.utility.scorer import UtilityScorer

__all__ = ["TaskUtility"]

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
        for (i, _), score in zip(images, scores, strict=True):
            metas[i] = self.scorer.policy.meta(score)
            data, task_id = tasks[i].get("data"), task_ids[i]
            if task_id is not None and isinstance(data, dict):
                new = self.scorer.with_score(data, score)
                if data.get(self.scorer.field) != new[self.scorer.field]:  # unchanged: no PATCH
                    updates[task_id] = new
        if project_id is not None and updates:
            self.background.submit(self._record, project_id, updates)
        return metas

    def _record(self, project_id: int, updates: dict[int, dict[str, Any]]) -> None:
        try:
            if self.store.get_project(project_id) is not None:
                self.store.upsert_tasks(project_id, list(updates.items()))
            studio = self.studio_for(project_id)
            if studio is not None:
                from backend.labelstudio.queue import write_task_data

                write_task_data(studio, project_id, updates)
        except Exception:
            log.exception("project %s: storing utility scores failed", project_id)
