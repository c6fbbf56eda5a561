"""The box bench's config: what its run key holds, so stored grids stay reusable."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmark.box_config import load_box_config, load_box_yaml
from benchmark.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_stored_box_grids_keep_their_run_keys_and_a_warm_start_gets_its_own() -> None:
    """``warm_start`` came after the stored grids: at its default (False) every stored run of
    ``box.yaml`` still matches its key, so the grid is reused, not rerun; True is another run."""
    config = load_box_yaml(ROOT / "benchmark" / "configs" / "box.yaml")
    assert config.warm_start is False
    runs = sorted((ROOT / "benchmark" / "results" / "box" / "runs").glob("*.json"))
    assert runs, "the stored box grid is missing"
    by_name = {d.display_name: d for d in config.datasets}
    for path in runs:
        run = json.loads(path.read_text())
        dataset = by_name[run["dataset"]]
        assert run["run_key"] == config.run_key(dataset, run["seed"]), path.name
    warm = dataclasses.replace(config, warm_start=True)
    dataset = config.datasets[0]
    assert warm.run_key(dataset, 0) != config.run_key(dataset, 0)


def test_box_grid_refuses_two_datasets_named_alike() -> None:
    """The box bench writes ``runs/<name>__seed<s>.json``: two datasets of one name would share
    it, so the grid is refused until each has its own ``name:``."""
    bccd = "voc:/data/voc/BCCD"
    with pytest.raises(ConfigError, match=r"both named 'voc:BCCD'.*`name:`"):
        load_box_config({"datasets": [bccd, {"spec": bccd, "max_images": 20}]})
    config = load_box_config(
        {"datasets": [bccd, {"spec": bccd, "max_images": 20, "name": "voc:BCCD-20"}]}
    )
    assert [d.display_name for d in config.datasets] == ["voc:BCCD", "voc:BCCD-20"]


def test_box_grid_reads_seeds_and_datasets_as_the_main_bench_does() -> None:
    """``seeds: 3`` means seeds 0, 1, 2 (it was a ``TypeError``); no seeds, or an unknown key in
    a dataset entry (a ``TypeError`` before), is a :class:`ConfigError` naming it."""
    spec = "voc:/data/voc/BCCD"
    assert load_box_config({"datasets": [spec], "seeds": 3}).seeds == (0, 1, 2)
    assert load_box_config({"datasets": spec, "seeds": [5]}).seeds == (5,)
    with pytest.raises(ConfigError, match="distinct and non-empty"):
        load_box_config({"datasets": [spec], "seeds": []})
    with pytest.raises(ConfigError, match=r"unknown keys \['holdout_fraction'\]"):
        load_box_config({"datasets": [{"spec": spec, "holdout_fraction": 0.2}]})


def test_box_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "box.yaml"
    path.write_text("datasets: [voc:/x\n")
    with pytest.raises(ConfigError, match=r"box\.yaml: not valid YAML"):
        load_box_yaml(path)
    path.write_text("- voc:/x\n")
    with pytest.raises(ConfigError, match=r"box\.yaml: config must be a mapping, got list"):
        load_box_yaml(path)


def test_box_bench_sizes_its_input_with_the_grids_side_bounds(tmp_path: Path) -> None:
    """A wide (KITTI-like) dataset under ``yolox: {max_side: 512}``: the campaign's input is the
    shape the training config gives (at most 512 wide), not the default bounds' 768-wide one
    (``_Data.of`` built a config of ``input_area`` alone and dropped the side bounds)."""
    from PIL import Image

    from backend.training.yolox_train import input_shape_for
    from benchmark.box_al import _Data
    from benchmark.product_loop import yolox_config
    from benchmark.runner import prepare_dataset

    root = tmp_path / "kitti" / "training"
    (root / "image_2").mkdir(parents=True)
    (root / "label_2").mkdir()
    for i in range(4):
        Image.new("RGB", (1240, 376), (90 + i, 90, 90)).save(root / "image_2" / f"{i:06d}.png")
        (root / "label_2" / f"{i:06d}.txt").write_text(
            "Car 0.00 0 -0.20 100 150 300 250 1.89 0.48 1.20 1.84 1.47 8.41 0.01\n"
        )
    config = load_box_config(
        {"datasets": [{"spec": f"kitti:{root}", "holdout": 1}], "yolox": {"max_side": 512}}
    )
    yolox = yolox_config(config.yolox, seed=0, threads=1)
    data = _Data.of(prepare_dataset(config.datasets[0]), yolox)
    sizes = [im.size for im in data.pool_images]
    assert len(sizes) == 3
    assert data.input_hw == input_shape_for(sizes, yolox)
    assert data.input_hw[1] <= 512
    assert data.input_hw != input_shape_for(sizes, yolox_config({}))  # the bound matters here


def test_a_stored_box_run_is_found_by_the_identical_images_it_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one truncated file are twins to a file hash but skipped when decoding: the
    lookup used the files' groups and the stored key the decoded ones, so such a run was never
    found again (every invocation reran it; ``--report`` said no stored runs)."""
    import io
    import json
    import warnings

    import numpy as np
    from PIL import Image

    import benchmark.box_al as box_al
    from benchmark.box_config import BoxBenchConfig
    from benchmark.config import DatasetConfig
    from benchmark.runner import dataset_duplicates, prepare_dataset
    from tests.unit.test_runner_split import make_voc

    root = tmp_path / "voc"
    spec = make_voc(root, 12)
    buffer = io.BytesIO()
    pixels = (np.random.default_rng(0).random((24, 32, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(buffer, "JPEG")
    for stem in ("img010", "img011"):  # the same cut-short download twice
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes(buffer.getvalue()[:-40])
    dataset = DatasetConfig(spec=spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_dataset(dataset)
    assert dataset_duplicates(dataset) == [["img010", "img011"]] and prepared.duplicates == []
    config = BoxBenchConfig(datasets=(dataset,), seeds=(0,), output=str(tmp_path / "grid"))
    run = {
        "schema": box_al.SCHEMA,
        "run_key": config.run_key(dataset, 0, prepared.duplicates),  # as run_dataset_seed stores
        "duplicate_images": prepared.duplicates,
        "curves": {a: [] for a in config.approaches},
    }
    (tmp_path / "grid" / "runs").mkdir(parents=True)
    (tmp_path / "grid" / "runs" / f"{box_al._slug(dataset.display_name)}__seed0.json").write_text(
        json.dumps(run)
    )
    monkeypatch.setattr(box_al, "write_box_report", lambda out, config, runs: [])
    runs, _ = box_al.run_box_bench(config, progress=False, report_only=True)
    assert [r["run_key"] for r in runs] == [run["run_key"]]
