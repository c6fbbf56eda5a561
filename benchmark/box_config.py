"""The box-level bench's configuration: one grid's datasets, approaches and schedule (YAML).

Its own module so that the campaign runner (:mod:`benchmark.box_al`) and the report
(:mod:`benchmark.box_report`) both read it without importing each other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from backend.active import check_measure
from benchmark.config import (
    ConfigError,
    DatasetConfig,
    check_distinct_names,
    load_yaml_mapping,
    parse_datasets,
    parse_seeds,
    reject_unknown_keys,
)

__all__ = ["QUICK", "QUICK_DATASET", "BoxBenchConfig", "load_box_config", "load_box_yaml"]

#: ``--quick``: a tiny campaign that shows the whole path in CI.
QUICK: dict[str, Any] = {
    "seeds": [0],
    "episodes": 2,
    "box_measures": ["uncertainty", "coreset"],
    "image_measures": ["uncertainty"],
    "yolox": {"image_visits": 48, "min_epochs": 2, "max_epochs": 4, "input_area": 256 * 192},
}
QUICK_DATASET = {"max_images": 16, "holdout": 4}


@dataclass(frozen=True)
class BoxBenchConfig:
    """One box-level experiment grid (YAML keys = field names)."""

    datasets: tuple[DatasetConfig, ...]
    name: str = "box"
    output: str = "benchmark/results/box"
    seeds: tuple[int, ...] = (0, 1, 2)
    box_measures: tuple[str, ...] = ("random", "uncertainty", "coreset")
    image_measures: tuple[str, ...] = ("random", "uncertainty")
    init_fraction: float = 0.1
    min_init_images: int = 2
    episodes: int = 4
    k_fraction: float = 0.1
    t_d: float = 0.1
    noisy_weight: float = 0.5
    background_weight: float = 1.0
    #: Each episode's model continues from the last one (the product's
    #: ``BOXLOOP_YOLOX_WARM_START``) instead of restarting from the COCO weights with the same
    #: image visits however many images are labelled.
    warm_start: bool = False
    yolox: dict[str, Any] = field(default_factory=dict)
    threads: int = 2
    model: str = "$BOXLOOP_SHARED_DATA/models/yolox_nano_coco/yolox_nano.onnx"

    def __post_init__(self) -> None:
        for m in (*self.box_measures, *self.image_measures):
            try:
                check_measure(m)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        if not 0 < self.init_fraction < 1 or not 0 < self.k_fraction <= 1:
            raise ConfigError("init_fraction must be in (0, 1) and k_fraction in (0, 1]")
        if self.episodes < 1 or not self.datasets:
            raise ConfigError("a box bench needs datasets and at least one episode")
        if not self.seeds:
            raise ConfigError("a box bench needs at least one seed")
        check_distinct_names(self.datasets)

    @property
    def approaches(self) -> list[str]:
        return [f"box:{m}" for m in self.box_measures] + [f"image:{m}" for m in self.image_measures]

    def run_key(
        self, dataset: DatasetConfig, seed: int, duplicates: Sequence[Sequence[str]] = ()
    ) -> str:
        """Everything that changes a dataset-seed's campaigns but the list of approaches: a run
        file holds one curve per approach, and a grid with more approaches adds theirs to it.

        ``duplicates``: the dataset's groups of byte-identical images, which the split keeps on
        one side (``benchmark.runner.prepare_dataset``); a dataset with none keeps the key it
        had before they were grouped, one with some gets a new one (its old runs split twins
        between pool and held-out images).
        """
        skip = ("name", "output", "seeds", "box_measures", "image_measures")
        data = {k: v for k, v in self.to_dict().items() if k not in skip}
        if not self.warm_start:  # the grids from before the key keep their run keys
            del data["warm_start"]
        data["datasets"] = [asdict(dataset)]
        data["seed"] = seed
        if duplicates:
            data["duplicate_images"] = [list(group) for group in duplicates]
        text = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["datasets"] = [asdict(d) for d in self.datasets]
        return out


def load_box_config(data: dict[str, Any]) -> BoxBenchConfig:
    """A :class:`BoxBenchConfig` from a YAML mapping (unknown keys are an error)."""
    reject_unknown_keys(data, BoxBenchConfig, "box bench")
    values = dict(data)
    datasets = values.pop("datasets", [])
    if not datasets:
        raise ConfigError("a box bench needs at least one dataset")
    parsed = tuple(parse_datasets(datasets))
    if "seeds" in values:
        values["seeds"] = tuple(parse_seeds(values["seeds"]))
    for key in ("box_measures", "image_measures"):
        if key in values:
            values[key] = tuple(values[key])
    return BoxBenchConfig(datasets=parsed, **values)


def load_box_yaml(path: Path) -> BoxBenchConfig:
    return load_box_config(load_yaml_mapping(path))
