"""Load the COCO YOLOX-Nano that pre-annotates before the first training, as the settings say.

``pretrained_input = "square"`` serves the ONNX file as it is (416×416, YOLOX's letterbox).
``"aspect"`` serves the same weights with a dynamic input: each image is letterboxed into a
shape that follows its own aspect ratio at the same pixel budget
(:func:`~backend.detectors.onnx_yolox.aspect_input_shape`), as fine-tuned versions already are.
Why: a 416² square spends two thirds of its input on padding for KITTI's 1224×370 frames
(416×126 of content); ``benchmark/pretrained_input.py`` measures what that costs.

The dynamic model is exported once from the PyTorch weights imported from the ONNX file
(:func:`~backend.detectors.yolox.load_coco_yolox_nano`, parity with onnxruntime is tested) and
cached under ``<data_dir>/models/pretrained/``, named by the source file's size and mtime so a
replaced source file is exported again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

from google.protobuf.message import DecodeError

from backend.detectors.onnx_yolox import OnnxYoloxDetector
from backend.detectors.yolox import load_coco_yolox_nano
from backend.detectors.yolox.onnx_import import export_onnx
from backend.settings import Settings

__all__ = ["PretrainedInput", "dynamic_model_path", "load_pretrained"]

log = logging.getLogger(__name__)

PretrainedInput = Literal["square", "aspect"]


def dynamic_model_path(
    onnx_path: Path, cache_dir: Path, class_names_path: Path | None = None
) -> Path:
    """``onnx_path``'s weights exported with dynamic height and width (cached in ``cache_dir``);
    ``class_names_path`` as for :func:`~backend.detectors.yolox.load_coco_yolox_nano`.

    The export runs in a child process: loading the PyTorch model and tracing it leave about
    180 MiB in a process's heap that it never hands back (``benchmark/aspect_memory.py``), and
    the server would otherwise carry that for its whole life."""
    onnx_path = Path(onnx_path)
    stat = onnx_path.stat()
    target = Path(cache_dir) / f"{onnx_path.stem}-dynamic-{stat.st_size}-{int(stat.st_mtime)}.onnx"
    if target.is_file():
        return target
    partial = target.with_suffix(f".{os.getpid()}.partial")
    names = str(class_names_path) if class_names_path else None
    spawn = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
            child.submit(_export_dynamic, str(onnx_path), names, str(partial)).result()
        partial.replace(target)  # atomic: a concurrent loader sees the whole file or none
    finally:
        partial.unlink(missing_ok=True)
    log.info("exported %s with dynamic input to %s", onnx_path, target)
    return target


def _export_dynamic(onnx_path: str, class_names: str | None, out: str) -> None:
    """In the child process: import the ONNX file's weights and export them, H and W dynamic."""
    try:
        model, _ = load_coco_yolox_nano(Path(onnx_path), Path(class_names) if class_names else None)
    except DecodeError as exc:  # onnx.load of a file that is not a protobuf
        raise ValueError(f"{onnx_path} is not an ONNX model: {exc}") from None
    export_onnx(model, Path(out), (416, 416), dynamic_hw=True)


def load_pretrained(
    settings: Settings, labels: list[str] | None = None
) -> OnnxYoloxDetector | None:
    """The pretrained detector (all its classes, or mapped onto ``labels``), or None when the
    settings name no model file. Raises ``OSError`` / ``ValueError`` on a broken file."""
    path = settings.resolved_onnx_model_path
    if path is None:
        return None
    path = Path(path)
    class_names = settings.resolved_onnx_class_names_path
    follow_aspect = settings.pretrained_input == "aspect"
    served = (
        dynamic_model_path(path, settings.models_dir / "pretrained", class_names)
        if follow_aspect
        else path
    )
    detector = OnnxYoloxDetector.from_path(
        served,
        class_names,
        labels=labels,
        num_threads=settings.num_threads,
        score_threshold=settings.score_threshold,
        max_detections=settings.max_detections,
        follow_aspect=follow_aspect,
    )
    if follow_aspect:
        detector.version = f"pretrained-{path.stem}-aspect"
    return detector
