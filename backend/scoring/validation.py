"""One score for a candidate model on held-out images: mAP and the simulated annotator's workload.

The promotion gate compares model versions by what they would cost a labeller,
not only by mAP. For every score threshold the annotator might be shown,
:func:`score_predictions` runs the simulated annotator
(:func:`~backend.scoring.oracle.correct`) image by image over the validation images and
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

import numpy as np

from backend.boxes import Boxes, IgnoreOverlap
from backend.scoring.detection_map import evaluate_map
from backend.scoring.oracle import correct
from backend.scoring.workload import BatchTally, CostModel, batch_cost

#: ``T = 1``: workload figures are in units of the time to draw one box.
UNIT_COST = CostModel(seconds_per_box=1.0)


@dataclass(frozen=True)
class ThresholdScore:
    """The annotator's work when shown the predictions scoring at least ``score_threshold``.

    ``saved_b`` / ``saved_t`` are fractions (``1 − W / W_manual``; ``nan`` when
    there is no ground truth), not percentages. ``image_w_t`` holds each image's ``W_T`` in the
    order scored (they sum to ``w_t``): a comparison of two models on a few images needs the
    paired per-image figures, not only the totals.
    """

    score_threshold: float
    additions: int
    removals: int
    w_b: int
    w_t: float
    saved_b: float
    saved_t: float
    image_w_t: tuple[float, ...] = ()


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
        best_threshold: the score threshold the model would serve at: the one of least
            ``W_T`` (ties go to the higher one), or with ``prefer_threshold`` given, the one
            nearest to it among those within one standard error of that least ``W_T`` (see
            :func:`score_predictions`).
        beats_manual: whether ``W_T`` at ``best_threshold`` is below ``w_manual`` (strictly;
            whether the version sends boxes at all is :attr:`serves_boxes`).
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
    def serves_boxes(self) -> bool:
        """Whether a version scored so sends boxes: unless its best threshold costs the
        annotator more than drawing by hand (``W_T`` above ``w_manual``).

        A tie serves. On a slice with no box to draw (``w_manual`` 0) sending none is a tie and
        the best any model can do there; the strict :attr:`beats_manual` turned boxes off for
        every version scored on such a slice, so a promoted one sent nothing on any image, on
        the evidence of images with nothing to find. With boxes to draw, a tie costs what
        drawing by hand does (even one that sends no box: then nothing is lost either way).
        :func:`score_predictions` never lets its one-standard-error rule pick a threshold that
        costs more than drawing by hand when another does not, so this is false only when every
        threshold does.
        """
        return self.best.w_t <= self.w_manual

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


def _one_standard_error(
    entries: Sequence[ThresholdScore], least: ThresholdScore, prefer: float
) -> ThresholdScore:
    """The entry nearest to ``prefer`` whose ``W_T`` is within one standard error of ``least``'s.

    The standard error is that of the mean paired per-image difference to ``least`` (an entry
    scored on one image only is never as good unless it ties).
    """
    base = np.asarray(least.image_w_t, dtype=float)
    good = []
    for entry in entries:
        excess = np.asarray(entry.image_w_t, dtype=float) - base
        if len(excess) == 0:
            good.append(entry)
            continue
        se = float(excess.std(ddof=1) / math.sqrt(len(excess))) if len(excess) > 1 else 0.0
        if float(excess.mean()) <= se + 1e-9:
            good.append(entry)
    return min(good, key=lambda e: (abs(e.score_threshold - prefer), -e.score_threshold))


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
    prefer_threshold: float | None = None,
) -> ValidationScore:
    """Score ``preds`` (with scores) against ``gts`` image by image.

    ``labels`` is the label list both index into; ``ignore_overlap`` is how a
    prediction is tested against an ignored ground-truth region (see
    :data:`backend.boxes.IgnoreOverlap`).

    ``prefer_threshold`` (e.g. the product's default serving threshold) makes the choice of
    :attr:`ValidationScore.best_threshold` robust on small slices, by the one-standard-error
    rule: a threshold whose ``W_T`` exceeds the least one by no more than the standard error of
    the paired per-image differences is as good as the least, and of those the one nearest to
    ``prefer_threshold`` wins. On four images, the least-``W_T`` threshold is often an
    accident of one image (the grid of issue 12 served a version at 0.05 that way); on hundreds,
    the standard error shrinks and the rule picks the least. It picks only among thresholds
    that cost no more than drawing by hand (``W_T ≤ w_manual``) when the least does: on a slice
    without boxes, a threshold with one false box on one image is within one standard error of
    none at all, and the version would otherwise send no boxes
    (:attr:`ValidationScore.serves_boxes`).

    Raises ``ValueError`` on mismatched lengths or image sizes, predictions without scores, or
    no or repeated or out-of-range score thresholds.
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
        per_image = [
            correct(p.above(cut), g, iou_threshold, ignore_overlap=ignore_overlap)
            for p, g in zip(preds, gts, strict=True)
        ]
        costs = [batch_cost(BatchTally(1, c.gt, c), UNIT_COST, "paper") for c in per_image]
        w_b = sum(b for b, _ in costs)
        w_t = float(sum(t for _, t in costs))
        entries.append(
            ThresholdScore(
                score_threshold=cut,
                additions=sum(c.additions for c in per_image),
                removals=sum(c.removals for c in per_image),
                w_b=w_b,
                w_t=w_t,
                saved_b=_saved(w_b, w_manual),
                saved_t=_saved(w_t, w_manual),
                image_w_t=tuple(float(t) for _, t in costs),
            )
        )
    best = min(entries, key=lambda e: (e.w_t, -e.score_threshold))
    if prefer_threshold is not None:
        affordable = [e for e in entries if e.w_t <= w_manual] if best.w_t <= w_manual else entries
        best = _one_standard_error(affordable, best, prefer_threshold)
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
