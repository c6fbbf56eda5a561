"""Bulk pre-annotation against a real Label Studio, and the backend's latency under load.

Starts a Label Studio (``scripts/labelstudio.sh``, its own data dir) and ``boxloop serve`` as
users run them, then measures over HTTP:

* **bulk**: ``POST /projects/{id}/bulk-predict`` over N tasks (default 1,000) until every task
  holds a prediction of the serving version in Label Studio: seconds and tasks/s, in process
  and (``--ray``) on a local two-node Ray cluster;
* **load**: webhook acknowledgement and ``/predict`` (one image) latency p50/p99, first idle,
  then while a bulk run and a training job both run.

Images: the shared VOC2012 and COCO subsets' real JPEGs, cycled (hard links) to N task files,
so tasks are distinct to Label Studio while the pixels repeat; the report says how many are
distinct. Usage: ``.venv/bin/python -m benchmark.bulk_speed [--tasks 1000] [--ray]``
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from label_studio_sdk import LabelStudio
from PIL import Image

from backend.labelstudio.client import StudioClient
from benchmark.backend_speed import _free_port, _load_average, _pct, server_env, start_server

REPO = Path(__file__).resolve().parents[1]
LABELS = ["person", "car", "dog", "cat", "bird", "chair", "bottle", "bicycle", "horse", "bus"]
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</RectangleLabels></View>"
)


def shared_images() -> list[Path]:
    root = Path(os.environ.get("BOXLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))
    found = sorted((root / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))
    found += sorted((root / "coco").rglob("*.jpg"))
    if not found:
        raise SystemExit(f"no shared images under {root} (set BOXLOOP_SHARED_DATA)")
    return found


@contextmanager
def label_studio(work: Path) -> Iterator[tuple[str, str, Path]]:
    """A Label Studio on a free port: ``(url, token, files_root)``."""
    files_root = work / "files"
    files_root.mkdir(parents=True)
    token = secrets.token_hex(20)
    port = _free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
    }
    subprocess.run([str(REPO / "scripts" / "labelstudio.sh"), "install"], check=True)
    with open(work / "labelstudio.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(REPO / "scripts" / "labelstudio.sh"),
                "start",
                "--port",
                str(port),
                "--data-dir",
                str(work / "ls-data"),
                "--files-root",
                str(files_root),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Label Studio did not start; see {work / 'labelstudio.log'}")
            time.sleep(1)
        yield url, token, files_root
    finally:
        os.killpg(process.pid, 15)
        process.wait(30)


def make_project(ls: LabelStudio, files_root: Path, name: str, images: list[Path], n: int) -> int:
    """A project of ``n`` image tasks, imported through a local storage."""
    folder = files_root / name
    folder.mkdir()
    for i in range(n):
        source = images[i % len(images)]
        target = folder / f"{i:06d}_{source.name}"
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    project = ls.projects.create(title=f"bulk {name}", label_config=LABEL_CONFIG)
    assert project.id is not None
    storage = ls.import_storage.local.create(
        project=project.id, path=str(folder), regex_filter=r".*\.jpg$", use_blob_urls=True
    )
    assert storage.id is not None
    ls.import_storage.local.sync(id=storage.id)
    return project.id


def bulk_run(client: httpx.Client, project_id: int, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    answer = client.post(
        f"/projects/{project_id}/bulk-predict", params={"wait": "true"}, json=body, timeout=3600
    )
    answer.raise_for_status()
    report = dict(answer.json())
    report["wall_s"] = time.perf_counter() - started
    return report


def _region(task: dict[str, Any]) -> dict[str, Any]:
    """One box, as Label Studio stores it (percent of the image, its size beside)."""
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": task["size"][0],
        "original_height": task["size"][1],
        "value": {"x": 10, "y": 10, "width": 30, "height": 40, "rectanglelabels": ["person"]},
    }


def _annotation(project_id: int, task: dict[str, Any], number: int) -> dict[str, Any]:
    """A webhook as Label Studio sends it for a new annotation."""
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": number, "task": task["id"], "result": [_region(task)]},
        "task": {"id": task["id"], "data": task["data"]},
        "project": {"id": project_id, "label_config": LABEL_CONFIG},
    }


def latencies(
    client: httpx.Client,
    project_id: int,
    tasks: list[dict[str, Any]],
    seconds: float,
    first_id: int,
    keep_going: threading.Event | None = None,
) -> dict[str, list[float]]:
    """Alternate webhooks (new annotations) and one-image /predict calls for ``seconds``
    (or while ``keep_going`` is set)."""
    acks: list[float] = []
    predicts: list[float] = []
    body = {"project": project_id, "label_config": LABEL_CONFIG}
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and (keep_going is None or keep_going.is_set()):
        task = tasks[n % len(tasks)]
        started = time.perf_counter()
        answer = client.post("/webhook", json=_annotation(project_id, task, first_id + n))
        acks.append(1000 * (time.perf_counter() - started))
        answer.raise_for_status()
        started = time.perf_counter()
        answer = client.post("/predict", json={**body, "tasks": [task]})
        predicts.append(1000 * (time.perf_counter() - started))
        answer.raise_for_status()
        n += 1
        time.sleep(0.05)
    return {"webhook_ack_ms": acks, "predict_ms": predicts}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": round(_pct(values, 50), 1),
        "p99": round(_pct(values, 99), 1),
        "max": round(max(values), 1),
    }


def run(
    n_tasks: int, use_ray: bool, load_s: float, out: Path, keep: bool = False
) -> dict[str, Any]:
    load_before = _load_average()
    images = shared_images()
    work = Path(tempfile.mkdtemp(prefix="boxloop-bulk-"))
    results: dict[str, Any] = {
        "tasks": n_tasks,
        "distinct_images": min(n_tasks, len(images)),
        "machine": {"cpus": os.cpu_count()},
    }
    cluster = None
    try:
        with label_studio(work) as (url, token, files_root):
            ls = LabelStudio(base_url=url, api_key=token, timeout=300)
            env = server_env(work, 10_000, "yolox_nano")
            env.update(
                {
                    "BOXLOOP_LABEL_STUDIO_URL": url,
                    "BOXLOOP_LABEL_STUDIO_TOKEN": token,
                    "BOXLOOP_ALLOWED_LOCAL_ROOTS": str(files_root),
                    "BOXLOOP_TRAIN_EPOCHS": "3",
                }
            )
            if use_ray:
                from backend.bulk.ray_local import start_local_cluster

                cluster = start_local_cluster(num_nodes=2)
                env["BOXLOOP_RAY_ADDRESS"] = cluster.address
            (work / "images").mkdir(exist_ok=True)
            server, backend_url = start_server(work, env)
            try:
                with httpx.Client(base_url=backend_url, timeout=300) as client:
                    projects = {
                        name: make_project(ls, files_root, name, images, n)
                        for name, n in (
                            ("bulk", n_tasks),
                            ("ray", n_tasks if use_ray else 0),
                            ("load", 60),
                            ("busy", n_tasks),
                        )
                        if n
                    }
                    for pid in projects.values():
                        client.post("/setup", json={"project": pid, "schema": LABEL_CONFIG})
                    client.post("/predict", json={"project": projects["load"], "tasks": []})
                    results["bulk_in_process"] = bulk_run(client, projects["bulk"], {"ray": False})
                    if use_ray:
                        results["bulk_ray"] = bulk_run(client, projects["ray"], {"ray": True})
                    results["load"] = measure_load(
                        client, StudioClient(url, token), files_root, projects, load_s
                    )
            finally:
                server.terminate()
                server.wait(60)
    finally:
        if cluster is not None:
            cluster.stop()
        if keep:
            print(f"logs and state kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_1_5_15"] = {
        "before": load_before,
        "after": _load_average(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def measure_load(
    client: httpx.Client,
    studio: StudioClient,
    files_root: Path,
    projects: dict[str, int],
    seconds: float,
) -> dict[str, Any]:
    """Latencies idle, then while a bulk run (project "busy") and a training job both run."""
    pid = projects["load"]
    tasks = studio.list_tasks(pid)
    for task in tasks:  # the image's size, for the regions' original_width/height
        name = parse_qs(urlsplit(task["data"]["image"]).query)["d"][0]
        with Image.open(files_root / name) as image:
            task["size"] = image.size
    idle = latencies(client, pid, tasks, seconds, first_id=1_000_000)
    # annotations in Label Studio to train on (a training job reconciles with it first, so the
    # synthetic webhooks above are tombstoned), then a training job and a bulk run at once
    for task in tasks[:40]:
        studio.sdk.annotations.create(id=task["id"], result=[_region(task)])
    client.post("/train", json={"project": pid}).raise_for_status()
    busy = threading.Event()
    busy.set()
    bulk: dict[str, Any] = {}

    def run_bulk() -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=3600) as own:
            bulk.update(bulk_run(own, projects["busy"], {"ray": False}))
        busy.clear()

    seen: list[dict[str, Any]] = []

    def watch_training() -> None:  # what the training job did while latencies were taken
        with httpx.Client(base_url=str(client.base_url), timeout=60) as own:
            while busy.is_set():
                projects_now = own.get("/status").json()["projects"]
                jobs = next(p for p in projects_now if p["id"] == pid)["training_jobs"]
                if jobs:
                    seen.append({"t": time.monotonic(), **jobs[0]})
                time.sleep(2)

    worker = threading.Thread(target=run_bulk, daemon=True)
    worker.start()
    threading.Thread(target=watch_training, daemon=True).start()
    time.sleep(2)  # the run has listed its tasks and is fetching
    loaded = latencies(client, pid, tasks, seconds, first_id=2_000_000, keep_going=busy)
    worker.join()
    running = [s for s in seen if s["status"] == "running"]
    training = {
        "statuses_seen": sorted({s["status"] for s in seen}),
        "running_s_during_measurement": (running[-1]["t"] - running[0]["t"]) if running else 0,
        "last": seen[-1] if seen else None,
    }
    return {
        "idle": {k: _summary(v) for k, v in idle.items()},
        "bulk_and_training": {k: _summary(v) for k, v in loaded.items()},
        "training_job_during": training,
        "bulk_during": bulk,
        "goal_webhook_ack_p99_ms": 50,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--ray", action="store_true", help="also run on a local 2-node Ray cluster")
    parser.add_argument("--load-seconds", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmark/results/scale/bulk_speed.json"
    )
    args = parser.parse_args(argv)
    results = run(args.tasks, args.ray, args.load_seconds, args.out, args.keep)
    print(json.dumps({k: v for k, v in results.items() if k != "load"}, indent=2, default=str))
    print(json.dumps(results["load"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
