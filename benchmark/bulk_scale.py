"""Feature extraction at scale: N synthetic tasks through the Ray path (two local nodes) and in
process, stored in a SQLite :class:`~backend.store.Store` by
:func:`~backend.bulk.features.extract_features`.

What it shows: the rate of each engine, and that memory stays flat in N (peak RSS of the driver
process, and the sampled summed RSS of the cluster's processes, at each N).

Synthetic tasks: task ids 1..N whose image references cycle over a pool of generated JPEG files
(``--pool``, a few hundred), so 100k tasks need no 100k files on disk; every task is still
fetched, decoded, run and stored on its own.

Each (engine, N) runs in a fresh child process, so its peak RSS is its own. Results are merged
into ``bulk_scale.json`` (one entry per engine and N; a later run replaces its entry), and the
Markdown table and the PNG plot are redrawn from all entries -- so the long 100k run can go in
the background and land in the same report::

    python -m benchmark.bulk_scale --sizes 10000 --local-sizes 10000
    nohup python -m benchmark.bulk_scale --sizes 100000 --local-sizes > scale.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

from backend.bulk.engine import Engine, InProcessEngine
from backend.bulk.work import ItemResult, ModelSpec, WorkItem
from backend.images import ImageSource

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "scale"
WORK = Path(tempfile.gettempdir()) / "boxloop-bulk-scale"


def make_image_pool(root: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` JPEGs of 320x240 (smooth gradients plus noise, so they compress like photos
    rather than like white noise), made once and reused."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    yy, xx = np.mgrid[0:240, 0:320].astype(np.float32)
    for i in range(count):
        path = root / f"pool{i:04d}.jpg"
        if not path.is_file():
            a, b, c = rng.uniform(0.2, 1.0, 3)
            base = np.stack([xx * a, yy * b, (xx + yy) * c / 2], axis=-1) % 256
            noisy = base + rng.normal(0, 12, base.shape)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=88)
        paths.append(path)
    return paths


def synthetic_items(n: int, pool: list[Path]) -> Iterator[WorkItem]:
    """Task ids 1..n, references cycling over the pool; lazy, so no list of n items exists."""
    for task_id in range(1, n + 1):
        yield WorkItem(task_id, str(pool[(task_id - 1) % len(pool)]))


class _Timed:
    """An engine wrapper that notes when the first result arrives (startup cost)."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.first_result_at: float | None = None

    def run(
        self, items: Iterable[WorkItem], spec: ModelSpec, source: ImageSource
    ) -> Iterator[ItemResult]:
        for result in self.inner.run(items, spec, source):
            if self.first_result_at is None:
                self.first_result_at = time.perf_counter()
            yield result


class _RssSampler(threading.Thread):
    """Samples this process's RSS and the summed RSS of the cluster's processes every second."""

    def __init__(self, ray_temp_dir: Path | None) -> None:
        super().__init__(daemon=True)
        self.ray_temp_dir = ray_temp_dir
        self.driver_peak = 0
        self.ray_peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        cluster = None
        if self.ray_temp_dir is not None:
            from backend.bulk.ray_local import LocalRayCluster

            cluster = LocalRayCluster("", self.ray_temp_dir, 0)
        while not self.stopped.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            if cluster is not None:
                total = 0
                for proc in cluster.processes():
                    try:
                        if proc.pid != me.pid:
                            total += proc.memory_info().rss
                    except psutil.Error:
                        continue
                self.ray_peak = max(self.ray_peak, total)
            self.stopped.wait(1.0)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One (engine, N) measurement, in this (fresh) process."""
    from backend.bulk.features import extract_features
    from backend.bulk.work import EncoderSpec
    from backend.features.imgnet import effnet_lite0_extractor
    from backend.store import Store

    threads = 1 if args.engine == "ray" else args.local_threads
    spec = EncoderSpec.from_encoder(
        effnet_lite0_extractor(Path(args.cache), num_threads=threads), num_threads=threads
    )
    pool = make_image_pool(Path(args.images), args.pool)
    source = ImageSource(None, None, allowed_local_roots=(Path(args.images),))
    engine: Engine
    if args.engine == "ray":
        from backend.bulk.ray_engine import RayEngine

        engine = RayEngine(
            args.address, batch_size=args.batch_size, fetch_concurrency=args.fetch_concurrency
        )
    else:
        engine = InProcessEngine(
            batch_size=args.batch_size, fetch_concurrency=args.fetch_concurrency
        )
    timed = _Timed(engine)
    with tempfile.TemporaryDirectory(prefix="bulk-scale-db") as tmp:
        store = Store(f"sqlite:///{tmp}/store.db")
        sampler = _RssSampler(Path(args.ray_temp_dir) if args.ray_temp_dir else None)
        sampler.start()
        start = time.perf_counter()
        report = extract_features(
            store, 1, spec, synthetic_items(args.n, pool), timed, source, total=args.n
        )
        seconds = time.perf_counter() - start
        sampler.stopped.set()
        sampler.join()
        stored, _ = store.get_features(1, spec.name, [1, args.n])
        store.close()
    first = (timed.first_result_at or start) - start
    return {
        "engine": args.engine,
        "n": args.n,
        "seconds": round(seconds, 1),
        "first_result_s": round(first, 1),
        "images_per_s": round(args.n / seconds, 1),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "driver_sampled_peak_rss_mb": round(sampler.driver_peak / 2**20),
        "ray_processes_peak_rss_mb": round(sampler.ray_peak / 2**20) if args.ray_temp_dir else None,
        "computed": len(report.computed),
        "failed": len(report.failed),
        "first_and_last_stored": len(stored),
        "onnx_threads": threads,
        "actors": getattr(engine, "pool_size", lambda: None)(),
        "batch_size": args.batch_size,
        "fetch_concurrency": args.fetch_concurrency,
        "pool_images": args.pool,
    }


def _child(args: argparse.Namespace, engine: str, n: int, address: str, temp_dir: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as out:
        target = Path(out.name)
    cmd = [
        sys.executable,
        "-m",
        "benchmark.bulk_scale",
        "--child",
        f"--engine={engine}",
        f"--n={n}",
        f"--address={address}",
        f"--ray-temp-dir={temp_dir}",
        f"--images={args.images}",
        f"--cache={args.cache}",
        f"--pool={args.pool}",
        f"--batch-size={args.batch_size}",
        f"--fetch-concurrency={args.fetch_concurrency}",
        f"--local-threads={args.local_threads}",
        f"--child-out={target}",
    ]
    print(f"== {engine} N={n}", flush=True)
    subprocess.run(cmd, check=True)
    result: dict = json.loads(target.read_text())
    target.unlink()
    print(json.dumps(result), flush=True)
    return result


def merge_and_report(out_dir: Path, new: list[dict]) -> list[dict]:
    """Merge ``new`` into ``bulk_scale.json`` (by engine and N), redraw table and plot."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bulk_scale.json"
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = {(r["engine"], r["n"]): r for r in old}
    runs.update({(r["engine"], r["n"]): r for r in new})
    ordered = sorted(runs.values(), key=lambda r: (r["engine"] != "ray", r["n"]))
    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{round(psutil.virtual_memory().total / 2**30)} GiB",
        "model": "EfficientNet-Lite0 ONNX (ImgNet features, 1280-d)",
        "tasks": "task ids 1..N, image references cycling over a pool of generated 320x240 JPEGs",
        "ray": "two local nodes (ray start, 1 CPU each), one actor per CPU",
    }
    path.write_text(json.dumps({"meta": meta, "runs": ordered}, indent=2) + "\n")
    _table(out_dir / "bulk_scale.md", meta, ordered)
    _plot(out_dir / "bulk_scale.png", ordered)
    return ordered


def _table(path: Path, meta: dict, runs: list[dict]) -> None:
    lines = [
        "# Bulk feature extraction at scale",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| engine | N | wall s | first result s | img/s | driver peak RSS MB "
        "| Ray processes peak RSS MB | failed | load avg at end |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        ray_rss = r["ray_processes_peak_rss_mb"]
        lines.append(
            f"| {r['engine']} | {r['n']:,} | {r['seconds']} | {r['first_result_s']} "
            f"| {r['images_per_s']} | {r['driver_peak_rss_mb']} "
            f"| {'' if ray_rss is None else ray_rss} | {r['failed']} "
            f"| {r.get('load_average_1m_at_end', '')} |"
        )
    lines += [
        "",
        "Driver peak RSS: `ru_maxrss` of the process that ran `extract_features` (a fresh "
        "process per row). Ray processes: the largest sampled (1 s) sum of the RSS of the "
        "cluster's processes (raylets, GCS, agents, actors; shared object-store pages count "
        "in each process that touched them).",
        "",
    ]
    path.write_text("\n".join(lines))


def _plot(path: Path, runs: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for engine in sorted({r["engine"] for r in runs}):
        mine = sorted((r for r in runs if r["engine"] == engine), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        ax_mem.plot(ns, [r["driver_peak_rss_mb"] for r in mine], "o-", label=f"{engine} driver")
        if engine == "ray":
            ax_mem.plot(
                ns, [r["ray_processes_peak_rss_mb"] for r in mine], "s--", label="ray processes"
            )
        ax_rate.plot(ns, [r["images_per_s"] for r in mine], "o-", label=engine)
    for ax in (ax_mem, ax_rate):
        ax.set_xscale("log")
        ax.set_xlabel("tasks (N)")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_mem.set_ylabel("peak RSS (MB)")
    ax_mem.set_ylim(bottom=0)
    ax_rate.set_ylabel("images / s")
    ax_rate.set_ylim(bottom=0)
    fig.suptitle("Feature extraction (EfficientNet-Lite0) through extract_features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.bulk_scale",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="*",
        default=[10_000, 100_000],
        help="N for the Ray path (default: 10000 100000)",
    )
    parser.add_argument(
        "--local-sizes",
        type=int,
        nargs="*",
        default=[10_000],
        help="N for the in-process path (default: 10000)",
    )
    parser.add_argument("--quick", action="store_true", help="N=500 on both paths")
    parser.add_argument("--pool", type=int, default=300, help="generated JPEGs to cycle over")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--fetch-concurrency", type=int, default=8)
    parser.add_argument(
        "--local-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="onnxruntime threads of the in-process engine (all CPUs)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--images", default=str(WORK / "images"))
    parser.add_argument("--cache", default=str(WORK / "onnx"))
    # internal: one measurement in a child process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    parser.add_argument("--ray-temp-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        Path(args.child_out).write_text(json.dumps(run_one(args)))
        return 0
    if args.quick:
        args.sizes, args.local_sizes = [500], [500]
    make_image_pool(Path(args.images), args.pool)
    results: list[dict] = []
    # Smallest N first, Ray before in-process at each N: the short runs report early, the
    # long one comes last. The cluster idles (little CPU) during in-process runs.
    plan = sorted(
        [("ray", n) for n in args.sizes] + [("local", n) for n in args.local_sizes],
        key=lambda run: (run[1], run[0] != "ray"),
    )
    with ExitStack() as stack:
        address, temp_dir = "", ""
        if args.sizes:
            from backend.bulk.ray_local import start_local_cluster

            cluster = stack.enter_context(start_local_cluster(num_nodes=2, cpus_per_node=1))
            address, temp_dir = cluster.address, str(cluster.temp_dir)
        for engine, n in plan:
            on_ray = engine == "ray"
            results.append(
                _child(args, engine, n, address if on_ray else "", temp_dir if on_ray else "")
            )
            merge_and_report(args.out, results)
    runs = merge_and_report(args.out, results)
    print((args.out / "bulk_scale.md").read_text())
    print(f"{len(runs)} runs in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
