"""Fine-tune the COCO-pretrained YOLOX-Nano on a project's annotations, on a CPU, without forgetting.

Why these choices (measured on this 2-core machine, see ``docs/training.md``):

* **AdamW, not SGD.** The stem sees raw 0–255 pixels, so its gradients are ~60× those of the next
  layer; SGD diverged. AdamW normalises per parameter.
* **Per-group learning rates.** The class head is where a new label (``raccoon``, ``RBC``) must
  be learnt from scratch; the backbone and neck already know COCO and are only nudged
  (``backbone_lr_mult`` / ``neck_lr_mult`` of the head's rate). The stem stays frozen.
* **Batch norm frozen.** The shared model has BN folded into its convolutions, so its running
  statistics cannot be recovered: every BN layer stays in eval mode (identity + bias).
* **Epochs by data size.** A round sees about ``image_visits`` images in all (clamped to
  ``[min_epochs, max_epochs]`` epochs), so 20 images get many short epochs and 200 a few long
  ones, and a round's cost stays roughly flat.
* **Warm-up, cosine decay and an EMA of the weights**: the usual YOLOX recipe, scaled down; the EMA
  is what is returned, which damps the last steps' noise.
* **Flips and scale jitter** in a letterbox whose shape follows the images' aspect ratio
  (:func:`input_shape_for`): KITTI's 1224×370 frames get a wide input instead of shrinking to
  416×126 in a square one.

The result is a :class:`~backend.detectors.yolox.YoloxNano` over the project's labels; each label
that names a COCO class starts from that class's pretrained row (:func:`initial_yolox`).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.detectors.label_names import map_class_names
from backend.detectors.onnx_yolox import aspect_input_shape, resize_bgr
from backend.detectors.yolox import (
    YoloxNano,
    YoloxTarget,
    freeze,
    remap_classes,
    set_bn_eval,
    yolox_loss,
)
from backend.settings import Settings
from backend.training.samples import LoadedImages, TrainSample, image_like_size, in_memory

__all__ = [
    "YoloxTrainConfig",
    "epochs_for",
    "initial_yolox",
    "input_shape_for",
    "letterbox_tensor",
    "present_classes",
    "train_yolox",
]

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
PAD_VALUE = 114.0


@dataclass(frozen=True)
class YoloxTrainConfig:
    """How one round fine-tunes YOLOX-Nano. Every field is recorded with the version it makes."""

    lr: float = 1e-3
    backbone_lr_mult: float = 0.1
    neck_lr_mult: float = 0.3
    weight_decay: float = 5e-4
    batch_size: int = 8
    image_visits: int = 600
    min_epochs: int = 8
    max_epochs: int = 30
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.05
    ema_decay: float = 0.99
    freeze: str = "stem"
    hflip_prob: float = 0.5
    scale_jitter: tuple[float, float] = (0.8, 1.2)
    input_area: int = 416 * 416
    min_side: int = 224
    max_side: int = 1024
    grad_clip_norm: float = 10.0
    # Leave a label out of the class loss while the round's data holds no box of it. With no
    # example there is no evidence about it, yet the stock loss pushes its score down on every
    # other label's foreground anchors, so a COCO class the project has not met yet fades from
    # the pre-annotations after one round (measured on COCO: fewer boxes served, lower recall).
    mask_absent_classes: bool = True
    threads: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.image_visits < 1:
            raise ValueError("lr, batch_size and image_visits must be positive")
        if not 1 <= self.min_epochs <= self.max_epochs:
            raise ValueError("need 1 <= min_epochs <= max_epochs")
        if self.freeze not in ("none", "stem", "backbone", "backbone+neck"):
            raise ValueError(
                f"freeze must be none, stem, backbone or backbone+neck, not {self.freeze!r}"
            )
        low, high = self.scale_jitter
        if not 0 < low <= high:
            raise ValueError("scale_jitter must be (low, high) with 0 < low <= high")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["scale_jitter"] = list(self.scale_jitter)
        return out

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> YoloxTrainConfig:
        values: dict[str, Any] = {
            "lr": settings.yolox_lr,
            "backbone_lr_mult": settings.yolox_backbone_lr_mult,
            "neck_lr_mult": settings.yolox_neck_lr_mult,
            "image_visits": settings.yolox_image_visits,
            "min_epochs": settings.yolox_min_epochs,
            "max_epochs": settings.yolox_max_epochs,
            "freeze": settings.yolox_freeze,
            "input_area": settings.yolox_input_area,
            "threads": settings.num_threads,
            "seed": settings.train_seed,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> YoloxTrainConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "scale_jitter" in known:
            known["scale_jitter"] = tuple(known["scale_jitter"])
        return cls(**known)


def epochs_for(n_images: int, config: YoloxTrainConfig) -> int:
    """Epochs for a round on ``n_images``: about ``image_visits`` image visits, clamped."""
    wanted = round(config.image_visits / max(1, n_images))
    return int(min(config.max_epochs, max(config.min_epochs, wanted)))


def input_shape_for(
    sizes: Sequence[tuple[int, int]], config: YoloxTrainConfig | None = None
) -> tuple[int, int]:
    """``(height, width)``, multiples of 32, with the images' median aspect ratio and an area of
    about ``config.input_area`` (each side within ``[min_side, max_side]``,
    :func:`~backend.detectors.onnx_yolox.aspect_input_shape`).

    Square-ish photos (VOC, COCO) get 416×416-like inputs; KITTI's 3.3:1 frames get a wide one
    (e.g. 224×768) instead of a 416×126 strip inside a square.
    """
    config = config or YoloxTrainConfig()
    aspect = float(np.median([w / max(1, h) for w, h in sizes])) if sizes else 1.0
    return aspect_input_shape(aspect, config.input_area, config.min_side, config.max_side)


def letterbox_tensor(
    image: Image.Image, input_hw: tuple[int, int], scale: float = 1.0, flip: bool = False
) -> tuple[torch.Tensor, float]:
    """``(3, H, W)`` BGR 0–255 float tensor, YOLOX style (top-left, pad 114), and the scale r.

    The resize is the serving path's (:func:`backend.detectors.onnx_yolox.resize_bgr`, OpenCV
    bilinear as YOLOX's own transforms), so a version sees at training what it sees when served. ``scale`` < 1 shrinks the image inside the canvas (scale jitter); > 1 enlarges it and
    crops whatever falls off the right/bottom edge.
    """
    height, width = input_hw
    r = min(height / image.height, width / image.width) * scale
    new_h, new_w = max(1, int(image.height * r)), max(1, int(image.width * r))
    tensor = torch.from_numpy(resize_bgr(image, new_w, new_h)).permute(2, 0, 1).float()
    if flip:
        tensor = tensor.flip(-1)
    canvas = torch.full((3, height, width), PAD_VALUE)
    h, w = min(height, new_h), min(width, new_w)
    canvas[:, :h, :w] = tensor[:, :h, :w]
    return canvas, r


def _target(
    sample: TrainSample,
    image: Image.Image,
    r: float,
    flip: bool,
    input_hw: tuple[int, int],
) -> YoloxTarget:
    """The sample's boxes in letterbox pixels, each with its loss weight (``box_weights``: noisy
    boxes of box-level active learning weigh λ_d, ground truth 1)."""
    boxes = sample.boxes
    per_box = (
        np.ones(len(boxes), np.float32)
        if sample.box_weights is None
        else np.asarray(sample.box_weights, np.float32)
    )
    kept, per_box = boxes.kept(), per_box[~boxes.ignore_mask]
    xyxy = _to_input(kept.xyxy, kept.image_size, image.size, r, flip, input_hw)
    big = ((xyxy[:, 2] - xyxy[:, 0]) >= 2) & ((xyxy[:, 3] - xyxy[:, 1]) >= 2)
    verified = sample.verified_background
    return YoloxTarget(
        torch.from_numpy(xyxy[big]).reshape(-1, 4),
        torch.from_numpy(kept.labels[big].astype(np.int64)),
        torch.from_numpy(per_box[big]),
        background_weight=sample.background_weight,
        verified_background=None
        if verified is None
        else torch.from_numpy(_to_input(verified, boxes.image_size, image.size, r, flip, input_hw)),
    )


def _to_input(
    xyxy: np.ndarray,
    annotated_size: tuple[int, int],
    image_size: tuple[int, int],
    r: float,
    flip: bool,
    input_hw: tuple[int, int],
) -> np.ndarray:
    """Boxes annotated on an image of ``annotated_size`` in letterbox pixels of ``image_size``
    resized by ``r`` (mirrored when ``flip``), clipped to the image and to the input."""
    width, height = image_size
    out = np.asarray(xyxy, np.float32).reshape(-1, 4).copy()
    if annotated_size != image_size and len(out):
        out[:, [0, 2]] *= width / annotated_size[0]
        out[:, [1, 3]] *= height / annotated_size[1]
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
    if flip and len(out):
        out[:, [0, 2]] = width - out[:, [2, 0]]
    out *= r
    input_h, input_w = input_hw
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, input_w)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, input_h)
    return out


def initial_yolox(
    coco_model: YoloxNano, coco_names: Sequence[str], labels: Sequence[str]
) -> YoloxNano:
    """The COCO model with its class head re-cut to ``labels``: a label that names a COCO class
    (by name or synonym, :func:`~backend.detectors.label_names.map_class_names`) keeps that
    class's pretrained row, any other starts fresh. Version 0 of a project is this model."""
    mapping = map_class_names(coco_names, labels)  # coco index → label index
    rows: list[int | None] = [None] * len(labels)
    for coco_index, label_index in mapping.items():
        if rows[label_index] is None:
            rows[label_index] = coco_index
    return remap_classes(coco_model, rows)


def _param_groups(model: YoloxNano, config: YoloxTrainConfig) -> list[dict[str, Any]]:
    """AdamW groups by (learning-rate multiplier of the part, weight decay or not)."""
    mults = {"backbone": config.backbone_lr_mult, "neck": config.neck_lr_mult}
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            mult = mults.get(name.split(".", 1)[0], 1.0)
            decay = param.ndim > 1  # no weight decay on biases and BN affine parameters
            groups.setdefault((mult, decay), []).append(param)
    return [
        {
            "params": params,
            "lr": config.lr * mult,
            "initial_lr": config.lr * mult,
            "weight_decay": config.weight_decay if decay else 0.0,
        }
        for (mult, decay), params in groups.items()
    ]


class _Ema:
    """Exponential moving average of the weights, with YOLOX's ramp so early steps count."""

    def __init__(self, model: YoloxNano, decay: float, ramp_steps: float) -> None:
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, max(1.0, ramp_steps), 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        source = model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(source[name].detach(), alpha=1 - d)


def _lr_factor(step: int, total: int, config: YoloxTrainConfig) -> float:
    warmup = max(1, int(total * config.warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = config.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def present_classes(samples: Sequence[TrainSample], num_classes: int) -> np.ndarray:
    """``(num_classes,)`` bool: labels with at least one kept box of weight > 0 in ``samples``."""
    present = np.zeros(num_classes, bool)
    for sample in samples:
        keep = ~sample.boxes.ignore_mask
        if sample.box_weights is not None:
            keep &= np.asarray(sample.box_weights, np.float32) > 0
        present[sample.boxes.labels[keep].astype(np.int64)] = True
    return present


def train_yolox(
    samples: Sequence[TrainSample],
    init: YoloxNano,
    config: YoloxTrainConfig,
    *,
    input_hw: tuple[int, int] | None = None,
    epochs: int | None = None,
    progress: ProgressFn | None = None,
) -> YoloxNano:
    """Fine-tune a copy of ``init`` (its class count = the labels' count) on ``samples``.

    ``samples[i].boxes`` label indices refer to ``init``'s classes; ignored boxes are left out;
    ``samples[i].box_weights`` weigh its boxes in the loss (λ_d for unverified predictions).
    ``epochs`` overrides :func:`epochs_for` (the
    gate's cross-validation folds run the candidate's). Returns the EMA model in eval mode.
    Seeded.
    """
    if not samples:
        raise ValueError("no training samples")
    random.seed(config.seed)
    np.random.seed(config.seed % (2**32))
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.set_num_threads(max(1, config.threads))
    # a LazyImage (past a training job's memory budget) is decoded at each visit; paths and
    # other loaders are loaded once, as before
    images = LoadedImages([in_memory(s.image) for s in samples])
    num_classes = init.num_classes
    for sample in samples:
        labels = sample.boxes.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"box label indices outside 0..{num_classes - 1}")
    hw = input_hw or input_shape_for([image_like_size(s.image) for s in samples], config)
    class_mask = (
        torch.from_numpy(present_classes(samples, num_classes))
        if config.mask_absent_classes
        else None
    )

    # Channels-last: oneDNN's convolutions (YOLOX-Nano is mostly depthwise) run a training step
    # 1.26-1.44x faster on this CPU than NCHW (benchmark.round_speed); same fp32 arithmetic.
    # The weights come back contiguous.
    model = copy.deepcopy(init).to(memory_format=torch.channels_last)
    for param in model.parameters():
        param.requires_grad_(True)
    freeze(model, config.freeze)
    model.train()
    set_bn_eval(model)
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr)
    if epochs is None:
        epochs = epochs_for(len(samples), config)
    elif epochs < 1:
        raise ValueError("epochs must be at least 1")
    steps_per_epoch = math.ceil(len(samples) / config.batch_size)
    total = epochs * steps_per_epoch
    ema = _Ema(model, config.ema_decay, ramp_steps=total / 10)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step = 0
    for epoch in range(epochs):
        order = rng.permutation(len(samples))
        running = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            tensors, targets = [], []
            for index in batch:
                image = images[int(index)]
                flip = bool(rng.random() < config.hflip_prob)
                scale = float(rng.uniform(*config.scale_jitter))
                tensor, r = letterbox_tensor(image, hw, scale, flip)
                tensors.append(tensor)
                targets.append(_target(samples[int(index)], image, r, flip, hw))
            factor = _lr_factor(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * factor
            raw = model(torch.stack(tensors).contiguous(memory_format=torch.channels_last))
            losses = yolox_loss(raw, targets, hw, class_mask=class_mask)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip_norm)
            optimizer.step()
            ema.update(model)
            step += 1
            running += float(losses["total"].detach())
            if progress is not None:
                mean = running / (start // config.batch_size + 1)
                progress(step / total, f"epoch {epoch + 1}/{epochs}, loss {mean:.3f}")
    result: YoloxNano = ema.model.to(memory_format=torch.contiguous_format)
    result.eval()
    return result
