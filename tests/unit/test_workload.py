"""Workload formulas of the paper (§3.4) and the strict convention, worked by hand."""

from __future__ import annotations

import math

import pytest

from backend.scoring.oracle import Correction
from backend.scoring.workload import (
    BatchTally,
    CostModel,
    batch_cost,
    compute_workload,
    cumulative_seconds,
)

# B1: 10 images, 20 boxes drawn from scratch.
# B2: 8 images, 15 boxes; the model got 12 right (5 of them loose), missed 3, added 4 false boxes.
# B3: 6 images, 5 boxes; the model got 4 right, missed 1.
CAMPAIGN = [
    BatchTally(images=10, boxes=20),
    BatchTally(
        8, 15, Correction(predictions=16, gt=15, accepted=12, removals=4, additions=3, loose=5)
    ),
    BatchTally(6, 5, Correction(predictions=4, gt=5, accepted=4, additions=1)),
]


def test_paper_workload_by_hand() -> None:
    w = compute_workload(CAMPAIGN, CostModel(seconds_per_box=7.0))
    assert (w.images, w.boxes, w.manual_boxes) == (24, 40, 20)
    assert (w.additions, w.removals, w.adjustments) == (4, 4, 0)
    assert w.w_b == 20 + 4 + 4  # B1n + A + R
    assert w.w_t == pytest.approx(20 * 7 + 4 * 7 + 4 * 3.5)  # 182 s
    assert w.manual_w_b == 40 and w.manual_w_t == pytest.approx(280)
    assert w.saved_b_pct == pytest.approx(30.0)
    assert w.saved_t_pct == pytest.approx(35.0)


def test_saving_in_percent_does_not_depend_on_t() -> None:
    slow = compute_workload(CAMPAIGN, CostModel(seconds_per_box=35.0))
    assert slow.w_t == pytest.approx(182 * 5)
    assert slow.saved_t_pct == pytest.approx(35.0)


def test_strict_convention_charges_loose_boxes() -> None:
    w = compute_workload(CAMPAIGN, CostModel(7.0), "strict")
    assert w.adjustments == 5
    assert w.w_b == 28 + 5
    assert w.w_t == pytest.approx(182 + 5 * 3.5)
    assert w.saved_t_pct == pytest.approx(100 * (1 - 199.5 / 280))
    paper = compute_workload(CAMPAIGN, CostModel(7.0), "paper")
    assert w.saved_t_pct < paper.saved_t_pct


def test_full_manual_saves_nothing_and_no_boxes_is_nan() -> None:
    manual = compute_workload([BatchTally(5, 9), BatchTally(5, 11)])
    assert manual.saved_t_pct == 0.0 and manual.saved_b_pct == 0.0 and manual.w_b == 20
    assert math.isnan(compute_workload([BatchTally(3, 0)]).saved_t_pct)


def test_bad_model_can_cost_more_than_manual() -> None:
    noisy = BatchTally(1, 2, Correction(predictions=10, gt=2, removals=10, additions=2))
    w = compute_workload([BatchTally(1, 2), noisy])
    assert w.saved_t_pct == pytest.approx(100 * (1 - (2 * 7 + 2 * 7 + 10 * 3.5) / 28))
    assert w.saved_t_pct < 0


def test_cumulative_seconds_per_batch() -> None:
    points = cumulative_seconds(CAMPAIGN, CostModel(7.0))
    assert [p[0] for p in points] == [0, 10, 18, 24]
    assert [p[1] for p in points] == pytest.approx([0, 140, 140 + 21 + 14, 182])


def test_batch_cost_checks_box_count_and_inputs() -> None:
    with pytest.raises(ValueError, match="correction saw"):
        batch_cost(BatchTally(1, 3, Correction(gt=2, additions=2)))
    with pytest.raises(ValueError, match="T must be positive"):
        CostModel(seconds_per_box=0)
    with pytest.raises(ValueError, match="convention"):
        compute_workload(CAMPAIGN, CostModel(), "lenient")  # type: ignore[arg-type]
