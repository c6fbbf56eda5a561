"""The shared detection subsets and sketches, as the search benchmark reads them.

COCO mini, VOC2012 and KITTI tiny are searched together, their classes mapped onto COCO's
names (VOC ``aeroplane`` → ``airplane``, KITTI ``Pedestrian`` → ``person``, ...); the raccoon
and BCCD sets join the collection as distractors (classes no query names). Quick, Draw! sketches
map to COCO classes through ``sketches/category_map.tsv``.

Features (the frozen backbone's 7×7 maps of whole images, pooled crops of every box, pooled whole
images for the single-object baseline, pooled sketch rasters) are computed once and cached
in ``benchmark/results/search/cache/`` (git-ignored), keyed by the extractors' names.

An image that cannot be decoded is left out with a warning
(:func:`benchmark.datasets.decode_images`) and named in :attr:`SearchData.skipped`: one broken
file does not stop the benchmark.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from backend.search.backbone import pooled_extractor, spatial_map_extractor
from backend.search.sketch import load_quickdraw, render_strokes
from benchmark.datasets import Dataset, decode_images, default_shared_data, load_dataset

__all__ = [
    "COLLECTION_SPECS",
    "SearchData",
    "load_search_data",
    "unified_class",
]

#: (spec, role): "search" sets give queries and training images; "distractor" sets only pad.
COLLECTION_SPECS: tuple[tuple[str, str], ...] = (
    ("coco:$BOXLOOP_SHARED_DATA/coco/mini", "search"),
    ("voc:$BOXLOOP_SHARED_DATA/voc/VOCdevkit/VOC2012", "search"),
    ("kitti:$BOXLOOP_SHARED_DATA/kitti/tiny", "search"),
    ("voc:$BOXLOOP_SHARED_DATA/voc/raccoon", "distractor"),
    ("voc:$BOXLOOP_SHARED_DATA/voc/BCCD", "distractor"),
)

_RENAME = {
    # VOC → COCO
    "aeroplane": "airplane",
    "motorbike": "motorcycle",
    "sofa": "couch",
    "tvmonitor": "tv",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    # KITTI → COCO
    "Car": "car",
    "Van": "car",
    "Truck": "truck",
    "Pedestrian": "person",
    "Person_sitting": "person",
    "Cyclist": "person",
    "Tram": "train",
}
_DROP = {"Misc"}


def unified_class(name: str) -> str | None:
    """A dataset's class name in the benchmark's vocabulary (COCO names); None to drop."""
    if name in _DROP:
        return None
    return _RENAME.get(name, name)


@dataclass(frozen=True)
class SearchData:
    """Everything the search benchmark needs, as arrays aligned by image or by box.

    Attributes:
        labels: class names (index = class id).
        image_names: ``dataset/image_id`` per image.
        image_role: "search" or "distractor" per image.
        maps: ``(N, 15680)`` backbone maps; ``pooled``: ``(N, 1280)`` whole-image features.
        boxes: per image, ``(n, 4)`` canvas fractions; ``box_labels``: per image, class ids.
        crops: per image, ``(n, 1280)`` pooled crop features.
        sketch_features / sketch_labels / sketch_strokes: every sketch of a mapped class.
        skipped: ``dataset/image_id`` of each image left out because it could not be decoded.
    """

    labels: list[str]
    image_names: list[str]
    image_role: list[str]
    maps: np.ndarray
    pooled: np.ndarray
    boxes: list[np.ndarray]
    box_labels: list[np.ndarray]
    crops: list[np.ndarray]
    sketch_features: np.ndarray
    sketch_labels: np.ndarray
    sketch_strokes: list[tuple[tuple[tuple[float, float], ...], ...]]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_names)


def _crop(image: Image.Image, box: np.ndarray, min_side: int = 16) -> Image.Image:
    w, h = image.size
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half_w, half_h = max(x1 - x0, min_side) / 2, max(y1 - y0, min_side) / 2
    return image.crop(
        (
            int(max(0, cx - half_w)),
            int(max(0, cy - half_h)),
            int(min(w, cx + half_w)),
            int(min(h, cy + half_h)),
        )
    )


def _sketch_categories(shared: Path) -> list[tuple[str, Path]]:
    """(COCO class, ndjson path) per Quick, Draw! category that maps to a COCO class."""
    table = shared / "sketches" / "category_map.tsv"
    out = []
    with table.open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row.get("source") != "quickdraw" or not row.get("coco_class"):
                continue
            out.append((row["coco_class"], shared / "sketches" / row["file"]))
    return out


def _datasets(shared: Path) -> list[tuple[Dataset, str]]:
    out = []
    for spec, role in COLLECTION_SPECS:
        out.append((load_dataset(spec.replace("$BOXLOOP_SHARED_DATA", str(shared))), role))
    return out


def load_search_data(
    shared: Path | None = None,
    cache_dir: Path = Path("benchmark/results/search/cache"),
    *,
    max_images_per_set: int | None = None,
    sketches_per_class: int = 25,
    num_threads: int = 2,
) -> SearchData:
    """Load (or compute once and cache) the search benchmark's features."""
    shared = Path(shared) if shared is not None else default_shared_data()
    onnx_dir = cache_dir / "onnx"
    maps_x = spatial_map_extractor(onnx_dir, num_threads=num_threads)
    pooled_x = pooled_extractor(onnx_dir, num_threads=num_threads)
    key = hashlib.sha256(
        json.dumps(
            [
                str(shared.resolve()),
                maps_x.name,
                pooled_x.name,
                max_images_per_set,
                sketches_per_class,
                COLLECTION_SPECS,
                sorted(_RENAME.items()),
            ]
        ).encode()
    ).hexdigest()[:12]
    path = cache_dir / f"search_data_{key}.npz"
    if path.is_file():
        return _load_cached(path)

    datasets = _datasets(shared)
    sketch_cats = _sketch_categories(shared)
    labels = sorted(
        {c for ds, _ in datasets for n in ds.labels if (c := unified_class(n))}
        | {c for c, _ in sketch_cats}
    )
    index = {c: i for i, c in enumerate(labels)}
    names: list[str] = []
    roles: list[str] = []
    images: list[Image.Image] = []
    boxes: list[np.ndarray] = []
    box_labels: list[np.ndarray] = []
    crop_images: list[Image.Image] = []
    crop_owner: list[int] = []
    skipped: list[str] = []
    for loaded, role in datasets:
        capped = min(max_images_per_set or len(loaded), len(loaded))
        ds, decoded = decode_images(loaded.subset(list(range(capped))))  # undecodable: skipped
        skipped += [f"{ds.name}/{s.image_id}" for s in ds.skipped]
        for sample in ds.samples:
            image = decoded.pop(sample.image_id)
            kept = sample.boxes.kept()
            w, h = sample.image_size
            rows, cls = [], []
            for xyxy, label in zip(kept.xyxy, kept.labels, strict=True):
                if int(label) < 0:
                    continue
                name = unified_class(ds.labels[int(label)])
                if name is None:
                    continue
                rows.append(np.clip(xyxy / np.array([w, h, w, h], np.float32), 0, 1))
                cls.append(index[name])
                crop_images.append(_crop(image, xyxy))
                crop_owner.append(len(names))
            names.append(f"{ds.name}/{sample.image_id}")
            roles.append(role)
            images.append(image)
            boxes.append(np.asarray(rows, np.float32).reshape(-1, 4))
            box_labels.append(np.asarray(cls, np.int64))
    maps = maps_x.extract(images, progress=False)
    pooled = pooled_x.extract(images, progress=False)
    crop_feats = pooled_x.extract(crop_images, progress=False)
    owner = np.asarray(crop_owner)
    crops = [crop_feats[owner == i] for i in range(len(names))]

    strokes, s_labels = [], []
    for cls_name, file in sketch_cats:
        for drawing in load_quickdraw(file, limit=sketches_per_class):
            strokes.append(drawing)
            s_labels.append(index[cls_name])
    s_feats = pooled_x.extract([render_strokes(s) for s in strokes], progress=False)
    data = SearchData(
        labels,
        names,
        roles,
        maps,
        pooled,
        boxes,
        box_labels,
        crops,
        s_feats,
        np.asarray(s_labels, np.int64),
        strokes,
        skipped,
    )
    _save_cached(path, data)
    return data


def _save_cached(path: Path, data: SearchData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = np.asarray([len(b) for b in data.boxes])
    np.savez_compressed(
        path,
        meta=np.asarray(
            json.dumps(
                {
                    "labels": data.labels,
                    "names": data.image_names,
                    "roles": data.image_role,
                    "strokes": data.sketch_strokes,
                    "skipped": data.skipped,
                }
            )
        ),
        maps=data.maps.astype(np.float16),
        pooled=data.pooled,
        counts=counts,
        boxes=np.concatenate(data.boxes) if counts.sum() else np.zeros((0, 4), np.float32),
        box_labels=np.concatenate(data.box_labels) if counts.sum() else np.zeros(0, np.int64),
        crops=np.concatenate(data.crops) if counts.sum() else np.zeros((0, 1280), np.float32),
        sketch_features=data.sketch_features,
        sketch_labels=data.sketch_labels,
    )


def _load_cached(path: Path) -> SearchData:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    counts = z["counts"]
    cuts = np.cumsum(counts)[:-1]
    strokes = [tuple(tuple((float(x), float(y)) for x, y in s) for s in d) for d in meta["strokes"]]
    return SearchData(
        meta["labels"],
        meta["names"],
        meta["roles"],
        z["maps"].astype(np.float32),
        z["pooled"],
        np.split(z["boxes"], cuts),
        np.split(z["box_labels"], cuts),
        np.split(z["crops"], cuts),
        z["sketch_features"],
        z["sketch_labels"],
        strokes,
        meta.get("skipped", []),
    )
