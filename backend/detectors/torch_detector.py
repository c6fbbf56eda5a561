"""Inference wrapper that turns a torchvision detection model into a :class:`Detector`.

Why a wrapper: the trained model object is shared with training and saving, while serving wants a
private copy tuned for this CPU: eval mode, frozen batch norm folded into the convolutions,
``channels_last`` memory format, fewer RPN proposals and the settings' resize rule. Measured on a
640 × 480 image (see ``benchmark/detector_speed.py``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn

from backend.boxes import Boxes
from backend.detectors.fasterrcnn import configure_inference
from backend.detectors.fuse import fuse_frozen_batchnorm
from backend.settings import Settings

__all__ = ["ChannelsLast", "TorchDetector", "image_to_tensor"]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image → ``(3, H, W)`` float32 RGB in [0, 1] (what torchvision detectors take)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


class ChannelsLast(nn.Module):
    """Runs the wrapped backbone on a ``channels_last`` copy of its input.

    Depthwise and 1×1 convolutions are markedly faster in NHWC with oneDNN on this CPU; the
    detection transform always hands over NCHW, hence the wrapper.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone.to(memory_format=torch.channels_last)
        if hasattr(backbone, "out_channels"):  # Faster R-CNN reads it; SSD's backbone has none
            self.out_channels = backbone.out_channels

    def forward(self, images: torch.Tensor) -> Any:
        return self.inner(images.contiguous(memory_format=torch.channels_last))


class TorchDetector:
    """A torchvision Faster R-CNN / SSDlite serving a project's labels.

    ``labels[i]`` is the name of model class ``i + 1`` (class 0 is background). ``predict`` returns
    scored :class:`Boxes` in the input image's pixels with label indices into ``labels``.
    ``batch_size`` images go through the network together; 1 is the default because batching
    bought nothing on this CPU (8 images of 640 × 480, 1 thread: 1.40-1.57 s batched by 4 vs
    8 × 0.167 s one by one) and pads mixed-size images to a common size.
    """

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str],
        version: str,
        *,
        min_size: int = 512,
        max_size: int = 853,
        score_threshold: float = 0.3,
        max_detections: int = 100,
        rpn_pre_nms_top_n: int = 300,
        rpn_post_nms_top_n: int = 100,
        batch_size: int = 1,
        fuse: bool = True,
        channels_last: bool = True,
    ) -> None:
        self.labels = list(labels)
        self.version = version
        self.batch_size = max(1, int(batch_size))
        self.score_threshold = float(score_threshold)
        served = copy.deepcopy(model).eval()
        for parameter in served.parameters():
            parameter.requires_grad_(False)
        configure_inference(
            served,
            min_size=min_size,
            max_size=max_size,
            score_threshold=score_threshold,
            max_detections=max_detections,
            rpn_pre_nms_top_n=rpn_pre_nms_top_n,
            rpn_post_nms_top_n=rpn_post_nms_top_n,
        )
        if fuse:
            fuse_frozen_batchnorm(served)
        if channels_last:
            served.backbone = ChannelsLast(cast(nn.Module, served.backbone))
        self.model = served

    @classmethod
    def from_settings(
        cls, model: nn.Module, labels: Sequence[str], version: str, settings: Settings
    ) -> TorchDetector:
        """A detector using the resize rule, threshold and detection cap of ``settings``."""
        return cls(
            model,
            labels,
            version,
            min_size=settings.detector_min_size,
            max_size=settings.detector_max_size,
            score_threshold=settings.score_threshold,
            max_detections=settings.max_detections,
        )

    def predict(self, images: Sequence[Image.Image]) -> list[Boxes]:
        """Detections for each image, in order; an empty ``Boxes`` when nothing passes."""
        out: list[Boxes] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            tensors = [image_to_tensor(image) for image in chunk]
            with torch.inference_mode():
                results = self.model(tensors)
            for image, result in zip(chunk, results, strict=True):
                out.append(self._to_boxes(result, image.size))
        return out

    def _to_boxes(self, result: dict[str, torch.Tensor], size: tuple[int, int]) -> Boxes:
        scores = result["scores"].float().numpy()
        keep = scores >= self.score_threshold
        labels = result["labels"].numpy()[keep] - 1  # class 0 is background
        return Boxes(result["boxes"].float().numpy()[keep], labels, size, scores[keep]).clipped()
