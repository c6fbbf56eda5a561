"""Informativeness of boxes and images, and the top-K selection of an episode.

Box measures (higher = query first), from a box's distribution over "class c" (objectness ×
class score, P_c) and "no class" (the rest, 1 − Σ_c P_c). YOLOX's class scores are independent
sigmoids: where the P_c sum past 1 they are scaled down to sum to 1 (and "no class" is 0). The
rest is not renormalised away: a single-class box is [P, 1 − P] whatever its objectness, so a box
of objectness 1 and class score 0.3 is as doubtful to entropy and margin as to uncertainty.

* ``random``: a seeded permutation (the baseline);
* ``uncertainty``: 1 − P, P the highest class probability (the paper's measure);
* ``entropy``: Shannon entropy of the distribution;
* ``margin``: 1 − (p₁ − p₂), the two most likely outcomes;
* ``coreset``: greedy k-center (farthest-first) on box features, from the boxes already
  labelled — the ordering package's exact incremental engine
  (:func:`backend.ordering.greedy.greedy_order`), stopped after K picks.

Image-level baselines use the same measures: an image scores the mean of its boxes (an image
without predicted boxes scores 0), and image-level core-set runs farthest-first on image
features from the labelled images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from backend.active.pool import BoxPool
from backend.ordering.greedy import greedy_order
from backend.ordering.strategies import seed_indices

__all__ = [
    "MEASURES",
    "Measure",
    "box_scores",
    "check_measure",
    "image_scores",
    "select_boxes",
    "select_images",
]

Measure = Literal["random", "uncertainty", "entropy", "margin", "coreset"]
MEASURES: tuple[str, ...] = get_args(Measure)


def check_measure(name: str) -> Measure:
    """``name`` as a :data:`Measure`, or a ``ValueError`` naming the choices."""
    if name not in MEASURES:
        raise ValueError(f"unknown measure {name!r}; choose one of {', '.join(MEASURES)}")
    return name  # type: ignore[return-value]


def _outcomes(pool: BoxPool) -> np.ndarray:
    """``(N, C + 1)`` distribution over the classes and "no class", rows summing to 1.

    The class outcomes are objectness × class score, scaled down only where they sum past 1
    (independent sigmoids may); "no class" takes what they leave. Renormalising
    ``[P_c, 1 − objectness]`` instead dropped the share objectness × (1 − Σ class scores): at
    objectness 1 a single-class box was [1, 0], "certain", whatever its class score.
    """
    classes = np.clip(np.asarray(pool.class_probs, np.float64), 0.0, None)
    total = classes.sum(axis=1, keepdims=True)
    classes = classes / np.maximum(total, 1.0)
    rest = np.clip(1.0 - classes.sum(axis=1, keepdims=True), 0.0, None)
    return np.concatenate([classes, rest], axis=1)


def box_scores(pool: BoxPool, measure: Measure, seed: int = 0) -> np.ndarray:
    """Informativeness of every box of ``pool`` (not ``coreset``: that is a selection rule)."""
    if measure == "random":
        return np.random.default_rng(seed).random(len(pool))
    if measure == "uncertainty":
        return 1.0 - pool.scores.astype(np.float64)
    if measure == "coreset":
        raise ValueError("coreset has no per-box score: use select_boxes")
    dist = _outcomes(pool)
    if measure == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(dist > 0, np.log(dist), 0.0)
        return -(dist * logs).sum(axis=1)
    if measure == "margin":
        if dist.shape[1] < 2:
            return np.zeros(len(pool))
        top2 = -np.partition(-dist, 1, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - top2[:, 1])
    raise ValueError(f"unknown measure {measure!r}")


def _top(scores: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates of highest score (ties → lower index), best first."""
    if k <= 0 or len(candidates) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


def select_boxes(
    pool: BoxPool,
    measure: Measure,
    k: int,
    *,
    eligible: np.ndarray | None = None,
    labeled_features: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Rows of ``pool`` to query this episode, most informative first.

    ``eligible`` (bool ``(N,)``) masks the boxes that may still be queried. ``labeled_features``
    are the features of the boxes labelled so far (L_B), the core-set's starting list.
    """
    check_measure(measure)
    mask = np.ones(len(pool), bool) if eligible is None else np.asarray(eligible, bool)
    candidates = np.flatnonzero(mask)
    if measure != "coreset":
        return _top(box_scores(pool, measure, seed), candidates, k)
    if pool.features is None:
        raise ValueError("coreset needs box features: build the pool with with_features=True")
    return _farthest_first(pool.features[candidates], labeled_features, k, seed, candidates)


def _farthest_first(
    features: np.ndarray,
    labeled: np.ndarray | None,
    k: int,
    seed: int,
    ids: np.ndarray,
) -> np.ndarray:
    """``k`` of ``ids`` (rows of ``features``) by farthest-first from ``labeled``.

    With nothing labelled the first pick is a ``seed``-drawn candidate (the ordering package's
    seeded start), counted as the first of the ``k``: :func:`greedy_order` from an empty list
    always starts at row 0, so every seed began with the same candidate.
    """
    if k <= 0 or len(ids) == 0:
        return np.zeros(0, np.int64)
    feats = np.asarray(features, np.float32)
    picks_wanted = min(k, len(ids))
    if labeled is not None and len(labeled):
        feats = np.concatenate([np.asarray(labeled, np.float32), feats])
        start = list(range(len(labeled)))
        offset, limit = len(labeled), picks_wanted
    else:
        start = seed_indices(len(ids), 1, seed)  # the first pick
        offset, limit = 0, picks_wanted - 1
    result = greedy_order(feats, "dissimilar", start, seed=seed, limit=limit)
    picks = [int(i) - offset for i in result.order[offset:]]
    return ids[np.asarray(picks, np.int64)]


def image_scores(pool: BoxPool, measure: Measure, n_images: int, seed: int = 0) -> np.ndarray:
    """Mean box informativeness of each image (0 for an image with no predicted box)."""
    if measure == "random":
        return np.random.default_rng(seed).random(n_images)
    scores = box_scores(pool, measure, seed)
    total = np.bincount(pool.image, weights=scores, minlength=n_images)
    count = np.bincount(pool.image, minlength=n_images)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def select_images(
    candidates: Sequence[int],
    measure: Measure,
    k: int,
    *,
    pool: BoxPool | None = None,
    n_images: int | None = None,
    image_features: np.ndarray | None = None,
    labeled_images: Sequence[int] = (),
    seed: int = 0,
) -> np.ndarray:
    """Up to ``k`` of the images ``candidates`` to label fully, most informative first.

    ``coreset`` runs farthest-first over ``image_features`` (rows = all images) from
    ``labeled_images``; the other measures rank by :func:`image_scores` over ``pool``.
    """
    check_measure(measure)
    ids = np.asarray(list(candidates), np.int64)
    if measure == "coreset":
        if image_features is None:
            raise ValueError("image-level coreset needs image features")
        labeled = image_features[np.asarray(list(labeled_images), np.int64)]
        return _farthest_first(image_features[ids], labeled, k, seed, ids)
    if measure == "random":
        scores = np.random.default_rng(seed).random(int(ids.max(initial=-1)) + 1)
    else:
        if pool is None or n_images is None:
            raise ValueError(f"image-level {measure} needs the box pool and the image count")
        scores = image_scores(pool, measure, n_images, seed)
    return _top(scores, ids, k)
