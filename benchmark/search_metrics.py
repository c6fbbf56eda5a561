"""Retrieval metrics of the search benchmark, as ``../shared/docs/method-notes.md`` fixes them.

- Relevance (paper eq. 9): R(Q, I) = mean over query boxes of the max over image boxes of
  [same class]·IoU, boxes in canvas fractions.
- AP@K = (1/D) Σ_{k≤K} P(k)·rel(k), rel = [R > τ], **D = min(K, relevant items in the whole
  collection)**; a query with no relevant item is left out of the mean (and counted).
- NDCG@K: gains R where R > τ else 0 (linear; ``exponential=True`` for 2^g − 1), the ideal DCG
  from the relevances of the **whole collection** sorted.
- P@K: the share of the top K with R > τ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "D_DEFINITION",
    "average_precision_at_k",
    "iou_matrix",
    "ndcg_at_k",
    "precision_at_k",
    "relevance",
]

D_DEFINITION = (
    "AP@K = (1/D)·Σ_{k≤K} P(k)·rel(k) with D = min(K, number of relevant images in the whole "
    "searched collection); rel = [R > τ]. Queries with no relevant image are left out."
)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``(n, 4)`` × ``(m, 4)`` (xyxy)."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def relevance(
    query_boxes: np.ndarray,
    query_labels: np.ndarray,
    image_boxes: Sequence[np.ndarray],
    image_labels: Sequence[np.ndarray],
) -> np.ndarray:
    """R(Q, I) for one query against every image: ``(N,)`` in [0, 1]."""
    out = np.zeros(len(image_boxes))
    qb = np.asarray(query_boxes).reshape(-1, 4)
    ql = np.asarray(query_labels).reshape(-1)
    for i, (boxes, labels) in enumerate(zip(image_boxes, image_labels, strict=True)):
        if len(boxes) == 0 or len(qb) == 0:
            continue
        same = ql[:, None] == np.asarray(labels)[None, :]
        out[i] = (iou_matrix(qb, boxes) * same).max(axis=1).mean()
    return out


def average_precision_at_k(ranking: np.ndarray, rel: np.ndarray, k: int, tau: float) -> float:
    """AP@K of ``ranking`` (image indices, best first) under relevances ``rel`` (all images);
    NaN when no image of the collection is relevant."""
    binary = np.asarray(rel) > tau
    total = int(binary.sum())
    if total == 0:
        return float("nan")
    hits = binary[np.asarray(ranking)[:k]]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / min(k, total))


def ndcg_at_k(
    ranking: np.ndarray, rel: np.ndarray, k: int, tau: float, exponential: bool = False
) -> float:
    """NDCG@K with gains R (R ≤ τ → 0) and the ideal DCG over the whole collection; NaN when
    every gain is 0."""
    gains = np.where(np.asarray(rel) > tau, np.asarray(rel, np.float64), 0.0)
    if exponential:
        gains = np.power(2.0, gains) - 1.0
    ideal = np.sort(gains)[::-1][:k]
    if ideal.sum() <= 0:
        return float("nan")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    got = gains[np.asarray(ranking)[:k]]
    return float((got * discounts[: len(got)]).sum() / (ideal * discounts[: len(ideal)]).sum())


def precision_at_k(ranking: np.ndarray, rel: np.ndarray, k: int, tau: float) -> float:
    """Share of the top K with R > τ (a ranking shorter than K misses the rest: over K)."""
    top = np.asarray(rel)[np.asarray(ranking)[:k]]
    return float((top > tau).sum() / k) if k > 0 else float("nan")
