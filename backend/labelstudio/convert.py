"""Label Studio formats, both ways: label configs, percent regions ↔ :class:`Boxes`.

Label Studio describes a rectangle in percent of the image (``x, y, width,
height`` of the top-left corner, plus ``rotation`` in degrees about that corner);
boxloop works in pixels. These functions are the only place that knows both.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.boxes import Boxes


class LabelConfigError(ValueError):
    """The project's label config cannot drive a box detector."""


class AnnotationParseError(ValueError):
    """An annotation result could not be turned into boxes."""


class MissingImageSize(AnnotationParseError):
    """The regions do not say the image's size (Label Studio leaves ``original_width`` out of
    some webhooks): the boxes can be read once the image is loaded, so this is no parse error
    for the store (:func:`backend.ingest.parse_boxes`)."""


#: The largest image side an annotation may claim (``original_width``/``original_height``). A
#: larger one cannot be a real image, and its pixel corners would overflow ``Boxes``' float32.
MAX_IMAGE_SIDE = 1_000_000

#: Region types that are boxes: one of another control would train as "no object" if skipped.
_BOX_TYPES = ("rectanglelabels", "rectangle")


@dataclass(frozen=True)
class LabelConfig:
    """What boxloop needs from a label config: the rectangle control and its image.

    ``labels`` are the ``<Label value>``s: the classes boxloop learns, stable when an admin
    adds or edits an ``alias``. ``aliases`` pairs ``(value, alias)`` for labels that have one:
    Label Studio writes a label's alias, not its value, into ``rectanglelabels`` (its
    ``SelectedModel.selectedValues``), and loads a result naming either.
    """

    from_name: str
    to_name: str
    image_key: str
    labels: tuple[str, ...]
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def label_index(self) -> dict[str, int]:
        """Label index by any name a result may carry: the value or the alias."""
        index = {label: i for i, label in enumerate(self.labels)}
        for label, alias in self.aliases:
            index.setdefault(alias, index[label])
        return index

    @property
    def result_names(self) -> dict[str, str]:
        """The name Label Studio stores in results for each label (its alias, if it has one)."""
        names = {label: label for label in self.labels}
        for label, alias in reversed(self.aliases):  # a label's first alias wins
            names[label] = alias
        return names


def parse_label_config(xml: str) -> LabelConfig:
    """Find the ``RectangleLabels`` control, its ``Image`` target and label values.

    Raises :class:`LabelConfigError` with a message a project admin can act on.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("label config is empty")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"label config is not valid XML: {exc}") from exc
    controls = [el for el in root.iter() if el.tag == "RectangleLabels"]
    if not controls:
        found = sorted({el.tag for el in root.iter() if el.tag not in ("View", "Header", "Style")})
        raise LabelConfigError(
            "label config has no <RectangleLabels> control; boxloop serves bounding boxes only "
            f"(found: {', '.join(found) or 'nothing'})"
        )
    control = controls[0]
    from_name = control.get("name")
    to_name = control.get("toName")
    if not from_name or not to_name:
        raise LabelConfigError("<RectangleLabels> needs both name and toName attributes")
    image = _target_image(root, from_name, to_name)
    to_name = image.get("name", "")
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f'<Image name={to_name!r}> needs value="$field", got {value!r}')
    labels, aliases = _labels_of(control, from_name)
    return LabelConfig(from_name, to_name, value[1:], labels, aliases)


def _target_image(root: ET.Element, from_name: str, to_name: str) -> ET.Element:
    """The one ``<Image>`` among the control's targets. Label Studio lets ``toName`` name
    several object tags (``toName="img,txt"``); boxloop predicts one image per task, so a
    control over several images is refused rather than served on whichever comes first."""
    names = [name.strip() for name in to_name.split(",") if name.strip()]
    images = {el.get("name"): el for el in root.iter("Image") if el.get("name") in names}
    if not images:
        raise LabelConfigError(
            f"<RectangleLabels name={from_name!r}> points at toName={to_name!r}, "
            "but there is no <Image> with that name"
        )
    if len(images) > 1:
        raise LabelConfigError(
            f"<RectangleLabels name={from_name!r}> points at several images "
            f"({', '.join(map(repr, images))}); boxloop detects on one image per task: "
            "give the boxes of each image a <RectangleLabels> of their own, the first on the "
            "image boxloop should serve"
        )
    return next(iter(images.values()))


def _labels_of(
    control: ET.Element, from_name: str
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The control's label values, and ``(value, alias)`` for those with an ``alias``.

    Label Studio stores the alias in annotations and reads a result naming either, so each
    value or alias must name one label: one naming two would train its boxes as either.
    """
    labels: list[str] = []
    aliases: list[tuple[str, str]] = []
    owner: dict[str, str] = {}  # every name a result may carry -> the label it names
    for tag in control.iter("Label"):
        alias = tag.get("alias") or ""
        name = tag.get("value") or alias
        for written in filter(None, (name, alias)):
            if owner.setdefault(written, name) != name:
                raise LabelConfigError(
                    f"<RectangleLabels name={from_name!r}>: {written!r} names both the label "
                    f"{owner[written]!r} and {name!r} (as a value or an alias); Label Studio "
                    "stores the alias in annotations, so make each value and alias unique"
                )
        if name and name not in labels:
            labels.append(name)
        if alias and alias != name:
            aliases.append((name, alias))
    if not labels:
        raise LabelConfigError(f"<RectangleLabels name={from_name!r}> lists no <Label value=...>")
    return tuple(labels), tuple(aliases)


def _region_xyxy(value: dict[str, Any], width: float, height: float) -> tuple[float, ...]:
    x = float(value["x"]) * width / 100.0
    y = float(value["y"]) * height / 100.0
    w = float(value["width"]) * width / 100.0
    h = float(value["height"]) * height / 100.0
    angle = math.radians(float(value.get("rotation") or 0.0))
    if not all(math.isfinite(v) for v in (x, y, w, h, angle)):
        # NaN or an infinity (a number past 1e308 parses as one): clipping would drop the box
        # without a word, and the object would teach the detector "background"
        raise ValueError("x, y, width, height and rotation must be finite numbers")
    if abs(angle) < 1e-9:  # a negative width or height (drawn leftwards, imported) spans back
        return min(x, x + w), min(y, y + h), max(x, x + w), max(y, y + h)
    # Rotation is about the top-left corner; the detector is axis-aligned, so use the hull.
    cos, sin = math.cos(angle), math.sin(angle)
    xs = [x, x + w * cos, x + w * cos - h * sin, x - h * sin]
    ys = [y, y + w * sin, y + w * sin + h * cos, y + h * cos]
    return min(xs), min(ys), max(xs), max(ys)


def regions_to_boxes(
    result: Iterable[dict[str, Any]],
    config: LabelConfig,
    image_size: tuple[int, int] | None = None,
) -> Boxes:
    """Rectangle regions of one annotation → pixel ``Boxes``.

    ``image_size`` defaults to the regions' ``original_width``/``original_height``.
    Regions of other controls (e.g. a TextArea beside the boxes) are ignored, but a box of
    another box control raises :class:`AnnotationParseError`, as does a rectangle whose label
    is not in the config: the caller keeps the raw annotation and reports it, instead of
    training its objects as background.
    """
    index = config.label_index
    xyxy: list[tuple[float, ...]] = []
    labels: list[int] = []
    size = image_size
    for region in result:
        if not isinstance(region, dict):
            raise AnnotationParseError(f"region is not an object: {region!r:.80}")
        if region.get("type") in _BOX_TYPES and region.get("from_name") != config.from_name:
            raise AnnotationParseError(
                f"a box of the control {str(region.get('from_name'))!r:.80}: boxloop reads the "
                f"boxes of <RectangleLabels name={config.from_name!r}>, the label config's first "
                "(merge the box controls into one to train on all of them)"
            )
        if region.get("type") == "rectangle":  # the control's own box without its label:
            # skipped, its object trained as "no object"
            raise AnnotationParseError("rectangle region has no label")
        if region.get("type") != "rectanglelabels" or region.get("from_name") != config.from_name:
            continue
        value = region.get("value")
        if not isinstance(value, dict):
            raise AnnotationParseError("rectangle region has no value object")
        names = value.get("rectanglelabels") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise AnnotationParseError("rectangle region: rectanglelabels must be a list of names")
        if not names:
            raise AnnotationParseError("rectangle region has no label")
        unknown = [n for n in names if n not in index]
        if unknown:
            raise AnnotationParseError(
                f"label {unknown[0]!r} is not in the project's RectangleLabels "
                f"({', '.join(config.labels)})"
            )
        if size is None:
            ow, oh = region.get("original_width"), region.get("original_height")
            if ow is None or oh is None:
                raise MissingImageSize(
                    "region has no original_width/original_height and no image size was given"
                )
            try:
                size = (int(ow), int(oh))
            except (TypeError, ValueError, OverflowError) as exc:
                raise AnnotationParseError(f"region has a bad original size: {exc}") from exc
            if not all(1 <= side <= MAX_IMAGE_SIDE for side in size):
                raise AnnotationParseError(
                    f"region has original size {ow!r:.40} x {oh!r:.40}; each side must be 1 to "
                    f"{MAX_IMAGE_SIDE} pixels"
                )
        try:
            box = _region_xyxy(value, size[0], size[1])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise AnnotationParseError(
                f"rectangle region has a bad x/y/width/height: {exc}"
            ) from exc
        xyxy.append(box)
        labels.append(index[names[0]])
    if size is None:
        size = (0, 0)
    with np.errstate(over="ignore"):  # checked on the next line, with a clearer message
        corners = np.asarray(xyxy, np.float32).reshape(-1, 4)
    if not np.isfinite(corners).all():  # finite as float64 but past float32's range
        raise AnnotationParseError("rectangle region: x/y/width/height lie past any image")
    boxes = Boxes(corners, np.asarray(labels, np.int64), size)
    return boxes.clipped() if size != (0, 0) else boxes


def boxes_to_regions(
    boxes: Boxes, config: LabelConfig, labels: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Pixel ``Boxes`` → Label Studio prediction regions (percent, with per-box score).

    ``labels`` names the box label indices (the model's label list); boxes whose
    label is not in the project's config are dropped, since Label Studio rejects
    predictions with unknown label values. A label with an ``alias`` is sent as its alias,
    the name Label Studio itself stores in annotations.
    """
    names = list(labels) if labels is not None else list(config.labels)
    written = config.result_names  # Label Studio matches a label with an alias by the alias
    width, height = boxes.image_size
    if width <= 0 or height <= 0:
        raise ValueError("boxes need a positive image size to be converted to percent")
    regions: list[dict[str, Any]] = []
    clipped = boxes.clipped()
    for i in range(len(clipped)):
        name = names[int(clipped.labels[i])]
        if name not in written:
            continue
        x0, y0, x1, y1 = (float(v) for v in clipped.xyxy[i])
        region: dict[str, Any] = {
            "from_name": config.from_name,
            "to_name": config.to_name,
            "type": "rectanglelabels",
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": 100.0 * x0 / width,
                "y": 100.0 * y0 / height,
                "width": 100.0 * (x1 - x0) / width,
                "height": 100.0 * (y1 - y0) / height,
                "rotation": 0,
                "rectanglelabels": [written[name]],
            },
        }
        if clipped.scores is not None:
            region["score"] = float(clipped.scores[i])
        regions.append(region)
    return regions


def task_score(boxes: Boxes) -> float:
    """A task-level score: the mean box confidence (0 with no boxes)."""
    if boxes.scores is None or len(boxes) == 0:
        return 0.0
    return float(np.mean(boxes.scores))


def prediction_of(
    boxes: Boxes, config: LabelConfig, labels: Sequence[str]
) -> tuple[list[dict[str, Any]], float]:
    """A detector's boxes as one Label Studio prediction: ``(regions, task score)``. Boxes of
    labels the project's config lacks are left out of both (``labels`` names the detector's
    label indices). ``/predict`` and bulk pre-annotation both serve this."""
    regions = boxes_to_regions(boxes, config, labels)
    served = boxes[[i for i, name in enumerate(boxes.labels) if labels[int(name)] in config.labels]]
    return regions, task_score(served.clipped())  # the boxes sent: a box outside the image is not
