"""Fold frozen batch norm into the preceding convolution for inference.

Why: the detectors keep their backbone's batch norm frozen (a fixed per-channel affine), which on
this CPU is pure overhead at inference: for the EfficientNet-Lite0 body at 512 × 704 (1 thread),
folding cuts 233 → 173 ms in NCHW and 175 → 95 ms with ``channels_last``. Outputs agree to ~1e-5.
Training never sees a folded model: :class:`~backend.detectors.torch_detector.TorchDetector`
folds a private copy.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from timm.layers import FrozenBatchNormAct2d
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["fuse_frozen_batchnorm"]

# timm EfficientNet blocks name their conv → norm pairs; the stem is conv_stem → bn1.
_TIMM_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    DepthwiseSeparableConv: (("conv_dw", "bn1"), ("conv_pw", "bn2")),
    InvertedResidual: (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
}


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: Any) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    conv.weight = nn.Parameter(weight, requires_grad=False)
    conv.bias = nn.Parameter(bias, requires_grad=False)


def _after_fold(bn: Any) -> nn.Module:
    """What replaces the norm: nothing, or the activation fused into timm's norm layer."""
    if isinstance(bn, FrozenBatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()


def _is_frozen_bn(module: nn.Module) -> bool:
    return isinstance(module, FrozenBatchNorm2d | FrozenBatchNormAct2d)


def fuse_frozen_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every frozen BN that directly follows a convolution; returns how many.

    Handles timm EfficientNet blocks and stems (named pairs) and any ``nn.Sequential`` where a
    ``Conv2d`` is immediately followed by a frozen BN (torchvision's ``Conv2dNormActivation``).
    Live ``BatchNorm2d`` layers are left alone: their statistics may still change.
    """
    folded = 0
    for module in list(model.modules()):
        pairs = _TIMM_PAIRS.get(type(module), ())
        if not pairs and hasattr(module, "conv_stem") and hasattr(module, "bn1"):
            pairs = (("conv_stem", "bn1"),)
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(conv, nn.Conv2d) and _is_frozen_bn(bn):
                _fold(conv, bn)
                setattr(module, bn_name, _after_fold(bn))
                folded += 1
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (_, first), (name, second) in pairwise(children):
                if isinstance(first, nn.Conv2d) and _is_frozen_bn(second):
                    _fold(first, second)
                    setattr(module, name, _after_fold(second))
                    folded += 1
    return folded
