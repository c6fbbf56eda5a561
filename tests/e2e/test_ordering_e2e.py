"""Queue ordering against a real Label Studio: the tasks ``/api/projects/{id}/next`` hands an
annotator come in boxloop's order (through the ordered Data Manager view, and project-wide
through Uncertainty sampling)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

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

N_TASKS = 7


def _next(ls: LabelStudioServer, project_id: int, view_id: int | None) -> dict[str, Any]:
    params = {"view": view_id} if view_id is not None else {}
    answer = httpx.get(
        f"{ls.url}/api/projects/{project_id}/next",
        params=params,
        headers=ls.auth_headers,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def _walk(ls: LabelStudioServer, project_id: int, view_id: int | None, n: int) -> list[int]:
    """Take the next task, label it (empty result), repeat: the order an annotator meets."""
    seen = []
    for _ in range(n):
        task = _next(ls, project_id, view_id)
        seen.append(int(task["id"]))
        submit_annotation(ls, int(task["id"]), [])
    return seen


@pytest.mark.parametrize("mode", ["view", "uncertainty", "uncertainty, no backend connected"])
def test_next_task_follows_the_boxloop_order(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop, mode: str
) -> None:
    """Without a connected backend the project has no model_version; the order's scores then
    carry their own (Label Studio refused the project PATCH to it before any prediction had it,
    and nothing was pushed)."""
    project = create_image_project(label_studio, N_TASKS)
    server = start_boxloop({"BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": "1000"})
    if mode.endswith("no backend connected"):
        setup = {"project": project.id, "schema": project.label_config}
        assert httpx.post(f"{server.url}/setup", json=setup, timeout=60).status_code == 200
    else:
        connect_backend(label_studio, project.id, server.url)
    answer = httpx.post(
        f"{server.url}/projects/{project.id}/order",
        params={"wait": "true"},
        json={
            "strategy": "dissimilar",
            "seed": 3,
            "batch_size": 3,
            "uncertainty_scores": mode.startswith("uncertainty"),
        },
        timeout=600,
    )
    assert answer.status_code == 202, answer.text
    state = answer.json()
    assert state["state"] == "done", state
    status = httpx.get(f"{server.url}/status", timeout=30).json()["projects"][0]
    assert status["queue"]["strategy"] == "dissimilar"
    order = server_order(server.data_dir, project.id)
    assert sorted(order) == sorted(project.task_ids)
    assert order != sorted(order) or N_TASKS < 3  # a dissimilar order is not the import order
    tasks = {t["id"]: t for t in label_studio.studio.list_tasks(project.id)}
    ranks = [tasks[t]["data"]["boxloop_rank"] for t in order]
    assert ranks == sorted(ranks)
    view_id = state["view_id"] if mode == "view" else None
    if mode.endswith("no backend connected"):
        settings = label_studio.studio.get_project(project.id)
        assert settings["model_version"] == "boxloop-order", settings["model_version"]
    assert _walk(label_studio, project.id, view_id, N_TASKS) == order


def test_an_order_is_pushed_after_a_task_was_deleted_in_label_studio(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop
) -> None:
    """The store keeps a task deleted in Label Studio, and the push wrote ranks from the store:
    the deleted task's PATCH answered 404 and every later order failed before its view."""
    project = create_image_project(label_studio, 4)
    server = start_boxloop({"BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": "1000"})
    connect_backend(label_studio, project.id, server.url)

    def order() -> dict[str, Any]:
        request = {"strategy": "random", "seed": 1, "batch_size": 2}
        url = f"{server.url}/projects/{project.id}/order"
        answer = httpx.post(url, params={"wait": "true"}, json=request, timeout=600)
        assert answer.status_code == 202, answer.text
        return dict(answer.json())

    assert order()["state"] == "done"
    label_studio.client.tasks.delete(str(project.task_ids[0]))
    again = order()
    assert again["state"] == "done" and again["view_id"] is not None, again
    tasks = {t["id"]: t["data"] for t in label_studio.studio.list_tasks(project.id)}
    ranked = [t for t in server_order(server.data_dir, project.id) if t in tasks]
    assert [tasks[t]["boxloop_rank"] for t in ranked] == sorted(
        tasks[t]["boxloop_rank"] for t in tasks
    )


def server_order(data_dir: Any, project_id: int) -> list[int]:
    from backend.store import Store

    store = Store(f"sqlite:///{data_dir}/boxloop.db")
    stored = store.get_order(project_id)
    store.close()
    assert stored is not None
    return stored.task_ids


def test_retrain_carries_the_order_over_and_preannotates_the_next_batch(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop
) -> None:
    """Uncertainty sampling follows the scores of the project's model version only; a retrain
    changes that version. boxloop must then give the next batch (in queue order) the new model's
    boxes, scored by rank, and score-only predictions to the rest, so the queue keeps its order
    and the annotators' next batch is pre-annotated by the newest model."""
    from backend.labelstudio.queue import rank_score

    n_tasks, n_train, batch = 8, 3, 3
    raccoons = voc_images(n_tasks, subset="raccoon")
    project = create_image_project(label_studio, n_tasks, images=raccoons or None)
    server = start_boxloop(
        {
            "BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": str(n_train),
            # the queue carry-over is under test, not the detector: the ungated Faster R-CNN
            # always swaps its new version in
            "BOXLOOP_DETECTOR": "fasterrcnn_effnet_lite0",
            "BOXLOOP_TRAIN_EPOCHS": "10",
            "BOXLOOP_TRAIN_BATCH_SIZE": "2",
            "BOXLOOP_DETECTOR_MIN_SIZE": "320",
            "BOXLOOP_DETECTOR_MAX_SIZE": "512",
            "BOXLOOP_SCORE_THRESHOLD": "0.01",
        }
    )
    connect_backend(label_studio, project.id, server.url)
    answer = httpx.post(
        f"{server.url}/projects/{project.id}/order",
        params={"wait": "true"},
        json={"strategy": "dissimilar", "seed": 1, "batch_size": batch, "uncertainty_scores": True},
        timeout=600,
    )
    assert answer.status_code == 202 and answer.json()["state"] == "done", answer.text
    order = server_order(server.data_dir, project.id)
    # a task deleted after ordering must not break the carry-over
    label_studio.client.tasks.delete(order[-1])
    order = order[:-1]

    # annotators label the first tasks the queue hands out (their real boxes): training starts
    labeled = []
    for _ in range(n_train):
        task_id = int(_next(label_studio, project.id, None)["id"])
        labeled.append(task_id)
        submit_annotation(label_studio, task_id, ground_truth_result(project, task_id))
    assert labeled == order[:n_train]
    new_version = f"boxloop-p{project.id}-v1"

    def carried_over() -> dict[str, Any] | None:
        queue = httpx.get(f"{server.url}/status", timeout=30).json()["projects"][0]["queue"]
        done = queue.get("carried_over")
        return done if done and done["model_version"] == new_version else None

    refresh = wait_for(carried_over, timeout_s=900, what="the queue to follow the new version")
    assert refresh["preannotated"] == batch
    assert label_studio.studio.get_project(project.id)["model_version"] == new_version

    stored_ranks = {
        int(t["id"]): int(t["data"]["boxloop_rank"])
        for t in label_studio.studio.list_tasks(project.id)
    }
    predictions = task_predictions(label_studio, project.id)
    current = {t: [p for p in predictions[t] if p["model_version"] == new_version] for t in order}
    assert all(len(p) == 1 for p in current.values()), current
    assert all(current[t][0]["score"] == rank_score(stored_ranks[t]) for t in order)
    # the next batch holds exactly what the new version predicts for it (same as /predict)
    next_batch = order[n_train : n_train + batch]
    tasks = {int(t["id"]): t for t in label_studio.studio.list_tasks(project.id)}
    served = httpx.post(
        f"{server.url}/predict",
        json={
            "tasks": [tasks[t] for t in next_batch],
            "project": f"{project.id}.0",
            "label_config": project.label_config,
        },
        timeout=300,
    ).json()["results"]
    assert [p["model_version"] for p in served] == [new_version] * batch
    for t, p in zip(next_batch, served, strict=True):
        assert _boxes(current[t][0]["result"]) == _boxes(p["result"])
    assert all(current[t][0]["result"] == [] for t in order[n_train + batch :])
    # and the rest of the queue still comes in boxloop's order
    assert _walk(label_studio, project.id, None, len(order) - n_train) == order[n_train:]


def _boxes(result: list[dict[str, Any]]) -> list[tuple[str, float, float, float, float]]:
    return sorted(
        (
            r["value"]["rectanglelabels"][0],
            round(r["value"]["x"], 3),
            round(r["value"]["y"], 3),
            round(r["value"]["width"], 3),
            round(r["value"]["height"], 3),
        )
        for r in result
    )
