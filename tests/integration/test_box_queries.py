"""Box-level queries through the product's path, without Label Studio: an episode over real VOC
photos with the COCO YOLOX-Nano, the answer mapped back by webhook, the HTTP endpoint's errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from backend.active import box_scores
from backend.app import create_app
from backend.box_queries import BoxQueryRequest
from backend.labelstudio.convert import parse_label_config
from backend.service import BoxloopService
from backend.settings import Settings
from backend.training_job import gather_samples
from benchmark.datasets import load_dataset
from tests.conftest import shared_data_dir
from tests.synthetic import ls_result

pytestmark = pytest.mark.shared_data


def _config(labels: list[str]) -> str:
    inner = "".join(f'<Label value="{name}"/>' for name in labels)
    return (
        '<View><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="image">{inner}</RectangleLabels></View>'
    )


@pytest.fixture
def voc_service(tmp_path: Path):
    root = shared_data_dir() / "voc" / "VOCdevkit" / "VOC2012"
    model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not root.is_dir() or not model.is_file():
        pytest.skip(f"VOC2012 subset ({root}) or the COCO YOLOX-Nano ({model}) is absent")
    dataset = load_dataset(f"voc:{root}")
    settings = Settings(
        data_dir=tmp_path / "data",
        allowed_local_roots=[root],
        reconcile_on_startup=False,
        train_after_new_annotations=10_000,
        onnx_model_path=model,
        num_threads=2,
        yolox_input_area=320 * 256,
    )
    service = BoxloopService(settings)
    yield service, dataset
    service.close()


def test_an_episode_queries_the_most_uncertain_boxes_and_maps_the_answer_back(
    voc_service,
) -> None:
    service, dataset = voc_service
    labels = list(dataset.labels)
    samples = dataset.samples[:8]
    service.setup(3, _config(labels))
    service.store.upsert_tasks(
        3, [(i + 1, {"image": str(s.image_path)}) for i, s in enumerate(samples)]
    )
    episode = service.run_box_queries(3, BoxQueryRequest(k=6, push=False), wait=True)
    assert episode["state"] == "done" and episode["queried"] == 6, episode
    assert episode["version"].startswith("pretrained-")
    ((number, params, queries),) = service.store.list_box_episodes(3)
    assert number == 1 and params["measure"] == "uncertainty" and params["k"] == 6
    values = [q["value"] for q in queries]
    assert values == sorted(values, reverse=True)  # most uncertain first
    assert all(0 <= v <= 1 for v in values)
    # the queue puts the task of query 1 first, then every other unlabelled task
    assert episode["order"][0] == queries[0]["task"]
    assert sorted(episode["order"]) == list(range(1, 9))

    # the annotator submits the task's true boxes: its queries are resolved, the others stay open
    task = queries[0]["task"]
    truth = samples[task - 1].boxes.kept()
    objects = [
        (labels[int(label)], tuple(float(v) for v in xyxy))
        for xyxy, label in zip(truth.xyxy, truth.labels, strict=True)
    ]
    outcome = service.handle_webhook(
        {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": 501, "task": task, "result": ls_result(objects, truth.image_size)},
            "task": {"id": task, "data": {"image": str(samples[task - 1].image_path)}},
            "project": {"id": 3, "label_config": _config(labels)},
        }
    )
    assert outcome.stored == 1
    (row,) = service.status()["projects"][0]["box_queries"]["episodes"]
    on_task = sum(1 for q in queries if q["task"] == task)
    assert row["open"] == 6 - on_task
    answered = row["confirmed"] + row["adjusted"] + row["duplicate"] + row["background"]
    assert answered == on_task
    assert row["confirmed"] + row["adjusted"] + row["drawn"] == len(truth)

    # the admin reverses the label order (20 VOC labels: every index the episode stored changes);
    # another task is submitted as shown (every predicted box kept): training weighs the boxes
    # it never asked about at λ_d and the queried ones at 1
    assert params["labels"] == labels
    service.setup(3, _config(labels[::-1]))
    other = next(q["task"] for q in queries if q["task"] != task)
    asked = [q for q in queries if q["task"] == other]
    shown = [u for u in params["unqueried"] if u["task"] == other]
    size = samples[other - 1].boxes.image_size
    kept = [(labels[b["label"]], tuple(b["xyxy"])) for b in [*asked, *shown]]
    service.handle_webhook(
        {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": 502, "task": other, "result": ls_result(kept, size)},
            "task": {"id": other, "data": {"image": str(samples[other - 1].image_path)}},
            "project": {"id": 3, "label_config": _config(labels[::-1])},
        }
    )
    project = service.store.get_project(3)
    assert project is not None
    gathered = gather_samples(
        service.settings, service.store, project, parse_label_config(project.label_config)
    )
    weights = dict(zip(gathered.task_ids, (s.box_weights for s in gathered.samples), strict=True))
    assert weights[other] is not None
    assert sorted(weights[other].tolist()) == sorted([0.5] * len(shown) + [1.0] * len(asked))

    # a second episode skips the annotated tasks
    second = service.run_box_queries(3, BoxQueryRequest(k=4, push=False), wait=True)
    assert task not in second["order"] and other not in second["order"]
    assert second["episode"] == 2


def test_unasked_boxes_left_as_predicted_weigh_lambda_d() -> None:
    from backend.active import noisy_box_weights
    from backend.boxes import Boxes

    shown = Boxes(
        np.array([[10, 10, 50, 50], [60, 60, 90, 90]], np.float32), np.array([0, 1]), (100, 100)
    )
    submitted = Boxes(
        np.array([[10, 10, 50, 50], [60, 60, 95, 95], [0, 0, 5, 5], [60, 60, 90, 90]], np.float32),
        np.array([0, 1, 0, 0]),
        (100, 100),
    )
    # kept as shown → λ_d; moved, drawn, or relabelled → 1
    assert noisy_box_weights(submitted, shown, 0.5).tolist() == [0.5, 1.0, 1.0, 1.0]
    assert noisy_box_weights(submitted, Boxes.empty((100, 100)), 0.5).tolist() == [1.0] * 4


def test_uncertainty_values_are_one_minus_the_detection_probability() -> None:
    from backend.active import BoxPool

    probs = np.array([[0.2, 0.6], [0.05, 0.1]], np.float32)
    pool = BoxPool(
        np.zeros(2, np.int64),
        np.zeros((2, 4), np.float32),
        probs.argmax(1),
        probs.max(1),
        probs,
        np.array([0.8, 0.15], np.float32),
        None,
        ((10, 10),),
    )
    assert box_scores(pool, "uncertainty").tolist() == pytest.approx([0.4, 0.9])


def test_the_endpoint_rejects_bad_settings_and_unknown_projects(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", reconcile_on_startup=False)
    with TestClient(create_app(settings)) as client:
        bad = client.post("/projects/1/box-queries", json={"measure": "loudest", "k": 5})
        assert bad.status_code == 422 and "measure" in bad.text
        negative = client.post("/projects/1/box-queries", json={"k": 0})
        assert negative.status_code == 422
        unknown = client.post("/projects/99/box-queries", json={"k": 5})
        assert unknown.status_code == 404 and "unknown" in unknown.text
        assert client.get("/health").status_code == 200  # still serving
