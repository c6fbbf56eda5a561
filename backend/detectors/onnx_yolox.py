"""COCO-pretrained YOLOX (ONNX, onnxruntime CPU) as an inference-only :class:`Detector`.

Why: before a project's first training there is no project model, and a small COCO detector gives
useful pre-annotations for classes COCO knows (YOLOX-Nano: ~9 ms an image on this CPU). COCO
classes are mapped to the project's labels by name (:mod:`backend.detectors.label_names`).

Pre- and post-processing follow YOLOX's own demo (``yolox/data/data_augment.py`` ``ValTransform``,
``yolox/utils/demo_utils.py``) for models exported without ``--decode_in_inference``:

* letterbox: scale ``r = min(H_in / h, W_in / w)``, bilinear resize (OpenCV ``INTER_LINEAR``
  semantics: half-pixel centres, no antialias, rounded to uint8), pasted at the **top-left** of an
  ``H_in × W_in`` canvas filled with 114; channels **BGR**, values 0–255, no normalisation;
* output ``(1, A, 5 + C)`` rows ``[dx, dy, log w, log h, objectness, class scores]`` over
  strides 8/16/32 (objectness and class scores already sigmoid-ed); boxes decode as
  ``xy = (grid + d) * stride``, ``wh = exp(log wh) * stride``;
* score = objectness × class score; class-aware NMS (IoU 0.45); boxes divided by ``r``.

Whether a model already decodes its boxes is detected once from its output on a blank image
(decoded centres sit on their grid cells; raw offsets do not) and can be forced with ``decoded=``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from torchvision.ops import batched_nms

from backend.boxes import Boxes
from backend.detectors.label_names import map_class_names

__all__ = ["OnnxYoloxDetector", "aspect_input_shape", "letterbox", "read_class_names", "resize_bgr"]

_STRIDES = (8, 16, 32)
_PAD_VALUE = 114.0
DEFAULT_INPUT = 416


def read_class_names(path: Path) -> list[str]:
    """One class name a line; blank lines ignored."""
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path} lists no class names")
    return names


def resize_bgr(image: Image.Image, new_w: int, new_h: int) -> np.ndarray:
    """``(new_h, new_w, 3)`` uint8 BGR: YOLOX's own resize (OpenCV ``INTER_LINEAR``).

    Why OpenCV and not ``torch.nn.functional.interpolate``: it is what YOLOX's ``ValTransform``
    calls, and it takes 3 ms for a VOC image where torch's float path took 7 ms on one thread
    and 50 ms when its thread pool met other work on the two cores (a bulk run beside a server).

    The channels are swapped after the resize, on the small image: bilinear resizing treats each
    channel alone, so the pixels are the same as swapping first, and the full-size copy is gone
    (4.6x faster on VOC/KITTI/COCO photos, ``tests/unit/test_yolox.py`` checks equality).
    """
    rgb: np.ndarray = np.asarray(
        image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8
    )
    if (new_h, new_w) != rgb.shape[:2]:
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _round32(value: float) -> int:
    return max(32, round(value / 32.0) * 32)


def aspect_input_shape(
    aspect: float, area: int, min_side: int = 224, max_side: int = 1024
) -> tuple[int, int]:
    """``(height, width)``, multiples of 32 within ``[min_side, max_side]``, with about ``area``
    pixels and the width/height ratio ``aspect``.

    Why: a square letterbox spends ``1 − 1/aspect`` of its input on padding, so KITTI's 3.3:1
    frames reach a 416² model as a 416×126 strip; ``aspect_input_shape(3.3, 416 * 416)`` is
    224×768, the same pixel budget spent on the image. Fine-tuned versions take their input
    shape from this (via :func:`backend.training.yolox_train.input_shape_for`), and the COCO
    model can serve this way too (``OnnxYoloxDetector(follow_aspect=True)``).
    """
    if aspect <= 0 or area <= 0:
        raise ValueError(f"aspect and area must be positive, got {aspect}, {area}")
    height = math.sqrt(area / aspect)
    width = height * aspect
    clamp = lambda v: min(max_side, max(min_side, _round32(v)))  # noqa: E731
    return clamp(height), clamp(width)


def letterbox(image: Image.Image, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """``(1, 3, H, W)`` float32 BGR 0–255 input as YOLOX's ``ValTransform``, and the scale ``r``.

    Each resized side is at least 1 px: an image thinner than the input's aspect (1 × 500 px into
    416²) would round its short side to 0 and OpenCV's resize would assert (a 500 on /predict).
    """
    height, width = size
    r = min(height / image.height, width / image.width)
    new_h, new_w = max(1, int(image.height * r)), max(1, int(image.width * r))
    canvas = np.full((height, width, 3), _PAD_VALUE, np.float32)
    canvas[:new_h, :new_w] = resize_bgr(image, new_w, new_h)
    return canvas.transpose(2, 0, 1)[None].copy(), r


def _grids(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Cell ``(x, y)`` and stride of each output row, in YOLOX's row order."""
    height, width = size
    cells, strides = [], []
    for stride in _STRIDES:
        ys, xs = np.meshgrid(np.arange(height // stride), np.arange(width // stride), indexing="ij")
        cells.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        strides.append(np.full((cells[-1].shape[0], 1), stride))
    return np.concatenate(cells).astype(np.float32), np.concatenate(strides).astype(np.float32)


class OnnxYoloxDetector:
    """YOLOX ONNX detector whose classes are mapped onto ``labels``.

    With ``labels=None`` the detector reports the model's own class names. Use
    :meth:`with_labels` to get a view for a project (sharing the onnxruntime session).
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        class_names: Sequence[str],
        labels: Sequence[str] | None = None,
        *,
        version: str = "pretrained-yolox",
        score_threshold: float = 0.3,
        nms_threshold: float = 0.45,
        max_detections: int = 100,
        decoded: bool | None = None,
        class_map: dict[int, int] | None = None,
        follow_aspect: bool = False,
    ) -> None:
        self.session = session
        self.class_names = list(class_names)
        self.labels = list(labels) if labels is not None else list(class_names)
        self.version = version
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_detections = int(max_detections)
        model_input = session.get_inputs()[0]
        self._input_name = model_input.name
        fixed = [dim if isinstance(dim, int) and dim > 0 else None for dim in model_input.shape[2:]]
        if follow_aspect and any(dim is not None for dim in fixed):
            raise ValueError(
                f"follow_aspect needs a model with dynamic height and width; its input is "
                f"{model_input.shape} (export it with export_onnx(..., dynamic_hw=True))"
            )
        # A dynamic model letterboxes into 416² unless it follows each image's aspect ratio,
        # at the same area.
        self.input_size: tuple[int, int] = (fixed[0] or DEFAULT_INPUT, fixed[1] or DEFAULT_INPUT)
        self.follow_aspect = bool(follow_aspect)
        self._grid_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        # A fine-tuned version's classes *are* the project's labels (``class_map`` identity);
        # the COCO model's are matched by name and synonym.
        self._class_map = (
            dict(class_map)
            if class_map is not None
            else map_class_names(self.class_names, self.labels)
        )
        # source class index → project label index, -1 for dropped classes
        self._lookup = np.full(len(self.class_names), -1, dtype=np.int64)
        for source, target in self._class_map.items():
            self._lookup[source] = target
        self.decoded = self._detect_decoded() if decoded is None else decoded
        self.model_path: Path | None = None  # set by from_path
        self.class_names_path: Path | None = None

    @classmethod
    def from_path(
        cls,
        model_path: Path,
        class_names_path: Path | None = None,
        *,
        labels: Sequence[str] | None = None,
        num_threads: int = 2,
        score_threshold: float = 0.3,
        nms_threshold: float = 0.45,
        max_detections: int = 100,
        class_map: dict[int, int] | None = None,
        follow_aspect: bool = False,
        class_names: Sequence[str] | None = None,
    ) -> OnnxYoloxDetector:
        """Load ``model_path``; class names default to ``coco_classes.txt`` beside it.

        ``class_names`` given wins over the file: a fine-tuned version's classes are the
        project's labels, and a label that is blank or spans lines does not survive a file of
        one name a line (the class count would no longer fit the model's output).
        """
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {model_path}")
        names_path = (
            Path(class_names_path) if class_names_path else model_path.parent / "coco_classes.txt"
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, int(num_threads))
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        detector = cls(
            session,
            list(class_names) if class_names is not None else read_class_names(names_path),
            labels,
            version=f"pretrained-{model_path.stem}",
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
            class_map=class_map,
            follow_aspect=follow_aspect,
        )
        # where it came from: bulk inference on Ray rebuilds the detector from these files
        detector.model_path, detector.class_names_path = model_path, names_path
        return detector

    def with_labels(self, labels: Sequence[str]) -> OnnxYoloxDetector:
        """The same model reporting ``labels`` (classes with no matching label are dropped)."""
        mapped = OnnxYoloxDetector(
            self.session,
            self.class_names,
            labels,
            version=self.version,
            score_threshold=self.score_threshold,
            nms_threshold=self.nms_threshold,
            max_detections=self.max_detections,
            decoded=self.decoded,
            follow_aspect=self.follow_aspect,
        )
        mapped.model_path, mapped.class_names_path = self.model_path, self.class_names_path
        return mapped

    @property
    def class_map(self) -> dict[int, int]:
        """``{model class index: label index}`` for the classes this detector reports."""
        return dict(self._class_map)

    def _grids_for(self, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._grid_cache:
            self._grid_cache[size] = _grids(size)
        return self._grid_cache[size]

    def input_size_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` the model sees for an image of ``(width, height)`` pixels."""
        if not self.follow_aspect:
            return self.input_size
        width, height = image_size
        area = self.input_size[0] * self.input_size[1]
        return aspect_input_shape(width / max(1, height), area)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (raw,) = self.session.run(None, {self._input_name: batch})[:1]
        out = np.asarray(raw, dtype=np.float32)[0]
        expected = 5 + len(self.class_names)
        size = (int(batch.shape[2]), int(batch.shape[3]))
        rows = len(self._grids_for(size)[0])
        if out.ndim != 2 or out.shape[1] != expected or out.shape[0] != rows:
            raise ValueError(
                f"YOLOX output {out.shape} does not fit {len(self.class_names)} classes at "
                f"input {size} (expected ({rows}, {expected}))"
            )
        return out

    def _detect_decoded(self) -> bool:
        blank = np.full((1, 3, *self.input_size), _PAD_VALUE, dtype=np.float32)
        out = self._run(blank)
        cells, strides = self._grids_for(self.input_size)
        centres = (cells + 0.5) * strides
        distance = np.abs(out[:, :2] - centres).mean(axis=1) / strides[:, 0]
        return bool(np.median(distance) < 1.0)

    def _decode(self, out: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        if self.decoded:
            xy, wh = out[:, :2], out[:, 2:4]
        else:
            cells, strides = self._grids_for(size)
            xy = (out[:, :2] + cells) * strides
            wh = np.exp(np.clip(out[:, 2:4], None, 20.0)) * strides
        return np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)

    def predict(self, images: Sequence[Image.Image]) -> list[Boxes]:
        """Detections per image, mapped to ``labels``; unmapped COCO classes are dropped."""
        return [self._predict_one(image) for image in images]

    def _predict_one(self, image: Image.Image) -> Boxes:
        size = self.input_size_for(image.size)
        batch, ratio = letterbox(image, size)
        out = self._run(batch)
        class_scores = out[:, 5:] * out[:, 4:5]
        classes = class_scores.argmax(axis=1)
        scores = class_scores[np.arange(len(classes)), classes]
        keep = (scores >= self.score_threshold) & (self._lookup[classes] >= 0)
        if not keep.any():
            return Boxes.empty(image.size, with_scores=True)
        boxes = torch.from_numpy((self._decode(out, size)[keep] / ratio).astype(np.float32))
        score_t = torch.from_numpy(scores[keep].astype(np.float32))
        class_t = torch.from_numpy(classes[keep])
        order = batched_nms(boxes, score_t, class_t, self.nms_threshold)[: self.max_detections]
        chosen = order.numpy()
        labels = self._lookup[class_t.numpy()[chosen]]
        result = Boxes(boxes.numpy()[chosen], labels, image.size, score_t.numpy()[chosen])
        return result.clipped()
