"""The loop grid's run keys: options added after a grid was stored must not invalidate it at their
defaults, and must give a new key when set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmark.config import ConfigError, PretrainedConfig, config_from_dict, load_config
from benchmark.runner import run_key

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
