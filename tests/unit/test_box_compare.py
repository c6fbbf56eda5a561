"""benchmark.box_compare: grids of the box bench side by side at one budget."""

from __future__ import annotations

import json
from pathlib import Path

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
