"""Exact greedy "dissimilar" (farthest-first) and "similar" (nearest-first) orders, no N×N matrix.

The rule (paper §3.2, our reading): the list starts with some items; the *distance of an item to
the list* is the minimum Euclidean distance to any list member; *dissimilar* appends the unlisted
item with the largest such distance, *similar* the one with the smallest; ties go to the lowest
index. Picks only ever lower an item's distance to the list.

Exact values. Every distance that decides a pick is a float64 squared distance computed from the
original float32 vectors by :func:`exact_sq_distances`; equal vectors give bit-equal values, so
ties are real ties and the order equals the one read off a float64 pairwise matrix.

Why it is fast. Almost all of the ``N²`` pair distances never decide anything; the engine rules
them out with cheap, *rigorous* lower bounds and computes exactly only what survives:

1. An orthonormal projection never lengthens a vector, so distances between top PCA coordinates
   are lower bounds of true distances. A float32 matrix product (BLAS-3) on the first ``k1``
   coordinates tests a whole block of picks against all items at once.
2. Pairs that pass are tested again on ``k2 ≥ k1`` PCA coordinates, then on all ``d`` centred
   float32 coordinates, and only the survivors are computed in float64.
3. (Dissimilar.) Items are grouped by k-means in the projected space; by the triangle inequality
   a group whose ball lies farther from a pick than its largest running distance is skipped
   without any product. This pays on clustered, low-dimensional features only.

Every float32 test carries a proven bound on its rounding error (``γ_n = n·u/(1−n·u)`` for an
``n``-term dot product, plus the rounding of the stored coordinates), so a pair is skipped only
when it provably cannot change the result.

*Dissimilar* (farthest-first) keeps the running minimum ``m_i`` of every item exactly. The ``T``
largest ``m`` are candidates; every other item has ``m ≤ θ`` (the largest among the rest) and can
only fall, so a mini farthest-first among the candidates is the true order while its picks stay
``> θ``. The whole block of picks is then applied to all items with step 1 above.

*Similar* (nearest-first) is Prim's algorithm: the next item is the end of the shortest edge
from the list to the rest. Each item gets a list of its nearest neighbours (exact distances,
complete below a proven radius); a heap holds, for every listed item, its nearest unlisted
neighbour, or a marker at the radius when its list runs out (then the list is refilled among the
unlisted items). Items far from the list are never touched. The lists need full-dimensional
float32 products (``O(N²·d)``, BLAS-3): nearest-neighbour distances of real CNN features are too
concentrated for a projection to certify them. Reduce ``d`` first (PCA) for large pools.

Dissimilar costs ``O(N²·k1)`` for the bounds plus the exact work, which depends on the data: the
more dimensions the features really use, the more pairs survive the bounds.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import faiss
import numpy as np
from tqdm.auto import tqdm

GreedyMode = Literal["dissimilar", "similar"]

_U32 = 2.0**-24  # float32 unit roundoff
_REL_SLACK = 1e-9  # relative slack on compared distances: dwarfs float64 rounding
_PAIR_CHUNK = 4096  # pairs per exact float64 recomputation (bounds temporary memory)
_ROW_CHUNK = 4096  # rows per bound matrix product
_SUB_BLOCK = 64  # picks applied together (keeps thresholds current when early picks lower a lot)


@dataclass(frozen=True)
class GreedyResult:
    """``order``: all indices, start items first. ``distance[k]``: Euclidean distance of
    ``order[k]`` to the list when it was picked (NaN for start items and for a first pick made
    with no start, whose distance is undefined)."""

    order: np.ndarray
    distance: np.ndarray


def exact_sq_distances(rows: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Row-wise squared Euclidean distances in float64 between float32 vectors.

    ``others`` is one vector or one vector per row. Differences of float32 values are exact in
    float64 and every row is reduced the same way, so equal inputs give bit-equal outputs.
    """
    diff = rows.astype(np.float64) - others.astype(np.float64)
    diff *= diff
    return np.asarray(diff.sum(axis=1))


def _gamma(n: int) -> float:
    """Higham's γ_n for float32: relative error bound of an n-term sum of products."""
    return n * _U32 / (1.0 - n * _U32)


def _pca_basis(x: np.ndarray, mean: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Approximate top-``k`` principal directions as orthonormal float64 rows.

    Randomised subspace iteration on at most 8,000 rows: ``O(n·d·k)``, no ``d×d`` eigensolve.
    Only the tightness of the bounds depends on the basis, never the order.
    """
    n, d = x.shape
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, 8_000, replace=False)) if n > 8_000 else np.arange(n)
    sample = x[rows].astype(np.float64) - mean
    q = rng.standard_normal((d, min(d, k + 16)))
    for _ in range(2):
        q, _ = np.linalg.qr(sample.T @ (sample @ q))
    projected = sample @ q  # Rayleigh-Ritz: leading directions first
    _, vecs = np.linalg.eigh(projected.T @ projected)
    basis, _ = np.linalg.qr(q @ vecs[:, ::-1][:, :k])  # orthonormal to float64 precision
    return np.ascontiguousarray(basis.T)


class _Space:
    """float32 coordinates plus a proven lower bound on the true distance between two items.

    ``coords[i]`` approximates an isometric-or-shrinking image of ``x_i`` (centred, maybe
    projected) with error at most ``u·|coords[i]|`` + float64 slop. For rows ``r`` and an item
    ``p``: true ``d(r, p) ≥ sqrt(|a|² + |b|² − 2 a·b − γ·2|a||b|) − τ``.
    """

    def __init__(self, coords: np.ndarray, slop: float) -> None:
        self.coords = coords
        self.n2 = np.einsum("ij,ij->i", coords, coords, dtype=np.float64)
        self.norm = np.sqrt(self.n2)
        self.gamma2 = 2.0 * _gamma(coords.shape[1]) * 1.01
        self.tau = 2.0 * (_U32 * float(self.norm.max(initial=0.0)) + slop) * 1.01 + 1e-30

    def lower(self, rows: np.ndarray, p: int) -> np.ndarray:
        dots = (self.coords[rows] @ self.coords[p]).astype(np.float64)
        low2 = (
            self.n2[rows] + self.n2[p] - 2.0 * dots - self.gamma2 * self.norm[rows] * self.norm[p]
        )
        return np.asarray(np.sqrt(np.maximum(low2, 0.0)) - self.tau)


class _Geometry:
    """The item vectors and the chain of bounds used to avoid exact distances."""

    def __init__(self, features: np.ndarray, k1: int, k2: int, seed: int) -> None:
        self.x = np.ascontiguousarray(features, dtype=np.float32)
        self.n, d = self.x.shape
        mean = self.x.mean(axis=0, dtype=np.float64)
        k2 = max(1, min(k2, d))
        self.k1 = max(1, min(k1, k2))
        basis = _pca_basis(self.x, mean, k2, seed) if k2 < d else None
        z = np.empty((self.n, k2), np.float32)
        centred_max = 0.0
        for s in range(0, self.n, _ROW_CHUNK):
            block = self.x[s : s + _ROW_CHUNK].astype(np.float64) - mean
            centred_max = max(centred_max, float(np.sqrt((block * block).sum(axis=1)).max()))
            z[s : s + _ROW_CHUNK] = block if basis is None else block @ basis.T
        slop = 1e-12 * centred_max + 1e-30  # float64 rounding of centring and projection
        self.proj = _Space(z, slop)
        self.first = _Space(np.ascontiguousarray(z[:, : self.k1]), slop)
        self.full: _Space | None = None
        if k2 < d:
            xc = np.empty_like(self.x)
            for s in range(0, self.n, _ROW_CHUNK):
                xc[s : s + _ROW_CHUNK] = self.x[s : s + _ROW_CHUNK].astype(np.float64) - mean
            self.full = _Space(xc, slop)
        # Stage-1 matrix: zaug[i] = [2·ẑ_i, 1], so zaug[i]·[ẑ_p, −|ẑ_p|²] = 2ẑ_i·ẑ_p − |ẑ_p|².
        k = self.k1
        self.zaug = np.empty((self.n, k + 1), np.float32)
        self.zaug[:, :k] = 2.0 * self.first.coords
        self.zaug[:, k] = 1.0
        self.stage1_gamma = (_gamma(k + 1) + _U32) * 1.01  # dot + rounding of stored |ẑ_p|²
        self.nzmax = float(self.first.norm.max(initial=0.0))

    # ---------------------------------------------------------------- stage 1 (matrix product)
    def columns(self, idx: np.ndarray) -> np.ndarray:
        cols = np.empty((self.k1 + 1, len(idx)), np.float32)
        cols[: self.k1] = self.first.coords[idx].T
        cols[self.k1] = -self.first.n2[idx].astype(np.float32)
        return cols

    def thresholds(self, rows: slice | np.ndarray, m: np.ndarray) -> np.ndarray:
        """float32 per-row thresholds: a stage-1 product below it proves ``d(i, p)² ≥ m_i``.

        In exact arithmetic the projected pair is within ``r`` iff ``2ẑ_i·ẑ_p − |ẑ_p|² ≥
        |ẑ_i|² − r²``; the computed product may be off by ``γ(2|ẑ_i||ẑ_p| + |ẑ_p|²)``, bounded
        with the largest norm of any item. ``m = 0`` cannot fall (+inf); ``m = inf`` always passes.
        """
        nz, nz2 = self.first.norm[rows], self.first.n2[rows]
        reach = np.sqrt(m) * (1.0 + _REL_SLACK) + self.first.tau
        margin = self.stage1_gamma * (2.0 * nz * self.nzmax + self.nzmax * self.nzmax) + 1e-30
        t = nz2 - reach * reach - margin
        t[m == 0] = np.inf
        return np.nextafter(t.astype(np.float32), np.float32(-np.inf))

    # ---------------------------------------------------------------- stages 2-4 (pairs)
    def survivors(self, rows: np.ndarray, p: int, limit2: np.ndarray) -> np.ndarray:
        """Indices into ``rows`` whose squared distance to ``p`` may be ``≤ limit2``."""
        limit = np.sqrt(limit2) * (1.0 + _REL_SLACK)
        keep = np.flatnonzero(self.proj.lower(rows, p) <= limit)
        if self.full is not None and len(keep):
            keep = keep[self.full.lower(rows[keep], p) <= limit[keep]]
        return keep


# ==================================================================== dissimilar
class _Groups:
    """A partition of the items into k-means groups of the stage-1 space, for whole-group skips.

    In the projected space (a lower bound of true distances) the triangle inequality gives, for a
    pick ``c`` and a group with anchor ``g`` and radius ``ρ_max``: every member is at least
    ``d(c, g) − ρ_max`` away. When that exceeds ``sqrt(max m)`` of the group, the pick changes
    nothing there and the group's rows are not even multiplied. Clustered features skip most
    groups; features spread over many dimensions skip few (then the full product is used).
    """

    def __init__(self, geo: _Geometry, seed: int) -> None:
        coords = geo.first.coords
        n = len(coords)
        self.count = max(1, min(1024, n // 200))
        anchors, assign = _kmeans(coords, self.count, seed)
        self.perm = np.argsort(assign, kind="stable")
        self.pos = np.empty(n, np.int64)
        self.pos[self.perm] = np.arange(n)
        sorted_assign = assign[self.perm]
        used = np.unique(sorted_assign)
        self.anchors = np.ascontiguousarray(anchors[used])
        self.start = np.searchsorted(sorted_assign, used, side="left")
        self.end = np.searchsorted(sorted_assign, used, side="right")
        self.of = np.empty(n, np.int64)  # group of each original item
        for g, (s, e) in enumerate(zip(self.start, self.end, strict=True)):
            self.of[self.perm[s:e]] = g
        self.count = len(used)
        diff = (
            coords[self.perm].astype(np.float64)
            - self.anchors[np.repeat(np.arange(self.count), self.end - self.start)]
        )
        rho = np.sqrt((diff * diff).sum(axis=1))
        self.rho_max = np.maximum.reduceat(rho, self.start)
        self.zaug = np.ascontiguousarray(geo.zaug[self.perm])
        self.a2 = np.einsum("ij,ij->i", self.anchors, self.anchors, dtype=np.float64)
        self.a = np.sqrt(self.a2)
        self.gamma2 = 2.0 * _gamma(coords.shape[1]) * 1.01
        # anchors are float32 vectors of the same space: the stored-coordinate slop covers them
        self.tau = geo.first.tau + 1e-12 * float(
            self.a.max(initial=0.0) + geo.first.norm.max(initial=0.0)
        )

    def live(self, geo: _Geometry, picks: np.ndarray, m_max: np.ndarray) -> np.ndarray:
        """``(groups, picks)`` mask: the pick may lower some ``m`` in the group."""
        z = geo.first.coords[picks]
        dots = (self.anchors @ z.T).astype(np.float64)
        nz2, nz = geo.first.n2[picks], geo.first.norm[picks]
        d2 = (
            self.a2[:, None]
            + nz2[None, :]
            - 2.0 * dots
            - self.gamma2 * self.a[:, None] * nz[None, :]
        )
        low = np.sqrt(np.maximum(d2, 0.0)) - self.tau - self.rho_max[:, None]
        reach = np.sqrt(m_max) * (1.0 + _REL_SLACK) + self.tau
        return np.asarray(low <= reach[:, None])


def _kmeans(coords: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchors and assignment (faiss k-means on a sample); only speed depends on them."""
    n, d = coords.shape
    if count <= 1:
        return coords.mean(axis=0, keepdims=True).astype(np.float32), np.zeros(n, np.int64)
    km = faiss.Kmeans(d, count, niter=6, seed=seed, max_points_per_centroid=32, verbose=False)
    km.train(np.ascontiguousarray(coords, dtype=np.float32))
    _, assign = km.index.search(np.ascontiguousarray(coords, dtype=np.float32), 1)
    return np.ascontiguousarray(km.centroids, dtype=np.float32), assign[:, 0].astype(np.int64)


class _RunningMin:
    """Exact running minimum ``m`` (float64 squared) of every item's distance to the list.

    ``t`` caches each row's stage-1 threshold (a function of ``m_i`` only), refreshed for the rows
    an update lowers, so applying picks costs one matrix product over ``k1+1`` columns — and none
    for the groups the picks provably cannot reach (:class:`_Groups`).
    """

    def __init__(self, geo: _Geometry, seed: int = 0) -> None:
        self.geo = geo
        self.m = np.full(geo.n, np.inf)
        self.t = np.full(geo.n, -np.inf, np.float32)  # in group order (self.groups.perm)
        self.free = np.ones(geo.n, bool)
        self.started = False
        self.groups = _Groups(geo, seed)
        self.m_max: np.ndarray = np.full(self.groups.count, np.inf)

    def add(self, picks: Sequence[int]) -> None:
        """Append ``picks`` to the list: lower every ``m_i`` that they lower, exactly."""
        arr = np.asarray(picks, np.int64)
        if not len(arr):
            return
        self.free[arr] = False
        if not self.started:
            first = int(arr[0])
            for s in range(0, self.geo.n, _ROW_CHUNK):
                rows = self.geo.x[s : s + _ROW_CHUNK]
                self.m[s : s + _ROW_CHUNK] = exact_sq_distances(rows, self.geo.x[first])
            g = self.groups
            self.t = self.geo.thresholds(g.perm, self.m[g.perm])
            self.m_max = np.maximum.reduceat(self.m[g.perm], g.start)
            self.started = True
            arr = arr[1:]
        for s in range(0, len(arr), _SUB_BLOCK):
            self._apply(arr[s : s + _SUB_BLOCK])

    def _apply(self, picks: np.ndarray) -> None:
        g = self.groups
        cols = self.geo.columns(picks)
        live = g.live(self.geo, picks, self.m_max)
        found_rows: list[np.ndarray] = []
        found_picks: list[np.ndarray] = []
        if live.mean() > 0.5:  # most groups reachable: one product over all rows is cheaper
            for s in range(0, self.geo.n, _ROW_CHUNK):
                e = min(self.geo.n, s + _ROW_CHUNK)
                rows, which = np.nonzero(g.zaug[s:e] @ cols >= self.t[s:e, None])
                found_rows.append(g.perm[rows + s])
                found_picks.append(picks[which])
        else:
            for k in np.flatnonzero(live.any(axis=1)).tolist():
                s, e = int(g.start[k]), int(g.end[k])
                sel = np.flatnonzero(live[k])
                rows, which = np.nonzero(g.zaug[s:e] @ cols[:, sel] >= self.t[s:e, None])
                found_rows.append(g.perm[rows + s])
                found_picks.append(picks[sel[which]])
        rows_all = np.concatenate(found_rows) if found_rows else np.zeros(0, np.int64)
        if len(rows_all):
            for k in self._pairs(rows_all, np.concatenate(found_picks)):
                s, e = int(g.start[k]), int(g.end[k])
                self.m_max[k] = self.m[g.perm[s:e]].max()

    def _pairs(self, rows: np.ndarray, picks: np.ndarray) -> set[int]:
        """Exact updates for candidate pairs; returns the groups whose ``m`` fell.

        Pairs are handled pick by pick (one gather of rows, one matrix-vector product per bound)
        in chunks, each tested against ``m`` as it was before the chunk (looser, still valid).
        """
        order = np.argsort(picks, kind="stable")
        rows, picks = rows[order], picks[order]
        cuts = np.flatnonzero(np.diff(picks)) + 1
        changed: list[np.ndarray] = []
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, len(rows)], strict=True):
            p = int(picks[s])
            for c in range(s, e, _PAIR_CHUNK):
                r = rows[c : min(e, c + _PAIR_CHUNK)]
                r = r[self.geo.survivors(r, p, self.m[r])]
                if not len(r):
                    continue
                exact = exact_sq_distances(self.geo.x[r], self.geo.x[p])
                lower = exact < self.m[r]
                if lower.any():
                    r = r[lower]
                    self.m[r] = exact[lower]
                    changed.append(r)
        if not changed:
            return set()
        done = np.unique(np.concatenate(changed))
        self.t[self.groups.pos[done]] = self.geo.thresholds(done, self.m[done])
        return set(self.groups.of[done].tolist())


class _Candidates:
    """The ``T`` items with the largest ``m``, with their own copies of ``m`` and thresholds.

    A mini farthest-first runs on them (module docstring); each pick lowers the copies exactly
    with the same bounds, on arrays gathered once per block.
    """

    def __init__(self, state: _RunningMin, cand: np.ndarray) -> None:
        self.geo = state.geo
        self.idx = cand
        self.m = state.m[cand].copy()
        self.t = state.t[state.groups.pos[cand]].copy()
        self.z = self.geo.zaug[cand]
        self.alive = np.ones(len(cand), bool)

    def take(self, j: int) -> None:
        """Remove candidate ``j`` (picked) and lower the others' copies for it."""
        self.alive[j] = False
        p = int(self.idx[j])
        hit = np.flatnonzero(
            (self.z @ self.geo.columns(np.array([p]))[:, 0] >= self.t) & self.alive
        )
        if len(hit):
            hit = hit[self.geo.survivors(self.idx[hit], p, self.m[hit])]
        if len(hit):
            exact = exact_sq_distances(self.geo.x[self.idx[hit]], self.geo.x[p])
            lower = exact < self.m[hit]
            hit = hit[lower]
            self.m[hit] = exact[lower]
            self.t[hit] = self.geo.thresholds(self.idx[hit], self.m[hit])


def _dissimilar_block(state: _RunningMin, block_size: int) -> list[tuple[int, float]]:
    """Next picks of farthest-first, as many as provably right (at least one)."""
    free_idx = np.flatnonzero(state.free)
    vals = state.m[free_idx]
    top = float(vals.max())
    if top == 0.0:  # only exact duplicates of list members remain: index order
        return [(int(i), 0.0) for i in free_idx]
    if len(free_idx) > block_size:
        part = np.argpartition(vals, len(vals) - block_size)
        cand_pos, theta = part[-block_size:], float(vals[part[:-block_size]].max())
    else:
        cand_pos, theta = np.arange(len(free_idx)), -np.inf
    cands = _Candidates(state, np.sort(free_idx[cand_pos]))
    picks: list[tuple[int, float]] = []
    while cands.alive.any():
        masked = np.where(cands.alive, cands.m, -1.0)
        j = int(np.argmax(masked))  # first maximum = lowest index among the candidates
        if not masked[j] > theta:
            break
        picks.append((int(cands.idx[j]), float(masked[j])))
        cands.take(j)
    if not picks:  # a tie at the candidate boundary: one exact global pick
        picks.append((int(np.flatnonzero(state.free & (state.m == top))[0]), top))
    return picks


def _dissimilar(
    geo: _Geometry,
    start: list[int],
    block_size: int,
    bar: tqdm,
    seed: int,
    limit: int | None = None,
) -> list[tuple[int, float]]:
    state = _RunningMin(geo, seed)
    out: list[tuple[int, float]] = []
    state.add(start)
    while len(start) + len(out) < geo.n and (limit is None or len(out) < limit):
        picks = _dissimilar_block(state, block_size)
        out.extend(picks)
        state.add([p for p, _ in picks])
        bar.update(len(picks))
    return out


# ==================================================================== similar
class _Neighbours:
    """Per item: nearest neighbours with exact squared distances, complete below ``radius2``.

    Sorted by (distance, index). Every item left out of a list (among the pool it was built
    from) is at squared distance ``≥ radius2``, proven with the float32 bound, so the list
    answers "nearest unlisted neighbour" exactly until it runs out; then it is rebuilt among the
    still unlisted items. Lists are built and rebuilt many at a time (one matrix product).
    """

    def __init__(self, geo: _Geometry, width: int, progress: bool) -> None:
        self.geo = geo
        n = geo.n
        self.width = max(1, min(width, n - 1)) if n > 1 else 1
        self.idx = np.zeros((n, self.width), np.int64)
        self.d2 = np.zeros((n, self.width))
        self.length = np.zeros(n, np.int64)
        self.radius2 = np.zeros(n)
        self.ptr = np.zeros(n, np.int64)
        # Full-dimensional (centred) coordinates: neighbour distances in real features are too
        # concentrated for a projection bound to certify any nearest neighbour.
        self.space = geo.full if geo.full is not None else geo.proj
        self.n2_32 = self.space.n2.astype(np.float32)
        self.nmax = float(self.space.norm.max(initial=0.0))
        everyone = np.arange(n)
        rows_per = max(1, min(512, (64 << 20) // max(1, 4 * n)))
        for s in tqdm(
            range(0, n, rows_per),
            disable=not progress,
            desc="neighbour lists",
            unit="chunk",
            mininterval=1.0,
        ):
            self.build(everyone[s : s + rows_per], everyone)

    def build(self, items: np.ndarray, pool: np.ndarray) -> None:
        """(Re)build the lists of ``items`` from candidates in ``pool``.

        ``key_ij = |b_j|² − 2a_i·b_j`` in float32 ranks the pool for row ``i``; its error is at
        most ``γ·2|a_i||b|max + u(|b|²max + 2|a_i||b|max)``, so the (w+1)-th smallest key gives a
        proven lower bound on the distance of everything not taken.
        """
        w, space = self.width, self.space
        if len(pool) <= w:
            for i in items.tolist():
                self._store(i, pool, np.inf)
            return
        # Products against every item (contiguous, no gather of the pool), others masked out.
        key = space.coords[items] @ space.coords.T
        key *= np.float32(-2.0)
        key += self.n2_32[None, :]
        if len(pool) < self.geo.n:
            out = np.ones(self.geo.n, bool)
            out[pool] = False
            key[:, out] = np.inf
        part = np.argpartition(key, w, axis=1)  # column numbers are item indices
        kth = np.take_along_axis(key, part[:, w : w + 1], axis=1)[:, 0].astype(np.float64)
        a = space.norm[items]
        err = space.gamma2 * a * self.nmax + 2.0 * _U32 * (self.nmax**2 + 2.0 * a * self.nmax)
        low2 = np.maximum(space.n2[items] + kth - 1.01 * err, 0.0)
        radius = np.maximum(np.sqrt(low2) - space.tau, 0.0) / (1.0 + _REL_SLACK)
        for r, i in enumerate(items.tolist()):
            if not self._store(i, part[r, :w], float(radius[r] ** 2)):
                self._widen(i, pool)

    def _store(self, i: int, cand: np.ndarray, radius2: float) -> int:
        """Keep the candidates provably nearer than the radius; returns how many."""
        exact = exact_sq_distances(self.geo.x[cand], self.geo.x[i])
        valid = exact < radius2
        cand, exact = cand[valid], exact[valid]
        order = np.lexsort((cand, exact))[: self.width]
        k = len(order)
        self.idx[i, :k] = cand[order]
        self.d2[i, :k] = exact[order]
        self.length[i] = k
        # Truncated to the width: what was cut is no nearer than the last entry kept.
        self.radius2[i] = radius2 if k == len(cand) else float(exact[order[-1]])
        self.ptr[i] = 0
        return k

    def _widen(self, i: int, pool: np.ndarray) -> None:
        """No candidate was provably nearest: take more (x4) until one is, or the pool is used."""
        low = self.space.lower(pool, i)
        take = 4 * self.width
        while True:
            if len(pool) <= take:
                self._store(i, pool, np.inf)
                return
            part = np.argpartition(low, take)
            radius = max(float(low[part[take]]), 0.0) / (1.0 + _REL_SLACK)
            if self._store(i, pool[part[:take]], radius * radius):
                return
            take *= 4

    def head(self, i: int, listed: np.ndarray) -> tuple[float, int]:
        """``(d², j)`` of item ``i``'s nearest unlisted neighbour, or ``(radius², -1)`` when the
        list has run out (a marker: every unlisted item is at least that far)."""
        k, length = int(self.ptr[i]), int(self.length[i])
        while k < length and listed[self.idx[i, k]]:
            k += 1
        self.ptr[i] = k
        if k < length:
            return float(self.d2[i, k]), int(self.idx[i, k])
        return float(self.radius2[i]), -1


_REFILL_BATCH = 64


def _similar(
    geo: _Geometry, start: list[int], width: int, bar: tqdm, progress: bool
) -> list[tuple[int, float]]:
    lists = _Neighbours(geo, width, progress)
    listed = np.zeros(geo.n, bool)
    marker = np.full(geo.n, np.inf)  # marker key of listed items whose list has run out
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        d2, j = lists.head(i, listed)
        marker[i] = d2 if j < 0 else np.inf
        if j >= 0 or np.isfinite(d2):  # an exhausted complete list has nothing left to offer
            heapq.heappush(heap, (d2, j, i))

    listed[start] = True
    for i in start:
        push(i)
    out: list[tuple[int, float]] = []
    while len(start) + len(out) < geo.n:
        d2, j, i = heapq.heappop(heap)
        if j < 0 and lists.head(i, listed)[1] < 0:
            # i's list ran out below the frontier: rebuild it among the unlisted items, with
            # the other run-out lists nearest to popping (one matrix product for all of them).
            waiting = np.flatnonzero(np.isfinite(marker))
            if len(waiting) > _REFILL_BATCH:
                waiting = waiting[np.argpartition(marker[waiting], _REFILL_BATCH)[:_REFILL_BATCH]]
            batch = np.union1d(waiting, [i])
            lists.build(batch, np.flatnonzero(~listed))
            marker[batch] = np.inf
        elif j >= 0 and not listed[j]:  # the shortest edge from the list: j is next
            out.append((j, d2))
            bar.update(1)
            listed[j] = True
            push(j)
        push(i)  # i's next unlisted neighbour (stale entries just advance)
    return out


# ==================================================================== entry point
def greedy_order(
    features: np.ndarray,
    mode: GreedyMode,
    start: Sequence[int] = (),
    *,
    proj_dims: tuple[int, int] = (128, 256),
    block_size: int = 256,
    neighbours: int = 64,
    seed: int = 0,
    progress: bool = False,
    limit: int | None = None,
) -> GreedyResult:
    """Order all rows of ``features`` (N, d) greedily from the list ``start``.

    ``limit`` stops farthest-first after that many picks (box-level core-set wants the next K of
    100k boxes, not a full order): ``order`` and ``distance`` then hold ``start`` and the picks.

    ``mode="dissimilar"``: next = arg-max over unlisted items of the min distance to the list
    (farthest-first); ``"similar"``: arg-min (nearest-first). Ties → lowest index. With an empty
    ``start`` every distance is infinite, so the first pick is index 0 (callers pass seeds).
    ``proj_dims``, ``block_size``, ``neighbours`` and ``seed`` tune speed only, never the order.
    """
    if mode not in ("dissimilar", "similar"):
        raise ValueError(f"greedy mode must be 'dissimilar' or 'similar', not {mode!r}")
    feats = np.asarray(features)
    if feats.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, d) array, got shape {feats.shape}")
    if not np.isfinite(feats).all():
        raise ValueError("features contain NaN or infinite values")
    n = feats.shape[0]
    start_list = [int(i) for i in start]
    if len(set(start_list)) != len(start_list):
        raise ValueError("start indices must be distinct")
    if any(i < 0 or i >= n for i in start_list):
        raise ValueError(f"start indices must lie in 0..{n - 1}")
    order: np.ndarray = np.empty(n, np.int64)
    distance: np.ndarray = np.full(n, np.nan)
    if n == 0:
        return GreedyResult(order, distance)
    if not start_list:  # every distance is infinite: the tie rule picks index 0
        start_list, first_is_pick = [0], True
    else:
        first_is_pick = False
    geo = _Geometry(feats, proj_dims[0], proj_dims[1], seed)
    with tqdm(
        total=n,
        initial=len(start_list),
        disable=not progress,
        desc=f"{mode} order",
        unit="item",
        mininterval=1.0,
    ) as bar:
        if mode == "dissimilar":
            picks = _dissimilar(geo, start_list, block_size, bar, seed, limit)
        else:
            if limit is not None:
                raise ValueError("limit applies to the dissimilar mode only")
            picks = _similar(geo, start_list, neighbours, bar, progress)
    if limit is not None:
        picks = picks[: max(0, limit - (1 if first_is_pick else 0))]
        n = len(start_list) + len(picks)
        order, distance = order[:n], distance[:n]
    order[: len(start_list)] = start_list
    order[len(start_list) :] = [p for p, _ in picks]
    distance[len(start_list) :] = np.sqrt([v for _, v in picks])
    del first_is_pick  # the first item's distance stays NaN either way
    return GreedyResult(order, distance)
