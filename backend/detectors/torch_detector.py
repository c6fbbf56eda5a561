"""Inference wrapper that turns a torchvision detection model into a :class:`Detector`.

Why a wrapper: the trained model object is shared with training and saving, while serving wants a
private copy tuned for this CPU: eval mode, frozen batch norm folded into the convolutions,
``channels_last`` memory format, fewer RPN proposals and the settings' resize rule. Measured on a
640 × 480 image (see ``benchmark/detector_speed.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional

from backend.boxes import Boxes
from backend.detectors.fasterrcnn import configure_inference
from backend.detectors.fuse import fuse_frozen_batchnorm
from backend.settings import Settings

__all__ = ["ChannelsLast", "TorchDetector", "image_to_tensor", "shrink_thin"]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image → ``(3, H, W)`` float32 RGB in [0, 1] (what torchvision detectors take)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def shrink_thin(tensor: torch.Tensor, min_size: int, max_size: int) -> torch.Tensor:
    """``(3, H, W)`` ``tensor`` as it is, or -- when the detection transform's resize would make a
    side 0 px -- resized as that transform would, but to at least 1 px a side.

    Why: torchvision's Faster R-CNN transform scales an image by
    ``min(min_size / short, max_size / long)``; an image thinner than ``max_size``:1 (1 × 1000 px
    at the default 853) gets a 0 px short side, where ``interpolate`` raises (a 500 on /predict
    for a valid image). The shrunk image's long side is then about ``max_size``, so the transform
    leaves it nearly as it is; the caller maps the boxes back to the image's pixels.
    """
    _, height, width = tensor.shape
    short, long = min(height, width), max(height, width)
    scale = min(min_size / short, max_size / long)  # torchvision's computation, to the bit
    if math.floor(short * scale) >= 1:
        return tensor
    size = [max(1, int(height * scale)), max(1, int(width * scale))]
    return functional.interpolate(tensor[None], size=size, mode="bilinear", align_corners=False)[0]


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
        # SSD resizes to a fixed size; Faster R-CNN follows ``min_size`` and ``max_size``
        fixed = getattr(getattr(served, "transform", None), "fixed_size", None)
        self._resize_rule: tuple[int, int] | None = (
            None if fixed else (int(min_size), int(max_size))
        )

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
            if self._resize_rule is not None:
                tensors = [shrink_thin(t, *self._resize_rule) for t in tensors]
            with torch.inference_mode():
                results = self.model(tensors)
            for image, tensor, result in zip(chunk, tensors, results, strict=True):
                input_size = (int(tensor.shape[2]), int(tensor.shape[1]))
                out.append(self._to_boxes(result, image.size, input_size))
        return out

    def _to_boxes(
        self, result: dict[str, torch.Tensor], size: tuple[int, int], input_size: tuple[int, int]
    ) -> Boxes:
        """``result``, boxes in pixels of the ``input_size`` (w, h) tensor, in ``size`` pixels."""
        scores = result["scores"].float().numpy()
        keep = scores >= self.score_threshold
        labels = result["labels"].numpy()[keep] - 1  # class 0 is background
        xyxy = result["boxes"].float().numpy()[keep]
        if input_size != size:  # shrunk by shrink_thin
            xyxy = xyxy * np.array(
                [size[0] / input_size[0], size[1] / input_size[1]] * 2, np.float32
            )
        return Boxes(xyxy, labels, size, scores[keep]).clipped()
