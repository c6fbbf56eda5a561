"""The COCO model served with an input that follows each image's aspect ratio
(``pretrained_input = "aspect"``): shapes, parity with a fixed export at that shape, the cached
dynamic export, and the bulk spec that rebuilds it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.bulk.work import DetectorSpec
from backend.detectors import build_detector_for
from backend.detectors.onnx_yolox import OnnxYoloxDetector, aspect_input_shape
from backend.detectors.pretrained import dynamic_model_path, load_pretrained
from backend.detectors.yolox import YoloxNano, load_coco_yolox_nano
from backend.detectors.yolox.onnx_import import export_onnx
from backend.registry import ModelRegistry
from backend.settings import load_settings
from backend.store import Store
from backend.training.yolox_train import YoloxTrainConfig, input_shape_for


@pytest.mark.parametrize(
    ("aspect", "expected"),
    [(1.0, (416, 416)), (1224 / 370, (224, 768)), (640 / 480, (352, 480)), (0.5, (576, 288))],
)
def test_aspect_input_shape_keeps_the_pixel_budget(
    aspect: float, expected: tuple[int, int]
) -> None:
    height, width = aspect_input_shape(aspect, 416 * 416)
    assert (height, width) == expected
    assert height % 32 == 0 and width % 32 == 0
    assert abs(height * width / (416 * 416) - 1) < 0.1


def test_training_shapes_use_the_same_rule() -> None:
    config = YoloxTrainConfig()
    for sizes in ([(1224, 370)] * 3, [(640, 480), (500, 375)], [(300, 600)]):
        aspect = float(np.median([w / h for w, h in sizes]))
        assert input_shape_for(sizes, config) == aspect_input_shape(aspect, config.input_area)
    assert input_shape_for([], config) == (416, 416)
    with pytest.raises(ValueError, match="positive"):
        aspect_input_shape(0.0, 416 * 416)


def test_follow_aspect_needs_a_dynamic_model(tmp_path: Path) -> None:
    fixed = export_onnx(YoloxNano(num_classes=2).eval(), tmp_path / "m.onnx", (320, 320))
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="dynamic height and width"):
        OnnxYoloxDetector.from_path(fixed, names, follow_aspect=True)


@pytest.fixture(scope="module")
def wide_frame(shared_data: Path) -> Image.Image:
    frames = sorted((shared_data / "kitti" / "tiny" / "training" / "image_2").glob("*"))
    if not frames:
        pytest.skip(f"KITTI frames not found under {shared_data} (set BOXLOOP_SHARED_DATA)")
    return Image.open(frames[0]).convert("RGB")


@pytest.mark.shared_data
def test_aspect_serving_equals_a_fixed_export_at_the_images_shape(
    tmp_path: Path, onnx_path: Path, wide_frame: Image.Image
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data", onnx_model_path=onnx_path, pretrained_input="aspect"
    )
    detector = load_pretrained(settings, ["car", "person"])
    assert detector is not None and detector.follow_aspect
    assert detector.version == "pretrained-yolox_nano-aspect"
    assert wide_frame.size == (1224, 370)
    assert detector.input_size_for(wide_frame.size) == (224, 768)
    assert detector.input_size_for((640, 640)) == (416, 416)

    model, _ = load_coco_yolox_nano(onnx_path)
    fixed = OnnxYoloxDetector.from_path(
        export_onnx(model, tmp_path / "wide.onnx", (224, 768)),
        onnx_path.parent / "coco_classes.txt",
        labels=["car", "person"],
        score_threshold=settings.score_threshold,
    )
    ours, reference = detector.predict([wide_frame])[0], fixed.predict([wide_frame])[0]
    assert len(reference) >= 1
    assert np.array_equal(ours.labels, reference.labels)
    np.testing.assert_allclose(ours.xyxy, reference.xyxy, atol=1e-2)

    # the default keeps the file's square input
    square = load_pretrained(load_settings(onnx_model_path=onnx_path), ["car", "person"])
    assert square is not None and not square.follow_aspect
    assert square.input_size_for(wide_frame.size) == (416, 416)
    assert square.version == "pretrained-yolox_nano"

    # a project view keeps the mode, and so does the spec that rebuilds it on a bulk worker
    view = build_detector_for(settings, ["car"])
    assert isinstance(view, OnnxYoloxDetector) and view.follow_aspect
    rebuilt = DetectorSpec.from_detector(view).load()
    assert rebuilt.detector.follow_aspect  # type: ignore[attr-defined]
    assert rebuilt.run([wide_frame])[0] == view.predict([wide_frame])[0]


@pytest.mark.shared_data
def test_dynamic_export_is_cached_and_redone_when_the_source_changes(
    tmp_path: Path, onnx_path: Path
) -> None:
    source = tmp_path / "src" / "yolox_nano.onnx"
    source.parent.mkdir()
    source.write_bytes(onnx_path.read_bytes())
    (source.parent / "coco_classes.txt").write_text(
        (onnx_path.parent / "coco_classes.txt").read_text()
    )
    cache = tmp_path / "cache"
    first = dynamic_model_path(source, cache)
    stamp = first.stat().st_mtime_ns
    assert dynamic_model_path(source, cache) == first and first.stat().st_mtime_ns == stamp
    assert not list(cache.glob("*.partial"))
    os.utime(source, (source.stat().st_atime + 5, source.stat().st_mtime + 5))
    second = dynamic_model_path(source, cache)
    assert second != first and second.is_file()


@pytest.mark.shared_data
def test_the_registry_serves_the_aspect_model_and_survives_a_broken_file(
    tmp_path: Path, onnx_path: Path, wide_frame: Image.Image
) -> None:
    settings = load_settings(
        data_dir=tmp_path / "data", onnx_model_path=onnx_path, pretrained_input="aspect"
    )
    settings.data_dir.mkdir(parents=True)
    registry = ModelRegistry(settings, Store(settings.resolved_database_url))
    loaded = registry.current(None, ["car", "person"])
    assert loaded.version == "pretrained-yolox_nano-aspect"
    assert isinstance(loaded.detector, OnnxYoloxDetector) and loaded.detector.follow_aspect
    assert len(loaded.detector.predict([wide_frame])[0]) >= 1

    broken = tmp_path / "broken" / "yolox_nano.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"not an onnx file")
    settings = load_settings(
        data_dir=tmp_path / "data2", onnx_model_path=broken, pretrained_input="aspect"
    )
    settings.data_dir.mkdir(parents=True)
    registry = ModelRegistry(settings, Store(settings.resolved_database_url))
    assert registry.pretrained() is None  # logged; the server keeps serving, with no boxes
    assert not list((settings.models_dir / "pretrained").glob("*"))
