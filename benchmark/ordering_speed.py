"""Queue-ordering speed and feature-extraction speed on this CPU.

Run (one process; writes ``benchmark/results/ordering_speed.json`` and ``ordering_speed.md`` and
prints the table)::

    .venv/bin/python -m benchmark.ordering_speed                       # the full grid
    .venv/bin/python -m benchmark.ordering_speed --sizes 5000 --kinds powerlaw  # a quick look

What it measures:

* seconds to order ``N`` = 5k, 20k, 100k synthetic clustered feature vectors (d = 1280, and after
  PCA to 128) with each strategy (random, temporal, similar, dissimilar) through
  :func:`backend.ordering.order_pool`, and the peak extra resident memory of each call;
* beside it, the naive pairwise-matrix approach (float64 ``X·Xᵀ`` distance matrix, then the
  greedy loop on its rows) where the matrix fits (``N ≤ --naive-max``), the ratio of the two, and
  whether both orders are equal (they must be);
* feature extraction images/s at 224 px on real images of the shared data: EfficientNet-Lite0
  through onnxruntime (network only, and end to end from decoded images, and from JPEG files),
  and eager PyTorch (``channels_last``) for comparison.

Two synthetic kinds, both Gaussian mixtures (100 clusters), because the greedy orders' cost
depends on how many dimensions the features really use:

* ``lowrank``: each cluster spans a random 16-dimensional subspace (plus faint isotropic noise);
* ``powerlaw``: cluster centres and within-cluster spread over all ``d`` axes with variances
  ∝ 1/rank (a random axis order per cluster). Its distance concentration is close to that of
  real EfficientNet-Lite0 features of the shared images (median ratio d²(i, new pick)/m_i over a
  farthest-first run: 2.2 here, 1.65 for the real features, 92 for ``lowrank``), i.e. the harder
  and more realistic case.

Full farthest-first / nearest-first orders are ``O(N²)`` whatever the implementation
(``docs/method-notes``); every figure here is a *full* order of all ``N`` items, exact.
BLAS threads are fixed by ``--threads`` before numpy loads; the machine is shared, so the JSON
records the load average before and after.
"""

from __future__ import annotations

import os
import sys


def _pin_threads(argv: list[str]) -> int:
    """BLAS/OpenMP threads must be set before numpy is imported."""
    threads = 2
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            threads = int(argv[i + 1])
        elif arg.startswith("--threads="):
            threads = int(arg.split("=", 1)[1])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


_THREADS = _pin_threads(sys.argv) if __name__ == "__main__" else 0

import argparse  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from PIL import Image  # noqa: E402

from backend.ordering import order_pool, reduce_dim  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ordering_speed.json"
STRATEGIES = ("random", "temporal", "similar", "dissimilar")


# ----------------------------------------------------------------------------- data
def clustered_features(n: int, d: int, kind: str, seed: int = 0, clusters: int = 100) -> np.ndarray:
    """Synthetic clustered features (see module docstring), float32 ``(n, d)``."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, d), np.float32)
    if kind == "lowrank":
        rank = 16
        centres = rng.normal(size=(clusters, d))
        scales = np.linspace(2.0, 0.2, rank) / np.sqrt(d) * 2.0
        for c in range(clusters):
            idx = np.flatnonzero(labels == c)
            basis = rng.normal(size=(rank, d)) * scales[:, None]
            noise = rng.normal(size=(len(idx), d)) * (0.5 / np.sqrt(d))
            out[idx] = centres[c] + rng.normal(size=(len(idx), rank)) @ basis + noise
    elif kind == "powerlaw":
        lam = 1.0 / np.arange(1, d + 1)
        lam /= lam.sum()
        centres = rng.normal(size=(clusters, d)) * np.sqrt(lam)
        for c in range(clusters):
            idx = np.flatnonzero(labels == c)
            spread = np.sqrt(lam)[rng.permutation(d)]
            out[idx] = centres[c] + rng.normal(size=(len(idx), d)) * spread
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return out


def naive_order(x: np.ndarray, mode: str, start: Sequence[int]) -> np.ndarray:
    """The naive pairwise approach: full float64 distance matrix, then the greedy loop on rows."""
    x64 = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    d2 = x64 @ x64.T
    d2 *= -2.0
    d2 += sq[:, None]
    d2 += sq[None, :]
    n = len(x)
    m = np.full(n, np.inf)
    free = np.ones(n, bool)
    order = list(start)
    for c in start:
        free[c] = False
        np.minimum(m, d2[c], out=m)
    key = np.empty(n)
    fill = -np.inf if mode == "dissimilar" else np.inf
    while len(order) < n:
        np.copyto(key, m)
        key[~free] = fill
        c = int(np.argmax(key) if mode == "dissimilar" else np.argmin(key))
        order.append(c)
        free[c] = False
        np.minimum(m, d2[c], out=m)
    return np.asarray(order)


def kcenter_anchor_order(
    x: np.ndarray, mode: str, start: Sequence[int], max_picks: int | None = None
) -> tuple[np.ndarray, float]:
    """The public anchor (``docs/method-notes``): greedy k-center as in google/active-learning's
    ``kCenterGreedy`` (and modAL): per pick, ``sklearn.metrics.pairwise_distances`` from every
    item to the new list member, folded into a running minimum with ``np.minimum``.

    Returns ``(order prefix, seconds per pick)``. With ``max_picks`` it stops after that many
    picks (the per-pick cost is flat over a run: one ``N×d`` distance pass each), so the full
    order's time can be extrapolated as ``seconds per pick × (N − len(start))``.
    """
    from sklearn.metrics import pairwise_distances

    n = len(x)
    free = np.ones(n, bool)
    order = list(start)
    free[order] = False
    m = pairwise_distances(x, x[order]).min(axis=1)
    fill = -np.inf if mode == "dissimilar" else np.inf
    picks = n - len(order) if max_picks is None else min(max_picks, n - len(order))
    began = time.perf_counter()
    for _ in range(picks):
        key = np.where(free, m, fill)
        c = int(np.argmax(key) if mode == "dissimilar" else np.argmin(key))
        order.append(c)
        free[c] = False
        m = np.minimum(m, pairwise_distances(x, x[c : c + 1])[:, 0])
    per_pick = (time.perf_counter() - began) / max(1, picks)
    return np.asarray(order), per_pick


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 10 ms in a thread."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def extra_mib(self) -> float:
        return round((self.peak - self.base) / 2**20, 1)


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, seconds, peak extra MiB)``."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, round(seconds, 3), mem.extra_mib


def say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------- ordering grid
def ordering_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for kind in args.kinds:
        for n in args.sizes:
            full = clustered_features(n, 1280, kind, seed=args.seed)
            spaces: list[tuple[str, np.ndarray, float]] = []
            if 1280 in args.dims:
                spaces.append(("1280", full, 0.0))
            if 128 in args.dims:
                reduced, pca_s, _ = timed(functools.partial(reduce_dim, full, 128))
                spaces.append(("pca128", reduced, pca_s))
            keys = np.random.default_rng(args.seed).random(n).tolist()
            for space, feats, pca_s in spaces:
                for strategy in args.strategies:
                    label = f"{kind} N={n} d={space} {strategy}"
                    if strategy == "similar" and space == "1280" and n > args.similar_full_max:
                        say(f"{label}: skipped (--similar-full-max {args.similar_full_max})")
                        rows.append(
                            {
                                "kind": kind,
                                "n": n,
                                "space": space,
                                "strategy": strategy,
                                "skipped": "similar on full 1280-d features above "
                                f"{args.similar_full_max} items: use PCA",
                            }
                        )
                        continue
                    run = _strategy_call(strategy, feats, keys, n, args.seed)
                    order, seconds, mib = timed(run)
                    row: dict[str, Any] = {
                        "kind": kind,
                        "n": n,
                        "space": space,
                        "d": int(feats.shape[1]),
                        "strategy": strategy,
                        "seconds": seconds,
                        "peak_extra_mib": mib,
                        "pca_seconds": pca_s if space == "pca128" else None,
                    }
                    if strategy in ("similar", "dissimilar") and n <= args.naive_max:
                        start = order[:1].tolist()
                        ref, naive_s, naive_mib = timed(
                            functools.partial(naive_order, feats, strategy, start)
                        )
                        row.update(
                            naive_seconds=naive_s,
                            naive_peak_extra_mib=naive_mib,
                            speedup=round(naive_s / seconds, 2) if seconds else None,
                            equal_to_naive=bool(np.array_equal(order, ref)),
                        )
                    if strategy in ("similar", "dissimilar") and args.anchor_picks > 0:
                        start = order[:1].tolist()
                        cap = None if n - 1 <= args.anchor_picks else args.anchor_picks
                        prefix, per_pick = kcenter_anchor_order(feats, strategy, start, cap)
                        anchor_s = per_pick * (n - 1)
                        row.update(
                            anchor_seconds=round(anchor_s, 2),
                            anchor_picks_timed=len(prefix) - 1,
                            anchor_extrapolated=cap is not None,
                            anchor_speedup=round(anchor_s / seconds, 1) if seconds else None,
                            equal_to_anchor=bool(np.array_equal(order[: len(prefix)], prefix)),
                        )
                    say(_row_text(row))
                    rows.append(row)
    return rows


def _strategy_call(
    strategy: str, feats: np.ndarray, keys: list[float], n: int, seed: int
) -> Callable[[], np.ndarray]:
    if strategy == "random":
        return lambda: order_pool(None, "random", n=n, seed=seed)
    if strategy == "temporal":
        return lambda: order_pool(None, "temporal", keys=keys, n_seed=0)
    return lambda: order_pool(feats, strategy, seed=seed, n_seed=1)


def _row_text(row: dict[str, Any]) -> str:
    text = (
        f"{row['kind']:8s} N={row['n']:>6} d={row['space']:6s} {row['strategy']:10s} "
        f"{row['seconds']:9.2f} s  +{row['peak_extra_mib']:7.1f} MiB"
    )
    if "naive_seconds" in row:
        text += (
            f" | naive {row['naive_seconds']:8.2f} s +{row['naive_peak_extra_mib']:7.1f} MiB"
            f"  x{row['speedup']}  equal={row['equal_to_naive']}"
        )
    if "anchor_seconds" in row:
        text += (
            f" | k-center anchor {row['anchor_seconds']:9.1f} s"
            f"{' (extrapolated)' if row['anchor_extrapolated'] else ''}"
            f"  x{row['anchor_speedup']}  equal={row['equal_to_anchor']}"
        )
    return text


# ----------------------------------------------------------------------------- extraction
def shared_image_paths(limit: int) -> list[Path]:
    root = Path(
        os.environ.get(
            "BOXLOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
        )
    )
    patterns = [
        "voc/VOCdevkit/VOC2012/JPEGImages/*.jpg",
        "coco/mini/train2017/*.jpg",
        "voc/raccoon/JPEGImages/*.jpg",
        "kitti/tiny/training/image_2/*",
    ]
    paths = [Path(p) for pat in patterns for p in sorted(glob.glob(str(root / pat)))]
    return paths[:limit]


def extraction_speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from backend.features import effnet_lite0_extractor, preprocess
    from backend.nets.effnet_lite0 import efficientnet_lite0_pooled

    paths = shared_image_paths(args.images)
    source = "shared data"
    if not paths:
        raise SystemExit("no shared images found (set BOXLOOP_SHARED_DATA)")
    start = time.perf_counter()
    images = [Image.open(p).convert("RGB") for p in paths]
    decode_s = time.perf_counter() - start
    cache = Path(args.cache_dir)
    ext = effnet_lite0_extractor(cache, batch_size=32, num_threads=args.extract_threads)
    ext.extract(images[:32], progress=False)  # warm-up: onnxruntime allocates on the first run
    batch = preprocess(images[:32], (224, 224), ext.mean, ext.std)
    net_times = []
    for _ in range(3):
        t = time.perf_counter()
        ext.run(batch)
        net_times.append(time.perf_counter() - t)
    t = time.perf_counter()
    ext.extract(images, progress=False)
    e2e_s = time.perf_counter() - t

    def lazy() -> Iterator[Image.Image]:
        for p in paths:
            with Image.open(p) as im:
                im.draft("RGB", (448, 448))
                yield im.convert("RGB")

    t = time.perf_counter()
    ext.extract(lazy(), progress=False)
    files_s = time.perf_counter() - t
    torch.set_num_threads(args.extract_threads)
    net = efficientnet_lite0_pooled().to(memory_format=torch.channels_last)
    tb = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        net(tb)
        t = time.perf_counter()
        net(tb)
        eager_s = time.perf_counter() - t
    n = len(images)
    result = {
        "images": n,
        "source": source,
        "input_px": 224,
        "threads": args.extract_threads,
        "decode_images_per_s": round(n / decode_s, 1),
        "onnx_network_only_images_per_s": round(32 / float(np.median(net_times)), 1),
        "onnx_from_decoded_images_per_s": round(n / e2e_s, 1),
        "onnx_from_jpeg_files_per_s": round(n / files_s, 1),
        "torch_eager_channels_last_images_per_s": round(32 / eager_s, 1),
        "extractor": ext.name,
    }
    say(f"extraction: {json.dumps(result)}")
    return result


# ----------------------------------------------------------------------------- report
def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Ordering speed",
        "",
        f"CPU: {meta['cpu']}, {meta['threads']} BLAS thread(s); load average before "
        f"{meta['load_before']}, after {meta['load_after']}. Full exact orders of all N items; "
        "naive = float64 pairwise matrix + greedy loop (where it fits); speedup = naive / ours; "
        "k-center anchor = google/active-learning `kCenterGreedy`-style loop (sklearn "
        "`pairwise_distances` per pick + running minimum), timed over "
        f"{meta.get('anchor_picks', '?')} picks and extrapolated to N−1 picks (marked *) when N is "
        "larger, its order compared on the timed prefix; "
        "memory = peak extra resident MiB during the call.",
        "",
        "| kind | N | features | strategy | seconds | MiB | naive s | naive MiB | speedup | equal "
        "| anchor s | anchor speedup | equal |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results["ordering"]:
        if "skipped" in r:
            lines.append(
                f"| {r['kind']} | {r['n']} | {r['space']} | {r['strategy']} | "
                f"skipped: {r['skipped']} | | | | | | | | |"
            )
            continue
        naive = ("", "", "", "")
        if "naive_seconds" in r:
            naive = (
                f"{r['naive_seconds']:.2f}",
                f"{r['naive_peak_extra_mib']:.0f}",
                f"{r['speedup']}×",
                str(r["equal_to_naive"]),
            )
        anchor = ("", "", "")
        if "anchor_seconds" in r:
            star = "*" if r["anchor_extrapolated"] else ""
            anchor = (
                f"{r['anchor_seconds']:.1f}{star}",
                f"{r['anchor_speedup']}×",
                str(r["equal_to_anchor"]),
            )
        lines.append(
            f"| {r['kind']} | {r['n']} | {r['space']} | {r['strategy']} | {r['seconds']:.2f} | "
            f"{r['peak_extra_mib']:.0f} | {naive[0]} | {naive[1]} | {naive[2]} | {naive[3]} | "
            f"{anchor[0]} | {anchor[1]} | {anchor[2]} |"
        )
    ext = results.get("extraction")
    if ext:
        lines += [
            "",
            f"## Feature extraction ({ext['extractor']}, {ext['input_px']} px, {ext['images']} "
            f"{ext['source']} images, {ext['threads']} threads)",
            "",
            "| path | images/s |",
            "|---|---:|",
            f"| onnxruntime, network only (batch 32) | {ext['onnx_network_only_images_per_s']} |",
            f"| onnxruntime, from decoded images (resize + normalise + network) | "
            f"{ext['onnx_from_decoded_images_per_s']} |",
            f"| onnxruntime, from JPEG files (decode + the above) | {ext['onnx_from_jpeg_files_per_s']} |",
            f"| eager PyTorch, channels_last, network only | "
            f"{ext['torch_eager_channels_last_images_per_s']} |",
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    from benchmark.reports import write_result  # matplotlib: kept out of measured processes

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[5000, 20000, 100000]
    )
    parser.add_argument(
        "--dims", type=lambda s: [int(v) for v in s.split(",")], default=[1280, 128]
    )
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=["powerlaw", "lowrank"])
    parser.add_argument("--strategies", type=lambda s: s.split(","), default=list(STRATEGIES))
    parser.add_argument(
        "--naive-max", type=int, default=20000, help="largest N for the naive matrix (20k: 3.2 GB)"
    )
    parser.add_argument(
        "--similar-full-max",
        type=int,
        default=20000,
        help="largest N for similar on 1280-d (its neighbour lists are O(N²·d))",
    )
    parser.add_argument(
        "--anchor-picks",
        type=int,
        default=1000,
        help="picks timed for the kCenterGreedy-style anchor (0: skip it); extrapolated beyond",
    )
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads for the ordering")
    parser.add_argument(
        "--extract-threads",
        type=int,
        default=2,
        help="onnxruntime / torch threads for the extraction",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=256, help="images for the extraction speed")
    parser.add_argument("--skip-extraction", action="store_true")
    parser.add_argument("--skip-ordering", action="store_true")
    parser.add_argument("--cache-dir", default="var/boxloop/features/onnx")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    results: dict[str, Any] = {
        "meta": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "load_before": load_before,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": list(argv) if argv is not None else sys.argv[1:],
            "anchor_picks": args.anchor_picks,
            "kinds": {
                "lowrank": "100 clusters, each a random 16-d subspace + faint noise",
                "powerlaw": "100 clusters over all d axes, variances ∝ 1/rank",
            },
        }
    }
    if not args.skip_extraction:
        results["extraction"] = extraction_speed(args)
    if not args.skip_ordering:
        results["ordering"] = ordering_grid(args)
    else:
        results["ordering"] = []
    results["meta"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
    write_result(args.out, results, markdown(results))


if __name__ == "__main__":
    main()
