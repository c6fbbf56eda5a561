"""Bad input never crashes the server nor fails more than the task it is in, and no caller
reaches where it should not: decompression bombs, exceptions inside a batch, oversized bodies
(in process and over a real socket), and /setup hostnames (SSRF)."""

from __future__ import annotations

import dataclasses
import http.server
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import backend.service as service_module
from backend.app import create_app
from backend.boxes import Boxes
from backend.settings import Settings
from tests.conftest import serve_app
from tests.synthetic import LABEL_CONFIG, write_dataset


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A 100-byte PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1))
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "allowed_local_roots": [tmp_path / "images"],
        "reconcile_on_startup": False,
        "train_after_new_annotations": 1000,
        "label_studio_url": None,
        "label_studio_token": None,
        **extra,
    }
    return Settings(**values)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    paths = [p for p, _ in write_dataset(tmp_path / "images", 3)]
    (tmp_path / "images" / "bomb.png").write_bytes(bomb_png())
    return paths


@pytest.fixture
def client(tmp_path: Path, images: list[Path]) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path))) as test_client:
        yield test_client


def _task(task_id: int, image: str) -> dict[str, Any]:
    return {"id": task_id, "data": {"image": image}}


def _predict(client: TestClient, *tasks: dict[str, Any]) -> Any:
    return client.post("/predict", json={"tasks": list(tasks), "label_config": LABEL_CONFIG})


# ---------------------------------------------------------------------------- decompression bomb
def test_a_decompression_bomb_fails_its_task_alone_with_413(
    client: TestClient, images: list[Path], tmp_path: Path
) -> None:
    bomb = str(tmp_path / "images" / "bomb.png")
    answer = _predict(client, _task(1, str(images[0])), _task(2, bomb), _task(3, str(images[1])))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["results"]) == 3
    assert [e["task"] for e in body["errors"]] == [2]
    assert body["results"][1] == []  # no prediction: an empty one would be kept for good
    assert body["results"][0]["result"] is not None
    assert body["errors"][0]["status"] == 413
    assert "400.0 megapixels" in body["errors"][0]["error"]
    assert "decompression bomb" in body["errors"][0]["error"]
    alone = _predict(client, _task(2, bomb))
    assert alone.status_code == 413 and "BOXLOOP_MAX_IMAGE_PIXELS" in alone.json()["error"]
    assert client.get("/health").status_code == 200


# ---------------------------------------------------------------------------- exceptions in a batch
class _FlakyDetector:
    """Finds one box per image, and fails on 13 px wide images."""

    labels: ClassVar[list[str]] = ["Square", "Disc"]
    version = "flaky-v1"

    def predict(self, images: list[Image.Image]) -> list[Boxes]:
        if any(image.size[0] == 13 for image in images):
            raise RuntimeError("boom on a 13 px image")
        return [
            Boxes(np.array([[1, 1, 5, 5]], np.float32), np.array([0]), image.size, np.array([0.9]))
            for image in images
        ]


def test_any_exception_inside_a_batch_fails_that_task_alone(
    tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    narrow = tmp_path / "images" / "narrow.png"
    Image.new("RGB", (13, 40)).save(narrow)
    real_load = service_module.load_image

    def load(reference: str, *args: Any, **kwargs: Any) -> Image.Image:
        if reference.endswith("img002.jpg"):
            raise KeyError("a bug in image loading")
        return real_load(reference, *args, **kwargs)

    monkeypatch.setattr(service_module, "load_image", load)
    app = create_app(_settings(tmp_path))
    service = app.state.service
    untrained = service.current_model(None)
    flaky = dataclasses.replace(untrained, version="flaky-v1", detector=_FlakyDetector())
    monkeypatch.setattr(service, "current_model", lambda *_a, **_k: flaky)
    with TestClient(app) as client:
        answer = _predict(
            client,
            _task(1, str(images[0])),
            _task(2, str(narrow)),
            _task(3, str(images[2])),
            _task(4, str(images[1])),
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        errors = {e["task"]: e for e in body["errors"]}
        assert set(errors) == {2, 3}
        assert errors[2]["status"] == 500 and "RuntimeError: boom" in errors[2]["error"]
        assert errors[3]["status"] == 500 and "KeyError" in errors[3]["error"]
        served = [body["results"][0], body["results"][3]]
        assert all(r["model_version"] == "flaky-v1" and len(r["result"]) == 1 for r in served)
        assert client.get("/health").status_code == 200


def test_tasks_and_events_of_any_shape_get_named_errors(client: TestClient) -> None:
    client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
    odd_tasks = [5, "x", None, {"id": [1], "data": "image"}, {"id": 9, "data": {"image": 3}}]
    answer = client.post("/predict", json={"tasks": odd_tasks, "project": 7})
    assert answer.status_code == 422
    assert [e["status"] for e in answer.json()["errors"]] == [422] * 5
    odd_regions = [
        {"type": "rectanglelabels", "from_name": "label", "value": {"rectanglelabels": [{}]}},
        {
            "type": "rectanglelabels",
            "from_name": "label",
            "original_width": [1],
            "original_height": 2,
            "value": {"rectanglelabels": ["Square"], "x": 1, "y": 1, "width": 1, "height": 1},
        },
    ]
    for region in odd_regions:
        event = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 7},
            "annotation": {"id": 1, "task": 1, "result": [region]},
        }
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200, answer.text
        assert "not usable for training" in answer.json()["warnings"][0]


# ---------------------------------------------------------------------------- request body limit
def test_bodies_over_the_limit_get_413_unread(tmp_path: Path, images: list[Path]) -> None:
    settings = _settings(tmp_path, max_request_bytes=10_000)
    with TestClient(create_app(settings)) as client:
        big = b'{"tasks": [' + b'{"id": 1, "data": {}},' * 1000 + b'{"id": 2, "data": {}}]}'
        answer = client.post("/predict", content=big, headers={"content-type": "application/json"})
        assert answer.status_code == 413
        assert "BOXLOOP_MAX_REQUEST_BYTES" in answer.json()["error"]

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        answer = client.post(
            "/webhook", content=chunks(), headers={"content-type": "application/json"}
        )
        assert answer.status_code == 413 and "BOXLOOP_MAX_REQUEST_BYTES" in answer.json()["error"]
        small = client.post("/predict", json={"tasks": [], "label_config": LABEL_CONFIG})
        assert small.status_code == 200


def _serve(settings: Settings) -> Iterator[int]:
    with serve_app(settings) as port:
        yield port


@pytest.fixture
def served_port(tmp_path: Path) -> Iterator[int]:
    yield from _serve(_settings(tmp_path, max_request_bytes=1024 * 1024))


def _head_only(port: int, headers: str) -> bytes:
    """Send request headers (no body), and read what the server answers within 10 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(headers.encode())
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                data = sock.recv(4096)
                if not data:
                    break
                answer += data
        except TimeoutError:
            pass
    return answer


def test_a_60_mb_body_is_refused_before_it_is_sent(served_port: int) -> None:
    """Over a real socket: the headers announce 60 MB and no body byte is sent; the server
    answers 413 at once instead of waiting for the body."""
    started = time.monotonic()
    answer = _head_only(
        served_port,
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {60 * 1024 * 1024}\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 5


def test_a_chunked_body_is_refused_once_it_crosses_the_limit(served_port: int) -> None:
    with socket.create_connection(("127.0.0.1", served_port), timeout=10) as sock:
        sock.sendall(
            b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 65536
        answer = b""
        sock.settimeout(0.2)
        for _ in range(64):  # up to 4 MB offered; the limit is 1 MB
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except OSError:
                break
            try:
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            if answer:
                break
        sock.settimeout(10)
        while answer and b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


# ---------------------------------------------------------------------------- SSRF
class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        type(self).hits.append((self.path, self.headers.get("Authorization")))
        buffer = io.BytesIO()
        Image.new("RGB", (32, 24), (200, 10, 10)).save(buffer, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(buffer.getvalue())))
        self.end_headers()
        self.wfile.write(buffer.getvalue())

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def foreign_host() -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    hits: ClassVar[list[tuple[str, str | None]]] = []
    handler = type("Recorder", (_Recorder,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def _setup_then_predict(client: TestClient, hostname: str) -> Any:
    setup = {"project": 7, "schema": LABEL_CONFIG, "hostname": hostname, "access_token": "tok"}
    assert client.post("/setup", json=setup).status_code == 200
    tasks = [_task(1, "/data/upload/7/a.png"), _task(2, f"{hostname}/b.png")]
    return client.post("/predict", json={"tasks": tasks, "project": 7})


def test_a_setup_hostname_does_not_make_boxloop_fetch_from_it(
    tmp_path: Path, foreign_host: tuple[str, list[tuple[str, str | None]]]
) -> None:
    url, hits = foreign_host
    with TestClient(create_app(_settings(tmp_path))) as client:
        answer = _setup_then_predict(client, url)
    assert answer.status_code == 403, answer.text
    assert "BOXLOOP_ALLOWED_IMAGE_HOSTS" in answer.json()["error"]
    assert hits == []


def test_an_allow_listed_setup_hostname_serves_images(
    tmp_path: Path, foreign_host: tuple[str, list[tuple[str, str | None]]]
) -> None:
    url, hits = foreign_host
    settings = _settings(tmp_path, allowed_image_hosts=[url])
    with TestClient(create_app(settings)) as client:
        answer = _setup_then_predict(client, url)
    assert answer.status_code == 200, answer.text
    assert "errors" not in answer.json()
    # the /data path goes to the allow-listed Label Studio with its token
    assert sorted(hits) == [("/b.png", "Token tok"), ("/data/upload/7/a.png", "Token tok")]


def test_other_allowed_hosts_never_get_the_token(
    tmp_path: Path, foreign_host: tuple[str, list[tuple[str, str | None]]]
) -> None:
    url, hits = foreign_host
    settings = _settings(tmp_path, label_studio_url="http://127.0.0.1:9", allowed_image_hosts=[url])
    with TestClient(create_app(settings)) as client:
        setup = {"project": 7, "schema": LABEL_CONFIG, "access_token": "tok"}
        client.post("/setup", json=setup)
        answer = client.post("/predict", json={"tasks": [_task(1, f"{url}/c.png")], "project": 7})
    assert answer.status_code == 200, answer.text
    assert hits == [("/c.png", None)]


# ---------------------------------------------------------------------------- Label Studio's shapes
def _square_region(width: int, height: int) -> dict[str, Any]:
    """One 'Square' rectangle as Label Studio submits it, on a ``width`` × ``height`` image."""
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "value": {"x": 10, "y": 10, "width": 20, "height": 20, "rectanglelabels": ["Square"]},
    }


def test_annotations_created_as_label_studio_sends_it(
    tmp_path: Path, images: list[Path], store_url: str
) -> None:
    """Label Studio's bulk event carries an ``annotation`` list and a parallel ``task`` list
    (webhooks/models.py: key 'annotation', many=True, nested 'task'); both are stored (on
    SQLite and on PostgreSQL)."""
    with TestClient(create_app(_settings(tmp_path, database_url=store_url))) as client:
        client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
        region = _square_region(320, 240)
        event = {
            "action": "ANNOTATIONS_CREATED",
            "project": {"id": 7, "title": "p"},
            "annotation": [
                {"id": 11, "task": 1, "result": [region], "was_cancelled": False, "project": 7},
                {"id": 12, "task": 2, "result": [region], "was_cancelled": False, "project": 7},
            ],
            "task": [
                {"id": 1, "data": {"image": str(images[0])}, "project": 7},
                {"id": 2, "data": {"image": str(images[1])}, "project": 7},
            ],
        }
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200, answer.text
        assert answer.json()["stored"] == 2
        store = client.app.state.service.store  # type: ignore[attr-defined]
        assert store.get_task_data(7, 2) == {"image": str(images[1])}
        empty = client.post("/webhook", json={"action": "ANNOTATIONS_CREATED", "project": 7})
        assert empty.status_code == 422 and "'annotation' list" in empty.json()["error"]


def test_one_bad_item_does_not_cost_a_bulk_event_its_good_annotations(
    tmp_path: Path, images: list[Path]
) -> None:
    """An ANNOTATIONS_CREATED batch with a malformed item stores every other item, names the
    bad one under ``rejected``, and still answers 200; a batch of bad items only is a 400."""
    region = _square_region(320, 240)
    good = [{"id": 20 + i, "task": 1 + i, "result": [region]} for i in range(3)]
    bad: list[Any] = [
        {"id": 30, "task": "four", "result": [region]},
        "not an object",
        {"id": 31, "task": 5, "result": "boxes"},
        {"id": 2**63, "task": 5, "result": []},  # past the store's 64-bit ids
        {"id": True, "task": 5},
        {"id": 32, "task": 5, "result": [], "was_cancelled": "false"},
        {"id": 33, "task": 5},  # no result: read as [], it was stored as "no object"
    ]
    with TestClient(create_app(_settings(tmp_path))) as client:
        client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
        event = {
            "action": "ANNOTATIONS_CREATED",
            "project": 7,
            "annotation": [good[0], bad[0], good[1], bad[1], bad[2], good[2], *bad[3:]],
            "task": [{"id": 1 + i, "data": {"image": str(images[i])}} for i in range(3)],
        }
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["stored"] == 3
        rejected = body["rejected"]
        assert [r.split(":")[0] for r in rejected] == [f"item {i}" for i in (1, 3, 4, 6, 7, 8, 9)]
        assert "integer 'id' and 'task'" in rejected[0]
        assert "JSON object" in rejected[1]
        assert "'result' must be a list" in rejected[2]
        assert "integer 'id' and 'task'" in rejected[3] and "integer 'id' and 'task'" in rejected[4]
        assert "'was_cancelled' must be a boolean" in rejected[5]
        assert "'result' is missing" in rejected[6]
        store = client.app.state.service.store  # type: ignore[attr-defined]
        stored = {a.task_id for a in store.list_annotations(7)}
        assert stored == {1, 2, 3}
        only_bad = {"action": "ANNOTATIONS_CREATED", "project": 7, "annotation": bad}
        refused = client.post("/webhook", json=only_bad)
        assert refused.status_code == 400
        assert "no annotation of the batch could be stored" in refused.json()["error"]
        assert client.get("/health").status_code == 200


def test_one_bad_id_does_not_keep_a_deleted_batch_in_training(
    tmp_path: Path, images: list[Path]
) -> None:
    """ANNOTATIONS_DELETED deletes every item with an integer id, names the others under
    ``rejected`` (200), and is a 400 only when no item had one: a deleted annotation that stayed
    in the store would go on teaching the next version."""
    region = _square_region(320, 240)
    with TestClient(create_app(_settings(tmp_path))) as client:
        client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
        client.post(
            "/webhook",
            json={
                "action": "ANNOTATIONS_CREATED",
                "project": 7,
                "annotation": [{"id": 40 + i, "task": 1 + i, "result": [region]} for i in range(3)],
                "task": [{"id": 1 + i, "data": {"image": str(images[i])}} for i in range(3)],
            },
        )
        bad: list[Any] = [{"id": "x"}, 41.5, {"id": True}, {}]
        event = {"action": "ANNOTATIONS_DELETED", "project": 7}
        answer = client.post(
            "/webhook", json={**event, "annotations": [bad[0], {"id": 40}, *bad[1:], {"id": 42.0}]}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["deleted"] == 2
        assert [r.split(":")[0] for r in body["rejected"]] == [f"item {i}" for i in (0, 2, 3, 4)]
        assert all("integer 'id'" in r for r in body["rejected"])
        store = client.app.state.service.store  # type: ignore[attr-defined]
        assert [a.annotation_id for a in store.list_annotations(7)] == [41]
        refused = client.post("/webhook", json={**event, "annotations": bad})
        assert refused.status_code == 400
        assert "no annotation of the batch could be deleted" in refused.json()["error"]
        assert [a.annotation_id for a in store.list_annotations(7)] == [41]


def test_one_bad_task_does_not_cost_a_tasks_created_event_its_good_tasks(tmp_path: Path) -> None:
    """TASKS_CREATED records every task with an integer id and object data, names the others
    under ``rejected`` (200), and is a 400 only when no task could be recorded."""
    tasks: list[Any] = [
        {"id": 1, "data": {"image": "a.png"}},
        {"id": "2", "data": {}},
        {"id": 3},
        {"id": 4, "data": "a.png"},
        [5],
        {"id": 2**63, "data": {}},
    ]
    with TestClient(create_app(_settings(tmp_path))) as client:
        client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
        answer = client.post(
            "/webhook", json={"action": "TASKS_CREATED", "project": 7, "tasks": tasks}
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["tasks"] == 2
        assert [r.split(":")[0] for r in body["rejected"]] == [
            "item 1",
            "item 3",
            "item 4",
            "item 5",
        ]
        assert "'data' must be a JSON object" in body["rejected"][1]
        store = client.app.state.service.store  # type: ignore[attr-defined]
        assert store.get_task_data(7, 1) == {"image": "a.png"}
        assert store.get_task_data(7, 3) == {}
        refused = client.post(
            "/webhook",
            json={
                "action": "TASKS_CREATED",
                "project": 7,
                "tasks": [tasks[i] for i in (1, 3, 4, 5)],
            },
        )
        assert refused.status_code == 400
        assert "no task of the batch could be recorded" in refused.json()["error"]


def test_training_reads_images_from_the_same_hosts_as_serving(
    tmp_path: Path, foreign_host: tuple[str, list[tuple[str, str | None]]]
) -> None:
    from backend.labelstudio.convert import parse_label_config
    from backend.training_job import gather_samples

    url, hits = foreign_host
    settings = _settings(tmp_path, allowed_image_hosts=[url])
    region = _square_region(32, 24)
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 7, "label_config": LABEL_CONFIG},
        "annotation": {"id": 1, "task": 1, "result": [region]},
        "task": {"id": 1, "data": {"image": f"{url}/t.png"}},
    }
    with TestClient(create_app(settings)) as client:
        assert client.post("/webhook", json=event).status_code == 200
        service = client.app.state.service  # type: ignore[attr-defined]
        project = service.store.get_project(7)
        gathered = gather_samples(
            settings, service.store, project, parse_label_config(LABEL_CONFIG)
        )
    assert len(gathered.samples) == 1, gathered.skipped
    assert hits == [("/t.png", None)]


# ---------------------------------------------------------------------------- references and ids
def test_references_no_url_or_file_system_takes_fail_their_task_alone(
    tmp_path: Path, images: list[Path]
) -> None:
    """A control character or 70,000 characters (httpx.InvalidURL, no HTTPError) and a lone
    surrogate in a local path (UnicodeEncodeError) were a per-task 500 on /predict, and one such
    annotated task failed every training job of the project."""
    from backend.labelstudio.convert import parse_label_config
    from backend.training_job import gather_samples

    settings = _settings(tmp_path, label_studio_url="http://127.0.0.1:9")
    odd = [
        "/data/upload/1/a\u0001.png",
        "/data/upload/1/" + "a" * 70_000 + ".png",
        str(tmp_path / "images" / "a\ud800.png"),
    ]
    tasks = [_task(1, str(images[0]))] + [_task(i + 2, ref) for i, ref in enumerate(odd)]
    body = json.dumps({"project": 7, "tasks": tasks}).encode()  # json escapes the surrogate
    with TestClient(create_app(settings)) as client:
        assert client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG}).status_code == 200
        answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text  # the good task is served
        assert [e["status"] for e in answer.json()["errors"]] == [422] * 3
        for task in tasks:
            event = {
                "action": "ANNOTATION_CREATED",
                "project": {"id": 7},
                "annotation": {
                    "id": task["id"],
                    "task": task["id"],
                    "result": [_square_region(320, 240)],
                },
                "task": task,
            }
            raw = json.dumps(event).encode()
            sent = client.post(
                "/webhook", content=raw, headers={"content-type": "application/json"}
            )
            assert sent.status_code == 200, sent.text
        service = client.app.state.service  # type: ignore[attr-defined]
        project = service.store.get_project(7)
        gathered = gather_samples(
            settings, service.store, project, parse_label_config(LABEL_CONFIG)
        )
    assert len(gathered.samples) == 1 and gathered.skipped["image_error"] == 3


def test_a_webhook_whose_task_is_another_keeps_that_data_off_the_annotated_task(
    client: TestClient, images: list[Path]
) -> None:
    """Task 2's data under annotation.task 1 overwrote task 1's image: boxes drawn on image 1
    would train on image 2."""
    event = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 7, "label_config": LABEL_CONFIG},
        "annotation": {"id": 1, "task": 1, "result": [_square_region(320, 240)]},
        "task": _task(1, str(images[0])),
    }
    assert client.post("/webhook", json=event).status_code == 200
    mismatched = {**event, "task": _task(2, str(images[1]))}
    assert client.post("/webhook", json=mismatched).status_code == 200
    store = client.app.state.service.store  # type: ignore[attr-defined]
    assert store.get_task_data(7, 1) == {"image": str(images[0])}
    assert store.list_annotations(7)[0].task_id == 1  # the annotation itself is kept


def test_an_unknown_action_with_a_lone_surrogate_is_named_not_a_500(client: TestClient) -> None:
    raw = b'{"action": "X\\ud800", "project": 7}'
    answer = client.post("/webhook", content=raw, headers={"content-type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert "is not used by boxloop" in answer.json()["warnings"][0]


def test_a_task_without_an_image_does_not_fail_a_simnet_order(
    client: TestClient, images: list[Path]
) -> None:
    """SimNet trained on every task's image, so one text-only task failed the whole order (500);
    the other extractors skip such a task and name it."""
    tasks = [_task(i + 1, str(p)) for i, p in enumerate(images)]
    tasks.append({"id": 9, "data": {"text": "a task without an image"}})
    client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": 7, "tasks": tasks})
    request = {"strategy": "similar", "extractor": "simnet", "simnet_epochs": 1, "push": False}
    order = client.post("/projects/7/order?wait=true", json=request).json()
    assert order["state"] == "done", order
    assert order["missing_features"] == [9] and sorted(order["first_batch"]) == [1, 2, 3, 9]


@pytest.mark.parametrize("memory_mb", [4096, 0])
def test_an_update_as_label_studio_sent_it_without_sizes_is_trained_on(
    tmp_path: Path, images: list[Path], memory_mb: int
) -> None:
    """The captured ANNOTATION_UPDATED carries regions without original_width/height. It was
    stored as "not usable for training" for good; its boxes are read at the image's size.
    Past the job's memory budget the image is kept encoded, and decodes to the same pixels."""
    from backend.labelstudio.convert import parse_label_config
    from backend.training.samples import LazyImage, load_sample_image
    from backend.training_job import gather_samples
    from tests.conftest import shared_data_dir

    captured = shared_data_dir().parent / "docs" / "label-studio-payloads"
    path = captured / "webhook_ANNOTATION_UPDATED.json"
    if not path.is_file():
        pytest.skip(f"captured Label Studio payloads not found at {captured}")
    event = json.loads(path.read_text())
    event["task"] = _task(event["annotation"]["task"], str(images[0]))
    settings = _settings(tmp_path, training_image_memory_mb=memory_mb)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200 and not answer.json().get("warnings"), answer.text
        service = client.app.state.service  # type: ignore[attr-defined]
        project = service.store.get_project(event["project"]["id"])
        config = parse_label_config(project.label_config)
        gathered = gather_samples(settings, service.store, project, config)
    (sample,) = gathered.samples
    assert isinstance(sample.image, LazyImage) == (memory_mb == 0)
    with Image.open(images[0]) as original:
        np.testing.assert_array_equal(
            np.asarray(load_sample_image(sample)), np.asarray(original.convert("RGB"))
        )
    value = event["annotation"]["result"][0]["value"]
    width, height = sample.image.size  # type: ignore[union-attr]
    expected = [value["x"] * width / 100, value["y"] * height / 100]
    np.testing.assert_allclose(sample.boxes.xyxy[0, :2], expected, atol=1e-3)


def test_a_config_stored_by_a_looser_version_still_takes_webhooks_and_predicts(
    tmp_path: Path, images: list[Path]
) -> None:
    """A label config an earlier boxloop stored and today's parser refuses (one control over two
    images) made every webhook of the project a 500: each annotation it carried was lost, as
    Label Studio sends a webhook once. /predict without a label_config was a 500 too."""
    looser = (
        '<View><Image name="image" value="$image"/><Image name="img2" value="$image2"/>'
        '<RectangleLabels name="label" toName="image,img2"><Label value="Square"/>'
        "</RectangleLabels></View>"
    )
    with TestClient(create_app(_settings(tmp_path))) as client:
        store = client.app.state.service.store  # type: ignore[attr-defined]
        store.upsert_project(
            7, label_config=looser, from_name="label", to_name="image", image_key="image",
            labels=["Square"],
        )  # fmt: skip
        event = {
            "action": "ANNOTATION_CREATED",
            "project": {"id": 7, "label_config": looser},
            "annotation": {"id": 1, "task": 1, "result": [_square_region(320, 240)]},
            "task": _task(1, str(images[0])),
        }
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200 and answer.json()["stored"] == 1, answer.text
        (stored,) = store.list_annotations(7)
        assert stored.boxes is not None and len(stored.boxes) == 1
        assert _predict(client, _task(1, str(images[0]))).status_code == 200


def test_webhooks_never_overwrite_what_they_do_not_carry(
    tmp_path: Path, images: list[Path]
) -> None:
    """An update without ``result`` replaced the stored boxes with "no object" (200, no
    warning); a TASKS_CREATED item without ``data`` emptied a known task's data; a bulk event
    with both an ``annotation`` and an ``annotations`` list stored one of them; the single event
    refused (422, the annotation lost) a region or a null the bulk event stores and reports."""
    with TestClient(create_app(_settings(tmp_path))) as client:
        client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG})
        store = client.app.state.service.store  # type: ignore[attr-defined]
        created = {
            "action": "ANNOTATION_CREATED",
            "project": 7,
            "annotation": {"id": 1, "task": 1, "result": [_square_region(320, 240)]},
            "task": _task(1, str(images[0])),
        }
        assert client.post("/webhook", json=created).status_code == 200
        for annotation in ({"id": 1, "task": 1}, {"id": 1, "task": 1, "result": None}):
            update = {"action": "ANNOTATION_UPDATED", "project": 7, "annotation": annotation}
            refused = client.post("/webhook", json=update)
            assert refused.status_code == 422 and "result" in refused.json()["error"]
        (kept,) = store.list_annotations(7)
        assert kept.boxes is not None and len(kept.boxes) == 1

        tasks = {"action": "TASKS_CREATED", "project": 7, "tasks": [{"id": 1}, {"id": 9}]}
        assert client.post("/webhook", json=tasks).json()["tasks"] == 2
        assert store.get_task_data(7, 1) == {"image": str(images[0])}
        assert store.get_task_data(7, 9) == {}

        both = {
            "action": "ANNOTATIONS_CREATED",
            "project": 7,
            "annotation": [{"id": 5, "task": 2, "result": []}],
            "annotations": [{"id": 6, "task": 3, "result": []}],
        }
        assert client.post("/webhook", json=both).json()["stored"] == 2
        odd = {**created, "annotation": {"id": 7, "task": 4, "result": [5], "was_cancelled": None}}
        answer = client.post("/webhook", json=odd)
        assert answer.status_code == 200 and "not usable for training" in answer.text
        assert {a.annotation_id for a in store.list_annotations(7)} == {1, 5, 6, 7}


def test_error_messages_name_the_payloads_fields_and_what_is_wrong(client: TestClient) -> None:
    """A 422 named request-model classes as if they were fields (``project.ProjectObject.id``);
    a body that is not UTF-8 got "There was an error parsing the body"; a thumbnail of a task
    boxloop does not know said the task "has no image"."""
    event = {"action": "ANNOTATION_CREATED", "project": {"id": "1"}, "annotation": {"id": 1}}
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 422 and "project.id:" in answer.json()["error"]
    assert "ProjectObject" not in answer.json()["error"]
    headers = {"content-type": "application/json"}
    garbled = client.post("/webhook", content=b'{"action": "\xff"}', headers=headers)
    assert garbled.status_code == 400 and "UTF-8" in garbled.json()["error"]
    assert client.post("/setup", json={"project": 7, "schema": LABEL_CONFIG}).status_code == 200
    unknown = client.get("/projects/7/tasks/99/thumbnail")
    assert (
        unknown.status_code == 404 and "task 99 of project 7 is unknown" in unknown.json()["error"]
    )
