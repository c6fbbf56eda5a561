"""Model versions on disk: written atomically, rebuilt without any pretrained file.

A version is a directory holding ``model.pt`` (the state dict) and ``metadata.json`` (the caller's
metadata plus ``arch``, the :class:`ArchSpec`, and ``labels``). It is first written into a hidden
sibling directory, flushed to disk, then renamed into place with ``os.replace``, so a reader sees
either no version or a complete one, never a half-written one, even if the writer is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend.detectors.fasterrcnn import ArchSpec, arch_spec_of, build_model
from backend.detectors.torch_detector import TorchDetector
from backend.settings import Settings

__all__ = [
    "METADATA_FILE",
    "MODEL_FILE",
    "load_model_version",
    "load_torch_detector",
    "read_metadata",
    "save_model_version",
]

MODEL_FILE = "model.pt"
METADATA_FILE = "metadata.json"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model_version(model: nn.Module, directory: Path, metadata: dict[str, Any]) -> Path:
    """Write ``model`` and ``metadata`` as the version directory ``directory``; returns it.

    ``metadata["labels"]`` (the project's label names, in class order) is required and must fit
    the model's class count. An existing ``directory`` (e.g. left by a job that crashed before
    recording it) is replaced as a whole.
    """
    spec = arch_spec_of(model)
    labels = metadata.get("labels")
    if not isinstance(labels, Sequence) or isinstance(labels, str):
        raise ValueError("metadata['labels'] must list the label names")
    if len(labels) + 1 != spec.num_classes:
        raise ValueError(
            f"{len(labels)} labels but the model has {spec.num_classes - 1} classes (+ background)"
        )
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, staging / MODEL_FILE)
        full = {**metadata, "labels": list(labels), "arch": spec.to_dict()}
        (staging / METADATA_FILE).write_text(
            json.dumps(full, indent=2, sort_keys=True, default=str)
        )
        for name in (MODEL_FILE, METADATA_FILE):
            _fsync_file(staging / name)
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


def read_metadata(directory: Path) -> dict[str, Any]:
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no model version at {directory} ({METADATA_FILE} missing)")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "arch" not in data or "labels" not in data:
        raise ValueError(f"{path} is not a boxloop model version (needs 'arch' and 'labels')")
    return data


def load_model_version(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(model, metadata)`` of a saved version; the model is in eval mode on the CPU."""
    metadata = read_metadata(directory)
    spec = ArchSpec.from_dict(metadata["arch"])
    model = build_model(spec, pretrained=False)
    state = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval(), metadata


def load_torch_detector(directory: Path, settings: Settings) -> TorchDetector:
    """A :class:`TorchDetector` serving the version in ``directory`` with the settings' knobs."""
    model, metadata = load_model_version(directory)
    version = str(metadata.get("version") or Path(directory).name)
    return TorchDetector.from_settings(model, list(metadata["labels"]), version, settings)
