"""YOLOX's training loss: SimOTA label assignment, IoU + objectness + class BCE, with per-box weights.

Follows the YOLOX paper (Ge et al. 2021, §2.1 "SimOTA"):

* **Centre prior.** An anchor (cell centre) is a candidate for a ground-truth box when it lies
  inside the box or within 2.5 strides of the box centre.
* **Cost** of pairing gt ``g`` with candidate ``a``: the class BCE of ``sqrt(σ(cls)·σ(obj))``
  against ``g``'s one-hot label, plus ``3 · −log IoU``, plus ``1e5`` unless ``a`` is inside the box
  *and* the centre region.
* **Dynamic k.** Each gt takes its ``k`` cheapest candidates, ``k = max(1, ⌊Σ top-10 IoUs⌋)``; an
  anchor claimed by several gts keeps the cheapest one.
* **Loss** (normalised by the number of foreground anchors): ``5 · (1 − IoU²)`` on matched boxes,
  BCE objectness on every anchor (target 1 on foreground), BCE class on foreground anchors with
  target ``one_hot · IoU`` (IoU of the prediction with its gt, detached), optional L1 on the raw
  offsets (YOLOX turns it on for its last epochs).

Why per-box weights: box-level active learning trains on a mix of verified boxes (weight 1) and
unverified, possibly wrong, predicted boxes (weight λ_d < 1). A foreground anchor matched to a box
of weight ``w`` contributes ``w ×`` its IoU, objectness, class (and L1) terms. The assignment and
the ``num_fg`` normaliser do not depend on the weights, so the loss is linear in each weight, and
weight 0 makes a box's anchors neither foreground nor background. Note that this is *not* the same
as deleting the box: deleted, its anchors would become background (objectness target 0) and could
be claimed by neighbouring boxes.

Why a background weight: an anchor no box claims learns "no object here" (objectness target 0).
On a fully labelled image that is verified. On a partly labelled one nobody looked at the regions
between the queried boxes, and an object the model missed there would be taught as background at
full weight. ``YoloxTarget.background_weight`` scales those anchors' objectness term; anchors
centred in ``verified_background`` (queries the annotator answered "no object") keep weight 1.

The assignment runs under ``no_grad`` (it is a discrete matching; YOLOX does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from backend.detectors.yolox.model import grids

__all__ = ["Assignment", "YoloxTarget", "simota_assign", "yolox_loss"]

CENTER_RADIUS = 2.5
IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 1e5
TOPK_CANDIDATES = 10
REG_WEIGHT = 5.0


@dataclass(frozen=True)
class YoloxTarget:
    """Ground truth of one image in input pixels.

    ``boxes_xyxy`` ``(M, 4)``, ``labels`` ``(M,)`` int64, ``weights`` ``(M,)`` float32 (``None`` →
    ones; replaced at construction, so ``weights`` is always a tensor afterwards).
    """

    boxes_xyxy: Tensor
    labels: Tensor
    weights: Tensor | None = None
    #: Objectness weight of the anchors no box claims: 1 where the image is labelled in full.
    background_weight: float = 1.0
    #: ``(K, 4)`` xyxy regions verified empty: anchors centred in them weigh 1 as background.
    verified_background: Tensor | None = None

    def __post_init__(self) -> None:
        boxes = torch.as_tensor(self.boxes_xyxy, dtype=torch.float32).reshape(-1, 4)
        labels = torch.as_tensor(self.labels, dtype=torch.int64).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
        if self.weights is None:
            weights = torch.ones(len(boxes), dtype=torch.float32, device=boxes.device)
        else:
            weights = torch.as_tensor(self.weights, dtype=torch.float32).reshape(-1)
        if len(weights) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(weights)} weights")
        if len(boxes) and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise ValueError("every box needs x_max > x_min and y_max > y_min")
        if len(weights) and bool((weights < 0).any()):
            raise ValueError("box weights must be >= 0")
        if not self.background_weight >= 0:
            raise ValueError("background_weight must be >= 0")
        verified = torch.as_tensor(
            self.verified_background if self.verified_background is not None else [],
            dtype=torch.float32,
        ).reshape(-1, 4)
        object.__setattr__(self, "verified_background", verified)
        object.__setattr__(self, "boxes_xyxy", boxes)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "weights", weights)

    @property
    def box_weights(self) -> Tensor:
        assert self.weights is not None  # set in __post_init__
        return self.weights


@dataclass(frozen=True)
class Assignment:
    """SimOTA result for one image: foreground anchor rows, their gt and the IoU of the pair."""

    fg_rows: Tensor  # (F,) int64 rows of the prediction
    matched_gt: Tensor  # (F,) int64 index into the image's boxes
    ious: Tensor  # (F,) IoU of the (detached) predicted box with its gt


def _pair_iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of ``cxcywh`` boxes ``a`` and ``b`` (same shape ``(..., 4)``)."""
    tl = torch.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2)
    br = torch.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)
    inter = (br - tl).clamp(min=0).prod(-1)
    union = a[..., 2:].prod(-1) + b[..., 2:].prod(-1) - inter
    return inter / (union + 1e-16)


@torch.no_grad()
def simota_assign(
    pred_cxcywh: Tensor,
    obj_logits: Tensor,
    cls_logits: Tensor,
    target: YoloxTarget,
    cells: Tensor,
    strides: Tensor,
) -> Assignment:
    """SimOTA for one image. ``pred_cxcywh`` ``(A, 4)`` decoded boxes, ``obj_logits`` ``(A,)``,
    ``cls_logits`` ``(A, C)``, ``cells`` ``(A, 2)``, ``strides`` ``(A, 1)``."""
    device = pred_cxcywh.device
    empty = Assignment(
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, dtype=torch.int64, device=device),
        torch.zeros(0, device=device),
    )
    gt_xyxy = target.boxes_xyxy.to(device)
    if len(gt_xyxy) == 0:
        return empty
    gt_labels = target.labels.to(device)
    gt_c = (gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2
    gt_cxcywh = torch.cat([gt_c, gt_xyxy[:, 2:] - gt_xyxy[:, :2]], dim=1)

    # centre prior, (M, A)
    centres = (cells + 0.5) * strides
    in_box = ((centres[None] > gt_xyxy[:, None, :2]) & (centres[None] < gt_xyxy[:, None, 2:])).all(
        -1
    )
    radius = CENTER_RADIUS * strides[None]  # (1, A, 1)
    in_centre = ((centres[None] - gt_c[:, None]).abs() < radius).all(-1)
    candidates = (in_box | in_centre).any(0).nonzero().squeeze(1)
    if len(candidates) == 0:
        return empty
    in_both = (in_box & in_centre)[:, candidates]

    ious = _pair_iou(gt_cxcywh[:, None], pred_cxcywh[candidates][None].float())  # (M, K)
    iou_cost = -torch.log(ious + 1e-8)
    # BCE of p = sqrt(σ(cls)·σ(obj)) against a one-hot row, summed over classes, without an
    # (M, K, C) tensor: Σ_c −log(1 − p_c) plus, for the gt class, −log p_g + log(1 − p_g).
    # Logs are clamped at −100 as F.binary_cross_entropy does.
    p = (
        cls_logits[candidates].float().sigmoid() * obj_logits[candidates, None].float().sigmoid()
    ).sqrt()
    log_p = torch.log(p).clamp(min=-100)
    log_1mp = torch.log1p(-p).clamp(min=-100)
    cls_cost = -log_1mp.sum(1)[None] - log_p[:, gt_labels].T + log_1mp[:, gt_labels].T
    cost = cls_cost + IOU_COST_WEIGHT * iou_cost + OUTSIDE_COST * (~in_both).float()

    # dynamic k: each gt takes its k cheapest candidates
    top_ious = ious.topk(min(TOPK_CANDIDATES, ious.shape[1]), dim=1).values
    dynamic_k = top_ious.sum(1).int().clamp(min=1)
    order = cost.argsort(dim=1)
    rank_ok = torch.arange(cost.shape[1], device=device)[None] < dynamic_k[:, None]
    matching = torch.zeros_like(cost, dtype=torch.bool).scatter_(1, order, rank_ok)
    # an anchor claimed by several gts keeps the cheapest
    shared = matching.sum(0) > 1
    if bool(shared.any()):
        cheapest = cost[:, shared].argmin(0)
        matching[:, shared] = False
        matching[cheapest, shared.nonzero().squeeze(1)] = True
    fg = matching.any(0)
    matched_gt = matching[:, fg].float().argmax(0)
    fg_ious = ious[matched_gt, fg.nonzero().squeeze(1)]
    return Assignment(candidates[fg], matched_gt, fg_ious)


def yolox_loss(
    raw: Tensor,
    targets: list[YoloxTarget],
    input_hw: tuple[int, int],
    *,
    use_l1: bool = False,
    class_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """YOLOX loss of raw predictions ``(B, A, 5 + C)`` (as :class:`YoloxNano` returns them).

    ``class_mask`` ``(C,)`` bool keeps only those columns in the class term (None: all, the stock
    loss): a class with no example in the training data then gets no push toward "not this
    class" on every other class's foreground anchors.

    Returns ``total`` (= 5·iou + obj + cls + l1), ``iou``, ``obj``, ``cls``, ``l1`` (0 unless
    ``use_l1``), each summed over anchors and divided by ``max(num_fg, 1)``, and ``num_fg`` (the
    number of foreground anchors in the batch, as a float tensor, not differentiable).
    """
    if raw.ndim != 3 or raw.shape[2] < 6:
        raise ValueError(f"raw predictions must be (B, A, 5 + C), got {tuple(raw.shape)}")
    if len(targets) != raw.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {raw.shape[0]}")
    num_classes = raw.shape[2] - 5
    if class_mask is not None and tuple(class_mask.shape) != (num_classes,):
        raise ValueError(
            f"class_mask must have shape ({num_classes},), got {tuple(class_mask.shape)}"
        )
    cells, strides = grids(input_hw, raw.device)
    if raw.shape[1] != len(cells):
        raise ValueError(f"{raw.shape[1]} rows do not fit input {input_hw} ({len(cells)} cells)")
    raw = raw.float()
    pred_boxes = torch.cat(
        [(raw[..., :2] + cells) * strides, torch.exp(raw[..., 2:4].clamp(max=20.0)) * strides], -1
    )
    obj_logits, cls_logits = raw[..., 4], raw[..., 5:]

    obj_target = torch.zeros_like(obj_logits)
    obj_weight = torch.ones_like(obj_logits)
    centres = (cells + 0.5) * strides
    fg_batch, fg_rows, reg_targets, cls_targets, fg_weights = [], [], [], [], []
    for b, target in enumerate(targets):
        for label in target.labels.tolist():
            if not 0 <= label < num_classes:
                raise ValueError(f"image {b}: label {label} outside 0..{num_classes - 1}")
        if target.background_weight != 1.0:
            obj_weight[b] = target.background_weight
            verified = target.verified_background
            if verified is not None and len(verified):
                verified = verified.to(raw.device)
                inside = (
                    (
                        (centres[None] > verified[:, None, :2])
                        & (centres[None] < verified[:, None, 2:])
                    )
                    .all(-1)
                    .any(0)
                )
                obj_weight[b, inside] = 1.0
        found = simota_assign(
            pred_boxes[b].detach(),
            obj_logits[b].detach(),
            cls_logits[b].detach(),
            target,
            cells,
            strides,
        )
        if len(found.fg_rows) == 0:
            continue
        gt_xyxy = target.boxes_xyxy.to(raw.device)[found.matched_gt]
        weights = target.box_weights.to(raw.device)[found.matched_gt]
        obj_target[b, found.fg_rows] = 1.0
        obj_weight[b, found.fg_rows] = weights
        fg_batch.append(torch.full_like(found.fg_rows, b))
        fg_rows.append(found.fg_rows)
        reg_targets.append(
            torch.cat([(gt_xyxy[:, :2] + gt_xyxy[:, 2:]) / 2, gt_xyxy[:, 2:] - gt_xyxy[:, :2]], 1)
        )
        labels = target.labels.to(raw.device)[found.matched_gt]
        cls_targets.append(F.one_hot(labels, num_classes).float() * found.ious[:, None])
        fg_weights.append(weights)

    num_fg = sum(len(rows) for rows in fg_rows)
    norm = float(max(num_fg, 1))
    obj_loss = (
        obj_weight * F.binary_cross_entropy_with_logits(obj_logits, obj_target, reduction="none")
    ).sum() / norm
    # without foreground these terms are constant 0 (``total`` still depends on ``obj``)
    iou_loss = cls_loss = l1_loss = raw.new_zeros(())
    if num_fg:
        bi, ri = torch.cat(fg_batch), torch.cat(fg_rows)
        reg_t, cls_t, w = torch.cat(reg_targets), torch.cat(cls_targets), torch.cat(fg_weights)
        iou = _pair_iou(pred_boxes[bi, ri], reg_t)
        iou_loss = (w * (1.0 - iou**2)).sum() / norm
        cls_bce = F.binary_cross_entropy_with_logits(cls_logits[bi, ri], cls_t, reduction="none")
        if class_mask is not None:
            cls_bce = cls_bce * class_mask.to(cls_bce)[None, :]
        cls_loss = (w[:, None] * cls_bce).sum() / norm
        if use_l1:
            s = strides[ri]
            l1_t = torch.cat([reg_t[:, :2] / s - cells[ri], torch.log(reg_t[:, 2:] / s + 1e-8)], 1)
            l1_loss = (w[:, None] * (raw[bi, ri, :4] - l1_t).abs()).sum() / norm
    total = REG_WEIGHT * iou_loss + obj_loss + cls_loss + l1_loss
    return {
        "total": total,
        "iou": iou_loss,
        "obj": obj_loss,
        "cls": cls_loss,
        "l1": l1_loss,
        "num_fg": torch.tensor(float(num_fg), device=raw.device),
    }
