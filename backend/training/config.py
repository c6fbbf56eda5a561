"""Training hyper-parameters, in one dataclass that a model version records.

Defaults are the CPU levers measured in ``benchmark/detector_speed.py`` and
``/work/shared/docs/method-notes.md``: the backbone body frozen (no gradients through it, so its
outputs can be cached per image) and 128 sampled RoIs an image instead of torchvision's 512.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from backend.settings import Settings

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune a detector.

    Attributes:
        arch: detector architecture (``settings.detector`` name or alias) for fresh models.
        epochs / batch_size / lr: SGD schedule (momentum, weight decay, linear warm-up, cosine).
        box_batch_size_per_image: RoIs sampled per image for the box head (torchvision: 512).
        rpn_batch_size_per_image: anchors sampled per image for the RPN loss (torchvision: 256).
        freeze_backbone_body: no gradients into the ImageNet/COCO body (its FPN still trains).
        cache_body_features: with a frozen body, keep each image's body outputs (float16, per flip
            state) after their first use instead of recomputing them every epoch.
        feature_cache_mb: memory cap of that cache; images beyond it are recomputed.
        hflip_prob: probability of a horizontal flip per image and epoch.
        min_size / max_size: resize rule (shorter side / cap on the longer side), as at inference.
        threads: torch intra-op threads while training.
        weights_dir: ``TORCH_HOME``-style root for COCO checkpoints (torchvision architectures).
    """

    arch: str = "fasterrcnn_effnet_lite0"
    epochs: int = 8
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 50
    grad_clip_norm: float = 10.0
    box_batch_size_per_image: int = 128
    rpn_batch_size_per_image: int = 256
    freeze_backbone_body: bool = True
    cache_body_features: bool = True
    feature_cache_mb: int = 1024
    hflip_prob: float = 0.5
    seed: int = 0
    min_size: int = 512
    max_size: int = 853
    threads: int = 2
    weights_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if self.lr <= 0:
            raise ValueError("lr must be positive")
        if self.box_batch_size_per_image < 1 or self.rpn_batch_size_per_image < 1:
            raise ValueError("sampled RoIs / anchors per image must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> TrainConfig:
        # The torchvision detector named by the settings; with the YOLOX default (trained by
        # backend.training.yolox_train) the Faster R-CNN this config describes is the ImageNet one.
        arch = settings.detector if settings.detector != "yolox_nano" else cls.arch
        values: dict[str, Any] = {
            "arch": arch,
            "epochs": settings.train_epochs,
            "batch_size": settings.train_batch_size,
            "lr": settings.train_lr,
            "box_batch_size_per_image": settings.train_box_batch_size_per_image,
            "freeze_backbone_body": settings.train_freeze_backbone_body,
            "seed": settings.train_seed,
            "min_size": settings.detector_min_size,
            "max_size": settings.detector_max_size,
            "threads": settings.num_threads,
            "weights_dir": settings.torchvision_weights_dir,
        }
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["weights_dir"] = None if self.weights_dir is None else str(self.weights_dir)
        return out
