"""Fine-tune a torchvision detector on a project's annotations, on a CPU.

The loop follows torchvision's ``references/detection`` (SGD with momentum and weight decay, a
linear warm-up, horizontal flips, losses summed over the heads) with two changes for a 2-core CPU:

* Images go through the network one at a time and their gradients accumulate to a batch. The
  losses are per-image means either way, and it lets a frozen backbone body's outputs be cached
  per image: with ``freeze_backbone_body`` no gradient reaches the body, so after an image's first
  visit (per flip state) only the FPN, RPN and box head run. RoIAlign's backward into the FPN still
  runs, because the FPN is new and must learn.
* Fewer sampled RoIs per image (``box_batch_size_per_image``, 128 instead of 512): the box head and
  RoIAlign's backward scale with it.

Seeded: the same samples, config and seed give the same model.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import resize_boxes

from backend.detectors.fasterrcnn import (
    ArchSpec,
    EffNetFPNBackbone,
    arch_spec_of,
    build_model,
    resolve_arch,
    set_input_size,
)
from backend.detectors.torch_detector import image_to_tensor
from backend.detectors.versions import load_model_version
from backend.training.config import TrainConfig
from backend.training.samples import TrainSample, load_sample_image, sample_target

__all__ = ["ProgressFn", "initial_model", "train_detector"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[float, str], None]
Features = OrderedDict[str, torch.Tensor]


def _seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def initial_model(
    labels: Sequence[str], config: TrainConfig, init: nn.Module | Path | None
) -> nn.Module:
    """The model training starts from.

    * ``None``: a fresh ``config.arch`` model (pretrained body, new heads).
    * a version directory: that version when its labels equal ``labels`` (a warm start), else a
      fresh model (logged): its class head would not fit.
    * a module built by :func:`~backend.detectors.build_model` with ``len(labels) + 1`` classes:
      a copy of it (the caller's model is left untouched); another class count is an error.
    """
    num_classes = len(labels) + 1
    if isinstance(init, str | Path):
        model, metadata = load_model_version(Path(init))
        if list(metadata["labels"]) == list(labels):
            return model
        log.info("labels changed since %s: training from the pretrained model instead", init)
        init = None
    if isinstance(init, nn.Module):
        spec = arch_spec_of(init)
        if spec.num_classes != num_classes:
            raise ValueError(
                f"init model has {spec.num_classes - 1} classes, the labels need {len(labels)}"
            )
        return copy.deepcopy(init)
    spec = ArchSpec(resolve_arch(config.arch), num_classes)
    return build_model(spec, pretrained=True, weights_dir=config.weights_dir)


def _body(model: nn.Module) -> nn.Module | None:
    """The pretrained feature body (what ``freeze_backbone_body`` freezes)."""
    if isinstance(model, FasterRCNN):
        return model.backbone.body
    if isinstance(model, SSD):
        return model.backbone.features
    return None


def _prepare(model: nn.Module, config: TrainConfig) -> None:
    set_input_size(model, config.min_size, config.max_size)
    if isinstance(model, FasterRCNN):
        model.roi_heads.fg_bg_sampler.batch_size_per_image = config.box_batch_size_per_image
        model.rpn.fg_bg_sampler.batch_size_per_image = config.rpn_batch_size_per_image
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    body = _body(model)
    if body is not None and config.freeze_backbone_body:
        body.requires_grad_(False)
    elif isinstance(model, FasterRCNN) and isinstance(model.backbone, EffNetFPNBackbone):
        # as torchvision's trainable_backbone_layers=3: the stem and first two stages stay fixed
        effnet: Any = model.backbone.body
        for module in (effnet.conv_stem, effnet.bn1, effnet.blocks[0], effnet.blocks[1]):
            module.requires_grad_(False)
    model.train()


@dataclass
class _CachedBody:
    features: Features  # float16
    resized_hw: tuple[int, int]
    padded_hw: tuple[int, int]
    original_wh: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.features.values())


class _BodyCache:
    """Frozen-body outputs per ``(sample index, flipped)``, up to a memory cap."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self.entries: dict[tuple[int, bool], _CachedBody] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[int, bool]) -> _CachedBody | None:
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, key: tuple[int, bool], entry: _CachedBody) -> None:
        if self.used_bytes + entry.nbytes <= self.limit_bytes:
            self.entries[key] = entry
            self.used_bytes += entry.nbytes


def _body_outputs(backbone: nn.Module, images: torch.Tensor) -> Features:
    if isinstance(backbone, EffNetFPNBackbone):
        return backbone.body_features(images)
    return cast(Features, cast(Any, backbone).body(images))


class _ImageLosses:
    """Per-image loss computation for one model and sample set (optionally caching the body)."""

    def __init__(
        self, model: nn.Module, samples: Sequence[TrainSample], labels: int, config: TrainConfig
    ) -> None:
        self.model = model
        self.samples = samples
        self.num_labels = labels
        frozen = config.freeze_backbone_body and isinstance(model, FasterRCNN)
        self.cache = (
            _BodyCache(config.feature_cache_mb * 2**20)
            if frozen and config.cache_body_features
            else None
        )

    def __call__(self, index: int, flip: bool) -> dict[str, torch.Tensor]:
        if isinstance(self.model, FasterRCNN):
            return self._faster_rcnn(index, flip)
        image, target = self._load(index, flip)
        return self.model([image], [target])

    def _load(self, index: int, flip: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sample = self.samples[index]
        image = load_sample_image(sample)
        tensor = image_to_tensor(image)
        if flip:
            tensor = tensor.flip(-1)
        return tensor, sample_target(sample.boxes, image.size, self.num_labels, flip)

    def _faster_rcnn(self, index: int, flip: bool) -> dict[str, torch.Tensor]:
        model = self.model
        assert isinstance(model, FasterRCNN)
        cached = self.cache.get((index, flip)) if self.cache is not None else None
        if cached is None:
            image, target = self._load(index, flip)
            image_list, targets = model.transform([image], [target])
            if self.cache is not None:
                with torch.no_grad():
                    body = _body_outputs(model.backbone, image_list.tensors)
                height, width = image.shape[-2:]
                self.cache.put(
                    (index, flip),
                    _CachedBody(
                        OrderedDict((k, v.half()) for k, v in body.items()),
                        image_list.image_sizes[0],
                        (int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1])),
                        (int(width), int(height)),
                    ),
                )
            else:
                body = _body_outputs(model.backbone, image_list.tensors)
        else:
            body = OrderedDict((k, v.float()) for k, v in cached.features.items())
            sample = self.samples[index]
            target = sample_target(sample.boxes, cached.original_wh, self.num_labels, flip)
            width, height = cached.original_wh
            target["boxes"] = resize_boxes(target["boxes"], (height, width), cached.resized_hw)
            padded = torch.zeros(()).expand(1, 3, *cached.padded_hw)
            image_list, targets = ImageList(padded, [cached.resized_hw]), [target]
        features = model.backbone.fpn(body)
        proposals, rpn_losses = model.rpn(image_list, features, targets)
        _, box_losses = model.roi_heads(features, proposals, image_list.image_sizes, targets)
        return {**rpn_losses, **box_losses}


def _lr_lambda(warmup_iters: int, total_iters: int) -> Callable[[int], float]:
    """Linear warm-up from 0.1 % of the rate, then cosine decay to 1 % at the end."""

    def factor(step: int) -> float:
        if step < warmup_iters:
            alpha = step / max(1, warmup_iters)
            return 0.001 * (1 - alpha) + alpha
        progress = (step - warmup_iters) / max(1, total_iters - warmup_iters)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_detector(
    samples: Sequence[TrainSample],
    labels: Sequence[str],
    config: TrainConfig,
    init: nn.Module | Path | None = None,
    progress: ProgressFn | None = None,
) -> nn.Module:
    """Fine-tune a detector for ``labels`` on ``samples``; returns it in eval mode.

    ``init``: see :func:`initial_model` (a previous version gives a warm start when the labels are
    unchanged). ``progress(fraction, message)`` is called after every optimizer step.
    """
    if not labels:
        raise ValueError("training needs at least one label")
    if not samples:
        raise ValueError("training needs at least one sample")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, config.threads))
    try:
        rng = _seed_everything(config.seed)
        model = initial_model(labels, config, init)
        _prepare(model, config)
        losses_of = _ImageLosses(model, samples, len(labels), config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        steps_per_epoch = math.ceil(len(samples) / config.batch_size)
        total = steps_per_epoch * config.epochs
        warmup = min(config.warmup_iters, max(0, total // 3))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup, total))
        step = 0
        for epoch in range(config.epochs):
            order = rng.permutation(len(samples))
            running = 0.0
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                optimizer.zero_grad(set_to_none=True)
                batch_loss = 0.0
                for index in batch:
                    flip = bool(rng.random() < config.hflip_prob)
                    losses = losses_of(int(index), flip)
                    loss = sum(losses.values(), torch.zeros(())) / len(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite loss { ({k: float(v) for k, v in losses.items()}) } at "
                            f"epoch {epoch + 1}, sample {int(index)}; lower the learning rate"
                        )
                    loss.backward()
                    batch_loss += float(loss.detach())
                if config.grad_clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                running += batch_loss
                if progress is not None:
                    mean = running / (start // config.batch_size + 1)
                    progress(step / total, f"epoch {epoch + 1}/{config.epochs}, loss {mean:.3f}")
        if losses_of.cache is not None:
            cache = losses_of.cache
            log.info(
                "body cache: %d hits, %d misses, %.0f MiB",
                cache.hits,
                cache.misses,
                cache.used_bytes / 2**20,
            )
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval()
