from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from sqlalchemy import Text, cast, select

from backend.boxes import Boxes
from backend.ingest import (
    _reads_as_stored,
    ingest_annotation,
    reparse_annotations,
    save_label_config,
)
from backend.labelstudio.convert import LabelConfig
from backend.store import Store
from backend.tables import annotations_table, projects


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


def test_features_of_more_task_ids_than_a_statement_takes_are_read_in_order(
    store: Store,
) -> None:
    """psycopg takes at most 65,535 parameters in a statement: ordering or indexing a project
    of more tasks asked for all their ids in one ``IN (...)`` and failed on PostgreSQL."""
    asked = list(range(1, 70_002))
    stored = asked[::7]  # 10,001 vectors, in every chunk of the ids asked for
    vectors = {t: np.array([t, -t], np.float32) for t in stored}
    store.put_features(1, "imgnet-v1", reversed(vectors.items()))
    shuffled = [*asked, 5, 8]  # ids twice, and ids without a vector
    np.random.default_rng(0).shuffle(shuffled)
    ids, matrix = store.get_features(1, "imgnet-v1", task_ids=shuffled)
    assert ids == stored  # by task id, each once
    np.testing.assert_array_equal(matrix, np.stack([vectors[t] for t in stored]))
    assert store.get_features(1, "imgnet-v1", task_ids=[])[0] == []


def test_an_annotation_holding_non_finite_numbers_keeps_its_revision_when_delivered_again(
    store: Store,
) -> None:
    """NaN and infinities are stored as null (backend.jsonsafe): compared with the incoming
    NaN, the stored result never matched, and every re-delivery was new work for the trainer."""
    _project(store)
    value = {"x": float("nan"), "y": float("inf"), "nested": [float("-inf"), 2.5]}
    result = [{"type": "rectanglelabels", "value": value}]
    deliveries = [store.upsert_annotation(1, 10, 5, result, None) for _ in range(3)]
    assert deliveries == [(1, True), (1, False), (1, False)]
    assert store.count_annotations_since(1, 1) == 0
    (stored,) = store.list_annotations(1)
    assert stored.result[0]["value"] == {"x": None, "y": None, "nested": [None, 2.5]}


def test_a_project_update_keeps_its_trained_revision_and_creation_time(store: Store) -> None:
    _project(store)
    store.set_trained_revision(1, 5)
    with store.engine.connect() as conn:
        created = conn.execute(select(projects.c.created_at)).scalar_one()
    store.upsert_project(
        1, label_config="<View/>", from_name="l2", to_name="i2", image_key="img",
        labels=["c"], hostname="http://other",
    )  # fmt: skip
    project = store.get_project(1)
    assert project is not None and project.trained_revision == 5
    assert (project.from_name, project.image_key, project.labels) == ("l2", "img", ["c"])
    assert project.hostname == "http://other"  # a hostname given replaces the stored one
    with store.engine.connect() as conn:
        assert conn.execute(select(projects.c.created_at)).scalar_one() == created


def _race(url: str, rounds: int, work: Callable[[Store, int, int], object]) -> list[str]:
    """``work(store, writer, round)`` from two threads at once, each with a Store of its own
    (as two processes have) on the database at ``url``, ``rounds`` times; the errors."""
    stores = [Store(url), Store(url)]
    errors: list[str] = []
    try:
        for round_ in range(rounds):
            barrier = threading.Barrier(2)

            def go(writer: int, round_: int = round_, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    work(stores[writer], writer, round_)
                except Exception as exc:  # pragma: no cover - the failure is what we look for
                    errors.append(f"{type(exc).__name__}: {exc}")

            threads = [threading.Thread(target=go, args=(w,)) for w in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for store in stores:
            store.close()
    return errors


def test_two_writers_storing_a_new_project_at_once_both_succeed(store_url: str) -> None:
    """/setup and a webhook carrying the label config (or two servers) store the same new
    project at once: a look for it then an insert failed with a duplicate key on both
    databases, a 500 that lost the webhook's annotation."""

    def upsert(store: Store, writer: int, round_: int) -> None:
        store.upsert_project(
            round_ + 1, label_config=f"<View w='{writer}'/>", from_name="label",
            to_name="image", image_key="image", labels=["a"],
            hostname="http://ls" if writer == 0 else None,
        )  # fmt: skip

    assert _race(store_url, 20, upsert) == []
    store = Store(store_url)
    try:
        projects_ = store.list_projects()
        assert [p.id for p in projects_] == list(range(1, 21))
        assert {p.hostname for p in projects_} == {"http://ls"}  # None never replaces it
        assert {p.trained_revision for p in projects_} == {0}
    finally:
        store.close()


def test_two_writers_storing_the_same_vectors_and_order_at_once_both_succeed(
    store_url: str,
) -> None:
    """A delete then an insert failed with a duplicate key on PostgreSQL when two processes
    stored one task's vector or one project's order at once."""

    def put(store: Store, writer: int, round_: int) -> None:
        tasks = range(round_ * 20, round_ * 20 + 20)
        store.put_features(1, "imgnet-v1", [(t, np.full(4, writer, np.float32)) for t in tasks])

    def order(store: Store, writer: int, round_: int) -> None:
        store.set_order(1, "random", {"writer": writer}, [round_, writer], view_id=writer or None)

    assert _race(store_url, 20, put) == []
    assert _race(store_url, 20, order) == []
    store = Store(store_url)
    try:
        ids, matrix = store.get_features(1, "imgnet-v1")
        assert ids == list(range(400)) and matrix.shape == (400, 4)
        assert all(len(set(row)) == 1 and row[0] in (0, 1) for row in matrix.tolist())
        order = store.get_order(1)
        assert order is not None and order.strategy == "random"
        writer = order.params["writer"]  # one writer's order, whole
        assert order.task_ids == [19, writer] and order.view_id == (writer or None)
    finally:
        store.close()


def test_a_task_whose_image_changes_loses_its_vectors_and_only_then(store: Store) -> None:
    """Kept, the vectors of a task's old image went on placing it in orders and searches.
    Rank and utility writes change other fields of the data: the vectors stay."""
    _project(store)
    store.upsert_tasks(1, [(10, {"image": "a.jpg"}), (20, {"image": "b.jpg"}), (30, {})])
    vector = np.ones(8, np.float32)
    for extractor in ("imgnet-v1", "search"):
        store.put_features(1, extractor, [(10, vector), (20, vector), (30, vector)])
    store.upsert_tasks(
        1,
        [
            (10, {"image": "a.jpg", "boxloop_rank": "0001"}),  # same image
            (20, {"image": "c.jpg"}),  # another image
            (30, None),  # no data sent: kept
        ],
    )
    for extractor in ("imgnet-v1", "search"):
        assert store.get_features(1, extractor)[0] == [10, 30]
    assert store.get_task_data(1, 20) == {"image": "c.jpg"}


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


def _raw_boxes(store: Store) -> dict[int, str | None]:
    """The boxes column as the text stored, by annotation id."""
    table = annotations_table
    query = select(table.c.annotation_id, cast(table.c.boxes, Text))
    with store.engine.connect() as conn:
        return {int(r[0]): r[1] for r in conn.execute(query)}


def test_reparsed_boxes_are_stored_as_the_json_an_upsert_stores(store: Store) -> None:
    """``replace_parsed_boxes`` serializes the boxes itself and binds the text (not through the
    JSON type, as ``upsert_annotation`` does): on both databases the stored text must be the
    same, None (JSON ``null``) included, and ``stored_readings`` must read it back."""
    _project(store)
    boxes = Boxes(np.array([[1.23456, 2, 30.5, 40], [5, 6, 7, 8]]), np.array([1, 0]), (100, 80))
    other = Boxes(np.array([[3, 4, 5, 6]]), np.array([0]), (100, 80))
    rev_a, _ = store.upsert_annotation(1, 10, 5, [{"r": 1}], boxes)
    rev_b, _ = store.upsert_annotation(1, 11, 6, [{"r": 2}], other)
    store.upsert_annotation(1, 12, 7, [{"r": 3}], None, parse_error="unknown label")
    rev_d, _ = store.upsert_annotation(1, 13, 8, [{"r": 4}], boxes)
    upserted = _raw_boxes(store)
    assert store.replace_parsed_boxes(1, {10: (rev_a, None, "gone"), 11: (rev_b, boxes, None)}) == 2
    replaced = _raw_boxes(store)
    assert replaced[11] == upserted[13] and replaced[10] == upserted[12]
    readings = {r.annotation_id: r for r in store.stored_readings(1)}
    assert readings[11].boxes == boxes.to_dict() and readings[11].parse_error is None
    assert readings[10].boxes is None and readings[10].parse_error == "gone"
    assert readings[10].revision == rev_a and readings[13].revision == rev_d


def test_stored_readings_are_what_list_annotations_gives(store: Store) -> None:
    """The re-read's rows (JSON decoded one at a time) hold what ``list_annotations`` holds:
    the same annotations (deleted ones left out) in the same order, results, boxes, errors."""
    _project(store)
    boxes = Boxes(np.array([[1, 2, 30, 40]]), np.array([1]), (100, 80))
    store.upsert_annotation(1, 12, 5, [{"r": 1, "nested": {"x": [1.5, None]}}], boxes)
    store.upsert_annotation(1, 10, 6, [], None)
    store.upsert_annotation(1, 11, 7, [{"r": 2}], None, parse_error="label 'x\x00' unknown")
    store.upsert_annotation(1, 13, 8, [{"r": 3}], boxes)
    store.delete_annotations(1, [13])
    store.upsert_annotation(2, 14, 9, [{"r": 4}], boxes)  # another project
    readings = store.stored_readings(1)
    assert len(readings) == 3
    assert [(r.annotation_id, r.revision, r.result, r.boxes, r.parse_error) for r in readings] == [
        (
            a.annotation_id,
            a.revision,
            a.result,
            None if a.boxes is None else a.boxes.to_dict(),
            a.parse_error,
        )
        for a in store.list_annotations(1)
    ]


def test_a_label_config_edit_writes_only_the_annotations_that_read_differently(
    store: Store,
) -> None:
    """``reparse_annotations`` compares each new reading with the stored JSON: a label added
    at the end leaves the boxes of the others as they were (not written, revisions kept) and
    makes the annotation that named it usable (a new revision); a reorder rewrites the boxes
    whose label indices moved."""
    _project(store)  # labels a, b
    config = LabelConfig("label", "image", "image", ("a", "b"))
    for annotation_id, label in ((10, "a"), (11, "b"), (12, "c")):
        ingest_annotation(
            store,
            1,
            config,
            {"id": annotation_id, "task": annotation_id, "result": [_region(label)]},
        )
    before = {a.annotation_id: a for a in store.list_annotations(1)}
    newest = store.annotation_revision(1)
    extended = LabelConfig("label", "image", "image", ("a", "b", "c"))
    assert reparse_annotations(store, 1, extended) == 1
    after = {a.annotation_id: a for a in store.list_annotations(1)}
    assert [after[i].revision for i in (10, 11)] == [before[i].revision for i in (10, 11)]
    assert after[12].revision > newest and after[12].parse_error is None
    assert after[12].boxes is not None and after[12].boxes.labels.tolist() == [2]
    assert reparse_annotations(store, 1, extended) == 0  # nothing reads differently now
    reordered = LabelConfig("label", "image", "image", ("b", "a", "c"))
    assert reparse_annotations(store, 1, reordered) == 2
    labels = {
        a.annotation_id: a.boxes.labels.tolist() for a in store.list_annotations(1) if a.boxes
    }
    assert labels == {10: [1], 11: [0], 12: [2]}


_STORED = Boxes(np.array([[1, 2, 30, 40], [5, 6, 7, 8]]), np.array([1, 0]), (100, 80)).to_dict()


@pytest.mark.parametrize(
    "stored",
    [
        _STORED,
        {**_STORED, "xyxy": [[1.0004, 2, 30, 40], [5, 6, 7, 8]]},  # within Boxes' 1e-3
        {**_STORED, "xyxy": [[1.01, 2, 30, 40], [5, 6, 7, 8]]},
        {**_STORED, "labels": [0, 1]},
        {**_STORED, "labels": [1.0, 0.0]},  # not what to_dict writes: Boxes decide
        {**_STORED, "labels": [1], "xyxy": [[1, 2, 30, 40]]},
        {**_STORED, "image_size": [100, 81]},
        {**_STORED, "scores": [0.5, 0.5]},
        {**_STORED, "ignore": [False, True]},  # Boxes == does not compare ignore flags
        None,
    ],
)
def test_a_reading_is_compared_with_the_stored_json_as_boxes_compare(
    stored: dict[str, object] | None,
) -> None:
    """The re-read tells changed boxes from the stored JSON without building ``Boxes`` of
    every row; its answer must be ``Boxes ==``'s, as before (tolerance, labels, size, scores)."""
    for boxes in (Boxes.from_dict(_STORED), None):
        expected = (
            boxes is None and stored is None
            if boxes is None or stored is None
            else Boxes.from_dict(stored) == boxes
        )
        assert _reads_as_stored(boxes, stored) == expected
