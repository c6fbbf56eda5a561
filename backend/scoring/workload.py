"""Annotation workload of a labelling campaign (paper §3.4), and what it saves.

Batch B1 is drawn from scratch (B1n boxes); every later batch is corrected
from the previous model's predictions (A additions, R removals, summed over
batches). The paper's two measures:

* ``W_B = B1n + A + R`` (boxes touched),
* ``W_T = B1n·T + A·T + R·T/2`` (seconds; a removal is a click, half a box).

Both are compared with labelling every box by hand, ``N`` and ``N·T``
(``N``: ground-truth boxes that count; ignored regions are never drawn), as
``saved % = 100·(1 − W / W_manual)``. Because every term of ``W_T`` is a
multiple of ``T``, the *percentage* does not depend on ``T``; ``T`` only scales
the absolute hours (the paper gives no value for it: 7 s is our choice, 35 s a
slower reading).

The *strict* convention adds an adjustment, ``adjustment_fraction·T``, for
each accepted box looser than the oracle's ``tight_iou`` (see
:mod:`backend.scoring.oracle`); it is never cheaper than the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from backend.scoring.oracle import Correction

Convention = Literal["paper", "strict"]
CONVENTIONS: tuple[Convention, ...] = ("paper", "strict")


@dataclass(frozen=True)
class CostModel:
    """Seconds per action. ``T`` is the time to draw one box from scratch."""

    seconds_per_box: float = 7.0
    removal_fraction: float = 0.5
    adjustment_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.seconds_per_box <= 0:
            raise ValueError(f"T must be positive, got {self.seconds_per_box}")


@dataclass(frozen=True)
class BatchTally:
    """One batch of the loop: how many images and boxes, and how it was labelled.

    ``correction`` is ``None`` for a batch drawn from scratch (B1, or every
    batch of the full-manual baseline).
    """

    images: int
    boxes: int
    correction: Correction | None = None

    @property
    def manual(self) -> bool:
        return self.correction is None


@dataclass(frozen=True)
class Workload:
    """Totals of a campaign under one convention and cost model."""

    images: int
    boxes: int
    manual_boxes: int
    additions: int
    removals: int
    adjustments: int
    w_b: int
    w_t: float
    manual_w_b: int
    manual_w_t: float

    @property
    def saved_b_pct(self) -> float:
        return _saved(self.w_b, self.manual_w_b)

    @property
    def saved_t_pct(self) -> float:
        return _saved(self.w_t, self.manual_w_t)


def _saved(work: float, manual: float) -> float:
    return math.nan if manual <= 0 else 100.0 * (1.0 - work / manual)


def batch_cost(
    batch: BatchTally, cost: CostModel = CostModel(), convention: Convention = "paper"
) -> tuple[int, float]:
    """``(boxes touched, seconds)`` for one batch."""
    t = cost.seconds_per_box
    if batch.correction is None:
        return batch.boxes, batch.boxes * t
    c = batch.correction
    if c.gt != batch.boxes:
        raise ValueError(f"batch has {batch.boxes} boxes but its correction saw {c.gt}")
    touched = c.additions + c.removals
    seconds = c.additions * t + c.removals * t * cost.removal_fraction
    if convention == "strict":
        touched += c.loose
        seconds += c.loose * t * cost.adjustment_fraction
    return touched, seconds


def compute_workload(
    batches: Sequence[BatchTally], cost: CostModel = CostModel(), convention: Convention = "paper"
) -> Workload:
    """Totals over a campaign's batches (in labelling order)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    w_b, w_t = 0, 0.0
    for batch in batches:
        b, t = batch_cost(batch, cost, convention)
        w_b += b
        w_t += t
    corrections = [b.correction for b in batches if b.correction is not None]
    boxes = sum(b.boxes for b in batches)
    return Workload(
        images=sum(b.images for b in batches),
        boxes=boxes,
        manual_boxes=sum(b.boxes for b in batches if b.manual),
        additions=sum(c.additions for c in corrections),
        removals=sum(c.removals for c in corrections),
        adjustments=sum(c.loose for c in corrections) if convention == "strict" else 0,
        w_b=w_b,
        w_t=w_t,
        manual_w_b=boxes,
        manual_w_t=boxes * cost.seconds_per_box,
    )


def cumulative_seconds(
    batches: Sequence[BatchTally], cost: CostModel = CostModel(), convention: Convention = "paper"
) -> list[tuple[int, float]]:
    """``(images labelled so far, seconds so far)`` after each batch, starting at ``(0, 0)``."""
    points = [(0, 0.0)]
    images, seconds = 0, 0.0
    for batch in batches:
        images += batch.images
        seconds += batch_cost(batch, cost, convention)[1]
        points.append((images, seconds))
    return points
