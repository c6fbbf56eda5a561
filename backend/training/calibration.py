"""Carry a score threshold chosen on one model's predictions over to another model's scores.

Why: while a project has few annotated tasks, the gate scores a candidate by cross-validation,
on the predictions of fold models trained on half the images. With half the steps
(``cv_fold_epochs="candidate"``, the gate's rule when this was built) those models
are less confident than the candidate that will serve, so the threshold of least annotator time
on their predictions sits lower on the score axis than the candidate's would (the loop grid of
issue 12: raccoon fell from 0.3 to 0.05, BCCD from 0.3–0.4 to 0.15–0.25). Served as is, the
candidate sends the annotator more loose and false boxes than the fold models did at that
threshold.

The quantity the gate chose was an operating point: how many boxes an image gets. So the
threshold is carried over by matching that count on images neither model was trained on (the
project's unannotated tasks): the candidate serves at the score that gives it as many boxes per
image as the fold models gave at the chosen threshold. No label is needed, nothing is fitted,
and with equally confident models the threshold comes back unchanged.

Measured on the loop grid (``benchmark/results/loop_calibrated/README.md``) it is not a fix, and
the gate leaves it off by default: the candidate is not only more confident than its fold
models but also better, so at their operating point it should keep more boxes, not as many. The
served time saved moved by −7.5 to +8.4 points per dataset and order, +0.05 on average.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from backend.boxes import Boxes

__all__ = ["CountMatch", "count_matched_threshold", "unlabeled_sample"]


@dataclass(frozen=True)
class CountMatch:
    """A threshold carried over by box count (recorded with the version)."""

    #: The threshold chosen on the reference models' predictions.
    reference_threshold: float
    #: The threshold the target model serves at: as many boxes per image as the reference.
    threshold: float
    images: int
    #: Boxes per image of the reference models at ``reference_threshold`` (mean over models).
    reference_boxes_per_image: float
    #: Boxes per image of the target model at ``threshold``.
    boxes_per_image: float

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _scores(predictions: Sequence[Boxes]) -> np.ndarray:
    parts = [p.scores for p in predictions if p.scores is not None and len(p.scores)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)


def count_matched_threshold(
    reference: Sequence[Sequence[Boxes]],
    target: Sequence[Boxes],
    threshold: float,
    *,
    floor: float = 0.0,
) -> CountMatch:
    """The score at which ``target`` gives as many boxes as ``reference`` does at ``threshold``.

    ``reference`` holds one list of predictions per reference model (e.g. per fold model), each
    on the same images as ``target``; its count is the mean over the models. The result lies
    halfway between the target's scores on either side of the matched count, so the target keeps
    exactly that many boxes on these images. When the reference keeps no box there is nothing to
    match and ``threshold`` is kept; when the target has fewer boxes than the count, it serves
    down to the lower of ``threshold`` and its lowest score (never below ``floor``).
    """
    if not target:
        raise ValueError("no images to match box counts on")
    if any(len(r) != len(target) for r in reference):
        raise ValueError("reference and target predictions must cover the same images")
    if not reference:
        raise ValueError("no reference predictions")
    counts = [int((_scores(r) >= threshold).sum()) for r in reference]
    want = round(float(np.mean(counts)))
    scores = np.sort(_scores(target))[::-1]
    if want == 0:
        matched = threshold
    elif want >= len(scores):
        matched = min(threshold, float(scores[-1])) if len(scores) else threshold
    else:
        matched = 0.5 * (float(scores[want - 1]) + float(scores[want]))
    matched = max(floor, matched)
    return CountMatch(
        reference_threshold=threshold,
        threshold=round(matched, 4),
        images=len(target),
        reference_boxes_per_image=float(np.mean(counts)) / len(target),
        boxes_per_image=float((scores >= round(matched, 4)).sum()) / len(target),
    )


def unlabeled_sample(
    keys: Sequence[int | str], limit: int, salt: str = "boxloop-calibration"
) -> list[int]:
    """Indices of up to ``limit`` of ``keys``, chosen by a hash of each key.

    The same task is picked whatever order the keys come in, so the product (the project's
    unannotated tasks) and the harness (the pool's unlabelled images) pick by one rule.
    """
    if limit <= 0:
        return []

    def unit(key: int | str) -> int:
        return int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big")

    ranked = sorted(range(len(keys)), key=lambda i: unit(keys[i]))
    return sorted(ranked[:limit])
