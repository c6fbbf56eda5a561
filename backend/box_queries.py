"""Box-level queries in Label Studio: an episode picks the K most informative predicted boxes,
shows them to annotators as ordinary tasks, and maps each submitted answer back to them.

An episode (``POST /projects/{id}/box-queries``, ``boxloop box-queries``):

1. the serving model (its PyTorch form: the newest promoted YOLOX version, else the COCO model
   re-cut to the project's labels) predicts every unlabelled task at a low threshold ``t_d``
   (the box pool, topped up to K while scores are low);
2. :func:`backend.active.select_boxes` picks K boxes by the project's measure (core-set starts
   from the features of the boxes annotated so far);
3. each task holding a query gets a prediction of the serving version with *all* its predicted
   boxes; the queried ones carry a region meta text ``boxloop query N: <measure> <value>`` (the
   annotator sees it in the region list) so the annotator knows which boxes to check;
4. the queue is ordered by each task's most informative query, then the other unlabelled tasks,
   through the Community Edition mechanism the orders use (ranks in task data + a sorted
   Data Manager tab + Uncertainty-sampling scores of the serving version).

When an annotation arrives (webhook), the task's open queries are resolved against the submitted
boxes with :func:`backend.active.resolve_queries` (the benchmark's rule): confirmed, adjusted,
duplicate or background, and the submitted boxes no query matched were drawn. ``/status`` shows
each episode and its counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from backend.active import (
    box_features_at,
    box_scores,
    pool_members,
    predict_pool,
    resolve_queries,
    select_boxes,
)
from backend.boxes import Boxes
from backend.detectors.label_names import same_name_index
from backend.errors import ServiceError
from backend.ingest import stored_label_config
from backend.labelstudio.convert import boxes_to_regions
from backend.ordering.ranks import ranks_for
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import Store, latest_per_task
from backend.training.yolox_train import YoloxTrainConfig, input_shape_for

__all__ = ["BoxQueryManager", "BoxQueryRequest", "unverified_boxes"]

log = logging.getLogger(__name__)

#: Prediction floor of the box pool (below ``t_d``, for the top-up).
POOL_FLOOR = 0.01


class BoxQueryRequest(BaseModel):
    """One box-level episode's settings (HTTP body and CLI flags)."""

    model_config = ConfigDict(extra="forbid")

    measure: Literal["random", "uncertainty", "entropy", "margin", "coreset"] = Field(
        default="uncertainty", description="informativeness of a predicted box"
    )
    k: int = Field(default=20, ge=1, le=100_000, description="boxes to query this episode")
    t_d: float = Field(default=0.1, gt=0.0, lt=1.0, description="pool threshold (recall first)")
    noisy_weight: float = Field(
        default=0.5, ge=0.0, le=1.0, description="λ_d: loss weight of unqueried predicted boxes"
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="seeds the random measure")
    push: bool = Field(
        default=True, description="write predictions and the order into Label Studio"
    )


class BoxQueryManager:
    """Runs episodes and resolves answers for the projects of one backend."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: ModelRegistry,
        studio_for: Callable[[int], Any],
        load_task_image: Callable[[int, Mapping[str, Any]], Image.Image],
        sync_tasks: Callable[[int], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.studio_for = studio_for
        self.load_task_image = load_task_image
        self.sync_tasks = sync_tasks

    # ------------------------------------------------------------------ episode
    def run_episode(self, project_id: int, request: BoxQueryRequest) -> dict[str, Any]:
        project = self.store.get_project(project_id)
        if project is None:
            raise KeyError(f"project {project_id} is unknown to boxloop (connect it first)")
        self.sync_tasks(project_id)
        annotations = [a for a in self.store.list_annotations(project_id) if not a.was_cancelled]
        labeled = {a.task_id for a in annotations}
        tasks = [(t, d) for t, d in self.store.list_tasks(project_id) if t not in labeled]
        served = self.registry.serving_torch_model(project_id, project.labels)
        if served is None:  # a valid request the project's state cannot serve yet
            raise ServiceError(
                409,
                "box queries need a YOLOX model: the COCO YOLOX-Nano (`boxloop models fetch`) "
                "or a promoted YOLOX version",
            )
        version, model, hw = served
        images, task_ids, failed = [], [], {}
        for task_id, data in tasks:
            try:
                images.append(self.load_task_image(project_id, data))
                task_ids.append(task_id)
            except (OSError, ValueError) as exc:
                failed[task_id] = str(exc)
        if hw is None:
            hw = input_shape_for(
                [im.size for im in images] or [(640, 480)],
                YoloxTrainConfig.from_settings(self.settings),
            )
        pool = predict_pool(
            model,
            images,
            hw,
            score_threshold=min(request.t_d, POOL_FLOOR),
            with_features=request.measure == "coreset",
        )
        pool = pool.subset(pool_members(pool, request.t_d, request.k))
        labeled_features = None
        if request.measure == "coreset":
            labeled_features = self._labeled_features(project_id, annotations, model, hw)
        rows = select_boxes(
            pool,
            request.measure,
            request.k,
            labeled_features=labeled_features,
            seed=request.seed,
        )
        values = _values(pool, request.measure, rows, request.seed)
        queries: list[dict[str, Any]] = [
            {
                "n": n + 1,
                "row": int(r),
                "task": int(task_ids[int(pool.image[r])]),
                "xyxy": [float(v) for v in pool.xyxy[r]],
                "size": list(pool.image_sizes[int(pool.image[r])]),  # the frame of ``xyxy``
                "label": int(pool.labels[r]),
                "score": float(pool.scores[r]),
                "value": values[n],
                "kind": None,
            }
            for n, r in enumerate(rows.tolist())
        ]
        asked_rows = set(rows.tolist())
        query_tasks = {q["task"] for q in queries}
        unqueried = [
            {
                "task": int(task_ids[int(pool.image[r])]),
                "xyxy": [float(v) for v in pool.xyxy[r]],
                "label": int(pool.labels[r]),
                "size": list(pool.image_sizes[int(pool.image[r])]),
            }
            for r in range(len(pool))
            if r not in asked_rows and int(task_ids[int(pool.image[r])]) in query_tasks
        ]
        params = {
            **request.model_dump(),
            "version": version,
            "labels": list(project.labels),  # what the queries' label indices index
            "input_hw": list(hw),
            # shown to the annotator unasked: in the submitted annotation they are noisy labels
            "unqueried": unqueried,
        }
        episode = self.store.add_box_episode(project_id, params, queries)
        # the queue: tasks by their most informative query, then the other unlabelled tasks
        first: dict[int, int] = {}
        for q in queries:
            first.setdefault(q["task"], q["n"])
        order = sorted(first, key=first.__getitem__) + [t for t in task_ids if t not in first]
        pushed: dict[str, Any] = {}
        if request.push:
            pushed = self._push(project_id, episode, version, pool, task_ids, queries, order)
        log.info(
            "project %s: box episode %d queried %d boxes on %d tasks (%s, version %s)",
            project_id,
            episode,
            len(queries),
            len(first),
            request.measure,
            version,
        )
        return {
            "project": project_id,
            "episode": episode,
            "version": version,
            "measure": request.measure,
            "pool_boxes": len(pool),
            "queried": len(queries),
            "tasks_with_queries": len(first),
            "order": order,
            "failed_images": failed,
            **pushed,
        }

    def _labeled_features(
        self, project_id: int, annotations: list[Any], model: Any, hw: tuple[int, int]
    ) -> np.ndarray | None:
        """Features of the annotated boxes (L_B), the core-set's starting list."""
        data = dict(self.store.list_tasks(project_id))
        images, boxes = [], []
        for a in annotations:
            if a.boxes is None or not len(a.boxes.kept()) or a.task_id not in data:
                continue
            try:
                images.append(self.load_task_image(project_id, data[a.task_id]))
            except (OSError, ValueError):
                continue
            boxes.append(a.boxes.kept())
        if not images:
            return None
        return np.concatenate(box_features_at(model, images, boxes, hw))

    def _push(
        self,
        project_id: int,
        episode: int,
        version: str,
        pool: Any,
        task_ids: list[int],
        queries: list[dict[str, Any]],
        order: list[int],
    ) -> dict[str, Any]:
        studio = self.studio_for(project_id)
        if studio is None:
            return {"pushed": False}
        from backend.labelstudio import queue

        project = self.store.get_project(project_id)
        assert project is not None
        config = stored_label_config(project)
        by_task: dict[int, list[dict[str, Any]]] = {}
        for q in queries:
            by_task.setdefault(q["task"], []).append(q)
        results: dict[int, list[dict[str, Any]]] = {}
        for index, task_id in enumerate(task_ids):
            if task_id not in by_task:
                continue
            asked = {q["row"]: q for q in by_task[task_id]}
            regions: list[dict[str, Any]] = []
            for row in pool.rows_of(index).tolist():  # one box at a time: marks stay on theirs
                converted = boxes_to_regions(pool.boxes([row], index), config, project.labels)
                query = asked.get(row)
                if converted and query is not None:
                    converted[0]["id"] = f"bq{episode}-{query['n']}"
                    converted[0]["meta"] = {
                        "text": [f"boxloop query {query['n']}: {query['value']:.3f}"]
                    }
                regions += converted
            results[task_id] = regions
        ranks = ranks_for(order)
        listed = queue.list_predictions(studio, project_id)
        updated, created = queue.push_version_predictions(
            studio, project_id, results, ranks, version, predictions=listed
        )
        # after the import: Label Studio accepts a model_version only once predictions carry it
        if studio.get_project(project_id).get("model_version") != version:
            queue.enable_uncertainty_sampling(studio, project_id, version)
        rest = {t: r for t, r in ranks.items() if t not in results}
        pushed = queue.push_order_result(studio, project_id, order, ranks, None, uncertainty=False)
        scored, score_created = queue.set_rank_scores(
            studio, project_id, rest, model_version=version, predictions=listed
        )
        return {
            "pushed": True,
            "view_id": pushed.view_id,
            "tasks_preannotated": len(results),
            "predictions_updated": updated + scored,
            "predictions_created": created + score_created,
        }

    # ------------------------------------------------------------------ answers
    def record_answer(self, project_id: int, task_id: int) -> dict[str, int] | None:
        """Resolve the task's queries, in every episode that asked them, against the task's
        newest annotation (the one training takes), again when that annotation is updated;
        returns the counts of this answer, or None when the task was not asked.

        An empty annotation (the annotator deleted every box shown) answers too: each query is
        background. Answers are matched in the queries' frame (see :func:`_in_frame`)."""
        episodes = self.store.list_box_episodes(project_id)
        project = self.store.get_project(project_id)
        if not episodes or project is None:
            return None
        newest = latest_per_task(self.store.list_annotations(project_id, task_id=task_id))
        if not newest or newest[0].parse_error is not None:
            return None
        answer = newest[0].boxes
        if answer is None and any(
            isinstance(r, dict) and r.get("from_name") == project.from_name
            for r in newest[0].result
        ):  # boxes without their image size (read at training, from the image): not empty
            return None
        counts = dict.fromkeys(("confirmed", "adjusted", "duplicate", "background"), 0)
        drawn = 0
        resolved: list[int] = []
        for number, params, queries in episodes:
            # answered ones too: an update of the answer resolves them again (they kept the
            # first answer's kinds, though training takes the newest annotation)
            mine = [i for i, q in enumerate(queries) if q["task"] == task_id]
            if not mine:
                continue
            label_now = episode_label_map(params, project.labels)
            task_answer = _in_frame(answer, queries[mine[0]].get("size"))
            asked = Boxes(
                np.array([queries[i]["xyxy"] for i in mine], np.float32).reshape(-1, 4),
                np.array([label_now(queries[i]["label"]) for i in mine], np.int64),
                task_answer.image_size,
            )
            answers = resolve_queries(asked, task_answer)
            for i, kind in zip(mine, answers.kind, strict=True):
                queries[i] = {**queries[i], "kind": kind, "drawn_on_task": len(answers.drawn)}
            self.store.set_box_queries(project_id, number, queries)
            for kind in counts:
                counts[kind] += answers.count(kind)
            drawn = len(answers.drawn)
            resolved.append(number)
        if not resolved:
            return None
        return {**counts, "drawn": drawn, "episode": resolved[-1]}

    # ------------------------------------------------------------------ status
    def status(self, project_id: int) -> list[dict[str, Any]]:
        out = []
        for number, params, queries in self.store.list_box_episodes(project_id):
            kinds = [q["kind"] for q in queries]
            drawn = {q["task"]: q.get("drawn_on_task", 0) for q in queries if q["kind"]}
            out.append(
                {
                    "episode": number,
                    "measure": params.get("measure"),
                    "k": params.get("k"),
                    "t_d": params.get("t_d"),
                    "noisy_weight": params.get("noisy_weight"),
                    "version": params.get("version"),
                    "queried": len(queries),
                    "unqueried_shown": len(params.get("unqueried", [])),
                    "tasks": len({q["task"] for q in queries}),
                    "open": kinds.count(None),
                    "confirmed": kinds.count("confirmed"),
                    "adjusted": kinds.count("adjusted"),
                    "duplicate": kinds.count("duplicate"),
                    "background": kinds.count("background"),
                    "drawn": int(sum(drawn.values())),
                }
            )
        return out


def _values(pool: Any, measure: str, rows: np.ndarray, seed: int) -> list[float]:
    """What each queried box scored on the measure (core-set: its pick position, reversed)."""
    if measure == "coreset":
        return [float(len(rows) - i) for i in range(len(rows))]
    scores = box_scores(pool, measure, seed)  # type: ignore[arg-type]
    return [float(scores[r]) for r in rows.tolist()]


def _in_frame(answer: Boxes | None, size: Sequence[int] | None) -> Boxes:
    """The task's answer in its queries' frame, ``size`` = ``(width, height)`` of the image
    the model saw. Label Studio measures boxes on the image it shows (``original_width``), which
    may be another copy of it: matched in that frame, a right answer missed its query. Queries
    of an episode stored before they carried a size are matched in the answer's frame."""
    if size is None:
        return Boxes.empty((0, 0)) if answer is None else answer
    width, height = int(size[0]), int(size[1])
    return Boxes.empty((width, height)) if answer is None else answer.in_frame((width, height))


def episode_label_map(params: Mapping[str, Any], labels: Sequence[str]) -> Callable[[int], int]:
    """An episode's stored label index → the project's label index now (``-1``, which matches
    no box, for a label since removed). Why: an admin may edit the label config between the
    episode and the answers, and the answers are read under the new one. An episode stored
    before episodes recorded their labels is taken to use today's."""
    then = params.get("labels")
    if not isinstance(then, list) or list(then) == list(labels):
        return int
    index = same_name_index([str(name) for name in then], labels)
    return lambda label: index.get(int(label), -1)


def unverified_boxes(store: Store, project_id: int) -> dict[int, tuple[Boxes, float]]:
    """Per task of a box-query episode: the predicted boxes it showed without asking about them,
    and the episode's λ_d (the newest episode of a task wins). Training weighs a submitted box
    that still equals one of them at λ_d (:func:`backend.active.noisy_box_weights`)."""
    out: dict[int, tuple[Boxes, float]] = {}
    project = store.get_project(project_id)
    labels = project.labels if project is not None else []
    for _number, params, queries in store.list_box_episodes(project_id):
        label_now = episode_label_map(params, labels)
        weight = float(params.get("noisy_weight", 0.5))
        shown: dict[int, list[dict[str, Any]]] = {}
        for item in params.get("unqueried", []):
            shown.setdefault(int(item["task"]), []).append(item)
        for task in {int(q["task"]) for q in queries}:
            items = shown.get(task, [])
            size = tuple(items[0]["size"]) if items else (1, 1)
            boxes = Boxes(
                np.array([i["xyxy"] for i in items], np.float32).reshape(-1, 4),
                np.array([label_now(i["label"]) for i in items], np.int64),
                (int(size[0]), int(size[1])),
            )
            out[task] = (boxes, weight)
    return out
