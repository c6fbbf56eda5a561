"""``boxloop bench utility``: image utility for machines (:mod:`benchmark.utility_bench`).

Examples::

    boxloop bench utility                                   # COCO, VOC, KITTI subsets, 3 seeds
    boxloop bench utility --quick                           # CI: a small slice, one seed
    boxloop bench utility --dataset voc:../shared/data/voc/VOCdevkit/VOC2012 --seeds 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmark.config import ConfigError, load_yaml_mapping
from benchmark.datasets import DatasetError


def register(modes: Any) -> argparse.ArgumentParser:
    """Add the ``utility`` mode to ``boxloop bench``'s modes."""
    parser = modes.add_parser(
        "utility",
        help="image utility for machines: utility labels, predictor vs baselines, filtering",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML settings (keys of UtilityBenchConfig)")
    parser.add_argument("--dataset", action="append", help="voc:PATH | kitti:PATH | coco:PATH")
    parser.add_argument("--max-images", type=int, help="cap every dataset at N source images")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1")
    parser.add_argument(
        "--folds",
        type=int,
        help="k-fold cross-validation over source images per seed, predictions pooled (0: one "
        "80/20 split)",
    )
    parser.add_argument("--epochs", type=int, help="predictor training epochs")
    parser.add_argument("--threads", type=int, help="torch / onnxruntime threads")
    parser.add_argument("--quick", action="store_true", help="a small slice, one seed (CI)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--force", action="store_true", help="recompute the cached labels")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_command)
    return parser


def build_utility_config(args: argparse.Namespace) -> Any:
    from benchmark.utility_config import QUICK, load_utility_config

    data: dict[str, Any] = {}
    if args.config is not None:
        data = load_yaml_mapping(args.config)
    if args.quick:
        data = {**data, **{k: v for k, v in QUICK.items() if k != "predictor"}}
        data["predictor"] = {**dict(data.get("predictor", {})), **QUICK["predictor"]}
        if args.out is None and "output" not in data:
            data["output"] = "benchmark/results/utility-quick"
    if args.dataset:
        data["datasets"] = list(args.dataset)
    if args.max_images is not None:
        data["max_images"] = args.max_images
    if args.seeds is not None:
        data["seeds"] = list(range(args.seeds))
    if args.folds is not None:
        data["folds"] = args.folds
    if args.epochs is not None:
        data["predictor"] = {**dict(data.get("predictor", {})), "epochs": args.epochs}
    if args.threads is not None:
        data["threads"] = args.threads
    if args.out is not None:
        data["output"] = args.out
    return load_utility_config(data)


def run_command(args: argparse.Namespace) -> int:
    from benchmark.utility_bench import run_utility_bench

    try:
        config = build_utility_config(args)
        summary, files = run_utility_bench(config, force=args.force, progress=not args.no_progress)
    except (ConfigError, DatasetError, FileNotFoundError) as exc:
        print(f"boxloop bench utility: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(summary['runs'])} labeling × seed run(s) in {summary['seconds']} s")
    for path in files:
        print(f"wrote {path}")
    return 0
