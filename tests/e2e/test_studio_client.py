"""``StudioClient`` against a real Label Studio 1.23.2.

Every call the backend makes through the SDK is exercised here on the real server, so an SDK or
server upgrade that changes a shape fails here rather than in production.

The ML backend in this file is a minimal protocol stub (``/health``, ``/setup``, ``/predict``,
``/webhook``), on purpose: these tests are about the client and Label Studio's side of the
protocol, and must not depend on the detector, the store or training. The full loop with the
real ``boxloop serve`` is the job of the other e2e tests (``boxloop_server`` fixture).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from label_studio_sdk import LabelStudio

from backend.labelstudio.client import StudioClient, StudioError
from tests.e2e.conftest import (
    ImageProject,
    LabelStudioServer,
    connect_backend,
    create_image_project,
    free_port,
    ground_truth_result,
    retrieve_predictions,
    start_training,
    submit_annotation,
    task_predictions,
)

pytestmark = pytest.mark.e2e


@dataclass
class StubBackend:
    """Answers Label Studio's ML-backend calls; records what it was sent."""

    url: str
    model_version: str
    label: str
    calls: list[tuple[str, str]] = field(default_factory=list)
    webhooks: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def stub_backend(image_project: ImageProject) -> Iterator[StubBackend]:
    port = free_port()
    stub = StubBackend(f"http://127.0.0.1:{port}", "stub-v1", image_project.labels[0])

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            stub.calls.append(("GET", self.path))
            self._answer({"status": "UP", "model_class": "stub"})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            stub.calls.append(("POST", self.path))
            if self.path == "/setup":
                self._answer({"model_version": stub.model_version})
            elif self.path == "/predict":
                region = {
                    "from_name": image_project.from_name,
                    "to_name": image_project.to_name,
                    "type": "rectanglelabels",
                    "value": {
                        "x": 10.0,
                        "y": 10.0,
                        "width": 20.0,
                        "height": 20.0,
                        "rotation": 0,
                        "rectanglelabels": [stub.label],
                    },
                    "score": 0.5,
                }
                results = [
                    {"result": [region], "score": 0.5, "model_version": stub.model_version}
                    for _ in body.get("tasks", [])
                ]
                self._answer({"results": results, "model_version": stub.model_version})
            else:
                stub.webhooks.append(body)
                self._answer({})

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


def test_token_is_never_shown(label_studio: LabelStudioServer) -> None:
    client = StudioClient(label_studio.url, label_studio.token)
    assert label_studio.token not in repr(client)
    assert label_studio.token not in str(client)
    assert label_studio.token not in repr(label_studio)
    assert client.uses_legacy_token


def test_image_request_sends_the_token_only_to_label_studio(
    label_studio: LabelStudioServer,
) -> None:
    studio = label_studio.studio
    url, headers = studio.image_request("/data/upload/1/abc-x.jpg")
    assert url == f"{label_studio.url}/data/upload/1/abc-x.jpg"
    assert headers == label_studio.auth_headers
    url, headers = studio.image_request("https://images.example.org/a.jpg")
    assert url == "https://images.example.org/a.jpg"
    assert headers == {}


def test_list_tasks_paginates(label_studio: LabelStudioServer, image_project: ImageProject) -> None:
    # Page size 4 over 6 tasks: two full-or-partial pages, then Label Studio's 404 ends it.
    client = StudioClient(label_studio.url, label_studio.token, page_size=4)
    tasks = client.list_tasks(image_project.id)
    assert tasks == image_project.tasks
    assert [t["id"] for t in tasks] == sorted(t["id"] for t in tasks)
    assert all(set(t) == {"id", "data"} for t in tasks)
    assert client.list_tasks(create_image_project(label_studio, 1).id) != []


def test_list_annotations_returns_every_annotation(
    label_studio: LabelStudioServer, image_project: ImageProject
) -> None:
    client = StudioClient(label_studio.url, label_studio.token, page_size=2)
    assert client.list_annotations(image_project.id) == []
    ids = image_project.task_ids
    created = [
        submit_annotation(label_studio, ids[0], ground_truth_result(image_project, ids[0])),
        submit_annotation(label_studio, ids[3], ground_truth_result(image_project, ids[3])),
        submit_annotation(label_studio, ids[3], ground_truth_result(image_project, ids[3])),
        submit_annotation(label_studio, ids[5], [], was_cancelled=True),
    ]
    listed = client.list_annotations(image_project.id)
    assert [a["id"] for a in listed] == sorted(a["id"] for a in created)
    by_id = {a["id"]: a for a in listed}
    for original in created:
        got = by_id[original["id"]]
        assert got["task"] == original["task"]
        assert got["project"] == image_project.id
        assert got["was_cancelled"] == original["was_cancelled"]
        assert got["result"] == original["result"]
        assert "updated_at" in got
    first = by_id[created[0]["id"]]["result"][0]
    assert first["type"] == "rectanglelabels"
    assert first["original_width"] == image_project.images[ids[0]].width


def test_get_project(label_studio: LabelStudioServer, image_project: ImageProject) -> None:
    project = label_studio.studio.get_project(image_project.id)
    assert project["id"] == image_project.id
    assert project["title"] == image_project.title
    assert project["label_config"] == image_project.label_config
    assert "model_version" in project
    with pytest.raises(Exception, match="404"):
        label_studio.studio.get_project(999_999)


def test_backend_title_drives_project_model_version(
    label_studio: LabelStudioServer, image_project: ImageProject, stub_backend: StubBackend
) -> None:
    studio = label_studio.studio
    backend = connect_backend(label_studio, image_project.id, stub_backend.url, title="initial")
    assert ("POST", "/setup") in stub_backend.calls
    assert studio.get_project(image_project.id)["model_version"] == "initial"

    # By URL, with a trailing slash the backend was not registered with.
    updated = studio.set_backend_title(image_project.id, stub_backend.url + "/", "stub-v2")
    assert updated["id"] == backend["id"]
    assert updated["title"] == "stub-v2"
    assert studio.get_project(image_project.id)["model_version"] == "stub-v2"

    # By id.
    studio.set_backend_title(image_project.id, backend["id"], "stub-v3")
    assert studio.get_project(image_project.id)["model_version"] == "stub-v3"

    # None: every backend of the project. Also repairs a project version changed by hand
    # (Label Studio accepts only "", a backend title or a stored predictions' version there,
    # and a title change moves the project's version only if it still equalled the old title).
    label_studio.client.projects.update(id=image_project.id, model_version="")
    assert studio.get_project(image_project.id)["model_version"] == ""
    studio.set_backend_title(image_project.id, None, "stub-v3")
    assert studio.get_project(image_project.id)["model_version"] == "stub-v3"
    assert [b["title"] for b in studio.list_backends(image_project.id)] == ["stub-v3"]

    with pytest.raises(StudioError, match="no ML backend"):
        studio.set_backend_title(image_project.id, "http://127.0.0.1:1", "x")


def test_retrieve_predictions_calls_the_backend(
    label_studio: LabelStudioServer, image_project: ImageProject, stub_backend: StubBackend
) -> None:
    connect_backend(
        label_studio, image_project.id, stub_backend.url, title=stub_backend.model_version
    )
    some = image_project.task_ids[:2]
    answer = retrieve_predictions(label_studio, image_project.id, some)
    assert answer.get("processed_items") == 2, answer
    assert ("POST", "/predict") in stub_backend.calls
    predictions = task_predictions(label_studio, image_project.id)
    for task_id in image_project.task_ids:
        stored = predictions[task_id]
        if task_id in some:
            assert len(stored) == 1
            assert stored[0]["model_version"] == stub_backend.model_version
            assert stored[0]["score"] == pytest.approx(0.5)
            assert stored[0]["result"][0]["value"]["rectanglelabels"] == [stub_backend.label]
        else:
            assert stored == []

    # All tasks; those already predicted by this version are skipped by Label Studio.
    answer = retrieve_predictions(label_studio, image_project.id)
    predictions = task_predictions(label_studio, image_project.id)
    assert all(len(p) == 1 for p in predictions.values()), predictions


def test_annotation_webhook_reaches_the_backend(
    label_studio: LabelStudioServer, image_project: ImageProject, stub_backend: StubBackend
) -> None:
    connect_backend(label_studio, image_project.id, stub_backend.url, title="stub-v1")
    task_id = image_project.task_ids[0]
    created = submit_annotation(label_studio, task_id, ground_truth_result(image_project, task_id))
    actions = [w.get("action") for w in stub_backend.webhooks]
    assert "ANNOTATION_CREATED" in actions, actions
    hook = next(w for w in stub_backend.webhooks if w.get("action") == "ANNOTATION_CREATED")
    assert hook["annotation"]["id"] == created["id"]
    assert hook["annotation"]["task"] == task_id
    assert hook["project"]["id"] == image_project.id


def test_start_training_arrives_as_a_webhook(
    label_studio: LabelStudioServer, image_project: ImageProject, stub_backend: StubBackend
) -> None:
    backend = connect_backend(label_studio, image_project.id, stub_backend.url, title="stub-v1")
    start_training(label_studio, backend["id"])
    hooks = [w for w in stub_backend.webhooks if w.get("action") == "START_TRAINING"]
    assert len(hooks) == 1, [w.get("action") for w in stub_backend.webhooks]
    assert hooks[0]["project"]["id"] == image_project.id


def test_a_task_deleted_between_pages_shifts_no_other_out_of_the_listing(
    label_studio: LabelStudioServer,
) -> None:
    """Listed by page numbers (as ``list_annotations`` listed them), a task deleted after page 1
    moved every later task up a place: the first of page 2 was never listed, and a reconcile
    tombstoned its annotations. The id cursor lists every task that is still there."""
    project = create_image_project(label_studio, 6)
    client = StudioClient(label_studio.url, label_studio.token, page_size=2)
    listing = client._iter_by_id(project.id, {"fields": "all"})
    first_page = [next(listing)["id"], next(listing)["id"]]
    label_studio.client.tasks.delete(str(first_page[0]))
    rest = [task for task in listing]
    assert first_page + [t["id"] for t in rest] == sorted(t["id"] for t in project.tasks)
    assert all("annotations" in task for task in rest)  # what list_annotations reads


def _client_through(ls: LabelStudioServer, http: httpx.Client, page_size: int) -> StudioClient:
    """A client whose requests, the SDK's and its own listings alike, go through ``http``."""
    client = StudioClient(ls.url, ls.token, page_size=page_size)
    client.sdk = LabelStudio(base_url=ls.url, api_key=ls.token, timeout=120, httpx_client=http)
    return client


def test_a_task_deleted_while_tasks_are_listed_shifts_no_other_out(
    label_studio: LabelStudioServer,
) -> None:
    """``list_tasks`` (a task sync, a reconcile's task upsert) and ``iter_tasks`` paged by page
    numbers: a task deleted after page 1 moved the first of page 2 onto page 1, and it was never
    listed. Each listing here deletes the first task right after its first page is served."""
    project = create_image_project(label_studio, 6)
    ids = sorted(project.task_ids)
    victims: list[int] = []

    def delete_after_first_page(response: httpx.Response) -> None:
        if response.request.url.path == "/api/tasks/" and victims:
            label_studio.client.tasks.delete(str(victims.pop()))

    http = httpx.Client(event_hooks={"response": [delete_after_first_page]})
    client = _client_through(label_studio, http, page_size=2)

    victims.append(ids[0])
    tasks = client.list_tasks(project.id)
    assert [t["id"] for t in tasks] == ids  # the deleted task was on the page already read
    assert tasks[2] == next(t for t in project.tasks if t["id"] == ids[2])

    victims.append(ids[1])
    listed = list(client.iter_tasks(project.id, with_annotations=True))
    assert [t["id"] for t in listed] == ids[1:]
    assert all("annotations" in t and "predictions" in t for t in listed)
    assert not victims
    assert [t["id"] for t in label_studio.studio.list_tasks(project.id)] == ids[2:]


class _FailingProxy(httpx.BaseTransport):
    """Forwards to Label Studio, but answers 502 to prediction imports while ``plan`` says so:
    ``True`` after forwarding the import (Label Studio stored it), ``False`` without."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.plan: list[bool] = []
        self.imports = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and "/import/predictions" in request.url.path:
            self.imports += 1
            if self.plan:
                if self.plan.pop(0):
                    stored = self.inner.handle_request(request)
                    stored.read()
                    stored.close()
                return httpx.Response(502, text="<html>502 Bad Gateway</html>", request=request)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()


def test_predictions_are_imported_once_through_a_failing_proxy(
    label_studio: LabelStudioServer,
) -> None:
    """The SDK sent a prediction import again after a proxy's 502, though Label Studio had
    stored it: the tasks had that version's prediction twice."""
    project = create_image_project(label_studio, 4)
    ids = sorted(project.task_ids)
    proxy = _FailingProxy()
    client = _client_through(label_studio, httpx.Client(transport=proxy), page_size=2)

    proxy.plan = [True]  # stored, then a 502
    assert client.import_predictions(project.id, "proxy-v1", [(t, [], 0.5) for t in ids[:2]]) == []
    stored = task_predictions(label_studio, project.id)
    assert [len(stored[t]) for t in ids] == [1, 1, 0, 0], stored
    assert proxy.imports == 1  # the versions were listed instead of sending it again
    proxy.plan = [False, False]  # refused twice before Label Studio saw it
    assert client.import_predictions(project.id, "proxy-v1", [(t, [], 0.5) for t in ids[2:]]) == []
    assert proxy.imports == 4

    # A task deleted since the listing: left out, the others imported once.
    label_studio.client.tasks.delete(str(ids[0]))
    assert client.import_predictions(project.id, "proxy-v2", [(t, [], 0.7) for t in ids]) == [
        ids[0]
    ]

    stored = task_predictions(label_studio, project.id)
    assert sorted(stored) == ids[1:]
    for task_id, predictions in stored.items():
        versions = sorted(str(p["model_version"]) for p in predictions)
        assert versions == ["proxy-v1", "proxy-v2"], (task_id, predictions)


def test_the_queue_imports_predictions_once_through_a_failing_proxy(
    label_studio: LabelStudioServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue push imported through the SDK, which sent an import again after a proxy's 502
    though Label Studio had stored it: under Uncertainty sampling the tasks held their rank
    prediction twice (``set_rank_scores``, handed the bare SDK by ``push_order``), or a new
    version's boxes twice (``push_version_predictions``, after a retrain)."""
    from backend.labelstudio import queue

    project = create_image_project(label_studio, 4)
    ids = sorted(project.task_ids)
    # an earlier version's prediction does not keep a task from getting the rank score's
    label_studio.studio.import_predictions(project.id, "proxy-v1", [(ids[1], [], 0.3)])
    proxy = _FailingProxy()
    http = httpx.Client(transport=proxy)
    sdk = LabelStudio(
        base_url=label_studio.url, api_key=label_studio.token, timeout=120, httpx_client=http
    )
    ranks = {t: 1024 * (i + 1) for i, t in enumerate(ids)}

    monkeypatch.setattr(queue, "_IMPORT_CHUNK", 3)  # two chunks: the first stored, then a 502
    proxy.plan = [True]
    assert queue.set_rank_scores(sdk, project.id, ranks, model_version="boxloop-order") == (0, 4)
    stored = task_predictions(label_studio, project.id)
    order = {t: [p for p in stored[t] if p["model_version"] == "boxloop-order"] for t in ids}
    assert [len(order[t]) for t in ids] == [1, 1, 1, 1], order
    assert all(order[t][0]["score"] == queue.rank_score(ranks[t]) for t in ids)
    assert proxy.imports == 2  # one a chunk: the versions were listed instead

    # A new version's boxes: refused before Label Studio saw them, then stored and a 502.
    client = _client_through(label_studio, http, page_size=2)
    results = {t: ground_truth_result(project, t) for t in ids[:3]}
    proxy.plan = [False, True]
    assert queue.push_version_predictions(client, project.id, results, ranks, "proxy-v2") == (0, 3)
    assert proxy.imports == 4

    stored = task_predictions(label_studio, project.id)
    versions = {t: sorted(str(p["model_version"]) for p in stored[t]) for t in ids}
    assert versions == {
        ids[0]: ["boxloop-order", "proxy-v2"],
        ids[1]: ["boxloop-order", "proxy-v1", "proxy-v2"],
        ids[2]: ["boxloop-order", "proxy-v2"],
        ids[3]: ["boxloop-order"],
    }
    for t in ids[:3]:
        new = next(p for p in stored[t] if p["model_version"] == "proxy-v2")
        assert len(new["result"]) == len(results[t]) and new["score"] == queue.rank_score(ranks[t])
