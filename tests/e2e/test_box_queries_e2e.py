"""Box-level queries against a real Label Studio 1.23.2 and a real ``boxloop serve``: an episode
pre-annotates the tasks holding queried boxes, marks those boxes, orders the queue by them, and
maps the annotator's submitted boxes back to the queries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import shared_data_dir
from tests.e2e.conftest import (
    LabelStudioServer,
    StartBoxloop,
    connect_backend,
    create_image_project,
    ground_truth_result,
    submit_annotation,
    task_predictions,
    voc_images,
    wait_for,
)

pytestmark = pytest.mark.e2e

N_TASKS = 8
K = 6


def _episodes(url: str) -> list[dict[str, Any]]:
    status = httpx.get(url + "/status", timeout=30).json()["projects"][0]
    return list(status["box_queries"]["episodes"])


def test_box_queries_reach_annotators_and_their_answers_come_back(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop
) -> None:
    photos = voc_images(N_TASKS)
    coco_model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not photos or not coco_model.is_file():
        pytest.skip("the shared VOC2012 subset or the COCO YOLOX-Nano is absent")
    project = create_image_project(label_studio, N_TASKS, images=photos)
    server = start_boxloop(
        {
            "BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": "1000",
            "BOXLOOP_ONNX_MODEL_PATH": str(coco_model),
            "BOXLOOP_YOLOX_INPUT_AREA": str(320 * 256),
        }
    )
    connect_backend(label_studio, project.id, server.url)
    answer = httpx.post(
        f"{server.url}/projects/{project.id}/box-queries",
        params={"wait": "true"},
        json={"measure": "uncertainty", "k": K},
        timeout=600,
    )
    assert answer.status_code == 202, answer.text
    episode = answer.json()
    assert episode["state"] == "done" and episode["queried"] == K and episode["pushed"], episode
    version = episode["version"]
    assert version.startswith("pretrained-")

    # the tasks holding queries carry the serving version's boxes, the queried ones marked
    predictions = task_predictions(label_studio, project.id)
    marked: dict[int, int] = {}
    for task_id, preds in predictions.items():
        mine = [p for p in preds if p["model_version"] == version]
        assert len(mine) == 1, (task_id, preds)  # one prediction of the version per task
        regions = mine[0]["result"]
        flagged = [
            r for r in regions if "boxloop query" in " ".join(r.get("meta", {}).get("text", []))
        ]
        if flagged:
            marked[task_id] = len(flagged)
    assert sum(marked.values()) == K
    assert set(marked) == {t for t in episode["order"][: len(marked)]}
    # the project serves the queue by those scores, the most informative query first
    ls_project = label_studio.studio.get_project(project.id)
    assert ls_project["model_version"] == version
    first = httpx.get(
        f"{label_studio.url}/api/projects/{project.id}/next",
        headers=label_studio.auth_headers,
        timeout=60,
    ).json()
    assert int(first["id"]) == episode["order"][0]

    # the annotator submits the true boxes of that task: its queries are answered
    task_id = episode["order"][0]
    truth = ground_truth_result(project, task_id)
    submit_annotation(label_studio, task_id, truth)

    def answered() -> dict[str, Any] | None:
        (row,) = _episodes(server.url)
        return row if row["open"] == K - marked[task_id] else None

    row = wait_for(answered, timeout_s=60, what="the answer to be mapped back to the queries")
    resolved = row["confirmed"] + row["adjusted"] + row["duplicate"] + row["background"]
    assert resolved == marked[task_id]
    assert row["confirmed"] + row["adjusted"] + row["drawn"] == len(truth)
