"""Bulk pre-annotation against a real Label Studio: every task gets exactly one prediction of
the serving version, a killed run resumes where it stopped, a task deleted mid-run is skipped,
and tasks Label Studio already pre-annotated through /predict are left alone."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backend.bulk.predict import BulkPredictRequest
from backend.labelstudio.client import StudioClient
from backend.service import BoxloopService
from backend.settings import Settings
from tests.conftest import shared_data_dir
from tests.e2e.conftest import (
    REPO_ROOT,
    LabelStudioServer,
    StartBoxloop,
    boxloop_executable,
    connect_backend,
    create_image_project,
    retrieve_predictions,
    task_predictions,
    voc_images,
    wait_for,
)

COCO_MODEL = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
VERSION = "pretrained-yolox_nano"


@pytest.fixture
def coco_model() -> Path:
    if not COCO_MODEL.is_file():
        pytest.skip(f"the COCO YOLOX-Nano model is not at {COCO_MODEL} (BOXLOOP_SHARED_DATA)")
    return COCO_MODEL


def _versions_per_task(ls: LabelStudioServer, project_id: int) -> dict[int, Counter[str]]:
    return {
        task_id: Counter(str(p.get("model_version")) for p in predictions)
        for task_id, predictions in task_predictions(ls, project_id).items()
    }


def test_a_killed_bulk_run_resumes_and_predicts_every_task_once(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop, coco_model: Path
) -> None:
    images = voc_images(40)
    if len(images) < 40:
        pytest.skip("needs 40 VOC2012 images from the shared data")
    project = create_image_project(label_studio, 40, images=images)
    server = start_boxloop({"BOXLOOP_ONNX_MODEL_PATH": str(coco_model)})
    connect_backend(label_studio, project.id, server.url)  # /setup stores the project
    # two tasks pre-annotated the interactive way first: the bulk run must leave them alone
    retrieve_predictions(label_studio, project.id, project.task_ids[:2])

    # a bulk run from the CLI, one prediction per import so that the kill lands mid-run
    env = {**server.env, "BOXLOOP_BULK_PUSH_BATCH": "1", "BOXLOOP_BULK_FETCH_CONCURRENCY": "1"}
    log_path = server.data_dir.parent / "bulk-cli.log"
    with log_path.open("wb") as log:
        cli = subprocess.Popen(
            [str(boxloop_executable()), "predict", "--project", str(project.id)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def predicted() -> int:
        return sum(1 for c in _versions_per_task(label_studio, project.id).values() if c[VERSION])

    try:
        wait_for(lambda: predicted() >= 8 or cli.poll() is not None, timeout_s=180, interval_s=0.1)
        assert cli.poll() is None, f"the run ended before the kill:\n{log_path.read_text()[-2000:]}"
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    first = predicted()
    assert 8 <= first < 40

    # the resumed run (the server's HTTP endpoint this time) does only the rest
    answer = httpx.post(
        f"{server.url}/projects/{project.id}/bulk-predict",
        params={"wait": "true"},
        json={"push_batch": 7},
        timeout=300,
    )
    assert answer.status_code == 202, answer.text
    report = answer.json()
    assert report["state"] == "done" and report["engine"] == "local"
    assert report["already"] == first and report["done"] == 40 - first
    assert report["failed"] == 0 and report["skipped"] == 0

    versions = _versions_per_task(label_studio, project.id)
    assert set(versions) == set(project.task_ids)
    assert all(c[VERSION] == 1 for c in versions.values()), versions  # none twice, none missing
    runs = httpx.get(f"{server.url}/status").json()["projects"][0]["bulk_predict"]["runs"]
    assert runs[0]["status"] == "done" and runs[0]["done"] == 40 - first
    assert runs[1]["status"] == "running"  # the killed run: its row says so, nothing else broke


class _DeletingStudio(StudioClient):
    """Label Studio access that deletes a task right after listing it: the deletion happens
    between the listing and the import, as when an admin deletes tasks during a run."""

    victim: int = 0

    def iter_task_versions(self, project_id: int, **kwargs: Any) -> Iterator[dict[str, Any]]:
        for task in super().iter_task_versions(project_id, **kwargs):
            yield task
            if task["id"] == self.victim:
                self.sdk.tasks.delete(str(self.victim))


def test_a_task_deleted_mid_run_is_skipped_and_the_rest_imported(
    label_studio: LabelStudioServer, coco_model: Path, tmp_path: Path
) -> None:
    project = create_image_project(label_studio, 8)
    settings = Settings(
        data_dir=tmp_path / "data",
        label_studio_url=label_studio.url,
        label_studio_token=label_studio.token,
        allowed_local_roots=[label_studio.files_root],
        onnx_model_path=coco_model,
        reconcile_on_startup=False,
        num_threads=1,
    )
    service = BoxloopService(settings)
    try:
        service.setup(project.id, project.label_config)
        studio = _DeletingStudio(label_studio.url, label_studio.token)
        studio.victim = project.task_ids[3]
        service.bulk._studio_for = lambda _pid: studio
        report = service.bulk.run(project.id, BulkPredictRequest(push_batch=8), progress=False)
    finally:
        service.close()
    assert report.skipped == 1 and report.done == 7 and report.failed == 0
    assert service.store.bulk_states(project.id, VERSION)[studio.victim] == "skipped"
    versions = _versions_per_task(label_studio, project.id)
    assert studio.victim not in versions
    assert all(c[VERSION] == 1 for c in versions.values())


def test_bulk_refusals_say_what_is_missing(
    label_studio: LabelStudioServer, start_boxloop: StartBoxloop, coco_model: Path
) -> None:
    project = create_image_project(label_studio, 2)
    server = start_boxloop({"BOXLOOP_ONNX_MODEL_PATH": str(coco_model)})
    unknown = httpx.post(f"{server.url}/projects/{project.id}/bulk-predict")
    assert unknown.status_code == 404 and "unknown" in unknown.json()["error"]
    connect_backend(label_studio, project.id, server.url)
    no_ray = httpx.post(f"{server.url}/projects/{project.id}/bulk-predict", json={"ray": True})
    assert no_ray.status_code == 409 and "BOXLOOP_RAY_ADDRESS" in no_ray.json()["error"]
    bad = httpx.post(f"{server.url}/projects/{project.id}/bulk-predict", json={"push_batch": 0})
    assert bad.status_code == 422
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving after each
