"""Memory and start time of the pretrained model's ``aspect`` input: does each new input shape
cost RAM or time?

Under ``BOXLOOP_PRETRAINED_INPUT=aspect`` onnxruntime sees one input shape per aspect ratio
(a mixed photo set gave 10–11 shapes, ``pretrained_input.md``). This measures the process's
resident memory after serving images of 1, then more and more distinct shapes, for ``aspect``
against ``square`` (always one shape), the seconds the detector takes to load (the first
``aspect`` start exports the dynamic model in a child process), and the latency of the first
call on a new input shape against a repeat call. Each mode runs in its own fresh process, built as the
backend builds it (:func:`backend.detectors.pretrained.load_pretrained`). The images are
synthetic noise at aspect ratios 0.25–4 (640 px wide), since only their shapes matter here.

Usage::

    python -m benchmark.aspect_memory [--out benchmark/results/aspect_memory.json]

Writes the JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.datasets import expand_path

# (row name, mode, cache already holds the dynamic export)
RUNS = (
    ("square", "square", False),
    ("aspect, first start (exports)", "aspect", False),
    ("aspect, export cached", "aspect", True),
)
RATIOS = tuple(float(r) for r in np.geomspace(0.25, 4.0, 25))  # width / height
WIDTH = 640
CHECKPOINTS = (1, 5, 10, 25)  # report RSS after this many distinct ratios


def _measure(onnx_model: str, mode: str, cache: str) -> dict[str, Any]:
    """RSS (MiB) after loading, then after each checkpoint's number of distinct ratios; load
    seconds; median seconds of the first call per ratio (a new shape under ``aspect``) and of
    the repeat call."""
    import time

    import psutil
    from PIL import Image

    from backend.detectors.pretrained import load_pretrained
    from backend.settings import load_settings

    process = psutil.Process()

    def rss() -> float:
        return round(process.memory_info().rss / 2**20, 1)

    rng = np.random.default_rng(0)
    settings = load_settings(
        data_dir=Path(cache), onnx_model_path=Path(onnx_model), pretrained_input=mode
    )
    started = time.perf_counter()
    detector = load_pretrained(settings)
    load_seconds = time.perf_counter() - started
    assert detector is not None
    out: dict[str, Any] = {"loaded_mib": rss(), "load_seconds": round(load_seconds, 2)}
    out["after"] = []
    shapes: set[tuple[int, int]] = set()
    calls: list[list[float]] = [[], []]  # seconds of the first and the repeat call per ratio
    for count, ratio in enumerate(RATIOS, start=1):
        height = max(32, round(WIDTH / ratio))
        image = Image.fromarray(rng.integers(0, 256, (height, WIDTH, 3), dtype=np.uint8))
        for call in calls:  # a second call: anything built lazily on the first is built
            started = time.perf_counter()
            detector.predict([image])
            call.append(time.perf_counter() - started)
        shapes.add(detector.input_size_for((WIDTH, height)))
        if count in CHECKPOINTS:
            out["after"].append({"ratios": count, "input_shapes": len(shapes), "mib": rss()})
    out["first_call_ms"] = round(1000 * float(np.median(calls[0])), 1)
    out["repeat_call_ms"] = round(1000 * float(np.median(calls[1])), 1)
    return out


def run(onnx_model: Path) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        for name, mode, cached in RUNS:
            if not cached:
                for old in Path(cache).rglob("*.onnx"):
                    old.unlink()
            # a fresh process: its RSS is this run's alone (not a Pool: its workers are
            # daemons, and the first aspect start exports in a child process of its own)
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                rows[name] = pool.submit(_measure, str(onnx_model), mode, cache).result()
    return {
        "what": "resident memory of the pretrained detector vs distinct input shapes served",
        "ratios": [round(r, 3) for r in RATIOS],
        "width": WIDTH,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "modes": rows,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Memory of the `aspect` input: resident MiB against distinct input shapes served",
        "",
        "`python -m benchmark.aspect_memory` (synthetic images 640 px wide at aspect ratios "
        "0.25–4; each row in a fresh process; RSS after two calls per image. The first `aspect` "
        "start exports the dynamic model from PyTorch; later starts load the cached export).",
        "",
        "| run | after loading | "
        + " | ".join(f"after {c} ratio{'s' * (c > 1)}" for c in CHECKPOINTS)
        + " |",
        "|---|---|" + "---|" * len(CHECKPOINTS),
    ]
    for name, row in results["modes"].items():
        cells = [f"{a['mib']:.0f} ({a['input_shapes']} shapes)" for a in row["after"]]
        lines.append(f"| {name} | {row['loaded_mib']:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Time: loading the detector, and one image's call (median over the ratios)",
        "",
        "The first call on each ratio is the first on a new input shape under `aspect` "
        "(onnxruntime plans each shape once); the repeat call is the same image again.",
        "",
        "| run | load (s) | first call (ms) | repeat call (ms) |",
        "|---|---|---|---|",
    ]
    for name, row in results["modes"].items():
        lines.append(
            f"| {name} | {row['load_seconds']:.2f} | {row['first_call_ms']:.0f} | "
            f"{row['repeat_call_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from benchmark.reports import write_result  # matplotlib: kept out of measured processes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--onnx-model", default="$BOXLOOP_SHARED_DATA/models/yolox_nano_coco/yolox_nano.onnx"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmark/results/aspect_memory.json"))
    args = parser.parse_args(argv)
    if "BOXLOOP_SHARED_DATA" not in os.environ:
        os.environ["BOXLOOP_SHARED_DATA"] = str(Path("../shared/data").resolve())
    results = run(expand_path(args.onnx_model))
    write_result(args.out, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
