"""PASCAL VOC layout: ``Annotations/*.xml``, ``ImageSets/Main/<split>.txt``, ``JPEGImages/``.

The XML is parsed with torchvision's ``VOCDetection.parse_voc_xml``; the class
itself is not used because it insists on a ``VOCdevkit/VOC<year>`` tree and
does not validate anything, while the raccoon subset (and most home-made VOC
exports) put ``Annotations/`` at the top.

Coordinates: VOC corners are 1-based inclusive pixel indices, so pixel ``i``
covers ``[i-1, i]`` and the box becomes ``(xmin-1, ymin-1, xmax, ymax)`` in the
continuous pixel coordinates of :class:`backend.boxes.Boxes` (the detectron2
convention). ``difficult`` objects stay in the ground truth with ``ignore``
set: the VOC devkit neither rewards nor punishes detections of them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from torchvision.datasets import VOCDetection

from benchmark.datasets.common import (
    Dataset,
    DatasetError,
    ImageDecodeError,
    Sample,
    SkippedImage,
    check_box,
    find_image,
    image_size_of,
    make_boxes,
    require_images,
    skip_image,
)

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def resolve_voc_root(path: Path) -> Path:
    """The folder holding ``Annotations/``: ``path`` itself, or its single ``VOC*`` child.

    Accepts ``.../VOC2012``, ``.../VOCdevkit`` and the folder above ``VOCdevkit``.
    """
    path = path.expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: VOC root is not a directory")
    if (path / "Annotations").is_dir():
        return path
    candidates = [
        child
        for base in (path, path / "VOCdevkit")
        if base.is_dir()
        for child in sorted(base.iterdir())
        if child.is_dir() and (child / "Annotations").is_dir()
    ]
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in candidates)
        raise DatasetError(f"{path}: several VOC folders ({names}); name one of them")
    raise DatasetError(f"{path}: no Annotations/ folder (not a VOC layout)")


def read_split(root: Path, split: str) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first column; blank lines skipped)."""
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not split_file.is_file():
        main = root / "ImageSets" / "Main"
        have = sorted(p.stem for p in main.glob("*.txt")) if main.is_dir() else []
        raise DatasetError(f"{split_file}: split file not found (available: {have or 'none'})")
    ids: list[str] = []
    for line in split_file.read_text().splitlines():
        if line.strip():
            ids.append(line.split()[0])
    if len(set(ids)) != len(ids):
        raise DatasetError(f"{split_file}: an image id is listed twice")
    return ids


def _text(node: dict[str, Any], key: str, where: str) -> str:
    value = node.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: missing or repeated <{key}>")
    return value.strip()


def _number(node: dict[str, Any], key: str, where: str) -> float:
    text = _text(node, key, where)
    try:
        return float(text)
    except ValueError as exc:
        raise DatasetError(f"{where}: <{key}> is not a number: {text!r}") from exc


def parse_voc_xml(
    xml_path: Path, image_path: Path, label_index: dict[str, int] | None
) -> tuple[list[tuple[str, tuple[float, float, float, float], bool]], tuple[int, int]]:
    """Objects ``(name, xyxy, difficult)`` and ``(width, height)`` of one annotation file.

    The size in the XML is checked against the image header: if they differ the
    boxes were drawn on another version of the image and no fix is safe.
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml_path}: not valid XML ({exc})") from exc
    if root.tag != "annotation":
        raise DatasetError(f"{xml_path}: root element is <{root.tag}>, expected <annotation>")
    ann = VOCDetection.parse_voc_xml(root)["annotation"]
    header_size = image_size_of(image_path)
    size = ann.get("size")
    if isinstance(size, dict) and size.get("width") and size.get("height"):
        xml_size = (
            int(_number(size, "width", f"{xml_path} <size>")),
            int(_number(size, "height", f"{xml_path} <size>")),
        )
        if xml_size != (0, 0) and xml_size != header_size:
            raise DatasetError(
                f"{xml_path}: <size> says {xml_size[0]}x{xml_size[1]} but {image_path.name} "
                f"is {header_size[0]}x{header_size[1]}"
            )
    objects: list[tuple[str, tuple[float, float, float, float], bool]] = []
    raw_objects = ann.get("object", [])
    if isinstance(raw_objects, dict):
        raw_objects = [raw_objects]
    for k, obj in enumerate(raw_objects):
        where = f"{xml_path} object {k}"
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: empty <object>")
        name = _text(obj, "name", where)
        if label_index is not None and name not in label_index:
            raise DatasetError(
                f"{where}: class {name!r} is not in the label list {sorted(label_index)}"
            )
        box = obj.get("bndbox")
        if not isinstance(box, dict):
            raise DatasetError(f"{where}: missing or repeated <bndbox>")
        xmin, ymin, xmax, ymax = (
            _number(box, key, f"{where} <bndbox>") for key in ("xmin", "ymin", "xmax", "ymax")
        )
        difficult_text = obj.get("difficult", "0")
        if difficult_text not in ("0", "1"):
            raise DatasetError(f"{where}: <difficult> must be 0 or 1, got {difficult_text!r}")
        # corners are 1-based inclusive, so even xmin == xmax is one pixel wide: a box of no
        # area here has xmax < xmin, a broken annotation, and check_box's error stands
        xyxy = check_box(where, (xmin - 1.0, ymin - 1.0, xmax, ymax), header_size)
        objects.append((name, xyxy, difficult_text == "1"))
    return objects, header_size


def load_voc(
    path: str | Path, split: str | None = "trainval", labels: list[str] | None = None
) -> Dataset:
    """Load a VOC-layout folder.

    Args:
        path: the folder holding ``Annotations/`` (or a ``VOCdevkit`` above it).
        split: name of ``ImageSets/Main/<split>.txt``; ``None`` takes every XML file.
        labels: the label list; by default the 20 VOC classes when every name is
            one of them, else the sorted names found (e.g. ``["raccoon"]``). A name
            outside an explicit list is an error, never a silent skip.
    """
    root = resolve_voc_root(Path(path))
    ann_dir, img_dir = root / "Annotations", root / "JPEGImages"
    if not img_dir.is_dir():
        raise DatasetError(f"{root}: no JPEGImages/ folder")
    if split is None:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise DatasetError(f"{ann_dir}: no .xml files")
    else:
        ids = read_split(root, split)
        if not ids:
            raise DatasetError(f"{root}: split {split!r} lists no images")
    label_index = None if labels is None else {name: i for i, name in enumerate(labels)}

    parsed = []
    skipped: list[SkippedImage] = []
    for image_id in ids:
        xml_path = ann_dir / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DatasetError(f"{xml_path}: listed in split {split!r} but missing")
        image_path = find_image(img_dir, image_id)
        try:
            objects, size = parse_voc_xml(xml_path, image_path, label_index)
        except ImageDecodeError as exc:  # an unreadable image header: skip, do not stop
            skipped.append(skip_image(image_id, image_path, exc.__cause__ or exc))
            continue
        parsed.append((image_id, image_path, objects, size))

    if labels is None:
        names = {name for _, _, objects, _ in parsed for name, _, _ in objects}
        labels = list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)
        label_index = {name: i for i, name in enumerate(labels)}
    assert label_index is not None

    samples = [
        Sample(
            image_id,
            image_path.resolve(),
            make_boxes(
                [xyxy for _, xyxy, _ in objects],
                [label_index[name] for name, _, _ in objects],
                [difficult for _, _, difficult in objects],
                size,
            ),
        )
        for image_id, image_path, objects, size in parsed
    ]
    return require_images(
        Dataset(
            name=f"voc:{root.name}",
            root=root.resolve(),
            labels=list(labels),
            samples=samples,
            ignore_overlap="iou",
            meta={"format": "voc", "split": split or "all"},
            skipped=skipped,
        )
    )
