"""The utility bench's configuration: datasets, distortions, labelers, predictor and seeds
(YAML keys = field names), and the ``--quick`` slice CI runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from backend.utility.distortions import (
    DEFAULT_JPEG_QUALITIES,
    Distortion,
)
from backend.utility.predictor import (
    PredictorConfig,
)
from benchmark.config import ConfigError, parse_seeds, reject_unknown_keys

__all__ = ["BASELINES", "COMBINED", "QUICK", "UtilityBenchConfig", "load_utility_config"]

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
        if not self.seeds:
            raise ConfigError("bench utility needs at least one seed")
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
    reject_unknown_keys(data, UtilityBenchConfig, "bench utility")
    values = dict(data)
    predictor = values.pop("predictor", {}) or {}
    try:
        pconfig = PredictorConfig(**predictor)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"predictor: {exc}") from exc
    if "seeds" in values:
        values["seeds"] = tuple(parse_seeds(values["seeds"]))
    for key in ("qualities", "heldout_qualities", "labelers"):
        if key in values:
            values[key] = tuple(int(v) for v in values[key])
    if "unseen" in values:
        values["unseen"] = tuple(str(v) for v in values["unseen"])
    if "datasets" in values:
        values["datasets"] = [
            d if isinstance(d, str) else str(d["spec"]) for d in values["datasets"]
        ]
    return UtilityBenchConfig(predictor=pconfig, **values)
