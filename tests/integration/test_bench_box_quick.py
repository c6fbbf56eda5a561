"""``boxloop bench box --quick`` on the shared BCCD subset: a real box-level campaign, end to end.

Trains the COCO YOLOX-Nano on a few images, predicts the box pool, queries boxes and whole
images, answers them from the ground truth, retrains with noisy boxes damped, and writes the
report and the plot. The counts must add up and follow the method's rules.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from benchmark.box_report import boxes_to_reach, map_at
from benchmark.cli import main
from tests.conftest import shared_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


def test_quick_box_campaign_counts_add_up(tmp_path: Path) -> None:
    bccd = shared_data_dir() / "voc" / "BCCD"
    model = shared_data_dir() / "models" / "yolox_nano_coco" / "yolox_nano.onnx"
    if not bccd.is_dir() or not model.is_file():
        pytest.skip(f"BCCD ({bccd}) or the COCO YOLOX-Nano ({model}) is absent")
    out = tmp_path / "box"
    code = main(
        ["bench", "box", "--dataset", f"voc:{bccd}", "--quick", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    (run_file,) = (out / "runs").glob("*.json")
    run = json.loads(run_file.read_text())
    k = run["k"]
    assert k >= 1 and run["pool_objects"] > 0 and 0 <= run["full_map50"] <= 1
    for approach, curve in run["curves"].items():
        assert curve[0]["episode"] == 0 and len(curve) == 3, approach
        labeled = [p["boxes_labeled"] for p in curve]
        assert labeled == sorted(labeled), approach  # labels are never lost
        for point in curve[1:]:
            assert 0.0 <= point["map50"] <= 1.0
            answered = point["confirmed"] + point["adjusted"] + point["duplicate"]
            rejected = point["background"] + point["ignored"]
            assert answered + rejected == point["queried"], point
            assert point["boxes_looked_at"] - point["boxes_labeled"] == (
                rejected + point["duplicate"]
            )
        if approach.startswith("box:"):
            # at most K queries an episode (fewer only when the model predicts fewer boxes
            # outside the answered regions), and no image labelled in full
            queried = [0] + [p["queried"] for p in curve[1:]]
            assert queried[1] > 0, approach
            assert all(0 <= b - a <= k for a, b in itertools.pairwise(queried)), approach
            assert curve[-1]["full_image_boxes"] == curve[0]["boxes_labeled"]
        else:
            # whole images until at least K new boxes an episode, never a query
            assert all(p["queried"] == 0 for p in curve[1:])
            assert all(b - a >= k for a, b in itertools.pairwise(labeled))
    report = (out / "report.md").read_text()
    assert "boxes to 80 % of full" in report and "BLAD/ComPAS" in report
    assert (out / "plots" / "box_voc_BCCD.png").read_bytes().startswith(b"\x89PNG")

    # One more approach later: image-level core-set on ImgNet features joins the stored run;
    # the fully supervised model and the other campaigns are not rerun, nor changed.
    code = main(
        ["bench", "box", "--dataset", f"voc:{bccd}", "--quick", "--out", str(out),
         "--image-measures", "uncertainty,coreset", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    again = json.loads(run_file.read_text())
    assert list(again["curves"]) == [*run["curves"], "image:coreset"]
    assert again["full_map50"] == run["full_map50"]
    assert all(again["curves"][a] == c for a, c in run["curves"].items())
    coreset = again["curves"]["image:coreset"]
    # the same initial model (seeded training, seeded fresh class rows), then whole images
    assert coreset[0] == run["curves"]["image:uncertainty"][0]
    assert all(p["queried"] == 0 for p in coreset[1:])
    assert all(b["boxes_labeled"] - a["boxes_labeled"] >= k for a, b in itertools.pairwise(coreset))
    assert "image:coreset" in (out / "report.md").read_text()


def test_reach_and_budget_interpolate_between_episodes() -> None:
    curve = [
        {"boxes_labeled": 10, "map50": 0.2},
        {"boxes_labeled": 30, "map50": 0.6},
        {"boxes_labeled": 50, "map50": 0.5},
    ]
    assert boxes_to_reach(curve, 0.4) == pytest.approx(20.0)
    assert boxes_to_reach(curve, 0.1) == 10.0
    assert boxes_to_reach(curve, 0.7) != boxes_to_reach(curve, 0.7)  # NaN: never reached
    assert map_at(curve, 20) == pytest.approx(0.4)
    assert map_at(curve, 60) != map_at(curve, 60)  # beyond the curve
