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
from dataclasses import dataclass
from typing import Any

import httpx
import torch
from PIL import Image

from backend.box_queries import BoxQueryManager, BoxQueryRequest
from backend.boxes import Boxes
from backend.bulk.predict import BulkPredictor, BulkPredictRequest
from backend.bulk.runs import BulkRuns
from backend.errors import ServiceError
from backend.images import (
    ImageError,
    ImageSource,
    image_source_for,
    load_image,
    task_image_loader,
    trusted_studio_url,
)
from backend.jobs import TrainingScheduler
from backend.labelstudio.convert import (
    LabelConfig,
    LabelConfigError,
    parse_label_config,
    prediction_of,
)
from backend.queueing import OrderRequest, QueueManager
from backend.registry import LoadedModel, ModelRegistry
from backend.settings import Settings
from backend.store import Project, Store
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
        self._setup_tokens: dict[int, str] = {}
        self.models = ModelRegistry(settings, self.store, studio_for=self._studio_client)
        self._http = httpx.Client(timeout=settings.image_fetch_timeout_s, follow_redirects=False)
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="boxloop-fetch")
        self.scheduler = TrainingScheduler(
            settings, self.store, on_success=self._on_new_version, extra_env=self._worker_env
        )
        # image utility: off unless BOXLOOP_UTILITY_MODEL names an exported predictor
        self.utility = UtilityScorer.from_settings(settings)
        self.queue = QueueManager(
            settings,
            self.store,
            studio_for=self._studio_client,
            image_source_for=lambda pid: self.image_source(self.store.get_project(pid)),
            utility=self.utility,
        )
        self.box_queries = BoxQueryManager(
            settings,
            self.store,
            self.models,
            studio_for=self._studio_client,
            load_task_image=self._task_image,
            sync_tasks=self.queue.sync_tasks,
        )
        self.bulk = BulkPredictor(
            settings,
            self.store,
            self.models,
            studio_for=self._studio_client,
            image_source_for=lambda pid: self.image_source(self.store.get_project(pid)),
            rank_scores_for=self._rank_scores,
        )
        self.bulk_runs = BulkRuns(settings, self.bulk, worker_env=self._worker_env)
        self.webhooks = WebhookHandler(
            self.store,
            schedule_training=self.maybe_schedule_training,
            request_training=lambda pid: self.scheduler.request(pid, "START_TRAINING"),
            tasks_created=self._tasks_created,
            annotation_stored=self._annotation_stored,
        )
        # queue work (features, ordering, pushes) runs one job at a time, off the request path
        self._queue_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boxloop-queue")
        self._queue_state: dict[int, dict[str, Any]] = {}
        self._box_state: dict[int, dict[str, Any]] = {}
        torch.set_num_threads(max(1, settings.num_threads))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Recover interrupted jobs, start the scheduler, reconcile in the background."""
        requeued = self.scheduler.recover()
        if requeued:
            log.info("requeued training jobs after restart: %s", requeued)
        self.scheduler.start()
        if self.settings.reconcile_on_startup and self._studio_configured():
            threading.Thread(
                target=self._reconcile_all, name="boxloop-reconcile", daemon=True
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
        """A training job finished: swap a promoted version in; a rejected one changes nothing."""
        if not self.models.swap_in(project_id, version):
            log.info(
                "project %s: %s was not promoted, the serving version stays", project_id, version
            )
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

    # ------------------------------------------------------------------ Label Studio
    def _token_for(self, project_id: int | None) -> str | None:
        if self.settings.label_studio_token is not None:
            return self.settings.label_studio_token.get_secret_value()
        return self._setup_tokens.get(project_id) if project_id is not None else None

    def _studio_configured(self) -> bool:
        return bool(self.settings.label_studio_url and self.settings.label_studio_token)

    def _studio_client(self, project_id: int) -> Any:
        url = self._studio_url(self.store.get_project(project_id))
        token = self._token_for(project_id)
        if not url or not token:
            return None
        from backend.labelstudio.client import StudioClient

        return StudioClient(url, token)

    def _studio_url(self, project: Project | None) -> str | None:
        """The configured Label Studio URL, else the /setup hostname if allow-listed (no SSRF)."""
        hostname = project.hostname if project else None
        return trusted_studio_url(
            self.settings.label_studio_url, hostname, self.settings.allowed_image_hosts
        )

    def _worker_env(self, project_id: int) -> dict[str, str]:
        env: dict[str, str] = {}
        token = self._token_for(project_id)
        url = self._studio_url(self.store.get_project(project_id))
        if token and url:
            env["BOXLOOP_LABEL_STUDIO_TOKEN"] = token
            env["BOXLOOP_LABEL_STUDIO_URL"] = url
        return env

    def _reconcile_all(self) -> None:
        from backend.reconcile import reconcile_project

        for project in self.store.list_projects():
            client = self._studio_client(project.id)
            if client is None:
                continue
            try:
                reconcile_project(
                    self.store, client, project.id, parse_label_config(project.label_config)
                )
                self.maybe_schedule_training(project.id)
            except Exception as exc:
                log.warning("start-up reconcile of project %s failed: %s", project.id, exc)

    def image_source(self, project: Project | None) -> ImageSource:
        project_id = project.id if project else None
        return image_source_for(
            label_studio_url=self.settings.label_studio_url,
            setup_hostname=project.hostname if project else None,
            token=self._token_for(project_id),
            allowed_local_roots=self.settings.allowed_local_roots,
            max_pixels=self.settings.max_image_pixels,
            max_bytes=self.settings.max_image_bytes,
            timeout_s=self.settings.image_fetch_timeout_s,
            allowed_hosts=self.settings.allowed_image_hosts,
        )

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
        self.store.upsert_project(
            project_id,
            label_config=label_config,
            from_name=config.from_name,
            to_name=config.to_name,
            image_key=config.image_key,
            labels=config.labels,
            hostname=hostname,
        )
        if access_token:
            self._setup_tokens[project_id] = access_token
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
            config = parse_label_config(stored.label_config)
        elif project_id is not None:
            raise ServiceError(
                404,
                f"project {project_id} is unknown to boxloop and the request has no "
                "label_config (Label Studio calls /setup when the model is connected)",
            )
        else:
            raise ServiceError(422, "the request names no project and has no label_config")
        model = self.current_model(project_id, config.labels)
        source = self.image_source(stored)
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
        if self.utility is not None and good:
            self._score_utility(project_id, tasks, good, out)
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

    def _score_utility(
        self,
        project_id: int | None,
        tasks: Sequence[Any],
        good: list[tuple[int, Image.Image]],
        out: list[TaskPrediction],
    ) -> None:
        """Each loaded image's utility into its prediction's meta; the scores into the tasks'
        data field (boxloop's store, then Label Studio, in the background). A failure here never
        fails a prediction: it is logged and the boxes go out without a utility."""
        assert self.utility is not None
        try:
            scores = self.utility.score([image for _, image in good])
        except Exception:
            log.exception("utility scoring failed; predictions go out without it")
            return
        updates: dict[int, dict[str, Any]] = {}
        for (i, _), score in zip(good, scores, strict=True):
            out[i].meta = self.utility.policy.meta(score)
            task, task_id = tasks[i], out[i].task_id
            data = task.get("data")
            if task_id is not None and isinstance(data, dict):
                new = self.utility.with_score(data, score)
                if data.get(self.utility.field) != new[self.utility.field]:  # unchanged: no PATCH
                    updates[task_id] = new
        if project_id is not None and updates:
            self._queue_pool.submit(self._record_utility, project_id, updates)

    def _record_utility(self, project_id: int, updates: dict[int, dict[str, Any]]) -> None:
        try:
            if self.store.get_project(project_id) is not None:
                self.store.upsert_tasks(project_id, list(updates.items()))
            studio = self._studio_client(project_id)
            if studio is not None:
                from backend.labelstudio.queue import write_task_data

                write_task_data(studio, project_id, updates)
        except Exception:
            log.exception("project %s: storing utility scores failed", project_id)

    def _rank_scores(self, project_id: int) -> dict[int, float]:
        """Under Uncertainty-sampling ordering the task score *is* the queue position: a new
        prediction must carry the task's rank score, or it would reorder the queue. ``{}``
        under any other ordering."""
        order = self.store.get_order(project_id)
        if order is None or not order.params.get("uncertainty_scores"):
            return {}
        from backend.labelstudio.queue import rank_score

        ranks = zip(order.task_ids, order.params.get("ranks") or [], strict=False)
        return {int(task_id): rank_score(int(rank)) for task_id, rank in ranks}

    def _apply_rank_scores(self, project_id: int, predictions: list[TaskPrediction]) -> None:
        scores = self._rank_scores(project_id)
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
        load = task_image_loader(self.image_source(project), project.image_key, client=self._http)
        return load(data)

    def run_box_queries(
        self, project_id: int, request: BoxQueryRequest, wait: bool = False
    ) -> dict[str, Any]:
        """One box-level episode (:class:`BoxQueryManager`) on the queue thread (queue work runs
        one job at a time); ``wait`` answers with the episode when it is done."""
        if self.store.get_project(project_id) is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        state = self._queue_job(
            self._box_state,
            project_id,
            {"measure": request.measure},
            lambda: self.box_queries.run_episode(project_id, request),
            wait,
        )
        if state["state"] == "failed":
            raise ServiceError(int(state["status_code"]), state["error"])
        return state

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
        answers when it is done."""
        states[project_id] = {"state": "queued", **tag}

        def run() -> None:
            states[project_id] = {"state": "running", **tag}
            try:
                result = work()
            except Exception as exc:
                log.exception("queue job %s of project %s failed", tag, project_id)
                states[project_id] = {
                    "state": "failed",
                    **tag,
                    "error": f"{type(exc).__name__}: {exc}",
                    # a ServiceError says which HTTP status it is (e.g. 409: no model yet)
                    "status_code": exc.status_code if isinstance(exc, ServiceError) else 500,
                }
                return
            states[project_id] = {"state": "done", **result}

        future = self._queue_pool.submit(run)
        if wait:
            future.result()
        return dict(states[project_id])

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

    def train_now(self, project_id: int) -> int:
        if self.store.get_project(project_id) is None:
            raise ServiceError(404, f"project {project_id} is unknown to boxloop")
        return self.scheduler.request(project_id, "requested via /train")

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
                    "training_jobs": [
                        {
                            "id": j.id,
                            "status": j.status,
                            "reason": j.reason,
                            "progress": j.progress,
                            "message": j.message,
                            "error": j.error,
                            "model_version": j.model_version,
                        }
                        for j in jobs
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
