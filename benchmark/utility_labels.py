"""Stage 1 of ``boxloop bench utility``: distort every source image, let each labeling detector
judge it (utility labels), score the baselines and cache the predictor's input.

Run once per config and cached in ``OUT/cache/items.pkl``; every seed of stage 2
(:mod:`benchmark.utility_bench`) reuses it. Worker processes label chunks of sources. A source
image that cannot be decoded is skipped with a warning and listed in the facts.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from backend.boxes import Boxes
from backend.detectors.onnx_yolox import OnnxYoloxDetector
from backend.utility.baselines import (
    brisque_score,
    jpeg_quality,
    laplacian_variance,
)
from backend.utility.distortions import (
    Distortion,
    decode,
    encode_jpeg,
    encode_png,
)
from backend.utility.labelers import coco_yolox_at
from backend.utility.labels import detector_utility, vote
from backend.utility.predictor import (
    TrunkEncoder,
)
from benchmark.datasets import Dataset, ImageDecodeError, SkippedImage, load_dataset
from benchmark.datasets.common import default_shared_data, expand_path, skip_image
from benchmark.utility_config import COMBINED, UtilityBenchConfig

__all__ = ["Item", "build_items", "labeler_name", "load_datasets"]


# ---------------------------------------------------------------------------------- stage 1
@dataclass
class Item:
    """One distorted image: its labels, baseline scores and cached predictor input."""

    dataset: str
    source: str
    distortion: str
    group: str  # "train" (JPEG qualities), "heldout" (JPEG, filtering only), "unseen"
    labels: dict[str, int | None]
    graded: dict[str, float]
    clipped: dict[str, float]
    scores: dict[str, float]  # baseline scores on the distorted file (JPEG bytes or PNG)
    png_scores: dict[str, float]  # the same pixels saved as PNG
    maps: np.ndarray
    png_maps: np.ndarray | None
    unused: Boxes | None  # the unused detector's detections (held-out group only)
    gt: Boxes


def labeler_name(size: int) -> str:
    return f"yolox_nano@{size}"


def load_datasets(config: UtilityBenchConfig) -> list[Dataset]:
    datasets = []
    for spec in config.datasets:
        dataset = load_dataset(str(expand_path(spec)) if "$" in spec else spec)
        if config.max_images is not None:
            dataset = dataset.subset(list(range(min(config.max_images, len(dataset)))))
        datasets.append(dataset)
    return datasets


#: Pristine images per dataset on which the ONNX@416 / PyTorch@416 twin check runs.
TWIN_CHECK_IMAGES = 10


def build_items(
    config: UtilityBenchConfig, cache_dir: Path, progress: bool = True
) -> tuple[list[Item], dict[str, Any]]:
    """Stage 1: distort, detect, label, score, encode; returns the items and run facts.

    With ``threads`` ≥ 2, source images are split into chunks labelled by that many worker
    processes of one thread each (BRISQUE and the Python around the detectors are single-threaded).
    """
    onnx_path = default_shared_data() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(f"COCO YOLOX-Nano not found: {onnx_path}")
    datasets = load_datasets(config)
    # export every ONNX file once here, so workers only read them
    TrunkEncoder(cache_dir, replace(config.predictor, threads=1))
    for size in (*config.labelers, config.unused_size):
        coco_yolox_at(size, onnx_path, cache_dir, num_threads=1)
    coco_yolox_at(416, onnx_path, cache_dir, num_threads=1, from_pytorch=True)
    chunk = 8
    jobs = [
        (d_index, begin, min(begin + chunk, len(dataset)))
        for d_index, dataset in enumerate(datasets)
        for begin in range(0, len(dataset), chunk)
    ]
    workers = max(1, config.threads)
    items: list[Item] = []
    twin_diff: list[float] = []
    pristine_defined = 0
    skipped: list[SkippedImage] = []
    timings = dict.fromkeys(("detect", "brisque", "encode", "trunk"), 0.0)
    total = sum(len(d) for d in datasets)
    bar = tqdm(total=total, desc="utility labels", unit="src", disable=not progress)
    results: list[Any] = []
    if workers == 1:
        for job in jobs:
            results.append(_label_chunk(config, cache_dir, *job))
            bar.update(job[2] - job[1])
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = [pool.submit(_label_chunk, config, cache_dir, *job) for job in jobs]
            for job, future in zip(jobs, futures, strict=True):
                results.append(future.result())
                bar.update(job[2] - job[1])
    bar.close()
    for chunk_items, chunk_twin, chunk_defined, chunk_timings, chunk_skipped in results:
        items += chunk_items
        twin_diff += chunk_twin
        pristine_defined += chunk_defined
        skipped += chunk_skipped
        for key, value in chunk_timings.items():
            timings[key] += value
    facts = {
        "sources": total - len(skipped),
        "skipped_images": [s.to_dict() for s in skipped],
        "sources_with_a_found_box": pristine_defined,
        "items": len(items),
        "onnx416_vs_pytorch416_max_score_diff": float(max(twin_diff) if twin_diff else 0.0),
        "twin_check_images": len(twin_diff),
        "stage1_seconds_summed_over_workers": {k: round(v, 1) for k, v in timings.items()},
        "workers": workers,
        "datasets": {d.name: len(d) for d in datasets},
    }
    return items, facts


def _label_chunk(
    config: UtilityBenchConfig, cache_dir: Path, d_index: int, begin: int, end: int
) -> tuple[list[Item], list[float], int, dict[str, float], list[SkippedImage]]:
    """Label the samples ``begin:end`` of dataset ``d_index`` (one thread; a worker's job).

    A sample whose image cannot be decoded is skipped with a warning and returned last.
    """
    torch.set_num_threads(1)
    onnx_path = default_shared_data() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    dataset = load_datasets(config)[d_index]
    trunk = TrunkEncoder(cache_dir, replace(config.predictor, threads=1))
    labelers = {
        s: coco_yolox_at(s, onnx_path, cache_dir, dataset.labels, num_threads=1)
        for s in config.labelers
    }
    unused = coco_yolox_at(config.unused_size, onnx_path, cache_dir, dataset.labels, num_threads=1)
    shared = coco_yolox_at(416, onnx_path, cache_dir, num_threads=1)
    twin = coco_yolox_at(416, onnx_path, cache_dir, num_threads=1, from_pytorch=True)
    distortions = (
        [("train", Distortion("jpeg", q)) for q in config.qualities]
        + [("heldout", Distortion("jpeg", q)) for q in config.heldout_qualities]
        + [("unseen", Distortion.parse(t)) for t in config.unseen]
    )
    items: list[Item] = []
    twin_diff: list[float] = []
    defined = 0
    skipped: list[SkippedImage] = []
    timings = dict.fromkeys(("detect", "brisque", "encode", "trunk"), 0.0)
    for index in range(begin, end):
        sample = dataset.samples[index]
        try:
            image = sample.load_image()
        except ImageDecodeError as exc:  # one broken file does not stop the bench
            skipped.append(skip_image(sample.image_id, sample.image_path, exc.__cause__ or exc))
            continue
        gt = sample.boxes
        start = time.perf_counter()
        pristine = {s: d.predict([image])[0] for s, d in labelers.items()}
        if index < TWIN_CHECK_IMAGES:
            twin_diff.append(_max_score_difference(shared, twin, image))
        timings["detect"] += time.perf_counter() - start
        if any(detector_utility(gt, p, p).binary is not None for p in pristine.values()):
            defined += 1
        pending: list[Any] = []
        made = [
            _make_item(
                dataset.name,
                sample.image_id,
                image,
                gt,
                group,
                distortion,
                labelers,
                pristine,
                unused,
                config,
                timings,
                pending,
            )
            for group, distortion in distortions
        ]
        start = time.perf_counter()
        maps = iter(trunk.encode(pending))  # one batch per source, in append order
        for item in made:
            item.maps = next(maps)
            if item.group == "train":
                item.png_maps = next(maps)
        timings["trunk"] += time.perf_counter() - start
        items += made
    return items, twin_diff, defined, timings, skipped


def _max_score_difference(a: OnnxYoloxDetector, b: OnnxYoloxDetector, image: Any) -> float:
    """Largest |score difference| of matched boxes (same label, IoU ≥ 0.9) between two detectors;
    1.0 when their box counts differ (they are then not the same network)."""
    pa, pb = a.predict([image])[0], b.predict([image])[0]
    if len(pa) != len(pb):
        return 1.0
    if not len(pa):
        return 0.0
    iou = pa.iou(pb)
    j = iou.argmax(axis=1)
    if (iou[np.arange(len(pa)), j] < 0.9).any() or (pa.labels != pb.labels[j]).any():
        return 1.0
    assert pa.scores is not None and pb.scores is not None
    return float(np.abs(pa.scores - pb.scores[j]).max())


def _make_item(
    dataset: str,
    source: str,
    image: Any,
    gt: Boxes,
    group: str,
    distortion: Distortion,
    labelers: dict[int, OnnxYoloxDetector],
    pristine: dict[int, Boxes],
    unused: OnnxYoloxDetector,
    config: UtilityBenchConfig,
    timings: dict[str, float],
    pending: list[Any],
) -> Item:
    """One labelled item; its distorted image (and, for the training group, the PNG round trip)
    is appended to ``pending`` for the caller's trunk batch."""
    start = time.perf_counter()
    if distortion.kind == "jpeg":
        file_bytes = encode_jpeg(image, int(distortion.level))
        distorted = decode(file_bytes)
    else:  # the unseen distortion is stored losslessly: no JPEG header anywhere
        # a seed stable across processes (``hash`` of a str changes with PYTHONHASHSEED)
        distorted = distortion.apply(image, seed=zlib.crc32(str(source).encode()))
        file_bytes = encode_png(distorted)
    png_bytes = encode_png(distorted) if group == "train" else file_bytes
    timings["encode"] += time.perf_counter() - start
    start = time.perf_counter()
    utilities = {
        labeler_name(s): detector_utility(gt, pristine[s], d.predict([distorted])[0])
        for s, d in labelers.items()
    }
    unused_boxes = unused.predict([distorted])[0] if group == "heldout" else None
    timings["detect"] += time.perf_counter() - start
    combined = vote(list(utilities.values()))
    labels: dict[str, int | None] = {k: u.binary for k, u in utilities.items()}
    labels[COMBINED] = combined.binary
    graded = {k: u.graded for k, u in utilities.items()}
    graded[COMBINED] = combined.graded_mean
    clipped = {k: u.clipped for k, u in utilities.items()}
    clipped[COMBINED] = combined.clipped_mean
    lap = laplacian_variance(distorted)
    scores = {"jpeg_quality": jpeg_quality(file_bytes), "laplacian_var": lap}
    if group != "heldout":
        start = time.perf_counter()
        scores["brisque"] = brisque_score(distorted, config.brisque_max_side)
        timings["brisque"] += time.perf_counter() - start
    pending.append(distorted)
    png_scores: dict[str, float] = {}
    if group == "train":
        from_png = decode(png_bytes)
        pending.append(from_png)
        png_scores = {
            "jpeg_quality": jpeg_quality(png_bytes),
            "laplacian_var": laplacian_variance(from_png),
            # BRISQUE reads pixels only and the PNG holds the same pixels (checked below)
            "brisque": scores["brisque"]
            if np.array_equal(np.asarray(from_png), np.asarray(distorted))
            else brisque_score(from_png, config.brisque_max_side),
        }
    return Item(
        dataset,
        source,
        distortion.name,
        group,
        labels,
        graded,
        clipped,
        scores,
        png_scores,
        np.zeros(0, np.float16),  # filled by the caller from one trunk batch per source
        None,
        unused_boxes,
        gt,
    )
