"""The product's train → gate → predict loop, as the harness replays it.

Each round calls :func:`backend.training.gate.run_round` — the function a training job calls —
on every image labelled so far: it fine-tunes the COCO YOLOX-Nano from its pretrained weights,
holds back the same kind of validation slice, scores candidate and serving version with the
backend's oracle and promotes only a better candidate. The serving version (the COCO model
mapped to the dataset's labels until a candidate wins) predicts the next batch, exactly as the
backend would pre-annotate it, at the threshold the gate chose for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from backend.boxes import Boxes
from backend.detectors import Detector
from backend.detectors.versions import load_version_detector
from backend.detectors.yolox import YoloxNano, load_coco_yolox_nano
from backend.registry import ModelRegistry
from backend.settings import Settings, load_settings
from backend.store import Store
from backend.training.gate import GateConfig, LabeledImage, RoundOutcome, run_round
from backend.training.yolox_train import YoloxTrainConfig, initial_yolox

__all__ = ["ProductLoop", "check_floor", "gate_config", "yolox_config"]


def yolox_config(overrides: dict[str, Any], seed: int = 0, threads: int = 2) -> YoloxTrainConfig:
    """The backend's default YOLOX schedule (from settings) with the grid's overrides."""
    return YoloxTrainConfig.from_settings(
        load_settings(), **{"threads": threads, **overrides, "seed": seed}
    )


def gate_config(overrides: dict[str, Any]) -> GateConfig:
    base = GateConfig.from_settings(load_settings())
    values = {**base.to_dict(), **overrides}
    values["thresholds"] = tuple(values["thresholds"])
    return GateConfig(**values)


def check_floor(floor: float, gate: GateConfig) -> None:
    """Refuse a prediction floor above the gate's lowest threshold or its score floor.

    The loop keeps the serving version's boxes down to ``floor`` only: above the gate's
    ``score_floor`` the serving version would be scored on fewer boxes than the candidate, and
    above its lowest threshold a version served there would pre-annotate with boxes missing.
    """
    lowest = min((gate.score_floor, *gate.thresholds))
    if floor > lowest:
        raise ValueError(
            f"prediction_floor {floor} is above the gate's lowest score {lowest} "
            f"(score_floor {gate.score_floor}, thresholds from {min(gate.thresholds)}): the "
            "serving version's boxes below the floor are not kept; lower prediction_floor"
        )


@dataclass
class _Serving:
    version: str
    directory: Path | None  # None: the pretrained COCO model (or nothing)
    threshold: float | None  # what the product serves at; None: serves no boxes
    detector: Detector | None  # down to the prediction floor
    #: Keys of the images it trained on: the gate never scores it on them.
    trained_on: frozenset[int | str] = frozenset()
    #: Its PyTorch model (a trained version), for the next candidate to continue from.
    model: YoloxNano | None = None


class ProductLoop:
    """One campaign's model history: the serving version and each round's gate decision."""

    def __init__(
        self,
        labels: Sequence[str],
        workdir: Path,
        *,
        onnx_model: Path,
        class_names: Path | None,
        pretrained_input: str = "square",
        floor: float,
        yolox: dict[str, Any],
        gate: dict[str, Any],
        seed: int,
        threads: int,
        warm_start: bool = True,
    ) -> None:
        self.gate = gate_config(gate)
        check_floor(floor, self.gate)
        self.labels = list(labels)
        self.warm_start = warm_start
        self.workdir = Path(workdir)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        self.floor = floor
        self.seed = seed
        self.threads = threads
        self.yolox_overrides = yolox
        self.settings: Settings = load_settings(
            data_dir=self.workdir,
            onnx_model_path=onnx_model,
            onnx_class_names_path=class_names,
            num_threads=threads,
            pretrained_input=pretrained_input,
        )
        # The registry's own view of "the pretrained model mapped to the labels".
        self._registry = ModelRegistry(self.settings, Store(self.settings.resolved_database_url))
        coco, names = load_coco_yolox_nano(onnx_model)
        self.init: YoloxNano = initial_yolox(coco, names, self.labels)
        pretrained = self._registry.pretrained_for(self.labels, score_threshold=floor)
        self.serving = _Serving(
            version="pretrained" if pretrained is not None else "manual",
            directory=None,
            threshold=self.settings.score_threshold if pretrained is not None else None,
            detector=pretrained,
        )
        self.rounds: list[RoundOutcome] = []

    def predict(self, images: Sequence[Image.Image]) -> list[Boxes] | None:
        """The serving model's boxes down to the floor; None while nothing serves (draw)."""
        if self.serving.detector is None:
            return None
        return self.serving.detector.predict(list(images))

    def round(
        self,
        items: Sequence[tuple[str, Image.Image, Boxes]],
        number: int,
        unlabeled: Sequence[Image.Image] = (),
    ) -> RoundOutcome:
        """Train on every labelled image, gate, and swap the candidate in if promoted.

        ``unlabeled``: pool images not labelled yet, on which a cross-validation round carries
        its threshold to the candidate (as the training job does with unannotated tasks).
        """
        serving = self.serving.detector
        floor = self.gate.score_floor
        directory = self.workdir / f"v{number}"
        # as the training job does (Settings.yolox_warm_start): continue from a trained version
        warm = self.serving.model if self.warm_start else None
        outcome = run_round(
            [LabeledImage(key, image, boxes.kept()) for key, image, boxes in items],
            self.labels,
            init=self.init if warm is None else warm,
            # as the product scores it: down to the gate's floor, not the loop's lower one
            serving_predict=None
            if serving is None
            else lambda ims: [b.above(floor) for b in serving.predict(list(ims))],
            directory=directory,
            metadata={"version": f"bench-v{number}", "labels": self.labels},
            settings=self.settings,
            train_config=yolox_config(
                self.yolox_overrides, seed=self.seed * 1000 + number, threads=self.threads
            ),
            gate=self.gate,
            unlabeled=unlabeled,
            serving_trained_on=self.serving.trained_on,
            init_trained_on=self.serving.trained_on if warm is not None else (),
        )
        self.rounds.append(outcome)
        if outcome.promoted:
            self.serving = _Serving(
                version=f"v{number}",
                directory=directory,
                threshold=outcome.threshold if outcome.serves_boxes else None,
                detector=load_version_detector(directory, self.settings, score_floor=self.floor),
                trained_on=frozenset(outcome.trained_on),
                model=outcome.candidate,
            )
        return outcome
