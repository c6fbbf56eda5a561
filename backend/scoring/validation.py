"""One score for a candidate model on held-out images: mAP and the simulated annotator's workload.

The promotion gate compares model versions by what they would cost a labeller,
not only by mAP. For every score threshold the annotator might be shown,
:func:`score_predictions` runs the simulated annotator
(:func:`~backend.scoring.oracle.correct_batch`) over the validation images and
prices the corrections with the paper's workload (:mod:`backend.scoring.workload`)
at ``T = 1``: every validation box is corrected from predictions, so

* ``W_B = A + R`` (boxes touched),
* ``W_T = A + R/2`` (in units of ``T``, the time to draw one box),

against labelling by hand, ``W_manual = N`` (ground-truth boxes that count;
ignored regions are never drawn) for both. Pure: no I/O, no model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from backend.boxes import Boxes, IgnoreOverlap
from backend.scoring.detection_map import evaluate_map
from backend.scoring.oracle import correct_batch
from backend.scoring.workload import BatchTally, CostModel, batch_cost

#: ``T = 1``: workload figures are in units of the time to draw one box.
UNIT_COST = CostModel(seconds_per_box=1.0)


@dataclass(frozen=True)
class ThresholdScore:
    """The annotator's work when shown the predictions scoring at least ``score_threshold``.

    ``saved_b`` / ``saved_t`` are fractions (``1 − W / W_manual``; ``nan`` when
    there is no ground truth), not percentages.
    """

    score_threshold: float
    additions: int
    removals: int
    w_b: int
    w_t: float
    saved_b: float
    saved_t: float


@dataclass(frozen=True)
class ValidationScore:
    """mAP and per-threshold workload of one model's predictions on a validation set.

    Attributes:
        map50: COCO-style mAP at IoU 0.5 (``nan`` when no class has ground truth).
        map: COCO mAP averaged over IoU 0.5:0.95.
        images: validation images scored.
        w_manual: ground-truth boxes that count, i.e. ``W_B`` and ``W_T`` (units of
            ``T``) of labelling the set by hand.
        iou_threshold: IoU the annotator needs to accept a box.
        thresholds: one :class:`ThresholdScore` per score threshold, in the order given.
        best_threshold: the score threshold of least ``W_T`` (ties go to the higher one).
        beats_manual: whether ``W_T`` at ``best_threshold`` is below ``w_manual``.
    """

    map50: float
    map: float
    images: int
    w_manual: int
    iou_threshold: float
    thresholds: tuple[ThresholdScore, ...]
    best_threshold: float
    beats_manual: bool

    @property
    def best(self) -> ThresholdScore:
        """The :class:`ThresholdScore` at :attr:`best_threshold`."""
        return self.at(self.best_threshold)

    def at(self, score_threshold: float) -> ThresholdScore:
        """The :class:`ThresholdScore` for ``score_threshold`` (one of those scored)."""
        for entry in self.thresholds:
            if entry.score_threshold == score_threshold:
                return entry
        scored = [t.score_threshold for t in self.thresholds]
        raise KeyError(f"score threshold {score_threshold} was not scored (scored: {scored})")


def _saved(work: float, manual: int) -> float:
    return math.nan if manual <= 0 else 1.0 - work / manual


def score_predictions(
    gts: Sequence[Boxes],
    preds: Sequence[Boxes],
    labels: Sequence[str],
    *,
    iou_threshold: float = 0.5,
    score_thresholds: Sequence[float],
    ignore_overlap: IgnoreOverlap = "iou",
) -> ValidationScore:
    """Score ``preds`` (with scores) against ``gts`` image by image.

    ``labels`` is the label list both index into; ``ignore_overlap`` is how a
    prediction is tested against an ignored ground-truth region (see
    :data:`backend.boxes.IgnoreOverlap`). Raises ``ValueError`` on mismatched
    lengths or image sizes, predictions without scores, or no or repeated or
    out-of-range score thresholds.
    """
    if len(gts) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(gts)} images")
    cuts = [float(s) for s in score_thresholds]
    if not cuts:
        raise ValueError("score_thresholds is empty")
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"score_thresholds has repeats: {cuts}")
    if not all(0.0 <= s <= 1.0 for s in cuts):
        raise ValueError(f"score_thresholds must lie in [0, 1], got {cuts}")
    mean_ap = evaluate_map(list(gts), list(preds), list(labels), ignore_overlap)
    w_manual = sum(len(g.kept()) for g in gts)

    entries = []
    for cut in cuts:
        correction = correct_batch(
            list(preds),
            list(gts),
            iou_threshold,
            score_threshold=cut,
            ignore_overlap=ignore_overlap,
        )
        w_b, w_t = batch_cost(BatchTally(len(gts), w_manual, correction), UNIT_COST, "paper")
        entries.append(
            ThresholdScore(
                score_threshold=cut,
                additions=correction.additions,
                removals=correction.removals,
                w_b=w_b,
                w_t=w_t,
                saved_b=_saved(w_b, w_manual),
                saved_t=_saved(w_t, w_manual),
            )
        )
    best = min(entries, key=lambda e: (e.w_t, -e.score_threshold))
    return ValidationScore(
        map50=mean_ap.map50,
        map=mean_ap.map50_95,
        images=len(gts),
        w_manual=w_manual,
        iou_threshold=iou_threshold,
        thresholds=tuple(entries),
        best_threshold=best.score_threshold,
        beats_manual=best.w_t < w_manual,
    )
