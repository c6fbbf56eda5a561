"""The harness's product loop judges the serving version as the product's training job does."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

import benchmark.product_loop as product_loop
from backend.boxes import Boxes
from benchmark.product_loop import ProductLoop, _Serving, check_floor, gate_config

LABELS = ["car", "person"]
SCORES = [0.01, 0.03, 0.05, 0.1, 0.2, 0.6]


class StubDetector:
    """Predicts one box per score of :data:`SCORES` on every image, as a loop stored at 0.01."""

    labels = LABELS
    version = "stub"

    def predict(self, images: Sequence[Image.Image]) -> list[Boxes]:
        n = len(SCORES)
        xyxy = np.tile(np.array([[2.0, 2.0, 20.0, 20.0]], np.float32), (n, 1))
        return [
            Boxes(xyxy, np.zeros(n, np.int64), im.size, np.array(SCORES, np.float32))
            for im in images
        ]


def _loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, floor: float, gate: dict[str, Any]
) -> ProductLoop:
    """A loop with no COCO model behind it (no file to load), serving :class:`StubDetector`."""
    monkeypatch.setattr(product_loop, "load_coco_yolox_nano", lambda _path: (None, []))
    monkeypatch.setattr(product_loop, "initial_yolox", lambda *_args: None)
    loop = ProductLoop(
        LABELS,
        tmp_path / "loop",
        onnx_model=tmp_path / "absent.onnx",
        class_names=None,
        floor=floor,
        yolox={},
        gate=gate,
        seed=0,
        threads=1,
    )
    loop.serving = _Serving("pretrained", None, 0.3, StubDetector())
    return loop


@pytest.mark.parametrize(
    ("gate", "kept"),
    [({}, [0.05, 0.1, 0.2, 0.6]), ({"score_floor": 0.2}, [0.2, 0.6])],
)
def test_the_gate_scores_the_serving_version_down_to_its_score_floor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gate: dict[str, Any], kept: list[float]
) -> None:
    """The loop keeps the serving version's boxes down to its prediction floor (0.01 here), but
    the gate scores it down to ``gate.score_floor``, as the candidate and as the training job
    (``registry.round_base(score_floor=gate.score_floor)``): with the loop's floor the serving
    version had low boxes the candidate lacked, a head start in mAP."""
    seen: dict[str, Any] = {}

    def fake_round(*_args: Any, serving_predict: Any, **_kwargs: Any) -> SimpleNamespace:
        seen["predict"] = serving_predict
        return SimpleNamespace(promoted=False)

    monkeypatch.setattr(product_loop, "run_round", fake_round)
    loop = _loop(tmp_path, monkeypatch, 0.01, gate)
    image = Image.new("RGB", (32, 24))
    truth = Boxes(np.array([[2.0, 2.0, 20.0, 20.0]]), np.array([0]), image.size)
    loop.round([("a", image, truth)], 1)
    gated = seen["predict"]([image, image])
    assert len(gated) == 2
    for boxes in gated:
        assert boxes.scores is not None
        assert boxes.scores.tolist() == pytest.approx(kept)
    # the loop's own predictions (what pre-annotates the next batch) keep its floor
    served = loop.predict([image])
    assert served is not None and served[0].scores is not None
    assert served[0].scores.tolist() == pytest.approx(SCORES)


def test_a_prediction_floor_above_the_gates_lowest_score_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Boxes under the prediction floor are never kept, so a floor above ``gate.score_floor``
    or the lowest gate threshold cannot score or serve the serving version as the product
    does: refused before the loop clears its work folder."""
    check_floor(0.05, gate_config({}))  # the defaults agree
    check_floor(0.01, gate_config({"score_floor": 0.2}))
    for floor, gate in (
        (0.1, {}),
        (0.1, {"score_floor": 0.01}),
        (0.1, {"thresholds": [0.05, 0.5]}),
    ):
        with pytest.raises(ValueError, match=re.escape(f"prediction_floor {floor} is above")):
            check_floor(floor, gate_config(gate))
    kept = tmp_path / "loop" / "kept.txt"
    kept.parent.mkdir()
    kept.write_text("a previous run")
    with pytest.raises(ValueError, match=r"prediction_floor 0\.1 is above"):
        _loop(tmp_path, monkeypatch, 0.1, {})
    assert kept.read_text() == "a previous run"
