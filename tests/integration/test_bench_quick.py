"""``boxloop bench --quick`` end to end: a generated VOC dataset, then (if present) a shared subset.

These tests train real detectors through the backend's public API (a few
short rounds on small images), write the JSON runs, the Markdown report and
the PNG plots, and check what they say against the ground truth.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from benchmark.cli import main
from benchmark.config import Approach, ConfigError, config_from_dict, load_config
from benchmark.corrections import batch_boxes
from benchmark.datasets import SkippedImageWarning, default_shared_data, load_voc
from benchmark.reports import run_workload
from benchmark.runner import QUICK_GATE, QUICK_TRAIN, QUICK_YOLOX

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ("square", "disc")


def make_shapes_voc(root: Path, n: int = 20, seed: int = 0) -> Path:
    """A VOC-layout dataset of red squares and blue discs on noise; some discs are ``difficult``."""
    rng = np.random.default_rng(seed)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for k in range(n):
        stem = f"img{k:03d}"
        ids.append(stem)
        w, h = 160, 120
        noise = rng.integers(90, 160, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        objects = []
        for j in range(int(rng.integers(1, 4))):
            size = int(rng.integers(22, 44))
            x0, y0 = int(rng.integers(1, w - size)), int(rng.integers(1, h - size))
            cls = CLASSES[(k + j) % 2]
            if cls == "square":
                draw.rectangle([x0, y0, x0 + size, y0 + size], fill=(220, 30, 30))
            else:
                draw.ellipse([x0, y0, x0 + size, y0 + size], fill=(30, 40, 220))
            difficult = int(cls == "disc" and k % 5 == 4)
            objects.append(
                f"<object><name>{cls}</name><difficult>{difficult}</difficult><bndbox>"
                f"<xmin>{x0 + 1}</xmin><ymin>{y0 + 1}</ymin><xmax>{x0 + size + 1}</xmax>"
                f"<ymax>{y0 + size + 1}</ymax></bndbox></object>"
            )
        image.save(root / "JPEGImages" / f"{stem}.jpg", quality=92)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size>{''.join(objects)}</annotation>"
        )
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return root


def read_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def check_run(run: dict) -> None:
    """What every run must satisfy whatever the model predicted."""
    pool_ids = {i for b in run["batches"] for i in b["image_ids"]}
    assert (
        sorted(run["order"]) == sorted(pool_ids) and len(pool_ids) == run["dataset"]["pool_images"]
    )
    assert [i for b in run["batches"] for i in b["image_ids"]] == run["order"]
    assert sum(b["boxes"] for b in run["batches"]) == run["dataset"]["pool_boxes"]
    retrains = run["approach"]["strategy"] != "pretrained"
    product_loop = retrains and run["approach"]["detector"] == "yolox"
    if product_loop:
        # the serving version predicts each batch; drawn by hand only while nothing serves
        # (no label maps to COCO and no candidate has been promoted yet)
        for batch in run["batches"]:
            assert batch["manual"] is (batch["serving_version"] == "manual")
            if batch["index"] > 1:
                assert batch["gate"]["status"] in ("promoted", "rejected")
    else:
        assert run["batches"][0]["manual"] is retrains
    for batch in run["batches"][1:] if retrains else run["batches"]:
        if product_loop and batch["manual"]:
            continue
        assert not batch["manual"] and set(batch["predictions"]) == set(batch["image_ids"])
        for key, counts in batch["corrections"].items():
            boxes = batch_boxes(batch, "counted" if key.endswith("ignored=counted") else "excluded")
            assert counts["accepted"] + counts["additions"] == counts["gt"] == boxes
            assert (
                counts["accepted"] + counts["removals"] + counts["ignored"] == counts["predictions"]
            )
    if retrains:
        images = [p["images_labeled"] for p in run["map_curve"]]
        rounds = len(run["batches"]) - 1
        assert images == sorted(images)
        assert len(images) <= rounds + 1 if product_loop else len(images) == rounds
        assert run["seconds"]["train"] > 0


@pytest.mark.slow
def test_quick_bench_on_generated_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_shapes_voc(tmp_path / "shapes", n=13)
    # A partly downloaded JPEG (20 bytes missing) is skipped, not fatal: 12 images remain.
    broken = root / "JPEGImages" / "img012.jpg"
    broken.write_bytes(broken.read_bytes()[:-20])
    dataset = load_voc(root)
    assert dataset.labels == ["disc", "square"] and dataset.num_ignored > 0
    out = tmp_path / "out"
    argv = [
        "--dataset", f"voc:{root}",
        "--strategy", "dissimilar", "--features", "imgnet",
        "--seeds", "2", "--quick", "--holdout", "3", "--batch-size", "4",
        "--yolox", "max_epochs=2",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    with pytest.warns(SkippedImageWarning, match="img012"):
        assert main(["bench", *argv]) == 0
    assert "6 run(s) done, 0 reused" in capsys.readouterr().out

    runs = read_runs(out)
    assert {(r["approach"]["slug"], r["seed"]) for r in runs} == {
        (slug, seed) for slug in ("random", "pretrained", "dissimilar-imgnet") for seed in (0, 1)
    }
    for run in runs:
        check_run(run)
        assert run["config"]["yolox"]["max_epochs"] == 2 and run["dataset"]["pool_images"] == 9
        assert [b["images"] for b in run["batches"]] == [4, 4, 1]
        assert [s["image_id"] for s in run["dataset"]["skipped_images"]] == ["img012"]
    # The pool is the same for every run; the orders differ between strategies.
    orders = {r["approach"]["slug"]: r["order"] for r in runs if r["seed"] == 0}
    assert len({tuple(sorted(o)) for o in orders.values()}) == 1
    assert orders["dissimilar-imgnet"] != orders["random"]
    # No COCO class is called "square" or "disc": the pretrained detector predicts nothing,
    # so every box is an addition and nothing is saved over drawing by hand.
    config = load_config_from(out)
    pretrained = next(r for r in runs if r["approach"]["slug"] == "pretrained")
    assert run_workload(pretrained, config, 0.5, 0.5, "paper", 7.0).saved_t_pct == pytest.approx(
        0.0
    )

    report = (out / "report.md").read_text()
    for text in (
        "Table 1 (τ=0.5).",
        "Table 2 (τ=0.7).",
        "Table 1* (τ=0.5).",
        "strict convention",
        "Full manual",
        "Shuffle",
        "Dis (ImgNet)",
        "Pretrained only",
    ):
        assert text in report
    assert "τ=0.5" in report and "τ=0.7" in report and " ± " in report
    # Datasets row: labels, pool images, boxes, ignored, held-out, 1 skipped image, 3 batches.
    assert re.search(r"\| voc:shapes \| 2 \| 9 \| \d+ \| \d+ \| 3 \| 1 \| 3 \|", report)
    plots = sorted((out / "plots").glob("*.png"))
    assert [p.name for p in plots] == ["map_voc_shapes.png", "workload_voc_shapes.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in plots)

    # Same grid again: nothing re-runs. A YAML grid with other evaluation settings (τ, T)
    # re-counts the stored predictions instead of retraining, and reports the new columns.
    before = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}
    assert main(["bench", *argv]) == 0
    assert "0 run(s) done, 6 reused" in capsys.readouterr().out
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == before
    yaml_path = tmp_path / "grid.yaml"
    yaml_path.write_text(
        f"name: shapes\noutput: {out}\nseeds: [0, 1]\nbatch_size: 4\nfinal_round: false\n"
        f"datasets:\n  - spec: voc:{root}\n    max_images: 24\n    holdout: 3\n"
        "approaches: [dissimilar:imgnet]\niou_thresholds: [0.5, 0.6]\nseconds_per_box: [10]\n"
        # what --quick and --yolox set, so the runs are the same runs (the key holds train too)
        f"train: {json.dumps(QUICK_TRAIN)}\n"
        f"yolox: {json.dumps({**QUICK_YOLOX, 'max_epochs': 2})}\ngate: {json.dumps(QUICK_GATE)}\n"
    )
    assert main(["bench", "--config", str(yaml_path), "--no-progress"]) == 0
    assert "0 run(s) done, 6 reused" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "τ=0.6" in report and "T=10 s" in report
    after = read_runs(out)
    for run_before, run_after in zip(
        (json.loads(before[k]) for k in sorted(before)), after, strict=True
    ):
        assert run_after["order"] == run_before["order"]
        for b0, b1 in zip(run_before["batches"], run_after["batches"], strict=True):
            assert b1.get("predictions") == b0.get("predictions")
            if not b1["manual"]:
                key = "iou=0.5/score=0.5"
                assert b1["corrections"][key] == b0["corrections"][key]
                assert "iou=0.6/score=0.5" in b1["corrections"]
        check_run(run_after)
    assert main(["bench", "--report", str(out)]) == 0


def load_config_from(out: Path):  # type: ignore[no-untyped-def]
    return config_from_dict(json.loads((out / "experiment.json").read_text()))


@pytest.mark.slow
@pytest.mark.shared_data
def test_quick_bench_on_shared_kitti_subset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kitti = default_shared_data() / "kitti" / "tiny"
    if not kitti.is_dir():
        pytest.skip(f"shared KITTI subset not found at {kitti} (set BOXLOOP_SHARED_DATA)")
    out = tmp_path / "kitti"
    argv = [
        "bench", "--dataset", f"kitti:{kitti}", "--strategy", "temporal", "--seeds", "1",
        "--quick", "--max-images", "10", "--holdout", "2", "--batch-size", "4",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    runs = {r["approach"]["slug"]: r for r in read_runs(out)}
    assert set(runs) == {"temporal", "random", "pretrained"}
    # KITTI frames are consecutive: temporal = the frames in file-name order
    assert runs["temporal"]["order"] == sorted(runs["temporal"]["order"])
    assert runs["random"]["order"] != runs["temporal"]["order"]
    for run in runs.values():
        check_run(run)
        assert (
            run["dataset"]["ignore_overlap"] == "pred_area" and len(run["dataset"]["labels"]) == 8
        )
    # YOLOX-Nano knows cars: mapped by name, it must get some KITTI car right.
    pretrained = runs["pretrained"]
    accepted = sum(b["corrections"]["iou=0.5/score=0.5"]["accepted"] for b in pretrained["batches"])
    assert accepted > 0
    assert pretrained["map_curve"][0]["map50"] > 0
    assert "kitti:tiny" in (out / "report.md").read_text()


def test_config_parsing_and_errors(tmp_path: Path) -> None:
    config = config_from_dict(
        {
            "datasets": ["kitti:/x"],
            "approaches": ["dissimilar:simnet", {"strategy": "similar", "features": "imgnet"}],
            "seeds": 3,
        }
    )
    assert config.seeds == [0, 1, 2]
    assert [a.label for a in config.approaches] == [
        "Pretrained only (YOLOX-Nano)", "Shuffle", "Dis (SimNet)", "Sim (ImgNet)",
    ]  # fmt: skip
    assert config.datasets[0].display_name == "kitti:x"
    assert config_from_dict(config.to_dict()) == config  # experiment.json round-trips
    no_baselines = config_from_dict(
        {"datasets": ["kitti:/x"], "approaches": ["random"], "baselines": False}
    )
    assert no_baselines.approaches == [Approach("random")]
    dataset = config.datasets[0]
    evaluation_only = config.with_overrides(iou_thresholds=[0.3], seconds_per_box=[60.0])
    assert evaluation_only.run_key(dataset) == config.run_key(dataset)
    assert config.with_overrides(batch_size=3).run_key(dataset) != config.run_key(dataset)
    other = config_from_dict({"datasets": [{"spec": "kitti:/x", "max_images": 9}]}).datasets[0]
    assert config.run_key(other) != config.run_key(dataset)
    for bad, message in [
        ({"datasets": []}, "no datasets"),
        ({"datasets": ["kitti:/x"], "approaches": ["dissimilar"]}, "needs features"),
        ({"datasets": ["kitti:/x"], "approaches": ["fancy"]}, "unknown strategy"),
        ({"datasets": ["kitti:/x"], "score_thresholds": [0.01]}, "below prediction_floor"),
        ({"datasets": ["kitti:/x"], "iou_thresholds": [1.5]}, "outside"),
        ({"datasets": ["kitti:/x"], "colour": "red"}, "config: unknown keys"),
        ({"datasets": [{"spec": "kitti:/x", "holdout_fraction": 0.1}]}, "unknown keys"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(bad)
    path = tmp_path / "bad.yaml"
    path.write_text("datasets: [kitti:/x\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(path)


def test_shipped_grids_parse() -> None:
    configs = Path(__file__).resolve().parents[2] / "benchmark" / "configs"
    quick, full = load_config(configs / "quick.yaml"), load_config(configs / "full.yaml")
    assert len(quick.approaches) == 3 and quick.train["epochs"] == 2
    assert {d.display_name for d in full.datasets} == {"voc:VOC2012", "kitti:tiny", "coco:mini"}
    assert len(full.seeds) >= 3
    # the table: random / similar / dissimilar (ImgNet and SimNet) / temporal + baselines
    assert {a.slug for a in full.approaches} == {
        "pretrained", "random-fasterrcnn", "temporal-fasterrcnn",
        "similar-imgnet-fasterrcnn", "dissimilar-imgnet-fasterrcnn",
        "similar-simnet-fasterrcnn", "dissimilar-simnet-fasterrcnn",
    }  # fmt: skip
    loop = load_config(configs / "loop.yaml")
    assert {d.display_name for d in loop.datasets} >= {"voc:raccoon", "voc:BCCD"}
    assert all(a.detector == "yolox" for a in loop.approaches)


def test_cli_errors_are_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--seeds", "2"]) == 2
    assert "--dataset" in capsys.readouterr().err
    assert main(["bench", "--dataset", "yolo:/x"]) == 2
    assert "must start with one of" in capsys.readouterr().err


@pytest.mark.slow
def test_runs_in_two_worker_processes_equal_runs_in_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--workers 2`` spreads the runs over two processes; every run's result is unchanged."""
    root = make_shapes_voc(tmp_path / "shapes", n=14)
    argv = [
        "--dataset", f"voc:{root}", "--strategy", "random", "--no-baselines",
        "--seeds", "2", "--quick", "--holdout", "2", "--batch-size", "4",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert main(["bench", *argv, "--workers", "2", "--out", str(tmp_path / "two")]) == 0
    assert "2 run(s) done, 0 reused" in capsys.readouterr().out
    assert main(["bench", *argv, "--out", str(tmp_path / "one")]) == 0
    two, one = read_runs(tmp_path / "two"), read_runs(tmp_path / "one")
    assert [(r["seed"], r["order"]) for r in two] == [(r["seed"], r["order"]) for r in one]
    for a, b in zip(two, one, strict=True):
        # batches, the gate's scores of each round's candidate, predictions and corrections:
        # all equal but the timers
        assert len(a["batches"]) == 3 and "gate" in a["batches"][1]
        untimed = [
            [{k: v for k, v in x.items() if k != "seconds"} for x in r["batches"]] for r in (a, b)
        ]
        assert untimed[0] == untimed[1]
        assert a["map_curve"] == b["map_curve"]
    assert load_config_from(tmp_path / "two").workers == 2
    with pytest.raises(ConfigError, match="workers"):
        config_from_dict({"datasets": ["voc:/x"], "approaches": ["random"], "workers": 0})
