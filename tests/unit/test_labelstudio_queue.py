"""Pure parts of the Label Studio queue push, and its prediction imports against the in-memory
Label Studio of test_labelstudio_client.py (the calls themselves run in the e2e tests)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from backend.labelstudio.queue import (
    RANK_WIDTH,
    format_rank,
    order_view_data,
    plan_score_updates,
    rank_score,
    rank_updates,
)
from backend.ordering import ranks_for


def test_format_rank_sorts_as_strings_like_numbers() -> None:
    ranks = [1024, 99_000, 100_000, 7, 123_456_789]
    as_text = [format_rank(r) for r in ranks]
    assert all(len(t) == RANK_WIDTH for t in as_text)
    assert sorted(as_text) == [format_rank(r) for r in sorted(ranks)]
    assert format_rank(1024) == "000000001024"
    with pytest.raises(ValueError):
        format_rank(-1)
    with pytest.raises(ValueError):
        format_rank(10**RANK_WIDTH)


def test_rank_scores_are_monotone_and_within_unit_interval() -> None:
    ranks = sorted(ranks_for(range(100_000)).values())
    scores = [rank_score(r) for r in ranks]
    assert all(0.0 <= s <= 1.0 for s in scores)  # Label Studio's import rejects others
    assert all(b > a for a, b in itertools.pairwise(scores))


def test_view_payload_orders_by_the_numeric_rank_column() -> None:
    data = order_view_data("rank_x", "my tab")
    assert data["ordering"] == ["tasks:data.rank_x"]
    assert data["columnsDisplayType"] == {"tasks:data.rank_x": "Number"}
    assert data["title"] == "my tab"


def test_rank_updates_merge_data_and_skip_unchanged_or_deleted() -> None:
    current = {
        1: {"image": "a.jpg", "boxloop_rank": format_rank(1024)},
        2: {"image": "b.jpg", "meta": 5},
    }
    updates = rank_updates(current, {1: 1024, 2: 2048, 3: 3072})
    assert updates == [(2, {"image": "b.jpg", "meta": 5, "boxloop_rank": "000000002048"})]


def test_plan_score_updates_keeps_results_and_creates_missing() -> None:
    predictions = [
        {"id": 10, "task": 1, "model_version": "v2", "score": 0.9},  # gets the rank score
        {"id": 11, "task": 1, "model_version": "v1", "score": 0.1},  # other version: untouched
        {"id": 12, "task": 2, "model_version": "v2", "score": rank_score(2048)},  # already right
    ]
    updates, creations = plan_score_updates(predictions, {1: 1024, 2: 2048, 3: 3072}, "v2")
    assert updates == [(10, rank_score(1024))]
    assert creations == [(3, rank_score(3072))]


def test_prediction_versions_as_the_data_manager_lists_them() -> None:
    """PostgreSQL joins them with ", ": ' v2' never matched, and bulk predict imported v2 again;
    a list cut at 500 characters is unknown, not a list without the newest version."""
    from backend.labelstudio.client import model_versions

    assert model_versions("boxloop-p1-v1,boxloop-p1-v2") == ["boxloop-p1-v1", "boxloop-p1-v2"]
    assert model_versions("boxloop-p1-v1, boxloop-p1-v2") == ["boxloop-p1-v1", "boxloop-p1-v2"]
    assert model_versions(None) == [] and model_versions("") == []
    assert model_versions(", ".join(f"boxloop-p1-v{i}" for i in range(40))) is None


def test_a_task_listing_request_is_tried_again_after_a_transient_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One 5xx or dropped connection ended a bulk run of thousands of tasks."""
    import httpx

    from backend.labelstudio import client as studio_client

    monkeypatch.setattr(studio_client, "_RETRY_WAITS_S", (0.0, 0.0))
    answers: list[Any] = [httpx.ConnectError("reset"), httpx.Response(503), httpx.Response(200)]
    calls: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        step = answers.pop(0)
        if isinstance(step, Exception):
            raise step
        return step

    with httpx.Client(transport=httpx.MockTransport(answer)) as http:
        assert studio_client._get_retrying(http, "http://ls/api/tasks/").status_code == 200
        assert len(calls) == 3
        answers[:] = [httpx.Response(503)] * 3
        assert studio_client._get_retrying(http, "http://ls/api/tasks/").status_code == 503
        answers[:] = [httpx.Response(404)]
        assert studio_client._get_retrying(http, "http://ls/api/tasks/").status_code == 404
    assert len(calls) == 7  # a 4xx is an answer, not tried again


# ---------------------------------------------------------------- prediction imports, not twice
# The queue's imports against the in-memory Label Studio of test_labelstudio_client.py.


@pytest.fixture
def fake_studio(monkeypatch: pytest.MonkeyPatch) -> Any:
    from backend.labelstudio import client as studio_client
    from tests.unit.test_labelstudio_client import FakeStudio

    monkeypatch.setattr(studio_client, "_RETRY_WAITS_S", (0.0, 0.0))
    return FakeStudio(5)


@pytest.mark.parametrize("given", ["sdk", "StudioClient"])
@pytest.mark.parametrize("failure", ["stored-502", "stored-timeout"])
def test_rank_scores_stored_before_a_failed_answer_are_not_imported_again(
    fake_studio: Any, monkeypatch: pytest.MonkeyPatch, failure: str, given: str
) -> None:
    """set_rank_scores imported through the SDK, which sent a chunk again after a proxy's 5xx
    that came after Label Studio had stored it: each task of the chunk got two rank predictions.
    A task may hold another version's prediction: it is not left out for that."""
    from backend.labelstudio import queue
    from tests.unit.test_labelstudio_client import studio_for

    monkeypatch.setattr(queue, "_IMPORT_CHUNK", 3)
    fake_studio.versions[2] = ["boxloop-p1-v1"]
    client = studio_for(fake_studio)
    fake_studio.import_failures = [failure]  # the first chunk: stored, then the failure
    ranks = {t: 1024 * t for t in (1, 2, 3, 4, 5)}
    given_client = client.sdk if given == "sdk" else client
    created = queue.set_rank_scores(
        given_client, 1, ranks, model_version="boxloop-order", predictions=[]
    )
    assert created == (0, 5)
    assert fake_studio.versions == {
        1: ["boxloop-order"],
        2: ["boxloop-p1-v1", "boxloop-order"],
        3: ["boxloop-order"],
        4: ["boxloop-order"],
        5: ["boxloop-order"],
    }
    assert fake_studio.import_requests == 2  # one a chunk: the failed one was not sent again


def test_version_predictions_are_imported_once_and_deleted_tasks_left_out(
    fake_studio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """push_version_predictions: an import that was not stored is sent again, one that was is
    not, and a task deleted since the listing is left out (it refused the whole import)."""
    from backend.labelstudio import queue
    from tests.unit.test_labelstudio_client import studio_for

    client = studio_for(fake_studio)
    box = [{"type": "rectanglelabels", "value": {"x": 1.0}}]
    ranks = {t: 1024 * t for t in (1, 2, 3, 4, 5)}
    listed = [{"id": 7, "task": 1, "model_version": "v2", "score": 0.1}]
    updates: list[tuple[int, dict[str, Any]]] = []
    monkeypatch.setattr(
        client.sdk.predictions, "update", lambda pid, **kw: updates.append((pid, kw))
    )
    fake_studio.import_failures = ["502", "stored-502"]
    results = {1: box, 2: box, 3: []}
    pushed = queue.push_version_predictions(client, 1, results, ranks, "v2", predictions=listed)
    assert pushed == (1, 2)
    assert updates == [(7, {"result": box, "score": rank_score(1024)})]
    assert fake_studio.versions == {1: [], 2: ["v2"], 3: ["v2"], 4: [], 5: []}
    assert fake_studio.import_requests == 2

    del fake_studio.tasks[5]
    results = {4: box, 5: box}
    assert queue.push_version_predictions(client, 1, results, ranks, "v2", predictions=[]) == (0, 1)
    assert fake_studio.versions[4] == ["v2"]
