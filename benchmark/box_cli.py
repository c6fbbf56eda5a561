"""``boxloop bench box``: the box-level active-learning benchmark (:mod:`benchmark.box_al`).

Examples::

    boxloop bench box --config benchmark/configs/box.yaml       # BCCD, 3 seeds
    boxloop bench box --dataset voc:../shared/data/voc/BCCD --quick
    boxloop bench box --config benchmark/configs/box.yaml --image-measures coreset
        # adds image-level core-set to the stored runs; the other approaches are not rerun
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmark.config import ConfigError, load_yaml_mapping
from benchmark.datasets import DatasetError


def register(modes: Any) -> argparse.ArgumentParser:
    """Add the ``box`` mode to ``boxloop bench``'s modes."""
    parser = modes.add_parser(
        "box",
        help="box-level vs image-level active learning: mAP against boxes labelled",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML box grid (benchmark/configs/box.yaml)")
    parser.add_argument("--dataset", action="append", help="voc:PATH | kitti:PATH | coco:PATH")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1")
    parser.add_argument(
        "--box-measures",
        help="comma-separated box-level measures (random, uncertainty, entropy, margin, coreset)",
    )
    parser.add_argument(
        "--image-measures",
        help="comma-separated image-level measures (the mean over an image's boxes; coreset on "
        "ImgNet image features)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny campaign (CI)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--force", action="store_true", help="rerun stored runs")
    parser.add_argument(
        "--report", action="store_true", help="run nothing: rebuild the report from stored runs"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run_command)
    return parser


def build_box_config(args: argparse.Namespace) -> Any:
    from benchmark.box_config import QUICK, QUICK_DATASET, load_box_config

    data: dict[str, Any] = {}
    if args.config is not None:
        data = load_yaml_mapping(args.config)
    elif not args.dataset:
        raise ConfigError("give --config FILE or at least one --dataset SPEC")
    if args.dataset:
        data["datasets"] = [{"spec": spec} for spec in args.dataset]
    if args.quick:
        data.update({k: v for k, v in QUICK.items() if k != "yolox"})
        data["yolox"] = {**QUICK["yolox"], **dict(data.get("yolox", {}))}
        data["datasets"] = [
            {**({"spec": d} if isinstance(d, str) else d), **QUICK_DATASET}
            for d in data.get("datasets") or []
        ]
        data.setdefault("name", "box-quick")
        if args.out is None and args.config is None:
            data["output"] = "benchmark/results/box-quick"
    if args.seeds is not None:
        data["seeds"] = list(range(args.seeds))
    for flag in ("box_measures", "image_measures"):
        value = getattr(args, flag)
        if value is not None:
            data[flag] = [m.strip() for m in value.split(",") if m.strip()]
    if args.out is not None:
        data["output"] = args.out
    return load_box_config(data)


def run_command(args: argparse.Namespace) -> int:
    from benchmark.box_al import run_box_bench

    try:
        config = build_box_config(args)
        runs, files = run_box_bench(
            config, force=args.force, progress=not args.no_progress, report_only=args.report
        )
    except (ConfigError, DatasetError, FileNotFoundError) as exc:
        print(f"boxloop bench box: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(runs)} dataset × seed run(s)")
    for path in files:
        print(f"wrote {path}")
    return 0
