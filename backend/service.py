"""The engine facade the HTTP app and the CLI call: setup, predict, webhooks, training.

``BoxloopService`` owns the store, the loaded model per project and the training
scheduler. It knows nothing about HTTP: methods take and return plain typed
values and raise :class:`ServiceError` (with a status code and a message a user
can act on) for bad input.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import httpx
import torch
from PIL import Image

from backend.box_queries import BoxQueryManager, BoxQueryRequest
from backend.boxes import Boxes
from backend.bulk.predict import BulkPredictor, BulkPredictRequest
from backend.bulk.runs import BulkRuns
from backend.errors import ServiceError
from backend.images import ImageError, load_image, task_image_loader
from backend.ingest import save_label_config, stored_label_config
from backend.jobs import TrainingScheduler
from backend.labelstudio.convert import (
    LabelConfig,
    LabelConfigError,
    parse_label_config,
    prediction_of,
)
from backend.queueing import OrderRequest, QueueManager
from backend.reconcile import reconcile_all
from backend.registry import LoadedModel, ModelRegistry
from backend.settings import Settings
from backend.store import Store, TrainingJob
from backend.studio_access import StudioAccess
from backend.task_utility import TaskUtility
from backend.utility.scorer import UtilityScorer, stored_scores
from backend.webhooks import WebhookHandler, WebhookOutcome, parse_project_id

log = logging.getLogger(__name__)


@dataclass
class TaskPrediction:
    task_id: int | None
    result: list[dict[str, Any]]
    score: float
    model_version: str
    error: str | None = None
    status_code: int = 200
    #: Image utility (``docs/utility.md``): ``{"utility": p, "low_utility": bool}`` when on.
    meta: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"result": self.result, "score": self.score, "model_version": self.model_version}
        if self.meta:
            out["meta"] = self.meta
        return out


class BoxloopService:
    """Everything the backend does, behind plain method calls."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or Store(settings.resolved_database_url)
        self.studio = StudioAccess(settings, self.store)
        self.models = ModelRegistry(settings, self.store, studio_for=self.studio.client)
        self._http = httpx.Client(timeout=settings.image_fetch_timeout_s, follow_redirects=False)
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="boxloop-fetch")
        self.scheduler = TrainingScheduler(
            settings, self.store, on_success=self._on_new_version, extra_env=self.studio.worker_env
        )
        # image utility: off unless BOXLOOP_UTILITY_MODEL names an exported predictor
        self.utility = UtilityScorer.from_settings(settings)
        self.queue = QueueManager(
            settings,
            self.store,
            studio_for=self.studio.client,
            image_source_for=self.studio.image_source_of,
            utility=self.utility,
        )
        self.box_queries = BoxQueryManager(
            settings,
            self.store,
            self.models,
            studio_for=self.studio.client,
            load_task_image=self._task_image,
            sync_tasks=self.queue.sync_tasks,
        )
        self.bulk = BulkPredictor(
            settings,
            self.store,
            self.models,
            studio_for=self.studio.client,
            image_source_for=self.studio.image_source_of,
            rank_scores_for=self.queue.rank_scores,
        )
        self.bulk_runs = BulkRuns(settings, self.bulk, worker_env=self.studio.worker_env)
        self.webhooks = WebhookHandler(
            self.store,
            schedule_training=self.maybe_schedule_training,
            request_training=lambda pid: self.scheduler.request(pid, "START_TRAINING"),
            tasks_created=self._tasks_created,
            annotation_stored=self._annotation_stored,
        )
        # queue work (features, ordering, pushes) runs one job at a time, off the request path
        self._queue_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boxloop-queue")
        self.task_utility = (
            None
            if self.utility is None
            else TaskUtility(self.utility, self.store, self.studio.client, self._queue_pool)
        )
        self._queue_state: dict[int, dict[str, Any]] = {}
        #: called with (project, task ids) after TASKS_CREATED recorded them (e.g. search)
        self.on_tasks_created: list[Callable[[int, list[int]], None]] = []
        self._box_state: dict[int, dict[str, Any]] = {}
        torch.set_num_threads(max(1, settings.num_threads))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Recover interrupted jobs, start the scheduler, reconcile in the background."""
        requeued = self.scheduler.recover()
        if requeued:
            log.info("requeued training jobs after restart: %s", requeued)
        self.scheduler.start()
        if self.settings.reconcile_on_startup and self.studio.configured:
            threading.Thread(
                target=reconcile_all,
                args=(
                    self.store,
                    self.studio.client,
                    self.maybe_schedule_training,
                    self._tasks_created,
                ),
                name="boxloop-reconcile",
                daemon=True,
            ).start()

    def close(self) -> None:
        self.scheduler.stop()
        self.bulk_runs.close()
        self._queue_pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False)
        self._http.close()

    # ------------------------------------------------------------------ models
    def current_model(
        self, project_id: int | None, labels: Sequence[str] | None = None
    ) -> LoadedModel:
        """The model serving a project (see :meth:`ModelRegistry.current`)."""
        return self.models.current(project_id, labels)

    def _on_new_version(self, project_id: int, version: str) -> None:
        """A training job finished: swap a promoted version in; a rejected one changes nothing
        but the pruning (``swap_in`` prunes after a promotion; rejected candidates piled up)."""
        if not self.models.swap_in(project_id, version):
            log.info(
                "project %s: %s was not promoted, the serving version stays", project_id, version
            )
            self.models.prune(project_id)
            self.maybe_schedule_training(project_id)
            return
        order = self.store.get_order(project_id)
        if order is not None and order.params.get("uncertainty_scores"):
            # The new version's scores must be in Label Studio before the project switches to
            # it (the title update does that), or the queue would have no order in between.
            self._queue_pool.submit(self._carry_over_then_retitle, project_id, version)
        else:
            self.models.update_title(project_id, version)
        self.maybe_schedule_training(project_id)

    def _carry_over_then_retitle(self, project_id: int, version: str) -> None:
        self._refresh_queue(project_id, version)
        self.models.update_title(project_id, version)

    # ------------------------------------------------------------------ /setup
    def setup(
        self,
        project: Any,
        label_config: str,
        hostname: str | None = None,
        access_token: str | None = None,
    ) -> str:
        project_id = parse_project_id(project)
        if project_id is None:
            raise ServiceError(400, f"'project' must be a project id, got {project!r:.60}")
        config = self._parse_config(label_config)
        revision = self.store.annotation_revision(project_id)
        save_label_config(self.store, project_id, label_config, config, hostname)
        if self.store.annotation_revision(project_id) != revision:  # annotations now usable
            self.maybe_schedule_training(project_id)
        if access_token:
            self.studio.remember_setup_token(project_id, access_token)
        return self.current_model(project_id, config.labels).version

    @staticmethod
    def _parse_config(label_config: Any) -> LabelConfig:
        try:
            return parse_label_config(label_config)
        except LabelConfigError as exc:
            raise ServiceError(422, str(exc)) from exc

    # ------------------------------------------------------------------ /predict
    def predict(
        self, tasks: Sequence[Any], label_config: str | None, project: Any = None
    ) -> list[TaskPrediction]:
        project_id = parse_project_id(project)
        if project_id is None and tasks and isinstance(tasks[0], dict):
            project_id = parse_project_id(tasks[0].get("project"))
        stored = self.store.get_project(project_id) if project_id is not None else None
        if label_config:
            config = self._parse_config(label_config)
        elif stored is not None:
            config = stored_label_config(stored)
        elif project_id is not None:
            raise ServiceError(
                404,
                f"project {project_id} is unknown to boxloop and the request has no "
                "label_config (Label Studio calls /setup when the model is connected)",
            )
        else:
            raise ServiceError(422, "the request names no project and has no label_config")
        model = self.current_model(project_id, config.labels)
        studio = self.studio  # the stored project is not read again; its id resolves cloud URIs
        source = studio.image_source(stored) if stored else studio.image_source_of(project_id)
        references = [self._image_reference(task, config) for task in tasks]
        futures = [
            self._fetch_pool.submit(load_image, ref[1], source, client=self._http)
            if ref[0]
            else None
            for ref in references
        ]
        out: list[TaskPrediction] = []
        good: list[tuple[int, Image.Image]] = []
        # Whatever goes wrong with one task -- its image, the detector on it, a bug -- fails that
        # task alone with a named error; the others are served.
        for i, (task, (_, ref), future) in enumerate(zip(tasks, references, futures, strict=True)):
            task_id = task.get("id") if isinstance(task, dict) else None
            if not isinstance(task_id, int) or isinstance(task_id, bool):
                task_id = None
            out.append(TaskPrediction(task_id, [], 0.0, model.version))
            if future is None:
                out[i] = TaskPrediction(task_id, [], 0.0, model.version, ref, 422)
                continue
            try:
                good.append((i, future.result()))
            except ImageError as exc:
                out[i] = TaskPrediction(
                    task_id, [], 0.0, model.version, exc.message, exc.status_code
                )
            except Exception as exc:
                log.exception("task %s: loading its image failed", task_id)
                message = f"loading the image failed: {type(exc).__name__}: {exc}"
                out[i] = TaskPrediction(task_id, [], 0.0, model.version, message, 500)
        if self.task_utility is not None and good:
            task_ids = [prediction.task_id for prediction in out]
            for i, meta in self.task_utility.score(project_id, tasks, task_ids, good).items():
                out[i].meta = meta
        if model.detector is not None and good:
            detector = model.detector
            images = [image for _, image in good]
            try:
                detections: list[Boxes | Exception] = list(detector.predict(images))
            except Exception:  # find the image that broke the batch: one at a time
                detections = []
                for image in images:
                    try:
                        detections.extend(detector.predict([image]))
                    except Exception as exc:
                        log.exception("the detector failed on one image")
                        detections.append(exc)
            for (i, _), boxes in zip(good, detections, strict=True):
                try:
                    if isinstance(boxes, Exception):
                        raise boxes
                    out[i] = self._to_prediction(tasks[i], boxes, config, model, out[i].meta)
                except Exception as exc:
                    message = f"the detector failed on the image: {type(exc).__name__}: {exc}"
                    out[i] = TaskPrediction(out[i].task_id, [], 0.0, model.version, message, 500)
        if project_id is not None:
            self._apply_rank_scores(project_id, out)
        return out

    def _apply_rank_scores(self, project_id: int, predictions: list[TaskPrediction]) -> None:
        scores = self.queue.rank_scores(project_id)
        for prediction in predictions:
            if prediction.task_id in scores:
                prediction.score = scores[prediction.task_id]

    @staticmethod
    def _image_reference(task: Any, config: LabelConfig) -> tuple[bool, str]:
        """``(True, reference)`` or ``(False, what is wrong with the task)``."""
        if not isinstance(task, dict):
            return False, "task is not a JSON object"
        data = task.get("data")
        if not isinstance(data, dict):
            return False, "task has no 'data' object"
        reference = data.get(config.image_key)
        if not isinstance(reference, str) or not reference:
            return False, f"task data has no image under ${config.image_key}"
        return True, reference

    @staticmethod
    def _to_prediction(
        task: dict[str, Any],
        boxes: Boxes,
        config: LabelConfig,
        model: LoadedModel,
        meta: dict[str, Any] | None = None,
    ) -> TaskPrediction:
        assert model.detector is not None
        regions, score = prediction_of(boxes, config, model.detector.labels)
        return TaskPrediction(task.get("id"), regions, score, model.version, meta=meta)

    # ------------------------------------------------------------------ /webhook
    def handle_webhook(self, payload: dict[str, Any]) -> WebhookOutcome:
        """Store what a Label Studio webhook carries; see :class:`WebhookHandler`."""
        return self.webhooks.handle(payload)

    def _annotation_stored(self, project_id: int, task_id: int) -> None:
        """Map the answer back to the task's open box queries (if any)."""
        try:
            self.box_queries.record_answer(project_id, task_id)
        except Exception:  # never lose the stored annotation over the bookkeeping
            log.exception(
                "box queries of task %s (project %s): answer not mapped", task_id, project_id
            )

    def _task_image(self, project_id: int, data: Mapping[str, Any]) -> Image.Image:
        project = self.store.get_project(project_id)
        if project is None:
            raise ValueError(f"project {project_id} is unknown")
        load = task_image_loader(
            self.studio.image_source(project), project.image_key, client=self._http
        )
        return load(data)

    def run_box_queries(
        self, project_id: int, request: BoxQueryRequest, wait: bool = False
    ) -> dict[str, Any]:
        """One box-level episode (:class:`BoxQueryManager`) on the queue thread (queue work runs
        one job at a time); ``wait`` answers with the episode when it is done."""
        if self.store.get_project(project_id) is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        return self._queue_job(
            self._box_state,
            project_id,
            {"measure": request.measure},
            lambda: self.box_queries.run_episode(project_id, request),
            wait,
        )

    def _queue_job(
        self,
        states: dict[int, dict[str, Any]],
        project_id: int,
        tag: dict[str, Any],
        work: Callable[[], dict[str, Any]],
        wait: bool,
    ) -> dict[str, Any]:
        """Run ``work`` on the queue thread (queue jobs run one at a time, off the request path)
        with its state (queued → running → done / failed) in ``states[project_id]``; ``wait``
        answers when it is done, a failure as the :class:`ServiceError` it carries (a failed
        order was a 202 holding ``status_code`` 500)."""
        states[project_id] = {"state": "queued", **tag}

        def run() -> None:
            states[project_id] = {"state": "running", **tag}
            try:
                result = work()
            except ServiceError as exc:  # it says what is wrong and its status (409: no model)
                log.warning("queue job %s of project %s: %s", tag, project_id, exc.message)
                failed = {"error": exc.message, "status_code": exc.status_code}
                states[project_id] = {"state": "failed", **tag, **failed}
                return
            except Exception as exc:
                log.exception("queue job %s of project %s failed", tag, project_id)
                failed = {"error": f"{type(exc).__name__}: {exc}", "status_code": 500}
                states[project_id] = {"state": "failed", **tag, **failed}
                return
            states[project_id] = {"state": "done", **result}

        future = self._queue_pool.submit(run)
        if wait:
            future.result()
        state = dict(states[project_id])
        if wait and state["state"] == "failed":
            raise ServiceError(int(state["status_code"]), state["error"])
        return state

    def run_bulk_predict(
        self,
        project_id: int,
        request: BulkPredictRequest,
        wait: bool = False,
        progress: bool = False,
        in_process: bool = False,
    ) -> dict[str, Any]:
        """Pre-annotate every task lacking a prediction of the serving version; see
        :class:`~backend.bulk.runs.BulkRuns` (a niced child process unless ``in_process``)."""
        return self.bulk_runs.start(
            project_id, request, wait=wait, progress=progress, in_process=in_process
        )

    def _tasks_created(self, project_id: int, task_ids: list[int]) -> None:
        if self.store.get_order(project_id) is not None:
            self._queue_pool.submit(self._place_new, project_id, task_ids)
        for listener in self.on_tasks_created:
            try:
                listener(project_id, task_ids)
            except Exception:  # the tasks are recorded; a listener's failure is only logged
                log.exception("after TASKS_CREATED of project %s", project_id)

    # ------------------------------------------------------------------ training
    def maybe_schedule_training(self, project_id: int) -> int | None:
        """Queue training once enough new annotations arrived since the last version."""
        project = self.store.get_project(project_id)
        if project is None:
            return None
        new = self.store.count_annotations_since(project_id, project.trained_revision)
        if new < max(1, self.settings.train_after_new_annotations):
            return None
        active = self.scheduler.active_job(project_id)
        if active is not None:
            job = self.store.get_job(active)
            if job is not None and job.status == "queued":
                return active
        return self.scheduler.request(project_id, f"{new} new annotations")

    def train_now(
        self, project_id: int, here: Callable[[TrainingJob], None] | None = None
    ) -> TrainingJob:
        """Queue a training job (``/train``); with ``here``, train it in this process, showing
        it to ``here`` as it goes, and return it at its end (``boxloop train``)."""
        if self.store.get_project(project_id) is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        if here is not None:
            return self.scheduler.train_here(project_id, "requested via boxloop train", here)
        job = self.store.get_job(self.scheduler.request(project_id, "requested via /train"))
        assert job is not None
        return job

    # ------------------------------------------------------------------ queue order
    def order_project(
        self, project_id: int, request: OrderRequest, wait: bool = False
    ) -> dict[str, Any]:
        """Order a project's queue; in the background unless ``wait``."""
        if self.store.get_project(project_id) is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        from backend.ordering import STRATEGIES

        if request.strategy not in STRATEGIES:
            raise ServiceError(
                422, f"unknown strategy {request.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if request.batch_size < 1:
            raise ServiceError(422, "batch_size must be at least 1")
        return self._queue_job(
            self._queue_state,
            project_id,
            {"strategy": request.strategy},
            lambda: self.queue.order(project_id, request).to_dict(),
            wait,
        )

    def _refresh_queue(self, project_id: int, version: str) -> None:
        """After a swap-in: the next batch pre-annotated by ``version``, the order kept."""

        def predict(tasks: list[tuple[int, dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
            payload = [{"id": t, "data": data, "project": project_id} for t, data in tasks]
            out = self.predict(payload, None, project_id)
            return {
                int(p.task_id): p.result
                for p in out
                if p.task_id is not None and p.error is None and p.model_version == version
            }

        try:
            refresh = self.queue.refresh_for_version(project_id, version, predict)
        except Exception:
            log.exception("carrying the queue of project %s over to %s failed", project_id, version)
            return
        if refresh is not None:
            state = self._queue_state.get(project_id) or {}
            self._queue_state[project_id] = {**state, "refreshed": refresh.to_dict()}

    def _place_new(self, project_id: int, task_ids: list[int]) -> None:
        try:
            changed = self.queue.place_new(project_id, task_ids)
            log.info(
                "project %s: placed %d new tasks, %d ranks changed",
                project_id,
                len(task_ids),
                len(changed),
            )
        except Exception:
            log.exception("placing new tasks of project %s failed", project_id)

    # ------------------------------------------------------------------ /status
    def status(self) -> dict[str, Any]:
        projects_out = []
        for project in self.store.list_projects():
            jobs = self.store.list_jobs(project.id, limit=5)
            order = self.store.get_order(project.id)
            projects_out.append(
                {
                    "id": project.id,
                    "labels": project.labels,
                    "serving_version": self.models.serving_version(project.id, project.labels),
                    "model_versions": self.models.versions_status(project.id),
                    "annotations": self.store.annotation_counts(project.id),
                    "new_annotations_since_training": self.store.count_annotations_since(
                        project.id, project.trained_revision
                    ),
                    "train_after_new_annotations": self.settings.train_after_new_annotations,
                    "training_jobs": [  # owner, heartbeat: who runs it, and if alive
                        {k: v for k, v in asdict(j).items() if k != "project_id"} for j in jobs
                    ],
                    "bulk_predict": self.bulk_runs.status(project.id),
                    "box_queries": {
                        "job": self._box_state.get(project.id),
                        "episodes": self.box_queries.status(project.id),
                    },
                    "utility": None
                    if self.utility is None
                    else self.utility.policy.counts(
                        stored_scores(self.store.list_tasks(project.id), self.utility.field)
                    ),
                    "queue": None
                    if order is None
                    else {
                        "strategy": order.strategy,
                        "params": order.params,
                        "tasks": len(order.task_ids),
                        "view_id": order.view_id,
                        "updated_at": order.updated_at.isoformat() + "Z",
                        "carried_over": self._queue_state.get(project.id, {}).get("refreshed"),
                    },
                }
            )
        return {"projects": projects_out}
