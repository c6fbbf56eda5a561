"""``boxloop bench utility``: image utility for machines on the shared COCO, VOC and KITTI subsets.

What it measures (the paper's Table II, Fig. 1, Fig. 2b / Table IV, with ``docs/method-notes``'s
leak closed):

1. **Labels.** Every source image is distorted by JPEG at the training qualities, by JPEG at
   held-out qualities (for the filtering test) and by a second distortion never used in
   training (Gaussian blur by default). Each labeling detector (the COCO YOLOX-Nano at two input
   sizes, :mod:`backend.utility.labelers`) gives a utility label per distorted image; the combined
   label is the all-agree vote.
2. **Predictor vs baselines** per labeling (each detector alone, and the vote), 3 seeds, each a
   different 80/20 split by *source image*: the Lite0 predictor trained with class-balanced CE on
   decoded pixels; the quantization-table quality, Laplacian variance and BRISQUE, each threshold
   tuned on the training split; the random filter at the predictor's drop rate. Accuracy on the
   JPEG test, on the same test images re-encoded as PNG, and on the unseen distortion, with a 95 %
   cluster-bootstrap interval (resampling source images) on predictor − best baseline.
3. **Filtering**: the mAP of a detector that labeled nothing (YOLOX-Nano at a third input size) on
   the test sources' held-out-quality JPEGs, all kept, after dropping the images the predictor
   calls non-useful, and after dropping as many at random.
4. **BRISQUE overlap** of useful and non-useful images (Fig. 1).

Stage 1 (distort, detect, label, score baselines, cache the predictor's trunk maps) runs once and
is cached in ``OUT/cache/items.pkl``; the seeds reuse it.
"""

from __future__ import annotations

import json
import math
import pickle
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from backend.boxes import Boxes, IgnoreOverlap
from backend.detectors.onnx_yolox import OnnxYoloxDetector
from backend.scoring import evaluate_map
from backend.utility.baselines import (
    RandomFilter,
    ThresholdRule,
    brisque_score,
    jpeg_quality,
    laplacian_variance,
)
from backend.utility.distortions import (
    DEFAULT_JPEG_QUALITIES,
    Distortion,
    decode,
    encode_jpeg,
    encode_png,
)
from backend.utility.labelers import coco_yolox_at
from backend.utility.labels import detector_utility, vote
from backend.utility.predictor import (
    PredictorConfig,
    TrunkEncoder,
    UtilityNet,
    export_predictor,
    train_top,
)
from benchmark.config import ConfigError
from benchmark.datasets import Dataset, load_dataset
from benchmark.datasets.common import default_shared_data, expand_path

__all__ = [
    "QUICK",
    "Item",
    "UtilityBenchConfig",
    "build_items",
    "load_utility_config",
    "run_utility_bench",
]

BASELINES = ("jpeg_quality", "laplacian_var", "brisque")
COMBINED = "vote"


@dataclass(frozen=True)
class UtilityBenchConfig:
    """One ``bench utility`` run.

    Attributes:
        datasets: dataset specs (``voc:PATH`` ...); ``max_images`` caps each (first N, sorted).
        qualities: JPEG qualities the predictor trains on (and is tested on).
        heldout_qualities: JPEG qualities used only for the filtering test (never trained on).
        unseen: the second distortion, never trained on (``blur:2`` ...).
        labelers: input sizes of the labeling YOLOX-Nanos (416 = the shared ONNX file).
        unused_size: input size of the detector that labels nothing and is filtered for.
        seeds: each a different split and initialisation.
        test_fraction: share of each dataset's source images held out (``folds`` 0).
        folds: 0, one split per seed (``test_fraction`` held out); k ≥ 2, k-fold
            cross-validation over source images per seed: every source is tested once, by the
            fold model that did not train on it, and the k folds' predictions are pooled before
            accuracy and the interval are computed (k times the test images of one split).
        brisque_max_side: BRISQUE on images shrunk to this longest side (cost).
        bootstrap: cluster-bootstrap resamples for the 95 % intervals.
        random_repeats: random-filter draws averaged for the mAP comparison.
        predictor: the predictor's training settings.
    """

    datasets: list[str] = field(
        default_factory=lambda: [
            "coco:$BOXLOOP_SHARED_DATA/coco/mini",
            "voc:$BOXLOOP_SHARED_DATA/voc/VOCdevkit/VOC2012",
            "kitti:$BOXLOOP_SHARED_DATA/kitti/tiny",
        ]
    )
    max_images: int | None = None
    qualities: tuple[int, ...] = DEFAULT_JPEG_QUALITIES
    heldout_qualities: tuple[int, ...] = (3, 7, 12)
    unseen: tuple[str, ...] = ("blur:1.5", "blur:3", "blur:5")
    labelers: tuple[int, ...] = (416, 640)
    unused_size: int = 320
    seeds: tuple[int, ...] = (0, 1, 2)
    test_fraction: float = 0.2
    folds: int = 0
    brisque_max_side: int = 320
    bootstrap: int = 2000
    random_repeats: int = 20
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    output: str = "benchmark/results/utility"
    threads: int = 2

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("bench utility needs at least one dataset")
        if not self.labelers:
            raise ConfigError("bench utility needs at least one labeler size")
        if self.unused_size in self.labelers:
            raise ConfigError(f"unused_size {self.unused_size} is also a labeler")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction must be within (0, 1), got {self.test_fraction}")
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"folds must be 0 (one split) or at least 2, got {self.folds}")
        overlap = set(self.qualities) & set(self.heldout_qualities)
        if overlap:
            raise ConfigError(f"qualities {sorted(overlap)} are both trained on and held out")
        for text in self.unseen:
            try:
                if Distortion.parse(text).kind == "jpeg":
                    raise ConfigError("the unseen distortion must not be JPEG")
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: ``--quick``: one small dataset slice, fewer levels, one seed, two epochs (CI).
QUICK: dict[str, Any] = {
    "max_images": 10,
    "qualities": [4, 10, 30, 50],
    "heldout_qualities": [7],
    "unseen": ["blur:3"],
    "seeds": [0],
    "bootstrap": 200,
    "random_repeats": 5,
    "brisque_max_side": 256,
    "predictor": {"epochs": 2},
}


def load_utility_config(data: dict[str, Any]) -> UtilityBenchConfig:
    """A config from a YAML/CLI dict (unknown keys are an error)."""
    known = set(UtilityBenchConfig.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown bench utility keys: {', '.join(sorted(unknown))}")
    values = dict(data)
    predictor = values.pop("predictor", {}) or {}
    try:
        pconfig = PredictorConfig(**predictor)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"predictor: {exc}") from exc
    for key in ("qualities", "heldout_qualities", "labelers", "seeds"):
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    if "unseen" in values:
        values["unseen"] = tuple(str(v) for v in values["unseen"])
    if "datasets" in values:
        values["datasets"] = [
            d if isinstance(d, str) else str(d["spec"]) for d in values["datasets"]
        ]
    return UtilityBenchConfig(predictor=pconfig, **values)


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


def _labeler_name(size: int) -> str:
    return f"yolox_nano@{size}"


def _load(config: UtilityBenchConfig) -> list[Dataset]:
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
    datasets = _load(config)
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
    for chunk_items, chunk_twin, chunk_defined, chunk_timings in results:
        items += chunk_items
        twin_diff += chunk_twin
        pristine_defined += chunk_defined
        for key, value in chunk_timings.items():
            timings[key] += value
    facts = {
        "sources": total,
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
) -> tuple[list[Item], list[float], int, dict[str, float]]:
    """Label the samples ``begin:end`` of dataset ``d_index`` (one thread; a worker's job)."""
    torch.set_num_threads(1)
    onnx_path = default_shared_data() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    dataset = _load(config)[d_index]
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
    timings = dict.fromkeys(("detect", "brisque", "encode", "trunk"), 0.0)
    for index in range(begin, end):
        sample = dataset.samples[index]
        image = sample.load_image()
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
    return items, twin_diff, defined, timings


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
        distorted = distortion.apply(image, seed=hash(source) % (2**31))
        file_bytes = encode_png(distorted)
    png_bytes = encode_png(distorted) if group == "train" else file_bytes
    timings["encode"] += time.perf_counter() - start
    start = time.perf_counter()
    utilities = {
        _labeler_name(s): detector_utility(gt, pristine[s], d.predict([distorted])[0])
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


# ---------------------------------------------------------------------------------- stage 2
def split_sources(items: Sequence[Item], test_fraction: float, seed: int) -> set[tuple[str, str]]:
    """Test sources: ``test_fraction`` of each dataset's source images, at random by ``seed``."""
    rng = np.random.default_rng(seed)
    test: set[tuple[str, str]] = set()
    for dataset, sources in sorted(_sources_by_dataset(items).items()):
        count = max(1, round(test_fraction * len(sources)))
        for index in rng.permutation(len(sources))[:count]:
            test.add((dataset, sources[int(index)]))
    return test


def source_folds(items: Sequence[Item], folds: int, seed: int) -> list[set[tuple[str, str]]]:
    """The test sources of each of ``folds`` folds: each dataset's source images permuted by
    ``seed`` and dealt round-robin, so every source is in exactly one fold and each fold holds
    about ``1/folds`` of every dataset."""
    rng = np.random.default_rng(seed)
    parts: list[set[tuple[str, str]]] = [set() for _ in range(folds)]
    for dataset, sources in sorted(_sources_by_dataset(items).items()):
        for rank, index in enumerate(rng.permutation(len(sources))):
            parts[rank % folds].add((dataset, sources[int(index)]))
    return parts


def _sources_by_dataset(items: Sequence[Item]) -> dict[str, list[str]]:
    by_dataset: dict[str, list[str]] = {}
    for item in items:
        sources = by_dataset.setdefault(item.dataset, [])
        if not sources or sources[-1] != item.source:  # items come grouped by source
            sources.append(item.source)
    return by_dataset


def cluster_bootstrap(
    correct_a: np.ndarray, correct_b: np.ndarray, clusters: np.ndarray, n: int, seed: int
) -> tuple[float, float, float]:
    """Mean of ``a − b`` (per-image correctness) and its 95 % interval, resampling clusters
    (source images: the distorted copies of one photo are not independent)."""
    diff = np.asarray(correct_a, np.float64) - np.asarray(correct_b, np.float64)
    if not len(diff):
        return float("nan"), float("nan"), float("nan")
    keys, index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(index, weights=diff, minlength=len(keys))
    counts = np.bincount(index, minlength=len(keys)).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(keys), (n, len(keys)))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float((pred == truth).mean()) if len(truth) else float("nan")


TESTS_KEYS = ("jpeg", "png", "unseen")


@dataclass
class SplitPredictions:
    """One split's test outcome for a labeling: per test (``jpeg``, ``png``, ``unseen``), each
    method's 0/1 correctness per test item, the truths and the items' source images."""

    truths: dict[str, np.ndarray]
    correct: dict[str, dict[str, np.ndarray]]  # method → test → 0/1 per item
    clusters: dict[str, np.ndarray]
    predictor_jpeg: np.ndarray  # the predictor's 0/1 on the JPEG test (its drop rate)

    @classmethod
    def pooled(cls, parts: Sequence[SplitPredictions]) -> SplitPredictions:
        """The folds' predictions as one test set (each source tested once, by its fold)."""

        def cat(arrays: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(arrays) if arrays else np.zeros(0)

        first = parts[0]
        return cls(
            truths={k: cat([p.truths[k] for p in parts]) for k in first.truths},
            correct={
                m: {k: cat([p.correct[m][k] for p in parts]) for k in tests}
                for m, tests in first.correct.items()
            },
            clusters={k: cat([p.clusters[k] for p in parts]) for k in first.clusters},
            predictor_jpeg=cat([p.predictor_jpeg for p in parts]),
        )


def fit_labeling(
    items: Sequence[Item],
    labeling: str,
    test: set[tuple[str, str]],
    seed: int,
    config: UtilityBenchConfig,
) -> tuple[dict[str, Any], UtilityNet | None, SplitPredictions | None]:
    """Train the predictor and tune the baselines on the sources outside ``test``, and predict
    the test sources: ``(facts, net, predictions)``; net and predictions are None when the
    training split lacks a class or the test split is empty."""

    def pick(group: str, in_test: bool) -> list[Item]:
        return [
            i
            for i in items
            if i.group == group
            and i.labels[labeling] is not None
            and ((i.dataset, i.source) in test) == in_test
        ]

    train, test_items, unseen = pick("train", False), pick("train", True), pick("unseen", True)
    y_train = np.array([i.labels[labeling] for i in train], np.int64)
    y_test = np.array([i.labels[labeling] for i in test_items], np.int64)
    y_unseen = np.array([i.labels[labeling] for i in unseen], np.int64)
    facts: dict[str, Any] = {
        "labeling": labeling,
        "seed": seed,
        "train": len(train),
        "test": len(test_items),
        "unseen": len(unseen),
        "train_useful_share": float(y_train.mean()) if len(y_train) else float("nan"),
        "test_useful_share": float(y_test.mean()) if len(y_test) else float("nan"),
        # over every item of the labeling's JPEG group (train + test: the same for any split)
        "graded_mean": float(np.nanmean([i.graded[labeling] for i in train + test_items])),
        "clipped_mean": float(np.nanmean([i.clipped[labeling] for i in train + test_items])),
    }
    if len(set(y_train.tolist())) < 2 or not len(y_test):
        facts["skipped"] = "the training split lacks one class or the test split is empty"
        return facts, None, None
    pconfig = replace(config.predictor, seed=seed, threads=config.threads)
    maps = np.stack([i.maps for i in train])
    net, history = train_top(maps, y_train, pconfig)
    facts["train_seconds"] = round(history.seconds, 1)
    facts["train_loss"] = history.loss

    predictions = {
        "jpeg": _top_predict(net, test_items),
        "png": _top_predict(net, test_items, png=True),
        "unseen": _top_predict(net, unseen),
    }
    truths = {"jpeg": y_test, "png": y_test, "unseen": y_unseen}
    correct: dict[str, dict[str, np.ndarray]] = {
        "predictor": {k: (p == truths[k]).astype(np.float64) for k, p in predictions.items()}
    }
    rules: dict[str, Any] = {}
    for name in BASELINES:
        rule = ThresholdRule.fit(np.array([i.scores[name] for i in train]), y_train)
        rules[name] = asdict(rule)
        correct[name] = {}
        for key, chosen, use_png in (
            ("jpeg", test_items, False),
            ("png", test_items, True),
            ("unseen", unseen, False),
        ):
            values = np.array([(i.png_scores if use_png else i.scores)[name] for i in chosen])
            pred = rule.predict(values) if len(chosen) else np.zeros(0, np.int64)
            correct[name][key] = (pred == truths[key]).astype(np.float64)
    facts["rules"] = rules
    clusters = {
        "jpeg": np.array([f"{i.dataset}/{i.source}" for i in test_items]),
        "png": np.array([f"{i.dataset}/{i.source}" for i in test_items]),
        "unseen": np.array([f"{i.dataset}/{i.source}" for i in unseen]),
    }
    return facts, net, SplitPredictions(truths, correct, clusters, predictions["jpeg"])


def summarize_labeling(
    facts: dict[str, Any], predictions: SplitPredictions, seed: int, config: UtilityBenchConfig
) -> dict[str, Any]:
    """Accuracy of every method on every test, the random filter at the predictor's drop rate,
    and the cluster-bootstrap interval on predictor − best baseline (best on that test)."""
    accuracy: dict[str, dict[str, float]] = {
        method: {key: float(v.mean()) if len(v) else float("nan") for key, v in tests.items()}
        for method, tests in predictions.correct.items()
    }
    y_test = predictions.truths["jpeg"]
    drop = float((predictions.predictor_jpeg == 0).mean())
    random_pred = RandomFilter(drop, seed=seed).predict(len(y_test))
    accuracy["random"] = {"jpeg": _accuracy(random_pred, y_test)}
    intervals = {}
    for key in TESTS_KEYS:
        best_here = max(BASELINES, key=lambda b: accuracy[b][key])
        mean, low, high = cluster_bootstrap(
            predictions.correct["predictor"][key],
            predictions.correct[best_here][key],
            predictions.clusters[key],
            config.bootstrap,
            seed,
        )
        intervals[key] = {"vs": best_here, "diff": mean, "low": low, "high": high}
    return {
        **facts,
        "accuracy": accuracy,
        "best_baseline": max(BASELINES, key=lambda b: accuracy[b]["jpeg"]),
        "predictor_drop_rate": drop,
        "difference": intervals,
    }


def evaluate_labeling(
    items: Sequence[Item],
    labeling: str,
    test: set[tuple[str, str]],
    seed: int,
    config: UtilityBenchConfig,
    model_dir: Path,
) -> tuple[dict[str, Any], UtilityNet | None]:
    """Train and test the predictor and the baselines for one labeling on one split."""
    facts, net, predictions = fit_labeling(items, labeling, test, seed, config)
    if net is None or predictions is None:
        return facts, None
    if labeling == COMBINED:
        export_predictor(
            net,
            model_dir / f"{labeling}_seed{seed}.onnx",
            size=config.predictor.size,
            view=config.predictor.view,
        )
    return summarize_labeling(facts, predictions, seed, config), net


def evaluate_labeling_folds(
    items: Sequence[Item],
    labeling: str,
    folds: Sequence[set[tuple[str, str]]],
    seed: int,
    config: UtilityBenchConfig,
) -> tuple[dict[str, Any], list[tuple[set[tuple[str, str]], UtilityNet]]]:
    """k-fold cross-validation over sources: one predictor per fold, the folds' test
    predictions pooled, then summarised as one split (each source tested once)."""
    parts: list[SplitPredictions] = []
    nets: list[tuple[set[tuple[str, str]], UtilityNet]] = []
    per_fold: list[dict[str, Any]] = []
    for test in folds:
        facts, net, predictions = fit_labeling(items, labeling, test, seed, config)
        per_fold.append(facts)
        if net is None or predictions is None:
            continue
        parts.append(predictions)
        nets.append((test, net))
    if not parts:
        return {**per_fold[0], "skipped": "no fold could be trained"}, []
    predictions = SplitPredictions.pooled(parts)
    pooled = {
        "labeling": labeling,
        "seed": seed,
        "folds": len(folds),
        "train": round(float(np.mean([f["train"] for f in per_fold]))),
        "test": sum(f["test"] for f in per_fold if "skipped" not in f),
        "unseen": sum(f["unseen"] for f in per_fold if "skipped" not in f),
        "train_useful_share": float(np.mean([f["train_useful_share"] for f in per_fold])),
        "test_useful_share": float(predictions.truths["jpeg"].mean()),
        "graded_mean": per_fold[0]["graded_mean"],
        "clipped_mean": per_fold[0]["clipped_mean"],
        "train_seconds": round(sum(f.get("train_seconds", 0.0) for f in per_fold), 1),
        "folds_skipped": sum("skipped" in f for f in per_fold),
        "rules": [f.get("rules") for f in per_fold],
    }
    return summarize_labeling(pooled, predictions, seed, config), nets


def filtering(
    items: Sequence[Item],
    test: set[tuple[str, str]],
    net_predict: Any,
    seed: int,
    repeats: int,
    dataset_labels: dict[str, tuple[list[str], IgnoreOverlap]],
) -> dict[str, Any]:
    """mAP@0.5 of the unused detector on the test sources' held-out JPEGs: all, after the
    predictor's filter, after a random filter of the same size (mean of ``repeats`` draws), and
    after the true-label filter (an upper reference). Averaged over datasets."""
    rows: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for dataset, (labels, overlap) in sorted(dataset_labels.items()):
        chosen = [
            i
            for i in items
            if i.group == "heldout" and i.dataset == dataset and (i.dataset, i.source) in test
        ]
        if not chosen:
            continue
        gts = [i.gt for i in chosen]
        preds = [i.unused for i in chosen]
        keep = net_predict(chosen) == 1
        truth = np.array([i.labels[COMBINED] for i in chosen], dtype=object)

        def m(
            mask: np.ndarray,
            gts: list[Boxes] = gts,
            preds: list[Any] = preds,
            labels: list[str] = labels,
            overlap: IgnoreOverlap = overlap,
        ) -> float:
            if not mask.any():
                return float("nan")
            idx = np.flatnonzero(mask)
            chosen_gts, chosen_preds = [gts[k] for k in idx], [preds[k] for k in idx]
            return evaluate_map(chosen_gts, chosen_preds, labels, overlap).map50

        random_maps = []
        for _ in range(repeats):
            mask = np.zeros(len(chosen), bool)
            mask[rng.permutation(len(chosen))[: int(keep.sum())]] = True
            random_maps.append(m(mask))
        oracle = np.array([t != 0 for t in truth])
        rows[dataset] = {
            "images": len(chosen),
            "kept": int(keep.sum()),
            "map_all": m(np.ones(len(chosen), bool)),
            "map_predictor": m(keep),
            "map_random": float(np.nanmean(random_maps)) if random_maps else float("nan"),
            "map_random_sd": float(np.nanstd(random_maps)) if random_maps else float("nan"),
            "map_true_labels": m(oracle),
        }
    return rows


def run_utility_bench(
    config: UtilityBenchConfig, *, force: bool = False, progress: bool = True
) -> tuple[dict[str, Any], list[Path]]:
    """Run every stage, write ``results.json``, ``report.md`` and plots under ``config.output``."""
    out = Path(config.output)
    cache_dir = out / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir / "items.pkl"
    key = json.dumps(
        {
            k: v
            for k, v in config.to_dict().items()
            if k not in ("seeds", "bootstrap", "output", "folds")  # stage 2 only
        },
        sort_keys=True,
        default=str,
    )
    start = time.perf_counter()
    items: list[Item] | None = None
    facts: dict[str, Any] = {}
    if cache.is_file() and not force:
        with cache.open("rb") as fh:
            stored = pickle.load(fh)
        if stored.get("key") == key:
            items, facts = stored["items"], stored["facts"]
    if items is None:
        items, facts = build_items(config, cache_dir, progress)
        with cache.open("wb") as fh:
            pickle.dump({"key": key, "items": items, "facts": facts}, fh)
    facts["stage1_total_seconds"] = round(time.perf_counter() - start, 1)
    labelings = [_labeler_name(s) for s in config.labelers] + [COMBINED]
    dataset_labels = {d.name: (list(d.labels), d.ignore_overlap) for d in _load(config)}
    runs: list[dict[str, Any]] = []
    model_dir = out / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    from benchmark.utility_report import write_utility_report

    label_stats = _label_stats(items, labelings)
    files: list[Path] = []
    summary: dict[str, Any] = {}
    for seed in config.seeds:
        # the vote first: it also drives the filtering test, the most expensive row to lose
        for labeling in [COMBINED, *labelings[:-1]]:
            result, fold_nets = _evaluate_seed(items, labeling, seed, config, model_dir)
            if labeling == COMBINED and fold_nets:
                result["filtering"] = filtering(
                    items,
                    set().union(*(test for test, _ in fold_nets)),
                    lambda chosen, nets=fold_nets: _fold_predict(nets, chosen),
                    seed,
                    config.random_repeats,
                    dataset_labels,
                )
            runs.append(result)
            if progress:
                acc = result.get("accuracy", {}).get("predictor", {})
                print(f"seed {seed} {labeling}: {json.dumps(acc)}", flush=True)
        # results so far after every seed: a run stopped early still leaves its finished seeds
        runs.sort(key=lambda r: (r["seed"], labelings.index(r["labeling"])))
        summary = {
            "config": config.to_dict(),
            "facts": facts,
            "labels": label_stats,
            "runs": runs,
            "machine": {"python": platform.python_version(), "load": _load_average()},
            "seconds": round(time.perf_counter() - start, 1),
        }
        (out / "results.json").write_text(json.dumps(_jsonable(summary), indent=2))
        files = [out / "results.json", *write_utility_report(out, summary, items)]
    return summary, files


def _evaluate_seed(
    items: Sequence[Item], labeling: str, seed: int, config: UtilityBenchConfig, model_dir: Path
) -> tuple[dict[str, Any], list[tuple[set[tuple[str, str]], UtilityNet]]]:
    """One seed of one labeling: one split, or ``config.folds`` folds pooled. Returns the result
    row and each trained predictor with the test sources it predicts."""
    if not config.folds:
        test = split_sources(items, config.test_fraction, seed)
        result, net = evaluate_labeling(items, labeling, test, seed, config, model_dir)
        return result, [] if net is None else [(test, net)]
    folds = source_folds(items, config.folds, seed)
    result, nets = evaluate_labeling_folds(items, labeling, folds, seed, config)
    if labeling == COMBINED:
        for k, (_, net) in enumerate(nets):
            export_predictor(
                net,
                model_dir / f"{labeling}_seed{seed}_fold{k}.onnx",
                size=config.predictor.size,
                view=config.predictor.view,
            )
    return result, nets


def _fold_predict(
    nets: Sequence[tuple[set[tuple[str, str]], UtilityNet]], chosen: Sequence[Item]
) -> np.ndarray:
    """Each item predicted by the predictor whose test sources hold it."""
    out = np.zeros(len(chosen), np.int64)
    for test, net in nets:
        index = [k for k, i in enumerate(chosen) if (i.dataset, i.source) in test]
        if index:
            out[index] = _top_predict(net, [chosen[k] for k in index])
    return out


def _top_predict(net: UtilityNet, chosen: Sequence[Item], png: bool = False) -> np.ndarray:
    """0/1 from the trained top on cached trunk maps: the same network the exported ONNX file
    runs end to end (``tests/unit/test_utility_predictor.py`` checks ONNX equals eager), without
    decoding every distorted image again."""
    if not chosen:
        return np.zeros(0, np.int64)
    arrays = [i.png_maps if png and i.png_maps is not None else i.maps for i in chosen]
    if png and any(i.png_maps is None for i in chosen):
        raise ValueError("PNG maps exist only for the training-quality group")
    stacked = np.stack(arrays).astype(np.float32)
    with torch.no_grad():
        logits = net.top(torch.from_numpy(stacked))
    return logits.argmax(1).numpy().astype(np.int64)


def _label_stats(items: Sequence[Item], labelings: Sequence[str]) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for labeling in labelings:
        per_distortion: dict[str, dict[str, int]] = {}
        for item in items:
            row = per_distortion.setdefault(
                item.distortion, {"useful": 0, "useless": 0, "dropped": 0}
            )
            label = item.labels[labeling]
            row["dropped" if label is None else ("useful" if label == 1 else "useless")] += 1
        stats[labeling] = per_distortion
    names = [n for n in labelings if n != COMBINED]
    if len(names) >= 2:
        both = [i for i in items if all(i.labels[n] is not None for n in names)]
        agree = [i for i in both if len({i.labels[n] for n in names}) == 1]
        stats["agreement_between_labelers"] = len(agree) / len(both) if both else float("nan")
    return stats


def _load_average() -> list[float]:
    try:
        import os

        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, np.floating):
        return _jsonable(float(value))
    if isinstance(value, np.integer):
        return int(value)
    return value
