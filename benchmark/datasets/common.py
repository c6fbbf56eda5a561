"""The one sample type every dataset loader produces.

Each native format (VOC XML, KITTI text, COCO JSON) is read into the same
:class:`Dataset` of :class:`Sample` items whose ground truth is a
:class:`backend.boxes.Boxes`, so the oracle, the evaluation and the runner never
see a format. Regions that must not count (VOC ``difficult``, KITTI
``DontCare``, COCO ``iscrowd``) stay in the boxes with their ``ignore`` flag set
rather than being dropped, because evaluation and the oracle both need them.

An image that cannot be decoded (a truncated JPEG, a file that is not an image)
does not stop a benchmark: the loaders skip an image whose header cannot be read,
and :func:`decode_images` skips one whose pixels cannot be decoded, each with a
:class:`SkippedImageWarning`, and record it in :attr:`Dataset.skipped`. Only a
dataset left with no image at all is an error.

Images are decoded as the backend decodes a task image
(:func:`backend.images.decode_image`: EXIF orientation applied, 16-bit greyscale scaled to
8 bits), so the detectors see the pixels they would see in Label Studio and the boxes, drawn on
the upright picture, sit on them.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from backend.boxes import Boxes, IgnoreOverlap
from backend.images import ImageError, decode_image

IMAGE_SUFFIXES = (".png", ".jpeg", ".jpg")
#: The benchmark refuses only what Pillow itself refuses (a decompression bomb: over twice
#: ``Image.MAX_IMAGE_PIXELS``), as it always has; the backend's lower limit is a service setting.
MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
#: EXIF orientations that turn the stored frame by 90 degrees: width and height swap.
_SIDEWAYS_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the fault."""


class ImageDecodeError(DatasetError):
    """An image file cannot be read or decoded (truncated, corrupt, not an image)."""


class SkippedImageWarning(UserWarning):
    """An undecodable image was left out of a dataset."""


class ZeroAreaBox(DatasetError):
    """A finite box with zero width or height (see :func:`check_box`)."""


class ZeroAreaBoxWarning(UserWarning):
    """Boxes of zero width or height were left out of a dataset's ground truth."""


@dataclass(frozen=True)
class SkippedImage:
    """An image left out of a dataset because it could not be decoded."""

    image_id: str
    path: Path
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"image_id": self.image_id, "path": str(self.path), "reason": self.reason}


def skip_image(image_id: str, path: Path, error: BaseException) -> SkippedImage:
    """Warn that ``path`` is left out, and return the record of it."""
    warnings.warn(
        f"skipping image {image_id!r} ({path}): {error}", SkippedImageWarning, stacklevel=3
    )
    return SkippedImage(image_id, path, str(error))


@dataclass(frozen=True)
class Sample:
    """One image and its ground truth.

    Attributes:
        image_id: stable id within the dataset (file stem for VOC/KITTI, COCO image id).
        image_path: absolute path of the image file.
        boxes: ground truth in pixels; ``ignore`` flags mark regions that do not
            count, and such a region may carry the label :data:`backend.boxes.ANY_CLASS`.
    """

    image_id: str
    image_path: Path
    boxes: Boxes

    @property
    def image_size(self) -> tuple[int, int]:
        return self.boxes.image_size

    def load_image(self) -> Image.Image:
        """The image decoded as RGB, upright, by the backend's own decoder.

        Why the backend's: a benchmark that decoded otherwise (EXIF orientation ignored,
        16-bit values clipped to white) would score the detector on pixels it never sees.
        """
        try:
            data = self.image_path.read_bytes()
            return decode_image(data, max_pixels=MAX_PIXELS, name=self.image_path.name)
        except (OSError, ImageError) as exc:
            raise ImageDecodeError(f"{self.image_path}: cannot decode image ({exc})") from exc


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: samples plus the label list their ``Boxes.labels`` index into."""

    name: str
    root: Path
    labels: list[str]
    samples: list[Sample]
    ignore_overlap: IgnoreOverlap = "iou"
    meta: dict[str, str] = field(default_factory=dict)
    #: Images left out because they could not be decoded (see :func:`decode_images`).
    skipped: list[SkippedImage] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_boxes(self) -> int:
        """Ground-truth boxes that count (ignored regions excluded)."""
        return sum(len(s.boxes.kept()) for s in self.samples)

    @property
    def num_ignored(self) -> int:
        return sum(int(s.boxes.ignore_mask.sum()) for s in self.samples)

    def subset(self, indices: list[int] | np.ndarray, name: str | None = None) -> Dataset:
        """The samples at ``indices`` (in that order), same labels and ignore rule."""
        return Dataset(
            name or self.name,
            self.root,
            list(self.labels),
            [self.samples[int(i)] for i in indices],
            self.ignore_overlap,
            dict(self.meta),
            list(self.skipped),
        )

    def without(self, skipped: Iterable[SkippedImage]) -> Dataset:
        """The dataset less the ``skipped`` images (recorded in :attr:`skipped`)."""
        dropped = list(skipped)
        ids = {s.image_id for s in dropped}
        return Dataset(
            self.name,
            self.root,
            list(self.labels),
            [s for s in self.samples if s.image_id not in ids],
            self.ignore_overlap,
            dict(self.meta),
            [*self.skipped, *dropped],
        )

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.labels, 0)
        for sample in self.samples:
            for label in sample.boxes.kept().labels:
                counts[self.labels[int(label)]] += 1
        return counts


def image_size_of(path: Path) -> tuple[int, int]:
    """The upright ``(width, height)`` from the image header (no full decode).

    Upright: with the EXIF orientation applied, as :meth:`Sample.load_image` (and Label Studio,
    where the boxes were drawn) shows the image; a photo stored sideways has its sides swapped.
    """
    try:
        with Image.open(path) as image:
            width, height = int(image.width), int(image.height)
            # the base class's getexif reads the header's EXIF only: PNG's own would decode
            # every pixel to look for an eXIf chunk after the image data
            orientation = Image.Image.getexif(image).get(_EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{path}: cannot read image header ({exc})") from exc
    return (height, width) if orientation in _SIDEWAYS_ORIENTATIONS else (width, height)


def require_images(dataset: Dataset) -> Dataset:
    """``dataset``, unless every image was skipped: then a :class:`DatasetError` naming them."""
    if dataset.samples:
        return dataset
    shown = "; ".join(f"{s.path.name}: {s.reason}" for s in dataset.skipped[:3])
    raise DatasetError(
        f"{dataset.root}: no decodable image left ({len(dataset.skipped)} skipped"
        + (f", e.g. {shown}" if shown else "")
        + ")"
    )


def decode_images(dataset: Dataset) -> tuple[Dataset, dict[str, Image.Image]]:
    """Decode every image as RGB; an undecodable one is skipped with a warning.

    Returns the dataset less the skipped images (recorded in :attr:`Dataset.skipped`)
    and the decoded images by ``image_id``. Raises :class:`DatasetError` when no
    image is left.
    """
    images: dict[str, Image.Image] = {}
    skipped: list[SkippedImage] = []
    for sample in dataset.samples:
        try:
            images[sample.image_id] = sample.load_image()
        except ImageDecodeError as exc:
            skipped.append(skip_image(sample.image_id, sample.image_path, exc.__cause__ or exc))
    return require_images(dataset.without(skipped) if skipped else dataset), images


def find_image(directory: Path, stem: str) -> Path:
    """The image called ``stem`` with any accepted suffix (KITTI ships .png or .jpeg)."""
    for suffix in IMAGE_SUFFIXES:
        for candidate in (directory / f"{stem}{suffix}", directory / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise DatasetError(
        f"{directory}: no image for {stem!r} (looked for {', '.join(IMAGE_SUFFIXES)})"
    )


def check_box(
    where: str, xyxy: tuple[float, float, float, float], image_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Validate one box and clip it to the image.

    A box with non-finite coordinates or reversed corners is a broken annotation
    and raises :class:`DatasetError`; a finite box of zero width or height raises
    :class:`ZeroAreaBox`, which a loader may catch where such boxes are a known
    quirk of the source (COCO). A box that pokes past the border by a few pixels
    (common in VOC and KITTI truncation) is clipped, since dropping or keeping it
    unclipped would both change the ground truth more than the clip does.
    """
    x0, y0, x1, y1 = xyxy
    if not all(np.isfinite(v) for v in xyxy):
        raise DatasetError(f"{where}: non-finite box coordinates {xyxy}")
    if x1 <= x0 or y1 <= y0:
        kind = DatasetError if x1 < x0 or y1 < y0 else ZeroAreaBox
        raise kind(f"{where}: box {xyxy} has no area (need x_max > x_min and y_max > y_min)")
    w, h = image_size
    cx0, cy0 = min(max(x0, 0.0), w), min(max(y0, 0.0), h)
    cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
    if cx1 <= cx0 or cy1 <= cy0:
        raise DatasetError(f"{where}: box {xyxy} lies outside the {w}x{h} image")
    return cx0, cy0, cx1, cy1


def make_boxes(
    xyxy: list[tuple[float, float, float, float]],
    labels: list[int],
    ignore: list[bool],
    image_size: tuple[int, int],
) -> Boxes:
    return Boxes(
        np.asarray(xyxy, np.float32).reshape(-1, 4),
        np.asarray(labels, np.int64),
        image_size,
        ignore=np.asarray(ignore, bool),
    )


def default_shared_data() -> Path:
    """``$BOXLOOP_SHARED_DATA``, else ``../shared/data`` beside the repository root."""
    env = os.environ.get("BOXLOOP_SHARED_DATA")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return (repo_root.parent / "shared" / "data").resolve()


def expand_path(text: str) -> Path:
    """Expand ``$BOXLOOP_SHARED_DATA`` (with its default), other env vars and ``~``."""
    if "BOXLOOP_SHARED_DATA" in text and "BOXLOOP_SHARED_DATA" not in os.environ:
        shared = str(default_shared_data())
        text = text.replace("${BOXLOOP_SHARED_DATA}", shared).replace(
            "$BOXLOOP_SHARED_DATA", shared
        )
    return Path(os.path.expanduser(os.path.expandvars(text)))
