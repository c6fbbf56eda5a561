"""What an annotator's answer makes of the queried boxes of one image.

One rule for the simulated annotator of the benchmark (the answer is the ground truth) and for
Label Studio (the answer is what the annotator submitted), so both count the same actions:

* a queried box with IoU ≥ ``iou_threshold`` to an answer box is **adjusted** to the answer box
  of maximum IoU, taking its class (**confirmed** when the box was already right: IoU ≥
  ``confirm_iou`` and the same class);
* one answer box vouches for one query only (pairs are taken by descending IoU); a further
  query on an object already claimed is a **duplicate**;
* a query on an object the answer marks ignored (VOC ``difficult``, COCO crowd: no label, but
  no background either) is **ignored**: it is neither a label nor "no object";
* any other query is **background**: it keeps its coordinates and is labelled "no object";
* in Label Studio, answer boxes no query matched were **drawn** by the annotator.

The paper counts the adjusted boxes as the labelling cost; a background query still costs the
annotator a look, so reports show both conventions (:class:`QueryAnswers` has every count).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from backend.boxes import Boxes, IgnoreOverlap
from backend.scoring.oracle import pred_area_overlap

__all__ = ["QueryAnswers", "noisy_box_weights", "resolve_queries"]


@dataclass(frozen=True)
class QueryAnswers:
    """The outcome of one image's queries.

    Attributes:
        matched: ``(Q,)`` index of the answer box each query became, or -1 (background or
            duplicate).
        kind: ``(Q,)`` one of ``confirmed``, ``adjusted``, ``duplicate``, ``ignored``,
            ``background``.
        drawn: indices of answer boxes no query matched.
    """

    matched: np.ndarray
    kind: tuple[str, ...]
    drawn: np.ndarray

    def count(self, kind: str) -> int:
        return sum(1 for k in self.kind if k == kind)

    @property
    def labeled(self) -> int:
        """Queries that yielded an object box (confirmed + adjusted)."""
        return int((self.matched >= 0).sum())


def resolve_queries(
    queries: Boxes,
    answer: Boxes,
    *,
    iou_threshold: float = 0.5,
    confirm_iou: float = 0.95,
    ignore_overlap: IgnoreOverlap = "iou",
) -> QueryAnswers:
    """Match ``queries`` to the ``answer`` boxes of the same image (ignored answer boxes, e.g.
    VOC ``difficult``, are never matched: they are not labels; a query on one is ``ignored``,
    never background: it was taught "no object" at full weight on a real object). A query is
    on an ignored box by the dataset's own rule, ``ignore_overlap`` (COCO crowds and KITTI
    ``DontCare``: intersection over the query's area), whatever its class."""
    if queries.image_size != answer.image_size:
        raise ValueError(f"queries on {queries.image_size}, answer on {answer.image_size}")
    kept_index = np.flatnonzero(~answer.ignore_mask)
    kept = answer[kept_index]
    matched = np.full(len(queries), -1, np.int64)
    kinds = ["background"] * len(queries)
    if len(queries) and len(kept):
        iou = queries.iou(kept)
        claimed = np.zeros(len(kept), bool)
        rows, cols = np.nonzero(iou >= iou_threshold)
        order = np.lexsort((cols, rows, -iou[rows, cols]))
        for q, a in zip(rows[order], cols[order], strict=True):
            if matched[q] >= 0 or claimed[a]:
                continue
            matched[q], claimed[a] = a, True
        for q in range(len(queries)):
            if matched[q] >= 0:
                a = int(matched[q])
                same = int(queries.labels[q]) == int(kept.labels[a])
                kinds[q] = "confirmed" if same and iou[q, a] >= confirm_iou else "adjusted"
            elif (iou[q] >= iou_threshold).any():
                kinds[q] = "duplicate"
        drawn = np.flatnonzero(~claimed)
    else:
        drawn = np.arange(len(kept))
    ignored = answer[np.flatnonzero(answer.ignore_mask)]
    if len(queries) and len(ignored):
        if ignore_overlap == "iou":
            overlap = queries.iou(ignored)
        else:
            overlap = pred_area_overlap(queries, ignored)
        on_ignored = (overlap >= iou_threshold).any(axis=1)
        for q in np.flatnonzero(on_ignored):
            if kinds[q] == "background":
                kinds[q] = "ignored"
    mapped = np.full(len(queries), -1, np.int64)
    mapped[matched >= 0] = kept_index[matched[matched >= 0]]
    return QueryAnswers(mapped, tuple(kinds), kept_index[drawn])


def noisy_box_weights(
    submitted: Boxes, unverified: Boxes, noisy_weight: float, *, same_iou: float = 0.95
) -> np.ndarray:
    """Loss weight of each submitted box: ``noisy_weight`` (λ_d) for a box the annotator left as
    the model predicted it without being asked to check it (same class, IoU ≥ ``same_iou`` with
    an unqueried predicted box), 1 for every box the annotator confirmed, fixed or drew.

    Why: a box-query task shows all predicted boxes but asks about a few; the others reach the
    submitted annotation unverified and are, as in the paper, noisy labels.
    """
    weights = np.ones(len(submitted), np.float32)
    if not len(submitted) or not len(unverified):
        return weights
    unverified = unverified.in_frame(submitted.image_size)
    iou = submitted.iou(unverified)
    same = submitted.labels[:, None] == unverified.labels[None, :]
    weights[((iou >= same_iou) & same).any(axis=1)] = noisy_weight
    return weights
