"""Scoring of detections: the simulated annotator, the paper's workload, and COCO mAP.

One implementation shared by the backend (the promotion gate scores candidate
model versions with :func:`score_predictions`) and the benchmark harness.

* :mod:`backend.scoring.oracle` — the simulated annotator: additions and removals
  that turn predictions into the ground truth (:func:`correct`, :func:`correct_batch`).
* :mod:`backend.scoring.workload` — ``W_B`` / ``W_T`` of a labelling campaign.
* :mod:`backend.scoring.detection_map` — mAP@0.5 and mAP@[.5:.95] via pycocotools.
* :mod:`backend.scoring.validation` — both on a validation set, per score threshold.
"""

from backend.boxes import ANY_CLASS, IgnoreOverlap
from backend.scoring.detection_map import MapResult, coco_ground_truth, evaluate_map
from backend.scoring.oracle import (
    DEFAULT_TIGHT_IOU,
    Assignment,
    Correction,
    assign,
    correct,
    correct_batch,
    pred_area_overlap,
)
from backend.scoring.validation import (
    UNIT_COST,
    ThresholdScore,
    ValidationScore,
    score_predictions,
)
from backend.scoring.workload import (
    CONVENTIONS,
    BatchTally,
    Convention,
    CostModel,
    Workload,
    batch_cost,
    compute_workload,
    cumulative_seconds,
)

__all__ = [
    "ANY_CLASS",
    "CONVENTIONS",
    "DEFAULT_TIGHT_IOU",
    "UNIT_COST",
    "Assignment",
    "BatchTally",
    "Convention",
    "Correction",
    "CostModel",
    "IgnoreOverlap",
    "MapResult",
    "ThresholdScore",
    "ValidationScore",
    "Workload",
    "assign",
    "batch_cost",
    "coco_ground_truth",
    "compute_workload",
    "correct",
    "correct_batch",
    "cumulative_seconds",
    "evaluate_map",
    "pred_area_overlap",
    "score_predictions",
]
