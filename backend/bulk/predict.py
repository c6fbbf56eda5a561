"""Bulk pre-annotation: every task of a project without a prediction of the serving version
gets one, pushed to Label Studio in batches; resumable, and nothing is predicted twice.

Why not Label Studio's "Retrieve predictions": it calls ``/predict`` synchronously for the
whole selection and times out at the gateway after about 90 s on large selections (label-studio
#6422, #9098). Here the backend drives: it lists the tasks itself, fetches their images
concurrently, runs the detector in batches (in process, or on Ray), and imports predictions
through the SDK.

Exactly-once comes from Label Studio's own record: a run lists each task's prediction versions
(:meth:`StudioClient.iter_task_versions`) and predicts only tasks lacking the serving version,
so a run killed at any point resumes where it stopped (a batch imported just before the kill is
seen as done). The store's ledger (``bulk_predictions``) says what each run did with each task
(done / failed / skipped) and ``bulk_runs`` carries the progress ``/status`` shows.
A task deleted in Label Studio after the listing fails its import; the batch is retried
without it and the task is recorded as skipped.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from backend.bulk.engine import Engine, InProcessEngine, make_engine
from backend.bulk.work import DetectorSpec, ItemResult, LoadedSpec, ModelSpec, WorkItem
from backend.errors import ServiceError
from backend.images import ImageSource
from backend.ingest import MAX_ID, stored_label_config
from backend.labelstudio.convert import (
    LabelConfig,
    prediction_of,
)
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import Store, utcnow

__all__ = ["BulkPredictRequest", "BulkPredictor", "BulkReport"]

log = logging.getLogger(__name__)

#: Errors kept in a report (the ledger keeps every one).
_REPORTED_ERRORS = 20


class BulkPredictRequest(BaseModel):
    """One bulk run's options (HTTP body and CLI flags); unset fields take the settings'."""

    model_config = ConfigDict(extra="forbid")

    ray: bool | None = Field(
        default=None,
        description="Run on the Ray cluster (BOXLOOP_RAY_ADDRESS); default: when it is set.",
    )
    limit: int | None = Field(
        default=None,
        ge=1,
        le=MAX_ID,  # no project holds more tasks (ids are 32-bit); 2**63 broke the run itself
        description=f"Predict at most this many tasks this run (1 to {MAX_ID}).",
    )
    batch_size: int | None = Field(
        default=None, ge=1, le=1024, description="Images per inference batch."
    )
    fetch_concurrency: int | None = Field(
        default=None, ge=1, le=256, description="Images fetched at once."
    )
    push_batch: int | None = Field(
        default=None, ge=1, le=5000, description="Predictions per import."
    )


@dataclass
class BulkReport:
    """What a run did. ``already``: tasks that had a prediction of the version before it."""

    run_id: int
    project_id: int
    model_version: str
    engine: str
    listed: int = 0
    already: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": "done",
            "run_id": self.run_id,
            "project_id": self.project_id,
            "model_version": self.model_version,
            "engine": self.engine,
            "listed": self.listed,
            "already": self.already,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 2),
            "tasks_per_s": round(self.done / self.seconds, 2) if self.seconds > 0 else None,
            "errors": {str(k): v for k, v in self.errors.items()},
        }


class BulkPredictor:
    """Runs bulk pre-annotation for a project (one run per project at a time)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        models: ModelRegistry,
        *,
        studio_for: Callable[[int], Any],
        image_source_for: Callable[[int], ImageSource],
        rank_scores_for: Callable[[int], Mapping[int, float]] = lambda _pid: {},
    ) -> None:
        self.settings = settings
        self.store = store
        self.models = models
        self._studio_for = studio_for
        self._image_source_for = image_source_for
        self._rank_scores_for = rank_scores_for
        self._running: set[int] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public
    def check(self, project_id: int, request: BulkPredictRequest) -> None:
        """Refuse at once what a run would refuse (see :meth:`run`), doing no work: the server
        answers these before it starts a run in a child process."""
        self._prepare(project_id, request)

    def run(
        self,
        project_id: int,
        request: BulkPredictRequest,
        *,
        progress: bool = True,
        on_start: Callable[[], None] = lambda: None,
    ) -> BulkReport:
        """Pre-annotate the project's tasks lacking a prediction of the serving version.

        Raises :class:`ServiceError` 404 (unknown project), 409 (no model serves boxes, no
        Label Studio access, a run already going, or a PyTorch-only version on Ray) before
        any work; ``on_start`` is called once those checks passed.
        """
        config, studio, engine, spec, version = self._prepare(project_id, request)
        with self._lock:
            if project_id in self._running:
                raise ServiceError(409, f"a bulk run of project {project_id} is already going")
            self._running.add(project_id)
        on_start()
        try:
            return self._run(project_id, config, studio, engine, spec, version, request, progress)
        finally:
            with self._lock:
                self._running.discard(project_id)

    def _prepare(
        self, project_id: int, request: BulkPredictRequest
    ) -> tuple[LabelConfig, Any, Engine, ModelSpec, str]:
        project = self.store.get_project(project_id)
        if project is None:
            raise ServiceError(
                404, f"project {project_id} is unknown to boxloop (connect it first)"
            )
        config = stored_label_config(project)
        model = self.models.current(project_id, config.labels)
        if model.detector is None:
            raise ServiceError(
                409,
                f"no model pre-annotates project {project_id}: none of its labels names a COCO "
                "class and no version has been trained yet",
            )
        studio = self._studio_for(project_id)
        if studio is None:
            raise ServiceError(
                409,
                "bulk prediction pushes to Label Studio: set BOXLOOP_LABEL_STUDIO_URL and "
                "BOXLOOP_LABEL_STUDIO_TOKEN",
            )
        use_ray = bool(self.settings.ray_address) if request.ray is None else request.ray
        if use_ray and not self.settings.ray_address:
            raise ServiceError(409, "--ray / ray=true needs BOXLOOP_RAY_ADDRESS (a Ray cluster)")
        engine = make_engine(
            ray_address=self.settings.ray_address if use_ray else None,
            batch_size=request.batch_size or self.settings.bulk_batch_size,
            fetch_concurrency=request.fetch_concurrency or self.settings.bulk_fetch_concurrency,
        )
        spec = self._spec(model.detector, model.version, engine)
        return config, studio, engine, spec, model.version

    def status(self, project_id: int) -> list[dict[str, Any]]:
        """The project's last bulk runs, newest first (``/status``)."""
        return [
            {
                "id": r.id,
                "model_version": r.model_version,
                "engine": r.engine,
                "status": r.status,
                "total": r.total,
                "done": r.done,
                "failed": r.failed,
                "skipped": r.skipped,
                "message": r.message,
                "started_at": r.created_at.isoformat() + "Z",
                "finished_at": None if r.finished_at is None else r.finished_at.isoformat() + "Z",
            }
            for r in self.store.list_bulk_runs(project_id)
        ]

    # ------------------------------------------------------------------ the run
    def _spec(self, detector: Any, version: str, engine: Engine) -> ModelSpec:
        if isinstance(engine, InProcessEngine):
            return LoadedSpec(version, detector)  # the serving session itself: loaded once
        try:
            return DetectorSpec.from_detector(detector, num_threads=1)
        except ValueError as exc:
            raise ServiceError(409, str(exc)) from exc

    def _run(
        self,
        project_id: int,
        config: LabelConfig,
        studio: Any,
        engine: Engine,
        spec: ModelSpec,
        version: str,
        request: BulkPredictRequest,
        progress: bool,
    ) -> BulkReport:
        run_id = self.store.create_bulk_run(project_id, version, engine.name)
        report = BulkReport(run_id, project_id, version, engine.name)
        start = time.perf_counter()
        source = self._image_source_for(project_id)
        push_batch = request.push_batch or self.settings.bulk_push_batch
        ranks = self._rank_scores_for(project_id)
        bar = tqdm(desc=f"bulk predict {version}", unit="task", disable=not progress, mininterval=1)
        pusher = ThreadPoolExecutor(1, thread_name_prefix="bulk-push")
        pushing: Future[None] | None = None
        try:

            def todo() -> Iterator[WorkItem]:
                for task in studio.iter_task_versions(project_id):
                    report.listed += 1
                    versions = task["model_versions"]
                    if versions is None:  # the listing cut them: ask for this task's own
                        versions = studio.task_versions(task["id"])
                    if version in versions:
                        report.already += 1
                        continue
                    reference = task["data"].get(config.image_key)
                    if not isinstance(reference, str) or not reference:
                        self._fail(
                            report, task["id"], f"task data has no image under ${config.image_key}"
                        )
                        continue
                    yield WorkItem(task["id"], reference)

            limited = itertools.islice(todo(), request.limit)
            batch: list[tuple[int, list[dict[str, Any]], float]] = []
            for result in engine.run(limited, spec, source):
                bar.update(1)
                prediction = self._prediction(result, config, spec, ranks, report)
                if prediction is not None:
                    batch.append(prediction)
                if len(batch) >= push_batch:
                    if pushing is not None:
                        pushing.result()  # one import in flight, in order
                    pushing = pusher.submit(self._push, studio, project_id, version, batch, report)
                    batch = []
            if pushing is not None:
                pushing.result()
            if batch:
                self._push(studio, project_id, version, batch, report)
        except BaseException as exc:
            report.seconds = time.perf_counter() - start
            stopped = isinstance(exc, KeyboardInterrupt)  # Ctrl-C, or SIGTERM in the bulk worker
            self.store.update_bulk_run(
                run_id,
                status="interrupted" if stopped else "failed",
                message=(
                    f"stopped by {str(exc) or 'Ctrl-C'}; a new run resumes where this one stopped"
                    if stopped
                    else f"{type(exc).__name__}: {exc}"
                )[:2000],
                finished_at=utcnow(),
                **self._counts(report),
            )
            raise
        finally:
            pusher.shutdown(wait=True)
            bar.close()
        report.seconds = time.perf_counter() - start
        self.store.update_bulk_run(
            run_id, status="done", finished_at=utcnow(), message=None, **self._counts(report)
        )
        log.info("project %s: bulk run %s: %s", project_id, run_id, report.to_dict())
        return report

    def _prediction(
        self,
        result: ItemResult,
        config: LabelConfig,
        spec: ModelSpec,
        ranks: Mapping[int, float],
        report: BulkReport,
    ) -> tuple[int, list[dict[str, Any]], float] | None:
        if not result.ok:
            self._fail(report, result.task_id, str(result.error))
            return None
        regions, score = prediction_of(result.value, config, _detector_labels(spec))
        score = ranks.get(result.task_id, score)
        return result.task_id, regions, float(score)

    def _fail(self, report: BulkReport, task_id: int, error: str) -> None:
        report.failed += 1
        if len(report.errors) < _REPORTED_ERRORS:
            report.errors[task_id] = error
        self.store.mark_bulk(
            report.project_id,
            report.model_version,
            {task_id: "failed"},
            report.run_id,
            {task_id: error},
        )

    def _push(
        self,
        studio: Any,
        project_id: int,
        version: str,
        batch: list[tuple[int, list[dict[str, Any]], float]],
        report: BulkReport,
    ) -> None:
        """Import one batch; a task deleted since the listing is dropped and recorded. One
        store write per batch (ledger and progress together); Label Studio's own record, not
        the ledger, tells a resumed run what was imported."""
        deleted = set(studio.import_predictions(project_id, version, batch))
        report.done += len(batch) - len(deleted)
        report.skipped += len(deleted)
        states = {t: ("skipped" if t in deleted else "done") for t, _, _ in batch}
        self.store.mark_bulk(
            project_id,
            version,
            states,
            report.run_id,
            dict.fromkeys(deleted, "deleted in Label Studio"),
            run_counts=self._counts(report),
        )

    @staticmethod
    def _counts(report: BulkReport) -> dict[str, int]:
        return {
            "total": report.listed - report.already,
            "done": report.done,
            "failed": report.failed,
            "skipped": report.skipped,
        }


def _detector_labels(spec: ModelSpec) -> list[str]:
    if isinstance(spec, LoadedSpec):
        return list(spec.model.labels)
    if isinstance(spec, DetectorSpec):
        return list(spec.labels)
    raise TypeError(f"not a detector spec: {spec!r}")
