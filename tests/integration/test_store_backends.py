"""The store under the product's own paths, on SQLite and on a real PostgreSQL: a training job
end to end (webhooks in, a child process trains from the store, the version is recorded), and
webhook writers, a training reader and a queue writer at once."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from backend.jobs import TrainingScheduler
from backend.service import BoxloopService
from backend.settings import Settings
from backend.store import Store
from tests.synthetic import LABEL_CONFIG, ls_result, write_dataset

PROJECT = 7


def _settings(tmp_path: Path, store_url: str, **extra: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=store_url,
        allowed_local_roots=[tmp_path / "images"],
        reconcile_on_startup=False,
        train_after_new_annotations=1_000_000,
        label_studio_url=None,
        label_studio_token=None,
        **extra,
    )


def _annotation_event(
    action: str, annotation_id: int, task_id: int, image: str, objects: list
) -> dict[str, Any]:
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "task": task_id,
            "result": ls_result(objects),
            "was_cancelled": False,
        },
        "task": {"id": task_id, "data": {"image": image}},
        "project": {"id": PROJECT, "label_config": LABEL_CONFIG},
    }


def test_a_training_job_runs_end_to_end_through_the_store(tmp_path: Path, store_url: str) -> None:
    """The training child opens the store from the URL it is handed (BOXLOOP_DATABASE_URL),
    reads the annotations the webhooks wrote and records its version, job and revision."""
    dataset = write_dataset(tmp_path / "images", 4)
    settings = _settings(
        tmp_path,
        store_url,
        detector="fasterrcnn_effnet_lite0",
        train_epochs=1,
        train_batch_size=2,
        detector_min_size=160,
        detector_max_size=224,
        num_threads=2,
    )
    service = BoxloopService(settings)
    try:
        service.setup(PROJECT, LABEL_CONFIG)
        for i, (path, objects) in enumerate(dataset):
            event = _annotation_event("ANNOTATION_CREATED", 100 + i, i + 1, str(path), objects)
            assert service.handle_webhook(event).stored == 1
        store = service.store
        revision = store.annotation_revision(PROJECT)
        job_id = store.create_job(PROJECT, "test")
        swapped: list[tuple[int, str]] = []
        scheduler = TrainingScheduler(settings, store, on_success=lambda *a: swapped.append(a))
        # claimed first, as the server's loop does: an unclaimed job is "not ours" at the first
        # heartbeat (10 s), and a child slower than that (a busy machine) was ended
        assert store.claim_job(job_id, scheduler.owner)
        scheduler._run(job_id)  # the child process, as the server runs it
        job = store.get_job(job_id)
        log_tail = (settings.data_dir / "logs" / f"job-{job_id}.log").read_text()[-3000:]
        assert job is not None and job.status == "succeeded", log_tail
        assert job.progress == 1.0 and job.finished_at is not None
        (version,) = store.list_model_versions(PROJECT)
        assert swapped == [(PROJECT, version.version)] and job.model_version == version.version
        assert (version.n_annotations, version.n_images) == (4, 4)
        assert version.annotations_revision == revision
        project = store.get_project(PROJECT)
        assert project is not None and project.trained_revision == revision
        assert store.count_annotations_since(PROJECT, revision) == 0
    finally:
        service.close()


# ---------------------------------------------------------------------------- concurrency
WRITERS, PER_WRITER, ROUNDS = 8, 5, 3
SHARED_TASKS = 6  # writers' annotations share tasks, so task upserts collide too


def _objects(annotation_id: int, round_: int) -> list:
    """Content that differs per round, so each write is new work with a new revision."""
    x0 = 5.0 + annotation_id % 50 + round_
    return [("Square", (x0, 10.0, x0 + 40.0, 60.0))]


def test_webhook_writers_a_training_reader_and_the_queue_at_once(
    tmp_path: Path, store_url: str
) -> None:
    """8 threads deliver ANNOTATION_CREATED then UPDATED events through the service's webhook
    handler while a thread reads as a training job does and another writes queue orders and
    tasks. Nothing may be lost, doubled or fail, and revisions must stay a strict sequence
    (the trainer counts new work by ``revision > trained_revision``)."""
    images = [str(p) for p, _ in write_dataset(tmp_path / "images", SHARED_TASKS)]
    service = BoxloopService(_settings(tmp_path, store_url))
    store = service.store
    service.setup(PROJECT, LABEL_CONFIG)
    errors: list[BaseException] = []
    writers_done = threading.Event()
    seen_revisions: list[int] = []

    def guarded(work: Any) -> Any:
        def run(*args: Any) -> None:
            try:
                work(*args)
            except BaseException as exc:  # any failure in any thread fails the test
                errors.append(exc)

        return run

    @guarded
    def writer(w: int) -> None:
        for round_ in range(ROUNDS):
            action = "ANNOTATION_CREATED" if round_ == 0 else "ANNOTATION_UPDATED"
            for k in range(PER_WRITER):
                annotation_id = 1000 * (w + 1) + k
                task_id = (w + k) % SHARED_TASKS + 1
                event = _annotation_event(
                    action,
                    annotation_id,
                    task_id,
                    images[task_id - 1],
                    _objects(annotation_id, round_),
                )
                assert service.handle_webhook(event).stored == 1

    @guarded
    def trainer() -> None:
        while not writers_done.is_set():
            revision = store.annotation_revision(PROJECT)
            seen_revisions.append(revision)
            annotations = store.list_annotations(PROJECT)
            revisions = [a.revision for a in annotations]
            assert len(set(revisions)) == len(revisions), "two annotations share a revision"
            assert len({a.annotation_id for a in annotations}) == len(annotations)
            assert store.count_annotations_since(PROJECT, 0) >= len(annotations)
            assert store.count_annotations_since(PROJECT, revision) >= 0
            time.sleep(0.005)  # a trainer polls; a tight loop only starves 2-core CI machines

    @guarded
    def queue() -> None:
        ranks = list(range(1, SHARED_TASKS + 1))
        n = 0
        while not writers_done.is_set():
            n += 1
            ranks = ranks[1:] + ranks[:1]
            store.upsert_tasks(PROJECT, [(t, {"image": images[t - 1]}) for t in ranks])
            store.set_order(PROJECT, "test", {"n": n}, ranks, view_id=n)
            time.sleep(0.005)

    readers = [threading.Thread(target=trainer), threading.Thread(target=queue)]
    writers = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    started = time.monotonic()
    try:
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join(timeout=240)
        writers_done.set()
        for thread in readers:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in readers + writers), "a thread hung"
        assert errors == [], errors
        final = store.list_annotations(PROJECT, include_deleted=True)
        expected = {1000 * (w + 1) + k for w in range(WRITERS) for k in range(PER_WRITER)}
        assert sorted(a.annotation_id for a in final) == sorted(expected)  # once each
        for annotation in final:
            assert not annotation.deleted
            assert annotation.result == ls_result(_objects(annotation.annotation_id, ROUNDS - 1))
        # every write changed content: one revision each, none skipped or shared
        writes = WRITERS * PER_WRITER * ROUNDS
        assert store.annotation_revision(PROJECT) == writes
        assert len({a.revision for a in final}) == len(final)
        for w in range(WRITERS):  # a writer's last round went out in order
            mine = sorted(
                (a.annotation_id, a.revision) for a in final if a.annotation_id // 1000 == w + 1
            )
            assert [r for _, r in mine] == sorted(r for _, r in mine)
        assert seen_revisions == sorted(seen_revisions) and seen_revisions, "revision went back"
        assert [t for t, _ in store.list_tasks(PROJECT)] == list(range(1, SHARED_TASKS + 1))
        order = store.get_order(PROJECT)
        assert order is not None and sorted(order.task_ids) == list(range(1, SHARED_TASKS + 1))
        print(
            f"{store_url.split(':')[0]}: {writes} webhook writes in {time.monotonic() - started:.1f} s"
        )
    finally:
        writers_done.set()
        service.close()


_PROCESS_WRITER = """
import pathlib, sys, threading, time
from backend.store import Store

url, process, threads, per_thread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
go = pathlib.Path(sys.argv[5])
store = Store(url)
errors = []
go.with_name(f"ready-{process}").touch()
while not go.exists():  # start together: imports take seconds, the writes a fraction of one
    time.sleep(0.01)

def write(t):
    try:
        for k in range(per_thread):
            annotation_id = 100_000 * (process + 1) + 1000 * t + k
            store.upsert_annotation(7, annotation_id, k + 1, [{"k": k}], None, source="reconcile")
    except BaseException as exc:
        errors.append(repr(exc))

workers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
store.close()
print("\\n".join(errors))
sys.exit(1 if errors else 0)
"""


def test_annotation_writers_in_two_processes_keep_revisions_a_strict_sequence(
    tmp_path: Path, store_url: str
) -> None:
    """The server and a training child (whose reconcile stores annotations) write at once from
    two processes: an in-process lock cannot order them, the database must."""
    Store(store_url).close()  # migrate once before the writers race
    processes, threads, per_thread = 2, 3, 20
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PROCESS_WRITER,
                store_url,
                str(p),
                str(threads),
                str(per_thread),
                str(tmp_path / "go"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for p in range(processes)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < processes and time.monotonic() < deadline:
        if any(child.poll() is not None for child in children):
            break
        time.sleep(0.05)
    (tmp_path / "go").touch()
    started = time.monotonic()
    outputs = [child.communicate(timeout=240)[0] for child in children]
    print(f"{store_url.split(':')[0]}: 2 processes wrote in {time.monotonic() - started:.1f} s")
    assert [child.returncode for child in children] == [0] * processes, outputs
    store = Store(store_url)
    try:
        stored = store.list_annotations(PROJECT)
        writes = processes * threads * per_thread
        assert len(stored) == writes
        revisions = sorted(a.revision for a in stored)
        assert revisions == list(range(1, writes + 1)), "revisions shared or skipped"
    finally:
        store.close()


def test_ids_at_label_studios_limit_are_stored_and_one_past_it_is_a_4xx(
    tmp_path: Path, store_url: str
) -> None:
    """Label Studio's ids are 32-bit (Django AutoField), as are the store's id columns on
    PostgreSQL. The largest is stored on both databases; one past it is refused by the HTTP
    layer with a message, where PostgreSQL would have answered it with a 500."""
    from fastapi.testclient import TestClient

    from backend.app import create_app
    from backend.ingest import MAX_ID

    (image,) = (str(p) for p, _ in write_dataset(tmp_path / "images", 1))
    settings = _settings(tmp_path, store_url)
    with TestClient(create_app(settings)) as client:
        key = f"{MAX_ID}.1795390608"  # Label Studio's "id.timestamp" form
        assert (
            client.post("/setup", json={"project": key, "schema": LABEL_CONFIG}).status_code == 200
        )
        event = _annotation_event("ANNOTATION_CREATED", MAX_ID, MAX_ID, image, [])
        event["project"] = {"id": MAX_ID, "label_config": LABEL_CONFIG}
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200, answer.text
        store = Store(store_url)
        try:
            (stored,) = store.list_annotations(MAX_ID)
            assert (stored.annotation_id, stored.task_id) == (MAX_ID, MAX_ID)
        finally:
            store.close()
        past = MAX_ID + 1
        setup = client.post(
            "/setup", json={"project": f"{past}.1795390608", "schema": LABEL_CONFIG}
        )
        assert setup.status_code == 422 and str(MAX_ID) in setup.json()["error"]
        assert client.post("/train", json={"project": past}).status_code == 422
        for annotation_id, task_id in ((past, 5), (5, past)):
            event = _annotation_event("ANNOTATION_CREATED", annotation_id, task_id, image, [])
            answer = client.post("/webhook", json=event)
            assert 400 <= answer.status_code < 500, answer.text
        bulk = {
            "action": "ANNOTATIONS_DELETED",
            "project": {"id": MAX_ID},
            "annotations": [{"id": past}, {"id": MAX_ID}],
        }
        answer = client.post("/webhook", json=bulk)
        assert answer.status_code == 200 and "item 0" in answer.json()["rejected"][0]
        assert client.get(f"/projects/{past}/search/index").status_code == 422
        assert client.get("/health").status_code == 200  # and the server goes on serving


def test_nul_characters_get_a_4xx_or_are_stored_never_a_500(tmp_path: Path, store_url: str) -> None:
    """PostgreSQL's text columns refuse NUL (SQLite takes it): a /setup hostname holding one was
    a 500 there, and so was an image path holding one on any database (the OS refuses it). Now
    each is a 4xx naming it, and an annotation whose label holds one is stored on both."""
    from fastapi.testclient import TestClient

    from backend.app import create_app

    (image,) = (str(p) for p, _ in write_dataset(tmp_path / "images", 1))
    with TestClient(create_app(_settings(tmp_path, store_url))) as client:
        setup = {"project": PROJECT, "schema": LABEL_CONFIG}
        refused = client.post("/setup", json={**setup, "hostname": "http://ls\u0000.example"})
        assert refused.status_code == 422 and "hostname" in refused.json()["error"]
        assert client.post("/setup", json={**setup, "access_token": "a\u0000b"}).status_code == 422
        # a hostname urlparse cannot read (brackets holding no IPv6 address) is stored but never
        # trusted; /predict of the project goes on answering (it was a 500)
        bad_host = {**setup, "hostname": "http://[bad]:8080"}
        assert client.post("/setup", json=bad_host).status_code == 200
        task = {"id": 4, "data": {"image": image}}
        answer = client.post("/predict", json={"tasks": [task], "project": str(PROJECT)})
        assert answer.status_code == 200, answer.text
        assert client.post("/setup", json=setup).status_code == 200
        refused = {
            f"{image}\u0000.png": "NUL character",
            "file:///tmp/a%00.png": "NUL character",
            "http://[bad]/x.png": "not a URL or path that can be read",
        }
        for reference, reason in refused.items():
            task = {"id": 3, "data": {"image": reference}}
            answer = client.post("/predict", json={"tasks": [task], "project": str(PROJECT)})
            assert answer.status_code == 422, answer.text
            assert reason in answer.json()["errors"][0]["error"]
        objects = [("Square\u0000", (10.0, 10.0, 40.0, 40.0))]
        event = _annotation_event("ANNOTATION_CREATED", 11, 3, image, objects)
        answer = client.post("/webhook", json=event)
        assert answer.status_code == 200 and answer.json()["stored"] == 1, answer.text
        assert client.get("/health").status_code == 200


def test_nan_and_infinite_numbers_in_a_payload_are_stored_never_a_500(
    tmp_path: Path, store_url: str
) -> None:
    """Python's JSON reads ``NaN``, ``Infinity`` and 1e400 (as inf); PostgreSQL's json type
    refuses them, and with them the row: such an annotation was a 500 and was not stored. Now it
    is stored on both databases (the number as null) and flagged as not usable for training,
    since its box has no finite coordinates."""
    from fastapi.testclient import TestClient

    from backend.app import create_app

    (image,) = (str(p) for p, _ in write_dataset(tmp_path / "images", 1))
    with TestClient(create_app(_settings(tmp_path, store_url))) as client:
        assert client.post("/setup", json={"project": PROJECT, "schema": LABEL_CONFIG}).is_success
        for annotation_id, number in ((21, "NaN"), (22, "1e400"), (23, "-Infinity")):
            event = _annotation_event("ANNOTATION_CREATED", annotation_id, 5, image, [])
            event["annotation"]["result"] = [
                {
                    "from_name": "label", "to_name": "image", "type": "rectanglelabels",
                    "original_width": 64, "original_height": 64,
                    "value": {"x": "X", "y": 1, "width": 5, "height": 5,
                              "rectanglelabels": ["Square"]},
                }
            ]  # fmt: skip
            body = json.dumps(event).replace('"X"', number)
            answer = client.post(
                "/webhook", content=body, headers={"content-type": "application/json"}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["stored"] == 1 and "finite" in answer.json()["warnings"][0]
        tasks = '{"action": "TASKS_CREATED", "project": {"id": %d}, "tasks": [{"id": 6, "data":'
        tasks += ' {"image": "%s", "score": 1e999}}]}'
        answer = client.post(
            "/webhook",
            content=tasks % (PROJECT, image),
            headers={"content-type": "application/json"},
        )
        assert answer.status_code == 200 and answer.json()["tasks"] == 1, answer.text
    store = Store(store_url)
    try:
        stored = {a.annotation_id: a for a in store.list_annotations(PROJECT)}
        assert set(stored) == {21, 22, 23} and all(a.parse_error for a in stored.values())
        assert stored[22].result[0]["value"]["x"] is None  # standard JSON on both databases
        assert store.get_task_data(PROJECT, 6) == {"image": image, "score": None}
    finally:
        store.close()
