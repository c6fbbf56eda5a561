"""HTTP-level figures of the served backend, measured in one run on this machine.

Starts ``boxloop serve`` as a subprocess (as users run it), then measures over HTTP:

* ``/predict`` latency p50/p95 for one 640 px image and for a batch of 8, with a trained version;
* webhook acknowledgement p50/p99 while a training job runs in the background;
* training seconds per epoch per 50 images (from the job's own timestamps);
* peak resident memory of the server and of the training worker;
* the load average (1, 5, 15 min) before and after, as every results file records it.

Usage: ``.venv/bin/python -m benchmark.backend_speed [--images 50] [--out benchmark/results/backend_speed.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image
from tqdm import tqdm

LABEL_CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Square"/><Label value="Disc"/></RectangleLabels>
</View>"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _images(root: Path, n: int, seed: int = 0) -> list[tuple[Path, list[tuple[str, list[int]]]]]:
    """640x480 images with one to three shapes (squares and discs) on textured noise."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        pixels = rng.integers(40, 160, size=(480, 640, 3), dtype=np.uint8)
        objects = []
        for _ in range(int(rng.integers(1, 4))):
            label = ("Square", "Disc")[int(rng.integers(0, 2))]
            side = int(rng.integers(60, 160))
            x0, y0 = int(rng.integers(0, 640 - side)), int(rng.integers(0, 480 - side))
            if label == "Square":
                pixels[y0 : y0 + side, x0 : x0 + side] = (220, 50, 50)
            else:
                yy, xx = np.ogrid[:480, :640]
                r = side / 2
                pixels[(yy - y0 - r) ** 2 + (xx - x0 - r) ** 2 <= r * r] = (50, 50, 220)
            objects.append((label, [x0, y0, x0 + side, y0 + side]))
        path = root / f"img{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        out.append((path, objects))
    return out


def _annotation(i: int, path: Path, objects: list[tuple[str, list[int]]]) -> dict[str, Any]:
    result = [
        {
            "from_name": "label",
            "to_name": "image",
            "type": "rectanglelabels",
            "original_width": 640,
            "original_height": 480,
            "value": {
                "x": b[0] / 6.4,
                "y": b[1] / 4.8,
                "width": (b[2] - b[0]) / 6.4,
                "height": (b[3] - b[1]) / 4.8,
                "rotation": 0,
                "rectanglelabels": [label],
            },
        }
        for label, b in objects
    ]
    return {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1000 + i, "task": i + 1, "result": result},
        "task": {"id": i + 1, "data": {"image": str(path)}},
        "project": {"id": 1, "label_config": LABEL_CONFIG},
    }


class PeakRss(threading.Thread):
    """Samples the RSS of a process and its children every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.server_peak = 0
        self.worker_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.server_peak = max(self.server_peak, self.process.memory_info().rss)
                for child in self.process.children(recursive=True):
                    self.worker_peak = max(self.worker_peak, child.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _wait_job(client: httpx.Client, status: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = client.get("/status").json()["projects"][0]["training_jobs"]
        if jobs and jobs[0]["status"] in status:
            return jobs[0]
        time.sleep(0.2)
    raise TimeoutError(f"no job reached {status}")


def _load_average() -> list[float]:
    """1, 5 and 15 minute load averages: figures taken beside other jobs are pessimistic."""
    return [round(x, 2) for x in os.getloadavg()]


def _coco_model() -> Path | None:
    """The shared COCO YOLOX-Nano the default detector fine-tunes (None: not beside the repo)."""
    root = Path(os.environ.get("BOXLOOP_SHARED_DATA", "../shared/data"))
    path = (root / "models" / "yolox_nano_coco" / "yolox_nano.onnx").resolve()
    return path if path.is_file() else None


def server_env(work: Path, n_images: int, detector: str, epochs: int = 4) -> dict[str, str]:
    """``boxloop serve``'s environment: state under ``work``, training after ``n_images``
    annotations with ``detector`` (the YOLOX default gets the shared COCO model)."""
    env = dict(os.environ)
    env.update(
        {
            "BOXLOOP_DATA_DIR": str(work / "data"),
            "BOXLOOP_ALLOWED_LOCAL_ROOTS": str(work / "images"),
            "BOXLOOP_TRAIN_AFTER_NEW_ANNOTATIONS": str(n_images),
            "BOXLOOP_TRAIN_EPOCHS": str(epochs),
            "BOXLOOP_RECONCILE_ON_STARTUP": "false",
            "BOXLOOP_LOG_LEVEL": "WARNING",
            "BOXLOOP_DETECTOR": detector,
        }
    )
    if detector == "yolox_nano":
        model = _coco_model()
        if model is None:
            raise SystemExit("the YOLOX default needs the COCO model: set BOXLOOP_SHARED_DATA")
        env["BOXLOOP_ONNX_MODEL_PATH"] = str(model)
    return env


def start_server(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``boxloop serve`` as users run it; returns it and its URL once /health answers."""
    port = _free_port()
    with open(work / "server.log", "wb") as server_log:
        server = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=server_log,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise RuntimeError(f"boxloop serve did not answer /health; see {work / 'server.log'}")


def run(
    n_images: int, epochs: int, repeats: int, out: Path, detector: str = "yolox_nano"
) -> dict[str, Any]:
    load_before = _load_average()
    work = Path(tempfile.mkdtemp(prefix="boxloop-speed-"))
    dataset = _images(work / "images", n_images + 8)
    env = server_env(work, n_images, detector, epochs)
    server, url = start_server(work, env)
    rss = PeakRss(server.pid)
    rss.start()
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            client.post("/setup", json={"project": 1, "schema": LABEL_CONFIG})
            for i, (path, objects) in enumerate(dataset[:n_images]):
                client.post("/webhook", json=_annotation(i, path, objects))
            job = _wait_job(client, ("running",), 60)
            acks: list[float] = []
            extra = 0
            # webhooks (re-deliveries of stored annotations, new ids) while the job runs
            while client.get(f"/jobs/{job['id']}").json()["status"] == "running":
                path, objects = dataset[extra % n_images]
                payload = _annotation(10_000 + extra, path, objects)
                started = time.perf_counter()
                answer = client.post("/webhook", json=payload)
                acks.append(1000 * (time.perf_counter() - started))
                assert answer.status_code == 200, answer.text
                extra += 1
                time.sleep(0.05)
            final = client.get(f"/jobs/{job['id']}").json()
            if final["status"] != "succeeded":
                raise RuntimeError(f"training failed: {final}")
            # wait for the swap so /predict uses the trained version
            version = final["model_version"]
            for _ in range(100):
                if (
                    client.post("/setup", json={"project": 1, "schema": LABEL_CONFIG}).json()[
                        "model_version"
                    ]
                    == version
                ):
                    break
                time.sleep(0.2)
            held_out = [str(p) for p, _ in dataset[n_images:]]
            tasks1 = [{"id": 1, "data": {"image": held_out[0]}}]
            tasks8 = [{"id": i, "data": {"image": p}} for i, p in enumerate(held_out[:8])]
            body = {"project": 1, "label_config": LABEL_CONFIG}
            client.post("/predict", json={**body, "tasks": tasks1})  # warm-up
            one, eight = [], []
            for _ in tqdm(range(repeats), desc="/predict x1"):
                started = time.perf_counter()
                answer = client.post("/predict", json={**body, "tasks": tasks1})
                one.append(1000 * (time.perf_counter() - started))
                assert answer.json()["results"][0]["model_version"] == version
            for _ in tqdm(range(max(5, repeats // 3)), desc="/predict x8"):
                started = time.perf_counter()
                client.post("/predict", json={**body, "tasks": tasks8})
                eight.append(1000 * (time.perf_counter() - started))
        train_seconds = _job_seconds(work / "data" / "boxloop.db", job["id"])
    finally:
        rss.stop.set()
        server.terminate()
        server.wait(30)
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": 2,
            "load_average_1_5_15": {"before": load_before, "after": _load_average()},
        },
        "detector": detector,
        "images": {"size": [640, 480], "train_images": n_images, "epochs": epochs},
        "predict_ms_1_image": {"p50": _pct(one, 50), "p95": _pct(one, 95), "n": len(one)},
        "predict_ms_batch_8": {
            "p50": _pct(eight, 50),
            "p95": _pct(eight, 95),
            "n": len(eight),
            "per_image_p50": _pct(eight, 50) / 8,
        },
        "webhook_ack_ms_during_training": {
            "p50": _pct(acks, 50),
            "p99": _pct(acks, 99),
            "max": max(acks),
            "n": len(acks),
        },
        "training": {
            "job_seconds": train_seconds,
            "seconds_per_epoch_per_50_images": train_seconds / epochs * 50 / n_images,
        },
        "peak_rss_mib": {
            "server": rss.server_peak / 2**20,
            "training_worker": rss.worker_peak / 2**20,
        },
        "goals": {"predict_p50_ms": 150, "webhook_ack_ms": 50},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _job_seconds(db: Path, job_id: int) -> float:
    import sqlite3

    with sqlite3.connect(db) as conn:
        started, finished = conn.execute(
            "SELECT started_at, finished_at FROM training_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    from datetime import datetime

    return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=4, help="Faster R-CNN epochs")
    parser.add_argument(
        "--detector", default="yolox_nano", help="BOXLOOP_DETECTOR of the served backend"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/backend_speed.json"))
    args = parser.parse_args(argv)
    results = run(args.images, args.epochs, args.repeats, args.out, args.detector)
    rows = [
        (
            "/predict 1 image p50 / p95 (ms)",
            f"{results['predict_ms_1_image']['p50']:.0f} / {results['predict_ms_1_image']['p95']:.0f}",
        ),
        (
            "/predict batch of 8 p50 / p95 (ms)",
            f"{results['predict_ms_batch_8']['p50']:.0f} / {results['predict_ms_batch_8']['p95']:.0f}",
        ),
        (
            "webhook ack during training p50 / p99 (ms)",
            f"{results['webhook_ack_ms_during_training']['p50']:.1f} / {results['webhook_ack_ms_during_training']['p99']:.1f}",
        ),
        (
            "training s / epoch / 50 images",
            f"{results['training']['seconds_per_epoch_per_50_images']:.1f}",
        ),
        (
            "peak RSS server / worker (MiB)",
            f"{results['peak_rss_mib']['server']:.0f} / {results['peak_rss_mib']['training_worker']:.0f}",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
