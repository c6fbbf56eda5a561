"""Memory and time of a training job's images: held decoded, or kept encoded past the budget.

A training job gathered every annotated image decoded (``backend.training_job.gather_samples``),
so a project of a few thousand full-HD frames took more memory than the machine had. Past
``BOXLOOP_TRAINING_IMAGE_MEMORY_MB`` an image now stays as its file's bytes and is decoded at
each use. This measures, through the product's own gather and training code, each in a fresh
process: the resident memory the gathered images take, the seconds the gather takes, and the
seconds of YOLOX-Nano training epochs on them (where the decoding is paid), with the budget
large (everything decoded, as before) and zero (everything encoded).

The images are synthetic JPEGs (quality 90) of smooth shading, noise and rectangles, at a
camera's 1280x720 by default, since only their sizes and the decoding matter here.

Usage::

    python -m benchmark.training_memory [--images 300] [--out benchmark/results/training_memory.json]

Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DECODED, ENCODED = "decoded (budget 4096 MiB)", "encoded (budget 0)"
RUNS = ((DECODED, 4096), (ENCODED, 0))
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image"><Label value="box"/></RectangleLabels></View>'
)


def write_images(root: Path, n: int, width: int, height: int) -> list[tuple[Path, np.ndarray]]:
    """``n`` JPEGs with one to four rectangles each; returns each path and its xyxy boxes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for i in range(n):
        shade = (xx * rng.uniform(0.05, 0.2) + yy * rng.uniform(0.05, 0.2)) % 255
        pixels = np.stack([shade, shade[::-1], shade[:, ::-1]], axis=-1)
        pixels = pixels + rng.normal(0, 8, pixels.shape)
        boxes = []
        for _ in range(int(rng.integers(1, 5))):
            w, h = (int(v) for v in rng.integers(40, 300, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            pixels[y : y + h, x : x + w] = rng.integers(0, 256, 3)
            boxes.append([x, y, x + w, y + h])
        path = root / f"frame-{i:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        out.append((path, np.array(boxes, np.float32)))
    return out


def _measure(root: str, budget_mb: int, epochs: int, train_images: int) -> dict[str, Any]:
    """RSS growth from gathering, gather seconds, and seconds per training epoch."""
    import psutil
    import torch

    from backend.boxes import Boxes
    from backend.detectors.yolox import YoloxNano
    from backend.labelstudio.convert import parse_label_config
    from backend.settings import load_settings
    from backend.store import Store
    from backend.training.samples import image_like_size, load_sample_image
    from backend.training.yolox_train import (
        YoloxTrainConfig,
        input_shape_for,
        letterbox_tensor,
        train_yolox,
    )
    from backend.training_job import gather_samples

    torch.set_num_threads(1)
    images = json.loads((Path(root) / "boxes.json").read_text())
    data_dir = Path(root) / f"data-{budget_mb}"
    data_dir.mkdir()
    settings = load_settings(
        data_dir=data_dir, allowed_local_roots=[Path(root)], training_image_memory_mb=budget_mb
    )
    store = Store(settings.resolved_database_url)
    store.upsert_project(
        1, label_config=LABEL_CONFIG, from_name="label", to_name="image", image_key="image",
        labels=["box"],
    )  # fmt: skip
    store.upsert_tasks(1, [(i + 1, {"image": path}) for i, (path, _, _) in enumerate(images)])
    for i, (_, (width, height), xyxy) in enumerate(images):
        boxes = Boxes(np.array(xyxy, np.float32), np.zeros(len(xyxy), np.int64), (width, height))
        store.upsert_annotation(1, i + 1, i + 1, [], boxes)
    project = store.get_project(1)
    assert project is not None
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.perf_counter()
    gathered = gather_samples(settings, store, project, parse_label_config(LABEL_CONFIG))
    gather_s = time.perf_counter() - started
    held_mib = (process.memory_info().rss - before) / 2**20
    assert len(gathered.samples) == len(images), gathered.skipped
    config = YoloxTrainConfig(
        input_area=416 * 416, batch_size=8, threads=1, min_epochs=1, max_epochs=epochs
    )
    hw = input_shape_for([image_like_size(sample.image) for sample in gathered.samples], config)
    visits = []  # what each training visit pays before the network: load, letterbox
    for sample in gathered.samples:
        started = time.perf_counter()
        letterbox_tensor(load_sample_image(sample), hw)
        visits.append(time.perf_counter() - started)
    torch.manual_seed(0)  # one starting model for both runs
    init = YoloxNano(num_classes=1).eval()
    started = time.perf_counter()
    train_yolox(gathered.samples[:train_images], init, config, epochs=epochs)
    epoch_s = (time.perf_counter() - started) / epochs
    store.close()
    return {
        "images": len(gathered.samples),
        "gathered_rss_mib": round(held_mib, 1),
        "gather_seconds": round(gather_s, 2),
        "visit_ms": round(1000 * float(np.median(visits)), 2),
        "train_images": min(train_images, len(gathered.samples)),
        "epoch_seconds": round(epoch_s, 2),
    }


def run(n: int, width: int, height: int, epochs: int, train_images: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        written = write_images(root, n, width, height)
        (root / "boxes.json").write_text(
            json.dumps([[str(p), [width, height], b.tolist()] for p, b in written])
        )
        encoded = sum(p.stat().st_size for p, _ in written)
        rows = {}
        for name, budget in RUNS:
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                rows[name] = pool.submit(_measure, tmp, budget, epochs, train_images).result()
    return {
        "what": "memory and time of a training job's images, decoded vs kept encoded",
        "images": n,
        "size": [width, height],
        "decoded_mib": round(n * width * height * 3 / 2**20, 1),
        "encoded_mib": round(encoded / 2**20, 1),
        "epochs": epochs,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "runs": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    width, height = results["size"]
    decoded, encoded = results["runs"][DECODED], results["runs"][ENCODED]
    lines = [
        "# A training job's images: held decoded, or kept encoded past the memory budget",
        "",
        f"`python -m benchmark.training_memory --images {results['images']}`: "
        f"{results['images']} synthetic {width}x{height} JPEGs "
        f"({results['decoded_mib']:.0f} MiB decoded, {results['encoded_mib']:.0f} MiB as files), "
        "gathered by the product's `gather_samples`, then YOLOX-Nano trained "
        f"{results['epochs']} epoch(s) on {decoded['train_images']} of them (1 thread, 416² "
        "input area); each run in a fresh process. Load average at the end: "
        f"{', '.join(str(x) for x in results['load_average'])}.",
        "",
        "| run | memory the gathered images take (MiB, RSS growth) | gather (s) | "
        "a visit's load + letterbox (ms, median) | training epoch (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["runs"].items():
        lines.append(
            f"| {name} | {row['gathered_rss_mib']:.0f} | {row['gather_seconds']:.2f} | "
            f"{row['visit_ms']:.1f} | {row['epoch_seconds']:.2f} |"
        )
    memory = decoded["gathered_rss_mib"] / max(encoded["gathered_rss_mib"], 1e-9)
    visit = encoded["visit_ms"] - decoded["visit_ms"]
    per_image = 1000 * decoded["epoch_seconds"] / max(decoded["train_images"], 1)
    lines += [
        "",
        f"Kept encoded, the images take {memory:.1f}x less memory. Each training visit decodes "
        f"its image again: {visit:.1f} ms more, against {per_image:.0f} ms of training per image "
        f"visited ({100 * visit / per_image:.0f} %). The epochs' times differ by "
        f"{encoded['epoch_seconds'] / max(decoded['epoch_seconds'], 1e-9):.2f}x "
        "(encoded / decoded; a few steps, so noisy).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmark.reports import write_result  # matplotlib: kept out of measured processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/training_memory.json"))
    args = parser.parse_args(argv)
    results = run(args.images, args.width, args.height, args.epochs, args.train_images)
    write_result(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
