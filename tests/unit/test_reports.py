"""Report readings on a hand-built run: per score threshold, the gate's threshold, ignored objects."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from backend.boxes import ANY_CLASS
from benchmark.config import Approach, DatasetConfig, ExperimentConfig
from benchmark.corrections import GATE, batch_boxes, correction_key, refresh_corrections
from benchmark.reports import (
    SCHEMA,
    StaleRunWarning,
    load_grid_runs,
    markdown_report,
    run_workload,
    write_report,
)

SIZE = [100, 100]
CAT = [0, 0, 40, 40]
DIFFICULT = [50, 50, 90, 90]  # a difficult cat
ELSEWHERE = [0, 60, 20, 80]


def gt_json() -> dict[str, Any]:
    return {
        "xyxy": [CAT, DIFFICULT],
        "labels": [0, 0],
        "image_size": SIZE,
        "ignore": [False, True],
    }


def make_run(approach: str, seed: int, gate_threshold: float | None) -> dict[str, Any]:
    """B1 drawn by hand (image a), B2 corrected (image b); each image: a cat and a difficult cat.

    B2's predictions: the cat (0.9), the difficult cat (0.6), a false cat elsewhere (0.4).
    """
    b2: dict[str, Any] = {
        "index": 2,
        "image_ids": ["b"],
        "images": 1,
        "boxes": 1,
        "ignored_regions": 1,
        "ground_truth": {"b": gt_json()},
        "manual": False,
        "predictions": {
            "b": {
                "xyxy": [CAT, DIFFICULT, ELSEWHERE],
                "labels": [0, 0, 0],
                "image_size": SIZE,
                "scores": [0.9, 0.6, 0.4],
            }
        },
        "corrections": {},
    }
    if gate_threshold is not None:
        b2["gate_threshold"] = gate_threshold
    return {
        "run_id": f"{approach}-{seed}",
        "seed": seed,
        "dataset": {
            "name": "voc:toy",
            "labels": ["cat"],
            "ignore_overlap": "iou",
            "pool_images": 2,
            "pool_boxes": 2,
            "pool_ignored": 2,
            "holdout_images": 0,
            "skipped_images": ["broken.jpg"],
        },
        "approach": {"label": approach},
        "oracle": {"tight_iou": 0.85, "corrections": []},
        "batches": [
            {
                "index": 1,
                "image_ids": ["a"],
                "images": 1,
                "boxes": 1,
                "ignored_regions": 1,
                "ground_truth": {"a": gt_json()},
                "manual": True,
                "predictions": None,
                "corrections": {},
            },
            b2,
        ],
        "map_curve": [],
        "seconds": {},
    }


def config(**changes: Any) -> ExperimentConfig:
    base = ExperimentConfig(
        name="toy",
        datasets=[DatasetConfig("voc:/nowhere")],
        approaches=[Approach("dissimilar", "imgnet")],
        seeds=[0, 1],
        iou_thresholds=[0.5],
        score_thresholds=[0.3, 0.5, 0.7],
        seconds_per_box=[7.0],
    )
    return base.with_overrides(**changes)


def test_reductions_per_threshold_gate_and_ignored_treatment() -> None:
    cfg = config()
    run = make_run("Dis (ImgNet)", 0, gate_threshold=0.5)
    assert refresh_corrections(run, cfg)
    assert not refresh_corrections(run, cfg)  # nothing left to count
    b2 = run["batches"][1]["corrections"]
    assert b2[correction_key(0.5, GATE)] == b2[correction_key(0.5, 0.5)]

    def saved(score: float | str, ignored: str) -> tuple[float, float]:
        w = run_workload(run, cfg, 0.5, score, "paper", 7.0, ignored)  # type: ignore[arg-type]
        return round(w.saved_t_pct, 3), round(w.saved_b_pct, 3)

    # Excluded: N = 2 (B1n = 1). 0.3: R = 1 (the false cat), the difficult one is ignored:
    # W_T = 1 + 0.5 = 1.5 → 25 %, W_B = 2 → 0 %. 0.5 / 0.7 / gate (0.5): nothing to fix → 50 %.
    assert saved(0.3, "excluded") == (25.0, 0.0)
    assert saved(0.5, "excluded") == saved(0.7, "excluded") == saved(GATE, "excluded") == (50, 50)
    # Counted: N = 4 (B1n = 2). 0.3: both cats accepted, R = 1: W_T = 2.5 → 37.5 %, W_B 3 → 25 %.
    # 0.5: both accepted → 50 %. 0.7: the difficult cat must be drawn (A = 1): W_T 3 → 25 %.
    assert saved(0.3, "counted") == (37.5, 25.0)
    assert saved(0.5, "counted") == (50.0, 50.0)
    assert saved(0.7, "counted") == (25.0, 25.0)
    # The config's treatment is the default.
    assert (
        run_workload(run, config(ignored_objects="counted"), 0.5, 0.7, "paper", 7.0).saved_t_pct
        == 25
    )


def test_report_has_a_column_per_threshold_and_says_which_objects_count() -> None:
    cfg = config()
    runs = [make_run("Dis (ImgNet)", s, gate_threshold=0.5) for s in (0, 1)]
    runs += [make_run("Shuffle", s, gate_threshold=None) for s in (0, 1)]
    for run in runs:
        refresh_corrections(run, cfg)
    text = markdown_report(runs, cfg)
    table1 = text.split("### Table 1 (τ=0.5)")[1].split("###")[0]
    assert "| score ≥ 0.3 | score ≥ 0.5 | score ≥ 0.7 | gate's threshold |" in table1
    assert "objects **excluded**" in table1
    dis = next(line for line in table1.splitlines() if "| Dis (ImgNet) |" in line)
    assert [c.strip(" *") for c in dis.split("|")[3:7]] == [
        "25.00 ± 0.00",
        "50.00 ± 0.00",
        "50.00 ± 0.00",
        "50.00 ± 0.00",
    ]
    shuffle = next(line for line in table1.splitlines() if "| Shuffle |" in line)
    assert shuffle.split("|")[6].strip() == "–"  # no gate threshold recorded
    other = text.split("### Table 1* (τ=0.5)")[1].split("###")[0]
    assert "objects **counted**" in other
    dis = next(line for line in other.splitlines() if "| Dis (ImgNet) |" in line)
    assert dis.split("|")[5].strip(" *") == "25.00 ± 0.00"  # score ≥ 0.7, counted
    assert "| skipped images |" in text and "| voc:toy | 1 | 2 | 2 | 2 | 0 | 1 | 2 |" in text
    assert "the paper gives no value for it" in text


def test_no_gate_column_without_gate_thresholds_and_counted_main_tables() -> None:
    cfg = config(ignored_objects="counted")
    runs = [make_run("Shuffle", 0, gate_threshold=None)]
    refresh_corrections(runs[0], cfg)
    text = markdown_report(runs, cfg)
    assert "gate's threshold" not in text
    table1 = text.split("### Table 1 (τ=0.5)")[1].split("###")[0]
    assert "objects **counted**" in table1
    assert "objects **excluded**" in text.split("### Table 1* (τ=0.5)")[1].split("###")[0]


@pytest.mark.parametrize("bad", ["both", "included"])
def test_ignored_objects_is_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="ignored_objects"):
        config(ignored_objects=bad)


def test_gate_key_needs_a_gate_threshold() -> None:
    cfg = config()
    run = make_run("Shuffle", 0, gate_threshold=None)
    refresh_corrections(run, cfg)
    with pytest.raises(KeyError):
        run_workload(run, cfg, 0.5, GATE, "paper", 7.0)


def test_counted_draws_ignored_objects_but_never_dont_care_regions() -> None:
    """The paper counts VOC's difficult objects (30,638 in VOC 2007) but not KITTI's DontCare
    rows (40,570 instances "of 8 class categories"). Before, "counted" charged every DontCare
    region as a box to draw, and a prediction inside one as a removal."""
    run = make_run("Dis (ImgNet)", 0, gate_threshold=None)
    for batch in run["batches"]:
        for truth in batch["ground_truth"].values():
            truth["labels"] = [0, ANY_CLASS]  # the difficult cat becomes a DontCare region
    cfg = config()
    refresh_corrections(run, cfg)
    assert [batch_boxes(b, "counted") for b in run["batches"]] == [1, 1]
    for score in (0.3, 0.5, 0.7):
        counted_w = run_workload(run, cfg, 0.5, score, "paper", 7.0, "counted")
        excluded_w = run_workload(run, cfg, 0.5, score, "paper", 7.0, "excluded")
        assert counted_w.saved_t_pct == excluded_w.saved_t_pct


def test_counts_made_under_the_old_counted_rule_are_made_again() -> None:
    run = make_run("Dis (ImgNet)", 0, gate_threshold=None)
    cfg = config()
    refresh_corrections(run, cfg)
    stale_key = correction_key(0.5, 0.7, "counted")
    run["oracle"].pop("counted_rule")
    run["batches"][1]["corrections"][stale_key] = {"stale": True}
    assert refresh_corrections(run, cfg)
    assert "stale" not in run["batches"][1]["corrections"][stale_key]


# ------------------------------------------------------------------ the runs of a grid's folder
def grid_config() -> ExperimentConfig:
    return config(datasets=[DatasetConfig("voc:/nowhere", name="voc:toy")], batch_size=1)


def grid_run(slug: str = "dissimilar-imgnet", seed: int = 0, **changes: Any) -> dict[str, Any]:
    """A stored run of :func:`grid_config`'s grid (key ``"now"``), with ``changes``."""
    run = make_run("Dis (ImgNet)", seed, gate_threshold=None)
    run["dataset"]["spec"] = "voc:/nowhere"
    run["approach"]["slug"] = slug
    run.update(schema=SCHEMA, run_key="now", batch_size=1)
    run.update(changes)
    return run


def key_now(dataset: DatasetConfig, duplicates: Sequence[Sequence[str]]) -> str:
    """The run key this code gives (``runner.run_key`` bound to the config, in the CLI)."""
    assert dataset.display_name == "voc:toy"
    return "now+twins" if duplicates else "now"


def test_report_of_a_folder_reads_only_the_runs_of_its_grid(tmp_path: Path) -> None:
    """Before, ``--report DIR`` averaged in every ``runs/*.json``: an earlier grid's seeds and
    approaches, and runs made with another batch size or settings."""
    twins = grid_run(seed=1, run_key="now+twins")
    twins["dataset"]["duplicate_images"] = [["a", "b"]]
    files = {
        "kept_seed0": grid_run(),
        "kept_seed1_twins": twins,
        "other_seed": grid_run(seed=2),
        "other_approach": grid_run("similar-imgnet"),
        "other_batch_size": grid_run(batch_size=4),
        "other_key": grid_run(run_key="older"),
        "twins_old_key": {**twins, "run_key": "now"},
        "unknown_schema": grid_run(schema=SCHEMA + 1),
    }
    other_dataset = grid_run()
    other_dataset["dataset"]["name"] = "voc:other"
    files["other_dataset"] = other_dataset
    (tmp_path / "runs").mkdir()
    for name, run in files.items():
        (tmp_path / "runs" / f"{name}.json").write_text(json.dumps(run))
    cfg = grid_config()
    with pytest.warns(StaleRunWarning) as caught:
        write_report(tmp_path, cfg, run_key=key_now)
    message = str(caught[0].message)
    skipped = sorted(set(files) - {"kept_seed0", "kept_seed1_twins"})
    assert len(caught) == 1 and message.endswith(", ".join(f"{n}.json" for n in skipped))
    report = (tmp_path / "report.md").read_text()
    assert report.count("Runs: 2; seeds 0, 1;") == 1
    # without the key function (it lives in the runner): the grid's membership only
    with pytest.warns(StaleRunWarning):
        runs = load_grid_runs(tmp_path, cfg)
    assert sorted(r["run_key"] for r in runs) == ["now", "now", "now+twins", "older"]


def test_report_reads_runs_of_an_older_schema(tmp_path: Path) -> None:
    """Stored results of the Faster R-CNN loop (schema 1) stay readable with ``--report``."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "old.json").write_text(json.dumps(grid_run(schema=1)))
    assert [r["schema"] for r in load_grid_runs(tmp_path, grid_config())] == [1]


def map_point(images: int, map50: float, trained: int | None) -> dict[str, Any]:
    point: dict[str, Any] = {"images_labeled": images, "map50": map50, "map50_95": map50 / 2}
    if trained is not None:
        point["trained_images"] = trained
    return point


def map_row(run: dict[str, Any]) -> tuple[str, list[str]]:
    cfg = config()
    refresh_corrections(run, cfg)
    table = markdown_report([run], cfg).split("### Table 6")[1].split("###")[0]
    header = next(line for line in table.splitlines() if line.startswith("| Dataset"))
    row = next(line for line in table.splitlines() if "| Dis (ImgNet) |" in line)
    return table, [
        f"{h.strip()}={c.strip(' *')}"
        for h, c in zip(header.split("|")[3:-2], row.split("|")[3:-2], strict=True)
    ]


def test_first_model_column_reads_the_first_trained_model() -> None:
    """The loop's first mAP point is the COCO model (and a rejected round leaves it serving):
    before, Table 6 called it the model "trained on B1 only"."""
    run = make_run("Dis (ImgNet)", 0, gate_threshold=None)
    run["map_curve"] = [map_point(0, 0.2, 0), map_point(1, 0.25, 0), map_point(2, 0.5, 1)]
    table, cells = map_row(run)
    assert cells == [
        "mAP@0.5 first trained model=0.500",
        "its training images=1.000",
        "mAP@0.5 final=0.500",
        "mAP@[.5:.95] final=0.250",
    ]
    assert "trained on B1 only" not in table


def test_stored_runs_without_trained_images_get_an_honest_column() -> None:
    run = make_run("Dis (ImgNet)", 0, gate_threshold=None)
    run["map_curve"] = [map_point(0, 0.2, None), map_point(2, 0.5, None)]
    table, cells = map_row(run)
    assert cells[0] == "mAP@0.5 first point=0.200"
    assert "not always one trained on B1" in table and "trained on B1 only" not in table
