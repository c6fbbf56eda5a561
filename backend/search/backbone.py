"""The frozen pretrained CNN both sides of search read, through onnxruntime.

Why frozen: fine-tuning EfficientNet-Lite0 on this CPU takes hours, while the trainable parts
on top of frozen features (heads, f_t) train in minutes; the features are computed once per
image with the project's feature machinery (:mod:`backend.features`: ONNX export cached by a
weights digest, batched onnxruntime) and reused for every training step and every query.

- :func:`spatial_map_extractor`: the image side's "early stages pooled to 7×7×D": Lite0 up to
  stride 32 (320 channels) on the whole image resized to 224 px, which is a 7×7 map,
  flattened (15,680 values).
- :func:`pooled_extractor`: 1280-d pooled features of object crops and sketch rasters (the
  input of the single-object encoder); the ImgNet extractor queue ordering uses.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from backend.features.base import OnnxImageEncoder, export_onnx, state_digest
from backend.features.imgnet import effnet_lite0_extractor
from backend.nets.effnet_lite0 import (
    FEATURE_CHANNELS,
    efficientnet_lite0_features,
    imagenet_normalization,
)

__all__ = ["MAP_CHANNELS", "MAP_SIDE", "pooled_extractor", "spatial_map_extractor"]

MAP_SIDE = 7
MAP_CHANNELS = FEATURE_CHANNELS[4]
_SIZE = 224


class _StrideMap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, _ = efficientnet_lite0_features(out_indices=(4,), pretrained=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # 224 px in, stride 32: the map is already 7×7 (a fixed input size keeps ONNX export
        # simple; an adaptive pool with a dynamic input does not export)
        return torch.flatten(self.body(images)[0], 1)


def spatial_map_extractor(
    cache_dir: Path, *, batch_size: int = 16, num_threads: int = 2
) -> OnnxImageEncoder:
    """Whole images → ``(N, 320·7·7)`` float32 backbone maps (channel-major, as ``(320, 7, 7)``)."""
    module = _StrideMap().eval()
    digest = state_digest(module)[:12]
    path = Path(cache_dir) / f"search_map_effnet_lite0_{_SIZE}_{digest}.onnx"
    export_onnx(module, path, (_SIZE, _SIZE))
    mean, std = imagenet_normalization()
    return OnnxImageEncoder(
        path,
        name=f"searchmap_effnet_lite0@{_SIZE}px-{digest}",
        dim=MAP_CHANNELS * MAP_SIDE * MAP_SIDE,
        size=(_SIZE, _SIZE),
        mean=mean,
        std=std,
        batch_size=batch_size,
        num_threads=num_threads,
    )


def pooled_extractor(
    cache_dir: Path, *, batch_size: int = 32, num_threads: int = 2
) -> OnnxImageEncoder:
    """Crops and sketch rasters → ``(N, 1280)`` pooled Lite0 features."""
    return effnet_lite0_extractor(cache_dir, batch_size=batch_size, num_threads=num_threads)
