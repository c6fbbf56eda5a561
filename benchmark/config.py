"""A typed experiment grid, read from YAML or built from command-line flags.

A grid is datasets × approaches × seeds. One *run* (one dataset, approach and
seed) orders the pool, labels B1 by hand and loops train → predict → correct
over B2..Bn. Everything the annotator simulation adds on top — IoU τ, the
score threshold the annotator sees, T, the paper's or the strict convention —
is applied afterwards to the stored predictions, because none of it changes
what the model is trained on (each corrected batch becomes its ground truth).
So those lists cost no training time and are evaluated for every run.

YAML keys mirror :class:`ExperimentConfig`; see ``benchmark/configs/*.yaml``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

#: Strategies the ordering engine provides and that need a trained model per round.
LOOP_STRATEGIES = ("random", "similar", "dissimilar", "temporal")
#: Baselines with no retraining.
PRETRAINED = "pretrained"
FEATURES = ("imgnet", "simnet")
_SHORT = {"random": "Shuffle", "similar": "Sim", "dissimilar": "Dis", "temporal": "Temporal"}
_FEATURE_NAMES = {"imgnet": "ImgNet", "simnet": "SimNet"}
#: Treatments of ignored ground truth (VOC difficult, KITTI DontCare, COCO crowds):
#: "excluded" — neither drawn nor counted, predictions on them cost nothing (each dataset's
#: own evaluation protocol); "counted" — every ignored object (difficult, crowd) is a box to
#: draw, as in the paper's object counts; DontCare regions stay excluded, as they are from the
#: paper's KITTI count (see :mod:`benchmark.corrections`).
IgnoredObjects = Literal["excluded", "counted"]
IGNORED_OBJECTS: tuple[IgnoredObjects, ...] = ("excluded", "counted")
#: Detectors a retraining approach can loop with: the product's default (the COCO YOLOX-Nano,
#: fine-tuned with the promotion gate) and the ImageNet Faster R-CNN it replaced (comparison row).
DETECTORS = ("yolox", "fasterrcnn")


class ConfigError(ValueError):
    """The experiment configuration is inconsistent; the message names the key."""


def reject_unknown_keys(data: Mapping[str, Any], config_class: type, what: str) -> None:
    """A :class:`ConfigError` naming every key of ``data`` that is no field of the dataclass
    ``config_class`` (a typo in a YAML grid would otherwise be ignored without a word)."""
    known = {f.name for f in fields(config_class)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown keys {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class Approach:
    """How the pool is ordered and pre-annotated.

    ``strategy`` is an ordering strategy of :mod:`backend.ordering`, or
    ``"pretrained"``: the COCO YOLOX-Nano ONNX model pre-annotates every batch
    (B1 included) and is never retrained, in a random order.
    """

    strategy: str
    features: str | None = None
    detector: str = "yolox"

    def __post_init__(self) -> None:
        if self.detector not in DETECTORS:
            raise ConfigError(f"unknown detector {self.detector!r}; use one of {DETECTORS}")
        if self.strategy not in (*LOOP_STRATEGIES, PRETRAINED):
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; use one of {[*LOOP_STRATEGIES, PRETRAINED]}"
            )
        needs_features = self.strategy in ("similar", "dissimilar")
        if needs_features and self.features not in FEATURES:
            raise ConfigError(f"strategy {self.strategy!r} needs features in {FEATURES}")
        if not needs_features and self.features is not None:
            object.__setattr__(self, "features", None)  # random/temporal/pretrained ignore features

    @property
    def retrains(self) -> bool:
        return self.strategy != PRETRAINED

    @property
    def label(self) -> str:
        """The row name in the tables, as in the paper: ``Shuffle``, ``Dis (ImgNet)``, ..."""
        if self.strategy == PRETRAINED:
            return "Pretrained only (YOLOX-Nano)"
        short = _SHORT[self.strategy]
        name = f"{short} ({_FEATURE_NAMES[self.features]})" if self.features else short
        return name if self.detector == "yolox" else f"{name}, Faster R-CNN (ImageNet)"

    @property
    def spec(self) -> str:
        """The form :meth:`parse` reads back: ``"dissimilar:imgnet"``, ``"random@fasterrcnn"``."""
        base = self.strategy if self.features is None else f"{self.strategy}:{self.features}"
        return base if self.detector == "yolox" else f"{base}@{self.detector}"

    @property
    def slug(self) -> str:
        base = self.strategy if self.features is None else f"{self.strategy}-{self.features}"
        return base if self.detector == "yolox" else f"{base}-{self.detector}"

    @classmethod
    def parse(cls, value: Any) -> Approach:
        """From ``"dissimilar:imgnet"``, ``"random"``, ``"pretrained"`` or a mapping."""
        if isinstance(value, Approach):
            return value
        if isinstance(value, dict):
            return cls(
                str(value.get("strategy")),
                value.get("features"),
                str(value.get("detector", "yolox")),
            )
        if isinstance(value, str):
            head, _, detector = value.partition("@")
            strategy, _, features = head.partition(":")
            return cls(strategy.strip(), features.strip() or None, detector.strip() or "yolox")
        raise ConfigError(f"cannot read an approach from {value!r}")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the grid.

    ``holdout`` images (a fraction if < 1, else a count) are set aside, with
    ``holdout_seed``, for the mAP curve; the rest is the pool to label.
    ``max_images`` caps the dataset first (a seeded sample, same for every run).
    """

    spec: str
    name: str | None = None
    max_images: int | None = None
    holdout: float = 0.2
    holdout_seed: int = 0

    def __post_init__(self) -> None:
        from benchmark.datasets import parse_spec

        try:
            parse_spec(self.spec)  # syntax only: the files are read when the dataset is loaded
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        object.__setattr__(self, "holdout", float(self.holdout))  # 4 and 4.0 are one setting
        if self.holdout < 0:
            raise ConfigError(f"{self.spec}: holdout must be >= 0")
        if self.max_images is not None and self.max_images < 2:
            raise ConfigError(f"{self.spec}: max_images must be >= 2")

    @property
    def display_name(self) -> str:
        """``name``, else ``<format>:<last path part>`` (``kitti:tiny``, ``voc:VOC2012``)."""
        if self.name:
            return self.name
        kind, _, rest = self.spec.partition(":")
        path = rest.partition("?")[0].rstrip("/")
        stem = Path(path).stem if Path(path).suffix == ".json" else Path(path).name
        return f"{kind}:{stem}"

    def holdout_count(self, n_images: int) -> int:
        count = round(self.holdout * n_images) if self.holdout < 1 else int(self.holdout)
        if count >= n_images:
            raise ConfigError(f"{self.spec}: holdout {self.holdout} leaves no pool of {n_images}")
        return count


def _file_name_form(name: str) -> str:
    """How a dataset name ends up in a run file's name: the harnesses replace what is not a
    letter or digit (the box bench: anything but letters and digits), and a file system may
    ignore case."""
    return "".join(ch if ch.isalnum() else "_" for ch in name).casefold()


def check_distinct_names(datasets: Iterable[DatasetConfig]) -> None:
    """A :class:`ConfigError` when two datasets of a grid share a name (or a run-file name).

    Why: run files, caches and report rows are keyed by :attr:`DatasetConfig.display_name`, so
    two datasets named alike (one folder with another ``?split=``, ``labels=`` or
    ``max_images``) would write the same files, one run overwriting the other's.
    """
    seen: dict[str, DatasetConfig] = {}
    for dataset in datasets:
        other = seen.setdefault(_file_name_form(dataset.display_name), dataset)
        if other is not dataset:
            names = {other.display_name, dataset.display_name}
            raise ConfigError(
                f"datasets {other.spec!r} and {dataset.spec!r} are both named "
                f"{' / '.join(repr(n) for n in sorted(names))}, so their runs would overwrite "
                "each other's files: give each dataset entry its own `name:` "
                "(a mapping with `spec:` and `name:` instead of a bare spec)"
            )


@dataclass(frozen=True)
class PretrainedConfig:
    """The inference-only COCO detector (paths default to the shared YOLOX-Nano model)."""

    model: str = "$BOXLOOP_SHARED_DATA/models/yolox_nano_coco/yolox_nano.onnx"
    classes: str = "$BOXLOOP_SHARED_DATA/models/yolox_nano_coco/coco_classes.txt"
    # the backend's ``pretrained_input``: "square" (the file's 416² input) or "aspect"
    input: str = "square"

    def __post_init__(self) -> None:
        if self.input not in ("square", "aspect"):
            raise ConfigError(f"pretrained.input must be square or aspect, not {self.input!r}")

    def key(self) -> dict[str, str]:
        """What enters a run key: the default input is left out, so runs stored before the
        option existed keep their keys."""
        out = asdict(self)
        if self.input == "square":
            del out["input"]
        return out


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole grid. Lists on the evaluation side (τ, score, T) are free, see the module doc."""

    name: str
    datasets: list[DatasetConfig]
    approaches: list[Approach]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    batch_size: int = 10
    baselines: bool = True
    iou_thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7])
    score_thresholds: list[float] = field(default_factory=lambda: [0.5])
    seconds_per_box: list[float] = field(default_factory=lambda: [7.0, 35.0])
    removal_fraction: float = 0.5
    adjustment_fraction: float = 0.5
    tight_iou: float = 0.85
    #: Which ignored ground truth (VOC difficult, KITTI DontCare, COCO crowd) the main tables
    #: use: "excluded" (each dataset's own protocol) or "counted" (the paper's object counts:
    #: difficult and crowd objects drawn, DontCare never); the report shows the other beside it.
    ignored_objects: IgnoredObjects = "excluded"
    prediction_floor: float = 0.05
    final_round: bool = True
    #: Each round's model continues from the last one: the Faster R-CNN loop from the previous
    #: model, the YOLOX loop from the serving version (the product's ``yolox_warm_start``).
    warm_start: bool = True
    threads: int = 2
    #: Runs in flight at once, each in its own process with ``threads`` threads. On a 2-core
    #: machine two single-thread workers finish a grid sooner than one two-thread process,
    #: because most of a run (letterboxing, the oracle, the gate's scoring) is not parallel.
    #: Not part of the run key: a run's result does not depend on it.
    workers: int = 1
    train: dict[str, Any] = field(default_factory=dict)
    yolox: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    output: str = "benchmark/results/latest"

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("no datasets")
        check_distinct_names(self.datasets)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.workers < 1 or self.threads < 1:
            raise ConfigError(
                f"workers and threads must be >= 1, got {self.workers}, {self.threads}"
            )
        for tau in self.iou_thresholds:
            if not 0 < tau <= 1:
                raise ConfigError(f"iou threshold {tau} outside (0, 1]")
        for score in self.score_thresholds:
            if score < self.prediction_floor:
                raise ConfigError(
                    f"score threshold {score} below prediction_floor {self.prediction_floor}: "
                    "predictions under the floor are not stored"
                )
        if self.ignored_objects not in IGNORED_OBJECTS:
            raise ConfigError(
                f"ignored_objects must be one of {IGNORED_OBJECTS}, got {self.ignored_objects!r}"
            )
        if len(set(self.score_thresholds)) != len(self.score_thresholds):
            raise ConfigError(f"score thresholds repeat: {self.score_thresholds}")
        if any(t <= 0 for t in self.seconds_per_box) or not self.seconds_per_box:
            raise ConfigError("seconds_per_box must hold positive values")
        approaches = list(dict.fromkeys(self.approaches))
        if self.baselines:
            for baseline in (Approach("random"), Approach(PRETRAINED)):
                if baseline not in approaches:
                    approaches.insert(0, baseline)
        if not approaches:
            raise ConfigError("no approaches")
        object.__setattr__(self, "approaches", approaches)

    # ------------------------------------------------------------------ views
    @property
    def output_dir(self) -> Path:
        from benchmark.datasets import expand_path

        return expand_path(self.output)

    def run_key(self, dataset: DatasetConfig, resolved_train: dict[str, Any] | None = None) -> str:
        """Hash of everything that changes a run's trained models and predictions on ``dataset``.

        Evaluation-side settings (τ, score thresholds, T, conventions) are left
        out, so changing them re-reports cached runs instead of re-running them.
        ``resolved_train`` is the full training config after defaults, so a changed
        backend default also invalidates cached runs.
        """
        relevant = {
            "dataset": asdict(dataset),
            "resolved_train": resolved_train,
            "batch_size": self.batch_size,
            "prediction_floor": self.prediction_floor,
            "final_round": self.final_round,
            "warm_start": self.warm_start,
            "train": self.train,
            "yolox": self.yolox,
            "gate": self.gate,
            "features": self.features,
            "pretrained": self.pretrained.key(),
        }
        return hashlib.sha256(
            json.dumps(relevant, sort_keys=True, default=str).encode()
        ).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["approaches"] = [a.spec for a in self.approaches]
        return data

    def with_overrides(self, **changes: Any) -> ExperimentConfig:
        return replace(self, **changes)


def parse_dataset(value: Any) -> DatasetConfig:
    """One dataset entry of a grid: a spec, or a mapping of :class:`DatasetConfig` fields
    (unknown keys refused, so a typo is an error instead of a ``TypeError``)."""
    if isinstance(value, str):
        return DatasetConfig(spec=value)
    if isinstance(value, dict):
        reject_unknown_keys(value, DatasetConfig, f"dataset {value.get('spec')!r}")
        if "spec" not in value:
            raise ConfigError(f"dataset entry {value!r} needs a 'spec'")
        return DatasetConfig(**value)
    raise ConfigError(f"cannot read a dataset from {value!r}")


def config_from_dict(data: dict[str, Any], default_name: str = "experiment") -> ExperimentConfig:
    """Build and validate a config from a mapping (a parsed YAML file)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config must be a mapping, got {type(data).__name__}")
    reject_unknown_keys(data, ExperimentConfig, "config")
    values = dict(data)
    values.setdefault("name", default_name)
    values["datasets"] = parse_datasets(values.get("datasets"))
    values["approaches"] = [
        Approach.parse(a) for a in _as_list(values.get("approaches", []), "approaches")
    ]
    if "seeds" in values:
        values["seeds"] = parse_seeds(values["seeds"])
    for key in ("iou_thresholds", "score_thresholds", "seconds_per_box"):
        if key in values:
            values[key] = _as_list(values[key], key)
    if isinstance(values.get("pretrained"), dict):
        values["pretrained"] = PretrainedConfig(**values["pretrained"])
    for key in ("train", "yolox", "gate", "features"):
        if key in values and not isinstance(values[key], dict):
            raise ConfigError(f"{key!r} must be a mapping")
    return ExperimentConfig(**values)


def parse_datasets(value: Any) -> list[DatasetConfig]:
    """A grid's ``datasets``: one entry or a list of them (see :func:`parse_dataset`)."""
    return [parse_dataset(d) for d in _as_list(value, "datasets")]


def parse_seeds(value: Any) -> list[int]:
    """A grid's ``seeds``: a list of seeds, or a count N for seeds 0..N-1 (``seeds: 3``).

    Refused when empty or repeated: a grid without seeds runs nothing (and a bench finding no
    run fails only after its costly first stage), and a repeated seed repeats a run.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        seeds: Any = list(range(value))
    else:
        seeds = _as_list(value, "seeds")
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"seeds must be integers or a count, got {value!r}") from exc
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct and non-empty, got {seeds}")
    return seeds


def _as_list(value: Any, key: str) -> list[Any]:
    if value is None:
        raise ConfigError(f"{key!r} is required")
    return list(value) if isinstance(value, list | tuple) else [value]


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (an empty file is ``{}``); a :class:`ConfigError` naming
    the file when it cannot be read, is no YAML or holds no mapping, so every bench reports a
    broken grid file as one line instead of a traceback."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: config must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path) -> ExperimentConfig:
    """Read a YAML experiment grid."""
    return config_from_dict(load_yaml_mapping(path), default_name=Path(path).stem)
