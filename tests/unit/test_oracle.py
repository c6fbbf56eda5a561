"""The simulated annotator on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from backend.boxes import ANY_CLASS, Boxes
from backend.scoring.oracle import Correction, assign, correct, correct_batch, pred_area_overlap

SIZE = (100, 100)


def gt(boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None) -> Boxes:
    return Boxes(np.array(boxes, np.float32).reshape(-1, 4), labels, SIZE, ignore=ignore)


def pred(boxes: list[list[float]], labels: list[int], scores: list[float] | None = None) -> Boxes:
    scores = scores if scores is not None else [0.9] * len(labels)
    return Boxes(np.array(boxes, np.float32).reshape(-1, 4), labels, SIZE, scores=scores)


def test_perfect_predictions_need_nothing() -> None:
    g = gt([[0, 0, 10, 10], [20, 20, 40, 50]], [0, 1])
    c = correct(pred(g.xyxy.tolist(), [0, 1]), g)
    assert c == Correction(predictions=2, gt=2, accepted=2)


def test_no_predictions_means_every_box_is_an_addition() -> None:
    c = correct(Boxes.empty(SIZE, with_scores=True), gt([[0, 0, 10, 10]] * 3, [0, 1, 2]))
    assert (c.additions, c.removals, c.accepted) == (3, 0, 0)


def test_wrong_class_costs_removal_plus_addition() -> None:
    c = correct(pred([[0, 0, 10, 10]], [1]), gt([[0, 0, 10, 10]], [0]))
    assert (c.accepted, c.removals, c.additions, c.wrong_class) == (0, 1, 1, 1)


def test_iou_threshold_decides_between_accept_and_redraw() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    p = pred([[0, 0, 10, 6.5]], [0])  # IoU 0.65
    at_05 = correct(p, g, 0.5)
    assert (at_05.accepted, at_05.removals, at_05.additions, at_05.loose) == (1, 0, 0, 1)
    at_07 = correct(p, g, 0.7)
    assert (at_07.accepted, at_07.removals, at_07.additions, at_07.wrong_class) == (0, 1, 1, 0)
    tight = correct(pred([[0, 0, 10, 9]], [0]), g, 0.5)  # IoU 0.9 >= tight 0.85
    assert tight.loose == 0 and tight.accepted == 1


def test_duplicate_prediction_is_one_accept_and_one_removal() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    c = correct(pred([[0, 0, 10, 10], [0, 0, 10, 9]], [0, 0]), g)
    assert (c.accepted, c.removals, c.additions) == (1, 1, 0)


def test_optimal_assignment_beats_greedy() -> None:
    # G1 = [0,10], G2 = [4,14]; P1 = [1,11] overlaps G1 at 0.818 and G2 at 0.538;
    # P2 = [-1,9] overlaps G1 at 0.818 and G2 at 0.333 (below 0.5).
    # Greedy (P1 first, higher score) takes G1 and leaves P2 nothing: 1 accept, R=1, A=1.
    # Optimal pairs P1-G2 and P2-G1: 2 accepts, no correction at all.
    g = gt([[0, 0, 10, 10], [4, 0, 14, 10]], [0, 0])
    p = pred([[1, 0, 11, 10], [-1, 0, 9, 10]], [0, 0], scores=[0.9, 0.8])
    iou = p.iou(g)
    np.testing.assert_allclose(iou, [[90 / 110, 70 / 130], [90 / 110, 50 / 150]], rtol=1e-5)
    greedy = correct(p, g, 0.5, method="greedy")
    assert (greedy.accepted, greedy.removals, greedy.additions) == (1, 1, 1)
    optimal = correct(p, g, 0.5)
    assert (optimal.accepted, optimal.removals, optimal.additions) == (2, 0, 0)


def test_assignment_prefers_more_pairs_over_higher_iou_total() -> None:
    # P0-G0 alone has IoU 0.99; P0-G1 + P1-G0 total only 0.95. A pure IoU objective picks
    # the single pair (one removal + one addition more); the assignment must pick two pairs.
    eligible = np.array([[True, True], [True, False]])
    iou = np.array([[0.99, 0.5], [0.45, 0.0]])
    assert assign(eligible, iou) == [(0, 1), (1, 0)]
    eligible = np.array([[True, True], [False, False]])
    assert assign(eligible, iou) == [(0, 0)]  # same count: higher IoU wins


def test_difficult_box_excuses_same_class_prediction_only() -> None:
    g = gt([[0, 0, 10, 10], [50, 50, 70, 70]], [0, 0], ignore=[False, True])
    c = correct(pred([[0, 0, 10, 10], [50, 50, 70, 70]], [0, 0]), g)
    assert (c.gt, c.accepted, c.ignored, c.removals, c.additions) == (1, 1, 1, 0, 0)
    other_class = correct(pred([[50, 50, 70, 70]], [3]), g)
    assert (other_class.ignored, other_class.removals, other_class.additions) == (0, 1, 1)


def test_ignored_region_never_needs_an_addition() -> None:
    g = gt([[0, 0, 10, 10]], [0], ignore=[True])
    c = correct(Boxes.empty(SIZE, with_scores=True), g)
    assert c == Correction()


def test_real_box_wins_over_ignored_region() -> None:
    # The prediction overlaps a real box and a difficult one equally well: it is accepted.
    g = gt([[0, 0, 10, 10], [0, 0, 10, 10]], [0, 0], ignore=[True, False])
    c = correct(pred([[0, 0, 10, 10]], [0]), g)
    assert (c.accepted, c.ignored, c.additions) == (1, 0, 0)


def test_dontcare_region_excuses_any_class_inside_it_by_prediction_area() -> None:
    region = gt([[0, 0, 80, 40]], [ANY_CLASS], ignore=[True])
    small = pred([[10, 10, 20, 20], [90, 90, 99, 99]], [2, 5])  # IoU with region 100/3200
    c = correct(small, region, 0.5, ignore_overlap="pred_area")
    assert (c.ignored, c.removals, c.additions, c.gt) == (1, 1, 0, 0)
    as_iou = correct(small, region, 0.5, ignore_overlap="iou")
    assert (as_iou.ignored, as_iou.removals) == (0, 2)


def test_pred_area_overlap_values() -> None:
    p = pred([[0, 0, 10, 10], [5, 5, 15, 15]], [0, 0])
    r = gt([[0, 0, 100, 100], [10, 10, 20, 20]], [0, 0])
    np.testing.assert_allclose(pred_area_overlap(p, r), [[1.0, 0.0], [1.0, 0.25]])


def test_invariants_on_random_scenes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n_gt, n_pred = rng.integers(0, 7, size=2)
        g_xy = rng.uniform(0, 60, (n_gt, 2))
        p_xy = rng.uniform(0, 60, (n_pred, 2))
        g = gt(
            np.hstack([g_xy, g_xy + rng.uniform(5, 40, (n_gt, 2))]).tolist(),
            rng.integers(0, 3, n_gt).tolist(),
            (rng.random(n_gt) < 0.2).tolist(),
        )
        p = pred(
            np.hstack([p_xy, p_xy + rng.uniform(5, 40, (n_pred, 2))]).tolist(),
            rng.integers(0, 3, n_pred).tolist(),
            rng.random(n_pred).tolist(),
        )
        for tau in (0.3, 0.5, 0.7):
            c = correct(p, g, tau)
            assert c.accepted + c.removals + c.ignored == c.predictions == len(p)
            assert c.accepted + c.additions == c.gt == len(g.kept())
            assert 0 <= c.loose <= c.accepted and 0 <= c.wrong_class <= c.removals
            greedy = correct(p, g, tau, method="greedy")
            assert greedy.accepted <= c.accepted


def test_correct_batch_cuts_at_score_threshold() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    p = pred([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], scores=[0.9, 0.2])
    assert correct_batch([p], [g], score_threshold=0.5).removals == 0
    both = correct_batch([p, p], [g, g], score_threshold=0.1)
    assert (both.removals, both.accepted, both.predictions) == (2, 2, 4)
    with pytest.raises(ValueError, match="2 predictions for 1 images"):
        correct_batch([p, p], [g])


def test_bad_inputs_raise() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    with pytest.raises(ValueError, match="iou_threshold"):
        correct(pred([], []), g, 0.0)
    with pytest.raises(ValueError, match="image size"):
        correct(Boxes.empty((5, 5), with_scores=True), g)


def test_correction_round_trips_and_adds() -> None:
    a = Correction(predictions=3, gt=2, accepted=2, removals=1)
    assert Correction.from_dict(a.to_dict()) == a
    assert (a + a).removals == 2 and (a + a).gt == 4
