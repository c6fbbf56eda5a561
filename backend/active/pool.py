"""The box pool U_B: what a detector predicts on unlabelled images, with what the measures need.

Box-level active learning (Desai & Balasubramanian, "Towards fine-grained sampling for active
learning in object detection") treats every predicted box as a sample an annotator may be asked
to confirm, adjust or reject. The pool is predicted at a low threshold ``t_d`` (recall matters
more than precision: a missed object can never be queried) and keeps, per box,

* the scores the YOLOX head gives it for each class (objectness × class score), from which
  :mod:`backend.active.measures` derives uncertainty, entropy and margin;
* a feature vector for core-set: the head's stem map (the level's neck feature projected to one
  width on all levels) pooled over the box by RoIAlign on the level its size picks — the same
  rule as for the labelled boxes (:func:`box_features_at`), so that one box has one feature.

Inference here runs the PyTorch model (the one just trained), not the ONNX export: the served
path returns boxes only, and the pool needs the per-class scores and the features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, roi_align

from backend.boxes import Boxes
from backend.detectors.yolox import STRIDES, YoloxNano, decode
from backend.training.yolox_train import letterbox_tensor

__all__ = ["BoxPool", "box_features_at", "pool_members", "predict_pool", "stems_width"]

#: RoIAlign output per box, averaged to one vector: 2×2 keeps it cheap and still covers the box.
ROI_OUTPUT = 2


@dataclass(frozen=True)
class BoxPool:
    """Predicted boxes over a set of images, flat: row ``i`` is one box.

    Attributes:
        image: ``(N,)`` index of the image each box is on (into ``image_sizes``).
        xyxy: ``(N, 4)`` float32 corners in the image's own pixels.
        labels: ``(N,)`` predicted class (arg-max of ``class_probs``).
        scores: ``(N,)`` detection probability P = objectness × best class score.
        class_probs: ``(N, C)`` objectness × each class score ("no class" is what they leave).
        objectness: ``(N,)``.
        features: ``(N, D)`` float32 box features (core-set), or ``None`` when not computed.
        image_sizes: ``(width, height)`` of every image, by index.
    """

    image: np.ndarray
    xyxy: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    class_probs: np.ndarray
    objectness: np.ndarray
    features: np.ndarray | None
    image_sizes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.image)

    def rows_of(self, image_index: int) -> np.ndarray:
        """Row indices of the boxes on one image."""
        return np.flatnonzero(self.image == image_index)

    def boxes(self, rows: Sequence[int] | np.ndarray, image_index: int) -> Boxes:
        """Rows (all on ``image_index``) as a :class:`Boxes` with scores."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and not (self.image[rows] == image_index).all():
            raise ValueError(f"rows are not all on image {image_index}")
        return Boxes(
            self.xyxy[rows], self.labels[rows], self.image_sizes[image_index], self.scores[rows]
        )

    def subset(self, rows: Sequence[int] | np.ndarray) -> BoxPool:
        """The pool restricted to ``rows`` (same images)."""
        rows = np.asarray(rows, np.int64)
        return BoxPool(
            self.image[rows],
            self.xyxy[rows],
            self.labels[rows],
            self.scores[rows],
            self.class_probs[rows],
            self.objectness[rows],
            None if self.features is None else self.features[rows],
            self.image_sizes,
        )


def _empty(num_classes: int, dim: int | None, sizes: tuple[tuple[int, int], ...]) -> BoxPool:
    return BoxPool(
        np.zeros(0, np.int64),
        np.zeros((0, 4), np.float32),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
        np.zeros((0, num_classes), np.float32),
        np.zeros(0, np.float32),
        None if dim is None else np.zeros((0, dim), np.float32),
        sizes,
    )


@torch.no_grad()
def predict_pool(
    model: YoloxNano,
    images: Sequence[Image.Image],
    input_hw: tuple[int, int],
    *,
    score_threshold: float = 0.1,
    nms_threshold: float = 0.45,
    max_per_image: int = 100,
    with_features: bool = True,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> BoxPool:
    """Predict every image with ``model`` and keep boxes scoring ≥ ``score_threshold`` (t_d).

    Boxes are kept after class-aware NMS, as served; each keeps the full class distribution of
    the head row that predicted it and, with ``with_features``, its RoIAlign-pooled stem feature.
    """
    model.eval()
    sizes = tuple((im.width, im.height) for im in images)
    parts: list[BoxPool] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tensors, ratios = zip(*(letterbox_tensor(im, input_hw) for im in chunk), strict=True)
        raw, stems = model.forward_with_stems(torch.stack(list(tensors)))
        decoded = decode(raw, input_hw)
        for j, rows in enumerate(decoded):
            index = start + j
            objectness = rows[:, 4]
            per_class = rows[:, 5:] * objectness[:, None]
            scores, labels = per_class.max(dim=1)
            keep = torch.nonzero(scores >= score_threshold).flatten()
            xy, wh = rows[keep, :2], rows[keep, 2:4]
            boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
            order = batched_nms(boxes, scores[keep], labels[keep], nms_threshold)[:max_per_image]
            kept = keep[order]
            r = float(ratios[j])
            width, height = sizes[index]
            # clipped to the image (in input pixels) before pooling: the pool keeps the clipped
            # box, and box_features_at pools exactly that once it is labelled
            boxes = boxes[order]
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clamp(0, width * r)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clamp(0, height * r)
            feats: np.ndarray | None = None
            if with_features:
                feats = _pool_features(stems, j, boxes, _levels_by_size(boxes))
            xyxy = (boxes / r).numpy().astype(np.float32)
            xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, width)
            xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, height)
            parts.append(
                BoxPool(
                    np.full(len(kept), index, np.int64),
                    xyxy,
                    labels[kept].numpy().astype(np.int64),
                    scores[kept].numpy().astype(np.float32),
                    per_class[kept].numpy().astype(np.float32),
                    objectness[kept].numpy().astype(np.float32),
                    feats,
                    sizes,
                )
            )
        if progress is not None:
            progress(min(start + batch_size, len(images)), len(images))
    if not parts:
        return _empty(model.num_classes, stems_width(model) if with_features else None, sizes)
    return BoxPool(
        np.concatenate([p.image for p in parts]),
        np.concatenate([p.xyxy for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.class_probs for p in parts]),
        np.concatenate([p.objectness for p in parts]),
        _concat_features(parts) if with_features else None,
        sizes,
    )


def pool_members(
    pool: BoxPool, t_d: float, minimum: int, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Rows of U_B: the boxes scoring ≥ ``t_d``, topped up by score to ``minimum`` eligible ones.

    Why the top-up: a model fine-tuned on a few images of a class COCO lacks scores its first
    predictions low (a fresh class row starts at the prior 0.01), and a pool empty at ``t_d``
    would stop box-level querying before it starts. Predict at a lower floor and keep the best
    of what is there; the threshold still bounds the pool once the model is confident.
    """
    mask = np.ones(len(pool), bool) if eligible is None else np.asarray(eligible, bool)
    member = pool.scores >= t_d
    short = minimum - int((member & mask).sum())
    if short > 0:
        rest = np.flatnonzero(mask & ~member)
        best = rest[np.lexsort((rest, -pool.scores[rest]))][:short]
        member[best] = True
    return np.flatnonzero(member)


def _concat_features(parts: Sequence[BoxPool]) -> np.ndarray:
    return np.concatenate([p.features for p in parts if p.features is not None])


#: Box side (input pixels, √area) from which a box is pooled on the next coarser level. Every box,
#: predicted or labelled, is given its level by size, as FPN does.
LEVEL_SIDES = (64.0, 128.0)


@torch.no_grad()
def box_features_at(
    model: YoloxNano,
    images: Sequence[Image.Image],
    boxes: Sequence[Boxes],
    input_hw: tuple[int, int],
    batch_size: int = 8,
) -> list[np.ndarray]:
    """Core-set features of given boxes (e.g. the labelled ones, L_B), one ``(M_i, D)`` array
    per image, pooled like :func:`predict_pool`'s, on the level their size picks. Boxes measured
    on another copy of the image (their ``image_size``: Label Studio's ``original_width``) are
    scaled to the image first: taken as they were, they pooled the wrong place."""
    model.eval()
    out: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        tensors, ratios = zip(*(letterbox_tensor(im, input_hw) for im in chunk), strict=True)
        _, stems = model.forward_with_stems(torch.stack(list(tensors)))
        for j, r in enumerate(ratios):
            given = boxes[start + j].in_frame(chunk[j].size)
            xyxy = torch.from_numpy(given.xyxy.astype(np.float32)).reshape(-1, 4) * float(r)
            out.append(_pool_features(stems, j, xyxy, _levels_by_size(xyxy)))
    return out


def _levels_by_size(xyxy: torch.Tensor) -> torch.Tensor:
    """Pyramid level of each box (``(M, 4)`` input pixels) by its side √area (:data:`LEVEL_SIDES`).

    Both paths pool by this rule: a pool box pooled on the level of the row that predicted it
    got another vector than the same box once labelled (a third of real boxes), so the core-set
    saw a labelled box as far from its own prediction.
    """
    side = ((xyxy[:, 2] - xyxy[:, 0]).clamp(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clamp(min=0)).sqrt()
    return torch.bucketize(side, torch.tensor(LEVEL_SIDES))


def stems_width(model: YoloxNano) -> int:
    """Channels of the head's stem maps (the box feature's dimension)."""
    return int(model.head.per_level()[0].stem.conv.out_channels)


def _pool_features(
    stems: list[torch.Tensor], image: int, boxes: torch.Tensor, levels: torch.Tensor
) -> np.ndarray:
    """RoIAlign each box (input pixels) on its own level's stem map, averaged to one vector."""
    out = torch.zeros((len(boxes), stems[0].shape[1]))
    for level, stride in enumerate(STRIDES):
        mask = levels == level
        if not bool(mask.any()):
            continue
        rois = torch.cat([torch.zeros((int(mask.sum()), 1)), boxes[mask]], dim=1)
        pooled = roi_align(
            stems[level][image : image + 1],
            rois,
            output_size=ROI_OUTPUT,
            spatial_scale=1.0 / stride,
            sampling_ratio=2,
            aligned=True,
        )
        out[mask] = pooled.mean(dim=(2, 3))
    return out.numpy().astype(np.float32)
