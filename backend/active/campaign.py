"""The state of a box-level active-learning campaign: what is labelled, box by box.

L_I holds the images with any labelled box. An image is either *complete* (labelled in full:
the initial random images and image-level queries) or *partial* (some of its boxes answered).
A partial image trains with its answered object boxes at weight 1 and with the current model's
other predictions on it as **noisy** boxes at weight λ_d (the paper's
L = L_labeled + λ_d · L_noisy): unqueried regions must not teach "background" at full weight.
"No object" elsewhere on a partial image, where nobody looked, weighs ``background_weight``
(1 by default, as in the paper); the queries answered background always weigh 1.

A predicted box is no longer eligible for a query once its region is answered: IoU ≥
``answered_iou`` with a labelled object box, a region answered "background" or one answered
"ignored" (a difficult or crowd object: asked once, then a box of weight 0). The pool is
re-predicted by each episode's model, so this is checked by region, not by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from backend.active.answers import QueryAnswers
from backend.active.pool import BoxPool
from backend.boxes import Boxes
from backend.training.samples import ImageLike, TrainSample

__all__ = ["BoxCampaign", "CampaignCounts", "LabeledState"]


@dataclass
class LabeledState:
    """One image of L_I: its verified object boxes and the regions answered "no object"."""

    objects: Boxes
    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    complete: bool = False
    #: queries answered "ignored" (a difficult or crowd object: no label, no background): they
    #: train as boxes of weight 0, neither object nor "no object", and are never asked again
    ignored: Boxes | None = None


@dataclass
class CampaignCounts:
    """Annotator actions so far (the costs the reports plot against)."""

    full_image_boxes: int = 0  # boxes drawn in fully labelled images
    queried: int = 0
    confirmed: int = 0
    adjusted: int = 0
    duplicate: int = 0
    background: int = 0
    ignored: int = 0

    @property
    def boxes_labeled(self) -> int:
        """The paper's cost: ground-truth boxes obtained (drawn in full images or adjusted)."""
        return self.full_image_boxes + self.confirmed + self.adjusted

    @property
    def boxes_looked_at(self) -> int:
        """The other convention: every queried box costs a look, background ones included."""
        return self.full_image_boxes + self.queried


class BoxCampaign:
    """Labelled state over ``n`` images (indices shared with :class:`BoxPool`)."""

    def __init__(self, image_sizes: Sequence[tuple[int, int]], answered_iou: float = 0.5) -> None:
        self.image_sizes = list(image_sizes)
        self.answered_iou = answered_iou
        self.labeled: dict[int, LabeledState] = {}
        self.counts = CampaignCounts()

    # ------------------------------------------------------------------ answers
    def label_fully(self, image: int, truth: Boxes) -> None:
        """The annotator labels every object of ``image`` (cost: its boxes)."""
        kept = truth.kept()
        self.labeled[image] = LabeledState(objects=kept, complete=True)
        self.counts.full_image_boxes += len(kept)

    def record_answers(
        self, image: int, queries: Boxes, answers: QueryAnswers, answer_boxes: Boxes
    ) -> None:
        """Store the outcome of one image's queries (:func:`resolve_queries`)."""
        state = self.labeled.get(image) or LabeledState(
            objects=Boxes.empty(self.image_sizes[image])
        )
        if state.complete:
            raise ValueError(f"image {image} is labelled in full: nothing to query")
        objects = _joined(state.objects, answer_boxes[answers.matched[answers.matched >= 0]])
        rejected = [i for i, k in enumerate(answers.kind) if k in ("background", "duplicate")]
        background = np.concatenate([state.background, queries.xyxy[rejected]]).astype(np.float32)
        skipped = queries[[i for i, k in enumerate(answers.kind) if k == "ignored"]]
        ignored = skipped if state.ignored is None else _joined(state.ignored, skipped)
        self.labeled[image] = LabeledState(objects, background, complete=False, ignored=ignored)
        c = self.counts
        c.queried += len(queries)
        c.confirmed += answers.count("confirmed")
        c.adjusted += answers.count("adjusted")
        c.duplicate += answers.count("duplicate")
        c.background += answers.count("background")
        c.ignored += answers.count("ignored")

    # ------------------------------------------------------------------ queries
    def eligible(self, pool: BoxPool) -> np.ndarray:
        """Boolean mask of the pool's boxes that may still be queried."""
        mask = np.ones(len(pool), bool)
        for image, state in self.labeled.items():
            rows = pool.rows_of(image)
            if not len(rows):
                continue
            if state.complete:
                mask[rows] = False
                continue
            answered = self._answered_regions(image, state)
            if len(answered):
                mask[rows] = ~(pool.boxes(rows, image).iou(answered) >= self.answered_iou).any(
                    axis=1
                )
        return mask

    def _answered_regions(self, image: int, state: LabeledState) -> Boxes:
        ignored = np.zeros((0, 4), np.float32) if state.ignored is None else state.ignored.xyxy
        xyxy = np.concatenate([state.objects.xyxy, state.background, ignored]).astype(np.float32)
        return Boxes(xyxy, np.zeros(len(xyxy), np.int64), self.image_sizes[image])

    # ------------------------------------------------------------------ training
    def training_samples(
        self,
        pool: BoxPool,
        images: Sequence[ImageLike],
        noisy_weight: float,
        background_weight: float = 1.0,
    ) -> list[TrainSample]:
        """L_I as training samples: verified boxes weigh 1; on partial images, the pool's boxes
        whose regions are still unanswered join as noisy labels weighing ``noisy_weight``, and
        "no object" weighs ``background_weight`` outside the regions answered background."""
        eligible = self.eligible(pool)
        samples = []
        for image in sorted(self.labeled):
            state = self.labeled[image]
            if state.complete:
                samples.append(TrainSample(image=images[image], boxes=state.objects))
                continue
            rows = pool.rows_of(image)
            noisy = pool.boxes(rows[eligible[rows]], image)
            ignored = state.ignored or Boxes.empty(self.image_sizes[image])
            objects = _joined(_joined(state.objects, noisy), ignored)
            weights = np.concatenate(
                [
                    np.ones(len(state.objects), np.float32),
                    np.full(len(noisy), noisy_weight, np.float32),
                    np.zeros(len(ignored), np.float32),  # neither object nor background
                ]
            )
            samples.append(
                TrainSample(
                    image=images[image],
                    boxes=objects,
                    box_weights=weights,
                    background_weight=background_weight,
                    verified_background=state.background,
                )
            )
        return samples


def _joined(first: Boxes, second: Boxes) -> Boxes:
    """The boxes of both (coordinates and labels only), in ``first``'s image."""
    return Boxes(
        np.concatenate([first.xyxy, second.xyxy]).astype(np.float32),
        np.concatenate([first.labels, second.labels]).astype(np.int64),
        first.image_size,
    )
