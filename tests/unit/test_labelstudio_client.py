"""``StudioClient`` task listings and prediction imports against an in-memory Label Studio.

The fake answers on an ``httpx.MockTransport`` given to the SDK, so the client's own requests
and the SDK's go through it alike. It implements just enough of Label Studio 1.23: the task list
by page number (as the SDK pages it, a 404 past the end) and by the Data Manager's id filters,
a task by id, and the predictions import, with failures injected where the tests say. The real
server's answers to the same calls are checked in ``tests/e2e/test_studio_client.py``.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from label_studio_sdk import LabelStudio

from backend.labelstudio import client as studio_client
from backend.labelstudio.client import StudioClient

URL = "http://label-studio.test"
_OPERATORS: dict[str, Callable[[int, int], bool]] = {
    "greater": operator.gt,
    "less_or_equal": operator.le,
}


class FakeStudio:
    """One project's tasks and their predictions' model versions."""

    def __init__(self, n_tasks: int, *, max_page_size: int | None = None) -> None:
        self.tasks: dict[int, dict[str, Any]] = {
            i: {"image": f"/data/{i}.jpg"} for i in range(1, n_tasks + 1)
        }
        self.versions: dict[int, list[str]] = {i: [] for i in self.tasks}
        self.max_page_size = max_page_size  # TASK_API_PAGE_SIZE_MAX
        self.after_page: Callable[[], None] | None = None  # runs once, after a task page is read
        #: How the next import requests fail: "stored-502" (stored, then a proxy's 502),
        #: "stored-timeout" (stored, the answer never arrives), "502" (nothing stored),
        #: "partial-400" (the last task deleted meanwhile, the others stored: Label Studio's
        #: batched import behind a feature flag stores the batches before the refused one).
        self.import_failures: list[str] = []
        self.import_requests = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/tasks/" and request.method == "GET":
            return self._list(request)
        if re.fullmatch(r"/api/projects/\d+/import/predictions/?", path):
            return self._import(request)
        found = re.fullmatch(r"/api/tasks/(\d+)/?", path)
        if found and request.method == "GET":
            task_id = int(found.group(1))
            if task_id in self.tasks:
                return httpx.Response(200, json={"id": task_id, "data": self.tasks[task_id]})
        return httpx.Response(404, json={"detail": "Not found."})

    def _list(self, request: httpx.Request) -> httpx.Response:
        params = request.url.params
        size = int(params.get("page_size", 100))
        if self.max_page_size is not None:
            size = min(size, self.max_page_size)
        ids = sorted(self.tasks)
        if "query" in params:
            for item in json.loads(params["query"])["filters"]["items"]:
                assert item["filter"] == "filter:tasks:id", item
                compare = _OPERATORS[item["operator"]]
                ids = [i for i in ids if compare(i, item["value"])]
        page = int(params.get("page", 1))
        chunk = ids[(page - 1) * size : page * size]
        if page > 1 and not chunk:
            return httpx.Response(404, json={"detail": "Invalid page."})
        tasks = [self._task(i, params.get("fields") == "all") for i in chunk]
        if self.after_page is not None:
            hook, self.after_page = self.after_page, None
            hook()
        return httpx.Response(200, json={"tasks": tasks, "total": len(ids)})

    def _task(self, task_id: int, all_fields: bool) -> dict[str, Any]:
        task: dict[str, Any] = {"id": task_id, "data": dict(self.tasks[task_id])}
        if all_fields:
            task["annotations"] = []
            task["predictions"] = [{"model_version": v} for v in self.versions[task_id]]
            task["predictions_model_versions"] = ",".join(self.versions[task_id])
        return task

    def _import(self, request: httpx.Request) -> httpx.Response:
        self.import_requests += 1
        items = json.loads(request.content)
        failure = self.import_failures.pop(0) if self.import_failures else None
        if failure == "502":
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        if failure == "partial-400":  # the last task deleted meanwhile, the others stored
            for item in items[:-1]:
                self.versions[item["task"]].append(item["model_version"])
            del self.tasks[items[-1]["task"]]
            return self._import_refused(items[-1])
        for item in items:  # every task is checked before any prediction is stored
            if item["task"] not in self.tasks:
                return self._import_refused(item)
        for item in items:
            self.versions[item["task"]].append(item["model_version"])
        if failure == "stored-502":
            return httpx.Response(502, text="<html>Bad Gateway</html>")
        if failure == "stored-timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(201, json={"created": len(items)})

    @staticmethod
    def _import_refused(item: dict[str, Any]) -> httpx.Response:
        message = f'{item} contains invalid "task" field'
        return httpx.Response(400, json={"validation_errors": {"non_field_errors": [message]}})


def studio_for(fake: FakeStudio, *, page_size: int = 2) -> StudioClient:
    client = StudioClient(URL, "legacy-token", page_size=page_size)
    client.sdk = LabelStudio(
        base_url=URL,
        api_key="legacy-token",
        timeout=5,
        httpx_client=httpx.Client(transport=httpx.MockTransport(fake)),
    )
    return client


@pytest.fixture(autouse=True)
def _no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studio_client, "_RETRY_WAITS_S", (0.0, 0.0))


@pytest.mark.parametrize("listing", ["list_tasks", "iter_tasks", "iter_tasks_with_annotations"])
def test_a_task_deleted_while_tasks_are_listed_shifts_no_other_out(listing: str) -> None:
    """By page numbers, a task deleted after page 1 moved every later task up a place and the
    first of page 2 was never listed: a task sync or reconcile missed it."""
    fake = FakeStudio(6)
    client = studio_for(fake, page_size=2)
    fake.after_page = lambda: fake.tasks.pop(1)
    if listing == "list_tasks":
        tasks = client.list_tasks(1)
        assert all(set(t) == {"id", "data"} for t in tasks)
    else:
        annotations = listing == "iter_tasks_with_annotations"
        tasks = list(client.iter_tasks(1, with_annotations=annotations))
        assert all(("predictions" in t) == annotations for t in tasks)
    assert [t["id"] for t in tasks] == [1, 2, 3, 4, 5, 6]  # 1 was on the page already read
    assert tasks[2]["data"] == {"image": "/data/3.jpg"}


def test_a_page_cut_by_the_server_is_not_the_end_of_the_listing() -> None:
    """Label Studio caps the page size at TASK_API_PAGE_SIZE_MAX when it is set: a page shorter
    than asked ended the listing, and every task after it was left out."""
    fake = FakeStudio(7, max_page_size=2)
    client = studio_for(fake, page_size=5)
    assert [t["id"] for t in client.list_tasks(1)] == list(range(1, 8))
    assert [t["id"] for t in client.iter_task_versions(1)] == list(range(1, 8))
    assert len(client.list_annotations(1)) == 0


@pytest.mark.parametrize("failure", ["stored-502", "stored-timeout"])
def test_predictions_stored_before_a_failed_answer_are_not_imported_again(failure: str) -> None:
    """The SDK sent the import again after a proxy's 5xx that came after Label Studio had
    stored it: every task got the version's prediction twice."""
    fake = FakeStudio(4)
    fake.versions[4] = ["old"]
    client = studio_for(fake)
    fake.import_failures = [failure]
    gone = client.import_predictions(1, "v2", [(t, [], 0.5) for t in (1, 2, 3, 4)])
    assert gone == []
    assert fake.versions == {1: ["v2"], 2: ["v2"], 3: ["v2"], 4: ["old", "v2"]}
    assert fake.import_requests == 1


def test_an_import_that_was_not_stored_is_sent_again() -> None:
    fake = FakeStudio(3)
    client = studio_for(fake)
    fake.import_failures = ["502", "502"]
    assert client.import_predictions(1, "v2", [(t, [], 0.5) for t in (1, 3)]) == []
    assert fake.versions == {1: ["v2"], 2: [], 3: ["v2"]}
    assert fake.import_requests == 3

    fake.import_failures = ["502", "502", "502"]  # three tries, then the error stands
    with pytest.raises(Exception, match="502"):
        client.import_predictions(1, "v3", [(2, [], 0.5)])
    assert fake.versions[2] == [] and fake.import_requests == 6


def test_a_deleted_task_is_left_out_and_the_others_are_imported_once() -> None:
    fake = FakeStudio(4)
    client = studio_for(fake)
    del fake.tasks[2]
    assert client.import_predictions(1, "v2", [(t, [], 0.5) for t in (1, 2, 3, 4)]) == [2]
    assert fake.versions == {1: ["v2"], 2: [], 3: ["v2"], 4: ["v2"]}

    # Refused after part of it was stored (Label Studio's batched import, behind a flag): the
    # stored part is not sent again.
    fake.import_failures = ["partial-400"]
    assert client.import_predictions(1, "v3", [(t, [], 0.5) for t in (1, 3, 4)]) == [4]
    assert fake.versions == {1: ["v2", "v3"], 2: [], 3: ["v2", "v3"], 4: ["v2"]}
    assert fake.import_requests == 3  # nothing left to send after the refusal
