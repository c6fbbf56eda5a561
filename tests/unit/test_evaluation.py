"""mAP through pycocotools on hand-worked cases."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.boxes import ANY_CLASS, Boxes
from backend.scoring.detection_map import coco_ground_truth, evaluate_map

SIZE = (100, 100)
LABELS = ["cat", "dog"]


def gt(boxes: list[list[float]], labels: list[int], ignore: list[bool] | None = None) -> Boxes:
    return Boxes(np.array(boxes, np.float32).reshape(-1, 4), labels, SIZE, ignore=ignore)


def det(boxes: list[list[float]], labels: list[int], scores: list[float]) -> Boxes:
    return Boxes(np.array(boxes, np.float32).reshape(-1, 4), labels, SIZE, scores=scores)


def test_perfect_predictions_score_one() -> None:
    gts = [gt([[0, 0, 10, 10], [20, 20, 50, 60]], [0, 1]), gt([[5, 5, 30, 30]], [1])]
    preds = [det(g.xyxy.tolist(), g.labels.tolist(), [0.9] * len(g)) for g in gts]
    result = evaluate_map(gts, preds, LABELS)
    assert result.map50 == pytest.approx(1.0) and result.map50_95 == pytest.approx(1.0)
    assert result.per_class_ap50 == pytest.approx({"cat": 1.0, "dog": 1.0})
    assert (result.images, result.gt_boxes, result.predictions) == (2, 3, 3)


def test_half_recall_is_51_of_101_points() -> None:
    # 2 cats, one found: precision 1 up to recall 0.5 (51 of COCO's 101 recall points).
    g = gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])
    result = evaluate_map([g], [det([[0, 0, 10, 10]], [0], [0.9])], LABELS)
    assert result.map50 == pytest.approx(51 / 101)


def test_false_positive_ranked_first_halves_ap_ranked_last_costs_nothing() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    first = det([[60, 60, 70, 70], [0, 0, 10, 10]], [0, 0], [0.9, 0.8])
    assert evaluate_map([g], [first], LABELS).map50 == pytest.approx(0.5)
    last = det([[60, 60, 70, 70], [0, 0, 10, 10]], [0, 0], [0.1, 0.8])
    assert evaluate_map([g], [last], LABELS).map50 == pytest.approx(1.0)


def test_loose_box_counts_at_three_of_ten_coco_thresholds() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    result = evaluate_map([g], [det([[0, 0, 10, 6.3]], [0], [0.9])], LABELS)  # IoU 0.63
    assert result.map50 == pytest.approx(1.0)
    assert result.map50_95 == pytest.approx(0.3)  # matched at 0.50, 0.55, 0.60


def test_voc_difficult_detection_is_neither_true_nor_false() -> None:
    g = gt([[0, 0, 10, 10], [40, 40, 80, 80]], [0, 0], ignore=[False, True])
    on_difficult = det([[40, 40, 80, 80], [0, 0, 10, 10]], [0, 0], [0.95, 0.9])
    result = evaluate_map([g], [on_difficult], LABELS, "iou")
    assert result.map50 == pytest.approx(1.0) and result.gt_boxes == 1
    # VOC rule is plain IoU: a small box inside the difficult one is a false positive.
    inside = det([[45, 45, 55, 55], [0, 0, 10, 10]], [0, 0], [0.95, 0.9])
    assert evaluate_map([g], [inside], LABELS, "iou").map50 == pytest.approx(0.5)
    # Missing the difficult box costs nothing either.
    assert evaluate_map([g], [det([[0, 0, 10, 10]], [0], [0.9])], LABELS).map50 == pytest.approx(
        1.0
    )


def test_dontcare_region_excuses_any_class_by_prediction_area() -> None:
    g = gt([[0, 0, 10, 10], [30, 30, 90, 90]], [0, ANY_CLASS], ignore=[False, True])
    preds = det([[40, 40, 50, 50], [60, 60, 70, 70], [0, 0, 10, 10]], [0, 1, 0], [0.99, 0.98, 0.5])
    excused = evaluate_map([g], [preds], LABELS, "pred_area")
    assert excused.map50 == pytest.approx(1.0)
    assert excused.per_class_ap50 == pytest.approx({"cat": 1.0})  # dog has no ground truth
    as_iou = evaluate_map([g], [preds], LABELS, "iou")
    assert as_iou.map50 == pytest.approx(1 / 2)  # the cat FP outranks the cat TP


def test_dontcare_region_is_entered_once_per_class() -> None:
    data = coco_ground_truth([gt([[0, 0, 5, 5]], [ANY_CLASS], ignore=[True])], LABELS, "pred_area")
    assert sorted(a["category_id"] for a in data["annotations"]) == [1, 2]
    assert all(a["iscrowd"] == 1 and a["pred_area"] == 1 for a in data["annotations"])
    with pytest.raises(ValueError, match="ANY_CLASS"):
        coco_ground_truth([gt([[0, 0, 5, 5]], [ANY_CLASS])], LABELS)


def test_class_without_ground_truth_is_left_out_of_the_mean() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    preds = det([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1], [0.9, 0.95])
    result = evaluate_map([g], [preds], LABELS)
    assert result.map50 == pytest.approx(1.0) and set(result.per_class_ap50) == {"cat"}


def test_no_predictions_and_no_ground_truth() -> None:
    g = gt([[0, 0, 10, 10]], [1])
    empty = Boxes.empty(SIZE, with_scores=True)
    result = evaluate_map([g], [empty], LABELS)
    assert result.map50 == 0.0 and result.per_class_ap50 == {"dog": 0.0}
    nothing = evaluate_map([gt([], [])], [det([[0, 0, 5, 5]], [0], [0.5])], LABELS)
    assert math.isnan(nothing.map50) and nothing.to_dict()["map50"] is None


def test_matches_stock_cocoeval_without_ignored_regions() -> None:
    rng = np.random.default_rng(1)
    gts, preds = [], []
    for _ in range(6):
        n = int(rng.integers(1, 6))
        xy = rng.uniform(0, 60, (n, 2))
        g = gt(
            np.hstack([xy, xy + rng.uniform(5, 35, (n, 2))]).tolist(),
            rng.integers(0, 2, n).tolist(),
        )
        jitter = g.xyxy + rng.normal(0, 3, g.xyxy.shape)
        extra = rng.uniform(0, 50, (2, 2))
        boxes = np.vstack([jitter, np.hstack([extra, extra + 20])])
        labels = [*g.labels.tolist(), 0, 1]
        gts.append(g)
        preds.append(det(boxes.tolist(), labels, rng.random(len(labels)).tolist()))
    ours = evaluate_map(gts, preds, LABELS)

    data = coco_ground_truth(gts, LABELS)
    dets = [
        {
            "image_id": i + 1,
            "category_id": int(c) + 1,
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(s),
        }
        for i, p in enumerate(preds)
        for (x0, y0, x1, y1), c, s in zip(p.xyxy.tolist(), p.labels, p.scores, strict=True)  # type: ignore[arg-type]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
        stock = COCOeval(coco, coco.loadRes(dets), "bbox")
        stock.evaluate()
        stock.accumulate()
        stock.summarize()
    assert ours.map50_95 == pytest.approx(stock.stats[0], abs=1e-9)
    assert ours.map50 == pytest.approx(stock.stats[1], abs=1e-9)
    assert 0.0 < ours.map50 < 1.0


def test_bad_inputs_raise() -> None:
    g = gt([[0, 0, 10, 10]], [0])
    with pytest.raises(ValueError, match="no scores"):
        evaluate_map([g], [g], LABELS)
    with pytest.raises(ValueError, match="label outside"):
        evaluate_map([g], [det([[0, 0, 5, 5]], [2], [0.5])], LABELS)
    with pytest.raises(ValueError, match="predictions for 1 images"):
        evaluate_map([g], [], LABELS)
