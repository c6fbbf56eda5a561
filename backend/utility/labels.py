"""Utility labels: how much of what a detector found on the pristine image survives a distortion.

Definitions (the paper's Section IV for detection, with ``docs/method-notes.md``'s reading):

* A ground-truth box is **found** by a detection with the right class, confidence ≥ ``phi_rec``
  (0.5) and IoU ≥ ``iou`` (0.5). Only boxes the detector found on the *pristine* image count: the
  label measures what the distortion took away, not what the detector never knew.
* **Binary utility** is 1 when at least one such box is also found on the distorted image, 0 when
  none is, and ``None`` (undefined, dropped) when the detector found nothing on the pristine image.
* **Graded utility**, per counted box: ``φ′`` its confidence on the pristine image, ``φ`` the best
  right-class IoU ≥ 0.5 confidence on the distorted one (0 if none). Eq. (2) as printed,
  ``(φ − φ_rec) / (1 − (φ′ − φ_rec))``, is stored, and beside it the clipped form
  ``clip((φ − φ_rec) / (φ′ − φ_rec), 0, 1)``, which is 1 when the distorted image scores like the
  pristine one (the printed form is not). The image takes its best box (the "at least one" of
  the binary label), so ``graded ≥ 0`` exactly when ``binary == 1``.
* **Votes** across detectors: 1 where all say 1, 0 where all say 0, dropped otherwise; the graded
  forms are averaged over the detectors that defined them.

Detections must be produced with a low score threshold (e.g. 0.05) so that confidences below
``phi_rec`` on the distorted image are seen and graded, not read as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backend.boxes import Boxes

__all__ = [
    "PHI_REC",
    "DetectorUtility",
    "Vote",
    "box_confidences",
    "detector_utility",
    "vote",
]

#: φ_rec: the recognition confidence below which a detection is rejected (the paper's 0.5).
PHI_REC = 0.5


@dataclass(frozen=True)
class DetectorUtility:
    """One detector's utility for one distorted image.

    Attributes:
        binary: 1, 0, or ``None`` when the detector found no ground-truth box on the pristine image.
        graded: Eq. (2) as printed (``nan`` when undefined); negative exactly when ``binary == 0``.
        clipped: ``clip((φ − φ_rec) / (φ′ − φ_rec), 0, 1)`` (``nan`` when undefined).
        counted: ground-truth boxes found on the pristine image.
        kept: of those, found again on the distorted image.
    """

    binary: int | None
    graded: float
    clipped: float
    counted: int
    kept: int


def box_confidences(gt: Boxes, detections: Boxes, iou: float = 0.5) -> np.ndarray:
    """Per ground-truth box, the best confidence of a right-class detection with IoU ≥ ``iou``.

    0 where there is none. Ignored ground truth (``difficult``, ``DontCare``) gets ``nan``.
    """
    result = np.zeros(len(gt), np.float32)
    if len(gt) and len(detections):
        if detections.scores is None:
            raise ValueError("detections carry no scores")
        overlap = gt.iou(detections) >= iou
        same = gt.labels[:, None] == detections.labels[None, :]
        candidates = np.where(overlap & same, detections.scores[None, :], 0.0)
        result = candidates.max(axis=1).astype(np.float32)
    result[gt.ignore_mask] = np.nan
    return result


def _clipped(phi: float, phi_prime: float, phi_rec: float) -> float:
    if phi_prime <= phi_rec:  # found at exactly φ_rec: kept or not, nothing in between
        return 1.0 if phi >= phi_rec else 0.0
    return float(np.clip((phi - phi_rec) / (phi_prime - phi_rec), 0.0, 1.0))


def detector_utility(
    gt: Boxes,
    pristine: Boxes,
    distorted: Boxes,
    *,
    phi_rec: float = PHI_REC,
    iou: float = 0.5,
) -> DetectorUtility:
    """Utility of the distorted image for the detector that produced both detection sets."""
    if gt.image_size != distorted.image_size or gt.image_size != pristine.image_size:
        raise ValueError(
            f"image sizes differ: gt {gt.image_size}, pristine {pristine.image_size}, "
            f"distorted {distorted.image_size}"
        )
    phi_prime = box_confidences(gt, pristine, iou)
    counted = np.nan_to_num(phi_prime, nan=0.0) >= phi_rec
    if not counted.any():
        return DetectorUtility(None, float("nan"), float("nan"), 0, 0)
    phi = box_confidences(gt, distorted, iou)[counted]
    phi_p = phi_prime[counted]
    graded = (phi - phi_rec) / (1.0 - (phi_p - phi_rec))
    clipped = np.array(
        [_clipped(float(a), float(b), phi_rec) for a, b in zip(phi, phi_p, strict=True)]
    )
    kept = int((phi >= phi_rec).sum())
    return DetectorUtility(
        1 if kept else 0, float(graded.max()), float(clipped.max()), int(counted.sum()), kept
    )


@dataclass(frozen=True)
class Vote:
    """The detectors' combined label for one distorted image.

    Attributes:
        binary: 1 if every detector that defined a label says 1, 0 if every one says 0, ``None``
            when they disagree or none defined one (the image is dropped from training and test).
        graded_mean: mean of the defined graded utilities (``nan`` if none).
        clipped_mean: mean of the defined clipped utilities (``nan`` if none).
        voters: how many detectors defined a label.
    """

    binary: int | None
    graded_mean: float
    clipped_mean: float
    voters: int


def vote(utilities: Sequence[DetectorUtility], *, require_all: bool = True) -> Vote:
    """Combine detectors' labels. With ``require_all`` (default) an image any detector left
    undefined is dropped too, so that "all say 1" means all of them."""
    defined = [u for u in utilities if u.binary is not None]
    if not defined or (require_all and len(defined) != len(utilities)):
        binary = None
    else:
        values = {u.binary for u in defined}
        binary = values.pop() if len(values) == 1 else None
    graded = [u.graded for u in defined]
    clipped = [u.clipped for u in defined]
    return Vote(
        binary,
        float(np.mean(graded)) if graded else float("nan"),
        float(np.mean(clipped)) if clipped else float("nan"),
        len(defined),
    )
