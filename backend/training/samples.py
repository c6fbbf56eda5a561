"""Training samples: an image (or a way to get it) and its ground-truth boxes.

Images may be given lazily (a path or a zero-argument callable) so a training set of hundreds of
photos does not have to sit decoded in memory; :func:`load_sample_image` resolves them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np
import torch
from PIL import Image

from backend.boxes import Boxes
from backend.images import to_8bit

__all__ = [
    "ImageLike",
    "LazyImage",
    "LoadedImages",
    "TrainSample",
    "image_like_size",
    "in_memory",
    "load_image_like",
    "load_sample_image",
    "sample_target",
]

ImageLike = Image.Image | Path | str | Callable[[], Image.Image]


@dataclass(frozen=True)
class LazyImage:
    """An image of known ``size`` (width, height) that ``load`` makes on each use.

    Why: a training job held every annotated image decoded, and a project of a few thousand
    full-HD frames took more memory than the machine had. Past its budget a job keeps an image
    as its file's bytes (a tenth of the pixels' size for a JPEG) behind ``load``; the gate needs
    only the size until a detector or the training reaches the pixels.
    """

    size: tuple[int, int]
    load: Callable[[], Image.Image]

    def __call__(self) -> Image.Image:
        return self.load()


class LoadedImages(Sequence[Image.Image]):
    """``images`` as RGB PIL images, each loaded when a detector reaches it (a slice loads its
    part), so predicting on a validation slice never holds the slice loaded at once."""

    def __init__(self, images: Sequence[ImageLike]) -> None:
        self._images = images

    def __len__(self) -> int:
        return len(self._images)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...
    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [load_image_like(image) for image in self._images[index]]
        return load_image_like(self._images[index])


@dataclass(frozen=True)
class TrainSample:
    """One annotated image. ``boxes`` label indices refer to the training label list.

    An image with zero boxes is a valid negative (it teaches the model what is background).
    Boxes flagged ``ignore`` are left out of training.
    """

    image: ImageLike
    boxes: Boxes
    #: One loss weight per box of ``boxes`` (None: all 1). Box-level active learning trains on
    #: images whose not-yet-queried boxes are the model's own predictions: they weigh λ_d.
    box_weights: np.ndarray | None = None
    #: Loss weight of "no object here" on the regions no box covers: 1 on an image labelled in
    #: full. Box-level active learning may give a partly labelled image less, since nobody looked
    #: at its unqueried regions (``BoxCampaign.training_samples(background_weight=)``).
    background_weight: float = 1.0
    #: ``(K, 4)`` xyxy regions (in ``boxes``' image pixels) an annotator answered "no object":
    #: verified background, full weight whatever ``background_weight``.
    verified_background: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.box_weights is not None and len(self.box_weights) != len(self.boxes):
            raise ValueError(f"{len(self.box_weights)} box weights for {len(self.boxes)} boxes")
        if not self.background_weight >= 0:
            raise ValueError("background_weight must be >= 0")


def load_sample_image(sample: TrainSample) -> Image.Image:
    """The sample's image as RGB PIL (decoding a path or calling a loader)."""
    return load_image_like(sample.image)


def image_like_size(source: ImageLike) -> tuple[int, int]:
    """``(width, height)`` of an :data:`ImageLike`, without its pixels where they are not
    loaded yet (a path or a bare loader is loaded to tell)."""
    return in_memory(source).size


def in_memory(source: ImageLike) -> Image.Image | LazyImage:
    """``source`` as it is when it holds its image (decoded, or encoded as a :class:`LazyImage`
    decoded at each use); a path or a bare loader loaded once."""
    return source if isinstance(source, Image.Image | LazyImage) else load_image_like(source)


def load_image_like(source: ImageLike) -> Image.Image:
    """An :data:`ImageLike` as RGB PIL (decoding a path or calling a loader)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, str | Path):
        with Image.open(source) as opened:
            image = to_8bit(opened).convert("RGB")  # a 16-bit file was clipped to white
    elif callable(source):
        image = source()
    else:
        raise TypeError(f"unsupported image source {type(source).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


def sample_target(
    boxes: Boxes, image_size: tuple[int, int], num_labels: int, flip: bool
) -> dict[str, torch.Tensor]:
    """torchvision target (``boxes`` xyxy float32, ``labels`` 1-based int64) for an image.

    Boxes are rescaled if they were annotated on a different image size, clipped, stripped of
    ignored and degenerate boxes, and mirrored when ``flip`` (the image is flipped likewise).
    """
    if len(boxes) and (boxes.labels.min() < 0 or boxes.labels.max() >= num_labels):
        raise ValueError(
            f"box label indices {sorted(set(boxes.labels.tolist()))} outside 0..{num_labels - 1}"
        )
    kept = boxes.kept().in_frame(image_size)
    kept = Boxes(kept.xyxy, kept.labels, image_size).clipped()
    xyxy = kept.xyxy.copy()
    if flip:
        width = float(image_size[0])
        xyxy[:, [0, 2]] = width - xyxy[:, [2, 0]]
    return {
        "boxes": torch.from_numpy(np.ascontiguousarray(xyxy, dtype=np.float32)).reshape(-1, 4),
        "labels": torch.from_numpy(kept.labels.astype(np.int64) + 1),
    }
