"""Detection mAP on a held-out split, through pycocotools' COCOeval.

Reports mAP@0.5 (VOC's metric) and mAP@[.5:.95] (COCO's), both COCO-style
(101-point interpolated precision, up to 100 detections an image, classes
without ground truth left out of the mean).

Ignored ground truth becomes a COCO ``iscrowd`` annotation, which is the only
flag COCOeval honours (it overwrites ``ignore`` with ``iscrowd``): a
detection matched to one is neither a true nor a false positive, and it may
absorb several detections. How overlap with an ignored region is measured
follows the dataset (:data:`~backend.boxes.IgnoreOverlap`):

* ``"pred_area"`` (KITTI ``DontCare``, COCO crowds) is COCOeval's own crowd
  rule, intersection over the detection's area;
* ``"iou"`` (VOC ``difficult``) keeps the plain IoU, as the VOC devkit does, by
  overriding :meth:`COCOeval.computeIoU` to pass ``iscrowd=0`` to the IoU for
  those regions while they stay ``iscrowd`` for the matching.

A region of :data:`~backend.boxes.ANY_CLASS` (``DontCare``) is entered
once per category, so it excuses detections of every class.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.boxes import ANY_CLASS, Boxes, IgnoreOverlap


@dataclass(frozen=True)
class MapResult:
    """mAP of one model on one split; ``nan`` where no class has ground truth."""

    map50: float
    map50_95: float
    images: int
    gt_boxes: int
    predictions: int
    per_class_ap50: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "map50": _json_float(self.map50),
            "map50_95": _json_float(self.map50_95),
            "images": self.images,
            "gt_boxes": self.gt_boxes,
            "predictions": self.predictions,
            "per_class_ap50": {k: _json_float(v) for k, v in self.per_class_ap50.items()},
        }


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 6)


class _IgnoreAwareCOCOeval(COCOeval):
    """COCOeval whose IoU uses the crowd (intersection / detection area) rule only
    for regions flagged ``pred_area``, and plain IoU for every other annotation."""

    def computeIoU(self, imgId: int, catId: int) -> Any:
        gt = self._gts[imgId, catId]
        dt = self._dts[imgId, catId]
        if len(gt) == 0 and len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][: self.params.maxDets[-1]]
        crowd_rule = [int(g["pred_area"]) for g in gt]
        return mask_utils.iou([d["bbox"] for d in dt], [g["bbox"] for g in gt], crowd_rule)


def _xywh(xyxy: np.ndarray) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in xyxy)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_ground_truth(
    gts: Sequence[Boxes], labels: list[str], ignore_overlap: IgnoreOverlap = "iou"
) -> dict[str, Any]:
    """A COCO ``instances`` dict for ``gts`` (image ids 1..n, category ids 1..len(labels))."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, gt in enumerate(gts, start=1):
        images.append({"id": image_id, "width": gt.width, "height": gt.height})
        for xyxy, label, ignored in zip(gt.xyxy, gt.labels, gt.ignore_mask, strict=True):
            bbox = _xywh(xyxy)
            if label == ANY_CLASS and not ignored:
                raise ValueError("a box of ANY_CLASS must be an ignored region")
            for category in range(len(labels)) if label == ANY_CLASS else [int(label)]:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category + 1,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": int(ignored),
                        "pred_area": int(ignored and ignore_overlap == "pred_area"),
                    }
                )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(labels)]
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluate_map(
    gts: Sequence[Boxes],
    preds: Sequence[Boxes],
    labels: list[str],
    ignore_overlap: IgnoreOverlap = "iou",
) -> MapResult:
    """mAP@0.5 and mAP@[.5:.95] of ``preds`` (with scores) against ``gts``, image by image."""
    if len(gts) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} images")
    detections = []
    for image_id, (gt, pred) in enumerate(zip(gts, preds, strict=True), start=1):
        if pred.scores is None:
            raise ValueError(f"predictions for image {image_id} carry no scores")
        if pred.image_size != gt.image_size:
            raise ValueError(
                f"image {image_id}: prediction size {pred.image_size} != {gt.image_size}"
            )
        if len(pred) and (pred.labels.min() < 0 or pred.labels.max() >= len(labels)):
            raise ValueError(f"image {image_id}: prediction label outside 0..{len(labels) - 1}")
        for xyxy, label, score in zip(pred.xyxy, pred.labels, pred.scores, strict=True):
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": _xywh(xyxy),
                    "score": float(score),
                }
            )
    gt_dict = coco_ground_truth(gts, labels, ignore_overlap)
    kept = [gt.kept() for gt in gts]
    gt_boxes = sum(len(k) for k in kept)
    classes_with_gt = sorted({int(c) for k in kept for c in k.labels})
    counts = (len(gts), gt_boxes, len(detections))
    if not classes_with_gt:
        return MapResult(math.nan, math.nan, *counts)
    if not detections:
        return MapResult(
            0.0, 0.0, *counts, per_class_ap50={labels[c]: 0.0 for c in classes_with_gt}
        )

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = gt_dict
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = _IgnoreAwareCOCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: [iou thresholds, recall points, classes, area ranges, max dets]; -1 = no GT
    precision = evaluator.eval["precision"][:, :, :, 0, -1]

    def mean_valid(values: np.ndarray) -> float:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else math.nan

    per_class = {labels[c]: mean_valid(precision[0, :, c]) for c in classes_with_gt}
    return MapResult(
        mean_valid(precision[0]), mean_valid(precision), *counts, per_class_ap50=per_class
    )
