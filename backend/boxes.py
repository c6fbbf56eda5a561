"""The one box type that crosses every seam of boxloop.

``Boxes`` holds the detections or ground truth of one image: pixel ``xyxy``
corners, integer label indices into the project's label list, optional scores,
and the image size. Format converters (Label Studio percent regions, VOC,
KITTI, COCO) live beside their formats and produce or consume ``Boxes``; the
algorithms only ever see this type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torchvision.ops import box_iou

#: Label index of an ignore region that belongs to no class (KITTI ``DontCare``):
#: it excuses predictions of *any* class.
ANY_CLASS = -1

#: How a prediction is tested against an ignored ground-truth region, following
#: each dataset's own evaluation: ``"iou"`` (VOC devkit: a detection matched to a
#: ``difficult`` box at the usual IoU is ignored) or ``"pred_area"`` (KITTI devkit
#: ``DontCare`` and COCO ``iscrowd``: intersection over the *prediction's* area,
#: so any detection lying inside the region is ignored).
IgnoreOverlap = Literal["iou", "pred_area"]


@dataclass(frozen=True)
class Boxes:
    """Boxes of one image, in pixels.

    Attributes:
        xyxy: ``(N, 4)`` float32 array of ``x_min, y_min, x_max, y_max`` in pixels.
        labels: ``(N,)`` int64 indices into the project's label list.
        image_size: ``(width, height)`` of the image in pixels.
        scores: ``(N,)`` float32 confidences, or ``None`` for ground truth.
        ignore: ``(N,)`` bool flags for boxes that must not count in matching
            (VOC ``difficult``, KITTI ``DontCare``); ``None`` means none ignored.
    """

    xyxy: np.ndarray
    labels: np.ndarray
    image_size: tuple[int, int]
    scores: np.ndarray | None = None
    ignore: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(xyxy):
            raise ValueError(f"{len(xyxy)} boxes but {len(labels)} labels")
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "labels", labels)
        w, h = self.image_size
        object.__setattr__(self, "image_size", (int(w), int(h)))
        if self.scores is not None:
            scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if len(scores) != len(xyxy):
                raise ValueError(f"{len(xyxy)} boxes but {len(scores)} scores")
            object.__setattr__(self, "scores", scores)
        if self.ignore is not None:
            ignore = np.asarray(self.ignore, dtype=bool).reshape(-1)
            if len(ignore) != len(xyxy):
                raise ValueError(f"{len(xyxy)} boxes but {len(ignore)} ignore flags")
            object.__setattr__(self, "ignore", ignore)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def empty(cls, image_size: tuple[int, int], with_scores: bool = False) -> Boxes:
        return cls(
            np.zeros((0, 4), np.float32),
            np.zeros((0,), np.int64),
            image_size,
            np.zeros((0,), np.float32) if with_scores else None,
        )

    # ------------------------------------------------------------------ views
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def width(self) -> int:
        return self.image_size[0]

    @property
    def height(self) -> int:
        return self.image_size[1]

    @property
    def areas(self) -> np.ndarray:
        wh = np.clip(self.xyxy[:, 2:] - self.xyxy[:, :2], 0, None)
        return wh[:, 0] * wh[:, 1]

    @property
    def ignore_mask(self) -> np.ndarray:
        return self.ignore if self.ignore is not None else np.zeros(len(self), bool)

    def __getitem__(self, index: np.ndarray | slice | list[int]) -> Boxes:
        return Boxes(
            self.xyxy[index],
            self.labels[index],
            self.image_size,
            None if self.scores is None else self.scores[index],
            None if self.ignore is None else self.ignore[index],
        )

    def kept(self) -> Boxes:
        """The boxes that count (``ignore`` flags dropped)."""
        return self[~self.ignore_mask]

    def above(self, score_threshold: float) -> Boxes:
        if self.scores is None:
            return self
        return self[self.scores >= score_threshold]

    def relabeled(self, new_index: Mapping[int, int]) -> Boxes:
        """These boxes with label ``i`` turned into ``new_index[i]``; a box whose label is not a
        key is dropped (an :data:`ANY_CLASS` region stays). Why: a model version speaks the label
        list it was trained on, which the project may since have reordered or cut."""
        labels = self.labels.tolist()
        keep = [i for i, label in enumerate(labels) if label == ANY_CLASS or label in new_index]
        kept = self[keep]
        mapped = [
            ANY_CLASS if label == ANY_CLASS else new_index[label] for label in kept.labels.tolist()
        ]
        return Boxes(
            kept.xyxy, np.asarray(mapped, np.int64), kept.image_size, kept.scores, kept.ignore
        )

    def clipped(self) -> Boxes:
        """Boxes clipped to the image, with degenerate (zero-area) ones removed."""
        w, h = self.image_size
        xyxy = self.xyxy.copy()
        xyxy[:, [0, 2]] = np.clip(xyxy[:, [0, 2]], 0, w)
        xyxy[:, [1, 3]] = np.clip(xyxy[:, [1, 3]], 0, h)
        clipped = Boxes(xyxy, self.labels, self.image_size, self.scores, self.ignore)
        return clipped[(xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])]

    def in_frame(self, size: tuple[int, int]) -> Boxes:
        """The same boxes in the pixels of a ``size`` = ``(width, height)`` copy of the image
        (themselves when already in it).

        Label Studio measures boxes on the image it shows (``original_width``), which may be
        another copy than the one boxloop loads: whatever reads stored boxes against an image
        (training, search training, the core-set, answers to box queries) brings them here.
        """
        width, height = int(size[0]), int(size[1])
        if self.image_size == (width, height):
            return self
        xyxy = self.xyxy
        if len(self) and self.width and self.height:
            xyxy = xyxy * np.array([width / self.width, height / self.height] * 2, np.float32)
        return Boxes(xyxy, self.labels, (width, height), self.scores, self.ignore)

    def iou(self, other: Boxes) -> np.ndarray:
        """``(len(self), len(other))`` IoU matrix (torchvision's ``box_iou``)."""
        if len(self) == 0 or len(other) == 0:
            return np.zeros((len(self), len(other)), np.float32)
        return box_iou(torch.from_numpy(self.xyxy), torch.from_numpy(other.xyxy)).numpy()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "xyxy": self.xyxy.round(3).tolist(),
            "labels": self.labels.tolist(),
            "image_size": list(self.image_size),
        }
        if self.scores is not None:
            out["scores"] = self.scores.round(5).tolist()
        if self.ignore is not None:
            out["ignore"] = self.ignore.tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Boxes:
        size = data["image_size"]
        return cls(
            np.asarray(data["xyxy"], np.float32).reshape(-1, 4),
            np.asarray(data["labels"], np.int64),
            (int(size[0]), int(size[1])),
            None if data.get("scores") is None else np.asarray(data["scores"], np.float32),
            None if data.get("ignore") is None else np.asarray(data["ignore"], bool),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Boxes):
            return NotImplemented
        return (
            self.image_size == other.image_size
            and np.array_equal(self.labels, other.labels)
            and np.allclose(self.xyxy, other.xyxy, atol=1e-3)
            and (self.scores is None) == (other.scores is None)
            and (self.scores is None or np.allclose(self.scores, other.scores))  # type: ignore[arg-type]
        )

    __hash__ = None  # type: ignore[assignment]
