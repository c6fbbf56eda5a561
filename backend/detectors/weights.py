"""Find torchvision's COCO checkpoints on local disk, never on the network.

torchvision's ``weights=`` enums download on first use. boxloop runs offline, so it looks the file
up itself in a ``TORCH_HOME``-style directory (``settings.torchvision_weights_dir``) and loads it
with ``torch.load(weights_only=True)``; a missing file is a clear error naming the expected path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torchvision.models import WeightsEnum

__all__ = ["WeightsNotFoundError", "candidate_paths", "load_local_state_dict"]


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained checkpoint that boxloop will not download is not on disk."""


def _default_root() -> Path:
    return Path(torch.hub.get_dir()).parent


def candidate_paths(weights: WeightsEnum, root: Path | None) -> list[Path]:
    """Where the checkpoint of ``weights`` may lie, the canonical place first.

    ``root`` is a ``TORCH_HOME`` (file under ``hub/checkpoints/``); a hub dir or a flat folder of
    checkpoints also works. With ``root=None``: ``$TORCH_HOME`` or torch's default cache.
    """
    filename = os.path.basename(weights.url)
    base = Path(root) if root is not None else _default_root()
    return [
        base / "hub" / "checkpoints" / filename,
        base / "checkpoints" / filename,
        base / filename,
    ]


def load_local_state_dict(weights: WeightsEnum, root: Path | None) -> dict[str, Any]:
    """The state dict of ``weights`` from disk; raises :class:`WeightsNotFoundError` if absent."""
    paths = candidate_paths(weights, root)
    for path in paths:
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
            return state
    raise WeightsNotFoundError(
        f"pretrained weights {weights} not found; boxloop never downloads. Put "
        f"{os.path.basename(weights.url)} (from {weights.url}) at {paths[0]} "
        f"(BOXLOOP_TORCHVISION_WEIGHTS_DIR is the TORCH_HOME-style root; also searched: "
        f"{', '.join(str(p) for p in paths[1:])})"
    )
