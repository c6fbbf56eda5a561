"""Detectors: the :class:`Detector` protocol, the trainable torchvision models and the ONNX YOLOX.

``build_detector_for`` builds the detector for a project from settings alone: a version directory
when given, else the COCO YOLOX mapped to the project's labels, else nothing. The server's
:class:`backend.registry.ModelRegistry` makes the same choice, with the models cached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from backend.detectors.base import Detector
from backend.detectors.fasterrcnn import (
    ARCH_ALIASES,
    ArchName,
    ArchSpec,
    EffNetFPNBackbone,
    arch_spec_of,
    build_model,
    configure_inference,
    replace_class_head,
    resolve_arch,
    set_input_size,
)
from backend.detectors.label_names import canonical_name, map_class_names
from backend.detectors.onnx_yolox import OnnxYoloxDetector
from backend.detectors.pretrained import load_pretrained
from backend.detectors.torch_detector import TorchDetector
from backend.detectors.versions import (
    load_model_version,
    load_torch_detector,
    load_version_detector,
    read_metadata,
    save_model_version,
)
from backend.detectors.weights import WeightsNotFoundError
from backend.settings import Settings

__all__ = [
    "ARCH_ALIASES",
    "ArchName",
    "ArchSpec",
    "Detector",
    "EffNetFPNBackbone",
    "OnnxYoloxDetector",
    "TorchDetector",
    "WeightsNotFoundError",
    "arch_spec_of",
    "build_detector_for",
    "build_model",
    "canonical_name",
    "configure_inference",
    "load_model_version",
    "load_torch_detector",
    "load_version_detector",
    "map_class_names",
    "read_metadata",
    "replace_class_head",
    "resolve_arch",
    "save_model_version",
    "set_input_size",
]

log = logging.getLogger(__name__)


def build_detector_for(
    settings: Settings, labels: Sequence[str], model_version_dir: Path | None = None
) -> Detector | None:
    """The detector to serve a project with ``labels``.

    * ``model_version_dir`` given: that version as it is served (YOLOX through onnxruntime,
      torchvision through :class:`TorchDetector`); errors propagate.
    * else ``settings.resolved_onnx_model_path`` (``onnx_model_path``, else the fetched model): the
      COCO YOLOX with its classes mapped onto ``labels`` (``None`` if none of them maps).
    * else ``None``: nothing sensible to predict with before the first training (an untrained
      head would only produce noise).
    """
    if model_version_dir is not None:
        return load_version_detector(Path(model_version_dir), settings)
    yolox = load_pretrained(settings, list(labels))
    if yolox is None:
        return None
    if not yolox.class_map:
        log.info(
            "no COCO class of %s matches the labels %s", settings.resolved_onnx_model_path, labels
        )
        return None
    return yolox
