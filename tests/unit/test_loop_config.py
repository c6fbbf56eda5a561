"""The loop grid's run keys: options added after a grid was stored must not invalidate it at their
defaults, and must give a new key when set."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from benchmark.cli import add_arguments, build_config
from benchmark.config import (
    ConfigError,
    ExperimentConfig,
    PretrainedConfig,
    config_from_dict,
    load_config,
    load_yaml_mapping,
    parse_seeds,
)
from benchmark.product_loop import yolox_config
from benchmark.runner import QUICK_YOLOX, run_key

ROOT = Path(__file__).resolve().parents[2]


def test_stored_loop_grid_keeps_its_run_keys_and_an_aspect_input_gets_its_own() -> None:
    config = load_config(ROOT / "benchmark" / "configs" / "loop.yaml")
    assert config.pretrained.input == "square"
    runs = sorted((ROOT / "benchmark" / "results" / "loop" / "runs").glob("*.json"))
    assert runs, "the stored loop grid is missing"
    by_name = {d.display_name: d for d in config.datasets}
    for path in runs:
        run = json.loads(path.read_text())
        assert run["run_key"] == run_key(config, by_name[run["dataset"]["name"]]), path.name
    aspect = dataclasses.replace(
        config, pretrained=dataclasses.replace(config.pretrained, input="aspect")
    )
    dataset = config.datasets[0]
    assert run_key(aspect, dataset) != run_key(config, dataset)
    with pytest.raises(ConfigError, match="square or aspect"):
        PretrainedConfig(input="wide")


def test_two_datasets_named_alike_are_refused_at_load() -> None:
    """One folder with another ``?split=`` or ``max_images`` gets the same default name, so the
    two would write one run file, one run overwriting the other: a ``name:`` each is required."""
    bccd = "voc:/data/voc/BCCD"
    grid = {"approaches": ["random"], "seeds": [0]}
    for datasets in (
        [f"{bccd}?split=train", f"{bccd}?split=test"],
        [{"spec": bccd}, {"spec": bccd, "max_images": 20}],
        [{"spec": bccd, "name": "voc:bccd"}, {"spec": "voc:/other/x", "name": "voc_BCCD"}],
    ):
        with pytest.raises(ConfigError, match=r"overwrite each other's files.*`name:`"):
            config_from_dict({**grid, "datasets": datasets})
    named = config_from_dict(
        {
            **grid,
            "datasets": [
                {"spec": f"{bccd}?split=train", "name": "bccd-train"},
                {"spec": f"{bccd}?split=test", "name": "bccd-test"},
            ],
        }
    )
    assert [d.display_name for d in named.datasets] == ["bccd-train", "bccd-test"]


def bench_config(tmp_path: Path, grid: str, *flags: str) -> ExperimentConfig:
    """The grid ``boxloop bench --config GRID FLAGS`` would run (nothing is run)."""
    path = tmp_path / "grid.yaml"
    path.write_text(grid)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_config(parser.parse_args(["--config", str(path), *flags]))


GRID = "datasets: ['kitti:/x']\nseeds: [0]\napproaches: [dissimilar:imgnet, temporal]\n"


def test_yolox_flag_reaches_the_product_loop_and_train_reaches_faster_rcnn(tmp_path: Path) -> None:
    """``--yolox`` fills the grid's ``yolox`` section (what :class:`ProductLoop` trains with),
    over the YAML's and ``--quick``'s; ``--train`` is taken only by a grid with a Faster R-CNN
    loop, the one that reads it."""
    plain = bench_config(tmp_path, GRID)
    tuned = bench_config(tmp_path, GRID + "yolox: {lr: 0.002}\n", "--yolox", "max_epochs=10")
    assert tuned.yolox == {"lr": 0.002, "max_epochs": 10}
    assert yolox_config(tuned.yolox).max_epochs == 10
    assert run_key(tuned, tuned.datasets[0]) != run_key(plain, plain.datasets[0])
    quick = bench_config(tmp_path, GRID, "--quick", "--yolox", "max_epochs=3")
    assert quick.yolox == {**QUICK_YOLOX, "max_epochs": 3}
    with pytest.raises(ConfigError, match="--train sets the Faster R-CNN loop's training"):
        bench_config(tmp_path, GRID, "--train", "epochs=1")
    mixed = bench_config(
        tmp_path, GRID.replace("temporal", "temporal@fasterrcnn"), "--train", "epochs=1"
    )
    assert mixed.train == {"epochs": 1}
    assert run_key(mixed, mixed.datasets[0]) != run_key(plain, plain.datasets[0])


def test_features_flag_overrides_a_yaml_grids_features(tmp_path: Path) -> None:
    """``--config GRID --features F``: each similar / dissimilar approach of the grid runs on
    the features given (its detector kept), as every other flag overrides the YAML."""
    grid = GRID.replace("temporal", "similar:imgnet@fasterrcnn")
    config = bench_config(tmp_path, grid, "--features", "simnet", "--features", "imgnet")
    assert [a.spec for a in config.approaches] == [
        "pretrained", "random", "dissimilar:simnet", "dissimilar:imgnet",
        "similar:simnet@fasterrcnn", "similar:imgnet@fasterrcnn",
    ]  # fmt: skip
    assert [a.spec for a in bench_config(tmp_path, grid).approaches][2:] == [
        "dissimilar:imgnet",
        "similar:imgnet@fasterrcnn",
    ]


def test_seed_count_and_yaml_errors_of_the_grid_loader(tmp_path: Path) -> None:
    assert parse_seeds(3) == [0, 1, 2] and parse_seeds([2, "5"]) == [2, 5]
    for bad in (0, [], [1, 1]):
        with pytest.raises(ConfigError, match="distinct and non-empty"):
            parse_seeds(bad)
    with pytest.raises(ConfigError, match="integers or a count"):
        parse_seeds(["x"])
    path = tmp_path / "bad.yaml"
    path.write_text("seeds: [0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML at line 2") as info:
        load_yaml_mapping(path)
    assert "\n" not in str(info.value)
    path.write_text("")
    assert load_yaml_mapping(path) == {}


def test_a_prediction_floor_above_the_gates_floor_is_refused_before_the_grid_writes(
    tmp_path: Path,
) -> None:
    """The product loop keeps the serving version's boxes down to ``prediction_floor`` only,
    and the gate scores it down to its own ``score_floor``: a higher floor was found only when
    the first loop started, partway through a grid."""
    from benchmark.runner import resolved_training

    data = {
        "name": "g",
        "output": str(tmp_path / "out"),
        "datasets": [f"voc:{tmp_path}/x"],
        "approaches": ["random"],
        "prediction_floor": 0.2,
    }
    with pytest.raises(ConfigError, match=r"prediction_floor 0\.2 is above the gate.s lowest"):
        resolved_training(config_from_dict(data))
    resolved_training(config_from_dict({**data, "prediction_floor": 0.05}))
