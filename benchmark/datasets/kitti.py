"""KITTI object layout: ``label_2/<id>.txt`` and ``image_2/<id>.(png|jpeg|jpg)``.

A label line has 15 space-separated fields: type, truncated, occluded, alpha,
the 2D box ``left top right bottom`` in pixels (fields 5–8), then the 3D
dimensions, location and rotation, which a 2D benchmark does not use.

``DontCare`` rows mark regions where objects were not labelled. They are kept
as ignored boxes with the label :data:`~backend.boxes.ANY_CLASS`: a detection of any class
inside one is neither right nor wrong, as in the KITTI devkit, which tests a
detection against a ``DontCare`` region by intersection over the detection's
own area (``ignore_overlap="pred_area"``).

torchvision's ``Kitti`` class is not used: it wants ``Kitti/raw/training`` and
derives label names from ``.png`` files only.
"""

from __future__ import annotations

from pathlib import Path

from backend.boxes import ANY_CLASS
from benchmark.datasets.common import (
    IMAGE_SUFFIXES,
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

#: The eight KITTI object classes (the paper's 8 categories); ``DontCare`` is not a class.
KITTI_CLASSES = ["Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc"]
DONT_CARE = "DontCare"
NUM_FIELDS = 15


def resolve_kitti_root(path: Path) -> Path:
    """The folder holding ``label_2/``: ``path`` itself or its ``training/`` child."""
    path = path.expanduser()
    for candidate in (path, path / "training"):
        if (candidate / "label_2").is_dir():
            if not (candidate / "image_2").is_dir():
                raise DatasetError(f"{candidate}: label_2/ present but no image_2/")
            return candidate
    raise DatasetError(f"{path}: no label_2/ folder (not a KITTI object layout)")


def parse_kitti_label(
    label_path: Path, image_size: tuple[int, int], label_index: dict[str, int]
) -> tuple[list[tuple[float, float, float, float]], list[int], list[bool]]:
    """Boxes, label indices and ignore flags of one label file."""
    xyxy: list[tuple[float, float, float, float]] = []
    labels: list[int] = []
    ignore: list[bool] = []
    for line_no, line in enumerate(label_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label_path}:{line_no}"
        fields = line.split()
        if len(fields) != NUM_FIELDS:
            hint = " (a results file with a score column?)" if len(fields) == NUM_FIELDS + 1 else ""
            raise DatasetError(f"{where}: {len(fields)} fields, expected {NUM_FIELDS}{hint}")
        kind = fields[0]
        try:
            box = tuple(float(v) for v in fields[4:8])
        except ValueError as exc:
            raise DatasetError(
                f"{where}: 2D box fields 5-8 are not numbers: {fields[4:8]}"
            ) from exc
        if kind == DONT_CARE:
            labels.append(ANY_CLASS)
            ignore.append(True)
        elif kind in label_index:
            labels.append(label_index[kind])
            ignore.append(False)
        else:
            raise DatasetError(
                f"{where}: object type {kind!r} is not in the label list {list(label_index)}"
            )
        # a box of no area raises: unlike COCO's two, none is a known quirk of KITTI's labels
        xyxy.append(check_box(where, box, image_size))  # type: ignore[arg-type]
    return xyxy, labels, ignore


def load_kitti(path: str | Path, labels: list[str] | None = None) -> Dataset:
    """Load a KITTI object folder (``training/`` or the folder above it).

    Every label file needs its image and every image its label file: a
    mismatch is reported, not skipped.
    """
    root = resolve_kitti_root(Path(path))
    label_dir, image_dir = root / "label_2", root / "image_2"
    labels = list(KITTI_CLASSES if labels is None else labels)
    label_index = {name: i for i, name in enumerate(labels)}
    stems = sorted(p.stem for p in label_dir.glob("*.txt"))
    if not stems:
        raise DatasetError(f"{label_dir}: no .txt label files")
    image_stems = {
        p.stem for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    }
    orphans = sorted(image_stems - set(stems))
    if orphans:
        raise DatasetError(
            f"{image_dir}: {len(orphans)} image(s) without a label file, e.g. {orphans[:3]}"
        )
    samples = []
    skipped: list[SkippedImage] = []
    for stem in stems:
        image_path = find_image(image_dir, stem)
        try:
            size = image_size_of(image_path)
        except ImageDecodeError as exc:  # an unreadable image header: skip, do not stop
            skipped.append(skip_image(stem, image_path, exc.__cause__ or exc))
            continue
        xyxy, idx, ign = parse_kitti_label(label_dir / f"{stem}.txt", size, label_index)
        samples.append(Sample(stem, image_path.resolve(), make_boxes(xyxy, idx, ign, size)))
    return require_images(
        Dataset(
            name=f"kitti:{root.parent.name if root.name == 'training' else root.name}",
            root=root.resolve(),
            labels=labels,
            samples=samples,
            ignore_overlap="pred_area",
            meta={"format": "kitti"},
            skipped=skipped,
        )
    )
