"""The engine facade the HTTP app and the CLI call: setup, predict, webhooks, training.

``BoxloopService`` owns the store, the loaded model per project and the training
scheduler. It knows nothing about HTTP: methods take and return plain typed
values and raise :class:`ServiceError` (with a status code and a message a user
can act on) for bad input.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

from backend.boxes import Boxes
from backend.detectors import Detector, OnnxYoloxDetector, load_torch_detector
from backend.images import (
    ImageError,
    ImageSource,
    image_source_for,
    load_image,
    trusted_studio_url,
)
from backend.ingest import AnnotationPayloadError, ingest_annotation
from backend.jobs import TrainingScheduler
from backend.labelstudio.convert import (
    LabelConfig,
    LabelConfigError,
    boxes_to_regions,
    parse_label_config,
    task_score,
)
from backend.queueing import OrderRequest, QueueManager
from backend.settings import Settings
from backend.store import Project, Store

log = logging.getLogger(__name__)

UNTRAINED_VERSION = "boxloop-untrained"


class ServiceError(Exception):
    """Bad input or state, with the HTTP status a caller should see."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass
class LoadedModel:
    version: str
    detector: Detector | None


@dataclass
class TaskPrediction:
    task_id: int | None
    result: list[dict[str, Any]]
    score: float
    model_version: str
    error: str | None = None
    status_code: int = 200

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "score": self.score, "model_version": self.model_version}


@dataclass
class WebhookOutcome:
    action: str
    stored: int = 0
    deleted: int = 0
    tasks: int = 0
    training_job: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok", "action": self.action}
        for key in ("stored", "deleted", "tasks"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.training_job is not None:
            out["training_job"] = self.training_job
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def parse_project_id(value: Any) -> int | None:
    """Label Studio sends the project as ``7`` or ``"7.1795390608"`` (id.timestamp)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        head = value.split(".", 1)[0].strip()
        if head.isdigit():
            return int(head)
    return None


class BoxloopService:
    """Everything the backend does, behind plain method calls."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or Store(settings.resolved_database_url)
        self._models: dict[int, LoadedModel] = {}
        self._models_lock = threading.Lock()
        self._setup_tokens: dict[int, str] = {}
        self._pretrained: OnnxYoloxDetector | None = None
        self._pretrained_loaded = False
        self._http = httpx.Client(timeout=settings.image_fetch_timeout_s, follow_redirects=False)
        self._fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="boxloop-fetch")
        self.scheduler = TrainingScheduler(
            settings, self.store, on_success=self._on_new_version, extra_env=self._worker_env
        )
        self.queue = QueueManager(
            settings,
            self.store,
            studio_for=self._studio_client,
            image_source_for=lambda pid: self.image_source(self.store.get_project(pid)),
        )
        # queue work (features, ordering, pushes) runs one job at a time, off the request path
        self._queue_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="boxloop-queue")
        self._queue_state: dict[int, dict[str, Any]] = {}
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
        self._queue_pool.shutdown(wait=False, cancel_futures=True)
        self._fetch_pool.shutdown(wait=False)
        self._http.close()

    # ------------------------------------------------------------------ models
    def _pretrained_detector(self) -> OnnxYoloxDetector | None:
        if not self._pretrained_loaded:
            self._pretrained_loaded = True
            path = self.settings.resolved_onnx_model_path
            if path is not None:
                try:
                    self._pretrained = OnnxYoloxDetector.from_path(
                        Path(path),
                        self.settings.onnx_class_names_path,
                        num_threads=self.settings.num_threads,
                        score_threshold=self.settings.score_threshold,
                        max_detections=self.settings.max_detections,
                    )
                except (OSError, ValueError) as exc:
                    log.error("could not load the ONNX detector %s: %s", path, exc)
        return self._pretrained

    def current_model(
        self, project_id: int | None, labels: Sequence[str] | None = None
    ) -> LoadedModel:
        """The model serving a project: its newest trained version, else the pretrained one."""
        if project_id is not None:
            with self._models_lock:
                loaded = self._models.get(project_id)
            if loaded is not None:
                return loaded
            latest = self.store.latest_model_version(project_id)
            if latest is not None:
                detector = load_torch_detector(Path(latest.path), self.settings)
                loaded = LoadedModel(latest.version, detector)
                with self._models_lock:
                    self._models[project_id] = loaded
                return loaded
        pretrained = self._pretrained_detector()
        if pretrained is not None and labels:
            mapped = pretrained.with_labels(labels)
            if mapped.class_map:
                return LoadedModel(mapped.version, mapped)
        return LoadedModel(UNTRAINED_VERSION, None)

    def _on_new_version(self, project_id: int, version: str) -> None:
        record = next(
            (v for v in self.store.list_model_versions(project_id) if v.version == version), None
        )
        if record is None:
            return
        detector = load_torch_detector(Path(record.path), self.settings)
        with self._models_lock:
            self._models[project_id] = LoadedModel(version, detector)
        log.info("project %s now served by %s", project_id, version)
        order = self.store.get_order(project_id)
        if order is not None and order.params.get("uncertainty_scores"):
            # The new version's scores must be in Label Studio before the project switches to
            # it (the title update does that), or the queue would have no order in between.
            self._queue_pool.submit(self._carry_over_then_retitle, project_id, version)
        else:
            self._update_backend_title(project_id, version)
        self.maybe_schedule_training(project_id)

    def _carry_over_then_retitle(self, project_id: int, version: str) -> None:
        self._refresh_queue(project_id, version)
        self._update_backend_title(project_id, version)

    def _update_backend_title(self, project_id: int, version: str) -> None:
        client = self._studio_client(project_id)
        if client is None:
            return
        try:
            client.set_backend_title(project_id, None, version)
        except Exception as exc:  # Label Studio down: the next /setup returns the version anyway
            log.warning("could not update the ML backend title in Label Studio: %s", exc)

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
                    out[i] = self._to_prediction(tasks[i], boxes, config, model)
                except Exception as exc:
                    message = f"the detector failed on the image: {type(exc).__name__}: {exc}"
                    out[i] = TaskPrediction(out[i].task_id, [], 0.0, model.version, message, 500)
        if project_id is not None:
            self._apply_rank_scores(project_id, out)
        return out

    def _apply_rank_scores(self, project_id: int, predictions: list[TaskPrediction]) -> None:
        """Under Uncertainty-sampling ordering the task score *is* the queue position: a new
        prediction must carry the task's rank score, or it would reorder the queue."""
        order = self.store.get_order(project_id)
        if order is None or not order.params.get("uncertainty_scores"):
            return
        from backend.labelstudio.queue import rank_score

        ranks = dict(zip(order.task_ids, order.params.get("ranks") or [], strict=False))
        for prediction in predictions:
            if prediction.task_id in ranks:
                prediction.score = rank_score(int(ranks[prediction.task_id]))

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
        task: dict[str, Any], boxes: Boxes, config: LabelConfig, model: LoadedModel
    ) -> TaskPrediction:
        assert model.detector is not None
        regions = boxes_to_regions(boxes, config, model.detector.labels)
        served = boxes[
            [
                i
                for i, name in enumerate(boxes.labels)
                if model.detector.labels[int(name)] in config.labels
            ]
        ]
        score = task_score(served)
        return TaskPrediction(task.get("id"), regions, score, model.version)

    # ------------------------------------------------------------------ /webhook
    def handle_webhook(self, payload: dict[str, Any]) -> WebhookOutcome:
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
            outcome.warnings.append(f"action {action} is not used by boxloop")
            return outcome
        project = self._webhook_project(payload)
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
            self._store_annotation(project, payload.get("annotation"), payload.get("task"), outcome)
        elif action == "ANNOTATIONS_CREATED":
            items = payload.get("annotations")
            if not isinstance(items, list):
                raise ServiceError(400, "ANNOTATIONS_CREATED needs an 'annotations' list")
            for item in items:
                self._store_annotation(project, item, None, outcome)
        elif action == "ANNOTATIONS_DELETED":
            items = payload.get("annotations")
            if not isinstance(items, list):
                raise ServiceError(400, "ANNOTATIONS_DELETED needs an 'annotations' list")
            ids = [a.get("id") if isinstance(a, dict) else None for a in items]
            int_ids = [i for i in ids if isinstance(i, int)]
            if len(int_ids) != len(items):
                raise ServiceError(400, "ANNOTATIONS_DELETED: every annotation needs an integer id")
            outcome.deleted = self.store.delete_annotations(project.id, int_ids)
        elif action == "TASKS_CREATED":
            items = payload.get("tasks")
            if not isinstance(items, list):
                raise ServiceError(400, "TASKS_CREATED needs a 'tasks' list")
            rows = [
                (t["id"], t.get("data") or {})
                for t in items
                if isinstance(t, dict) and isinstance(t.get("id"), int)
            ]
            self.store.upsert_tasks(project.id, rows)
            outcome.tasks = len(rows)
            if rows and self.store.get_order(project.id) is not None:
                self._queue_pool.submit(self._place_new, project.id, [r[0] for r in rows])
        if action == "START_TRAINING":
            outcome.training_job = self.scheduler.request(project.id, "START_TRAINING")
        elif action != "TASKS_CREATED":
            outcome.training_job = self.maybe_schedule_training(project.id)
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
                    stored = self.store.upsert_project(
                        project_id,
                        label_config=label_config,
                        from_name=config.from_name,
                        to_name=config.to_name,
                        image_key=config.image_key,
                        labels=config.labels,
                    )
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
        config = parse_label_config(project.label_config)
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
        if result.parse_error:
            outcome.warnings.append(
                f"annotation {result.annotation_id} stored but not usable for training: "
                f"{result.parse_error}"
            )

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
        self._queue_state[project_id] = {"state": "queued", "strategy": request.strategy}
        future = self._queue_pool.submit(self._run_order, project_id, request)
        if wait:
            future.result()
        return dict(self._queue_state[project_id])

    def _run_order(self, project_id: int, request: OrderRequest) -> None:
        self._queue_state[project_id] = {"state": "running", "strategy": request.strategy}
        try:
            plan = self.queue.order(project_id, request)
        except Exception as exc:
            log.exception("ordering project %s failed", project_id)
            self._queue_state[project_id] = {
                "state": "failed",
                "strategy": request.strategy,
                "error": f"{type(exc).__name__}: {exc}",
            }
            return
        self._queue_state[project_id] = {"state": "done", **plan.to_dict()}

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
            versions = self.store.list_model_versions(project.id)
            jobs = self.store.list_jobs(project.id, limit=5)
            order = self.store.get_order(project.id)
            with self._models_lock:
                serving = self._models.get(project.id)
            projects_out.append(
                {
                    "id": project.id,
                    "labels": project.labels,
                    "serving_version": serving.version
                    if serving
                    else (
                        versions[-1].version
                        if versions
                        else self.current_model(None, project.labels).version
                    ),
                    "model_versions": [
                        {
                            "version": v.version,
                            "created_at": v.created_at.isoformat() + "Z",
                            "n_images": v.n_images,
                            "n_annotations": v.n_annotations,
                        }
                        for v in versions
                    ],
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
