"""A trainable PyTorch YOLOX-Nano (Ge et al. 2021, "YOLOX: Exceeding YOLO Series in 2021").

Why our own definition: the project only ships an ONNX export of YOLOX-Nano, which can be served
but not fine-tuned. This module rebuilds the same network (depth 0.33, width 0.25, depthwise
convolutions, Focus stem, CSPDarknet + PAFPN + decoupled head, SiLU) so that
:mod:`backend.detectors.yolox.onnx_import` can load the COCO weights into it, and training can
fine-tune it on a project's labels.

Conventions (those of the paper's reference export, so that ONNX files round-trip):

* input ``(B, 3, H, W)`` float **BGR 0–255**, not normalised; ``H`` and ``W`` multiples of 32;
* :meth:`YoloxNano.forward` returns **raw** rows ``(B, A, 5 + C)``: ``[dx, dy, log w, log h,
  objectness logit, class logits…]`` over strides 8, 16, 32, cells row-major. Training needs the
  logits and the raw offsets (for the L1 term); :func:`decode` turns them into boxes and scores.

The modules execute in the order of the reference implementation: :mod:`onnx_import` maps the
ONNX convolutions onto ours by execution order, so reordering calls in a ``forward`` breaks the
import (its shape checks would say where).
"""

from __future__ import annotations

import copy
import math
from functools import lru_cache
from typing import Literal, NamedTuple, cast

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "PRIOR_PROB",
    "STRIDES",
    "Detections",
    "FreezePart",
    "YoloxNano",
    "decode",
    "freeze",
    "grids",
    "postprocess",
    "remap_classes",
    "set_bn_eval",
]

STRIDES = (8, 16, 32)
#: YOLOX's batch-norm settings (eps 1e-3, momentum 0.03), not PyTorch's defaults.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03
#: Initial foreground probability of the objectness and class heads (YOLOX / RetinaNet prior).
PRIOR_PROB = 0.01

FreezePart = Literal["none", "stem", "backbone", "backbone+neck"]


# ---------------------------------------------------------------------------------- blocks
class ConvBnAct(nn.Module):
    """Convolution (no bias) → BatchNorm → SiLU, "same" padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DepthwiseSeparable(nn.Module):
    """Depthwise k×k (carrying the stride) then pointwise 1×1, each with BN and SiLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = ConvBnAct(cin, cin, kernel, stride, groups=cin)
        self.pointwise = ConvBnAct(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class Bottleneck(nn.Module):
    """1×1 then depthwise-separable 3×3, with an optional residual."""

    def __init__(self, channels: int, shortcut: bool) -> None:
        super().__init__()
        self.reduce = ConvBnAct(channels, channels, 1)
        self.spatial = DepthwiseSeparable(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        y = self.spatial(self.reduce(x))
        return x + y if self.shortcut else y


class CSPBlock(nn.Module):
    """Cross-stage partial block: half the channels go through ``n`` bottlenecks, half bypass."""

    def __init__(self, cin: int, cout: int, n: int, shortcut: bool) -> None:
        super().__init__()
        hidden = cout // 2
        self.main = ConvBnAct(cin, hidden, 1)
        self.bypass = ConvBnAct(cin, hidden, 1)
        self.blocks = nn.Sequential(*(Bottleneck(hidden, shortcut) for _ in range(n)))
        self.merge = ConvBnAct(2 * hidden, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        main = self.main(x)
        bypass = self.bypass(x)
        return self.merge(torch.cat([self.blocks(main), bypass], dim=1))


class SpatialPyramidPool(nn.Module):
    """1×1 reduce, max-pools 5/9/13 (stride 1) concatenated with the input, 1×1 expand."""

    def __init__(self, cin: int, cout: int, kernels: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = cin // 2
        self.reduce = ConvBnAct(cin, hidden, 1)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernels)
        self.expand = ConvBnAct(hidden * (len(kernels) + 1), cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.reduce(x)
        return self.expand(torch.cat([x, *(pool(x) for pool in self.pools)], dim=1))


class Focus(nn.Module):
    """Space-to-depth (2×2 pixel blocks → 12 channels) then a 3×3 convolution.

    Channel order is top-left, bottom-left, top-right, bottom-right, as the pretrained stem's
    weights expect.
    """

    def __init__(self, cout: int) -> None:
        super().__init__()
        self.conv = ConvBnAct(12, cout, 3)

    def forward(self, x: Tensor) -> Tensor:
        tl, bl = x[..., ::2, ::2], x[..., 1::2, ::2]
        tr, br = x[..., ::2, 1::2], x[..., 1::2, 1::2]
        return self.conv(torch.cat([tl, bl, tr, br], dim=1))


# ---------------------------------------------------------------------------------- network
class Backbone(nn.Module):
    """CSPDarknet-53 at depth 0.33 / width 0.25: features at strides 8, 16, 32 (64/128/256 ch)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Focus(16)
        self.dark2 = nn.Sequential(DepthwiseSeparable(16, 32, 3, 2), CSPBlock(32, 32, 1, True))
        self.dark3 = nn.Sequential(DepthwiseSeparable(32, 64, 3, 2), CSPBlock(64, 64, 3, True))
        self.dark4 = nn.Sequential(DepthwiseSeparable(64, 128, 3, 2), CSPBlock(128, 128, 3, True))
        self.dark5 = nn.Sequential(
            DepthwiseSeparable(128, 256, 3, 2),
            SpatialPyramidPool(256, 256),
            CSPBlock(256, 256, 1, False),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c3 = self.dark3(self.dark2(self.stem(x)))
        c4 = self.dark4(c3)
        c5 = self.dark5(c4)
        return c3, c4, c5


class Neck(nn.Module):
    """PAFPN: a top-down pass (nearest 2× upsampling) then a bottom-up pass (strided convs)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral5 = ConvBnAct(256, 128, 1)
        self.top_down4 = CSPBlock(256, 128, 1, False)
        self.lateral4 = ConvBnAct(128, 64, 1)
        self.top_down3 = CSPBlock(128, 64, 1, False)
        self.down3 = DepthwiseSeparable(64, 64, 3, 2)
        self.bottom_up4 = CSPBlock(128, 128, 1, False)
        self.down4 = DepthwiseSeparable(128, 128, 3, 2)
        self.bottom_up5 = CSPBlock(256, 256, 1, False)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        c3, c4, c5 = feats
        l5 = self.lateral5(c5)
        t4 = self.top_down4(torch.cat([self.up(l5), c4], dim=1))
        l4 = self.lateral4(t4)
        p3 = self.top_down3(torch.cat([self.up(l4), c3], dim=1))
        p4 = self.bottom_up4(torch.cat([self.down3(p3), l4], dim=1))
        p5 = self.bottom_up5(torch.cat([self.down4(p4), l5], dim=1))
        return p3, p4, p5


class HeadLevel(nn.Module):
    """Decoupled head of one level: a 1×1 stem, then a class branch and a box/objectness branch."""

    def __init__(self, cin: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.stem = ConvBnAct(cin, width, 1)
        self.cls_convs = nn.Sequential(
            DepthwiseSeparable(width, width, 3), DepthwiseSeparable(width, width, 3)
        )
        self.cls_pred = nn.Conv2d(width, num_classes, 1)
        self.reg_convs = nn.Sequential(
            DepthwiseSeparable(width, width, 3), DepthwiseSeparable(width, width, 3)
        )
        self.reg_pred = nn.Conv2d(width, 4, 1)
        self.obj_pred = nn.Conv2d(width, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 5 + C, h·w)``: box offsets, objectness logit, class logits."""
        return self.forward_with_stem(x)[0]

    def forward_with_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The raw rows and the stem's ``(B, width, h, w)`` map: the level's neck feature projected
        to the head's width, the same width on every level (what box-level core-set pools)."""
        stem = self.stem(x)
        cls_logits = self.cls_pred(self.cls_convs(stem))
        reg_feat = self.reg_convs(stem)
        out = torch.cat([self.reg_pred(reg_feat), self.obj_pred(reg_feat), cls_logits], dim=1)
        return out.flatten(2), stem


class Head(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.levels = nn.ModuleList(HeadLevel(c, num_classes) for c in (64, 128, 256))

    def per_level(self) -> list[HeadLevel]:
        """The three levels (strides 8, 16, 32), typed."""
        return [cast(HeadLevel, level) for level in self.levels]

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        return self.forward_with_stems(feats)[0]

    def forward_with_stems(
        self, feats: tuple[Tensor, Tensor, Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """Raw rows ``(B, A, 5 + C)`` and each level's stem map (strides 8, 16, 32)."""
        pairs = [
            level.forward_with_stem(x) for level, x in zip(self.per_level(), feats, strict=True)
        ]
        rows = torch.cat([out for out, _ in pairs], dim=2).permute(0, 2, 1)
        return rows, [stem for _, stem in pairs]


def _init_prediction(conv: nn.Conv2d, generator: torch.Generator | None = None) -> None:
    """Fresh class/objectness row(s): small weights, bias at the foreground prior."""
    assert conv.bias is not None
    with torch.no_grad():
        conv.weight.normal_(0.0, 0.01, generator=generator)
    nn.init.constant_(conv.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))


class YoloxNano(nn.Module):
    """YOLOX-Nano returning raw predictions; see the module docstring for the conventions."""

    strides = STRIDES

    def __init__(self, num_classes: int = 80) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.backbone = Backbone()
        self.neck = Neck()
        self.head = Head(self.num_classes)
        for level in self.head.per_level():
            _init_prediction(level.cls_pred)
            _init_prediction(level.obj_pred)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` BGR 0–255 → raw ``(B, A, 5 + C)`` (no sigmoid, no decode)."""
        return self.forward_with_stems(x)[0]

    def forward_with_stems(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward` plus the head's per-level stem maps (box features for core-set)."""
        height, width = x.shape[-2:]
        if not torch.jit.is_tracing() and (height % 32 or width % 32):
            raise ValueError(
                f"input height and width must be multiples of 32, got {height}×{width}"
            )
        return self.head.forward_with_stems(self.neck(self.backbone(x)))


# ---------------------------------------------------------------------------------- decoding
@lru_cache(maxsize=32)
def _grids_cpu(input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    height, width = input_hw
    cells, strides = [], []
    for stride in STRIDES:
        ys, xs = torch.meshgrid(
            torch.arange(height // stride), torch.arange(width // stride), indexing="ij"
        )
        cells.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2))
        strides.append(torch.full((cells[-1].shape[0], 1), stride))
    return torch.cat(cells).float(), torch.cat(strides).float()


def grids(
    input_hw: tuple[int, int], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Cell ``(x, y)`` ``(A, 2)`` and stride ``(A, 1)`` of each output row, in row order.

    Cached per shape (read-only: do not modify the returned tensors in place).
    """
    cells, strides = _grids_cpu((int(input_hw[0]), int(input_hw[1])))
    if device is not None:
        cells, strides = cells.to(device), strides.to(device)
    return cells, strides


def decode(raw: Tensor, input_hw: tuple[int, int]) -> Tensor:
    """Raw rows → ``[cx, cy, w, h]`` in input pixels, sigmoid objectness and class scores."""
    cells, strides = grids(input_hw, raw.device)
    if raw.shape[-2] != len(cells):
        raise ValueError(f"{raw.shape[-2]} rows do not fit input {input_hw} ({len(cells)} cells)")
    xy = (raw[..., :2] + cells) * strides
    wh = torch.exp(raw[..., 2:4].clamp(max=20.0)) * strides
    return torch.cat([xy, wh, raw[..., 4:].sigmoid()], dim=-1)


class Detections(NamedTuple):
    """Detections of one image in input pixels."""

    boxes_xyxy: Tensor
    scores: Tensor
    labels: Tensor


def postprocess(
    decoded: Tensor,
    score_threshold: float = 0.3,
    nms_threshold: float = 0.45,
    max_detections: int = 100,
) -> list[Detections]:
    """Per image: best class per row, score = objectness × class score, class-aware NMS.

    The same rule as :class:`~backend.detectors.onnx_yolox.OnnxYoloxDetector`, so a model scores
    the same in training-time evaluation as when served.
    """
    out = []
    for rows in decoded:
        class_scores = rows[:, 5:] * rows[:, 4:5]
        scores, labels = class_scores.max(dim=1)
        keep = scores >= score_threshold
        xy, wh = rows[keep, :2], rows[keep, 2:4]
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
        scores, labels = scores[keep], labels[keep]
        order = batched_nms(boxes, scores, labels, nms_threshold)[:max_detections]
        out.append(Detections(boxes[order], scores[order], labels[order]))
    return out


# ---------------------------------------------------------------------------------- fine-tuning
def remap_classes(model: YoloxNano, source_rows: list[int | None], *, seed: int = 0) -> YoloxNano:
    """A copy of ``model`` over ``len(source_rows)`` classes.

    Class row ``i`` (weight and bias, on all three levels) is the old row ``source_rows[i]``, or
    freshly initialised (small normal weights, prior bias) where it is ``None``. Why: a project
    label that COCO already knows (``dog``) should start from COCO's ``dog`` detector.
    The fresh rows are drawn from their own generator seeded with ``seed``, not from torch's
    global one: a project's version 0 is the same model whatever ran before in the process.
    """
    if not source_rows:
        raise ValueError("source_rows is empty: a detector needs at least one class")
    for row in source_rows:
        if row is not None and not 0 <= row < model.num_classes:
            raise ValueError(f"source row {row} outside 0..{model.num_classes - 1}")
    new = copy.deepcopy(model)
    new.num_classes = len(source_rows)
    generator = torch.Generator().manual_seed(seed)
    for old_level, new_level in zip(model.head.per_level(), new.head.per_level(), strict=True):
        old = old_level.cls_pred
        conv = nn.Conv2d(old.in_channels, len(source_rows), 1)
        _init_prediction(conv, generator)
        conv = conv.to(old.weight.device)
        with torch.no_grad():
            for i, row in enumerate(source_rows):
                if row is not None:
                    conv.weight[i] = old.weight[row]
                    assert conv.bias is not None and old.bias is not None
                    conv.bias[i] = old.bias[row]
        new_level.cls_pred = conv
    return new


def freeze(model: YoloxNano, part: FreezePart | str) -> YoloxNano:
    """Set ``requires_grad=False`` on ``part``'s parameters (others untouched); returns ``model``.

    Why: with few labelled images, the pretrained low-level features are better left alone, and
    a frozen backbone roughly halves the backward pass.
    """
    modules: dict[str, list[nn.Module]] = {
        "none": [],
        "stem": [model.backbone.stem],
        "backbone": [model.backbone],
        "backbone+neck": [model.backbone, model.neck],
    }
    if part not in modules:
        raise ValueError(f"freeze part must be one of {sorted(modules)}, not {part!r}")
    for module in modules[part]:
        for param in module.parameters():
            param.requires_grad_(False)
    return model


def set_bn_eval(model: nn.Module) -> nn.Module:
    """Put every BatchNorm2d in eval mode (use after ``model.train()``); returns ``model``.

    Why: the imported weights have BN folded into the convolutions (BN is identity + bias), so
    batch statistics of a few images would wreck them; running statistics stay fixed.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model
