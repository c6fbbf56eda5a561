"""The simulated annotator: how many edits turn a model's predictions into the ground truth.

The paper (§3.3–3.4) counts two kinds of correction: *additions* A (a ground
truth box nothing predicted) and *removals* R (a prediction that matches no
ground truth). A prediction counts as correct when it has the ground truth's
class and IoU ≥ τ with it; each ground-truth box can vouch for one prediction
only. We find the pairs by optimal assignment (scipy's
``linear_sum_assignment``) rather than greedily, because a greedy pass can pair
a prediction with the "wrong" one of two overlapping objects and then charge
the annotator an extra removal and addition that a human would never make.
The assignment first maximises the number of pairs (which minimises A + R) and
breaks ties by total IoU.

Ignored ground truth (VOC ``difficult``, KITTI ``DontCare``, COCO ``iscrowd``):
a prediction left unpaired after the assignment that overlaps an ignored region
(same class, or any class for a :data:`~backend.boxes.ANY_CLASS` region;
overlap measured as the dataset's own evaluation does, see
:data:`~backend.boxes.IgnoreOverlap`) is neither accepted nor removed, and
an ignored region never needs an addition.

Two further counts feed the *strict* convention reported beside the paper's:
``loose`` (accepted pairs with IoU below ``tight_iou``: the class is right but
a careful annotator would still drag the box, an *adjustment*) and
``wrong_class`` (removals sitting on an unpaired ground truth of another class
at IoU ≥ τ; they cost a removal plus an addition under both conventions, and
are counted only so a report can say how much of R is label confusion).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from backend.boxes import ANY_CLASS, Boxes, IgnoreOverlap

Assignment = Literal["optimal", "greedy"]

#: Default IoU a class-correct prediction needs to be left untouched under the strict
#: convention. Extreme clicking (Papadopoulos et al., ICCV 2017) reports boxes
#: that agree with VOC's ground truth at about 0.88 mean IoU, so a box tighter
#: than 0.85 is as good as a fresh human one.
DEFAULT_TIGHT_IOU = 0.85


@dataclass(frozen=True)
class Correction:
    """What the annotator does to one image (or, summed, to a batch).

    Invariants: ``accepted + removals + ignored == predictions`` and
    ``accepted + additions == gt``.
    """

    predictions: int = 0
    gt: int = 0
    accepted: int = 0
    removals: int = 0
    additions: int = 0
    ignored: int = 0
    loose: int = 0
    wrong_class: int = 0

    def __add__(self, other: Correction) -> Correction:
        return Correction(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> Correction:
        return cls(**{f.name: int(data.get(f.name, 0)) for f in fields(cls)})


def pred_area_overlap(pred: Boxes, regions: Boxes) -> np.ndarray:
    """``(len(pred), len(regions))`` intersection over each prediction's own area."""
    if len(pred) == 0 or len(regions) == 0:
        return np.zeros((len(pred), len(regions)), np.float32)
    a, b = pred.xyxy[:, None, :], regions.xyxy[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = np.maximum(pred.areas, 1e-9)[:, None]
    return (iw * ih / area).astype(np.float32)


def assign(
    eligible: np.ndarray,
    iou: np.ndarray,
    method: Assignment = "optimal",
    scores: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """One-to-one ``(prediction, gt)`` pairs among the ``eligible`` cells.

    ``optimal``: maximum number of pairs, ties broken by total IoU. ``greedy``:
    predictions in descending score order each take the free eligible ground
    truth of highest IoU (COCOeval's matching), kept for comparison.
    """
    n_pred, n_gt = eligible.shape
    if n_pred == 0 or n_gt == 0 or not eligible.any():
        return []
    if method == "greedy":
        order = np.argsort(-scores, kind="stable") if scores is not None else np.arange(n_pred)
        taken = np.zeros(n_gt, bool)
        pairs = []
        for p in order:
            candidates = np.where(eligible[p] & ~taken)[0]
            if len(candidates):
                g = int(candidates[np.argmax(iou[p, candidates])])
                taken[g] = True
                pairs.append((int(p), g))
        return sorted(pairs)
    # A pair is worth big + IoU: with big > min(n_pred, n_gt) any assignment with
    # one more pair outweighs every possible IoU total of one with fewer.
    big = float(min(n_pred, n_gt) + 1)
    weight = np.where(eligible, big + iou.astype(np.float64), 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if eligible[r, c]]


def correct(
    pred: Boxes,
    gt: Boxes,
    iou_threshold: float = 0.5,
    *,
    ignore_overlap: IgnoreOverlap = "iou",
    tight_iou: float = DEFAULT_TIGHT_IOU,
    method: Assignment = "optimal",
) -> Correction:
    """Simulate the correction of one image's predictions against its ground truth.

    ``pred`` should already be cut at the score threshold the annotator sees
    (:meth:`Boxes.above`).
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if pred.image_size != gt.image_size:
        raise ValueError(f"prediction image size {pred.image_size} != ground truth {gt.image_size}")
    kept, regions = gt.kept(), gt[gt.ignore_mask]
    iou = pred.iou(kept)
    same_class = pred.labels[:, None] == kept.labels[None, :]
    pairs = assign(same_class & (iou >= iou_threshold), iou, method, pred.scores)
    paired_pred = np.zeros(len(pred), bool)
    paired_gt = np.zeros(len(kept), bool)
    for p, g in pairs:
        paired_pred[p] = paired_gt[g] = True
    loose = sum(1 for p, g in pairs if iou[p, g] < tight_iou)

    ignored = np.zeros(len(pred), bool)
    if len(regions):
        overlap = pred.iou(regions) if ignore_overlap == "iou" else pred_area_overlap(pred, regions)
        class_ok = (pred.labels[:, None] == regions.labels[None, :]) | (
            regions.labels[None, :] == ANY_CLASS
        )
        ignored = ~paired_pred & ((overlap >= iou_threshold) & class_ok).any(axis=1)
    removed = ~paired_pred & ~ignored

    left_pred, left_gt = np.where(removed)[0], np.where(~paired_gt)[0]
    left_iou = iou[np.ix_(left_pred, left_gt)]
    other_class = ~same_class[np.ix_(left_pred, left_gt)]
    confusion = assign(other_class & (left_iou >= iou_threshold), left_iou)

    return Correction(
        predictions=len(pred),
        gt=len(kept),
        accepted=len(pairs),
        removals=int(removed.sum()),
        additions=int((~paired_gt).sum()),
        ignored=int(ignored.sum()),
        loose=loose,
        wrong_class=len(confusion),
    )


def correct_batch(
    preds: list[Boxes],
    gts: list[Boxes],
    iou_threshold: float = 0.5,
    *,
    score_threshold: float = 0.0,
    ignore_overlap: IgnoreOverlap = "iou",
    tight_iou: float = DEFAULT_TIGHT_IOU,
    method: Assignment = "optimal",
) -> Correction:
    """Sum of :func:`correct` over the images of a batch, predictions cut at ``score_threshold``."""
    if len(preds) != len(gts):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} images")
    total = Correction()
    for p, g in zip(preds, gts, strict=True):
        total = total + correct(
            p.above(score_threshold),
            g,
            iou_threshold,
            ignore_overlap=ignore_overlap,
            tight_iou=tight_iou,
            method=method,
        )
    return total
