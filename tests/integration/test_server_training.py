"""The served backend as a process: background training, requests during training,
kill -9 while training, restart, and the new version pre-annotating."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from backend.boxes import Boxes
from backend.labelstudio.convert import parse_label_config, regions_to_boxes
from tests.conftest import free_port, shared_data_dir
from tests.synthetic import LABEL_CONFIG, LABELS, ls_result, write_dataset

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 12


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


def _wait(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[], Server]]:
    coco_model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not coco_model.is_file():
        pytest.skip(f"the COCO YOLOX-Nano model is not at {coco_model} (set BOXLOOP_SHARED_DATA)")
    servers: list[Server] = []
    env = dict(os.environ)
    env.update(
        {
            "BOXLOOP_DATA_DIR": str(tmp_path / "data"),
            "BOXLOOP_ALLOWED_LOCAL_ROOTS": str(tmp_path / "images"),
            "BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": str(N_IMAGES),
            # The default detector: the COCO YOLOX-Nano, fine-tuned (Square and Disc are labels
            # COCO lacks, so the head rows start fresh and nothing serves before training).
            "BOXLOOP_ONNX_MODEL_PATH": str(coco_model),
            "BOXLOOP_YOLOX_INPUT_AREA": str(256 * 192),
            "BOXLOOP_YOLOX_IMAGE_VISITS": "480",
            "BOXLOOP_YOLOX_MAX_EPOCHS": "40",
            "BOXLOOP_NUM_THREADS": "1",
            "BOXLOOP_RECONCILE_ON_STARTUP": "false",
        }
    )
    for key in ("BOXLOOP_LABEL_STUDIO_URL", "BOXLOOP_LABEL_STUDIO_TOKEN", "BOXLOOP_DETECTOR"):
        env.pop(key, None)

    def start() -> Server:
        port = free_port()
        log = tmp_path / f"server-{len(servers)}.log"
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "backend.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=REPO,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        servers.append(server)

        def healthy() -> bool:
            try:
                return httpx.get(server.url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert process.poll() is None, log.read_text()[-3000:]
                return False

        _wait(healthy, 60, "the server to answer /health")
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.process.terminate()
            server.process.wait(15)


def _annotation_payload(i: int, path: Path, objects: list) -> dict[str, Any]:
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 100 + i, "task": i + 1, "result": ls_result(objects)},
        "task": {"id": i + 1, "data": {"image": str(path)}},
        "project": {"id": 3, "label_config": LABEL_CONFIG},
    }


def _matched(known: Boxes, predicted: Boxes) -> int:
    """Known boxes with a predicted box of their label at IoU >= 0.5."""
    if not len(known) or not len(predicted):
        return 0
    iou = known.iou(predicted)
    same = known.labels[:, None] == predicted.labels[None, :]
    return int(((iou >= 0.5) & same).any(axis=1).sum())


def _job(client: httpx.Client) -> dict[str, Any] | None:
    projects = client.get("/status").json()["projects"]
    jobs = projects[0]["training_jobs"] if projects else []
    return jobs[0] if jobs else None


@pytest.mark.slow
def test_training_survives_kill_9_and_serves_the_new_version(
    tmp_path: Path, start_server: Callable[[], Server]
) -> None:
    dataset = write_dataset(tmp_path / "images", N_IMAGES + 2, seed=1)
    server = start_server()
    with server.client() as client:
        assert (
            client.post("/setup", json={"project": 3, "schema": LABEL_CONFIG}).json()[
                "model_version"
            ]
            == "boxloop-untrained"
        )
        for i, (path, objects) in enumerate(dataset[:N_IMAGES]):
            answer = client.post("/webhook", json=_annotation_payload(i, path, objects))
            assert answer.status_code == 200, answer.text
        # the N-th annotation queued a background job, which starts running
        _wait(lambda: (_job(client) or {}).get("status") == "running", 60, "training to start")
        running = _job(client)
        assert running is not None  # /status says who runs it, and that it lives
        assert running["owner"].split(":")[1] == str(server.process.pid)
        assert running["heartbeat_at"] is not None
        # requests are answered while it trains
        answer = client.post("/webhook", json=_annotation_payload(N_IMAGES, *dataset[N_IMAGES]))
        assert answer.status_code == 200 and answer.json()["stored"] == 1
        predict = client.post(
            "/predict",
            json={
                "tasks": [{"id": 99, "data": {"image": str(dataset[-1][0])}}],
                "project": 3,
                "label_config": LABEL_CONFIG,
            },
        )
        assert predict.status_code == 200
        assert predict.json()["results"][0]["model_version"] == "boxloop-untrained"

    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)

    restarted = start_server()
    with restarted.client() as client:
        project = client.get("/status").json()["projects"][0]
        assert project["annotations"]["stored"] == N_IMAGES + 1  # nothing lost
        jobs = project["training_jobs"]
        # the job the kill interrupted is marked so, and a queued job (the one the 13th
        # annotation queued during training, or a "resume after restart") takes over
        assert jobs[1]["status"] == "interrupted"
        assert jobs[0]["status"] in ("queued", "running")
        done = _wait(
            lambda: (_job(client) or {}).get("status") in ("succeeded", "failed") and _job(client),
            900,
            "the resumed training job to finish",
        )
        assert done["status"] == "succeeded", done
        version = done["model_version"]
        assert version == "boxloop-p3-v1"
        assert (
            client.post("/setup", json={"project": 3, "schema": LABEL_CONFIG}).json()[
                "model_version"
            ]
            == version
        )
        path, objects = dataset[-1]
        predict = client.post(
            "/predict",
            json={
                "tasks": [{"id": 99, "data": {"image": str(path)}}],
                "project": 3,
                "label_config": LABEL_CONFIG,
            },
        ).json()
        result = predict["results"][0]
        assert result["model_version"] == version
        # The promoted version finds the known objects of held-out images, not just any box.
        versions = client.get("/status").json()["projects"][0]["model_versions"]
        assert versions[-1]["status"] == "promoted", versions[-1]
        held_out = write_dataset(tmp_path / "images" / "held", 6, seed=7)
        answers = client.post(
            "/predict",
            json={
                "tasks": [
                    {"id": 200 + i, "data": {"image": str(p)}} for i, (p, _) in enumerate(held_out)
                ],
                "project": 3,
                "label_config": LABEL_CONFIG,
            },
        ).json()["results"]
        found = total = 0
        for (_, objects), answer in zip(held_out, answers, strict=True):
            predicted = regions_to_boxes(
                answer["result"], parse_label_config(LABEL_CONFIG), (320, 240)
            )
            known = Boxes(
                np.array([b for _, b in objects], dtype=np.float32).reshape(-1, 4),
                np.array([LABELS.index(n) for n, _ in objects], dtype=np.int64),
                (320, 240),
            )
            total += len(known)
            found += _matched(known, predicted)
        assert found >= 0.7 * total, f"{found} of {total} known objects found at IoU >= 0.5"
