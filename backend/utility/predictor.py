"""The utility predictor: ImageNet EfficientNet-Lite0 fine-tuned as a useful / non-useful classifier.

Why this shape:

* **Decoded pixels only.** It takes RGB images, never a file, so it cannot read a JPEG's
  quantization tables; the same pixels saved as PNG get the same answer. Its view of an image
  (:func:`predictor_view`) is the whole image resized to 224 px (``view="resize"``, the feature
  extractor's preprocessing) or a 224 px crop from the centre at the image's own resolution
  (``view="crop"``): downscaling a 640 px photo to 224 px averages away most of JPEG's 8×8
  blocking, which a detector at 416–640 px still sees.
* **Frozen trunk, trained top.** On this 2-core CPU a full fine-tune of Lite0 costs minutes an
  epoch. The stem and the first ``train_from`` block stages keep their ImageNet weights (they see
  edges, blocking and noise, which is what a distortion changes); their output is computed once,
  through onnxruntime, and the later stages, the 1280-d head convolution and a 2-way classifier
  train on it with class-balanced cross-entropy (each class weighs ``N / (2 N_c)``), horizontal
  flips of the cached maps as augmentation.
* **Served through onnxruntime** like :mod:`backend.features`: the whole network (trunk and trained
  top, softmax at the end) is exported once and run by :class:`UtilityPredictor`; the exported
  graph takes uint8 pixels and does the ImageNet normalisation itself.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from backend.features.base import OnnxImageEncoder, export_onnx, state_digest
from backend.nets.effnet_lite0 import efficientnet_lite0, imagenet_normalization

__all__ = [
    "VIEWS",
    "PredictorConfig",
    "TrainHistory",
    "TrunkEncoder",
    "UtilityNet",
    "UtilityPredictor",
    "class_weights",
    "export_predictor",
    "predictor_view",
    "train_top",
]

INPUT_SIZE = 224
#: How the predictor looks at an image (:func:`predictor_view`).
VIEWS = ("resize", "crop")


def predictor_view(image: Image.Image, view: str, size: int) -> Image.Image:
    """The RGB image the predictor's network reads (before its ``size``×``size`` input).

    ``"resize"``: the image itself (the encoder resizes it whole). ``"crop"``: the centre
    ``size``×``size`` pixels at the image's own resolution (an image with a side under ``size``
    is first enlarged so that side is ``size``), so compression blocks keep their 8-pixel scale.
    """
    if view == "resize":
        return image
    if view != "crop":
        raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    width, height = rgb.size
    if min(width, height) < size:
        scale = size / min(width, height)
        width, height = max(size, round(width * scale)), max(size, round(height * scale))
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    left, top = (width - size) // 2, (height - size) // 2
    return rgb.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class PredictorConfig:
    """Training settings of the utility predictor.

    Attributes:
        train_from: block stages ``0..train_from-1`` stay frozen (ImageNet); later ones train.
            6 (default) trains the last stage (320 channels), the 1280-d head convolution and
            the classifier on cached stride-32 maps (192 × 7 × 7, 19 KB an image in float16):
            about 11 ms an image an epoch on one loaded core, against 56 ms from stage 5 and
            88 ms from stage 4 (measured on this machine); lower values train more.
        epochs, batch_size, lr, weight_decay: AdamW on the trained part.
        size: input side in pixels (square).
        view: ``"resize"`` (the whole image resized to ``size``) or ``"crop"`` (the centre
            ``size`` pixels at the image's own resolution); see :func:`predictor_view`.
        seed: initialisation and batch order.
        threads: torch / onnxruntime threads.
    """

    train_from: int = 6
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    size: int = INPUT_SIZE
    view: str = "resize"
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if not 1 <= self.train_from <= 7:
            raise ValueError(f"train_from must be within 1..7, got {self.train_from}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")


class UtilityNet(nn.Module):
    """EfficientNet-Lite0 (ImageNet) with a 2-way head; ``forward`` gives logits.

    :meth:`trunk` and :meth:`top` split it at block stage ``train_from`` so the frozen part can be
    cached; ``forward(x) == top(trunk(x))``.
    """

    def __init__(self, train_from: int = 6, pretrained: bool = True) -> None:
        super().__init__()
        self.train_from = int(train_from)
        self.net = efficientnet_lite0(pretrained=pretrained, num_classes=2)

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.bn1(self.net.conv_stem(images))
        for block in self.net.blocks[: self.train_from]:
            x = block(x)
        return x

    def top(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps
        for block in self.net.blocks[self.train_from :]:
            x = block(x)
        x = self.net.bn2(self.net.conv_head(x))
        return self.net.forward_head(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(images))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of :meth:`top` (the trunk's stay frozen)."""
        modules: list[nn.Module] = [
            *self.net.blocks[self.train_from :],
            self.net.conv_head,
            self.net.bn2,
            self.net.classifier,
        ]
        return [p for m in modules for p in m.parameters()]


class _Trunk(nn.Module):
    def __init__(self, net: UtilityNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.trunk(images)


class _Probabilities(nn.Module):
    def __init__(self, net: UtilityNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images), dim=1)


class TrunkEncoder:
    """The frozen trunk through onnxruntime: images → cached ``(N, C, H, W)`` maps."""

    def __init__(self, cache_dir: Path, config: PredictorConfig | None = None) -> None:
        self.config = config or PredictorConfig()
        net = UtilityNet(self.config.train_from).eval()
        size = self.config.size
        with torch.no_grad():
            self.map_shape = tuple(net.trunk(torch.zeros(1, 3, size, size)).shape[1:])
        trunk = _Trunk(net).eval()
        digest = state_digest(trunk)[:12]
        path = Path(cache_dir) / f"utility_trunk{self.config.train_from}_{size}_{digest}.onnx"
        mean, std = imagenet_normalization()
        export_onnx(trunk, path, (size, size), normalization=(mean, std))
        self.encoder = OnnxImageEncoder(
            path,
            name=f"utility-trunk{self.config.train_from}@{size}-{digest}",
            dim=int(np.prod(self.map_shape)),
            size=(size, size),
            mean=mean,
            std=std,
            num_threads=self.config.threads,
        )

    def encode(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """``(N, C, H, W)`` float16 maps (half the memory; training casts back to float32)."""
        views = [predictor_view(im, self.config.view, self.config.size) for im in images]
        flat = self.encoder.extract(views, progress=progress)
        return flat.reshape(len(flat), *self.map_shape).astype(np.float16)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Class-balanced cross-entropy weights ``N / (2 N_c)`` (a missing class weighs 0)."""
    y = np.asarray(labels, np.int64)
    counts = np.bincount(y, minlength=2).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (2.0 * np.maximum(counts, 1.0)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class TrainHistory:
    """Per-epoch training loss and accuracy, and wall time."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def train_top(
    maps: np.ndarray,
    labels: np.ndarray,
    config: PredictorConfig | None = None,
    *,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> tuple[UtilityNet, TrainHistory]:
    """Train the top of a fresh :class:`UtilityNet` on cached trunk ``maps`` and 0/1 ``labels``."""
    config = config or PredictorConfig()
    y_all = np.asarray(labels, np.int64)
    if len(maps) != len(y_all) or not len(y_all):
        raise ValueError(f"need equal, non-empty maps and labels ({len(maps)}, {len(y_all)})")
    if set(np.unique(y_all)) - {0, 1}:
        raise ValueError("labels must be 0 or 1")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.threads))
    net = UtilityNet(config.train_from)
    net.train()
    params = net.trainable_parameters()
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(y_all) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=steps, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(y_all))
    x_all = torch.from_numpy(np.ascontiguousarray(maps))
    y_t = torch.from_numpy(y_all)
    history = TrainHistory()
    start = time.perf_counter()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(y_t), generator=generator)
            total, correct, seen = 0.0, 0, 0
            for begin in range(0, len(order), config.batch_size):
                index = order[begin : begin + config.batch_size]
                x = x_all[index].float()
                flip = torch.rand(len(index), generator=generator) < 0.5
                x[flip] = x[flip].flip(-1)
                logits = net.top(x)
                loss = loss_fn(logits, y_t[index])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += float(loss.detach()) * len(index)
                correct += int((logits.argmax(1) == y_t[index]).sum())
                seen += len(index)
            history.loss.append(total / seen)
            history.accuracy.append(correct / seen)
            if on_epoch is not None:
                on_epoch(epoch, history.loss[-1], history.accuracy[-1])
    finally:
        torch.set_num_threads(previous_threads)
    history.seconds = time.perf_counter() - start
    return net.eval(), history


def export_predictor(
    net: UtilityNet, path: Path, size: int = INPUT_SIZE, view: str = "resize"
) -> Path:
    """Write the whole network (softmax output ``(N, 2)``) to ONNX, with a JSON sidecar.

    The graph takes uint8 pixels and normalises them itself (faster on this CPU); predictors
    exported before that take floats, and :class:`UtilityPredictor` serves both.
    """
    path = Path(path)
    if path.exists():
        path.unlink()
    probabilities = _Probabilities(copy.deepcopy(net).eval())
    export_onnx(probabilities, path, (size, size), normalization=imagenet_normalization())
    meta = {
        "train_from": net.train_from,
        "size": size,
        "view": view,
        "digest": state_digest(net)[:12],
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path


class UtilityPredictor:
    """A trained predictor served by onnxruntime: images → probability of being useful."""

    def __init__(self, onnx_path: Path, *, batch_size: int = 32, num_threads: int = 2) -> None:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"utility predictor not found: {onnx_path}")
        sidecar = onnx_path.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        size = int(meta.get("size", INPUT_SIZE))
        self.size, self.view = size, str(meta.get("view", "resize"))
        if self.view not in VIEWS:
            raise ValueError(f"{sidecar}: unknown view {self.view!r}")
        mean, std = imagenet_normalization()
        self.name = f"utility-{meta.get('digest', onnx_path.stem)}"
        self.encoder = OnnxImageEncoder(
            onnx_path,
            name=self.name,
            dim=2,
            size=(size, size),
            mean=mean,
            std=std,
            batch_size=batch_size,
            num_threads=num_threads,
        )

    def predict_proba(self, images: Sequence[Image.Image], progress: bool = False) -> np.ndarray:
        """``(N,)`` probability that each image is useful."""
        views = [predictor_view(im, self.view, self.size) for im in images]
        return self.encoder.extract(views, progress=progress)[:, 1].astype(np.float64)

    def predict(self, images: Sequence[Image.Image], threshold: float = 0.5) -> np.ndarray:
        """0/1 per image."""
        return (self.predict_proba(images) >= threshold).astype(np.int64)
