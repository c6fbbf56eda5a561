"""SimNet (paper §3.1): an embedding network trained on the unlabelled pool itself.

As in the paper: a backbone plus an embedding head, trained with the lifted structured loss
(Song et al., CVPR 2016) on pairs made by splitting every image into two halves — the two halves
of one image are a positive pair, halves of other images in the batch are negatives — for a
configurable number of epochs (paper: 25). Our reading of "horizontally split": the cut runs
through the middle of the width (left and right halves, ``split="left_right"``); the other reading
(top/bottom) is ``split="top_bottom"``.

Departures, each for CPU budget: the backbone is the offline ImageNet EfficientNet-Lite0 (the
paper uses ResNet50, whose weights we do not ship); only its last blocks train
(``trainable_from``) and batch-norm statistics stay frozen (batches of halves are small); an epoch
may be capped at ``max_images_per_epoch`` sampled images for large pools. Embeddings are
L2-normalised, so the loss margin (1.0, as in Song et al.) is on distances in [0, 2].

The trained weights, a JSON record (config, losses, digest) and the ONNX export live in the
directory the caller gives; :func:`load_simnet` reopens them. Extraction runs on onnxruntime.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from backend.features.base import OnnxImageEncoder, export_onnx, state_digest
from backend.features.imgnet import FEATURES_VERSION
from backend.nets.effnet_lite0 import POOLED_DIM, EffNetLite0Pooled, imagenet_normalization

__all__ = [
    "SimNet",
    "SimNetConfig",
    "SimNetExtractor",
    "lifted_structured_loss",
    "load_simnet",
    "split_halves",
    "train_simnet",
]

_WEIGHTS = "simnet.pt"
_RECORD = "simnet.json"


@dataclass(frozen=True)
class SimNetConfig:
    """SimNet training settings (defaults: the paper's 25 epochs, CPU-sized everything else)."""

    epochs: int = 25
    batch_size: int = 16  # images a step, i.e. 2× as many halves
    lr: float = 1e-4
    weight_decay: float = 1e-4
    embed_dim: int = 128
    size: int = 224  # full-image input side at extraction; halves keep the same scale
    split: Literal["left_right", "top_bottom"] = "left_right"
    margin: float = 1.0
    trainable_from: int = 6  # first trainable timm block (0..7; 7 = head and conv_head only)
    max_images_per_epoch: int | None = None
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError("SimNet needs epochs >= 1 and batch_size >= 2 (negatives)")
        if self.split not in ("left_right", "top_bottom"):
            raise ValueError(f"split must be 'left_right' or 'top_bottom', not {self.split!r}")
        if not 0 <= self.trainable_from <= 7:
            raise ValueError("trainable_from must be within 0..7")


class SimNet(nn.Module):
    """EfficientNet-Lite0 pooled features → linear embedding → L2 normalisation."""

    def __init__(self, embed_dim: int = 128, pretrained: bool = True) -> None:
        super().__init__()
        self.backbone = EffNetLite0Pooled(pretrained=pretrained)
        self.head = nn.Linear(POOLED_DIM, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)


def lifted_structured_loss(a: torch.Tensor, b: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Lifted structured loss (Song et al. 2016, Eq. 4) for positive pairs ``(a[i], b[i])``.

    With ``X = [a; b]`` and Euclidean distances ``D``, for each positive pair ``(i, j)``:
    ``J_ij = log(Σ_{k∈N(i)} exp(α − D_ik) + Σ_{l∈N(j)} exp(α − D_jl)) + D_ij`` where ``N(i)`` are
    all rows except ``i`` and its partner; the loss is ``1/(2|P|) Σ max(0, J_ij)²``.
    """
    n = a.shape[0]
    x = torch.cat([a, b])
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    dist = torch.sqrt(d2.clamp_min(1e-12))
    idx = torch.arange(2 * n, device=x.device)
    partner = torch.cat([idx[n:], idx[:n]])
    neg = torch.ones(2 * n, 2 * n, dtype=torch.bool, device=x.device)
    neg[idx, idx] = False
    neg[idx, partner] = False
    scores = (margin - dist).masked_fill(~neg, float("-inf"))
    i, j = idx[:n], partner[:n]
    j_ij = torch.logsumexp(torch.cat([scores[i], scores[j]], dim=1), dim=1) + dist[i, j]
    return F.relu(j_ij).pow(2).sum() / (2.0 * n)


def split_halves(image: Image.Image, split: str) -> tuple[Image.Image, Image.Image]:
    """The two halves of an image: left/right (cut through the width) or top/bottom."""
    w, h = image.size
    if split == "left_right":
        return image.crop((0, 0, w // 2, h)), image.crop((w // 2, 0, w, h))
    return image.crop((0, 0, w, h // 2)), image.crop((0, h // 2, w, h))


def _half_size(config: SimNetConfig) -> tuple[int, int]:
    """(W, H) of a half: half the extraction input along the cut, so scale matches extraction."""
    s = config.size
    return (s // 2, s) if config.split == "left_right" else (s, s // 2)


def _jitter(half: Image.Image, rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Random crop keeping 80–100 % of each side, then resize: the pair is not pixel-aligned."""
    w, h = half.size
    cw, ch = max(1, round(w * rng.uniform(0.8, 1.0))), max(1, round(h * rng.uniform(0.8, 1.0)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return half.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BILINEAR)


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    mean, std = imagenet_normalization()
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images]) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def _set_trainable(model: SimNet, trainable_from: int) -> list[nn.Parameter]:
    """Freeze the stem and blocks before ``trainable_from``; all batch norms keep their stats."""
    net = model.backbone.net
    frozen: list[nn.Module] = [net.conv_stem, net.bn1, *list(net.blocks)[:trainable_from]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def _freeze_norms(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _save_atomic(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


class SimNetExtractor(OnnxImageEncoder):
    """A trained SimNet as a :class:`~backend.features.base.FeatureExtractor` (onnxruntime)."""

    record: dict[str, Any]


def _extractor(
    directory: Path, record: dict[str, Any], batch_size: int, num_threads: int
) -> SimNetExtractor:
    mean, std = imagenet_normalization()
    size = int(record["config"]["size"])
    ext = SimNetExtractor(
        directory / record["onnx"],
        name=record["name"],
        dim=int(record["config"]["embed_dim"]),
        size=(size, size),
        mean=mean,
        std=std,
        batch_size=batch_size,
        num_threads=num_threads,
    )
    ext.record = record
    return ext


def train_simnet(
    images: Sequence[Image.Image],
    directory: Path,
    config: SimNetConfig | None = None,
    *,
    progress: bool = True,
    extract_batch_size: int = 32,
) -> SimNetExtractor:
    """Train SimNet on ``images`` (random access; may decode lazily) and persist it.

    Writes ``simnet.pt`` (weights), the ONNX export and ``simnet.json`` (config, per-epoch loss,
    digest, name) into ``directory``, then returns the extractor.
    """
    cfg = config or SimNetConfig()
    if len(images) < 2:
        raise ValueError("SimNet needs at least 2 images (other images are the negatives)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.num_threads))
    model = SimNet(cfg.embed_dim, pretrained=True)
    params = _set_trainable(model, cfg.trainable_from)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = min(len(images), cfg.max_images_per_epoch or len(images))
    steps = max(1, per_epoch // cfg.batch_size) if per_epoch >= cfg.batch_size else 1
    half = _half_size(cfg)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        with tqdm(
            total=cfg.epochs * steps,
            disable=not progress,
            desc="SimNet",
            unit="step",
            mininterval=1.0,
        ) as bar:
            for _ in range(cfg.epochs):
                model.train()
                _freeze_norms(model)
                order = rng.sample(range(len(images)), per_epoch)
                total = 0.0
                for s in range(steps):
                    chosen = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                    if len(chosen) < 2:
                        continue
                    lefts, rights = [], []
                    for i in chosen:
                        first, second = split_halves(images[i].convert("RGB"), cfg.split)
                        lefts.append(_jitter(first, rng, half))
                        rights.append(_jitter(second, rng, half))
                    emb = model(_to_tensor(lefts + rights))
                    loss = lifted_structured_loss(
                        emb[: len(chosen)], emb[len(chosen) :], cfg.margin
                    )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    value = float(loss.detach())
                    total += value
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
                losses.append(total / steps)
    finally:
        torch.set_num_threads(previous_threads)
    model.eval()
    digest = state_digest(model)[:12]
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    _save_atomic(buf.getvalue(), directory / _WEIGHTS)
    onnx_name = f"simnet_{digest}.onnx"
    export_onnx(model, directory / onnx_name, (cfg.size, cfg.size))
    record = {
        "name": f"simnet_effnet_lite0@{cfg.size}px-{digest}-{FEATURES_VERSION}",
        "digest": digest,
        "onnx": onnx_name,
        "config": asdict(cfg),
        "n_images": len(images),
        "epoch_loss": losses,
        "train_seconds": round(time.perf_counter() - start, 1),
        "finite": all(math.isfinite(v) for v in losses),
    }
    _save_atomic(json.dumps(record, indent=2).encode(), directory / _RECORD)
    return _extractor(directory, record, extract_batch_size, cfg.num_threads)


def load_simnet(directory: Path, *, batch_size: int = 32, num_threads: int = 2) -> SimNetExtractor:
    """Reopen a SimNet trained into ``directory``; FileNotFoundError if there is none."""
    directory = Path(directory)
    path = directory / _RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"no trained SimNet in {directory} (expected {_RECORD}); train one with train_simnet"
        )
    record = json.loads(path.read_text())
    if not (directory / record["onnx"]).is_file():
        model = SimNet(int(record["config"]["embed_dim"]), pretrained=False)
        model.load_state_dict(
            torch.load(directory / _WEIGHTS, map_location="cpu", weights_only=True)
        )
        size = int(record["config"]["size"])
        export_onnx(model, directory / record["onnx"], (size, size))
    return _extractor(directory, record, batch_size, num_threads)
