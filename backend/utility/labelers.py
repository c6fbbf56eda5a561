"""The detectors that label utility, offline: the COCO YOLOX-Nano at several input sizes.

Which count as different networks, and why:

* The shared ONNX file (416 × 416) and the PyTorch :class:`~backend.detectors.yolox.YoloxNano`
  loaded from it at 416 are **one** network: same weights, same letterbox, same decoding; they
  give the same boxes up to float rounding (``boxloop bench utility`` measures the largest score
  difference). Voting with both would count one opinion twice.
* The same weights at another input size (320, 640) see every object at another scale: small
  objects appear or vanish, JPEG blocks fall on other receptive fields, and the decisions differ
  on a measurable share of images. They are different **operating points** of one network, not
  independent networks: their errors are correlated, so a vote between them agrees more often
  than the paper's three architectures would, and "all agree" drops fewer images.
* A project's fine-tuned versions and torchvision detectors would be different networks; neither
  is on this machine for the shared datasets' classes (no torchvision detection weights on disk),
  so the benchmark uses the sizes above and says so.

Sizes other than 416 are made by loading the ONNX weights into the PyTorch model and exporting it
at that size (:func:`backend.detectors.yolox.export_onnx`), once, into a cache directory; all run
through :class:`~backend.detectors.onnx_yolox.OnnxYoloxDetector`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from backend.detectors.onnx_yolox import OnnxYoloxDetector
from backend.detectors.yolox import export_onnx, load_coco_yolox_nano

__all__ = ["SHARED_SIZE", "coco_yolox_at"]

#: Input side of the shared ONNX file.
SHARED_SIZE = 416


def coco_yolox_at(
    size: int,
    onnx_path: Path,
    cache_dir: Path,
    labels: Sequence[str] | None = None,
    *,
    score_threshold: float = 0.05,
    num_threads: int = 2,
    from_pytorch: bool = False,
) -> OnnxYoloxDetector:
    """The COCO YOLOX-Nano at ``size × size``, reporting ``labels`` (COCO names when ``None``).

    ``score_threshold`` is low on purpose: utility grades confidences below φ_rec. At 416 the
    shared file is used unless ``from_pytorch`` asks for the PyTorch re-export (to check that
    both are one network).
    """
    onnx_path = Path(onnx_path)
    if size % 32 or size <= 0:
        raise ValueError(f"input size must be a positive multiple of 32, got {size}")
    if size == SHARED_SIZE and not from_pytorch:
        path = onnx_path
    else:
        path = Path(cache_dir) / f"yolox_nano_coco_{size}_pytorch.onnx"
        if not path.is_file():
            model, _ = load_coco_yolox_nano(onnx_path)
            export_onnx(model, path, (size, size))
    detector = OnnxYoloxDetector.from_path(
        path,
        onnx_path.parent / "coco_classes.txt",
        labels=labels,
        num_threads=num_threads,
        score_threshold=score_threshold,
    )
    detector.version = f"yolox_nano@{size}" + ("-pytorch" if from_pytorch else "")
    return detector
