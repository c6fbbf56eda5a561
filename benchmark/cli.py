"""``boxloop bench``: run an experiment grid and write JSON, Markdown and PNG results.

``backend/`` must never import ``benchmark/``, so the backend's CLI finds this
command through the ``boxloop.commands`` entry point, which names
:func:`register`. :func:`main` runs it standalone (``python -m benchmark``).

Examples::

    boxloop bench --dataset kitti:../shared/data/kitti/tiny --strategy dissimilar \\
        --features imgnet --seeds 3
    boxloop bench --config benchmark/configs/quick.yaml      # the CI grid
    boxloop bench --config benchmark/configs/full.yaml       # the full grid
    boxloop bench --report benchmark/results/full            # rebuild report.md and plots
    boxloop bench box --config benchmark/configs/box.yaml    # box-level active learning
    boxloop bench utility --quick                            # image utility for machines
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark.config import (
    FEATURES,
    IGNORED_OBJECTS,
    LOOP_STRATEGIES,
    PRETRAINED,
    Approach,
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    load_config,
)
from benchmark.datasets import DatasetError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: What ``--quick`` changes in any grid: a capped dataset, small batches, one short
#: training per round and no extra final round, so a grid finishes in minutes on 2 cores.
QUICK_OVERRIDES: dict[str, Any] = {
    "batch_size": 6,
    "final_round": False,
    "max_images": 24,
    "holdout": 6,
}

#: Flags that change only how stored runs are evaluated (``--report`` honours them too).
EVALUATION_FLAGS = (
    ("iou", "iou_thresholds"),
    ("score_threshold", "score_thresholds"),
    ("seconds_per_box", "seconds_per_box"),
    ("ignored_objects", "ignored_objects"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML experiment grid (flags below override it)"
    )
    parser.add_argument(
        "--dataset",
        action="append",
        metavar="SPEC",
        help="voc:PATH | kitti:PATH | coco:PATH (repeatable)",
    )
    parser.add_argument(
        "--strategy",
        action="append",
        choices=[*LOOP_STRATEGIES, PRETRAINED],
        help="ordering strategy (repeatable); random and pretrained are always added as baselines",
    )
    parser.add_argument(
        "--features",
        action="append",
        choices=FEATURES,
        help="features for similar/dissimilar (repeatable)",
    )
    parser.add_argument("--seeds", type=int, metavar="N", help="seeds 0..N-1")
    parser.add_argument(
        "--seed",
        type=int,
        action="append",
        dest="seed_list",
        metavar="S",
        help="an explicit seed (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, help="images per annotation batch")
    parser.add_argument(
        "--iou",
        type=float,
        action="append",
        metavar="TAU",
        help="oracle IoU τ (repeatable; default 0.5 and 0.7)",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        action="append",
        metavar="S",
        help="score the annotator sees (repeatable)",
    )
    parser.add_argument(
        "--seconds-per-box",
        "-T",
        type=float,
        action="append",
        metavar="T",
        help="T in seconds (repeatable; default 7 and 35)",
    )
    parser.add_argument(
        "--ignored-objects",
        choices=IGNORED_OBJECTS,
        help="difficult / crowd objects in the main tables: excluded (each dataset's protocol, "
        "default) or counted (the paper's object counts; DontCare stays excluded); the report "
        "shows both",
    )
    parser.add_argument("--max-images", type=int, help="cap every dataset at N images")
    parser.add_argument(
        "--holdout", type=float, help="held-out images for mAP: a fraction < 1 or a count"
    )
    parser.add_argument(
        "--yolox",
        action="append",
        metavar="KEY=VALUE",
        help="YOLOX loop training setting, the default loop's (repeatable; a "
        "backend.training.yolox_train.YoloxTrainConfig field), e.g. max_epochs=10",
    )
    parser.add_argument(
        "--train",
        action="append",
        metavar="KEY=VALUE",
        help="Faster R-CNN training setting (repeatable; a backend.training.TrainConfig field), "
        "e.g. epochs=2: only for grids with STRATEGY@fasterrcnn approaches (--config)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch / onnxruntime threads per run (default 2)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="runs in flight at once, one process each (default 1); e.g. --workers 2 --threads 1",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="do not add the random and pretrained baselines"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CI mode: small capped datasets and short training"
    )
    parser.add_argument("--out", type=str, help="output folder (default from the config)")
    parser.add_argument(
        "--force", action="store_true", help="re-run runs whose JSON already exists"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="only rebuild report.md and plots from DIR/runs/*.json (--iou, --score-threshold, "
        "-T and --ignored-objects override the stored experiment's)",
    )


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "bench",
        help="simulate annotation campaigns and report the workload saved",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_command)
    # Other benchmarks are modes of ``bench`` with their own flags: ``boxloop bench box ...``.
    modes = parser.add_subparsers(dest="mode", metavar="MODE", required=False)
    from benchmark import box_cli

    box_cli.register(modes)
    from benchmark.search_cli import register_search

    register_search(modes)
    from benchmark import utility_cli

    utility_cli.register(modes)
    return parser


def _parse_value(text: str) -> Any:
    """``KEY=VALUE`` values as YAML scalars (``2`` → int, ``true`` → bool, ``0.01`` → float)."""
    import yaml

    return yaml.safe_load(text)


def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` flags as a mapping (values as YAML scalars, see :func:`_parse_value`)."""
    values: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        values[key.strip()] = _parse_value(value)
    return values


def _with_features(specs: Sequence[Any], features: Sequence[str]) -> list[str]:
    """The grid's approaches with each similar / dissimilar one run on each of ``features``
    (its detector kept), as ``--strategy`` builds them: ``--features`` overrides a YAML grid's
    features as the other flags override its keys, instead of being dropped."""
    approaches = [Approach.parse(spec) for spec in specs]
    if not any(a.strategy in ("similar", "dissimilar") for a in approaches):
        raise ConfigError(
            "--features needs --strategy similar or dissimilar (or a --config grid with "
            "similar or dissimilar approaches)"
        )
    out: list[Approach] = []
    for approach in approaches:
        if approach.strategy in ("similar", "dissimilar"):
            out += [dataclasses.replace(approach, features=f) for f in features]
        else:
            out.append(approach)
    return [a.spec for a in dict.fromkeys(out)]


def _check_train_flag(config: ExperimentConfig) -> None:
    """Refuse ``--train`` on a grid it cannot change: it sets the Faster R-CNN loop's training
    (``STRATEGY@fasterrcnn`` approaches) only, and the YOLOX loop reads ``--yolox``, so on any
    other grid it would only force a rerun with identical training."""
    if not any(a.retrains and a.detector == "fasterrcnn" for a in config.approaches):
        raise ConfigError(
            "--train sets the Faster R-CNN loop's training, and no approach of this grid uses it "
            "(STRATEGY@fasterrcnn, from a --config grid); the YOLOX loop's training is "
            "--yolox KEY=VALUE (e.g. --yolox max_epochs=10)"
        )


def build_config(args: argparse.Namespace) -> ExperimentConfig:
    """The experiment grid from ``--config`` (if any) with the flags applied on top."""
    data: dict[str, Any] = {}
    if args.config is not None:
        data = load_config(args.config).to_dict()
    elif not args.dataset:
        raise ConfigError("give --config FILE or at least one --dataset SPEC")
    if args.dataset:
        data["datasets"] = [{"spec": spec} for spec in args.dataset]
    if args.strategy:
        features = args.features or ["imgnet"]
        if args.features and not {"similar", "dissimilar"} & set(args.strategy):
            raise ConfigError("--features needs --strategy similar or dissimilar")
        approaches: list[Approach] = []
        for strategy in args.strategy:
            if strategy in ("similar", "dissimilar"):
                approaches += [Approach(strategy, f) for f in features]
            else:
                approaches.append(Approach(strategy))
        data["approaches"] = [a.spec for a in approaches]
    elif args.features:
        data["approaches"] = _with_features(data.get("approaches", []), args.features)
    data.setdefault("approaches", [])
    if args.seed_list:
        data["seeds"] = args.seed_list
    elif args.seeds is not None:
        data["seeds"] = list(range(args.seeds))
    for flag, key in (
        ("batch_size", "batch_size"),
        *EVALUATION_FLAGS,
        ("threads", "threads"),
        ("workers", "workers"),
        ("out", "output"),
    ):
        value = getattr(args, flag)
        if value is not None:
            data[key] = value
    if args.no_baselines:
        data["baselines"] = False
    train = {**dict(data.get("train", {})), **_key_values(args.train, "--train")}
    data["train"] = train
    data["yolox"] = {**dict(data.get("yolox", {})), **_key_values(args.yolox, "--yolox")}
    dataset_overrides: dict[str, Any] = {}
    if args.quick:
        data["batch_size"] = args.batch_size or QUICK_OVERRIDES["batch_size"]
        data["final_round"] = False
        dataset_overrides.update(
            max_images=QUICK_OVERRIDES["max_images"], holdout=QUICK_OVERRIDES["holdout"]
        )
        data["train"] = {**quick_train_settings(), **train}
        from benchmark.runner import QUICK_GATE, QUICK_YOLOX

        data["yolox"] = {**QUICK_YOLOX, **dict(data.get("yolox", {}))}
        data["gate"] = {**QUICK_GATE, **dict(data.get("gate", {}))}
        if args.config is None and args.out is None:
            data["output"] = "benchmark/results/quick"
    if args.max_images is not None:
        dataset_overrides["max_images"] = args.max_images
    if args.holdout is not None:
        dataset_overrides["holdout"] = args.holdout
    data["datasets"] = [{**d, **dataset_overrides} for d in data["datasets"]]
    if args.config is None:
        data.setdefault("name", "quick" if args.quick else "cli")
        if "output" not in data:
            data["output"] = f"benchmark/results/{data['name']}"
    config = config_from_dict(data)
    if args.train:
        _check_train_flag(config)
    return config


def quick_train_settings() -> dict[str, Any]:
    """Training overrides of ``--quick`` (kept in the quick YAML grid too)."""
    from benchmark.runner import QUICK_TRAIN

    return dict(QUICK_TRAIN)


def run_command(args: argparse.Namespace) -> int:
    from benchmark.reports import write_report
    from benchmark.runner import run_grid

    try:
        if args.report is not None:
            experiment = args.report / "experiment.json"
            if not experiment.is_file():
                raise ConfigError(
                    f"{experiment} not found: is {args.report} a bench output folder?"
                )
            data = json.loads(experiment.read_text())
            for flag, key in EVALUATION_FLAGS:
                if getattr(args, flag) is not None:
                    data[key] = getattr(args, flag)
            config = config_from_dict(data)
            files = write_report(args.report, config)
            print(f"wrote {', '.join(str(f) for f in files)}")
            return 0
        config = build_config(args)
        result = run_grid(config, force=args.force, show_progress=not args.no_progress)
    except (ConfigError, DatasetError) as exc:
        print(f"boxloop bench: error: {exc}", file=sys.stderr)
        return 2
    print(f"{result.ran} run(s) done, {result.reused} reused from {result.output / 'runs'}")
    for path in result.report_files:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry: ``python -m benchmark [bench] ARGS``."""
    parser = argparse.ArgumentParser(prog="boxloop", description="boxloop benchmark harness")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] != "bench" and args_list[0] not in ("-h", "--help")):
        args_list = ["bench", *args_list]
    args = parser.parse_args(args_list)
    return int(args.func(args))
