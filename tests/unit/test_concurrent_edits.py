"""Writes that overlap: a webhook landing while a reconcile lists Label Studio's annotations, a
label config edit while a training job gathers, and box-query answers that arrive late or empty.

Each test sets one interleaving up deterministically (the concurrent write is made from inside
the call it overlaps), on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend.box_queries import BoxQueryManager
from backend.ingest import ingest_annotation, save_label_config
from backend.labelstudio.convert import parse_label_config
from backend.reconcile import reconcile_project
from backend.settings import Settings
from backend.store import Store
from backend.training_job import _gather_consistent
from tests.synthetic import LABEL_CONFIG, ls_result, write_dataset

CONFIG = parse_label_config(LABEL_CONFIG)
REORDERED = LABEL_CONFIG.replace(
    '<Label value="Square"/><Label value="Disc"/>', '<Label value="Disc"/><Label value="Square"/>'
)


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    store = Store(store_url)
    save_label_config(store, 1, LABEL_CONFIG, CONFIG, None)
    yield store
    store.close()


def _annotation(annotation_id: int, task_id: int, label: str, box: tuple[int, ...]) -> dict:
    return {"id": annotation_id, "task": task_id, "result": ls_result([(label, box)])}


class _StudioAnsweringBeforeAWebhook:
    """Label Studio's API as a reconcile sees it, with webhooks stored while its answer is in
    flight (after Label Studio read its database, before boxloop reads the answer)."""

    def __init__(self, store: Store, answer: list[dict], webhooks: list[dict]) -> None:
        self.store, self.answer, self.webhooks = store, answer, webhooks

    def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
        return [{"id": t, "data": {"image": f"{t}.jpg"}} for t in (1, 2)]

    def list_annotations(self, project_id: int) -> list[dict[str, Any]]:
        for payload in self.webhooks:
            ingest_annotation(self.store, project_id, CONFIG, payload)
        return self.answer


def test_a_reconcile_keeps_what_webhooks_stored_while_it_listed(store: Store) -> None:
    """Before, the annotation a webhook stored during the listing was tombstoned (missing from
    the answer), and an update was overwritten by the answer's older content."""
    first = _annotation(10, 1, "Square", (0, 0, 50, 50))
    ingest_annotation(store, 1, CONFIG, first)
    store.set_trained_revision(1, store.annotation_revision(1))
    updated = _annotation(10, 1, "Disc", (0, 0, 50, 50))  # the annotator changed the label
    fresh = _annotation(11, 2, "Disc", (5, 5, 60, 60))
    studio = _StudioAnsweringBeforeAWebhook(store, [first], [updated, fresh])
    report = reconcile_project(store, studio, 1, CONFIG)  # type: ignore[arg-type]
    by_id = {a.annotation_id: a for a in store.list_annotations(1, include_deleted=True)}
    assert report.tombstoned == 0 and not by_id[11].deleted
    assert by_id[10].result == updated["result"]
    project = store.get_project(1)
    assert project is not None
    assert store.count_annotations_since(1, project.trained_revision) == 2


def test_a_reconcile_still_tombstones_what_label_studio_no_longer_has(store: Store) -> None:
    ingest_annotation(store, 1, CONFIG, _annotation(10, 1, "Square", (0, 0, 50, 50)))
    studio = _StudioAnsweringBeforeAWebhook(store, [], [])
    assert reconcile_project(store, studio, 1, CONFIG).tombstoned == 1  # type: ignore[arg-type]
    assert store.list_annotations(1) == []


def test_a_label_edit_while_a_job_gathers_is_gathered_under_the_new_labels(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the job read the config, then the boxes (re-read under an edited config by a
    /setup in between): Squares trained as Discs, under the old label list."""
    data = write_dataset(tmp_path / "images", 3)
    store.upsert_tasks(1, [(i + 1, {"image": str(p)}) for i, (p, _) in enumerate(data)])
    for i, (_, objects) in enumerate(data):
        ingest_annotation(
            store, 1, CONFIG, {"id": 100 + i, "task": i + 1, "result": ls_result(objects)}
        )
    settings = Settings(data_dir=tmp_path / "data", allowed_local_roots=[tmp_path / "images"])
    read_revision = store.annotation_revision
    edits = [REORDERED]

    def revision_while_an_admin_edits(project_id: int) -> int:
        if edits:  # the first gathering: the /setup lands after the job read the config
            edited = edits.pop()
            save_label_config(store, 1, edited, parse_label_config(edited), None)
        return read_revision(project_id)

    monkeypatch.setattr(store, "annotation_revision", revision_while_an_admin_edits)
    _, config, _, gathered = _gather_consistent(settings, store, 1)
    assert config.labels == ("Disc", "Square")
    for (_, objects), sample in zip(data, gathered.samples, strict=True):
        trained = sorted(config.labels[int(label)] for label in sample.boxes.labels)
        assert trained == sorted(name for name, _ in objects)


def _query(n: int, task: int) -> dict[str, Any]:
    return {"n": n, "row": n, "task": task, "xyxy": [10, 10, 60, 60], "label": 0}


def _manager(store: Store) -> BoxQueryManager:
    return BoxQueryManager(None, store, None, lambda p: None, None, lambda p: None)  # type: ignore[arg-type]


def _kinds(store: Store) -> list[list[str | None]]:
    return [[q["kind"] for q in queries] for _, _, queries in store.list_box_episodes(1)]


def test_an_empty_answer_resolves_its_queries_as_background(store: Store) -> None:
    """Deleting every box shown is an answer (each query a false positive); it left them open."""
    params = {"labels": ["Square", "Disc"], "unqueried": []}
    store.add_box_episode(1, params, [{**_query(1, 1), "kind": None}])
    ingest_annotation(store, 1, CONFIG, {"id": 11, "task": 1, "result": []})
    counts = _manager(store).record_answer(1, 1)
    assert counts is not None and counts["background"] == 1
    assert _kinds(store) == [["background"]]


def test_one_answer_resolves_every_episode_that_asked_the_task(store: Store) -> None:
    """A task still unlabelled in a later episode is asked again; its answer left the earlier
    episode's query open."""
    params = {"labels": ["Square", "Disc"], "unqueried": []}
    for _ in range(2):
        store.add_box_episode(1, params, [{**_query(1, 1), "kind": None}])
    ingest_annotation(store, 1, CONFIG, _annotation(11, 1, "Square", (10, 10, 60, 60)))
    counts = _manager(store).record_answer(1, 1)
    assert counts is not None and counts["confirmed"] == 2 and counts["episode"] == 2
    assert _kinds(store) == [["confirmed"], ["confirmed"]]


def test_an_answer_drawn_on_a_resized_copy_is_matched_in_the_queries_frame(store: Store) -> None:
    """Label Studio measures an answer on the image it shows: on a copy twice the size of the
    one the model queried, the right box (IoU 1 once scaled) was matched as is (IoU 0.25), and the
    query counted as background. Not a concurrent edit: the other answer tests' helpers are here.
    """
    params = {"labels": ["Square", "Disc"], "unqueried": []}
    store.add_box_episode(1, params, [{**_query(1, 1), "size": [320, 240], "kind": None}])
    shown_twice_as_big = ls_result([("Square", (20, 20, 120, 120))], size=(640, 480))
    ingest_annotation(store, 1, CONFIG, {"id": 11, "task": 1, "result": shown_twice_as_big})
    counts = _manager(store).record_answer(1, 1)
    assert counts is not None and counts["confirmed"] == 1 and counts["background"] == 0
    assert _kinds(store) == [["confirmed"]]


def test_a_reconcile_forgets_tasks_deleted_in_label_studio_not_ones_created_meanwhile(
    store: Store,
) -> None:
    """Tasks deleted in Label Studio stayed in the store for good: in orders, and in search
    results by their vectors. A task a TASKS_CREATED webhook records while the listing is in
    flight is missing from the answer too, and stays."""
    store.upsert_tasks(1, [(t, {"image": f"{t}.jpg"}) for t in (1, 2, 3)])
    store.put_features(1, "search", [(t, np.ones(4, np.float32)) for t in (1, 2, 3)])

    class Studio(_StudioAnsweringBeforeAWebhook):
        def list_tasks(self, project_id: int) -> list[dict[str, Any]]:
            store.upsert_tasks(1, [(4, {"image": "4.jpg"})])  # the webhook, mid-listing
            return super().list_tasks(project_id)  # tasks 1 and 2: 3 was deleted

    report = reconcile_project(store, Studio(store, [], []), 1, CONFIG)  # type: ignore[arg-type]
    assert report.removed_tasks == 1
    assert sorted(t for t, _ in store.list_tasks(1)) == [1, 2, 4]
    assert store.get_features(1, "search")[0] == [1, 2]


def test_an_updated_answer_resolves_its_queries_again(store: Store) -> None:
    """The queries kept the first answer's kinds: an empty first submission made the query
    background, and the update that kept the box (the annotation training takes) changed nothing.
    """
    params = {"labels": ["Square", "Disc"], "unqueried": []}
    store.add_box_episode(1, params, [{**_query(1, 1), "size": [320, 240], "kind": None}])
    ingest_annotation(store, 1, CONFIG, {"id": 11, "task": 1, "result": []})
    _manager(store).record_answer(1, 1)
    assert _kinds(store) == [["background"]]
    ingest_annotation(store, 1, CONFIG, _annotation(11, 1, "Square", (10, 10, 60, 60)))
    counts = _manager(store).record_answer(1, 1)
    assert counts is not None and counts["confirmed"] == 1
    assert _kinds(store) == [["confirmed"]]
