"""The query tensor T_Q (paper eq. 1): object embeddings painted over their boxes.

Each object's C-d embedding fills the cells of its box on a G×G raster; where κ objects overlap,
each contributes 1/κ (so the cell holds their mean); the raster is max-pooled to C×N×N, N = 31
(the paper's size, which the spatial encoder's two stride-2 pools take to 7×7). G = 3N, so the
pool is an exact 3×3 window: a box smaller than a window still leaves its mark, and empty cells
stay zero vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["QUERY_SIZE", "box_masks", "paint_query_tensor", "paint_query_tensors"]

#: The query tensor's side N (paper: 31).
QUERY_SIZE = 31
_UPSAMPLE = 3


def box_masks(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """``(n, grid, grid)`` float masks of boxes ``(n, 4)`` given as canvas fractions ``xyxy``.

    A cell belongs to a box when the box overlaps it; every box covers at least one cell.
    """
    boxes = boxes.reshape(-1, 4).clamp(0.0, 1.0)
    lo = torch.floor(boxes[:, :2] * grid).clamp(0, grid - 1)
    hi = torch.maximum(torch.ceil(boxes[:, 2:] * grid), lo + 1).clamp(1, grid)
    cells = torch.arange(grid, dtype=boxes.dtype, device=boxes.device)
    in_x = (cells[None, :] >= lo[:, 0:1]) & (cells[None, :] < hi[:, 0:1])  # (n, G)
    in_y = (cells[None, :] >= lo[:, 1:2]) & (cells[None, :] < hi[:, 1:2])
    return (in_y[:, :, None] & in_x[:, None, :]).to(boxes.dtype)


def paint_query_tensor(
    embeddings: torch.Tensor, boxes: torch.Tensor, size: int = QUERY_SIZE
) -> torch.Tensor:
    """T = MP[Σ_i f(O_i) ⊙ 1(O_i)/κ]: ``(C, size, size)`` from ``(n, C)`` embeddings and
    ``(n, 4)`` boxes (canvas fractions). ``n = 0`` gives zeros."""
    return paint_query_tensors(embeddings[None], boxes[None], None, size)[0]


def paint_query_tensors(
    embeddings: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor | None = None,
    size: int = QUERY_SIZE,
) -> torch.Tensor:
    """Batched :func:`paint_query_tensor`: ``(B, n, C)``, ``(B, n, 4)``, optional ``(B, n)``
    bool mask of real objects (padding rows False) → ``(B, C, size, size)``."""
    b, n, c = embeddings.shape
    grid = size * _UPSAMPLE
    if n == 0:
        return embeddings.new_zeros((b, c, size, size))
    masks = box_masks(boxes.reshape(-1, 4).to(embeddings.dtype), grid).reshape(b, n, grid, grid)
    if valid is not None:
        masks = masks * valid.to(masks.dtype)[:, :, None, None]
    kappa = masks.sum(dim=1, keepdim=True).clamp(min=1.0)
    weights = masks / kappa
    painted = torch.einsum("bnc,bnhw->bchw", embeddings, weights)
    return F.max_pool2d(painted, kernel_size=_UPSAMPLE, stride=_UPSAMPLE)
