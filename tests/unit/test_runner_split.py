"""The runner on small generated datasets: the held-out split keeps byte-identical images on one
side (and leaves duplicate-free datasets as they were), the run key, a run's recorded seconds,
and what each mAP point's model trained on."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

import benchmark.runner as runner
from backend.boxes import Boxes
from benchmark.config import Approach, DatasetConfig, ExperimentConfig
from benchmark.datasets import decode_images, load_dataset
from benchmark.reports import SCHEMA, write_json

XML = """<annotation><filename>{stem}.jpg</filename>
<size><width>32</width><height>24</height><depth>3</depth></size>
<object><name>cat</name><difficult>0</difficult>
<bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>16</ymax></bndbox></object>
</annotation>"""


def make_voc(root: Path, n: int, twins: dict[int, int] | None = None) -> str:
    """A VOC folder of ``n`` images of distinct colours, image ``i`` a byte copy of image
    ``twins[i]`` where given; its dataset spec."""
    twins = twins or {}
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    stems = [f"img{i:03d}" for i in range(n)]
    for i, stem in enumerate(stems):
        (root / "Annotations" / f"{stem}.xml").write_text(XML.format(stem=stem))
        path = root / "JPEGImages" / f"{stem}.jpg"
        if i in twins:
            shutil.copyfile(root / "JPEGImages" / f"{stems[twins[i]]}.jpg", path)
        else:
            Image.new("RGB", (32, 24), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(path)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (main / "trainval.txt").write_text("\n".join(stems) + "\n")
    return f"voc:{root}"


def old_split(config: DatasetConfig) -> tuple[list[str], list[str]]:
    """``prepare_dataset``'s split before identical images were grouped: (held-out, pool) ids."""
    dataset = load_dataset(config.spec)
    rng = np.random.default_rng(config.holdout_seed)
    n = len(dataset)
    if config.max_images is not None and config.max_images < n:
        dataset = dataset.subset(np.sort(rng.permutation(n)[: config.max_images]))
    dataset, _ = decode_images(dataset)
    n = len(dataset)
    perm = rng.permutation(n)
    n_holdout = config.holdout_count(n)
    ids = [s.image_id for s in dataset.samples]
    return [ids[i] for i in np.sort(perm[:n_holdout])], [ids[i] for i in np.sort(perm[n_holdout:])]


def ids(prepared: runner.PreparedDataset) -> tuple[list[str], list[str]]:
    return (
        [s.image_id for s in prepared.holdout.samples],
        [s.image_id for s in prepared.pool.samples],
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"holdout": 5},
        {"holdout": 0.3, "holdout_seed": 7},
        {"max_images": 17, "holdout": 4, "holdout_seed": 3},
    ],
)
def test_a_dataset_without_duplicates_keeps_its_old_split(
    tmp_path: Path, changes: dict[str, Any]
) -> None:
    config = DatasetConfig(make_voc(tmp_path / "voc", 23), **changes)
    prepared = runner.prepare_dataset(config)
    assert prepared.duplicates == []
    assert ids(prepared) == old_split(config)


def test_split_holdout_without_groups_is_the_plain_cut() -> None:
    rng = np.random.default_rng(0)
    for n in (2, 5, 40, 101):
        for n_holdout in (0, 1, n // 3, n - 1):
            perm = rng.permutation(n)
            held, pool = runner.split_holdout(perm, n_holdout)
            np.testing.assert_array_equal(held, np.sort(perm[:n_holdout]))
            np.testing.assert_array_equal(pool, np.sort(perm[n_holdout:]))


def test_identical_images_stay_on_one_side_and_are_recorded(tmp_path: Path) -> None:
    twins = {3: 0, 9: 0, 12: 5, 20: 17, 21: 2}  # a triple (0, 3, 9) and three pairs
    spec = make_voc(tmp_path / "voc", 24, twins)
    crossed_before = 0
    for seed in range(12):
        config = DatasetConfig(spec, holdout=0.4, holdout_seed=seed)
        prepared = runner.prepare_dataset(config)
        held = {digest(s.image_path) for s in prepared.holdout.samples}
        pool = {digest(s.image_path) for s in prepared.pool.samples}
        assert not held & pool, f"seed {seed}: an image on both sides"
        assert len(prepared.holdout) + len(prepared.pool) == 24
        assert prepared.duplicates == [
            ["img000", "img003", "img009"],
            ["img002", "img021"],
            ["img005", "img012"],
            ["img017", "img020"],
        ]
        old_held, old_pool = old_split(config)
        by_id = {s.image_id: digest(s.image_path) for s in prepared.dataset.samples}
        crossed_before += bool({by_id[i] for i in old_held} & {by_id[i] for i in old_pool})
        # only the duplicates moved, each to the side of its group's first member
        moved = {i for i in old_held if i not in {s.image_id for s in prepared.holdout.samples}}
        moved |= {i for i in old_pool if i not in {s.image_id for s in prepared.pool.samples}}
        assert moved <= {i for group in prepared.duplicates for i in group[1:]}
    assert crossed_before  # the old split did put twins on both sides


def test_run_key_changes_only_for_a_dataset_with_duplicates(tmp_path: Path) -> None:
    dataset = DatasetConfig("voc:/nowhere")
    config = ExperimentConfig("k", [dataset], [Approach("random")], output=str(tmp_path))
    plain = config.run_key(dataset, runner.resolved_training(config))
    assert runner.run_key(config, dataset) == runner.run_key(config, dataset, []) == plain
    with_twins = runner.run_key(config, dataset, [["a", "b"]])
    assert with_twins != plain
    assert with_twins != runner.run_key(config, dataset, [["a", "c"]])


def stored_run(path: Path, key: str, duplicates: list[list[str]] | None) -> None:
    run: dict[str, Any] = {
        "schema": SCHEMA,
        "run_key": key,
        "dataset": {"name": "x", "ignore_overlap": "iou"},
        "oracle": {"tight_iou": 0.85, "corrections": []},
        "batches": [],
    }
    if duplicates is not None:
        run["dataset"]["duplicate_images"] = duplicates
    write_json(path, run)


def test_a_run_split_before_duplicates_were_grouped_is_not_reused(tmp_path: Path) -> None:
    """A stored run without ``duplicate_images`` carries the old key: reused only when its
    dataset has no identical images."""
    plain = DatasetConfig(make_voc(tmp_path / "plain", 8), holdout=2)
    twins = DatasetConfig(make_voc(tmp_path / "twins", 8, {5: 1}), holdout=2)
    config = ExperimentConfig("k", [plain, twins], [Approach("random")], output=str(tmp_path))
    path = tmp_path / "run.json"
    for dataset, reused in ((plain, True), (twins, False)):
        stored_run(path, runner.run_key(config, dataset), None)  # the key before this fix
        keys = runner._DatasetKeys(config, dataset)
        assert (runner._cached(path, config, keys) is not None) is reused
    # a run that recorded the groups is checked against them, the dataset not read again
    groups = [["img001", "img005"]]
    stored_run(path, runner.run_key(config, twins, groups), groups)
    shutil.rmtree(tmp_path / "twins")
    assert runner._cached(path, config, runner._DatasetKeys(config, twins)) is not None


def grid(tmp_path: Path, spec: str, approach: Approach, batch_size: int) -> ExperimentConfig:
    return ExperimentConfig(
        "t",
        [DatasetConfig(spec, holdout=2)],
        [approach],
        seeds=[0],
        batch_size=batch_size,
        baselines=False,
        final_round=False,
        output=str(tmp_path / "out"),
    )


def test_total_seconds_count_features_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first run computes the pool features inside its wall time; a later run reads them
    from the dataset's cache and adds the seconds they took."""
    pause = 0.5

    def slow_features(name: str, images: list[Image.Image], *_: Any) -> np.ndarray:
        time.sleep(pause)
        return np.random.default_rng(0).random((len(images), 4)).astype(np.float32)

    monkeypatch.setattr(runner, "extract_features", slow_features)
    approach = Approach("dissimilar", "imgnet", "fasterrcnn")  # one batch, drawn: no training
    config = grid(tmp_path, make_voc(tmp_path / "voc", 8), approach, batch_size=100)
    prepared = runner.prepare_dataset(config.datasets[0])
    for computed_here in (True, False):
        start = time.perf_counter()
        run = runner.run_one(prepared, approach, 0, config)
        wall = time.perf_counter() - start
        seconds = run["seconds"]
        assert seconds["features"] >= pause
        if computed_here:
            assert seconds["total"] <= wall + 0.01
        else:
            assert seconds["features"] <= seconds["total"] <= wall + seconds["features"] + 0.01


class FakeDetector:
    def predict(self, images: list[Image.Image]) -> list[Boxes]:
        return [Boxes.empty(image.size, with_scores=True) for image in images]


class FakeLoop:
    """The YOLOX loop's surface: the COCO model serves, round 1 is rejected, round 2 promoted
    (trained on all but one of the labelled images: a validation slice)."""

    def __init__(self, labels: list[str], workdir: Path, **_: Any) -> None:
        self.gate = SimpleNamespace(calibration_images=0)
        self.serving = SimpleNamespace(
            version="pretrained", threshold=0.3, detector=FakeDetector(), trained_on=frozenset()
        )

    def round(self, items: list[tuple[str, Any, Any]], number: int, _: Any) -> Any:
        promoted = number == 2
        if promoted:
            self.serving = SimpleNamespace(
                version=f"v{number}",
                threshold=0.4,
                detector=FakeDetector(),
                trained_on=frozenset(key for key, _, _ in items[:-1]),
            )
        status = "promoted" if promoted else "rejected"
        return SimpleNamespace(metrics=lambda: {"status": status})


def test_map_points_say_what_their_model_trained_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "ProductLoop", FakeLoop)
    approach = Approach("random")
    config = grid(tmp_path, make_voc(tmp_path / "voc", 8), approach, batch_size=2)
    run = runner.run_one(runner.prepare_dataset(config.datasets[0]), approach, 0, config)
    points = [(p["images_labeled"], p["trained_images"]) for p in run["map_curve"]]
    # the COCO model before B1 and after the rejected round 1; then v2, trained on 3 of 4
    assert points == [(0, 0), (2, 0), (4, 3)]
    assert json.loads(json.dumps(run))["map_curve"][2]["trained_images"] == 3


def test_a_split_that_identical_images_leave_one_sided_is_refused(tmp_path: Path) -> None:
    """Every image a copy of one: the group goes to one side whole, leaving no pool or no
    held-out images, and a grid would run without a pool or score no mAP."""
    from benchmark.config import ConfigError

    spec = make_voc(tmp_path / "voc", 6, twins={i: 0 for i in range(1, 6)})
    with pytest.raises(ConfigError, match="identical images leave no"):
        runner.prepare_dataset(DatasetConfig(spec=spec, holdout=2))
