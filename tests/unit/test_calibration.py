"""Carrying the gate's threshold to the candidate's score scale by matching box counts."""

from __future__ import annotations

import numpy as np
import pytest

from backend.boxes import Boxes
from backend.training.calibration import count_matched_threshold, unlabeled_sample


def _predictions(scores_per_image: list[list[float]]) -> list[Boxes]:
    out = []
    for scores in scores_per_image:
        n = len(scores)
        xyxy = np.tile(np.array([[1, 1, 10, 10]], np.float32), (n, 1))
        out.append(Boxes(xyxy, np.zeros(n, np.int64), (32, 32), np.array(scores, np.float32)))
    return out


REFERENCE = [[0.9, 0.4, 0.2, 0.1], [0.6, 0.15], [0.35, 0.12, 0.08]]


def test_an_equally_confident_model_keeps_the_same_boxes() -> None:
    match = count_matched_threshold([_predictions(REFERENCE)], _predictions(REFERENCE), 0.3)
    assert match.reference_boxes_per_image == pytest.approx(4 / 3)
    assert match.boxes_per_image == pytest.approx(4 / 3)
    assert 0.2 < match.threshold <= 0.35  # between the 4th and 5th highest score


def test_a_more_confident_model_serves_at_a_higher_score() -> None:
    """The same ranking, every score 0.3 higher: the matched threshold moves up with it."""
    shifted = [[min(1.0, s + 0.3) for s in image] for image in REFERENCE]
    match = count_matched_threshold([_predictions(REFERENCE)], _predictions(shifted), 0.3)
    assert 0.5 < match.threshold <= 0.65
    kept = sum(int((p.scores >= match.threshold).sum()) for p in _predictions(shifted))
    assert kept == 4 and match.boxes_per_image == pytest.approx(4 / 3)


def test_the_count_is_the_mean_over_reference_models() -> None:
    fewer = [[0.9], [0.6], []]  # 2 boxes at 0.3, against REFERENCE's 4: mean 3
    target = _predictions([[0.95, 0.85, 0.75], [0.65], [0.55]])
    match = count_matched_threshold([_predictions(REFERENCE), _predictions(fewer)], target, 0.3)
    assert match.threshold == pytest.approx(0.7)  # halfway between the 3rd (0.75) and 4th (0.65)
    assert match.boxes_per_image == pytest.approx(1.0)


def test_nothing_to_match_keeps_the_threshold_and_a_short_target_serves_all_it_has() -> None:
    nothing = _predictions([[0.1], [], []])
    assert count_matched_threshold([nothing], _predictions(REFERENCE), 0.3).threshold == 0.3
    few = _predictions([[0.25], [], []])
    match = count_matched_threshold([_predictions(REFERENCE)], few, 0.3, floor=0.05)
    assert match.threshold == pytest.approx(0.25) and match.boxes_per_image == pytest.approx(1 / 3)
    none_at_all = _predictions([[], [], []])
    match = count_matched_threshold([_predictions(REFERENCE)], none_at_all, 0.3, floor=0.05)
    assert match.threshold == 0.3 and match.boxes_per_image == 0


def test_predictions_on_other_images_are_refused() -> None:
    with pytest.raises(ValueError, match="same images"):
        count_matched_threshold([_predictions(REFERENCE)], _predictions(REFERENCE[:2]), 0.3)
    with pytest.raises(ValueError, match="no images"):
        count_matched_threshold([[]], [], 0.3)


def test_the_sample_is_the_same_whatever_the_order_and_grows_by_adding() -> None:
    keys = list(range(100, 160))
    picked = {keys[i] for i in unlabeled_sample(keys, 10)}
    reversed_keys = keys[::-1]
    assert {reversed_keys[i] for i in unlabeled_sample(reversed_keys, 10)} == picked
    assert picked < {keys[i] for i in unlabeled_sample(keys, 20)}
    assert len(picked) == 10 and unlabeled_sample(keys, 0) == []
    assert unlabeled_sample(keys[:5], 10) == [0, 1, 2, 3, 4]
