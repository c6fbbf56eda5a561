"""benchmark.box_compare: grids of the box bench side by side at one budget; benchmark.box_report:
its per-grid tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark.box_compare import compare_grids


def _curve(points: list[tuple[int, float]]) -> list[dict[str, float]]:
    return [{"boxes_labeled": boxes, "map50": value} for boxes, value in points]


def _grid(root: Path, noisy_weight: float, box_maps: list[float], image_maps: list[float]) -> Path:
    """One dataset, one seed per entry of ``box_maps`` / ``image_maps`` (mAP at 100 boxes)."""
    (root / "runs").mkdir(parents=True)
    experiment = {
        "datasets": [{"spec": "voc:/data/X", "name": "voc:X"}],
        "box_measures": ["margin"],
        "image_measures": ["margin"],
        "noisy_weight": noisy_weight,
        "background_weight": 1.0,
    }
    (root / "experiment.json").write_text(json.dumps(experiment))
    for seed, (box, image) in enumerate(zip(box_maps, image_maps, strict=True)):
        run = {
            "dataset": "voc:X",
            "seed": seed,
            "curves": {
                # box-level ends at 100 boxes, image-level runs on to 200
                "box:margin": _curve([(0, 0.5), (100, box)]),
                "image:margin": _curve([(0, 0.5), (100, image), (200, 0.9)]),
            },
        }
        (root / "runs" / f"x__seed{seed}.json").write_text(json.dumps(run))
    return root


def test_grids_meet_at_the_smallest_final_budget_and_bold_marks_a_win_outside_the_spread(
    tmp_path: Path,
) -> None:
    close = _grid(tmp_path / "a", 0.5, [0.60, 0.62, 0.64], [0.60, 0.61, 0.62])
    clear = _grid(tmp_path / "b", 0.0, [0.70, 0.72, 0.74], [0.60, 0.61, 0.62])
    text = compare_grids([close, clear])
    assert "## voc:X at 100 boxes" in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    # box 0.620 ± 0.020 vs image 0.610 ± 0.010: overlapping, not bold; 0.720 ± 0.020: bold
    assert rows["| box:margin"].endswith("| 0.620 ± 0.020 | **0.720 ± 0.020** |")
    assert rows["| image:margin"].endswith("| 0.610 ± 0.010 | 0.610 ± 0.010 |")
    assert "(λ_d 0.0, background 1.0)" in text and "background 1.0, warm start" not in text
    experiment = json.loads((clear / "experiment.json").read_text())
    (clear / "experiment.json").write_text(json.dumps({**experiment, "warm_start": True}))
    assert "λ_d 0.0, background 1.0, warm start" in compare_grids([close, clear])


def _point(labeled: int, looked: int, map50: float, **queries: int) -> dict[str, float]:
    return {"boxes_labeled": labeled, "boxes_looked_at": looked, "map50": map50, **queries}


def _box_report(tmp_path: Path, curves: list[dict[str, list[dict[str, float]]]]) -> str:
    """``report.md`` of one dataset of 100 objects (fully supervised mAP 0.5), a seed per entry
    of ``curves``."""
    from benchmark.box_config import load_box_config
    from benchmark.box_report import write_box_report

    episodes = len(next(iter(curves[0].values()))) - 1
    config = load_box_config({"datasets": ["voc:/data/X"], "episodes": episodes})
    runs = [
        {
            "dataset": "voc:X",
            "seed": seed,
            "curves": seed_curves,
            "full_map50": 0.5,
            "pool_objects": 100,
            "pool_images": 10,
            "test_images": 2,
            "k": 10,
        }
        for seed, seed_curves in enumerate(curves)
    ]
    write_box_report(tmp_path, config, runs)
    return (tmp_path / "report.md").read_text()


def _rows(text: str) -> dict[str, str]:
    return {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}


def test_map_at_is_nan_below_a_curves_first_point_as_beyond_its_last(tmp_path: Path) -> None:
    """A seed whose initial set already held 40 boxes never had a model at 25 boxes."""
    from benchmark.box_report import map_at

    early = [_point(10, 10, 0.30), _point(25, 60, 0.40)]
    late = [_point(40, 40, 0.55), _point(70, 90, 0.60)]
    assert map_at(late, 25) != map_at(late, 25)  # NaN below the first point
    assert map_at(late, 100) != map_at(late, 100)  # NaN beyond the last
    assert map_at(late, 40) == pytest.approx(0.55)
    assert map_at(late, 55) == pytest.approx(0.575)
    assert map_at(late, 30, "boxes_looked_at") != map_at(late, 30, "boxes_looked_at")
    # the report's common budget (25 boxes) holds the seed that spans it only, and says so
    text = _box_report(tmp_path, [{"box:random": early}, {"box:random": late}])
    assert "Common budget: 25 boxes labelled" in text
    assert "| 0.400 (1/2 seeds) |" in _rows(text.split("The same counted in")[0])["| box:random"]


def test_box_report_splits_background_from_other_queries_under_both_conventions(
    tmp_path: Path,
) -> None:
    """Box-level: 30 boxes labelled for 90 looks (50 background, 6 duplicate, 4 ignored);
    image-level: every look a box. Labelled, box-level is ahead; looked at, image-level is."""
    box = [_point(10, 10, 0.2), _point(20, 50, 0.4), _point(30, 90, 0.5)]
    box[-1].update(background=50, duplicate=6, ignored=4)
    image = [_point(10, 10, 0.2), _point(50, 50, 0.3), _point(70, 70, 0.5)]
    text = _box_report(tmp_path, [{"box:margin": box, "image:margin": image}])
    labeled, looked = text.split("The same counted in boxes looked at")
    looked = looked.split("| episode 0 |")[0]
    assert "background queries | duplicate / ignored queries |" in labeled
    # to 80 / 90 / 100 % of full, mAP at 30 boxes, final labelled / looked at, the queries
    rows = _rows(labeled)
    assert rows["| box:margin"] == "| box:margin | 20 % | 25 % | 30 % | 0.500 | 30 / 90 | 50 | 10 |"
    assert rows["| image:margin"].startswith("| image:margin | 60 % | 65 % | 70 % | 0.250 |")
    assert "common budget 70 boxes looked at" in looked
    # looks to 80 / 90 / 100 % of full and mAP at 70 looks
    rows = _rows(looked)
    assert rows["| box:margin"] == "| box:margin | 50 % | 70 % | 90 % | 0.450 |"
    assert rows["| image:margin"] == "| image:margin | 60 % | 65 % | 70 % | 0.500 |"


def test_a_seed_that_starts_past_the_shared_budget_is_left_out_and_counted(
    tmp_path: Path,
) -> None:
    """A seed whose initial set already held more boxes than the budget never had a model
    there; its NaN used to turn the cell into "nan ± nan"."""
    grid = _grid(tmp_path / "a", 0.5, [0.60, 0.62, 0.64], [0.60, 0.61, 0.62])
    run = json.loads((grid / "runs" / "x__seed2.json").read_text())
    run["curves"]["box:margin"] = _curve([(150, 0.7), (300, 0.8)])
    run["curves"]["image:margin"] = _curve([(150, 0.7), (300, 0.8)])
    (grid / "runs" / "x__seed2.json").write_text(json.dumps(run))
    text = compare_grids([grid])
    assert "## voc:X at 100 boxes" in text and "nan" not in text
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| box:margin"].endswith("| 0.610 ± 0.014 (2/3 seeds) |")
