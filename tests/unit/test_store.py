from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from backend.boxes import Boxes
from backend.ingest import ingest_annotation, save_label_config
from backend.labelstudio.convert import LabelConfig
from backend.store import Store


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """Every test here runs on SQLite and on PostgreSQL (see ``store_url`` in conftest)."""
    store = Store(store_url)
    yield store
    store.close()


def _project(store: Store, pid: int = 1) -> None:
    store.upsert_project(
        pid,
        label_config="<View/>",
        from_name="label",
        to_name="image",
        image_key="image",
        labels=["a", "b"],
        hostname="http://ls",
    )


def test_project_roundtrip_and_update(store: Store) -> None:
    _project(store)
    store.upsert_project(
        1,
        label_config="<View/>",
        from_name="label",
        to_name="image",
        image_key="image",
        labels=["a", "b", "c"],
    )
    project = store.get_project(1)
    assert project is not None
    assert project.labels == ["a", "b", "c"]
    assert project.hostname == "http://ls"  # an update without hostname keeps the old one
    assert [p.id for p in store.list_projects()] == [1]


def test_annotation_revisions_count_new_work_once(store: Store) -> None:
    _project(store)
    boxes = Boxes(np.array([[1, 2, 30, 40]]), np.array([1]), (100, 80))
    rev1, changed1 = store.upsert_annotation(1, 10, 5, [{"r": 1}], boxes)
    rev_same, changed_same = store.upsert_annotation(
        1, 10, 5, [{"r": 1}], boxes, source="reconcile"
    )
    rev2, changed2 = store.upsert_annotation(1, 10, 5, [{"r": 2}], boxes)
    assert changed1 and not changed_same and changed2
    assert rev_same == rev1 and rev2 > rev1
    assert store.count_annotations_since(1, 0) == 1
    assert store.count_annotations_since(1, rev2) == 0
    stored = store.list_annotations(1)
    assert len(stored) == 1 and stored[0].result == [{"r": 2}]
    assert stored[0].boxes == boxes


def test_deleted_annotations_are_tombstones(store: Store) -> None:
    _project(store)
    store.upsert_annotation(1, 10, 5, [], None)
    store.upsert_annotation(1, 11, 6, [], None, parse_error="label 'x' unknown")
    assert store.delete_annotations(1, [10, 99]) == 1
    assert [a.annotation_id for a in store.list_annotations(1)] == [11]
    everything = store.list_annotations(1, include_deleted=True)
    assert {a.annotation_id: a.deleted for a in everything} == {10: True, 11: False}
    assert store.annotation_counts(1) == {"stored": 1, "deleted": 1, "unparsable": 1}
    # a re-created annotation comes back to life
    store.upsert_annotation(1, 10, 5, [], None)
    assert len(store.list_annotations(1)) == 2


def test_state_survives_reopening(store_url: str) -> None:
    url = store_url
    first = Store(url)
    _project(first)
    first.upsert_annotation(1, 10, 5, [{"r": 1}], None)
    job = first.create_job(1, "test")
    first.close()
    second = Store(url)
    assert len(second.list_annotations(1)) == 1
    record = second.get_job(job)
    assert record is not None and record.status == "queued"
    second.close()


def test_features_and_orders(store: Store) -> None:
    vectors = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    store.put_features(1, "imgnet-v1", [(30, vectors[2]), (10, vectors[0]), (20, vectors[1])])
    ids, matrix = store.get_features(1, "imgnet-v1")
    assert ids == [10, 20, 30]
    np.testing.assert_array_equal(matrix, vectors)
    store.put_features(1, "imgnet-v1", [(10, vectors[2])])  # recompute replaces
    ids, matrix = store.get_features(1, "imgnet-v1", task_ids=[10])
    np.testing.assert_array_equal(matrix[0], vectors[2])
    assert store.get_features(1, "other")[0] == []
    store.set_order(1, "dissimilar", {"seed": 0}, [30, 10, 20], view_id=4)
    order = store.get_order(1)
    assert order is not None and order.task_ids == [30, 10, 20] and order.view_id == 4


def test_concurrent_task_upserts_do_not_collide(store: Store) -> None:
    import threading

    errors: list[BaseException] = []
    new_counts: list[int] = []

    def write(offset: int) -> None:
        try:
            for _ in range(20):
                items = [(i, {"image": f"{offset}-{i}"}) for i in range(10)]
                new_counts.append(store.upsert_tasks(1, items))
        except BaseException as exc:  # pragma: no cover - the failure is what we look for
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [t for t, _ in store.list_tasks(1)] == list(range(10))
    assert sum(new_counts) == 10  # each task counted new once, whoever inserted it
    assert store.upsert_tasks(1, [(10, {})]) == 1


def test_text_with_nul_characters_is_stored(store: Store) -> None:
    """PostgreSQL text cannot hold NUL; a label with one (quoted in the parse error) must not
    make the webhook fail there. JSON keeps the character as it came."""
    _project(store)
    store.upsert_tasks(1, [(5, {"image": "a\x00b.png"})])
    result = [{"value": {"rectanglelabels": ["x\x00y"]}}]
    store.upsert_annotation(1, 10, 5, result, None, parse_error="label 'x\x00y' unknown")
    (stored,) = store.list_annotations(1)
    assert stored.parse_error == "label 'x\ufffdy' unknown"
    assert stored.result == result
    assert store.get_task_data(1, 5) == {"image": "a\x00b.png"}
    job = store.create_job(1, "test")
    store.update_job(job, status="failed", error="bad \x00 byte")
    record = store.get_job(job)
    assert record is not None and record.error == "bad \ufffd byte"


def test_reparsed_boxes_skip_rows_a_newer_write_replaced(store: Store) -> None:
    """``replace_parsed_boxes`` (a label config edit) keeps revisions, and leaves a row alone
    when a webhook stored a newer revision since it was read."""
    _project(store)
    old = Boxes(np.array([[1, 2, 30, 40]]), np.array([0]), (100, 80))
    new = old.relabeled({0: 1, 1: 0})
    rev_a, _ = store.upsert_annotation(1, 10, 5, [{"r": 1}], old)
    rev_b, _ = store.upsert_annotation(1, 11, 6, [{"r": 1}], old)
    rev_b2, _ = store.upsert_annotation(1, 11, 6, [{"r": 2}], old)  # read at rev_b, then replaced
    written = store.replace_parsed_boxes(1, {10: (rev_a, new, None), 11: (rev_b, None, "gone")})
    assert written == 1
    by_id = {a.annotation_id: a for a in store.list_annotations(1)}
    assert by_id[10].boxes == new and by_id[10].revision == rev_a
    assert by_id[11].boxes == old and by_id[11].parse_error is None
    assert by_id[11].revision == rev_b2
    assert store.count_annotations_since(1, rev_b2) == 0  # no new work for the trigger


def _region(label: str) -> dict[str, object]:
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 100,
        "original_height": 80,
        "value": {"x": 10, "y": 10, "width": 20, "height": 25, "rectanglelabels": [label]},
    }


def test_an_annotation_parsed_under_a_config_replaced_meanwhile_is_read_again(
    store: Store,
) -> None:
    """A webhook parses under the config it read; a /setup that stores another one (and re-reads
    the stored annotations) before the webhook's write must not leave it under the old labels."""
    _project(store)  # labels a, b
    stale = LabelConfig("label", "image", "image", ("a", "b"))
    edited = LabelConfig("label", "image", "image", ("b", "a"))
    save_label_config(store, 1, "<View/>", edited, None)  # the /setup wins the race
    ingest_annotation(store, 1, stale, {"id": 10, "task": 5, "result": [_region("b")]})
    ingest_annotation(store, 1, stale, {"id": 11, "task": 6, "result": [_region("c")]})
    (a10, a11) = sorted(store.list_annotations(1), key=lambda a: a.annotation_id)
    assert a10.boxes is not None and a10.boxes.labels.tolist() == [0]  # "b" is first now
    assert a11.boxes is None and "c" in (a11.parse_error or "")
