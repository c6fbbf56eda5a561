"""Pure parts of the Label Studio queue push (the calls themselves run in the e2e tests)."""

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
