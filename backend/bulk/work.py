"""The picklable seams of bulk inference: what to run (a model spec), on what (work items),
and what comes back (item results).

Why specs and not loaded models: a Ray worker on another machine cannot receive an
onnxruntime session; it receives the spec and loads the model once per actor. The in-process
engine loads the same spec, so both paths run the same code on the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from backend.boxes import Boxes

__all__ = [
    "BatchModel",
    "DetectorSpec",
    "EncoderSpec",
    "ItemResult",
    "LoadedSpec",
    "ModelSpec",
    "WorkItem",
]


@dataclass(frozen=True)
class WorkItem:
    """One task to run: its id and its image reference (URL, ``/data/...`` path, local path)."""

    task_id: int
    reference: str


@dataclass(frozen=True)
class ItemResult:
    """One task's outcome: ``value`` (the model's output for its image) or ``error``."""

    task_id: int
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class BatchModel(Protocol):
    """A loaded model: one output per input image, in order."""

    def run(self, images: list[Image.Image]) -> list[Any]: ...


@runtime_checkable
class ModelSpec(Protocol):
    """Picklable description of a model; ``load`` builds it where it runs."""

    @property
    def name(self) -> str: ...

    def load(self) -> BatchModel: ...


class _DetectorModel:
    def __init__(self, detector: Any) -> None:
        self.detector = detector

    def run(self, images: list[Image.Image]) -> list[Boxes]:
        return list(self.detector.predict(images))


class _EncoderModel:
    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def run(self, images: list[Image.Image]) -> list[np.ndarray]:
        return list(self.encoder.extract(images, progress=False))


@dataclass(frozen=True)
class DetectorSpec:
    """An ONNX YOLOX detector mapped onto a project's labels (the pretrained COCO model, or a
    fine-tuned version's ``model.onnx``): outputs are :class:`~backend.boxes.Boxes`."""

    version: str
    model_path: Path
    class_names_path: Path | None
    labels: tuple[str, ...]
    class_map: tuple[tuple[int, int], ...] | None = None  # None: COCO names matched to labels
    score_threshold: float = 0.3
    nms_threshold: float = 0.45
    max_detections: int = 100
    num_threads: int = 1
    follow_aspect: bool = False  # the COCO model served with pretrained_input="aspect"
    class_names: tuple[str, ...] | None = None  # the model's classes, as loaded (not re-read)

    @property
    def name(self) -> str:
        return self.version

    @classmethod
    def from_detector(cls, detector: Any, *, num_threads: int = 1) -> DetectorSpec:
        """The spec that rebuilds a loaded :class:`OnnxYoloxDetector` (ValueError for others)."""
        model_path = getattr(detector, "model_path", None)
        if model_path is None:
            raise ValueError(
                f"{type(detector).__name__} was not loaded from an ONNX file: only ONNX "
                "detectors run on Ray (serve the version's model.onnx)"
            )
        return cls(
            version=str(detector.version),
            model_path=Path(model_path),
            class_names_path=getattr(detector, "class_names_path", None),
            labels=tuple(detector.labels),
            class_map=tuple(sorted(detector.class_map.items())),
            score_threshold=float(detector.score_threshold),
            nms_threshold=float(detector.nms_threshold),
            max_detections=int(detector.max_detections),
            num_threads=num_threads,
            follow_aspect=bool(getattr(detector, "follow_aspect", False)),
            class_names=tuple(detector.class_names),
        )

    def load(self) -> BatchModel:
        from backend.detectors.onnx_yolox import OnnxYoloxDetector

        detector = OnnxYoloxDetector.from_path(
            self.model_path,
            self.class_names_path,
            labels=list(self.labels),
            num_threads=self.num_threads,
            score_threshold=self.score_threshold,
            nms_threshold=self.nms_threshold,
            max_detections=self.max_detections,
            class_map=None if self.class_map is None else dict(self.class_map),
            follow_aspect=self.follow_aspect,
            class_names=None if self.class_names is None else list(self.class_names),
        )
        detector.version = self.version
        return _DetectorModel(detector)


@dataclass(frozen=True)
class EncoderSpec:
    """An exported image encoder (the orders' ImgNet / SimNet features): outputs are
    ``(dim,)`` float32 vectors."""

    name: str
    onnx_path: Path
    dim: int
    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    batch_size: int = 32
    num_threads: int = 1

    @classmethod
    def from_encoder(cls, encoder: Any, *, num_threads: int = 1) -> EncoderSpec:
        """The spec of a loaded :class:`~backend.features.base.OnnxImageEncoder`."""
        return cls(
            name=str(encoder.name),
            onnx_path=Path(encoder.onnx_path),
            dim=int(encoder.dim),
            size=tuple(encoder.size),  # type: ignore[arg-type]
            mean=tuple(encoder.mean),  # type: ignore[arg-type]
            std=tuple(encoder.std),  # type: ignore[arg-type]
            batch_size=int(encoder.batch_size),
            num_threads=num_threads,
        )

    def load(self) -> BatchModel:
        from backend.features.base import OnnxImageEncoder

        return _EncoderModel(
            OnnxImageEncoder(
                self.onnx_path,
                name=self.name,
                dim=self.dim,
                size=self.size,
                mean=self.mean,
                std=self.std,
                batch_size=self.batch_size,
                num_threads=self.num_threads,
            )
        )


@dataclass(frozen=True)
class LoadedSpec:
    """An already loaded detector or feature extractor, for the in-process engine only (a
    PyTorch version, a test double of the detector protocol). Not picklable by design."""

    name: str
    model: Any = field(compare=False)

    def load(self) -> BatchModel:
        if hasattr(self.model, "predict"):
            return _DetectorModel(self.model)
        if hasattr(self.model, "extract"):
            return _EncoderModel(self.model)
        raise TypeError(f"{type(self.model).__name__} has neither predict() nor extract()")

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{self.name}: a loaded model cannot be sent to another process; use a DetectorSpec "
            "or EncoderSpec"
        )
