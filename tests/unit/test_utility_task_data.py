"""Where utility scores go: merged into each task's current data, in boxloop's store and in
Label Studio, on the ``/predict`` path and when ``move_to_end`` scores a pool for an order.

Label Studio is the in-memory one of test_labelstudio_client.py (the SDK's and the client's
requests over an ``httpx.MockTransport``), with task PATCHes added; the scorer is a stand-in
whose score is an image's mean grey level, so no predictor is exported.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from backend.images import ImageSource
from backend.labelstudio.queue import format_rank, write_ranks
from backend.queueing import OrderRequest, QueueManager
from backend.settings import Settings
from backend.store import Store
from backend.task_utility import TaskUtility
from backend.utility.policy import UtilityPolicy
from backend.utility.scorer import UtilityScorer, stored_scores

CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="square"/></RectangleLabels></View>'
)
FIELD = "boxloop_utility"


class Scorer(UtilityScorer):
    """The served scorer without a predictor: an image's mean grey level / 255."""

    def __init__(self, policy: UtilityPolicy) -> None:
        self.policy = policy
        self.scored = 0

    def score(self, images: Any) -> list[float]:
        self.scored += len(images)
        return [float(np.asarray(im.convert("L")).mean()) / 255.0 for im in images]


class Now:
    """The background executor, run at once."""

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        done: Future[Any] = Future()
        done.set_result(fn(*args))
        return done


@pytest.fixture
def studio(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The in-memory Label Studio, answering task PATCHes as Label Studio does: the data given
    replaces the task's data."""
    from backend.labelstudio import client as studio_client
    from tests.unit.test_labelstudio_client import FakeStudio

    class Studio(FakeStudio):
        patches = 0

        gets = 0

        def __call__(self, request: httpx.Request) -> httpx.Response:
            found = re.fullmatch(r"/api/tasks/(\d+)/?", request.url.path)
            self.gets += int(bool(found) and request.method == "GET")
            if found and request.method == "PATCH":
                task_id = int(found.group(1))
                if task_id not in self.tasks:
                    return httpx.Response(404, json={"detail": "Not found."})
                self.patches += 1
                self.tasks[task_id] = dict(json.loads(request.content)["data"])
                return httpx.Response(200, json={"id": task_id, "data": self.tasks[task_id]})
            return super().__call__(request)

    monkeypatch.setattr(studio_client, "_RETRY_WAITS_S", (0.0, 0.0))
    return Studio(0)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    store.upsert_project(
        1,
        label_config=CONFIG,
        from_name="label",
        to_name="image",
        image_key="image",
        labels=["square"],
    )
    return store


def test_a_predict_score_is_merged_into_the_current_data_not_the_requests_copy(
    studio: Any, store: Store
) -> None:
    """The ``/predict`` request carried task 1 at rank 1024; an order then pushed 5120. The
    background utility write PATCHed the request's copy back: Label Studio and the store were
    at 1024 again, the order silently undone."""
    from tests.unit.test_labelstudio_client import studio_for

    client = studio_for(studio)
    old = {"image": "/data/1.jpg", "boxloop_rank": format_rank(1024)}
    studio.tasks = {1: dict(old), 2: {"image": "/data/2.jpg"}}
    store.upsert_tasks(1, [(1, dict(old)), (2, {"image": "/data/2.jpg"})])
    request = [{"id": 1, "data": dict(old)}, {"id": 2, "data": {"image": "/data/2.jpg"}}]

    assert write_ranks(client, 1, {1: 5120}) == 1  # the order's push, after the request came
    store.upsert_tasks(1, [(1, dict(studio.tasks[1]))])  # and its sync
    del studio.tasks[2]  # task 2 deleted in Label Studio meanwhile: skipped, not an error
    grey = Image.new("RGB", (8, 8), (128, 128, 128))
    utility = TaskUtility(Scorer(UtilityPolicy("flag")), store, lambda p: client, Now())
    metas = utility.score(1, request, [1, 2], [(0, grey), (1, grey)])

    score = round(128 / 255, 4)
    assert metas[0] == {"utility": score, "low_utility": False}
    want = {"image": "/data/1.jpg", "boxloop_rank": format_rank(5120), FIELD: score}
    assert studio.tasks == {1: want}
    assert store.get_task_data(1, 1) == want
    assert store.get_task_data(1, 2) == {"image": "/data/2.jpg", FIELD: score}
    patches = studio.patches
    request[0]["data"] = {"image": "/data/1.jpg"}  # a request without the score: checked, kept
    utility.score(1, request[:1], [1], [(0, grey)])
    assert studio.patches == patches and studio.tasks == {1: want}


@pytest.mark.parametrize("list_above", [50, 0], ids=["a-get-each", "one-listing"])
def test_scores_made_for_an_order_survive_the_next_sync(
    studio: Any, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, list_above: int
) -> None:
    """``move_to_end`` scored the pool while making an order and stored the scores in boxloop's
    store only; the next sync from Label Studio (every order, the start-up reconcile) replaced
    the task data, so the scores were gone and every order scored the whole pool again. Many
    tasks are read in one listing, a few one by one: the same data is written either way."""
    from backend.labelstudio import queue as studio_queue
    from tests.unit.test_labelstudio_client import studio_for

    monkeypatch.setattr(studio_queue, "LIST_TASKS_ABOVE", list_above)

    images = tmp_path / "images"
    images.mkdir()
    for t in range(1, 7):
        Image.new("RGB", (16, 12), (40 * t,) * 3).save(images / f"{t}.png")
    studio.tasks = {t: {"image": str(images / f"{t}.png")} for t in range(1, 7)}
    studio.versions = {t: [] for t in studio.tasks}
    client = studio_for(studio)
    scorer = Scorer(UtilityPolicy("move_to_end", threshold=0.5))
    settings = Settings(data_dir=tmp_path / "data", allowed_local_roots=[images], num_threads=1)
    queue = QueueManager(
        settings,
        store,
        lambda p: client,
        lambda p: ImageSource(None, None, allowed_local_roots=(images,)),
        scorer,
    )

    plan = queue.order(1, OrderRequest(strategy="random", push=False))
    assert scorer.scored == 6
    assert studio.gets == (6 if list_above else 0)  # one GET a task, or the listing alone
    low = [t for t in range(1, 7) if 40 * t / 255 < 0.5]
    assert plan.task_ids[-len(low) :] == [t for t in plan.task_ids if t in low]
    queue.sync_tasks(1)  # what every order and the start-up reconcile do
    scores = stored_scores(store.list_tasks(1), FIELD)
    assert scores == {t: round(40 * t / 255, 4) for t in range(1, 7)}
    assert stored_scores(studio.tasks.items(), FIELD) == scores
    queue.order(1, OrderRequest(strategy="random", push=False))
    assert scorer.scored == 6  # nothing scored again
