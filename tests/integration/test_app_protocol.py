"""The HTTP protocol in process: real FastAPI app, real store, real images on disk."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from backend.app import create_app
from backend.settings import Settings
from tests.synthetic import LABEL_CONFIG, ls_result, write_dataset

SETUP = {
    "project": "7.1795390608",
    "schema": LABEL_CONFIG,
    "hostname": "http://localhost:8080",
    "access_token": "secret-token-123",
}


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return [p for p, _ in write_dataset(tmp_path / "images", 3)]


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        allowed_local_roots=[tmp_path / "images"],
        reconcile_on_startup=False,
        train_after_new_annotations=1000,
        **extra,
    )


@pytest.fixture
def client(tmp_path: Path, images: list[Path]) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path))) as test_client:
        yield test_client


@pytest.fixture
def stored_client(tmp_path: Path, images: list[Path], store_url: str) -> Iterator[TestClient]:
    """The app with its state in ``BOXLOOP_DATABASE_URL`` (settings.database_url): once on a
    SQLite file, once on a fresh PostgreSQL database, for the tests that store webhooks."""
    with TestClient(create_app(_settings(tmp_path, database_url=store_url))) as test_client:
        assert test_client.app.state.service.store.url == store_url  # type: ignore[attr-defined]
        yield test_client


def _task(task_id: int, image: str) -> dict:
    return {"id": task_id, "data": {"image": image}, "project": 7}


def test_health_setup_and_openapi(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "UP"
    answer = client.post("/setup", json=SETUP)
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "boxloop-untrained"
    spec = client.get("/openapi.json").json()
    assert {"/setup", "/predict", "/webhook", "/status", "/train"} <= set(spec["paths"])


def test_setup_without_rectangles_is_a_4xx_that_says_so(client: TestClient) -> None:
    body = dict(SETUP, schema='<View><Text name="t" value="$text"/></View>')
    answer = client.post("/setup", json=body)
    assert answer.status_code == 422
    assert "no <RectangleLabels>" in answer.json()["error"]


def test_predict_one_bad_task_does_not_fail_the_batch(
    client: TestClient, images: list[Path], tmp_path: Path
) -> None:
    client.post("/setup", json=SETUP)
    corrupt = tmp_path / "images" / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff garbage")
    tasks = [
        _task(1, str(images[0])),
        _task(2, str(corrupt)),
        _task(3, str(tmp_path / "images" / "gone.jpg")),
        {"id": 4, "data": {}},
    ]
    answer = client.post(
        "/predict", json={"tasks": tasks, "project": "7.1", "label_config": LABEL_CONFIG}
    )
    assert answer.status_code == 200
    body = answer.json()
    assert len(body["results"]) == 4
    assert body["results"][0]["model_version"] == "boxloop-untrained"
    errors = {e["task"]: e for e in body["errors"]}
    assert errors[2]["status"] == 422
    assert "decodable" in errors[2]["error"] or "corrupt" in errors[2]["error"]
    assert errors[3]["status"] == 404
    assert "no image under $image" in errors[4]["error"]
    assert 1 not in errors


def test_predict_all_bad_answers_the_error(client: TestClient, tmp_path: Path) -> None:
    huge = tmp_path / "images" / "huge.png"
    Image.new("L", (8000, 6000)).save(huge)
    client.post("/setup", json=SETUP)
    answer = client.post(
        "/predict", json={"tasks": [_task(1, str(huge))], "label_config": LABEL_CONFIG}
    )
    assert answer.status_code == 413
    assert "megapixels" in answer.json()["error"]
    outside = client.post(
        "/predict", json={"tasks": [_task(1, "/etc/passwd")], "label_config": LABEL_CONFIG}
    )
    assert outside.status_code == 403


def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(
    client: TestClient,
) -> None:
    answer = client.post(
        "/webhook", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400 and "malformed JSON" in answer.json()["error"]
    answer = client.post("/predict", json={"no_tasks": []})
    assert answer.status_code == 422 and "tasks" in answer.json()["error"]
    answer = client.post("/webhook", json={"annotation": {}})
    assert answer.status_code == 422 and "action: Field required" in answer.json()["error"]
    assert client.get("/health").status_code == 200


def _created(annotation_id: int, task_id: int, image: str, labels: list[str] | None = None) -> dict:
    result = ls_result([("Square", (10, 10, 60, 60))])
    if labels:
        result[0]["value"]["rectanglelabels"] = labels
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {
            "id": annotation_id,
            "task": task_id,
            "result": result,
            "was_cancelled": False,
        },
        "task": {"id": task_id, "data": {"image": image}},
        "project": {"id": 7, "label_config": LABEL_CONFIG},
    }


def test_webhooks_store_every_annotation(stored_client: TestClient, images: list[Path]) -> None:
    client = stored_client
    client.post("/setup", json=SETUP)
    assert client.post("/webhook", json=_created(1, 1, str(images[0]))).json()["stored"] == 1
    unknown = client.post("/webhook", json=_created(2, 2, str(images[1]), labels=["Cat"])).json()
    assert unknown["stored"] == 1 and "'Cat' is not in" in unknown["warnings"][0]
    updated = copy.deepcopy(_created(1, 1, str(images[0])))
    updated["action"] = "ANNOTATION_UPDATED"
    updated["annotation"]["result"][0]["value"]["x"] = 20
    client.post("/webhook", json=updated)
    deleted = client.post(
        "/webhook",
        json={"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 2}], "project": {"id": 7}},
    )
    assert deleted.json()["deleted"] == 1
    status = client.get("/status").json()["projects"][0]
    assert status["annotations"] == {"stored": 1, "deleted": 1, "unparsable": 0}
    store = client.app.state.service.store  # type: ignore[attr-defined]
    kept = store.list_annotations(7, include_deleted=True)
    assert [a.annotation_id for a in kept] == [1, 2]
    assert kept[0].result[0]["value"]["x"] == 20


def test_a_label_config_edit_reads_stored_annotations_again(
    stored_client: TestClient, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored boxes hold label indices of the config they arrived under, and training takes
    them from the store: after an admin reorders or edits the labels, they must be read again,
    or a ``Square`` trains as whatever label now stands first."""
    client = stored_client
    client.post("/setup", json=SETUP)  # Square, Disc
    client.post("/webhook", json=_created(1, 1, str(images[0])))  # a Square
    client.post("/webhook", json=_created(2, 2, str(images[1]), labels=["Cat"]))  # not a label yet
    store = client.app.state.service.store  # type: ignore[attr-defined]

    def read() -> dict[int, tuple[list[int] | None, str | None, int]]:
        return {
            a.annotation_id: (
                None if a.boxes is None else a.boxes.labels.tolist(),
                a.parse_error,
                a.revision,
            )
            for a in store.list_annotations(7)
        }

    before = read()
    assert before[1][:2] == ([0], None) and before[2][0] is None and "'Cat'" in str(before[2][1])
    edited = LABEL_CONFIG.replace(
        '<Label value="Square"/><Label value="Disc"/>',
        '<Label value="Cat"/><Label value="Disc"/><Label value="Square"/>',
    )
    asked: list[int] = []  # the training trigger, asked after /setup when there is new work
    service = client.app.state.service  # type: ignore[attr-defined]
    monkeypatch.setattr(service, "maybe_schedule_training", asked.append)
    assert client.post("/setup", json=dict(SETUP, schema=edited)).status_code == 200
    assert asked == [7]
    client.post("/setup", json=dict(SETUP, schema=edited))  # nothing reads differently
    assert asked == [7]
    monkeypatch.undo()
    after = read()
    assert after[1][:2] == ([2], None)  # Square is the third label now
    assert after[2][:2] == ([0], None)  # Cat is a label now: usable for training
    # the Square is the same annotation, no new work: its revision stays; the Cat is training
    # data no version saw, new work for the training trigger: a new revision
    newest = max(r[2] for r in before.values())
    assert after[1][2] == before[1][2] and after[2][2] > newest
    assert store.count_annotations_since(7, newest) == 1
    removed = LABEL_CONFIG.replace('<Label value="Square"/>', "")  # Disc only
    client.post("/setup", json=dict(SETUP, schema=removed))
    gone = read()
    assert gone[1][0] is None and "'Square'" in str(gone[1][1])  # kept raw, not trained on
    assert store.list_annotations(7)[0].result[0]["value"]["rectanglelabels"] == ["Square"]
    status = client.get("/status").json()["projects"][0]
    assert status["annotations"]["unparsable"] == 2
    # a webhook carries the project's config too (Square, Disc again): the same re-reading
    assert client.post("/webhook", json=_created(3, 3, str(images[2]))).json()["stored"] == 1
    restored = read()
    assert restored[1][:2] == ([0], None) and restored[3][:2] == ([0], None)
    assert "'Cat'" in str(restored[2][1])


def test_an_alias_added_to_a_label_reads_the_annotations_that_carry_it(
    stored_client: TestClient, images: list[Path]
) -> None:
    """Label Studio writes a label's ``alias`` into results. An annotation carrying ``Sq``
    before the admin added ``alias="Sq"`` to ``Square`` was unreadable; after the edit it is a
    Square (the label list itself did not change, so only the aliases tell the edit apart)."""
    client = stored_client
    client.post("/setup", json=SETUP)
    client.post("/webhook", json=_created(1, 1, str(images[0]), labels=["Sq"]))
    store = client.app.state.service.store  # type: ignore[attr-defined]
    (before,) = store.list_annotations(7)
    assert before.boxes is None and "'Sq'" in str(before.parse_error)
    aliased = LABEL_CONFIG.replace('<Label value="Square"/>', '<Label value="Square" alias="Sq"/>')
    assert client.post("/setup", json=dict(SETUP, schema=aliased)).status_code == 200
    (after,) = store.list_annotations(7)
    assert after.parse_error is None and after.boxes is not None
    assert after.boxes.labels.tolist() == [0]


def test_webhook_for_an_unknown_project_is_a_404(client: TestClient) -> None:
    answer = client.post(
        "/webhook",
        json={
            "action": "ANNOTATION_CREATED",
            "project": {"id": 99},
            "annotation": {"id": 1, "task": 1, "result": []},
        },
    )
    assert answer.status_code == 404 and "project 99 is unknown" in answer.json()["error"]
    answer = client.post("/webhook", json={"action": "PROJECT_UPDATED", "project": {"id": 99}})
    assert answer.status_code == 200 and "not used" in answer.json()["warnings"][0]


def test_start_training_queues_a_job(stored_client: TestClient, images: list[Path]) -> None:
    client = stored_client
    client.post("/setup", json=SETUP)
    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert answer.status_code == 200 and isinstance(answer.json()["training_job"], int)
    assert client.post("/train", json={"project": 12345}).status_code == 404


def test_auth_protects_every_endpoint(tmp_path: Path, images: list[Path]) -> None:
    settings = _settings(
        tmp_path, basic_auth_user="ls", basic_auth_password="pw", auth_token="bearer-secret"
    )
    with TestClient(create_app(settings)) as test_client:
        assert test_client.get("/health").status_code == 401
        assert test_client.post("/setup", json=SETUP).status_code == 401
        basic = base64.b64encode(b"ls:pw").decode()
        assert (
            test_client.get("/health", headers={"Authorization": f"Basic {basic}"}).status_code
            == 200
        )
        assert (
            test_client.get(
                "/status", headers={"Authorization": "Bearer bearer-secret"}
            ).status_code
            == 200
        )
        assert (
            test_client.get("/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        )


def test_non_ascii_credentials_are_compared_not_a_500(tmp_path: Path, images: list[Path]) -> None:
    """``hmac.compare_digest`` raises TypeError on non-ASCII ``str``: any caller got a 500 with
    a header holding "é", and a non-ASCII password could never log in."""
    settings = _settings(tmp_path, basic_auth_user="lé", basic_auth_password="pässwort")
    with TestClient(create_app(settings)) as test_client:

        def basic(user_password: str) -> int:
            value = base64.b64encode(user_password.encode()).decode()
            headers = {"Authorization": f"Basic {value}"}
            return int(test_client.get("/health", headers=headers).status_code)

        assert basic("lé:pässwort") == 200
        assert basic("lé:passwort") == basic("le:pässwort") == 401
        raw = [(b"authorization", b"Bearer caf\xe9")]  # a byte no ASCII header holds
        answer = test_client.get("/health", headers=raw)  # type: ignore[arg-type]
        assert answer.status_code == 401, answer.text


def test_pretrained_onnx_detector_pre_annotates_before_training(
    tmp_path: Path, shared_data: Path
) -> None:
    model = shared_data / "models" / "yolox_nano_coco"
    onnx_files = sorted(model.glob("*.onnx"))
    if not onnx_files:
        pytest.skip(f"no ONNX model in {model}")
    voc = shared_data / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages"
    annotations = voc.parent / "Annotations"
    with_person = [
        x for x in sorted(annotations.glob("*.xml")) if "<name>person</name>" in x.read_text()
    ]
    image = voc / f"{with_person[0].stem}.jpg"
    settings = Settings(
        data_dir=tmp_path / "data",
        allowed_local_roots=[voc],
        reconcile_on_startup=False,
        onnx_model_path=onnx_files[0],
        score_threshold=0.2,
    )
    config = LABEL_CONFIG.replace('"Square"', '"person"').replace('"Disc"', '"dog"')
    with TestClient(create_app(settings)) as test_client:
        version = test_client.post("/setup", json=dict(SETUP, schema=config)).json()[
            "model_version"
        ]
        assert version.startswith("pretrained-")
        answer = test_client.post(
            "/predict", json={"tasks": [_task(1, str(image))], "label_config": config}
        )
    assert answer.status_code == 200
    result = answer.json()["results"][0]
    assert result["model_version"] == version
    assert result["result"], "YOLOX found nobody in a VOC image annotated with a person"
    assert any(r["value"]["rectanglelabels"] == ["person"] for r in result["result"])
    for region in result["result"]:
        assert region["value"]["rectanglelabels"][0] in {"person", "dog"}
        assert 0 <= region["value"]["x"] <= 100 and 0 < region["score"] <= 1
