"""Speed of one box-level query: K boxes out of a pool of N, for every measure.

The pool is synthetic but shaped like a real one: class distributions from a Dirichlet,
objectness from a Beta, and 64-d box features (the YOLOX head's stem width) drawn around
cluster centres, with the boxes labelled so far (L_B) from the same clusters. The naive peer
for core-set is the farthest-first loop as public active-learning code writes it (sklearn
``pairwise_distances`` from each pick to the whole pool, a running minimum), timed over a few
picks and extrapolated (its cost per pick is flat); its picks are checked against ours.

    python -m benchmark.box_select_speed --pool 100000 --k 500 --labeled 5000
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from backend.active import BoxPool, select_boxes

OUT = Path("benchmark/results/box_select_speed")


def synthetic_pool(n: int, classes: int, dim: int, seed: int) -> tuple[BoxPool, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32) * 3
    feats = centres[rng.integers(0, 64, n)] + rng.normal(size=(n, dim)).astype(np.float32)
    objectness = rng.beta(2, 2, n).astype(np.float32)
    cls = rng.dirichlet(np.full(classes, 0.3), n).astype(np.float32)
    probs = cls * objectness[:, None]
    images = np.sort(rng.integers(0, max(1, n // 13), n))
    pool = BoxPool(
        image=images.astype(np.int64),
        xyxy=np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1)),
        labels=probs.argmax(1),
        scores=probs.max(1),
        class_probs=probs,
        objectness=objectness,
        features=feats,
        image_sizes=((640, 480),),
    )
    return pool, centres


def naive_coreset(features: np.ndarray, labeled: np.ndarray, picks: int) -> tuple[list[int], float]:
    """Farthest-first as google/active-learning's kCenterGreedy does it; (picks, seconds)."""
    from sklearn.metrics import pairwise_distances

    start = time.perf_counter()
    dist = pairwise_distances(features, labeled, metric="euclidean").min(axis=1)
    chosen: list[int] = []
    for _ in range(picks):
        j = int(np.argmax(dist))
        chosen.append(j)
        dist = np.minimum(dist, pairwise_distances(features, features[j : j + 1])[:, 0])
    return chosen, time.perf_counter() - start


def run(pool_size: int, k: int, labeled: int, anchor_picks: int, seed: int) -> dict[str, Any]:
    pool, centres = synthetic_pool(pool_size, 20, 64, seed)
    rng = np.random.default_rng(seed + 1)
    assert pool.features is not None
    lab = (
        centres[rng.integers(0, 64, labeled)]
        + rng.normal(size=(labeled, centres.shape[1])).astype(np.float32)
    ).astype(np.float32)
    eligible = rng.random(pool_size) > 0.05
    rows: dict[str, Any] = {}
    for measure in ("random", "uncertainty", "entropy", "margin", "coreset"):
        start = time.perf_counter()
        picked = select_boxes(pool, measure, k, eligible=eligible, labeled_features=lab, seed=seed)
        seconds = time.perf_counter() - start
        rows[measure] = {"seconds": round(seconds, 3), "picked": len(picked)}
        if measure == "coreset":
            ids = np.flatnonzero(eligible)
            naive, naive_s = naive_coreset(pool.features[ids], lab, anchor_picks)
            per_pick = naive_s / anchor_picks
            rows[measure]["naive_seconds_extrapolated"] = round(per_pick * k, 1)
            rows[measure]["naive_picks_timed"] = anchor_picks
            rows[measure]["speedup"] = round(per_pick * k / seconds, 1)
            rows[measure]["same_prefix"] = [int(i) for i in ids[naive]] == picked[
                :anchor_picks
            ].tolist()
    return {
        "pool": pool_size,
        "k": k,
        "labeled_boxes": labeled,
        "feature_dim": 64,
        "classes": 20,
        "measures": rows,
        "machine": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=500)
    parser.add_argument("--labeled", type=int, default=5000)
    parser.add_argument("--anchor-picks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    import threadpoolctl

    with threadpoolctl.threadpool_limits(args.threads):
        result = run(args.pool, args.k, args.labeled, args.anchor_picks, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Selecting K = {result['k']} boxes from a pool of {result['pool']:,}",
        "",
        f"{result['labeled_boxes']:,} labelled boxes, 64-d features, 20 classes, "
        f"{args.threads} threads. Command: `python -m benchmark.box_select_speed`.",
        "",
        "| measure | seconds | naive peer (extrapolated) | speed-up | same picks |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in result["measures"].items():
        naive = row.get("naive_seconds_extrapolated")
        lines.append(
            f"| {name} | {row['seconds']:.3f} | {'' if naive is None else f'{naive} s'} | "
            f"{row.get('speedup', '')} | {row.get('same_prefix', '')} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
