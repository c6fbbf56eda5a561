"""Detector speed on this CPU: inference latency, training time per epoch, and the CPU levers.

Run (one process; writes ``benchmark/results/detector_speed.json`` and prints a table)::

    .venv/bin/python -m benchmark.detector_speed            # ~5-10 min on 2 cores
    .venv/bin/python -m benchmark.detector_speed --accuracy # + mAP of levers on vs off (~+20 min)

What it measures, all with ``settings.num_threads`` torch/onnxruntime threads:

* ``TorchDetector.predict`` (default EfficientNet-Lite0 Faster R-CNN, default settings) on one
  640 × 480 image and on a batch of 8, untrained and after a short training (p50 / p95);
* the COCO YOLOX-Nano ONNX detector on the same image;
* training seconds per epoch for 50 images of 640 px (raccoon photos from the shared data, resized;
  synthetic rectangles if the shared data is absent) with the levers on (frozen body, 128 RoIs,
  cached body features), partly on, and off (body trainable, torchvision's 512 RoIs, no cache);
* with ``--accuracy``: mAP@0.5 on held-out raccoon photos after the same training budget with the
  levers on and off, so their cost in accuracy is on the record;
* peak resident memory of the process.

The machine is shared: the JSON records the load average before and after, and process CPU time
beside wall time for the training epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

import backend
from backend.boxes import Boxes
from backend.detectors import (
    ArchSpec,
    OnnxYoloxDetector,
    TorchDetector,
    build_model,
)
from backend.scoring import evaluate_map
from backend.settings import Settings, load_settings
from backend.training import TrainConfig, TrainSample, train_detector
from benchmark.datasets import default_shared_data, load_voc

RESULTS = Path(__file__).resolve().parent / "results" / "detector_speed.json"


@dataclass(frozen=True)
class Workload:
    name: str
    labels: list[str]
    train: list[TrainSample]
    test: list[tuple[Image.Image, Boxes]]
    probe: Image.Image  # the 640 × 480 latency image


def _resize_long_side(
    image: Image.Image, boxes: Boxes, long_side: int
) -> tuple[Image.Image, Boxes]:
    scale = long_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    resized = image.resize(size, Image.Resampling.BILINEAR)
    return resized, Boxes(boxes.xyxy * scale, boxes.labels, size, None, boxes.ignore)


def _raccoon(root: Path, n_train: int, n_test: int) -> Workload | None:
    path = root / "voc" / "raccoon"
    if not path.is_dir():
        return None
    dataset = load_voc(path)
    pairs = [_resize_long_side(s.load_image(), s.boxes, 640) for s in dataset.samples]
    train = [TrainSample(image, boxes) for image, boxes in pairs[:n_train]]
    test = pairs[n_train : n_train + n_test]
    probe = dataset.samples[0].load_image().resize((640, 480), Image.Resampling.BILINEAR)
    return Workload(f"raccoon ({path})", list(dataset.labels), train, test, probe)


def _synthetic(n_train: int, n_test: int) -> Workload:
    rng = np.random.default_rng(0)
    colours = [(230, 40, 40), (40, 200, 40), (40, 60, 230)]

    def one() -> tuple[Image.Image, Boxes]:
        image = Image.fromarray(rng.integers(60, 190, (480, 640, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        xyxy, labels = [], []
        for k in range(3):
            x0, y0 = 40 + 200 * k, int(rng.integers(20, 300))
            w, h = (int(v) for v in rng.integers(60, 160, 2))
            label = int(rng.integers(0, 3))
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colours[label])
            xyxy.append([x0, y0, x0 + w + 1, y0 + h + 1])
            labels.append(label)
        return image, Boxes(np.array(xyxy, np.float32), np.array(labels), (640, 480))

    pairs = [one() for _ in range(n_train + n_test)]
    train = [TrainSample(image, boxes) for image, boxes in pairs[:n_train]]
    return Workload(
        "synthetic rectangles", ["red", "green", "blue"], train, pairs[n_train:], pairs[0][0]
    )


def _percentiles(wall_s: Sequence[float], cpu_s: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(wall_s) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "min_ms": round(float(ms.min()), 1),
        # process CPU time: robust to other tenants at 1 thread; includes spin-waits at 2
        "cpu_p50_ms": round(float(np.percentile(np.asarray(cpu_s) * 1000.0, 50)), 1),
        "n": len(ms),
    }


def _latency(call: Callable[[], object], repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        call()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return _percentiles(wall, cpu)


def _detector_latency(detector: TorchDetector, probe: Image.Image, repeats: int) -> dict[str, Any]:
    batch = [probe] * 8
    single = _latency(lambda: detector.predict([probe]), repeats)
    eight = _latency(lambda: detector.predict(batch), max(3, repeats // 6), warmup=1)
    return {
        "one_image": single,
        "batch_of_8": eight,
        "batch_of_8_per_image_p50_ms": round(eight["p50_ms"] / 8, 1),
        "boxes_on_probe": len(detector.predict([probe])[0]),
    }


def _train_timed(
    workload: Workload, config: TrainConfig
) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    """Train and time each epoch (wall and process CPU seconds) from the progress callback."""
    steps_per_epoch = -(-len(workload.train) // config.batch_size)
    marks: list[tuple[float, float]] = [(time.perf_counter(), time.process_time())]
    step = 0

    def progress(fraction: float, message: str) -> None:
        nonlocal step
        step += 1
        if step % steps_per_epoch == 0:
            marks.append((time.perf_counter(), time.process_time()))

    model = train_detector(workload.train, workload.labels, config, progress=progress)
    epochs = []
    per_50 = 50.0 / len(workload.train)
    for (w0, c0), (w1, c1) in pairwise(marks):
        epochs.append(
            {"wall_s_per_50_images": round((w1 - w0) * per_50, 1), "cpu_s": round(c1 - c0, 1)}
        )
    return model, epochs


LEVERS: dict[str, dict[str, Any]] = {
    "on": {
        "freeze_backbone_body": True,
        "box_batch_size_per_image": 128,
        "cache_body_features": True,
    },
    "frozen_128_no_cache": {
        "freeze_backbone_body": True,
        "box_batch_size_per_image": 128,
        "cache_body_features": False,
    },
    "off": {
        "freeze_backbone_body": False,
        "box_batch_size_per_image": 512,
        "cache_body_features": False,
    },
}


def _map50(model: torch.nn.Module, workload: Workload, settings: Settings) -> dict[str, Any]:
    detector = TorchDetector(  # served resize rule and cap; mAP needs the low-score tail
        model,
        workload.labels,
        "eval",
        min_size=settings.detector_min_size,
        max_size=settings.detector_max_size,
        score_threshold=0.01,
        max_detections=settings.max_detections,
    )
    images = [image for image, _ in workload.test]
    preds = detector.predict(images)
    result = evaluate_map([boxes for _, boxes in workload.test], preds, workload.labels)
    return {"map50": round(result.map50, 4), "map50_95": round(result.map50_95, 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = load_settings()
    threads = args.threads or settings.num_threads
    torch.set_num_threads(threads)
    root = default_shared_data()
    workload = _raccoon(root, args.train_images, args.test_images) or _synthetic(
        args.train_images, args.test_images
    )
    base = TrainConfig.from_settings(settings, threads=threads, batch_size=4, seed=0)
    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "boxloop": backend.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        },
        "workload": {
            "name": workload.name,
            "train_images": len(workload.train),
            "probe_size": list(workload.probe.size),
        },
        "settings": {
            "detector_min_size": settings.detector_min_size,
            "detector_max_size": settings.detector_max_size,
            "score_threshold": settings.score_threshold,
            "max_detections": settings.max_detections,
        },
    }
    torch.manual_seed(0)
    spec = ArchSpec("fasterrcnn_effnet_lite0", len(workload.labels) + 1)
    untrained = build_model(spec)
    detector = TorchDetector.from_settings(untrained, workload.labels, "untrained", settings)
    out["predict_untrained"] = _detector_latency(detector, workload.probe, args.repeats)
    plain = TorchDetector(
        untrained,
        workload.labels,
        "plain",
        min_size=settings.detector_min_size,
        max_size=settings.detector_max_size,
        score_threshold=settings.score_threshold,
        fuse=False,
        channels_last=False,
        rpn_pre_nms_top_n=1000,
        rpn_post_nms_top_n=1000,
    )
    out["predict_untrained_without_speedups"] = {
        "note": "no BN folding, NCHW, torchvision's 1000/1000 RPN proposals",
        "one_image": _latency(lambda: plain.predict([workload.probe]), max(5, args.repeats // 3)),
    }

    training: dict[str, Any] = {}
    # untimed warm-up: oneDNN builds kernels per input shape on first use, and the photos have
    # many shapes; without this the first timed configuration pays for all of them
    warm = replace(base, **LEVERS["frozen_128_no_cache"], epochs=1)
    _, warmup_epochs = _train_timed(workload, warm)
    training["untimed_warmup_epoch"] = warmup_epochs[0]
    trained: torch.nn.Module | None = None
    for name, levers in LEVERS.items():
        if name in args.skip_levers:
            continue
        epochs = args.epochs if name == "on" else 1
        config = replace(base, **levers, epochs=epochs)
        model, per_epoch = _train_timed(workload, config)
        training[name] = {"levers": levers, "epochs": per_epoch}
        if name == "on":
            trained = model
    if "on" in training and "off" in training:
        on = training["on"]["epochs"]
        steady = on[-1]["wall_s_per_50_images"]
        off = training["off"]["epochs"][0]["wall_s_per_50_images"]
        training["speedup_off_over_on_first_epoch"] = round(off / on[0]["wall_s_per_50_images"], 2)
        training["speedup_off_over_on_cached_epoch"] = round(off / steady, 2)
    out["training"] = training

    if trained is not None:
        detector = TorchDetector.from_settings(trained, workload.labels, "trained", settings)
        out["predict_after_short_training"] = _detector_latency(
            detector, workload.probe, args.repeats
        )

    onnx = settings.onnx_model_path or root / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if Path(onnx).is_file():
        yolox = OnnxYoloxDetector.from_path(Path(onnx), num_threads=threads)
        out["yolox_onnx"] = {
            "model": str(onnx),
            "one_image": _latency(lambda: yolox.predict([workload.probe]), args.repeats),
        }
    else:
        out["yolox_onnx"] = {"skipped": f"{onnx} not found"}

    if args.accuracy:
        out["accuracy"] = _accuracy(workload, base, settings, args.accuracy_epochs)

    out["memory"] = {
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_now_mib": round(psutil.Process().memory_info().rss / 2**20, 1),
    }
    out["machine"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return out


def _accuracy(
    workload: Workload, base: TrainConfig, settings: Settings, epochs: int
) -> dict[str, Any]:
    results: dict[str, Any] = {"test_images": len(workload.test), "epochs": epochs}
    for name in ("on", "off"):
        config = replace(base, **LEVERS[name], epochs=epochs)
        start, cpu = time.perf_counter(), time.process_time()
        model = train_detector(workload.train, workload.labels, config)
        results[name] = {
            **_map50(model, workload, settings),
            "train_wall_s": round(time.perf_counter() - start, 1),
            "train_cpu_s": round(time.process_time() - cpu, 1),
        }
    return results


def _table(out: dict[str, Any]) -> str:
    rows = [("measure", "value")]
    for key in ("predict_untrained", "predict_after_short_training"):
        if key in out:
            one, eight = out[key]["one_image"], out[key]["batch_of_8"]
            rows.append((f"{key}: 1 image p50/p95 ms", f"{one['p50_ms']} / {one['p95_ms']}"))
            rows.append((f"{key}: batch 8 p50/p95 ms", f"{eight['p50_ms']} / {eight['p95_ms']}"))
    plain = out["predict_untrained_without_speedups"]["one_image"]
    rows.append(
        ("predict without speedups: 1 image p50/p95 ms", f"{plain['p50_ms']} / {plain['p95_ms']}")
    )
    if "one_image" in out["yolox_onnx"]:
        one = out["yolox_onnx"]["one_image"]
        rows.append(("yolox onnx: 1 image p50/p95 ms", f"{one['p50_ms']} / {one['p95_ms']}"))
    for name, item in out["training"].items():
        if name == "untimed_warmup_epoch":
            rows.append(("train warm-up epoch (untimed config)", str(item["wall_s_per_50_images"])))
        elif isinstance(item, dict):
            per = ", ".join(str(e["wall_s_per_50_images"]) for e in item["epochs"])
            rows.append((f"train levers {name}: s/epoch/50 img", per))
        else:
            rows.append((name, str(item)))
    for name in ("on", "off"):
        if "accuracy" in out and name in out["accuracy"]:
            acc = out["accuracy"][name]
            rows.append((f"mAP@0.5 levers {name}", f"{acc['map50']} ({acc['train_wall_s']} s)"))
    rows.append(("peak RSS MiB", str(out["memory"]["peak_rss_mib"])))
    rows.append(
        (
            "loadavg before / after",
            f"{out['machine']['loadavg_before']} / {out['machine']['loadavg_after']}",
        )
    )
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0, help="default: settings.num_threads")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-images", type=int, default=50)
    parser.add_argument("--test-images", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=2, help="levers-on training epochs")
    parser.add_argument("--skip-levers", nargs="*", default=[], choices=sorted(LEVERS))
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--accuracy-epochs", type=int, default=6)
    args = parser.parse_args(argv)
    out = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(_table(out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
