"""``boxloop order`` and ``POST /projects/{id}/order`` without Label Studio: local images,
real ImgNet features, the order stored, and new tasks placed into it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.cli import main
from backend.settings import Settings
from tests.synthetic import LABEL_CONFIG, write_dataset


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    images = [p for p, _ in write_dataset(tmp_path / "images", 9, seed=4)]
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("BOXLOOP_ALLOWED_LOCAL_ROOTS", str(tmp_path / "images"))
    monkeypatch.setenv("BOXLOOP_RECONCILE_ON_STARTUP", "false")
    monkeypatch.setenv("BOXLOOP_NUM_THREADS", "1")
    for key in ("BOXLOOP_LABEL_STUDIO_URL", "BOXLOOP_LABEL_STUDIO_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return images


def _tasks(images: list[Path], first: int) -> dict:
    return {
        "action": "TASKS_CREATED",
        "tasks": [{"id": first + i, "data": {"image": str(p)}} for i, p in enumerate(images)],
        "project": {"id": 5, "label_config": LABEL_CONFIG},
    }


def test_order_cli_then_new_tasks_are_placed(
    env: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings()
    with TestClient(create_app(settings)) as client:
        client.post("/setup", json={"project": 5, "schema": LABEL_CONFIG})
        assert client.post("/webhook", json=_tasks(env[:6], 1)).json()["tasks"] == 6
        bad = client.post("/projects/5/order", json={"strategy": "sideways"})
        assert bad.status_code == 422 and "strategy: Input should be" in bad.json()["error"]
        assert client.post("/projects/99/order", json={}).status_code == 404

    assert (
        main(
            [
                "order",
                "--project",
                "5",
                "--strategy",
                "dissimilar",
                "--no-push",
                "--batch-size",
                "2",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    state = json.loads(capsys.readouterr().out)
    assert state["state"] == "done" and state["strategy"] == "dissimilar"
    assert state["n_tasks"] == 6 and len(state["first_batch"]) == 2

    with TestClient(create_app(Settings())) as client:
        status = client.get("/status").json()["projects"][0]
        assert status["queue"]["strategy"] == "dissimilar" and status["queue"]["tasks"] == 6
        # new tasks arrive: features computed and placed in the background, nothing recomputed
        client.post("/webhook", json=_tasks(env[6:], 7))
        service = client.app.state.service  # type: ignore[attr-defined]
        service._queue_pool.submit(lambda: None).result(timeout=300)  # drain the queue worker
        order = service.store.get_order(5)
    assert order is not None
    assert sorted(order.task_ids) == list(range(1, 10))


def test_order_cli_takes_its_defaults_from_settings_as_http_does(
    env: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One typed request: options left out come from the settings (a settings file and
    BOXLOOP_ORDER_* variables), for the CLI exactly as for HTTP."""
    monkeypatch.setenv("BOXLOOP_ORDER_STRATEGY", "temporal")
    settings_file = tmp_path / "boxloop.yaml"
    settings_file.write_text("order_batch_size: 4\norder_seed: 3\n")
    with TestClient(create_app(Settings())) as client:
        client.post("/setup", json={"project": 5, "schema": LABEL_CONFIG})
        client.post("/webhook", json=_tasks(env[:6], 1))
        over_http = client.post("/projects/5/order?wait=true", json={"push": False}).json()
    assert over_http["state"] == "done" and over_http["strategy"] == "temporal"

    assert main(["--settings", str(settings_file), "order", "--project", "5", "--no-push"]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["state"] == "done" and state["strategy"] == "temporal"
    assert len(state["first_batch"]) == 4
    assert state["params"]["seed"] == 3


def test_order_cli_unknown_project_and_bad_values_are_clear_errors(
    env: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["order", "--project", "99", "--strategy", "random"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("boxloop order: error: project 99 is unknown") and "Traceback" not in err
    with pytest.raises(SystemExit) as exited:
        main(["order", "--project", "5", "--start", "sideways"])
    assert exited.value.code == 2
    assert main(["order", "--project", "5", "--extractor", "imgnet_nosuchnet"]) == 2
    assert "unknown feature extractor 'imgnet_nosuchnet'" in capsys.readouterr().err
    with TestClient(create_app(Settings())) as client:
        client.post("/setup", json={"project": 5, "schema": LABEL_CONFIG})
        answer = client.post("/projects/5/order", json={"start": "sideways"})
        assert answer.status_code == 422 and "start" in answer.json()["error"]
        assert client.post("/projects/5/order", json={"batch_size": 0}).status_code == 422
        # a project without tasks: a 202 holding "status_code": 500 before, and exit 1
        empty = client.post("/setup", json={"project": 6, "schema": LABEL_CONFIG})
        assert empty.status_code == 200
        refused = client.post("/projects/6/order?wait=true", json={"push": False})
        assert refused.status_code == 409 and "no tasks to order" in refused.json()["error"]
        queued = client.post("/projects/6/order", json={"push": False})  # not waited for
        assert queued.status_code == 202
    assert main(["order", "--project", "6", "--no-push"]) == 1
    assert "boxloop order: error: project 6 has no tasks to order" in capsys.readouterr().err
