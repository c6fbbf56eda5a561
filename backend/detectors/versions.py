"""Model versions on disk: written atomically, rebuilt without any pretrained file.

A version is a directory holding ``model.pt`` (the state dict) and ``metadata.json`` (the caller's
metadata plus ``arch``, the :class:`ArchSpec`, and ``labels``). It is first written into a hidden
sibling directory, flushed to disk, then renamed into place with ``os.replace``, so a reader sees
either no version or a complete one, never a half-written one, even if the writer is killed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend.detectors.base import Detector
from backend.detectors.fasterrcnn import ArchSpec, arch_spec_of, build_model
from backend.detectors.onnx_yolox import OnnxYoloxDetector
from backend.detectors.torch_detector import TorchDetector
from backend.detectors.yolox import YoloxNano, export_onnx
from backend.settings import Settings

__all__ = [
    "LABELS_FILE",
    "METADATA_FILE",
    "MODEL_FILE",
    "ONNX_FILE",
    "YOLOX_ARCH",
    "is_yolox_version",
    "load_model_version",
    "load_torch_detector",
    "load_version_detector",
    "read_metadata",
    "save_model_version",
    "update_metadata",
]

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
YOLOX_ARCH = "yolox_nano"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_version(directory: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(staging_dir)``, flush every file, then move the directory into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        write(staging)
        for path in staging.iterdir():
            _fsync_file(path)
        _fsync_dir(staging)
        if directory.exists():
            retired = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex}"
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _labels_of(metadata: dict[str, Any]) -> list[str]:
    labels = metadata.get("labels")
    if not isinstance(labels, Sequence) or isinstance(labels, str):
        raise ValueError("metadata['labels'] must list the label names")
    return [str(name) for name in labels]


def save_model_version(model: nn.Module, directory: Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` and ``metadata`` as the version directory ``directory``; returns it.

    ``metadata["labels"]`` (the project's label names, in class order) is required and must fit
    the model's class count. A YOLOX-Nano version also needs ``metadata["input_hw"]`` (its
    letterbox shape) and gets ``model.onnx`` (what serves it, through onnxruntime) and
    ``labels.txt`` beside the state dict. An existing ``directory`` (e.g. left by a job that
    crashed before recording it) is replaced as a whole.
    """
    labels = _labels_of(metadata)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if isinstance(model, YoloxNano):
        if len(labels) != model.num_classes:
            raise ValueError(f"{len(labels)} labels but the model has {model.num_classes} classes")
        input_hw = metadata.get("input_hw")
        if not (isinstance(input_hw, Sequence) and len(input_hw) == 2):
            raise ValueError("a YOLOX version needs metadata['input_hw'] = (height, width)")
        hw = (int(input_hw[0]), int(input_hw[1]))
        arch: dict[str, Any] = {"arch": YOLOX_ARCH, "num_classes": model.num_classes}
        full = {**metadata, "labels": labels, "arch": arch, "input_hw": list(hw)}

        def write(staging: Path) -> None:
            torch.save(state, staging / MODEL_FILE)
            export_onnx(model, staging / ONNX_FILE, hw)
            (staging / LABELS_FILE).write_text("\n".join(labels) + "\n")
            (staging / METADATA_FILE).write_text(
                json.dumps(full, indent=2, sort_keys=True, default=str)
            )

        return _write_version(directory, write)
    spec = arch_spec_of(model)
    if len(labels) + 1 != spec.num_classes:
        raise ValueError(
            f"{len(labels)} labels but the model has {spec.num_classes - 1} classes (+ background)"
        )
    full = {**metadata, "labels": labels, "arch": spec.to_dict()}

    def write_torchvision(staging: Path) -> None:
        torch.save(state, staging / MODEL_FILE)
        (staging / METADATA_FILE).write_text(
            json.dumps(full, indent=2, sort_keys=True, default=str)
        )

    return _write_version(directory, write_torchvision)


def update_metadata(directory: Path, **values: Any) -> dict[str, Any]:
    """Add ``values`` to a version's metadata (atomic replace of ``metadata.json``)."""
    metadata = read_metadata(directory)
    metadata.update(values)
    path = Path(directory) / METADATA_FILE
    tmp = path.with_suffix(f".tmp-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    _fsync_file(tmp)
    os.replace(tmp, path)
    return metadata


def is_yolox_version(metadata: dict[str, Any]) -> bool:
    return str(metadata.get("arch", {}).get("arch")) == YOLOX_ARCH


def read_metadata(directory: Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model version at {directory} ({METADATA_FILE} missing)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "arch" not in data or "labels" not in data:
        raise ValueError(f"{path} is not a boxloop model version (needs 'arch' and 'labels')")
    return data


def load_model_version(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, metadata)`` of a saved version; the PyTorch model in eval mode on the CPU."""
    metadata = read_metadata(directory)
    state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    model: nn.Module
    if is_yolox_version(metadata):
        model = YoloxNano(num_classes=int(metadata["arch"]["num_classes"]))
    else:
        model = build_model(ArchSpec.from_dict(metadata["arch"]), pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.eval(), metadata


def load_torch_detector(directory: Path, settings: Settings) -> TorchDetector:
    """A :class:`TorchDetector` serving the torchvision version in ``directory``."""
    model, metadata = load_model_version(directory)
    version = str(metadata.get("version") or Path(directory).name)
    return TorchDetector.from_settings(model, list(metadata["labels"]), version, settings)


def load_version_detector(
    directory: Path, settings: Settings, *, score_floor: float | None = None
) -> Detector:
    """The detector that serves the version in ``directory``.

    YOLOX versions are served from their ``model.onnx`` through onnxruntime (the pretrained
    model's path, several times faster than eager PyTorch here) at the score threshold the
    promotion gate chose for them (``metadata["score_threshold"]``; a version that costs more
    than drawing by hand at every threshold has ``serves_boxes`` false and predicts nothing; a
    tie serves). ``score_floor`` overrides the threshold (the gate scores candidates down to a
    low floor).
    """
    metadata = read_metadata(directory)
    version = str(metadata.get("version") or Path(directory).name)
    if not is_yolox_version(metadata):
        return load_torch_detector(directory, settings)
    threshold = score_floor
    if threshold is None:
        chosen = metadata.get("score_threshold")
        threshold = float(chosen) if chosen is not None else settings.score_threshold
        if metadata.get("serves_boxes") is False:
            threshold = math.inf
    detector = OnnxYoloxDetector.from_path(
        Path(directory) / ONNX_FILE,
        Path(directory) / LABELS_FILE,
        labels=list(metadata["labels"]),
        num_threads=settings.num_threads,
        score_threshold=threshold,
        max_detections=settings.max_detections,
        class_map={i: i for i in range(len(metadata["labels"]))},
        class_names=list(metadata["labels"]),  # labels.txt loses a blank or multi-line label
    )
    detector.version = version
    return detector
