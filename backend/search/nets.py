"""The learned parts of the search model, all small enough to train on a 2-core CPU.

- :class:`ObjectEncoder`: the single-object common embedding f_s / f_i (Bui et al.'s
  partially shared triplet network): a sketch head and an image head over the same frozen
  pretrained CNN's pooled features, a shared last layer, L2-normalised C-d output; plus a learned
  class embedding per class for class-only objects (the SemIR-like path).
- :class:`SpatialEncoder`: f_t, query tensor C×31×31 → 7×7×D search embedding (paper §3.1;
  conv 3×3 → max-pool /2 → BN → ReLU, twice, then conv 3×3 → BN → ReLU, as method-notes reads
  the reference code).
- :class:`ImageEncoder`: the indexing branch's trainable end. The backbone's early stages
  (EfficientNet-Lite0 to stride 32: 7×7×320 at 224 px) stay frozen, which is what makes training
  take minutes here; a per-location two-layer 1×1 conv head maps them to the same 7×7×D as f_t
  (the part the paper fine-tunes). ``g`` is the classifier head of the CE loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ImageEncoder", "ObjectEncoder", "SpatialEncoder"]


class ObjectEncoder(nn.Module):
    """f_s (sketch), f_i (image crop) and class embeddings, into one C-d unit sphere."""

    def __init__(self, in_dim: int, dim: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.dim = dim
        self.sketch = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1))
        self.image = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1))
        self.shared = nn.Linear(hidden, dim)
        self.classes = nn.Embedding(num_classes, dim)
        nn.init.normal_(self.classes.weight, std=0.1)

    def f_s(self, pooled: torch.Tensor) -> torch.Tensor:
        """Sketch rasters' pooled CNN features ``(n, in_dim)`` → ``(n, C)`` unit vectors."""
        return F.normalize(self.shared(self.sketch(pooled)), dim=-1)

    def f_i(self, pooled: torch.Tensor) -> torch.Tensor:
        """Image crops' pooled CNN features → ``(n, C)`` unit vectors."""
        return F.normalize(self.shared(self.image(pooled)), dim=-1)

    def f_c(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices → their learned ``(n, C)`` unit embeddings."""
        return F.normalize(self.classes(labels), dim=-1)


def _conv_bn_relu(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SpatialEncoder(nn.Module):
    """f_t: ``(B, C, 31, 31)`` → ``(B, D, 7, 7)`` (31 → 15 → 7)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, hidden, pool=True),
            _conv_bn_relu(hidden, hidden, pool=True),
            _conv_bn_relu(hidden, out_channels, pool=False),
        )

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.body(tensor)


class ImageEncoder(nn.Module):
    """Frozen backbone map ``(B, K, 7, 7)`` → ``(B, D, 7, 7)``, and g: classes from it."""

    def __init__(self, in_channels: int, out_channels: int, num_classes: int, hidden: int = 64):
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.g = nn.Linear(out_channels * 49, num_classes)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(maps)
