"""The simulated annotation campaign (paper Fig. 1), driven through the backend's public API.

For one dataset, approach and seed:

1. the pool (dataset minus a fixed held-out split) is ordered by
   :func:`backend.ordering.order_pool` on features from :mod:`backend.features`
   and cut into batches B1..Bn;
2. B1 is drawn by hand (B1n boxes);
3. for k ≥ 2, M(k−1) is trained with :func:`backend.training.train_detector` on
   every labelled batch (warm-started from M(k−2) unless configured off),
   predicts Bk, and the stored predictions are corrected by the oracle for
   every τ × score threshold; M(k−1) is also scored on the held-out split;
4. optionally a last model on all batches gives the curve's final mAP point.

The "pretrained only" baseline replaces training by the COCO YOLOX-Nano ONNX
detector (classes mapped to the dataset's labels by name), run on every batch,
B1 included, in a random order.

Each run writes one JSON file (config, seed, order, per-batch predictions and
A/R counts, mAP curve, seconds) atomically, so an interrupted grid resumes
where it stopped; the report is rebuilt from those files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from backend.boxes import Boxes
from backend.detectors import Detector, TorchDetector
from backend.detectors.pretrained import load_pretrained
from backend.features import (
    FeatureExtractor,
    SimNetConfig,
    load_simnet,
    make_extractor,
    train_simnet,
)
from backend.ordering import batches, order_pool
from backend.scoring import evaluate_map
from backend.settings import load_settings
from backend.training import TrainConfig, TrainSample, train_detector
from backend.training.calibration import unlabeled_sample
from backend.training.gate import GateConfig
from backend.training.yolox_train import YoloxTrainConfig
from benchmark.config import (
    PRETRAINED,
    Approach,
    ConfigError,
    DatasetConfig,
    ExperimentConfig,
    PretrainedConfig,
    reject_unknown_keys,
)
from benchmark.corrections import refresh_corrections
from benchmark.datasets import Dataset, decode_images, expand_path, load_dataset
from benchmark.product_loop import ProductLoop, check_floor, gate_config, yolox_config
from benchmark.reports import SCHEMA, write_json, write_report

# ---------------------------------------------------------------------------------- the seam
# The only place the harness touches the backend: each function is a thin call into its public
# API (ordering, features, training, detectors), never a re-implementation.

#: Training overrides of ``--quick`` (CI): few epochs on small images.
QUICK_TRAIN: dict[str, Any] = {"epochs": 2, "min_size": 320, "max_size": 544}
#: YOLOX overrides of ``--quick``: a few short epochs on a small letterbox.
QUICK_YOLOX: dict[str, Any] = {
    "image_visits": 48,
    "min_epochs": 2,
    "max_epochs": 6,
    "input_area": 256 * 192,
}
#: Gate overrides of ``--quick``: a validation slice from the first round (no cross-validation,
#: which trains three times a round).
QUICK_GATE: dict[str, Any] = {"cv_below": 0}


def train_config(overrides: dict[str, Any], seed: int = 0) -> TrainConfig:
    """The backend's default :class:`TrainConfig` (from settings) with the grid's overrides."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ConfigError(f"unknown train settings {sorted(unknown)}; known: {sorted(known)}")
    return TrainConfig.from_settings(load_settings(), **{**overrides, "seed": seed})


def train_config_dict(overrides: dict[str, Any]) -> dict[str, Any]:
    return train_config(overrides).to_dict()


def order_indices(
    features: np.ndarray | None,
    n: int,
    strategy: str,
    seed: int,
    keys: Sequence[str] | None = None,
) -> np.ndarray:
    """:func:`backend.ordering.order_pool` over a pool of ``n`` images (``keys``: the images'
    file names, what the backend's ``temporal`` order sorts by when no time field is given)."""
    return order_pool(features, strategy, seed=seed, n=n, keys=keys)


def split_batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """:func:`backend.ordering.batches`, as plain index lists."""
    return [[int(i) for i in batch] for batch in batches(order, batch_size)]


def extract_features(
    name: str, images: list[Image.Image], options: dict[str, Any], cache: Path, dataset_key: str
) -> np.ndarray:
    """Pool features from :mod:`backend.features`.

    ``imgnet``: the backend's default ImgNet extractor (EfficientNet-Lite0). ``simnet``: a
    SimNet trained on the pool's own images (as in the paper), once per dataset and SimNet
    config, kept under ``cache`` so later grids reuse it. ``options[name]`` holds overrides
    (for SimNet, :class:`SimNetConfig` fields).
    """
    settings = load_settings(data_dir=cache)
    overrides = dict(options.get(name, {}))
    if name == "imgnet":
        extractor: FeatureExtractor = make_extractor("imgnet", settings)
    elif name == "simnet":
        simnet_config = SimNetConfig(**{"num_threads": settings.num_threads, **overrides})
        digest = hashlib.sha256(
            json.dumps([dataset_key, dataclasses.asdict(simnet_config)], sort_keys=True).encode()
        ).hexdigest()[:12]
        directory = cache / "simnet" / digest
        try:
            extractor = load_simnet(directory, num_threads=settings.num_threads)
        except FileNotFoundError:
            extractor = train_simnet(images, directory, simnet_config, progress=False)
    else:
        raise ConfigError(f"unknown features {name!r}")
    return extractor.extract(images, progress=False)


def resolved_training(config: ExperimentConfig) -> dict[str, Any]:
    """The grid's ``train`` (Faster R-CNN), ``yolox`` and ``gate`` settings resolved against the
    backend's defaults.

    A :class:`ConfigError` naming the section when a key is no field of its config class or a
    value is refused: the YAML's sections and ``--train`` / ``--yolox`` are checked here before
    a grid writes anything, instead of a ``TypeError`` stopping it.
    """
    reject_unknown_keys(config.yolox, YoloxTrainConfig, "yolox")
    reject_unknown_keys(config.gate, GateConfig, "gate")
    resolvers: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
        "fasterrcnn": ("train", lambda: train_config_dict(config.train)),
        "yolox": ("yolox", lambda: yolox_config(config.yolox).to_dict()),
        "gate": ("gate", lambda: gate_config(config.gate).to_dict()),
    }
    resolved: dict[str, Any] = {}
    for name, (section, resolve) in resolvers.items():
        try:
            resolved[name] = resolve()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{section}: {exc}") from exc
    if any(a.retrains and a.detector == "yolox" for a in config.approaches):
        try:  # the loop keeps predictions down to the floor only: the gate must see its own
            check_floor(config.prediction_floor, gate_config(config.gate))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
    return resolved


def run_key(
    config: ExperimentConfig, dataset: DatasetConfig, duplicates: Sequence[Sequence[str]] = ()
) -> str:
    """:meth:`ExperimentConfig.run_key` with the training config resolved against the backend.

    ``duplicates``: the dataset's groups of byte-identical images (:func:`prepare_dataset`
    keeps each on one side of the split). They change the key, so a run split before they
    were grouped runs again, while a dataset without any keeps its key and its stored runs.
    """
    key = config.run_key(dataset, resolved_training(config))
    if not duplicates:
        return key
    text = json.dumps([key, [list(group) for group in duplicates]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, threads))


def train(
    samples: Sequence[tuple[Image.Image, Boxes]],
    labels: list[str],
    overrides: dict[str, Any],
    *,
    seed: int,
    init: torch.nn.Module | None,
) -> torch.nn.Module:
    """:func:`backend.training.train_detector` on the labelled images.

    Ignored regions are stripped first: the simulated annotator never draws them, and a
    ``DontCare`` region's :data:`~benchmark.datasets.ANY_CLASS` label is a benchmark-only
    convention that must not reach the backend.
    """
    return train_detector(
        [TrainSample(image=image, boxes=boxes.kept()) for image, boxes in samples],
        labels,
        train_config(overrides, seed),
        init=init,
    )


def wrap(
    model: torch.nn.Module, labels: list[str], floor: float, overrides: dict[str, Any]
) -> Detector:
    """A :class:`TorchDetector` with the training resize rule, keeping scores down to ``floor``."""
    cfg = train_config(overrides)
    return TorchDetector(
        model,
        labels,
        "bench",
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        score_threshold=floor,
    )


def pretrained_detector(
    config: PretrainedConfig, labels: list[str], floor: float, cache: Path
) -> Detector:
    """The COCO YOLOX-Nano ONNX model with its classes mapped onto ``labels`` by name, loaded as
    the backend loads it (:func:`backend.detectors.pretrained.load_pretrained`); an ``aspect``
    input's dynamic export is cached under ``cache``."""
    model = expand_path(config.model)
    if not model.is_file():
        raise ConfigError(f"pretrained ONNX model not found: {model}")
    settings = load_settings(
        data_dir=cache,
        onnx_model_path=model,
        onnx_class_names_path=expand_path(config.classes),
        num_threads=torch.get_num_threads(),
        score_threshold=floor,
        pretrained_input=config.input,
    )
    detector = load_pretrained(settings, labels)
    assert detector is not None  # load_pretrained returns None only without a model path
    return detector


# ---------------------------------------------------------------------------------- datasets
@dataclass
class PreparedDataset:
    """A loaded dataset split into pool and held-out part, with decoded images and features cached."""

    config: DatasetConfig
    dataset: Dataset
    pool: Dataset
    holdout: Dataset
    images: dict[str, Image.Image] = field(default_factory=dict)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    feature_seconds: dict[str, float] = field(default_factory=dict)
    load_seconds: float = 0.0
    #: Image ids of byte-identical image files, grouped; each group lies wholly on one side.
    duplicates: list[list[str]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.display_name

    def pool_images(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self.images[self.pool.samples[int(i)].image_id] for i in indices]


def _capped_dataset(config: DatasetConfig) -> tuple[Dataset, np.random.Generator]:
    """The dataset capped to ``max_images`` (a seeded sample) and the generator that drew it,
    which then draws the held-out split."""
    dataset = load_dataset(config.spec)
    rng = np.random.default_rng(config.holdout_seed)
    n = len(dataset)
    if config.max_images is not None and config.max_images < n:
        keep = np.sort(rng.permutation(n)[: config.max_images])
        dataset = dataset.subset(keep)
    return dataset, rng


def duplicate_groups(dataset: Dataset) -> list[list[int]]:
    """Indices of the samples whose image files are byte-identical, grouped (groups of two or
    more, each in dataset order, ordered by their first member).

    Why: an image with a twin in the held-out split is scored after the models trained on it,
    which lifts the mAP curve (the shared raccoon set holds four such pairs).
    """
    by_digest: dict[str, list[int]] = {}
    for i, sample in enumerate(dataset.samples):
        digest = hashlib.sha256(sample.image_path.read_bytes()).hexdigest()
        by_digest.setdefault(digest, []).append(i)
    return [group for group in by_digest.values() if len(group) > 1]


def dataset_duplicates(config: DatasetConfig) -> list[list[str]]:
    """The image ids of :func:`duplicate_groups` on the capped dataset, without decoding it."""
    dataset, _ = _capped_dataset(config)
    return [[dataset.samples[i].image_id for i in group] for group in duplicate_groups(dataset)]


def split_holdout(
    perm: np.ndarray, n_holdout: int, groups: Sequence[Sequence[int]] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """``(held-out, pool)`` indices, each sorted: the first ``n_holdout`` of ``perm`` are held
    out, then each group of identical images joins the side of its first member whole.

    Without groups this is the plain cut of ``perm``, so a dataset without duplicates keeps
    the split (and the runs) it had before duplicates were grouped.
    """
    held = np.zeros(len(perm), dtype=bool)
    held[perm[:n_holdout]] = True
    for group in groups:
        held[list(group)] = held[group[0]]
    return np.flatnonzero(held), np.flatnonzero(~held)


def prepare_dataset(config: DatasetConfig) -> PreparedDataset:
    """Load, cap (seeded, same for every run), decode, split off the held-out images.

    An image that cannot be decoded is skipped with a warning (and listed in the
    run's ``dataset.skipped_images``) before the split; only a dataset with no image
    left is an error. Byte-identical images go to one side of the split together
    (:func:`split_holdout`) and are listed in the run's ``dataset.duplicate_images``.
    """
    start = time.perf_counter()
    dataset, rng = _capped_dataset(config)
    dataset, images = decode_images(dataset)
    n = len(dataset)
    groups = duplicate_groups(dataset)
    holdout_idx, pool_idx = split_holdout(rng.permutation(n), config.holdout_count(n), groups)
    if len(pool_idx) == 0:
        raise ConfigError(f"{config.spec}: identical images leave no pool beside the held-out")
    if len(holdout_idx) == 0 and config.holdout_count(n) > 0:
        raise ConfigError(f"{config.spec}: identical images leave no held-out images")
    name = config.display_name
    prepared = PreparedDataset(
        config,
        dataset,
        dataset.subset(pool_idx, name=name),
        dataset.subset(holdout_idx, name=name),
        images,
        duplicates=[[dataset.samples[i].image_id for i in group] for group in groups],
    )
    prepared.load_seconds = time.perf_counter() - start
    return prepared


def pool_features(
    prepared: PreparedDataset, extractor: str, config: ExperimentConfig
) -> np.ndarray:
    """``(N_pool, d)`` features, computed once per dataset and extractor."""
    if extractor not in prepared.features:
        start = time.perf_counter()
        images = prepared.pool_images(range(len(prepared.pool)))
        dataset_key = json.dumps([prepared.name, [s.image_id for s in prepared.pool.samples]])
        prepared.features[extractor] = extract_features(
            extractor, images, config.features, config.output_dir / "cache", dataset_key
        )
        prepared.feature_seconds[extractor] = time.perf_counter() - start
    return prepared.features[extractor]


# ---------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunId:
    dataset: str
    approach: Approach
    seed: int

    @property
    def slug(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.dataset)
        return f"{safe}__{self.approach.slug}__seed{self.seed}"


ProgressFn = Callable[[str], None]


def _boxes_json(boxes: Boxes) -> dict[str, Any]:
    return boxes.to_dict()


def run_one(
    prepared: PreparedDataset,
    approach: Approach,
    seed: int,
    config: ExperimentConfig,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """One campaign; returns the JSON-ready result (see the module docstring)."""
    say = progress or (lambda _msg: None)
    t_start = time.perf_counter()
    pool, labels = prepared.pool, prepared.pool.labels
    seconds = {
        "load": prepared.load_seconds,
        "features": 0.0,
        "ordering": 0.0,
        "train": 0.0,
        "predict": 0.0,
        "evaluate": 0.0,
    }

    # ---- order the pool and cut it into batches
    features: np.ndarray | None = None
    features_cached = False  # computed by an earlier run: not inside this run's wall time
    if approach.features is not None:
        say(f"features {approach.features}")
        features_cached = approach.features in prepared.features
        features = pool_features(prepared, approach.features, config)
        seconds["features"] = prepared.feature_seconds[approach.features]
    start = time.perf_counter()
    strategy = "random" if approach.strategy == PRETRAINED else approach.strategy
    names = [s.image_path.name for s in pool.samples] if strategy == "temporal" else None
    order = order_indices(features, len(pool), strategy, seed, names)
    plan = split_batches(order, config.batch_size)
    seconds["ordering"] = time.perf_counter() - start

    gts = [s.boxes for s in pool.samples]
    holdout_gts = [s.boxes for s in prepared.holdout.samples]
    holdout_images = [prepared.images[s.image_id] for s in prepared.holdout.samples]
    map_curve: list[dict[str, Any]] = []

    def evaluate(
        detector: Detector, images_labeled: int, round_no: int, trained_images: int
    ) -> None:
        """One mAP point; ``trained_images``: how many images the scored model trained on (0:
        the COCO model), which for the loop may lag ``images_labeled`` (a rejected candidate
        leaves its predecessor serving)."""
        if not holdout_gts:
            return
        start = time.perf_counter()
        preds = detector.predict(holdout_images)
        result = evaluate_map(holdout_gts, preds, labels, pool.ignore_overlap)
        seconds["evaluate"] += time.perf_counter() - start
        map_curve.append(
            {
                "round": round_no,
                "images_labeled": images_labeled,
                "trained_images": trained_images,
                **result.to_dict(),
            }
        )

    pretrained: Detector | None = None
    if not approach.retrains:
        pretrained = pretrained_detector(
            config.pretrained, labels, config.prediction_floor, config.output_dir / "cache"
        )
        evaluate(pretrained, 0, 0, 0)
    loop: ProductLoop | None = None
    if approach.retrains and approach.detector == "yolox":
        loop = ProductLoop(
            labels,
            config.output_dir / "cache" / "loops" / RunId(prepared.name, approach, seed).slug,
            onnx_model=expand_path(config.pretrained.model),
            class_names=expand_path(config.pretrained.classes),
            pretrained_input=config.pretrained.input,
            floor=config.prediction_floor,
            yolox=config.yolox,
            gate=config.gate,
            seed=seed,
            threads=config.threads,
            warm_start=config.warm_start,
        )
        if loop.serving.detector is not None:
            evaluate(loop.serving.detector, 0, 0, 0)

    batch_records: list[dict[str, Any]] = []
    labeled: list[int] = []
    model: Any = None
    served_threshold = load_settings().score_threshold  # what the product serves the COCO model at
    for k, batch in enumerate(plan):
        record: dict[str, Any] = {
            "index": k + 1,
            "image_ids": [pool.samples[i].image_id for i in batch],
            "images": len(batch),
            "boxes": sum(len(gts[i].kept()) for i in batch),
            "ground_truth": {pool.samples[i].image_id: _boxes_json(gts[i]) for i in batch},
            "seconds": {},
        }
        detector: Detector | None = pretrained
        if pretrained is not None:
            record["gate_threshold"] = served_threshold
        if loop is not None:
            if k > 0:
                say(f"B{k + 1}: train and gate a candidate on {len(labeled)} images")
                start = time.perf_counter()
                done = set(labeled)
                rest = [i for i in range(len(pool)) if i not in done]
                picked = unlabeled_sample(
                    [pool.samples[i].image_id for i in rest], loop.gate.calibration_images
                )
                outcome = loop.round(
                    [
                        (
                            pool.samples[i].image_id,
                            prepared.images[pool.samples[i].image_id],
                            gts[i],
                        )
                        for i in labeled
                    ],
                    k,
                    prepared.pool_images([rest[j] for j in picked]),
                )
                record["seconds"]["train"] = time.perf_counter() - start
                seconds["train"] += record["seconds"]["train"]
                record["gate"] = {"candidate": f"v{k}", **outcome.metrics()}
                if loop.serving.detector is not None:
                    evaluate(loop.serving.detector, len(labeled), k, len(loop.serving.trained_on))
            detector = loop.serving.detector
            record["serving_version"] = loop.serving.version
            record["gate_threshold"] = loop.serving.threshold
            record["gate_serves_boxes"] = loop.serving.threshold is not None
        elif approach.retrains and k > 0:
            say(f"B{k + 1}: train M{k} on {len(labeled)} images")
            start = time.perf_counter()
            model = train(
                [(prepared.images[pool.samples[i].image_id], gts[i]) for i in labeled],
                labels,
                config.train,
                seed=seed * 1000 + k,
                init=model if config.warm_start else None,
            )
            record["seconds"]["train"] = time.perf_counter() - start
            seconds["train"] += record["seconds"]["train"]
            detector = wrap(model, labels, config.prediction_floor, config.train)
            evaluate(detector, len(labeled), k, len(labeled))
        if detector is None:  # nothing serves (B1 of the Faster R-CNN loop, unmapped labels)
            record.update(manual=True, predictions=None, corrections={})
        else:
            say(f"B{k + 1}: predict {len(batch)} images")
            start = time.perf_counter()
            preds = [
                p.above(config.prediction_floor)
                for p in detector.predict(prepared.pool_images(batch))
            ]
            record["seconds"]["predict"] = time.perf_counter() - start
            seconds["predict"] += record["seconds"]["predict"]
            record["manual"] = False
            # what the serving model trained on (a rejected round keeps its predecessor's)
            record["model_images"] = (
                len(loop.serving.trained_on)
                if loop is not None
                else (len(labeled) if approach.retrains else 0)
            )
            record["predictions"] = {
                pool.samples[i].image_id: _boxes_json(p) for i, p in zip(batch, preds, strict=True)
            }
            record["corrections"] = {}
        batch_records.append(record)
        labeled.extend(batch)

    if approach.retrains and approach.detector != "yolox" and config.final_round and holdout_gts:
        say(f"final model on {len(labeled)} images")
        start = time.perf_counter()
        model = train(
            [(prepared.images[pool.samples[i].image_id], gts[i]) for i in labeled],
            labels,
            config.train,
            seed=seed * 1000 + len(plan),
            init=model if config.warm_start else None,
        )
        seconds["train"] += time.perf_counter() - start
        evaluate(
            wrap(model, labels, config.prediction_floor, config.train),
            len(labeled),
            len(plan),
            len(labeled),
        )

    seconds["total"] = time.perf_counter() - t_start
    if features_cached:  # computed by an earlier run: outside this run's wall time
        seconds["total"] += seconds["features"]
    result = {
        "schema": SCHEMA,
        "run_id": RunId(prepared.name, approach, seed).slug,
        "run_key": run_key(config, prepared.config, prepared.duplicates),
        "experiment": config.name,
        "dataset": {
            "name": prepared.name,
            "spec": prepared.config.spec,
            "labels": labels,
            "ignore_overlap": pool.ignore_overlap,
            "pool_images": len(pool),
            "pool_boxes": pool.num_boxes,
            "pool_ignored": pool.num_ignored,
            "holdout_images": len(prepared.holdout),
            "holdout_ids": [s.image_id for s in prepared.holdout.samples],
            "skipped_images": [s.to_dict() for s in prepared.dataset.skipped],
            "duplicate_images": prepared.duplicates,
            "max_images": prepared.config.max_images,
        },
        "approach": {
            "strategy": approach.strategy,
            "features": approach.features,
            "slug": approach.slug,
            "label": approach.label,
            "detector": approach.detector if approach.retrains else "yolox-onnx",
        },
        "seed": seed,
        "oracle": {"tight_iou": config.tight_iou, "corrections": []},
        "batch_size": config.batch_size,
        "order": [pool.samples[int(i)].image_id for i in order],
        "batches": batch_records,
        "map_curve": map_curve,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "config": config.to_dict(),
        "train_config": train_config_dict(config.train),
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    refresh_corrections(result, config)
    return result


# ---------------------------------------------------------------------------------- the grid
@dataclass
class _DatasetKeys:
    """The run key a stored run of one dataset must carry to be reused.

    A run records the dataset's groups of identical images (``dataset.duplicate_images``); a
    run from before they were recorded is checked against the dataset's own groups, hashed
    once and only when such a run turns up.
    """

    config: ExperimentConfig
    dataset: DatasetConfig
    found: list[list[str]] | None = None

    def of(self, run: dict[str, Any]) -> str:
        groups = run.get("dataset", {}).get("duplicate_images")
        if groups is None:
            if self.found is None:
                self.found = dataset_duplicates(self.dataset)
            groups = self.found
        return run_key(self.config, self.dataset, groups)


def _cached(path: Path, config: ExperimentConfig, keys: _DatasetKeys) -> dict[str, Any] | None:
    """A finished run with the same run key, its corrections completed for this config's grid."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if data.get("schema") != SCHEMA or data.get("run_key") != keys.of(data):
        return None
    if refresh_corrections(data, config):
        write_json(path, data)
    return data


@dataclass(frozen=True)
class GridResult:
    output: Path
    runs: list[dict[str, Any]]
    ran: int
    reused: int
    report_files: list[Path]


@dataclass(frozen=True)
class _GridJob:
    """One run of the grid: what a worker process needs to compute and write it."""

    dataset: DatasetConfig
    approach: Approach
    seed: int
    path: Path


#: A worker process's prepared datasets, so consecutive runs on one dataset decode it once.
_WORKER_DATASETS: dict[DatasetConfig, PreparedDataset] = {}


def _run_job(job: _GridJob, config: ExperimentConfig) -> dict[str, Any]:
    """Compute and write one run in a worker process (see :attr:`ExperimentConfig.workers`)."""
    set_threads(config.threads)
    prepared = _WORKER_DATASETS.get(job.dataset)
    if prepared is None:
        _WORKER_DATASETS.clear()  # one dataset at a time: the pools of images are what is big
        prepared = _WORKER_DATASETS[job.dataset] = prepare_dataset(job.dataset)
    result = run_one(prepared, job.approach, job.seed, config, lambda message: None)
    write_json(job.path, result)
    return result


def _run_jobs_in_workers(
    jobs: list[_GridJob], config: ExperimentConfig, bar: tqdm
) -> dict[Path, dict[str, Any]]:
    """Run ``jobs`` in ``config.workers`` spawned processes; results keyed by their path.

    Spawned, not forked: torch's thread pools do not survive a fork. Each worker keeps the
    last dataset it decoded, and the jobs arrive grouped by dataset.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results: dict[Path, dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=config.workers, mp_context=context) as pool:
        futures = {pool.submit(_run_job, job, config): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            results[job.path] = future.result()
            bar.set_postfix_str(f"done {job.path.stem}")
            bar.update(1)
    return results


def run_grid(
    config: ExperimentConfig, *, force: bool = False, show_progress: bool = True
) -> GridResult:
    """Run (or reuse) every dataset × approach × seed, then write the report and plots.

    With ``config.workers > 1`` the runs still to do go to that many processes; each run's
    result is the same as in one process (a run seeds everything it draws from).
    """
    resolved_training(config)  # a wrong training setting stops the grid before it writes
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experiment.json", config.to_dict())
    set_threads(config.threads)
    total = len(config.datasets) * len(config.approaches) * len(config.seeds)
    done: dict[Path, dict[str, Any]] = {}
    order: list[Path] = []
    pending: list[_GridJob] = []
    reused = 0
    bar = tqdm(total=total, desc=config.name, unit="run", disable=not show_progress)
    for ds_config in config.datasets:
        keys = _DatasetKeys(config, ds_config)
        for approach in config.approaches:
            for seed in config.seeds:
                path = out / "runs" / f"{RunId(ds_config.display_name, approach, seed).slug}.json"
                order.append(path)
                cached = None if force else _cached(path, config, keys)
                if cached is not None:
                    done[path] = cached
                    reused += 1
                    bar.update(1)
                else:
                    pending.append(_GridJob(ds_config, approach, seed, path))
    if config.workers > 1 and len(pending) > 1:
        # Runs that train first, the quick ones last: they fill the tail while the last
        # training finishes, instead of leaving one worker idle (the order of the runs does not
        # change any run's result).
        pending.sort(key=lambda job: not job.approach.retrains)
        done.update(_run_jobs_in_workers(pending, config, bar))
    else:
        prepared: PreparedDataset | None = None
        for job in pending:
            if prepared is None or prepared.config != job.dataset:
                bar.set_postfix_str(f"loading {job.dataset.spec}")
                prepared = prepare_dataset(job.dataset)

            def progress(message: str, j: _GridJob = job) -> None:
                bar.set_postfix_str(
                    f"{j.dataset.display_name} {j.approach.slug} s{j.seed}: {message}"
                )

            result = run_one(prepared, job.approach, job.seed, config, progress)
            write_json(job.path, result)
            done[job.path] = result
            bar.update(1)
    bar.close()
    runs = [done[path] for path in order]
    files = write_report(out, config, runs)
    return GridResult(out, runs, len(pending), reused, files)
