"""Place new items into an existing order without recomputing it.

Choice (documented in ``docs/ordering.md``): **insert each new item by the same rule, relative to
the existing order**, and only into the part that is still open (positions ``≥ frozen``: after
the labelled/served prefix). For the greedy strategies, the item at position ``p`` was picked
because its distance to the list ``order[:p]`` was the largest (dissimilar) or smallest (similar)
at that step; a new item ``x`` goes before the first ``p`` at which it would have won that step
(ties by index, like the full order). The existing items keep their relative order and their
recorded pick distances: the order is the one a full recomputation would give for the first
insertion point, and an approximation after it (later picks would have seen ``x`` in the list).
``random`` inserts at seeded uniform positions, ``temporal`` by key.

Cost per new item: its distance to every ordered item (one matrix product per block of new
items) and one pass over the order, ``O(N·d)`` — not the ``O(N²·d)`` of a full recomputation.
Many new items at once (say more than a fifth of the pool) are better served by a new order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backend.ordering.greedy import exact_sq_distances
from backend.ordering.strategies import SEARCH_ORDER, OrderResult, check_strategy, natural_key

_BLOCK = 256
#: Width, relative to a row's largest distance, of the band around the running minimum inside
#: which :func:`_exact_running_min` recomputes distances exactly: well over the float32 error of
#: :func:`_distances` (about ``sqrt(1e-7)`` of the vectors' scale for near-equal vectors).
_EXACT_BAND = 1e-3


def _distances(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(rows), N)`` from ``features[rows]`` to every feature row.

    float32 products on centred vectors, combined in float64 (about 1e-6 relative): enough to
    place an item, which is a heuristic step anyway.
    """
    x = np.asarray(features, np.float32)
    mean = x.mean(axis=0, dtype=np.float64)
    xc = (x.astype(np.float64) - mean).astype(np.float32)
    n2 = np.einsum("ij,ij->i", xc, xc, dtype=np.float64)
    dots = (xc[rows] @ xc.T).astype(np.float64)
    d2 = n2[rows, None] + n2[None, :] - 2.0 * dots
    d2[np.arange(len(rows)), rows] = 0.0
    return np.sqrt(np.maximum(d2, 0.0))


def extend_order(
    order: Sequence[int],
    distance: Sequence[float],
    new: Sequence[int],
    strategy: str,
    *,
    features: np.ndarray | None = None,
    keys: Sequence[Any] | None = None,
    frozen: int = 0,
    seed: int = 0,
) -> OrderResult:
    """Insert the items ``new`` (indices not in ``order``) into ``order``.

    Args:
        order: existing order (item indices into ``features`` / ``keys``).
        distance: pick distances aligned with ``order`` (NaN where unknown, e.g. start items).
        new: items to place, processed in ascending index order.
        strategy: the order's strategy.
        features: ``(N, d)`` rows for every index used (greedy strategies).
        keys: per-index sort keys (temporal).
        frozen: positions before this stay in front of every new item (labelled prefix).
        seed: seeds the ``random`` insertion positions.
    Returns the new order and its pick distances (a new item's distance is its distance to the
    items before it; for non-greedy strategies NaN).
    """
    cur = [int(i) for i in order]
    dist = [float(v) for v in distance]
    if len(dist) != len(cur):
        raise ValueError("order and distance differ in length")
    present = set(cur)
    todo = sorted({int(i) for i in new} - present)
    if strategy == SEARCH_ORDER:  # a search's order: nothing to place by, so the end
        return OrderResult(
            np.array(cur + todo, np.int64), np.array(dist + [float("nan")] * len(todo))
        )
    strat = check_strategy(strategy)
    frozen = max(0, min(frozen, len(cur)))
    if strat == "random":
        rng = np.random.default_rng(seed)
        for x in todo:
            p = int(rng.integers(frozen, len(cur) + 1))
            cur.insert(p, x)
            dist.insert(p, float("nan"))
    elif strat == "temporal":
        if keys is None:
            raise ValueError("temporal insertion needs keys")
        for x in todo:
            kx = (natural_key(keys[x]), x)
            p = next(
                (q for q in range(frozen, len(cur)) if (natural_key(keys[cur[q]]), cur[q]) > kx),
                len(cur),
            )
            cur.insert(p, x)
            dist.insert(p, float("nan"))
    else:
        if features is None:
            raise ValueError(f"{strat} insertion needs features")
        feats = np.asarray(features, np.float32)
        for s in range(0, len(todo), _BLOCK):
            block = np.array(todo[s : s + _BLOCK], np.int64)
            table = _distances(feats, block)
            for r, x in enumerate(block.tolist()):
                to_items = _exact_running_min(table[r, np.asarray(cur, np.int64)], feats, cur, x)
                p, value = _greedy_position(to_items, cur, dist, x, frozen, strat)
                cur.insert(p, x)
                dist.insert(p, value)
    return OrderResult(np.array(cur, np.int64), np.array(dist, np.float64))


def _exact_running_min(
    approx: np.ndarray, features: np.ndarray, cur: list[int], x: int
) -> np.ndarray:
    """``approx`` (distances of ``x`` to the items ``cur``) with every value that may set the
    running minimum recomputed exactly, as the full order computes it (``exact_sq_distances``).

    Why: the full order compares exact float64 distances, so a copy of an ordered image ties its
    twin's pick distance and loses the tie by index; compared in float32 precision it won by
    1e-8 and went in front of its twin. Values outside the band stay approximate: they are above
    the running minimum whatever their error, so they never set it.
    """
    if not len(approx):
        return approx
    band = _EXACT_BAND * float(np.max(approx))
    running = np.minimum.accumulate(approx)
    near = np.flatnonzero(approx <= running + band)
    exact = approx.copy()
    rows = features[np.asarray(cur, np.int64)[near]]
    exact[near] = np.sqrt(exact_sq_distances(rows, features[x]))
    return exact


def _greedy_position(
    to_items: np.ndarray, cur: list[int], dist: list[float], x: int, frozen: int, strategy: str
) -> tuple[int, float]:
    """First open position where ``x`` would have won the greedy step, and its distance there;
    ``to_items``: its distances to the items of ``cur``."""
    if not cur:
        return 0, float("nan")
    before = np.empty(len(cur) + 1)
    before[0] = np.inf
    np.minimum.accumulate(to_items, out=before[1:])  # before[p] = distance of x to cur[:p]
    at = np.asarray(dist)
    idx = np.asarray(cur)
    cand = before[:-1]
    with np.errstate(invalid="ignore"):
        if strategy == "dissimilar":
            wins = (cand > at) | ((cand == at) & (x < idx))
        else:
            wins = (cand < at) | ((cand == at) & (x < idx))
    wins[: max(frozen, 1)] = False  # never in front of the frozen prefix or the first item
    wins &= ~np.isnan(at)  # start items (NaN) are never displaced
    hit = np.flatnonzero(wins)
    p = int(hit[0]) if len(hit) else len(cur)
    return p, float(before[p])
