"""Queue orders of a pool of images: random, similar, dissimilar, temporal (paper §3.2).

Every strategy returns a permutation of ``0..N-1`` whose first entries are the *start list*:
``start_indices`` when given and non-empty (e.g. the tasks already labelled, in the given order),
otherwise ``n_seed`` seed items drawn at random with ``seed`` (not for ``temporal``, which starts
at the earliest item). The rest follows the strategy:

* ``random`` — a seeded shuffle of the rest;
* ``dissimilar`` — farthest-first: each next item is the one whose minimum Euclidean distance to
  the items already in the list is largest;
* ``similar`` — nearest-first: the one whose minimum distance to the list is smallest;
* ``temporal`` — by ``keys`` (a task data field, or file names), natural order, ties by index.

"Distance of an item to the list" is read as the minimum over list members of the Euclidean
distance (the paper leaves the set distance open); ties go to the lowest index. The greedy orders
are exact (see :mod:`backend.ordering.greedy`) and need no N×N matrix. ``pca_dim`` first projects
the features on their top principal components; the order is then exact for those projections.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast, get_args

import numpy as np

from backend.ordering.greedy import greedy_order
from backend.settings import OrderStrategy

Strategy = OrderStrategy  # defined with the settings, whose BOXLOOP_ORDER_STRATEGY it types
STRATEGIES: tuple[str, ...] = get_args(Strategy)
#: Strategies that need feature vectors.
FEATURE_STRATEGIES: tuple[str, ...] = ("similar", "dissimilar")
#: The stored strategy of an order a search made on a project that had none (its hits first,
#: then the other tasks): no strategy to build with, so new tasks go to its end.
SEARCH_ORDER = "search"


@dataclass(frozen=True)
class OrderResult:
    """An order and, for greedy strategies, each item's distance to the list when it was picked.

    ``distance`` is NaN for start items and for non-greedy strategies. :func:`extend_order` uses it
    to insert new items by the same rule.
    """

    order: np.ndarray
    distance: np.ndarray


def check_strategy(strategy: str) -> Strategy:
    if strategy not in STRATEGIES:
        raise ValueError(
            f"unknown ordering strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    return cast(Strategy, strategy)


def seed_indices(n: int, n_seed: int, seed: int) -> list[int]:
    """``n_seed`` distinct random indices (the paper's "randomly selected few images")."""
    if n_seed < 0:
        raise ValueError("n_seed must be >= 0")
    k = min(n, n_seed)
    return [int(i) for i in np.random.default_rng(seed).choice(n, size=k, replace=False)]


def reduce_dim(features: np.ndarray, dim: int | None) -> np.ndarray:
    """Project on the top ``dim`` principal components (float32); unchanged if ``dim`` ≥ d.

    Deterministic: exact covariance eigendecomposition in float64, each component's sign fixed
    so that its largest-magnitude coefficient is positive.
    """
    x = np.asarray(features, dtype=np.float32)
    if dim is None or x.ndim != 2 or dim >= x.shape[1] or len(x) == 0:
        return x
    if dim < 1:
        raise ValueError("pca_dim must be >= 1")
    mean = x.mean(axis=0, dtype=np.float64)
    d = x.shape[1]
    cov = np.zeros((d, d))
    for s in range(0, len(x), 8192):
        block = x[s : s + 8192].astype(np.float64) - mean
        cov += block.T @ block
    _, vecs = np.linalg.eigh(cov)
    comps = vecs[:, ::-1][:, :dim]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(dim)])
    comps *= np.where(signs == 0, 1.0, signs)
    out = np.empty((len(x), dim), np.float32)
    for s in range(0, len(x), 8192):
        out[s : s + 8192] = (x[s : s + 8192].astype(np.float64) - mean) @ comps
    return out


_DIGITS = re.compile(r"(\d+)")


def natural_key(value: Any) -> tuple[Any, ...]:
    """Sort key: numbers numerically, strings naturally ("img2" < "img10"), missing (None) last."""
    if value is None:
        return (2,)
    if isinstance(value, bool):
        return (0, float(value))
    if isinstance(value, int | float | np.integer | np.floating):
        return (0, float(value))
    parts = _DIGITS.split(str(value))
    return (1, tuple(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), str(value))


def temporal_order(keys: Sequence[Any], exclude: Sequence[int] = ()) -> list[int]:
    """Indices sorted by :func:`natural_key` of ``keys``, ties by index, ``exclude`` left out."""
    skip = set(int(i) for i in exclude)
    rest = [i for i in range(len(keys)) if i not in skip]
    return sorted(rest, key=lambda i: (natural_key(keys[i]), i))


def order_pool_result(
    features: np.ndarray | None,
    strategy: str,
    *,
    seed: int = 0,
    n_seed: int = 1,
    start_indices: Sequence[int] | None = None,
    keys: Sequence[Any] | None = None,
    pca_dim: int | None = None,
    n: int | None = None,
    progress: bool = False,
) -> OrderResult:
    """:func:`order_pool` with the pick distances (for :func:`extend_order`)."""
    strat = check_strategy(strategy)
    size = _pool_size(features, keys, n)
    if strat in FEATURE_STRATEGIES and features is None:
        raise ValueError(f"strategy {strat!r} needs features")
    if strat == "temporal" and keys is None:
        raise ValueError("strategy 'temporal' needs keys (a task field or file names)")
    if start_indices:
        start = [int(i) for i in start_indices]
    elif strat == "temporal":  # time order has no use for random seeds
        start = []
    else:
        start = seed_indices(size, n_seed, seed)
    if len(set(start)) != len(start) or any(i < 0 or i >= size for i in start):
        raise ValueError(f"start indices must be distinct and within 0..{size - 1}")
    nan = np.full(size, np.nan)
    if strat == "random":
        taken = set(start)
        rest = np.array([i for i in range(size) if i not in taken], np.int64)
        rest = rest[np.random.default_rng(seed).permutation(len(rest))]
        return OrderResult(np.concatenate([np.array(start, np.int64), rest]), nan)
    if strat == "temporal":
        assert keys is not None
        rest_list = temporal_order(keys, exclude=start)
        return OrderResult(np.array(start + rest_list, np.int64), nan)
    assert features is not None
    feats = reduce_dim(np.asarray(features, np.float32), pca_dim)
    result = greedy_order(feats, cast(Any, strat), start, seed=seed, progress=progress)
    return OrderResult(result.order, result.distance)


def order_pool(
    features: np.ndarray | None,
    strategy: str,
    *,
    seed: int = 0,
    n_seed: int = 1,
    start_indices: Sequence[int] | None = None,
    keys: Sequence[Any] | None = None,
    pca_dim: int | None = None,
    n: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Order a pool of ``N`` items; returns a permutation of ``0..N-1`` (int64), start list first.

    Args:
        features: ``(N, d)`` vectors; needed for ``similar``/``dissimilar``, else may be None.
        strategy: ``random``, ``similar``, ``dissimilar`` or ``temporal``.
        seed: seeds the random start items and the ``random`` shuffle.
        n_seed: number of random start items when ``start_indices`` is empty (paper: "a few");
            ignored by ``temporal``.
        start_indices: the start list (e.g. already-labelled items), in order; overrides seeds.
        keys: per-item sort keys for ``temporal`` (None sorts last).
        pca_dim: project features on this many principal components first (speed).
        n: pool size when neither ``features`` nor ``keys`` give it (``random``).
        progress: show a progress bar during greedy ordering.
    """
    return order_pool_result(
        features,
        strategy,
        seed=seed,
        n_seed=n_seed,
        start_indices=start_indices,
        keys=keys,
        pca_dim=pca_dim,
        n=n,
        progress=progress,
    ).order


def batches(order: Sequence[int] | np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive batches of ``batch_size`` (the last may be shorter), following the order."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    arr = np.asarray(order, np.int64)
    return [arr[s : s + batch_size] for s in range(0, len(arr), batch_size)]


def _pool_size(features: np.ndarray | None, keys: Sequence[Any] | None, n: int | None) -> int:
    sizes = {
        int(s)
        for s in (
            None if features is None else np.asarray(features).shape[0],
            None if keys is None else len(keys),
            n,
        )
        if s is not None
    }
    if not sizes:
        raise ValueError("pool size unknown: pass features, keys or n")
    if len(sizes) > 1:
        raise ValueError(f"features, keys and n disagree on the pool size: {sorted(sizes)}")
    return sizes.pop()
