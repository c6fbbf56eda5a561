"""The COCO model's input shape before any training: the file's 416² square against one that
follows each image's aspect ratio (backend setting ``pretrained_input``), zero-shot, every image.

Both detectors are built as the backend builds them
(:func:`backend.detectors.pretrained.load_pretrained`), at the harness's prediction floor, and
scored by the promotion gate's own function (:func:`backend.scoring.validation.score_predictions`):
mAP@0.5 and the share of the simulated annotator's ``W_T`` saved at score thresholds 0.3 / 0.5 /
0.7 (IoU 0.5), over every image of each dataset (pool and held-out split alike; nothing trains).
The difference in ``W_T`` saved at 0.5 gets a 95 % bootstrap interval over images (paired).
Latency: p50 of one image through ``predict`` (letterbox, onnxruntime, NMS), the two modes
interleaved in one process.

Usage::

    python -m benchmark.pretrained_input [--out benchmark/results/pretrained_input.json]

Writes the JSON, a Markdown table beside it, and a bar chart (PNG).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

from backend.detectors.pretrained import load_pretrained
from backend.scoring.validation import score_predictions
from backend.settings import load_settings
from benchmark.datasets import decode_images, expand_path, load_dataset

DATASETS = (
    "voc:$BOXLOOP_SHARED_DATA/voc/VOCdevkit/VOC2012",
    "kitti:$BOXLOOP_SHARED_DATA/kitti/tiny",
    "coco:$BOXLOOP_SHARED_DATA/coco/mini",
)
MODES = ("square", "aspect")
THRESHOLDS = (0.3, 0.5, 0.7)
FLOOR = 0.05  # the harness's prediction_floor


def _bootstrap(diff: np.ndarray, manual: np.ndarray, rounds: int = 2000) -> list[float]:
    """95 % interval of Σdiff / Σmanual over images resampled with replacement (points)."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(diff), (rounds, len(diff)))
    values = 100 * diff[picks].sum(1) / np.maximum(1, manual[picks].sum(1))
    return [round(float(v), 1) for v in np.percentile(values, [2.5, 97.5])]


def run(onnx_model: Path, repeats: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as cache:
        for spec in DATASETS:
            dataset, decoded = decode_images(load_dataset(spec))  # undecodable: skipped
            labels = list(dataset.labels)
            images = [decoded[s.image_id] for s in dataset.samples]
            gts = [s.boxes for s in dataset.samples]
            manual = np.array([len(g.kept()) for g in gts], float)
            per_mode: dict[str, Any] = {}
            for mode in MODES:
                settings = load_settings(
                    data_dir=Path(cache),
                    onnx_model_path=onnx_model,
                    score_threshold=FLOOR,
                    pretrained_input=mode,
                )
                detector = load_pretrained(settings, labels)
                assert detector is not None
                preds = [
                    detector.predict([im])[0]
                    for im in tqdm(images, desc=f"{dataset.name} {mode}", leave=False)
                ]
                score = score_predictions(
                    gts, preds, labels, score_thresholds=THRESHOLDS, ignore_overlap="iou"
                )
                shapes = sorted({detector.input_size_for(im.size) for im in images})
                per_mode[mode] = {
                    "detector": detector,
                    "input_shapes": [list(s) for s in shapes],
                    "map50": round(score.map50, 4),
                    "saved_t": {
                        str(t.score_threshold): round(100 * t.saved_t, 2) for t in score.thresholds
                    },
                    "image_w_t": np.array(score.at(0.5).image_w_t),
                }
            probe = max(images, key=lambda im: im.width / im.height)
            latency: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(repeats):
                for mode in MODES:
                    started = time.perf_counter()
                    per_mode[mode]["detector"].predict([probe])
                    latency[mode].append(1000 * (time.perf_counter() - started))
            diff = per_mode["square"]["image_w_t"] - per_mode["aspect"]["image_w_t"]
            row: dict[str, Any] = {
                "dataset": dataset.name,
                "images": len(images),
                "boxes": int(manual.sum()),
                "skipped_images": [s.to_dict() for s in dataset.skipped],
            }
            for mode in MODES:
                entry = per_mode[mode]
                row[mode] = {
                    "input_shapes": entry["input_shapes"],
                    "map50": entry["map50"],
                    "saved_t_percent": entry["saved_t"],
                    "p50_ms": round(float(np.percentile(latency[mode], 50)), 1),
                }
            row["aspect_minus_square_saved_t_at_0.5"] = {
                "points": round(float(100 * diff.sum() / manual.sum()), 1),
                "ci95": _bootstrap(diff, manual),
            }
            rows.append(row)
    return {
        "what": "zero-shot COCO YOLOX-Nano, square 416x416 input vs aspect-following input",
        "floor": FLOOR,
        "iou_threshold": 0.5,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rows": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# The COCO model's input shape, zero-shot: square 416² vs each image's aspect ratio",
        "",
        "`python -m benchmark.pretrained_input` (every image of each subset; prediction floor "
        f"{results['floor']}, IoU 0.5; p50: the widest image, one at a time, modes interleaved; "
        f"load average after: {results['load_average']}).",
        "",
        "| dataset (images, boxes) | input | mAP@0.5 | W_T saved @0.3 / 0.5 / 0.7 (%) | p50 ms |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        for mode in MODES:
            entry = row[mode]
            shapes = ", ".join("×".join(map(str, s)) for s in entry["input_shapes"][:3])
            if len(entry["input_shapes"]) > 3:
                shapes += f" … ({len(entry['input_shapes'])} shapes)"
            saved = " / ".join(f"{entry['saved_t_percent'][str(t)]:.1f}" for t in THRESHOLDS)
            lines.append(
                f"| {row['dataset']} ({row['images']}, {row['boxes']}) | {mode}: {shapes} | "
                f"{entry['map50']:.3f} | {saved} | {entry['p50_ms']} |"
            )
        delta = row["aspect_minus_square_saved_t_at_0.5"]
        lines.append(
            f"| | aspect − square, W_T saved @0.5 | | {delta['points']:+.1f} points, 95 % "
            f"bootstrap over images [{delta['ci95'][0]:+.1f}, {delta['ci95'][1]:+.1f}] | |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(THRESHOLDS), figsize=(12, 3.6), sharey=True)
    names = [row["dataset"] for row in results["rows"]]
    x = np.arange(len(names))
    for ax, threshold in zip(axes, THRESHOLDS, strict=True):
        for offset, mode in ((-0.2, "square"), (0.2, "aspect")):
            values = [row[mode]["saved_t_percent"][str(threshold)] for row in results["rows"]]
            ax.bar(x + offset, values, 0.4, label=mode)
        ax.set_xticks(x, names)
        ax.set_title(f"score ≥ {threshold}")
        ax.axhline(0, color="black", linewidth=0.5)
    axes[0].set_ylabel("W_T saved (%), τ 0.5, zero-shot")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from benchmark.reports import write_result  # matplotlib: kept out of measured processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onnx-model", default="$BOXLOOP_SHARED_DATA/models/yolox_nano_coco/yolox_nano.onnx"
    )
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/pretrained_input.json"))
    args = parser.parse_args(argv)
    if "BOXLOOP_SHARED_DATA" not in os.environ:
        os.environ["BOXLOOP_SHARED_DATA"] = str(Path("../shared/data").resolve())
    results = run(expand_path(args.onnx_model), args.repeats)
    write_result(args.out, results, markdown(results))
    plot(results, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
