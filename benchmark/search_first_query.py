"""The first search of a new pool: computed in the request, or by the background index job.

A search needs every task's search vector (a backbone pass per image). Before the index job
(``POST /projects/{id}/search/index``, or ``TASKS_CREATED``), the first search of a pool paid
for all of them inside the request. This measures, through the HTTP app, on one pool of
generated 640×480 JPEG photos:

- ``cold``: the first search of a project whose tasks were recorded without a job (the old
  behaviour; still what a search does for tasks no job has seen);
- ``job``: the background job's wall time after ``TASKS_CREATED``;
- ``after job``: the first search once the job is done;
- ``during job``: a search sent right after ``TASKS_CREATED`` (it waits for the job, and does
  not compute the vectors a second time beside it).

The search model is a small one trained on the project's own boxes (its size does not change
the backbone pass, which is the cost measured here). Usage::

    python -m benchmark.search_first_query [--images 400] [--out benchmark/results/search/first_query.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from backend.app import create_app
from backend.boxes import Boxes
from backend.search import SearchModelConfig, TrainConfig
from backend.search_service import train_from_project
from backend.service import BoxloopService
from backend.settings import load_settings

LABELS = ("square", "disc")
CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{name}"/>' for name in LABELS)
    + "</RectangleLabels></View>"
)
QUERY = {"objects": [{"box": {"x": 5, "y": 20, "width": 40, "height": 50}, "label": "square"}]}


def _photo(path: Path, kind: int, rng: np.random.Generator) -> tuple[float, ...]:
    """A noisy 640×480 JPEG with a red square on the left or a blue disc on the right."""
    pixels = rng.integers(120, 255, (480, 640, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    left = int(rng.integers(20, 80))
    box = (left, 120, left + 220, 360) if kind == 0 else (380, 120, 600, 360)
    (draw.rectangle if kind == 0 else draw.ellipse)(
        box, fill=(200, 20, 20) if kind == 0 else (20, 20, 200)
    )
    image.save(path, quality=90)
    return tuple(float(v) for v in box)


def write_sketches(directory: Path) -> Path:
    """One Quick-Draw-style file per label (``square``, ``disc``), four drawings each."""
    directory.mkdir(parents=True)
    square = [[[0, 255, 255, 0, 0], [0, 0, 255, 255, 0]]]
    circle = [
        [
            [int(128 + 120 * np.cos(t)) for t in np.linspace(0, 6.3, 20)],
            [int(128 + 120 * np.sin(t)) for t in np.linspace(0, 6.3, 20)],
        ]
    ]
    for name, drawing in zip(LABELS, (square, circle), strict=True):
        lines = [json.dumps({"word": name, "drawing": drawing})] * 4
        (directory / f"{name}.ndjson").write_text("\n".join(lines) + "\n")
    return directory


def train_small_model(
    service: BoxloopService,
    project_id: int,
    sketches: Path,
    *,
    object_steps: int,
    spatial_epochs: int,
    threads: int,
) -> Path:
    """A small search model trained on ``project_id``'s boxes and ``sketches`` (16-d objects):
    enough to search generated squares and discs, quick to train."""
    return train_from_project(
        service.settings,
        service.store,
        project_id,
        service.studio.image_source_of(project_id),
        sketches,
        config=TrainConfig(
            model=SearchModelConfig(object_dim=16, layout_channels=4, index_dim=16, hidden=16),
            object_steps=object_steps,
            spatial_epochs=spatial_epochs,
            spatial_batch=8,
            num_threads=threads,
        ),
    )


def _tasks_created(client: TestClient, project: int, tasks: list[dict[str, Any]]) -> None:
    assert client.post("/setup", json={"project": project, "schema": CONFIG}).status_code == 200
    answer = client.post(
        "/webhook", json={"action": "TASKS_CREATED", "project": project, "tasks": tasks}
    )
    assert answer.status_code == 200, answer.text


def _search(client: TestClient, project: int) -> float:
    start = time.perf_counter()
    answer = client.post(f"/projects/{project}/search", json={**QUERY, "k": 10})
    assert answer.status_code == 200, answer.text
    return time.perf_counter() - start


def run(count: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        boxes = [_photo(images / f"{t}.jpg", t % 2, rng) for t in range(1, count + 1)]
        rows: list[tuple[int, dict[str, Any]]] = [
            (t, {"image": str(images / f"{t}.jpg")}) for t in range(1, count + 1)
        ]
        tasks = [{"id": t, "data": data} for t, data in rows]
        settings = load_settings(
            data_dir=root / "data",
            allowed_local_roots=[images],
            reconcile_on_startup=False,
            train_after_new_annotations=10**6,
            num_threads=threads,
        )
        service = BoxloopService(settings)
        service.setup(1, CONFIG)
        labelled = min(24, count)  # project 1 trains the search model on these
        service.store.upsert_tasks(1, rows[:labelled])
        for t in range(1, labelled + 1):
            service.store.upsert_annotation(
                1, t, t, [], Boxes(np.array([boxes[t - 1]]), np.array([t % 2]), (640, 480))
            )
        sketches = write_sketches(root / "sketches")
        train_small_model(service, 1, sketches, object_steps=40, spatial_epochs=5, threads=threads)
        out: dict[str, Any] = {"images": count, "threads": threads}
        with TestClient(create_app(settings, service)) as client:
            # project 2: its tasks recorded with no job (as before the job existed)
            assert client.post("/setup", json={"project": 2, "schema": CONFIG}).status_code == 200
            service.store.upsert_tasks(2, rows)
            out["cold_first_search_s"] = round(_search(client, 2), 3)
            out["second_search_s"] = round(_search(client, 2), 3)
            # project 3: TASKS_CREATED starts the job; the search comes once it is done
            start = time.perf_counter()
            _tasks_created(client, 3, tasks)
            out["webhook_answer_s"] = round(time.perf_counter() - start, 3)
            while client.get("/projects/3/search/index").json()["state"] not in ("done", "failed"):
                time.sleep(0.05)
            out["job_s"] = round(time.perf_counter() - start, 3)
            out["job_state"] = client.get("/projects/3/search/index").json()
            out["first_search_after_job_s"] = round(_search(client, 3), 3)
            # project 4: a search sent right after TASKS_CREATED waits for the job
            start = time.perf_counter()
            _tasks_created(client, 4, tasks)
            _search(client, 4)
            out["search_during_job_from_webhook_s"] = round(time.perf_counter() - start, 3)
        service.close()
    out["cold_over_after_job"] = round(
        out["cold_first_search_s"] / out["first_search_after_job_s"], 1
    )
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return out


def markdown(result: dict[str, Any]) -> str:
    return (
        "# The first search of a new pool: in the request, or after the background index job\n\n"
        f"`python -m benchmark.search_first_query --images {result['images']}` "
        f"({result['images']} generated 640×480 JPEG photos, {result['threads']} threads, "
        "through the HTTP app; seconds, one run).\n\n"
        "| what | seconds |\n|---|---|\n"
        f"| first search, no job ran (vectors computed in the request) | {result['cold_first_search_s']} |\n"
        f"| second search of that pool | {result['second_search_s']} |\n"
        f"| TASKS_CREATED answered (the job starts behind it) | {result['webhook_answer_s']} |\n"
        f"| background job, TASKS_CREATED to done | {result['job_s']} |\n"
        f"| first search after the job | {result['first_search_after_job_s']} |\n"
        f"| TASKS_CREATED, then a search at once (it waits for the job) | {result['search_during_job_from_webhook_s']} |\n\n"
        f"The first search after the job is {result['cold_over_after_job']}× faster than a cold one.\n"
    )


def main(argv: list[str] | None = None) -> int:
    from benchmark.reports import write_result  # matplotlib: kept out of measured processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmark/results/search/first_query.json")
    )
    args = parser.parse_args(argv)
    result = run(args.images, args.threads)
    write_result(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
