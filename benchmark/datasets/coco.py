"""COCO detection JSON (``annotations/instances_<split>.json`` + ``<split>/`` images).

Read with pycocotools' ``COCO`` index. Category ids are not contiguous (1–90
for the 80 COCO classes), so labels are the category names in id order and
``Boxes.labels`` are positions in that list. Boxes are ``[x, y, w, h]`` in
continuous pixels and become ``xyxy``. ``iscrowd`` regions stay as ignored
boxes of their class (COCOeval ignores detections inside them, measuring
overlap as intersection over the detection's area: ``ignore_overlap="pred_area"``).
Images without annotations are kept: they are legitimate negatives.

A box of zero width or height is left out with one :class:`ZeroAreaBoxWarning` per file and
counted in ``Dataset.meta["zero_area_boxes"]``: the official ``instances_train2017.json`` has two
(annotations 918 and 2206849, cocoapi issue 355), and one such box must not stop the whole set
from loading. Non-finite or reversed boxes still raise: those are corruption, not a known quirk.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from benchmark.datasets.common import (
    Dataset,
    DatasetError,
    ImageDecodeError,
    Sample,
    SkippedImage,
    ZeroAreaBox,
    ZeroAreaBoxWarning,
    check_box,
    image_size_of,
    make_boxes,
    require_images,
    skip_image,
)


def resolve_coco_files(path: Path, images: Path | None = None) -> tuple[Path, Path]:
    """``(annotation json, image folder)`` from a JSON path or a dataset folder.

    A folder must hold exactly one ``annotations/instances_*.json``; the image
    folder is ``<folder>/<split>`` where the JSON is ``instances_<split>.json``.
    """
    path = path.expanduser()
    if path.is_dir():
        found = sorted((path / "annotations").glob("instances_*.json"))
        if not found:
            raise DatasetError(f"{path}: no annotations/instances_*.json")
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DatasetError(f"{path}: several annotation files ({names}); name one")
        ann_file = found[0]
    elif path.is_file():
        ann_file = path
    else:
        raise DatasetError(f"{path}: no such COCO annotation file or folder")
    if images is None:
        split = ann_file.stem.removeprefix("instances_")
        images = ann_file.parent.parent / split
    if not images.is_dir():
        raise DatasetError(f"{images}: COCO image folder not found")
    return ann_file, images


def _index(ann_file: Path) -> COCO:
    try:
        with ann_file.open() as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{ann_file}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing list {key!r}")
    for key, fields in (
        ("images", ("id", "file_name", "width", "height")),
        ("annotations", ("id", "image_id", "category_id", "bbox")),
        ("categories", ("id", "name")),
    ):
        for k, item in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(item, dict) or f not in item]
            if missing:
                raise DatasetError(f"{ann_file}: {key}[{k}] lacks {missing}")
        ids = [item["id"] for item in data[key]]
        if len(set(ids)) != len(ids):
            raise DatasetError(f"{ann_file}: duplicate ids in {key!r}")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def load_coco(
    path: str | Path, images: str | Path | None = None, labels: list[str] | None = None
) -> Dataset:
    """Load COCO detection annotations.

    Args:
        path: the ``instances_*.json`` file or the folder holding ``annotations/``.
        images: the image folder, when not ``<folder>/<split>``.
        labels: the label list; default the category names in category-id order.
            A category whose name is not in an explicit list is an error.
    """
    ann_file, image_dir = resolve_coco_files(Path(path), None if images is None else Path(images))
    coco = _index(ann_file)
    categories = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    names = [str(c["name"]) for c in categories]
    if len(set(names)) != len(names):
        raise DatasetError(f"{ann_file}: duplicate category names")
    labels = list(names if labels is None else labels)
    label_index = {name: i for i, name in enumerate(labels)}
    unknown = [n for n in names if n not in label_index]
    if unknown:
        raise DatasetError(f"{ann_file}: categories {unknown} are not in the label list {labels}")
    cat_to_label = {c["id"]: label_index[str(c["name"])] for c in categories}

    samples = []
    skipped: list[SkippedImage] = []
    zero_area: list[int] = []  # annotation ids
    for info in coco.dataset["images"]:
        image_path = image_dir / str(info["file_name"])
        if not image_path.is_file():
            raise DatasetError(f"{ann_file}: image {info['file_name']!r} not in {image_dir}")
        size = (int(info["width"]), int(info["height"]))
        try:
            header = image_size_of(image_path)
        except ImageDecodeError as exc:  # an unreadable image header: skip, do not stop
            skipped.append(skip_image(str(info["id"]), image_path, exc.__cause__ or exc))
            continue
        if size != header:
            raise DatasetError(
                f"{ann_file}: image {info['id']} is {size[0]}x{size[1]} in the JSON "
                f"but {header[0]}x{header[1]} on disk"
            )
        xyxy, idx, ign = [], [], []
        for ann in coco.imgToAnns.get(info["id"], []):
            try:
                xyxy_i, label, crowd = _annotation(ann, cat_to_label, size, ann_file)
            except ZeroAreaBox:
                zero_area.append(ann["id"])
                continue
            xyxy.append(xyxy_i)
            idx.append(label)
            ign.append(crowd)
        samples.append(
            Sample(str(info["id"]), image_path.resolve(), make_boxes(xyxy, idx, ign, size))
        )
    image_ids = {info["id"] for info in coco.dataset["images"]}
    stray = [a["id"] for a in coco.dataset["annotations"] if a["image_id"] not in image_ids]
    if stray:
        raise DatasetError(f"{ann_file}: annotations {stray[:5]} refer to unknown images")
    if zero_area:
        warnings.warn(
            f"{ann_file}: left out {len(zero_area)} box(es) of zero width or height "
            f"(annotation ids {zero_area[:5]}{' ...' if len(zero_area) > 5 else ''})",
            ZeroAreaBoxWarning,
            stacklevel=2,
        )
    return require_images(
        Dataset(
            name=f"coco:{ann_file.parent.parent.name}",
            root=image_dir.resolve(),
            labels=labels,
            samples=samples,
            ignore_overlap="pred_area",
            meta={
                "format": "coco",
                "annotations": str(ann_file.resolve()),
                "zero_area_boxes": str(len(zero_area)),
            },
            skipped=skipped,
        )
    )


def _annotation(
    ann: dict[str, Any], cat_to_label: dict[int, int], size: tuple[int, int], ann_file: Path
) -> tuple[tuple[float, float, float, float], int, bool]:
    where = f"{ann_file}: annotation {ann['id']}"
    if ann["category_id"] not in cat_to_label:
        raise DatasetError(f"{where}: unknown category_id {ann['category_id']}")
    bbox = ann["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise DatasetError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: bbox values are not numbers: {bbox!r}") from exc
    crowd = ann.get("iscrowd", 0)
    if crowd not in (0, 1):
        raise DatasetError(f"{where}: iscrowd must be 0 or 1, got {crowd!r}")
    return (
        check_box(where, (x, y, x + w, y + h), size),
        cat_to_label[ann["category_id"]],
        crowd == 1,
    )
