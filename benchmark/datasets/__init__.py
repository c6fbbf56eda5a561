"""Dataset loaders for the benchmark: VOC, KITTI and COCO into one :class:`Dataset` type.

``load_dataset("kitti:../shared/data/kitti/tiny")`` picks the loader from the
prefix. Options follow a ``?``: ``voc:PATH?split=val``, ``coco:PATH?images=DIR``,
and for any format ``labels=a,b,c`` to fix the label list. ``$BOXLOOP_SHARED_DATA``
in a path expands to the shared data folder (default ``../shared/data`` beside
the repository).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from backend.boxes import ANY_CLASS, IgnoreOverlap
from benchmark.datasets.coco import load_coco
from benchmark.datasets.common import (
    Dataset,
    DatasetError,
    ImageDecodeError,
    Sample,
    SkippedImage,
    SkippedImageWarning,
    decode_images,
    default_shared_data,
    expand_path,
)
from benchmark.datasets.kitti import KITTI_CLASSES, load_kitti
from benchmark.datasets.voc import VOC_CLASSES, load_voc

__all__ = [
    "ANY_CLASS",
    "KITTI_CLASSES",
    "VOC_CLASSES",
    "Dataset",
    "DatasetError",
    "DatasetSpec",
    "IgnoreOverlap",
    "ImageDecodeError",
    "Sample",
    "SkippedImage",
    "SkippedImageWarning",
    "decode_images",
    "default_shared_data",
    "expand_path",
    "load_coco",
    "load_dataset",
    "load_kitti",
    "load_voc",
    "parse_spec",
]

FORMATS = ("voc", "kitti", "coco")
_OPTIONS = {"voc": {"split", "labels"}, "kitti": {"labels"}, "coco": {"images", "labels"}}


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``format:path?options`` string."""

    format: str
    path: Path
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.format}:{self.path}" + (f"?{query}" if query else "")


def parse_spec(spec: str) -> DatasetSpec:
    """Split ``"kitti:/data/kitti/tiny"`` into format, expanded path and options."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in FORMATS:
        raise DatasetError(
            f"dataset spec {spec!r} must start with one of {', '.join(f'{f}:' for f in FORMATS)}"
        )
    path_text, _, query = rest.partition("?")
    if not path_text:
        raise DatasetError(f"dataset spec {spec!r} has no path")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = set(options) - _OPTIONS[kind]
    if unknown:
        raise DatasetError(f"dataset spec {spec!r}: unknown option(s) {sorted(unknown)} for {kind}")
    return DatasetSpec(kind, expand_path(path_text), options)


def load_dataset(spec: str | DatasetSpec) -> Dataset:
    """Load the dataset a spec names (see the module docstring for the syntax)."""
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    labels = parsed.options.get("labels")
    label_list = [s.strip() for s in labels.split(",") if s.strip()] if labels else None
    if parsed.format == "voc":
        split = parsed.options.get("split", "trainval")
        return load_voc(parsed.path, split=split or None, labels=label_list)
    if parsed.format == "kitti":
        return load_kitti(parsed.path, labels=label_list)
    images = parsed.options.get("images")
    return load_coco(parsed.path, images=expand_path(images) if images else None, labels=label_list)
