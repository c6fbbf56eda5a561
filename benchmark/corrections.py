"""The oracle's counts a run stores per batch, and how they are keyed.

A run stores every batch's predictions (down to the prediction floor) and
ground truth, so each reading of the simulated annotator is a re-count, never a
re-run. One count is kept per

* IoU τ (``config.iou_thresholds``),
* score threshold: each of ``config.score_thresholds``, plus :data:`GATE`, the
  batch's own ``gate_threshold`` where the run recorded one (the threshold the
  product's promotion gate chose for the version that predicted the batch),
* treatment of ignored ground truth (VOC ``difficult``, KITTI ``DontCare``, COCO
  crowds), see :data:`~benchmark.config.IGNORED_OBJECTS`: ``"excluded"`` (the
  dataset's own protocol: the region is never drawn and a prediction on it costs
  nothing) or ``"counted"`` (the paper's object counts: every ignored *object* --
  a VOC ``difficult`` one, a COCO crowd -- is a box to draw and a prediction must
  match it like any box). A ``DontCare`` region stays excluded under both: the
  paper's KITTI count (40,570 instances "of 8 class categories") is the eight
  classes' total without the DontCare rows, and VOC 2007's 30,638 includes the
  difficult objects.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from backend.boxes import ANY_CLASS, Boxes
from backend.scoring import correct_batch
from benchmark.config import IGNORED_OBJECTS, ExperimentConfig, IgnoredObjects

__all__ = ["GATE", "IGNORED_OBJECTS", "IgnoredObjects", "correction_key", "refresh_corrections"]

#: The score threshold of a batch's own ``gate_threshold``.
GATE: Literal["gate"] = "gate"

Score = float | Literal["gate"]


def correction_key(
    iou_threshold: float, score_threshold: Score, ignored: IgnoredObjects = "excluded"
) -> str:
    """Key of one (τ, score threshold, ignored-objects treatment) cell of a batch's corrections."""
    score = GATE if score_threshold == GATE else f"{float(score_threshold):g}"
    key = f"iou={iou_threshold:g}/score={score}"
    return key if ignored == "excluded" else f"{key}/ignored={ignored}"


#: How the stored ``"counted"`` corrections were made; counts made under another rule are
#: dropped and made again (before, DontCare regions were counted as boxes to draw).
COUNTED_RULE = "objects-with-a-class"


def countable(boxes: Boxes) -> np.ndarray:
    """Which ground-truth regions are ignored objects the ``"counted"`` treatment draws: ignored
    ones with a class (not :data:`~backend.boxes.ANY_CLASS`, KITTI's DontCare)."""
    return boxes.ignore_mask & (boxes.labels != ANY_CLASS)


def counted(boxes: Boxes) -> Boxes:
    """The same ground truth with the ignore flag of every ignored object dropped (each a box to
    draw); DontCare regions stay ignored."""
    keep_ignored = boxes.ignore_mask & ~countable(boxes)
    return Boxes(boxes.xyxy, boxes.labels, boxes.image_size, boxes.scores, keep_ignored)


def counted_objects(batch: dict[str, Any]) -> int:
    """Ignored objects with a class in a stored batch: the boxes ``"counted"`` adds."""
    return sum(int(countable(Boxes.from_dict(g)).sum()) for g in batch["ground_truth"].values())


def batch_boxes(batch: dict[str, Any], ignored: IgnoredObjects = "excluded") -> int:
    """Boxes to draw in a stored batch under the ``ignored`` treatment."""
    extra = counted_objects(batch) if ignored == "counted" else 0
    return int(batch["boxes"]) + extra


def refresh_corrections(run: dict[str, Any], config: ExperimentConfig) -> bool:
    """Compute the oracle's counts for every key of ``config`` the run lacks.

    Keys: every τ × (score thresholds + :data:`GATE`) × :data:`IGNORED_OBJECTS`.
    A batch without a ``gate_threshold`` gets no :data:`GATE` entry. Returns
    whether anything was added.
    """
    oracle = run["oracle"]
    if oracle["tight_iou"] != config.tight_iou:
        oracle.update(tight_iou=config.tight_iou, corrections=[])
        for batch in run["batches"]:
            batch["corrections"] = {}
    if oracle.get("counted_rule") != COUNTED_RULE:  # made under an older rule: make them again
        stale = {k for k in oracle["corrections"] if k.endswith("/ignored=counted")}
        oracle.update(
            counted_rule=COUNTED_RULE,
            corrections=[k for k in oracle["corrections"] if k not in stale],
        )
        for batch in run["batches"]:
            for key in stale:
                batch.get("corrections", {}).pop(key, None)
    scores: list[Score] = [*config.score_thresholds, GATE]
    wanted = [
        (tau, score, ignored)
        for tau in config.iou_thresholds
        for score in scores
        for ignored in IGNORED_OBJECTS
    ]
    missing = [w for w in wanted if correction_key(*w) not in oracle["corrections"]]
    if not missing:
        return False
    overlap = run["dataset"]["ignore_overlap"]
    for batch in run["batches"]:
        if batch["manual"]:
            continue
        preds = [Boxes.from_dict(batch["predictions"][i]) for i in batch["image_ids"]]
        gts = [Boxes.from_dict(batch["ground_truth"][i]) for i in batch["image_ids"]]
        all_gts = [counted(g) for g in gts]
        for tau, score, ignored in missing:
            if score == GATE:
                if batch.get("gate_serves_boxes") is False:
                    cut = math.inf  # the serving version sends no boxes: all drawn by hand
                elif batch.get("gate_threshold") is None:
                    continue
                else:
                    cut = float(batch["gate_threshold"])
            else:
                cut = float(score)
            batch["corrections"][correction_key(tau, score, ignored)] = correct_batch(
                preds,
                all_gts if ignored == "counted" else gts,
                tau,
                score_threshold=cut,
                ignore_overlap=overlap,
                tight_iou=config.tight_iou,
            ).to_dict()
    oracle["corrections"] = sorted({*oracle["corrections"], *(correction_key(*w) for w in missing)})
    return True
