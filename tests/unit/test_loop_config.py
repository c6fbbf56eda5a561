"""The loop grid's run keys: options added after a grid was stored must not invalidate it at their
defaults, and must give a new key when set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmark.config import ConfigError, PretrainedConfig, load_config
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
