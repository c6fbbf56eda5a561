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
    submit_annotation,
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


@pytest.mark.parametrize("mode", ["view", "uncertainty"])
def test_next_task_follows_the_boxloop_order(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop, mode: str
) -> None:
    project = create_image_project(label_studio, N_TASKS)
    server = start_boxloop({"BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": "1000"})
    connect_backend(label_studio, project.id, server.url)
    answer = httpx.post(
        f"{server.url}/projects/{project.id}/order",
        params={"wait": "true"},
        json={
            "strategy": "dissimilar",
            "seed": 3,
            "batch_size": 3,
            "uncertainty_scores": mode == "uncertainty",
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
    assert _walk(label_studio, project.id, view_id, N_TASKS) == order


def server_order(data_dir: Any, project_id: int) -> list[int]:
    from backend.store import Store

    store = Store(f"sqlite:///{data_dir}/boxloop.db")
    stored = store.get_order(project_id)
    store.close()
    assert stored is not None
    return stored.task_ids
