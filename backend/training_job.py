"""One training job, start to finish: reconcile, gather samples, train, publish a version.

Runs in the worker process started by :mod:`backend.jobs`. The new version is
written to disk atomically and only then recorded in the store; the server
swaps it in after the job reports success, so the old version serves until then.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from backend.active import noisy_box_weights
from backend.box_queries import unverified_boxes
from backend.boxes import Boxes
from backend.detectors.fasterrcnn import resolve_arch
from backend.detectors.versions import read_metadata
from backend.detectors.yolox import load_coco_yolox_nano
from backend.images import (
    ImageError,
    ImageSource,
    decode_image,
    load_image,
    read_image_bytes,
)
from backend.ingest import reads_differently, stored_label_config
from backend.labelstudio.convert import (
    AnnotationParseError,
    LabelConfig,
    regions_to_boxes,
)
from backend.registry import ModelRegistry
from backend.settings import Settings
from backend.store import Project, Store, latest_per_task, utcnow
from backend.studio_access import StudioAccess
from backend.training import (
    ProgressFn,
    TrainConfig,
    TrainSample,
    load_model_version,
    save_model_version,
    train_detector,
)
from backend.training.calibration import unlabeled_sample
from backend.training.gate import GateConfig, LabeledImage, run_round
from backend.training.samples import LazyImage, in_memory
from backend.training.yolox_train import YoloxTrainConfig, initial_yolox

log = logging.getLogger(__name__)

#: Seconds between training progress writes to the store (``/status`` polls it).
_PROGRESS_INTERVAL_S = 1.0


class JobNotActive(RuntimeError):
    """The job ended (another server took it over) before its child began."""


def version_name(project_id: int, number: int) -> str:
    return f"boxloop-p{project_id}-v{number}"


@dataclass(frozen=True)
class GatheredSamples:
    samples: list[TrainSample]
    task_ids: list[int]
    n_annotations: int
    skipped: dict[str, int]


def _image_source(settings: Settings, store: Store, project: Project) -> ImageSource:
    """As serving fetches the project's images (same hosts, same token and header)."""
    return StudioAccess(settings, store).image_source(project)


def unannotated_images(
    settings: Settings,
    store: Store,
    project: Project,
    config: LabelConfig,
    annotated: set[int],
    limit: int,
) -> list[Image.Image]:
    """Up to ``limit`` images of tasks nobody annotated yet, picked by a hash of the task id.

    The gate carries its threshold to the candidate's score scale on them
    (:mod:`backend.training.calibration`); a task whose image does not load is left out.
    """
    tasks = [(t, data) for t, data in store.list_tasks(project.id) if t not in annotated]
    source = _image_source(settings, store, project)
    images: list[Image.Image] = []
    for index in unlabeled_sample([t for t, _ in tasks], 2 * limit):  # spares for failed loads
        reference = tasks[index][1].get(config.image_key)
        if not isinstance(reference, str):
            continue
        try:
            images.append(load_image(reference, source))
        except ImageError as exc:
            log.warning("task %s: not used to match box counts: %s", tasks[index][0], exc.message)
        if len(images) >= limit:
            break
    return images


def gather_samples(
    settings: Settings, store: Store, project: Project, config: LabelConfig
) -> GatheredSamples:
    """Each annotated task's image and its newest annotation's boxes.

    The boxes are the ones the store parsed at ingest (``Annotation.boxes``), rescaled when the
    image has another size than the one the annotator saw; an annotation the store could not
    parse is skipped and counted, never re-parsed here.
    """
    source = _image_source(settings, store, project)
    skipped = {"no_task_data": 0, "image_error": 0, "parse_error": 0}
    samples: list[TrainSample] = []
    task_ids: list[int] = []
    chosen = latest_per_task(store.list_annotations(project.id))
    # decoded pixels held; past the budget, images are kept encoded (``LazyImage``)
    held, budget = 0, settings.training_image_memory_mb * 1024 * 1024
    unverified = unverified_boxes(store, project.id)  # box-query tasks: shown, never asked
    for annotation in chosen:
        if annotation.parse_error is not None:
            log.warning(
                "task %s: annotation %s is not usable for training: %s",
                annotation.task_id,
                annotation.annotation_id,
                annotation.parse_error,
            )
            skipped["parse_error"] += 1
            continue
        data = store.get_task_data(project.id, annotation.task_id)
        reference = None if data is None else data.get(config.image_key)
        if not isinstance(reference, str):
            skipped["no_task_data"] += 1
            continue
        try:
            encoded = read_image_bytes(reference, source)
            image = decode_image(encoded, max_pixels=source.max_pixels, name=reference[:120])
        except ImageError as exc:
            log.warning("task %s: %s", annotation.task_id, exc.message)
            skipped["image_error"] += 1
            continue
        except Exception:  # one task's image never fails the whole job
            log.exception("task %s: loading its image failed", annotation.task_id)
            skipped["image_error"] += 1
            continue
        boxes = annotation.boxes
        if boxes is None:  # no region told the image size (e.g. an empty annotation)
            try:
                boxes = regions_to_boxes(annotation.result, config, image.size)
            except AnnotationParseError as exc:
                log.warning("task %s: %s", annotation.task_id, exc)
                skipped["parse_error"] += 1
                continue
        boxes = Boxes(boxes.xyxy, boxes.labels, boxes.image_size).in_frame(image.size)
        weights = None
        if annotation.task_id in unverified:
            shown, noisy_weight = unverified[annotation.task_id]
            weights = noisy_box_weights(boxes, shown, noisy_weight)
        pixels = image.width * image.height * 3
        kept: Image.Image | LazyImage = image
        if held + pixels > budget:  # the pixels stay in their file's bytes until used
            kept = LazyImage(
                image.size,
                partial(decode_image, encoded, max_pixels=source.max_pixels, name=reference[:120]),
            )
        else:
            held += pixels
        samples.append(TrainSample(image=kept, boxes=boxes, box_weights=weights))
        task_ids.append(annotation.task_id)
    return GatheredSamples(samples, task_ids, len(chosen), skipped)


def _gather_consistent(
    settings: Settings, store: Store, project_id: int, attempts: int = 3
) -> tuple[Project, LabelConfig, int, GatheredSamples]:
    """The project's label config, annotation revision and samples, read so that the samples'
    label indices are those of that config.

    Why: stored boxes index the label list they were read with, and a ``/setup`` that edits the
    labels re-reads them (:func:`backend.ingest.save_label_config`). A job that took the config
    first and the boxes after such an edit would train the new indices under the old names.
    When the config is the same after gathering as before, the boxes gathered were read under
    it; otherwise this gathers again.
    """
    for _ in range(attempts):
        project = store.get_project(project_id)
        if project is None:
            raise ValueError(f"project {project_id} is unknown")
        config = stored_label_config(project)
        revision = store.annotation_revision(project_id)
        gathered = gather_samples(settings, store, project, config)
        if not reads_differently(store.get_project(project_id), config):
            return project, config, revision, gathered
        del gathered  # its images go before the next gather holds its own
        log.info(
            "project %s: the label config changed while gathering, gathering again", project_id
        )
    raise ValueError(f"project {project_id}: the label config kept changing during gathering")


def run_training_job(settings: Settings, store: Store, job_id: int) -> str:
    """Run job ``job_id``; returns the new model version."""
    job = store.get_job(job_id)
    if job is None:
        raise ValueError(f"no training job {job_id}")
    project = store.get_project(job.project_id)
    if project is None:
        raise ValueError(f"training job {job_id}: project {job.project_id} is unknown")
    torch.set_num_threads(max(1, settings.num_threads))
    # The job's claim set it running; a job that is not active any more was taken over by
    # another server (and queued again) before this child started: writing ``running`` here
    # brought it back, to train beside the new one.
    if not store.update_active_job(job_id, progress=0.0, message="reconciling with Label Studio"):
        raise JobNotActive(f"training job {job_id} is {job.status}, not running: nothing to do")
    config = stored_label_config(project)
    if settings.label_studio_url and settings.label_studio_token:
        from backend.labelstudio.client import StudioClient
        from backend.reconcile import reconcile_project

        try:
            client = StudioClient(
                settings.label_studio_url, settings.label_studio_token.get_secret_value()
            )
            reconcile_project(store, client, project.id, config)
        except Exception as exc:  # Label Studio down: train on what is stored
            log.warning("reconcile before training failed, training on stored annotations: %s", exc)
    store.update_active_job(job_id, message="loading images")
    project, config, revision, gathered = _gather_consistent(settings, store, project.id)
    if not gathered.samples:
        raise ValueError(
            f"no usable annotations for project {project.id} (skipped: {gathered.skipped})"
        )
    number = len(store.list_model_versions(project.id)) + 1
    version = version_name(project.id, number)
    directory = settings.models_dir / f"project-{project.id}" / version
    metadata: dict[str, Any] = {
        "version": version,
        "project_id": project.id,
        "labels": list(config.labels),
        "detector": settings.detector,
        "n_images": len(gathered.samples),
        "n_annotations": gathered.n_annotations,
        "annotations_revision": revision,
        "skipped": gathered.skipped,
        "job_id": job_id,
    }

    last_write = [0.0]

    def progress(fraction: float, message: str) -> None:
        # At most one write a second: a step takes well under a second on small images, and
        # every write takes the database's write lock that the server's webhooks also need.
        now = time.monotonic()
        if now - last_write[0] >= _PROGRESS_INTERVAL_S or fraction >= 1.0:
            last_write[0] = now
            store.update_active_job(
                job_id, progress=round(0.05 + 0.9 * fraction, 4), message=message
            )

    if settings.detector == "yolox_nano":
        metrics = _train_yolox_round(
            settings, store, project.id, config, gathered, directory, metadata, progress
        )
    else:
        metrics = _train_torchvision(
            settings, store, project.id, config, gathered, directory, metadata, progress
        )
    store.add_model_version(
        project.id,
        version,
        str(directory),
        list(config.labels),
        n_annotations=gathered.n_annotations,
        n_images=len(gathered.samples),
        annotations_revision=revision,
        metrics={"skipped": gathered.skipped, **metrics},
    )
    store.set_trained_revision(project.id, revision)
    store.update_active_job(  # a job taken over meanwhile keeps ``interrupted``
        job_id,
        status="succeeded",
        progress=1.0,
        finished_at=utcnow(),
        model_version=version,
        message=f"{metrics.get('status', 'promoted')}: {metrics.get('reason') or ''}".strip(": ")
        + f" (trained on {len(gathered.samples)} images)",
    )
    return version


def _train_yolox_round(
    settings: Settings,
    store: Store,
    project_id: int,
    config: LabelConfig,
    gathered: GatheredSamples,
    directory: Path,
    metadata: dict[str, Any],
    progress: ProgressFn,
) -> dict[str, Any]:
    """Fine-tune the COCO YOLOX-Nano from its pretrained weights and judge it (the gate)."""
    registry = ModelRegistry(settings, store)
    onnx_path = settings.resolved_onnx_model_path
    if onnx_path is None or not Path(onnx_path).is_file():
        raise ValueError(
            "training yolox_nano needs the COCO YOLOX-Nano ONNX model: run `boxloop models fetch` "
            "or set BOXLOOP_ONNX_MODEL_PATH"
        )
    coco_model, coco_names = load_coco_yolox_nano(
        Path(onnx_path), settings.resolved_onnx_class_names_path
    )
    init = initial_yolox(coco_model, coco_names, config.labels)
    init_trained_on: frozenset[int | str] = frozenset()
    gate = GateConfig.from_settings(settings)
    base = registry.round_base(
        project_id,
        config.labels,
        score_floor=gate.score_floor,
        warm_start=settings.yolox_warm_start,
    )
    if base.warm is not None:
        init, init_trained_on = base.warm.model, base.warm.trained_on
        metadata = {**metadata, "warm_start": base.warm.version}
    unlabeled: list[Image.Image] = []
    # only a cross-validation round matches box counts, and only when the option is on
    if gate.calibration_images > 0 and len(gathered.samples) < gate.cv_below:
        project = store.get_project(project_id)
        if project is not None:
            unlabeled = unannotated_images(
                settings, store, project, config, set(gathered.task_ids), gate.calibration_images
            )
    outcome = run_round(
        [
            LabeledImage(task_id, in_memory(sample.image), sample.boxes, sample.box_weights)
            for task_id, sample in zip(gathered.task_ids, gathered.samples, strict=True)
        ],
        config.labels,
        init=init,
        serving_predict=base.predict,
        directory=directory,
        metadata=metadata,
        settings=settings,
        train_config=YoloxTrainConfig.from_settings(settings),
        gate=gate,
        unlabeled=unlabeled,
        serving_trained_on=base.trained_on,
        init_trained_on=init_trained_on,
        progress=progress,
    )
    return outcome.metrics()


def _train_torchvision(
    settings: Settings,
    store: Store,
    project_id: int,
    config: LabelConfig,
    gathered: GatheredSamples,
    directory: Path,
    metadata: dict[str, Any],
    progress: ProgressFn,
) -> dict[str, Any]:
    """Fine-tune a torchvision detector, warm-started from the serving version when it can be
    (:func:`torchvision_warm_start`; no gate: the ImageNet Faster R-CNN is the benchmark's
    comparison row, kept as it was)."""
    train_config = TrainConfig.from_settings(settings)
    init = torchvision_warm_start(settings, store, project_id, config.labels, train_config.arch)
    model = train_detector(
        gathered.samples, list(config.labels), train_config, init=init, progress=progress
    )
    save_model_version(model, directory, {**metadata, "train_config": train_config.to_dict()})
    return {"status": "promoted", "reason": "no gate for torchvision detectors"}


def torchvision_warm_start(
    settings: Settings, store: Store, project_id: int, labels: Sequence[str], arch: str
) -> torch.nn.Module | None:
    """The serving version of ``project_id`` to continue from, when it is an ``arch`` model of
    ``labels``; else None (train a fresh one).

    Why the serving version only, and only of the configured architecture: the newest version
    was taken, even a rejected one, so after YOLOX rounds a switch of ``BOXLOOP_DETECTOR`` to a
    torchvision detector fed a YOLOX model to its loop and every job failed (and a Faster R-CNN
    of another backbone would have trained on as that backbone, not the one configured).
    """
    record = ModelRegistry(settings, store).serving_record(project_id)
    if record is None or list(record.labels) != list(labels):
        return None
    try:
        stored = read_metadata(Path(record.path)).get("arch")
        if not isinstance(stored, dict) or stored.get("arch") != resolve_arch(arch):
            log.info("%s is no %s model: training a fresh one", record.version, arch)
            return None
        return load_model_version(Path(record.path))[0]
    except (FileNotFoundError, ValueError, RuntimeError):
        return None
