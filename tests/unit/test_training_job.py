"""A training job's choices around the round: which class names the COCO head is cut from, what
a torchvision job continues from, and that every finished job prunes old version directories.

Tiny settings throughout (64×64 letterbox, one epoch): these check the plumbing, not learning.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from backend import training_job
from backend.detectors import build_model
from backend.detectors.versions import save_model_version
from backend.detectors.yolox import YoloxNano, load_coco_yolox_nano
from backend.registry import is_promoted
from backend.service import BoxloopService
from backend.settings import Settings
from backend.training import loop as loop_module
from backend.training.yolox_train import initial_yolox
from backend.training_job import run_training_job
from tests.synthetic import LABEL_CONFIG, LABELS, ls_result, write_dataset


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _service(tmp_path: Path, **extra: object) -> BoxloopService:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "allowed_local_roots": [tmp_path / "images"],
        "reconcile_on_startup": False,
        "train_after_new_annotations": 10_000,
        "num_threads": 1,
        "yolox_input_area": 64 * 64,
        "yolox_image_visits": 4,
        "yolox_min_epochs": 1,
        "yolox_max_epochs": 1,
        **extra,
    }
    return BoxloopService(Settings(**values))  # type: ignore[arg-type]


def _annotate(service: BoxloopService, tmp_path: Path, n: int) -> None:
    service.setup(1, LABEL_CONFIG)
    for i, (path, objects) in enumerate(write_dataset(tmp_path / "images", n)):
        outcome = service.handle_webhook(
            {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": 100 + i, "task": i + 1, "result": ls_result(objects)},
                "task": {"id": i + 1, "data": {"image": str(path)}},
                "project": {"id": 1, "label_config": LABEL_CONFIG},
            }
        )
        assert outcome.stored == 1


def _train(service: BoxloopService) -> str:
    return run_training_job(service.settings, service.store, service.store.create_job(1, "test"))


def _add_version(
    service: BoxloopService, number: int, model: torch.nn.Module, status: str, labels: list[str]
) -> str:
    version = f"boxloop-p1-v{number}"
    directory = service.settings.models_dir / "project-1" / version
    save_model_version(model, directory, {"labels": labels, "input_hw": [64, 64], "trained_on": []})
    service.store.add_model_version(
        1, version, str(directory), labels, n_annotations=1, n_images=1,
        annotations_revision=number, metrics={"status": status, "reason": "test"},
    )  # fmt: skip
    return version


def test_training_reads_the_class_names_that_serving_reads(tmp_path: Path, onnx_path: Path) -> None:
    """``BOXLOOP_ONNX_CLASS_NAMES_PATH`` names the file; training ignored it and read
    ``coco_classes.txt`` beside the model: it failed without one, and one in another order put
    other classes' pretrained rows in the head."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    model = model_dir / "yolox_nano.onnx"
    shutil.copy(onnx_path, model)
    names = tmp_path / "names.txt"
    shutil.copy(onnx_path.parent / "coco_classes.txt", names)
    coco_names = names.read_text().splitlines()
    (model_dir / "coco_classes.txt").write_text("\n".join(reversed(coco_names)) + "\n")
    service = _service(tmp_path, onnx_model_path=model, onnx_class_names_path=names)
    labels = ["person", "car"]
    served = service.models.serving_torch_model(1, labels)
    assert served is not None
    expected = initial_yolox(*load_coco_yolox_nano(onnx_path), labels)
    for (key, ours), theirs in zip(
        served[1].state_dict().items(), expected.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(ours, theirs, msg=key)
    (model_dir / "coco_classes.txt").unlink()  # only the setting's file is left
    _annotate(service, tmp_path, 4)
    version = _train(service)
    record = service.store.list_model_versions(1)[-1]
    assert record.version == version and record.metrics and record.metrics.get("status")
    assert service.models.serving_torch_model(1, list(LABELS)) is not None
    assert service.settings.resolved_onnx_class_names_path == names
    service.close()


def test_a_rejected_candidate_is_pruned_too(tmp_path: Path) -> None:
    """Pruning ran only after a promotion: with no candidate promoted, every rejected one's
    directory stayed. Each finished job prunes now; the serving version is always kept."""
    service = _service(tmp_path, keep_model_versions=2)
    service.setup(1, LABEL_CONFIG)
    labels = list(LABELS)
    for number in range(1, 7):
        status = "promoted" if number == 1 else "rejected"
        version = _add_version(service, number, YoloxNano(2).eval(), status, labels)
        service._on_new_version(1, version)  # what the job runner calls when a job succeeds
    left = sorted(p.name for p in (service.settings.models_dir / "project-1").iterdir())
    assert left == ["boxloop-p1-v1", "boxloop-p1-v5", "boxloop-p1-v6"]
    serving = service.models.serving_record(1)
    assert serving is not None and serving.version == "boxloop-p1-v1" and is_promoted(serving)
    service.close()


def test_a_torchvision_job_continues_only_from_a_serving_version_of_its_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After YOLOX rounds, ``BOXLOOP_DETECTOR`` switched to a torchvision detector: the job took
    the newest version (a rejected YOLOX candidate) as its start and failed ("model carries no
    ArchSpec"). It starts fresh now, and continues from the version it then serves."""
    # the COCO weights a fresh model starts from need not be here: random ones stand in
    monkeypatch.setattr(
        loop_module, "build_model", lambda spec, pretrained=True, weights_dir=None: build_model(
            spec, pretrained=False
        ),
    )  # fmt: skip
    service = _service(
        tmp_path, detector="fasterrcnn_mobilenet_v3", train_epochs=1,
        detector_min_size=96, detector_max_size=128,
    )  # fmt: skip
    _annotate(service, tmp_path, 3)
    labels = list(LABELS)
    _add_version(service, 1, YoloxNano(2).eval(), "promoted", labels)
    _add_version(service, 2, YoloxNano(2).eval(), "rejected", labels)
    version = _train(service)
    serving = service.models.serving_record(1)
    assert serving is not None and serving.version == version
    settings, store, warm_start = (
        service.settings,
        service.store,
        training_job.torchvision_warm_start,
    )
    assert warm_start(settings, store, 1, labels, "fasterrcnn_mobilenet_v3") is not None
    assert warm_start(settings, store, 1, labels, "fasterrcnn_effnet_lite0") is None
    assert warm_start(settings, store, 1, ["Square"], "fasterrcnn_mobilenet_v3") is None
    service.close()
