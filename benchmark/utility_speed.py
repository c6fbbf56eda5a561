"""Utility predictor throughput: onnxruntime vs eager PyTorch, same process, 224 px.

The goal (issue 15) is ≥ 100 images/s through onnxruntime on this machine. Both paths start from
decoded RGB images and include the preprocessing (whole-image resize to 224 px, normalisation),
so the figure is what a caller of :class:`backend.utility.predictor.UtilityPredictor` gets.
The predictor's weights do not change its speed: an untrained top is exported.

    .venv/bin/python -m benchmark.utility_speed --images 256 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.features.base import preprocess
from backend.nets.effnet_lite0 import imagenet_normalization
from backend.utility.predictor import UtilityNet, UtilityPredictor, export_predictor


def _images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
        for _ in range(count)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/utility/speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = _images(args.images)
    net = UtilityNet().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_predictor(net, Path(tmp) / "utility.onnx")
        predictor = UtilityPredictor(path, batch_size=args.batch_size, num_threads=args.threads)
        predictor.predict_proba(images[: args.batch_size])  # warm-up
        onnx_times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            onnx_proba = predictor.predict_proba(images)
            onnx_times.append(time.perf_counter() - start)
    mean, std = imagenet_normalization()
    net = net.to(memory_format=torch.channels_last)
    eager_times = []
    eager_proba = np.zeros(0)
    with torch.no_grad():
        for _ in range(args.repeats):
            start = time.perf_counter()
            chunks = []
            for begin in range(0, len(images), args.batch_size):
                batch = preprocess(images[begin : begin + args.batch_size], (224, 224), mean, std)
                x = torch.from_numpy(batch).to(memory_format=torch.channels_last)
                chunks.append(torch.softmax(net(x), dim=1)[:, 1].numpy())
            eager_proba = np.concatenate(chunks)
            eager_times.append(time.perf_counter() - start)
    onnx_rate = args.images / min(onnx_times)
    eager_rate = args.images / min(eager_times)
    result = {
        "images": args.images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "input": "640×480 decoded RGB → 224×224",
        "onnx_images_per_s": round(onnx_rate, 1),
        "eager_pytorch_channels_last_images_per_s": round(eager_rate, 1),
        "ratio_onnx_over_eager": round(onnx_rate / eager_rate, 2),
        "goal_100_images_per_s": onnx_rate >= 100,
        "max_abs_probability_difference": float(np.abs(onnx_proba - eager_proba).max()),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
