"""Search in the product, on small generated images: search-train, the HTTP endpoint, the CLI.

Images hold a red square on the left or a blue disc on the right; the model is trained from the
project's own annotations and a generated sketch file per label, then queried by class name and
by strokes. No shared data needed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from backend.app import create_app
from backend.boxes import Boxes
from backend.cli import main
from backend.search_service import SearchService, sketch_files, train_from_project
from backend.service import BoxloopService
from backend.settings import Settings
from benchmark.search_first_query import train_small_model, write_sketches

LABELS = ["square", "disc"]
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    '<Label value="square"/><Label value="disc"/></RectangleLabels></View>'
)


def _image(path: Path, kind: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    image = Image.new("RGB", (160, 120), tuple(int(v) for v in rng.integers(180, 255, 3)))
    draw = ImageDraw.Draw(image)
    if kind == 0:
        box = (10 + rng.integers(0, 10), 30, 70, 90)
        draw.rectangle(box, fill=(200, 20, 20))
    else:
        box = (90, 30 + rng.integers(0, 10), 150, 90)
        draw.ellipse(box, fill=(20, 20, 200))
    image.save(path)
    return tuple(float(v) for v in box)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("search")
    images = root / "images"
    images.mkdir()
    settings = Settings(
        data_dir=root / "data",
        allowed_local_roots=[images],
        reconcile_on_startup=False,
        train_after_new_annotations=10_000,
        num_threads=1,
    )
    service = BoxloopService(settings)
    service.setup(1, CONFIG)
    rng = np.random.default_rng(0)
    tasks = []
    for t in range(1, 17):
        path = images / f"{t}.png"
        box = _image(path, t % 2, rng)
        tasks.append((t, {"image": str(path)}))
        if t <= 12:  # the last four stay unlabelled
            service.store.upsert_annotation(
                1, 100 + t, t, [], Boxes(np.array([box]), np.array([t % 2]), (160, 120))
            )
    service.store.upsert_tasks(1, tasks)
    sketches = write_sketches(root / "sketches")
    model_dir = train_small_model(
        service, 1, sketches, object_steps=80, spatial_epochs=40, threads=1
    )
    yield settings, service, model_dir, root
    service.close()


def test_sketch_files_match_labels_by_name_and_by_the_category_map(tmp_path: Path) -> None:
    write_sketches(tmp_path / "s")
    (tmp_path / "s" / "extra.ndjson").write_text("")
    (tmp_path / "s" / "category_map.tsv").write_text("file\tmine\nextra.ndjson\tdisc\n")
    found = sketch_files(tmp_path / "s", LABELS, column="mine")
    assert {p.name: label for p, label in found.items()} == {
        "square.ndjson": "square",
        "disc.ndjson": "disc",
        "extra.ndjson": "disc",
    }


def test_search_over_http_finds_the_drawn_class_in_its_place(project) -> None:  # type: ignore[no-untyped-def]
    settings, service, model_dir, _ = project
    assert (model_dir / "search_model.pt").is_file()
    with TestClient(create_app(settings, service)) as client:
        left_square = {"box": {"x": 5, "y": 25, "width": 40, "height": 50}, "label": "square"}
        r = client.post("/projects/1/search", json={"objects": [left_square], "k": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index"]["factory"] == "Flat" and body["index"]["count"] == 16
        tasks = [hit["task"] for hit in body["results"]]
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert sum(t % 2 == 0 for t in tasks) >= 6  # squares are the even tasks
        # strokes of a disc drawn on the right
        ring = [[[90 + 8 * np.cos(a), 50 + 10 * np.sin(a)] for a in np.linspace(0, 6.3, 16)]]
        disc = {"box": {"x": 55, "y": 25, "width": 40, "height": 50}, "strokes": ring}
        r = client.post("/projects/1/search", json={"objects": [disc], "k": 4, "front": True})
        assert r.status_code == 200, r.text
        found = [hit["task"] for hit in r.json()["results"]]
        assert r.json()["moved_to_front"]
        order = service.store.get_order(1)
        assert [int(t) for t in order.task_ids[:4]] == found
        assert sorted(int(t) for t in order.task_ids) == list(range(1, 17))

        # bad input: clear 4xx, the server keeps serving
        bad = [
            ({"objects": [{"box": left_square["box"], "label": "cat"}]}, 422, "unknown class"),
            (
                {
                    "objects": [
                        {"box": {"x": 90, "y": 0, "width": 20, "height": 5}, "label": "disc"}
                    ]
                },
                422,
                "inside",
            ),
            ({"objects": []}, 422, "objects"),
            ({"objects": [left_square], "k": 0}, 422, "k"),
            # an integer past float's range was a 500 (OverflowError)
            (
                {"objects": [{**left_square, "box": {**left_square["box"], "x": 10**400}}]},
                422,
                "finite",
            ),
        ]
        for payload, status, message in bad:
            r = client.post("/projects/1/search", json=payload)
            assert r.status_code == status and message in r.json()["error"], r.text
        r = client.post("/projects/99/search", json={"objects": [left_square]})
        assert r.status_code == 404 and "unknown" in r.json()["error"]
        assert client.get("/projects/99/search/labels").status_code == 404  # was 200
        assert client.get("/projects/1/search/labels").json()["labels"] == LABELS
        assert client.get("/health").status_code == 200


def test_new_tasks_are_indexed_in_the_background_and_the_search_finds_them(project) -> None:  # type: ignore[no-untyped-def]
    """TASKS_CREATED starts a background job that computes the new tasks' vectors and adds them
    to the index; its state is on GET .../search/index, an unreadable image is counted as
    failed, and the search that follows answers from the whole pool."""
    settings, service, _, root = project
    images = root / "images"
    tasks = [{"id": t, "data": {"image": str(images / f"{t}.png")}} for t in range(1, 17)]
    tasks.append({"id": 17, "data": {"image": str(images / "missing.png")}})
    with TestClient(create_app(settings, service)) as client:
        assert client.get("/projects/2/search/index").json() == {"project": 2, "state": "idle"}
        assert client.post("/setup", json={"project": 2, "schema": CONFIG}).status_code == 200
        created = client.post(
            "/webhook", json={"action": "TASKS_CREATED", "project": 2, "tasks": tasks}
        )
        assert created.status_code == 200 and created.json()["tasks"] == 17
        state = client.get("/projects/2/search/index").json()
        for _ in range(600):
            if state["state"] in ("done", "failed"):
                break
            time.sleep(0.1)
            state = client.get("/projects/2/search/index").json()
        assert state["state"] == "done", state
        assert (state["todo"], state["indexed"], state["failed"]) == (17, 16, 1)
        listed = {p["id"]: p for p in client.get("/status").json()["projects"]}
        assert listed[2]["search_index"] == state and listed[1]["search_index"]["state"] == "idle"
        extractor = client.app.state.search._load()[2]  # type: ignore[attr-defined]
        ids, _ = service.store.get_features(2, extractor.name)
        assert sorted(ids) == list(range(1, 17))
        square = {"box": {"x": 5, "y": 25, "width": 40, "height": 50}, "label": "square"}
        found = client.post("/projects/2/search", json={"objects": [square], "k": 4}).json()
        assert found["index"]["count"] == 16 and found["without_features"] == [17]
        again = client.post("/projects/2/search/index")
        assert again.status_code == 202 and again.json()["state"] in ("queued", "running", "done")
        assert client.post("/projects/99/search/index").status_code == 404


def test_without_a_model_the_answer_says_how_to_train_one(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", reconcile_on_startup=False, num_threads=1)
    service = BoxloopService(settings)
    service.setup(1, CONFIG)
    try:
        with TestClient(create_app(settings, service)) as client:
            r = client.post(
                "/projects/1/search",
                json={
                    "objects": [{"box": {"x": 1, "y": 1, "width": 5, "height": 5}, "label": "disc"}]
                },
            )
            assert r.status_code == 409 and "search-train" in r.json()["error"]
            indexing = client.post("/projects/1/search/index")
            assert indexing.status_code == 409 and "search-train" in indexing.json()["error"]
    finally:
        service.close()


def test_cli_search_prints_the_top_k_and_new_tasks_join_the_index(
    project, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    settings, service, _, root = project
    monkeypatch.setenv("BOXLOOP_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("BOXLOOP_ALLOWED_LOCAL_ROOTS", str(root / "images"))
    monkeypatch.setenv("BOXLOOP_NUM_THREADS", "1")
    monkeypatch.setenv("BOXLOOP_RECONCILE_ON_STARTUP", "false")
    rng = np.random.default_rng(5)
    _image(root / "images" / "17.png", 0, rng)
    service.store.upsert_tasks(1, [(17, {"image": str(root / "images" / "17.png")})])
    query = root / "q.json"
    query.write_text(
        json.dumps(
            {"objects": [{"box": {"x": 5, "y": 25, "width": 40, "height": 50}, "label": "square"}]}
        )
    )
    assert main(["search", "--project", "1", "--query", str(query), "--k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["results"]) == 3 and out["index"]["count"] == 17
    # the file's k applies, as over HTTP (it was ignored); a k the endpoint refuses is refused
    square = {"box": {"x": 5, "y": 25, "width": 40, "height": 50}, "label": "square"}
    query.write_text(json.dumps({"objects": [square], "k": 2}))
    assert main(["search", "--project", "1", "--query", str(query)]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2
    for k in ("0", "-3"):
        assert main(["search", "--project", "1", "--query", str(query), "--k", k]) == 2
        assert "k" in capsys.readouterr().err
    query.write_text(json.dumps({"objects": [{"box": {"x": 5}, "label": "square"}]}))
    assert main(["search", "--project", "1", "--query", str(query)]) == 2
    assert "missing" in capsys.readouterr().err
    search = SearchService(settings, service.store, lambda pid: service.studio.image_source(None))
    assert search.index_dir(1, "x").parts[-3:] == ("index", "1", "x")


def _browser():  # type: ignore[no-untyped-def]
    """Headless Chromium from Debian's packages through Selenium, or a skip saying what lacks."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip(
            "Chromium / chromedriver absent (Debian: apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver_path))


def test_canvas_page_in_a_headless_browser(project) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    import uvicorn
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.conftest import free_port

    settings, service, _, _ = project
    port = free_port()
    app = create_app(settings, service)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    browser = _browser()
    try:
        browser.get(f"http://127.0.0.1:{port}/search")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(Select(b.find_element(By.ID, "label")).options) == 2)

        # the indexing line: no job since this server started; the button starts one and the
        # page follows it until it is done, then shows what the job reports
        def state(b) -> str | None:  # type: ignore[no-untyped-def]
            return b.find_element(By.ID, "index-state").get_attribute("data-state")

        wait.until(lambda b: state(b) == "idle")
        assert "no job since the server started" in browser.find_element(By.ID, "index-state").text
        browser.find_element(By.ID, "index").click()
        wait.until(lambda b: state(b) == "done")
        job = app.state.search.index_state(1)
        assert job["state"] == "done" and job["indexed"] >= 16
        assert browser.find_element(By.ID, "index-state").text == f"index: {job['indexed']} tasks"
        Select(browser.find_element(By.ID, "label")).select_by_visible_text("square")
        canvas = browser.find_element(By.ID, "canvas")
        # a box on the left half (offsets from the canvas centre, 512 × 384)
        ActionChains(browser).move_to_element_with_offset(
            canvas, -230, -120
        ).click_and_hold().move_by_offset(150, 180).release().perform()
        # a second box on the right, with a stroke drawn inside it
        ActionChains(browser).move_to_element_with_offset(
            canvas, 30, -120
        ).click_and_hold().move_by_offset(180, 180).release().perform()
        browser.find_element(By.ID, "mode-draw").click()
        ActionChains(browser).move_to_element_with_offset(
            canvas, 80, -60
        ).click_and_hold().move_by_offset(40, 30).move_by_offset(30, -20).release().perform()
        objects = browser.execute_script("return query();")
        assert len(objects) == 2
        assert objects[0]["label"] == "square" and "strokes" not in objects[0]
        assert objects[0]["box"]["x"] < 10 and objects[0]["box"]["width"] > 25
        assert len(objects[1]["strokes"]) == 1 and len(objects[1]["strokes"][0]) >= 3
        browser.find_element(By.ID, "k").clear()
        browser.find_element(By.ID, "k").send_keys("5")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "img.result")) == 5)
        # the thumbnails really load (served by /projects/1/tasks/{id}/thumbnail)
        wait.until(
            lambda b: all(
                b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                for img in b.find_elements(By.CSS_SELECTOR, "img.result")
            )
        )
        assert "5 results" in browser.find_element(By.ID, "status").text
        # a bad query shows the server's message, and the page keeps working
        browser.find_element(By.ID, "clear").click()
        browser.find_element(By.ID, "search").click()
        wait.until(lambda b: "objects" in b.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "status").get_attribute("class") == "error"
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(timeout=10)


def test_search_train_names_what_it_cannot_train_on(
    project, tmp_path: Path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    """One label among the boxes, or a sketch file that is not Quick, Draw! ndjson, ended
    ``boxloop search-train`` with a traceback."""
    settings, service, _, root = project
    for key, value in (
        ("DATA_DIR", settings.data_dir),
        ("ALLOWED_LOCAL_ROOTS", root / "images"),
        ("NUM_THREADS", 1),
        ("RECONCILE_ON_STARTUP", "false"),
    ):
        monkeypatch.setenv(f"BOXLOOP_{key}", str(value))
    service.setup(3, CONFIG)
    tasks = [(t, {"image": str(root / "images" / f"{t}.png")}) for t in (2, 4)]  # squares
    service.store.upsert_tasks(3, tasks)
    for t, _ in tasks:
        square = Boxes(np.array([[10, 30, 70, 90]]), np.array([0]), (160, 120))
        service.store.upsert_annotation(3, 300 + t, t, [], square)
    sketches = write_sketches(tmp_path / "sketches")
    out = str(tmp_path / "model")
    args = ["search-train", "--project", "3", "--sketches", str(sketches), "--out", out]
    assert main(args) == 1
    assert "at least two apart" in capsys.readouterr().err
    disc = Boxes(np.array([[90, 30, 150, 90]]), np.array([1]), (160, 120))
    service.store.upsert_tasks(3, [(5, {"image": str(root / "images" / "5.png")})])  # a disc
    service.store.upsert_annotation(3, 305, 5, [], disc)
    (sketches / "disc.ndjson").write_text("not json\n")
    assert main(args) == 1
    assert "disc.ndjson is not a Quick, Draw!" in capsys.readouterr().err


def test_search_train_takes_each_tasks_newest_boxes_in_its_images_frame(
    project, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Search training read every annotation of a task (one image per annotator: copies the
    contrastive loss took for different images) and boxes drawn on another copy of the image
    (Label Studio's ``original_width``) in the loaded image's frame: the crop and the layout
    target were cut in the wrong place."""
    import backend.search

    settings, service, _, root = project
    store = service.store
    service.setup(4, CONFIG)
    images = root / "images"
    for t in (1, 2):  # the loaded files are 320x240; the annotator's copy was 160x120
        big = Image.new("RGB", (320, 240), (230, 230, 230))
        ImageDraw.Draw(big).rectangle((20, 60, 140, 180), fill=(200, 20, 20))
        big.save(images / f"big{t}.png")
    store.upsert_tasks(4, [(t, {"image": str(images / f"big{t}.png")}) for t in (1, 2)])
    older = Boxes(np.array([[80, 0, 160, 40]]), np.array([1]), (160, 120))  # replaced below
    store.upsert_annotation(4, 401, 1, [], older)
    for t in (1, 2):
        drawn = Boxes(np.array([[10, 30, 70, 90]]), np.array([t - 1]), (160, 120))
        store.upsert_annotation(4, 410 + t, t, [], drawn)
    taken: list[Any] = []

    def capture(labels, images_, sketches, config):  # type: ignore[no-untyped-def]
        taken.extend(images_)
        raise RuntimeError("captured")

    monkeypatch.setattr(backend.search, "train_search_model", capture)
    with pytest.raises(RuntimeError, match="captured"):
        train_from_project(
            settings, store, 4, service.studio.image_source_of(4), write_sketches(tmp_path / "sk")
        )
    assert len(taken) == 2  # one per task
    for image, label in zip(taken, (0, 1), strict=True):
        np.testing.assert_allclose(image.boxes, [[10 / 160, 30 / 120, 70 / 160, 90 / 120]])
        assert image.labels.tolist() == [label]


def test_a_task_whose_image_changes_is_searched_by_its_new_image(project) -> None:  # type: ignore[no-untyped-def]
    """A task re-synced with another image kept its old vector in the store and in the saved
    index (which only ever added tasks it lacked): the search scored the picture it had before.
    Here task 1, a disc, comes to show task 2's square and must score as task 2 does."""
    settings, service, _, root = project
    images = root / "images"
    service.setup(6, CONFIG)
    service.store.upsert_tasks(6, [(t, {"image": str(images / f"{t}.png")}) for t in range(1, 7)])
    square = {"box": {"x": 5, "y": 25, "width": 40, "height": 50}, "label": "square"}
    with TestClient(create_app(settings, service)) as client:

        def scores() -> dict[int, float]:
            answer = client.post("/projects/6/search", json={"objects": [square], "k": 6})
            assert answer.status_code == 200, answer.text
            return {r["task"]: r["score"] for r in answer.json()["results"]}

        before = scores()
        assert abs(before[1] - before[2]) > 1e-3  # a disc and a square
        service.store.upsert_tasks(6, [(1, {"image": str(images / "2.png")})])
        after = scores()
        # a task deleted in Label Studio leaves the results and the order a search puts first
        front = {"objects": [square], "k": 2, "front": True}
        assert client.post("/projects/6/search", json=front).status_code == 200
        service.store.remove_tasks(6, [3])
        moved = client.post("/projects/6/search", json=front).json()
        assert 3 not in scores() and moved["moved_to_front"]
        order = service.store.get_order(6)
        assert order is not None and sorted(order.task_ids) == [1, 2, 4, 5, 6]
    assert after[1] == pytest.approx(after[2], abs=1e-5)
    assert {t: s for t, s in after.items() if t != 1} == pytest.approx(
        {t: s for t, s in before.items() if t != 1}, abs=1e-5
    )
