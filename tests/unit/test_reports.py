"""Report readings on a hand-built run: per score threshold, the gate's threshold, ignored objects."""

from __future__ import annotations

from typing import Any

import pytest

from backend.boxes import ANY_CLASS
from benchmark.config import Approach, DatasetConfig, ExperimentConfig
from benchmark.corrections import GATE, batch_boxes, correction_key, refresh_corrections
from benchmark.reports import markdown_report, run_workload

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
