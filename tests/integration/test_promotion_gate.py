"""The promotion gate through the product's own path: webhooks store annotations, a training job
fine-tunes the COCO YOLOX-Nano and judges it, the registry serves (or keeps) a version.

Real data: VOC photos (labels COCO knows, so the pretrained model serves before any training)
and raccoon photos (a label COCO lacks, so nothing serves until a candidate wins).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.boxes import Boxes
from backend.detectors.versions import load_version_detector
from backend.service import BoxloopService
from backend.settings import Settings
from backend.training.gate import GateConfig, validation_split
from backend.training_job import run_training_job
from benchmark.datasets import Dataset, load_dataset
from tests.conftest import shared_data_dir
from tests.synthetic import ls_result

pytestmark = pytest.mark.slow


def _label_config(labels: list[str]) -> str:
    inner = "".join(f'<Label value="{name}"/>' for name in labels)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{inner}</RectangleLabels></View>'
    )


def _regions(boxes: Boxes, labels: list[str]) -> list[dict]:
    """The boxes as an annotator submits them (Label Studio percent regions)."""
    objects = [
        (labels[int(label)], tuple(float(v) for v in xyxy))
        for xyxy, label in zip(boxes.xyxy, boxes.labels, strict=True)
    ]
    return ls_result(objects, boxes.image_size)


def _service(tmp_path: Path, image_root: Path, **extra: object) -> BoxloopService:
    model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not model.is_file():
        pytest.skip(f"the COCO YOLOX-Nano model is not at {model} (set BOXLOOP_SHARED_DATA)")
    settings = Settings(
        data_dir=tmp_path / "data",
        allowed_local_roots=[image_root],
        reconcile_on_startup=False,
        train_after_new_annotations=10_000,
        onnx_model_path=model,
        num_threads=2,
        yolox_input_area=320 * 240,
        **{"gate_cv_below": 4, **extra},
    )
    return BoxloopService(settings)


def _annotate(
    service: BoxloopService, project: int, samples: list, labels: list[str], start: int = 0
) -> None:
    """Submit ``samples`` as tasks ``start + 1``, ``start + 2``, ..."""
    config = _label_config(labels)
    for i, (path, boxes) in enumerate(samples, start=start):
        outcome = service.handle_webhook(
            {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": 1000 + i, "task": i + 1, "result": _regions(boxes, labels)},
                "task": {"id": i + 1, "data": {"image": str(path)}},
                "project": {"id": project, "label_config": config},
            }
        )
        assert outcome.stored == 1, outcome


def _raccoon() -> tuple[Path, Dataset]:
    root = shared_data_dir() / "voc" / "raccoon"
    if not root.is_dir():
        pytest.skip(f"raccoon subset not at {root}")
    return root, load_dataset(f"voc:{root}")


def _train(service: BoxloopService, project: int) -> dict:
    job = service.store.create_job(project, "test")
    version = run_training_job(service.settings, service.store, job)
    record = next(v for v in service.models.versions_status(project) if v["version"] == version)
    return record


def test_a_candidate_trained_on_shuffled_labels_is_rejected_and_the_serving_version_stays(
    tmp_path: Path,
) -> None:
    root = shared_data_dir() / "voc" / "VOCdevkit" / "VOC2012"
    if not root.is_dir():
        pytest.skip(f"VOC subset not at {root}")
    dataset = load_dataset(f"voc:{root}")
    labels = list(dataset.labels)
    permutation = (np.arange(len(labels)) + 7) % len(labels)  # no class keeps its name
    service = _service(tmp_path, root, yolox_image_visits=96, yolox_max_epochs=8)
    # The annotations the gate validates on are right; those it trains on have every class
    # wrong (task ids 1..16 are the keys of the gate's split).
    task_ids = list(range(1, 17))
    train_part, _ = validation_split(task_ids, GateConfig.from_settings(service.settings))
    samples = []
    for i, sample in enumerate(dataset.samples[:16]):
        kept = sample.boxes.kept()
        if i in train_part:
            kept = Boxes(kept.xyxy, permutation[kept.labels], kept.image_size)
        samples.append((sample.image_path, kept))
    try:
        service.setup(5, _label_config(labels))
        before = service.current_model(5, labels).version
        assert before.startswith("pretrained-")
        _annotate(service, 5, samples, labels)
        record = _train(service, 5)
        assert record["status"] == "rejected", record
        assert record["validation"]["serving"]["map50"] > record["validation"]["candidate"]["map50"]
        # it never serves and stays on disk with its scores and reason
        assert not service.models.swap_in(5, record["version"])
        assert service.current_model(5, labels).version == before
        assert service.setup(5, _label_config(labels)) == before
        directory = service.settings.models_dir / "project-5" / record["version"]
        metadata = json.loads((directory / "metadata.json").read_text())
        assert metadata["status"] == "rejected" and metadata["reason"]
    finally:
        service.close()


def test_a_candidate_for_a_new_class_is_promoted_and_serves_at_its_threshold(
    tmp_path: Path,
) -> None:
    root, dataset = _raccoon()
    labels = list(dataset.labels)
    samples = [(s.image_path, s.boxes.kept()) for s in dataset.samples[:24]]
    held_out = dataset.samples[-8:]
    service = _service(tmp_path, root, yolox_image_visits=360)
    try:
        service.setup(6, _label_config(labels))
        assert service.current_model(6, labels).detector is None  # COCO has no raccoon
        _annotate(service, 6, samples, labels)
        record = _train(service, 6)
        assert record["status"] == "promoted", record
        assert record["serves_boxes"] and 0 < record["score_threshold"] < 1
        assert service.models.swap_in(6, record["version"])
        model = service.current_model(6, labels)
        assert model.version == record["version"]
        assert model.detector is not None
        predictions = model.detector.predict([s.load_image() for s in held_out])
        found = sum(
            int((g.iou(p) >= 0.5).any(axis=1).sum()) if len(p) else 0
            for g, p in ((s.boxes.kept(), p) for s, p in zip(held_out, predictions, strict=True))
        )
        total = sum(len(s.boxes.kept()) for s in held_out)
        assert found >= 0.5 * total, f"{found} of {total} held-out raccoons found"
        assert all(
            float(p.scores.min()) >= record["score_threshold"] for p in predictions if len(p)
        )
    finally:
        service.close()


def test_a_cross_validation_round_carries_its_threshold_on_unannotated_tasks(
    tmp_path: Path,
) -> None:
    """12 annotated raccoon tasks (a cross-validation round) and 8 nobody annotated: the job
    loads the 8, and the new version serves at the score that gives it as many boxes on them as
    the fold models gave at the threshold the gate chose."""
    root, dataset = _raccoon()
    labels = list(dataset.labels)
    annotated = [(s.image_path, s.boxes.kept()) for s in dataset.samples[:12]]
    unannotated = dataset.samples[12:20]
    service = _service(
        tmp_path, root, yolox_image_visits=120, gate_cv_below=30, gate_calibration_images=32
    )
    try:
        service.setup(7, _label_config(labels))
        _annotate(service, 7, annotated, labels)
        service.store.upsert_tasks(
            7, [(100 + i, {"image": str(s.image_path)}) for i, s in enumerate(unannotated)]
        )
        record = _train(service, 7)
        assert record["validation"]["mode"] == "2-fold cross-validation", record
        match = record["validation"]["calibration"]
        assert match["images"] == 8
        assert match["reference_threshold"] == record["validation"]["candidate"]["best_threshold"]
        assert record["score_threshold"] == match["threshold"]
        assert match["reference_boxes_per_image"] > 0, "the fold models kept no raccoon box"
        # the version itself, reloaded, keeps the matched count on those 8 images
        directory = service.settings.models_dir / "project-7" / record["version"]
        detector = load_version_detector(directory, service.settings, score_floor=0.05)
        predictions = detector.predict([s.load_image() for s in unannotated])
        kept = sum(int((p.scores >= match["threshold"]).sum()) for p in predictions if len(p))
        assert kept == round(match["boxes_per_image"] * 8)
        assert abs(kept - match["reference_boxes_per_image"] * 8) <= 0.5
    finally:
        service.close()


def _trained_on(service: BoxloopService, project: int, version: str) -> set[int]:
    path = service.settings.models_dir / f"project-{project}" / version / "metadata.json"
    return set(json.loads(path.read_text())["trained_on"])


def test_the_next_round_never_scores_the_serving_version_on_its_own_training_tasks(
    tmp_path: Path,
) -> None:
    """24 raccoon tasks: a cross-validation round, whose version trained on all 24. 8 more
    arrive: the next candidate continues from that version (warm start), and the round judges
    on a slice drawn only from the tasks that version never saw."""
    root, dataset = _raccoon()
    labels = list(dataset.labels)
    samples = [(s.image_path, s.boxes.kept()) for s in dataset.samples[:32]]
    service = _service(tmp_path, root, yolox_image_visits=120, gate_cv_below=30)
    try:
        service.setup(8, _label_config(labels))
        _annotate(service, 8, samples[:24], labels)
        first = _train(service, 8)
        assert first["validation"]["mode"] == "2-fold cross-validation", first
        assert first["status"] == "promoted", first  # nothing served a raccoon before
        assert _trained_on(service, 8, first["version"]) == set(range(1, 25))
        _annotate(service, 8, samples[24:], labels, start=24)  # tasks 25-32
        second = _train(service, 8)
        assert second["validation"]["mode"] == "validation slice", second
        # it continued from the first version (warm start), so it carries that one's tasks
        directory = service.settings.models_dir / "project-8" / second["version"]
        assert (
            json.loads((directory / "metadata.json").read_text())["warm_start"] == first["version"]
        )
        validated = set(range(1, 33)) - _trained_on(service, 8, second["version"])
        assert validated and validated <= set(range(25, 33)), validated
        assert second["validation"]["n_validation"] == len(validated)
        assert second["validation"]["serving"]["images"] == len(validated)
    finally:
        service.close()
