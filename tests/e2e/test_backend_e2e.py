"""The whole loop against a real Label Studio 1.23.2 and a real ``boxloop serve``:

connect → predictions through the Data Manager action → annotations submitted through the API
arrive by webhook and are stored → background training → the new version is swapped in, the
backend title follows it, and it pre-annotates the next tasks.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from backend.training.gate import GateConfig, validation_split
from tests.conftest import shared_data_dir
from tests.e2e.conftest import (
    LabelStudioServer,
    StartBoxloop,
    connect_backend,
    create_image_project,
    ground_truth_result,
    retrieve_predictions,
    submit_annotation,
    task_predictions,
    voc_images,
    wait_for,
)

pytestmark = pytest.mark.e2e

N_TASKS = 10
N_TRAIN = 6


def _status(url: str) -> dict[str, Any]:
    return httpx.get(url + "/status", timeout=30).json()["projects"][0]


def test_preannotate_store_train_and_serve_the_new_version(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop
) -> None:
    # Raccoons: one class, mostly one box an image, so a few annotations teach the detector
    # something measurable (VOC's 20 classes need far more than a test can label).
    raccoons = voc_images(N_TASKS, subset="raccoon")
    project = create_image_project(label_studio, N_TASKS, images=raccoons or None)
    coco_model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not coco_model.is_file():
        pytest.skip(f"the COCO YOLOX-Nano model is not at {coco_model}")
    env = {
        "BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": str(N_TRAIN),
        # the default detector, the COCO YOLOX-Nano (COCO has no raccoon: nothing serves
        # before the first promoted version), on a small letterbox to keep the test short
        "BOXLOOP_ONNX_MODEL_PATH": str(coco_model),
        "BOXLOOP_YOLOX_INPUT_AREA": str(320 * 256),
        "BOXLOOP_YOLOX_IMAGE_VISITS": "300",
    }
    server = start_boxloop(env)
    backend = connect_backend(label_studio, project.id, server.url)
    before = httpx.post(
        server.url + "/setup", json={"project": project.id, "schema": project.label_config}
    ).json()
    first_version = before["model_version"]
    assert first_version == "boxloop-untrained"  # no trained version yet, COCO has no raccoon

    # 1. pre-annotations for every task through the Data Manager action
    retrieve_predictions(label_studio, project.id)
    predictions = task_predictions(label_studio, project.id)
    assert set(predictions) == set(project.task_ids)
    assert all(p and p[0]["model_version"] == first_version for p in predictions.values())

    # 2. annotators submit; every annotation is stored by webhook
    train_tasks = project.task_ids[:N_TRAIN]
    for task_id in train_tasks:
        submit_annotation(label_studio, task_id, ground_truth_result(project, task_id))
    # Label Studio sends webhooks right after the API call commits; give the last one a moment
    wait_for(
        lambda: _status(server.url)["annotations"]["stored"] == N_TRAIN,
        timeout_s=30,
        what=f"all {N_TRAIN} annotations to be stored by webhook",
    )

    # 3. the N-th annotation started background training; a new version is swapped in
    def finished() -> dict[str, Any] | None:
        jobs = _status(server.url)["training_jobs"]
        done = [j for j in jobs if j["status"] in ("succeeded", "failed")]
        return done[0] if done else None

    job = wait_for(finished, timeout_s=900, what="background training to finish")
    assert job["status"] == "succeeded", job
    new_version = job["model_version"]
    assert new_version == f"boxloop-p{project.id}-v1"

    # 4. the ML backend's title (and so the project's model_version) follows the new version
    def title_followed() -> bool:
        titles = [b["title"] for b in label_studio.studio.list_backends(project.id)]
        return titles == [new_version]

    wait_for(title_followed, timeout_s=120, what="the backend title to follow the new version")
    assert label_studio.studio.get_project(project.id)["model_version"] == new_version
    assert backend["id"] == label_studio.studio.list_backends(project.id)[0]["id"]

    # 5. the new version pre-annotates the next (unlabeled) tasks
    next_tasks = project.task_ids[N_TRAIN:]
    retrieve_predictions(label_studio, project.id, next_tasks)
    predictions = task_predictions(label_studio, project.id)
    served = {
        t: [p for p in predictions[t] if p["model_version"] == new_version] for t in next_tasks
    }
    assert all(len(p) == 1 for p in served.values()), served
    labels = set(project.labels)
    boxes = [r for p in served.values() for r in p[0]["result"]]
    assert boxes, "the retrained version found no box on any of the next tasks"
    assert all(r["value"]["rectanglelabels"][0] in labels for r in boxes)
    # ... and they are the raccoons of those images, not just any box
    found = total = 0
    for task_id in next_tasks:
        known = ground_truth_result(project, task_id)
        total += len(known)
        found += sum(
            any(_iou(k["value"], r["value"]) >= 0.5 for r in served[task_id][0]["result"])
            for k in known
        )
    assert found >= 0.5 * total, f"{found} of {total} known boxes found at IoU >= 0.5"
    record = _status(server.url)["model_versions"][-1]
    assert record["status"] == "promoted" and record["version"] == new_version, record


def test_a_rejected_candidate_leaves_the_serving_version_and_title_alone(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop
) -> None:
    # VOC photos: their labels map to COCO classes, so the pretrained model serves from the start.
    # The tasks the gate trains on are annotated with every label swapped for another; those it
    # validates on are annotated right. The candidate learns the swap and must lose.
    photos = voc_images(N_TASKS)
    if not photos:
        pytest.skip("the shared VOC2012 subset is absent (set BOXLOOP_SHARED_DATA)")
    project = create_image_project(label_studio, N_TASKS, images=photos)
    if len(project.labels) < 2:
        pytest.skip(f"the first {N_TASKS} VOC photos hold one label only: nothing to swap")
    coco_model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not coco_model.is_file():
        pytest.skip(f"the COCO YOLOX-Nano model is not at {coco_model}")
    annotated = project.task_ids[:N_TRAIN]
    env = {
        "BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": str(N_TRAIN),
        "BOXLOOP_ONNX_MODEL_PATH": str(coco_model),
        "BOXLOOP_YOLOX_INPUT_AREA": str(320 * 256),
        "BOXLOOP_YOLOX_IMAGE_VISITS": "96",
        "BOXLOOP_GATE_CV_BELOW": "4",  # judge on a validation slice, not cross-validation
    }
    server = start_boxloop(env)
    connect_backend(label_studio, project.id, server.url)
    serving = httpx.post(
        server.url + "/setup", json={"project": project.id, "schema": project.label_config}
    ).json()["model_version"]
    assert serving.startswith("pretrained-"), serving
    retrieve_predictions(label_studio, project.id)
    titles = [b["title"] for b in label_studio.studio.list_backends(project.id)]
    project_version = label_studio.studio.get_project(project.id)["model_version"]

    gate = GateConfig(validation_fraction=0.2, cv_below=4)
    train_part, _ = validation_split(annotated, gate)
    swap = dict(zip(project.labels, [*project.labels[1:], project.labels[0]], strict=True))
    for i, task_id in enumerate(annotated):
        result = ground_truth_result(project, task_id)
        if i in train_part:
            for region in result:
                labels = region["value"]["rectanglelabels"]
                region["value"]["rectanglelabels"] = [swap[labels[0]]]
        submit_annotation(label_studio, task_id, result)

    def finished() -> dict[str, Any] | None:
        jobs = _status(server.url)["training_jobs"]
        done = [j for j in jobs if j["status"] in ("succeeded", "failed")]
        return done[0] if done else None

    job = wait_for(finished, timeout_s=900, what="background training to finish")
    assert job["status"] == "succeeded", job
    record = _status(server.url)["model_versions"][-1]
    assert record["status"] == "rejected", record
    assert record["version"] == job["model_version"] != serving
    assert (
        record["reason"] and record["validation"]["candidate"] and record["validation"]["serving"]
    )

    # the title, the project's model_version and the predictions of the next tasks stay
    assert [b["title"] for b in label_studio.studio.list_backends(project.id)] == titles
    assert label_studio.studio.get_project(project.id)["model_version"] == project_version
    next_tasks = project.task_ids[N_TRAIN:]
    retrieve_predictions(label_studio, project.id, next_tasks)
    predictions = task_predictions(label_studio, project.id)
    versions = {p["model_version"] for t in next_tasks for p in predictions[t]}
    assert versions == {serving}, versions


def _iou(a: dict[str, float], b: dict[str, float]) -> float:
    """IoU of two Label Studio regions (percent coordinates)."""
    ax1, ay1 = a["x"] + a["width"], a["y"] + a["height"]
    bx1, by1 = b["x"] + b["width"], b["y"] + b["height"]
    w = max(0.0, min(ax1, bx1) - max(a["x"], b["x"]))
    h = max(0.0, min(ay1, by1) - max(a["y"], b["y"]))
    inter = w * h
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union > 0 else 0.0
