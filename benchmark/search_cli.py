"""``boxloop bench search``: the command line of :mod:`benchmark.search_bench`.

Kept apart so that registering the subcommand (every ``boxloop`` start) imports no torch/faiss.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmark.search_bench import SearchBenchConfig

__all__ = ["config_from_args", "register_search", "run_search_command"]


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI mode: small sets, one seed")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--tau", type=float, help="relevance threshold τ (0.5)")
    parser.add_argument("--k", type=int, help="top K for mAP and NDCG (200)")
    parser.add_argument("--object-steps", type=int, help="single-object triplet steps (600)")
    parser.add_argument("--spatial-epochs", type=int, help="f_t epochs (60)")
    parser.add_argument("--index-dim", type=int, help="PCA dimensions of the index space (32)")
    parser.add_argument("--threads", type=int, help="torch / onnxruntime threads (2)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmark/results/search)")


def config_from_args(args: argparse.Namespace) -> SearchBenchConfig:
    from benchmark.search_bench import (
        DEFAULT_OUT,
        QUICK,
        QUICK_OBJECT_STEPS,
        QUICK_SPATIAL_EPOCHS,
        SearchBenchConfig,
    )

    config = SearchBenchConfig()
    train = config.train
    if args.quick:
        config = replace(
            config,
            quick=True,
            max_images_per_set=int(QUICK["max_images_per_set"]),  # type: ignore[call-overload]
            sketches_per_class=int(QUICK["sketches_per_class"]),  # type: ignore[call-overload]
            seeds=(0,),
            out=DEFAULT_OUT / "quick",
        )
        train = replace(train, object_steps=QUICK_OBJECT_STEPS, spatial_epochs=QUICK_SPATIAL_EPOCHS)
    if args.seeds is not None:
        config = replace(config, seeds=tuple(range(args.seeds)))
    for flag in ("tau", "k"):
        if getattr(args, flag) is not None:
            config = replace(config, **{flag: getattr(args, flag)})
    if args.threads is not None:
        config = replace(config, num_threads=args.threads)
        train = replace(train, num_threads=args.threads)
    if args.object_steps is not None:
        train = replace(train, object_steps=args.object_steps)
    if args.spatial_epochs is not None:
        train = replace(train, spatial_epochs=args.spatial_epochs)
    if args.index_dim is not None:
        train = replace(train, model=replace(train.model, index_dim=args.index_dim))
    if args.out is not None:
        config = replace(config, out=args.out)
    return replace(config, train=train)


def run_search_command(args: argparse.Namespace) -> int:
    from benchmark.datasets import DatasetError
    from benchmark.search_bench import run_search_bench

    try:
        files = run_search_bench(config_from_args(args))
    except (DatasetError, FileNotFoundError) as exc:
        print(f"boxloop bench search: error: {exc}", file=sys.stderr)
        return 2
    for path in files:
        print(f"wrote {path}")
    return 0


def register_search(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``search`` under ``boxloop bench``."""
    parser = subparsers.add_parser(
        "search",
        help="compositional sketch search: mAP, NDCG, P@20 against baselines",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_search_arguments(parser)
    parser.set_defaults(func=run_search_command)
    return parser


_DESCRIPTION = """Compositional sketch search on the shared COCO, VOC and KITTI subsets together
(raccoon and BCCD as distractors): boxloop (sketches + layout) against class names + layout
(SemIR-like), single object (no layout) and random; mAP@200, NDCG@200 and P@20 by object count,
mean ± sd over seeds. Writes README.md, results.json and plots (default benchmark/results/search).
"""
