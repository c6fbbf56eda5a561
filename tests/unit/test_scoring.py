"""score_predictions on hand-worked scenes: mAP plus the annotator's W_B / W_T per score threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from backend.boxes import Boxes
from backend.scoring import ThresholdScore, ValidationScore, score_predictions

SIZE = (100, 100)
LABELS = ["cat", "dog"]
CAT, DOG = 0, 1


def gt(boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None) -> Boxes:
    return Boxes(np.array(boxes, np.float32).reshape(-1, 4), labels, SIZE, ignore=ignore)


def det(boxes: list[list[float]], labels: list[int], scores: list[float]) -> Boxes:
    return Boxes(np.array(boxes, np.float32).reshape(-1, 4), labels, SIZE, scores=scores)


def test_perfect_box_and_a_false_positive() -> None:
    # gts: a cat and a dog. preds: the cat exactly (0.9) and a "dog" far from the dog (0.4).
    gts = [gt([[0, 0, 40, 40], [50, 50, 90, 90]], [CAT, DOG])]
    preds = [det([[0, 0, 40, 40], [5, 60, 30, 95]], [CAT, DOG], [0.9, 0.4])]
    score = score_predictions(gts, preds, LABELS, score_thresholds=[0.3, 0.5, 0.7])

    assert isinstance(score, ValidationScore)
    # cat AP 1 at every IoU, dog AP 0 (its one detection matches nothing).
    assert score.map50 == pytest.approx(0.5) and score.map == pytest.approx(0.5)
    assert (score.images, score.w_manual, score.iou_threshold) == (1, 2, 0.5)
    # 0.3: both shown -> the false dog is removed (R=1), the dog is drawn (A=1):
    #      W_B = 1 + 1 = 2, W_T = 1 + 1/2 = 1.5; saved 0 and 1 - 1.5/2 = 0.25.
    # 0.5 and 0.7: only the cat shown -> A=1, R=0: W_B = W_T = 1, saved 0.5.
    assert score.thresholds == (
        ThresholdScore(
            0.3,
            additions=1,
            removals=1,
            w_b=2,
            w_t=1.5,
            saved_b=0.0,
            saved_t=0.25,
            image_w_t=(1.5,),
        ),
        ThresholdScore(
            0.5, additions=1, removals=0, w_b=1, w_t=1.0, saved_b=0.5, saved_t=0.5, image_w_t=(1.0,)
        ),
        ThresholdScore(
            0.7, additions=1, removals=0, w_b=1, w_t=1.0, saved_b=0.5, saved_t=0.5, image_w_t=(1.0,)
        ),
    )
    # 0.5 and 0.7 tie on W_T = 1: the higher threshold wins.
    assert score.best_threshold == 0.7 and score.best == score.at(0.7)
    assert score.beats_manual  # 1 < 2


def test_a_low_threshold_wins_when_it_keeps_a_true_box() -> None:
    # Two cats; the second is found only at 0.35, and a false positive sits at 0.4.
    gts = [gt([[0, 0, 40, 40], [50, 50, 90, 90]], [CAT, CAT])]
    preds = [
        det([[0, 0, 40, 40], [50, 50, 90, 90], [0, 60, 30, 95]], [CAT, CAT, CAT], [0.9, 0.35, 0.4])
    ]
    score = score_predictions(gts, preds, LABELS, score_thresholds=[0.5, 0.3])
    # 0.3: A=0, R=1 -> W_B 1, W_T 0.5.  0.5: A=1, R=0 -> W_B 1, W_T 1.
    low, high = score.at(0.3), score.at(0.5)
    assert (low.additions, low.removals, low.w_b, low.w_t) == (0, 1, 1, 0.5)
    assert (high.additions, high.removals, high.w_b, high.w_t) == (1, 0, 1, 1.0)
    assert [t.score_threshold for t in score.thresholds] == [0.5, 0.3]  # order kept
    assert score.best_threshold == 0.3 and score.best.saved_t == pytest.approx(0.75)
    assert score.beats_manual


def test_a_model_that_only_adds_work_does_not_beat_manual() -> None:
    # One dog, two false cats (0.6, 0.8) elsewhere.
    gts = [gt([[50, 50, 90, 90]], [DOG])]
    preds = [det([[0, 0, 20, 20], [0, 60, 20, 80]], [CAT, CAT], [0.6, 0.8])]
    score = score_predictions(gts, preds, LABELS, score_thresholds=[0.5, 0.7, 0.9])
    assert [t.w_t for t in score.thresholds] == [2.0, 1.5, 1.0]  # A=1 plus R/2 for R = 2, 1, 0
    assert [t.w_b for t in score.thresholds] == [3, 2, 1]
    assert score.best_threshold == 0.9 and score.best.saved_t == 0.0
    assert not score.beats_manual  # W_T 1 == W_manual 1
    assert score.map50 == 0.0


def test_ignored_ground_truth_costs_nothing() -> None:
    # A difficult cat (ignored) with a prediction on it, and a found dog.
    gts = [gt([[0, 0, 40, 40], [50, 50, 90, 90]], [CAT, DOG], ignore=[True, False])]
    preds = [det([[0, 0, 40, 40], [50, 50, 90, 90]], [CAT, DOG], [0.8, 0.9])]
    score = score_predictions(gts, preds, LABELS, score_thresholds=[0.5])
    assert score.w_manual == 1
    assert (score.best.additions, score.best.removals, score.best.w_t) == (0, 0, 0.0)
    assert score.best.saved_t == 1.0 and score.map50 == pytest.approx(1.0)


def test_iou_threshold_decides_acceptance() -> None:
    # The prediction overlaps the cat at IoU 0.6: accepted at 0.5, removed + added at 0.7.
    gts = [gt([[0, 0, 50, 100]], [CAT])]
    preds = [det([[0, 0, 30, 100]], [CAT], [0.9])]
    loose = score_predictions(gts, preds, LABELS, score_thresholds=[0.5])
    strict = score_predictions(gts, preds, LABELS, iou_threshold=0.7, score_thresholds=[0.5])
    assert loose.best.w_t == 0.0 and strict.best.w_t == 1.5
    assert strict.map50 == pytest.approx(1.0)  # mAP@0.5 does not depend on the gate's IoU


def test_several_images_sum_and_no_ground_truth_is_nan() -> None:
    gts = [gt([[0, 0, 40, 40]], [CAT]), gt([], [])]
    preds = [det([[0, 0, 40, 40]], [CAT], [0.9]), det([[0, 0, 10, 10]], [DOG], [0.95])]
    score = score_predictions(gts, preds, LABELS, score_thresholds=[0.5])
    assert (score.images, score.w_manual, score.best.removals, score.best.w_t) == (2, 1, 1, 0.5)

    empty = score_predictions([gt([], [])], [det([], [], [])], LABELS, score_thresholds=[0.5])
    assert math.isnan(empty.map50) and math.isnan(empty.best.saved_t)
    assert empty.w_manual == 0 and not empty.beats_manual


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [([], "empty"), ([0.5, 0.5], "repeats"), ([1.5], r"\[0, 1\]")],
)
def test_bad_thresholds_raise(thresholds: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_predictions([gt([], [])], [det([], [], [])], LABELS, score_thresholds=thresholds)


def test_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError, match="predictions for"):
        score_predictions([gt([], [])], [], LABELS, score_thresholds=[0.5])
    with pytest.raises(ValueError, match="no scores"):
        score_predictions([gt([], [])], [gt([], [])], LABELS, score_thresholds=[0.5])
    with pytest.raises(KeyError):
        score_predictions([gt([], [])], [det([], [], [])], LABELS, score_thresholds=[0.5]).at(0.3)
