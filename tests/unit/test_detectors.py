"""Detectors: label-name mapping, model building (ImageNet and local COCO weights), inference
wrapper, BN folding, model versions on disk, and the COCO YOLOX ONNX model on real images."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import detection as tv_detection
from torchvision.ops.misc import FrozenBatchNorm2d

from backend.boxes import Boxes
from backend.detectors import (
    ArchSpec,
    OnnxYoloxDetector,
    TorchDetector,
    WeightsNotFoundError,
    arch_spec_of,
    build_detector_for,
    build_model,
    load_model_version,
    load_torch_detector,
    map_class_names,
    resolve_arch,
    save_model_version,
)
from backend.detectors.fasterrcnn import _COCO_WEIGHTS, _torchvision_model
from backend.detectors.fuse import fuse_frozen_batchnorm
from backend.detectors.onnx_yolox import letterbox, read_class_names
from backend.detectors.weights import candidate_paths
from backend.settings import load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
VOC_LABELS = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "couch",
    "potted plant", "dining table", "tv", "cat", "dog",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def shared_data() -> Path:
    return (REPO_ROOT / os.environ.get("BOXLOOP_SHARED_DATA", "../shared/data")).resolve()


def yolox_dir() -> Path:
    path = shared_data() / "models" / "yolox_nano_coco"
    if not (path / "yolox_nano.onnx").is_file():
        pytest.skip(f"YOLOX ONNX model not found under {path} (set BOXLOOP_SHARED_DATA)")
    return path


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- label names
def test_voc_names_map_onto_coco_names() -> None:
    mapping = map_class_names(COCO_NAMES, VOC_LABELS)
    named = {COCO_NAMES[s]: VOC_LABELS[t] for s, t in mapping.items()}
    assert named["airplane"] == "aeroplane"
    assert named["motorcycle"] == "motorbike"
    assert named["tv"] == "tvmonitor"
    assert named["couch"] == "sofa"
    assert named["dining table"] == "diningtable"
    assert named["potted plant"] == "pottedplant"
    assert named["person"] == "person"
    assert "truck" not in named  # VOC has no truck/van


def test_kitti_names_and_their_judgement_calls() -> None:
    kitti = ["Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc"]
    named = {COCO_NAMES[s]: kitti[t] for s, t in map_class_names(COCO_NAMES, kitti).items()}
    assert named == {"person": "Pedestrian", "car": "Car", "truck": "Truck", "train": "Tram"}
    # Van and Person_sitting only take over when the better-matching label is absent
    fallback = ["Van", "Person_sitting", "Cyclist"]
    named = {COCO_NAMES[s]: fallback[t] for s, t in map_class_names(COCO_NAMES, fallback).items()}
    assert named == {"truck": "Van", "person": "Person_sitting"}


def test_name_matching_is_case_and_space_insensitive_and_unmatched_dropped() -> None:
    mapping = map_class_names(
        ["Dining Table", "hair drier", "zebra"], ["dining_table", "HairDryer"]
    )
    assert mapping == {0: 0, 1: 1}


# ---------------------------------------------------------------------------- building
def test_arch_names_resolve() -> None:
    assert resolve_arch("fasterrcnn_mobilenet_v3") == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert resolve_arch("ssdlite320") == "ssdlite320_mobilenet_v3_large"
    with pytest.raises(ValueError, match="unknown detector"):
        resolve_arch("yolov9")
    spec = ArchSpec("fasterrcnn_effnet_lite0", 4, fpn_channels=64)
    assert ArchSpec.from_dict(spec.to_dict()) == spec


def test_effnet_faster_rcnn_has_imagenet_body_and_sized_head() -> None:
    from backend.nets.effnet_lite0 import pretrained_state_dict

    model = build_model(ArchSpec("fasterrcnn_effnet_lite0", 6))
    assert model.roi_heads.box_predictor.cls_score.out_features == 6
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 24
    imagenet = pretrained_state_dict()
    body = model.backbone.body.state_dict()
    torch.testing.assert_close(
        body["blocks.3.0.conv_pw.weight"], imagenet["blocks.3.0.conv_pw.weight"]
    )
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    model.eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 120, 160)])[0]
    assert set(out) == {"boxes", "labels", "scores"}
    assert arch_spec_of(model).num_classes == 6


@pytest.mark.parametrize("arch", sorted(_COCO_WEIGHTS))
def test_missing_coco_weights_raise_with_expected_path(arch: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as info:
        build_model(ArchSpec(resolve_arch(arch), 3), weights_dir=tmp_path)
    expected = tmp_path / "hub" / "checkpoints" / os.path.basename(_COCO_WEIGHTS[arch].url)
    assert str(expected) in str(info.value)
    assert "never downloads" in str(info.value)


def _published_param_count(model: torch.nn.Module, bn_affine_is_learnable: bool) -> int:
    count = sum(p.numel() for p in model.parameters())
    if bn_affine_is_learnable:  # torchvision counted live BN weight/bias as parameters
        frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
        count += sum(m.weight.numel() + m.bias.numel() for m in frozen)
    return count


@pytest.mark.parametrize(
    ("arch", "builder", "drop_counters"),
    [
        ("fasterrcnn_mobilenet_v3_large_320_fpn", tv_detection.fasterrcnn_mobilenet_v3_large_320_fpn, True),
        ("fasterrcnn_mobilenet_v3_large_fpn", tv_detection.fasterrcnn_mobilenet_v3_large_fpn, True),
        ("ssdlite320_mobilenet_v3_large", tv_detection.ssdlite320_mobilenet_v3_large, False),
    ],
)  # fmt: skip
def test_local_coco_weights_load_and_head_is_replaced(
    arch: str, builder: object, drop_counters: bool, tmp_path: Path
) -> None:
    weights = _COCO_WEIGHTS[arch]
    # the published COCO architecture, checked against torchvision's own parameter count
    coco = _torchvision_model(resolve_arch(arch), 91)
    assert _published_param_count(coco, arch.startswith("ssd")) == weights.meta["num_params"]
    # a random checkpoint in the format torchvision published (frozen BN for the Faster R-CNNs,
    # live BN with batch counters for SSDlite), saved where the real file would be
    torch.manual_seed(0)
    state = builder(weights=None, weights_backbone=None, num_classes=91).state_dict()  # type: ignore[operator]
    if drop_counters:
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = candidate_paths(weights, tmp_path)[0]
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = build_model(ArchSpec(resolve_arch(arch), 4), weights_dir=tmp_path)
    loaded = model.state_dict()
    head = ("roi_heads.box_predictor.", "head.classification_head.")
    kept = [k for k in state if not k.endswith("num_batches_tracked") and not k.startswith(head)]
    assert set(kept) | {k for k in loaded if k.startswith(head)} == set(loaded)
    for key in kept:  # everything but the class head holds the checkpoint's values
        torch.testing.assert_close(loaded[key], state[key])
    resized = [k for k in loaded if k.startswith(head) and loaded[k].shape != state[k].shape]
    assert resized  # the COCO class head (91 classes) became a 4-class one
    model.eval()
    with torch.inference_mode():
        out = model([torch.rand(3, 240, 320)])[0]
    assert out["labels"].numel() == 0 or int(out["labels"].max()) <= 3


def test_folding_frozen_batchnorm_keeps_outputs() -> None:
    from timm.layers import FrozenBatchNormAct2d

    torch.manual_seed(0)
    for model, expected in (
        # ImageNet statistics in the body: stem, 2 in the first block, 3 in each of 15 others
        (build_model(ArchSpec("fasterrcnn_effnet_lite0", 3)).backbone, 48),
        (_torchvision_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3).backbone, 46),
    ):
        model.eval()
        for module in model.modules():  # random init has trivial statistics: make them real
            if isinstance(module, FrozenBatchNorm2d) and float(module.running_var.std()) == 0:
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        x = torch.rand(1, 3, 128, 160)
        with torch.inference_mode():
            before = model(x)
        assert fuse_frozen_batchnorm(model) == expected
        frozen = (FrozenBatchNorm2d, FrozenBatchNormAct2d)
        assert not any(isinstance(m, frozen) for m in model.modules())
        with torch.inference_mode():
            after = model(x)
        for key in before:
            scale = float(before[key].abs().max())
            assert float((after[key] - before[key]).abs().max()) <= 1e-4 * scale


# ---------------------------------------------------------------------------- TorchDetector
def test_torch_detector_returns_scored_boxes_in_image_pixels() -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("fasterrcnn_effnet_lite0", 3))
    detector = TorchDetector(
        model, ["a", "b"], "v0", min_size=160, max_size=256, score_threshold=0.0
    )
    images = [noise_image(200, 150), noise_image(120, 180, seed=1), noise_image(64, 64, seed=2)]
    results = detector.predict(images)
    assert detector.model is not model and model.training  # serving copy, caller's model untouched
    assert [r.image_size for r in results] == [(200, 150), (120, 180), (64, 64)]
    for boxes, image in zip(results, images, strict=True):
        assert boxes.scores is not None and len(boxes) <= 100
        assert np.all((boxes.labels >= 0) & (boxes.labels < 2))
        assert np.all(boxes.xyxy[:, 2] <= image.width) and np.all(boxes.xyxy[:, 3] <= image.height)
    strict = TorchDetector(
        model, ["a", "b"], "v0", min_size=160, max_size=256, score_threshold=0.99
    )
    assert all(b.scores is not None and np.all(b.scores >= 0.99) for b in strict.predict(images))


@pytest.mark.parametrize(
    "arch", ["fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large"]
)
def test_torch_detector_serves_the_torchvision_architectures(arch: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec(resolve_arch(arch), 3), pretrained=False)
    detector = TorchDetector(
        model, ["a", "b"], "v", min_size=160, max_size=256, score_threshold=0.0
    )
    (boxes,) = detector.predict([noise_image(200, 150)])
    assert boxes.image_size == (200, 150) and boxes.scores is not None
    assert np.all((boxes.labels >= 0) & (boxes.labels < 2))
    directory = save_model_version(model, tmp_path / "v", {"labels": ["a", "b"]})
    assert arch_spec_of(load_model_version(directory)[0]).arch == arch


def test_model_version_roundtrip_is_atomic_and_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("fasterrcnn_effnet_lite0", 3, fpn_channels=64))
    directory = tmp_path / "project-1" / "boxloop-p1-v1"
    save_model_version(model, directory, {"labels": ["a", "b"], "version": "boxloop-p1-v1"})
    assert sorted(p.name for p in directory.iterdir()) == ["metadata.json", "model.pt"]
    assert [p.name for p in directory.parent.iterdir()] == ["boxloop-p1-v1"]  # no staging left
    loaded, metadata = load_model_version(directory)
    assert metadata["labels"] == ["a", "b"] and metadata["arch"]["fpn_channels"] == 64
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    image = noise_image(160, 120)
    a = TorchDetector(model, ["a", "b"], "x", min_size=120, score_threshold=0.0).predict([image])[0]
    b = TorchDetector(loaded, ["a", "b"], "x", min_size=120, score_threshold=0.0).predict([image])[
        0
    ]
    np.testing.assert_allclose(a.xyxy, b.xyxy, atol=1e-3)
    # a second save replaces the version as a whole
    save_model_version(model, directory, {"labels": ["a", "b"], "note": "again"})
    assert load_model_version(directory)[1]["note"] == "again"
    with pytest.raises(ValueError, match="labels"):
        save_model_version(model, tmp_path / "bad", {"labels": ["a"]})
    assert not (tmp_path / "bad").exists()


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model(ArchSpec("fasterrcnn_effnet_lite0", 2, fpn_channels=32))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_model_version(model, tmp_path / "v1", {"labels": ["a"]})
    assert list(tmp_path.iterdir()) == []


def test_factory_picks_version_then_yolox_then_nothing(tmp_path: Path) -> None:
    model = build_model(ArchSpec("fasterrcnn_effnet_lite0", 3, fpn_channels=32))
    directory = save_model_version(
        model, tmp_path / "v1", {"labels": ["cat", "dog"], "version": "v1"}
    )
    settings = load_settings(data_dir=tmp_path, detector_min_size=200, score_threshold=0.5)
    detector = build_detector_for(settings, ["cat", "dog"], directory)
    assert isinstance(detector, TorchDetector) and detector.version == "v1"
    assert detector.labels == ["cat", "dog"] and detector.score_threshold == 0.5
    assert isinstance(load_torch_detector(directory, settings), TorchDetector)
    assert build_detector_for(settings, ["cat", "dog"]) is None
    models = yolox_dir()
    with_onnx = load_settings(data_dir=tmp_path, onnx_model_path=models / "yolox_nano.onnx")
    yolox = build_detector_for(with_onnx, ["Dog", "raccoon"])
    assert isinstance(yolox, OnnxYoloxDetector) and yolox.labels == ["Dog", "raccoon"]
    assert build_detector_for(with_onnx, ["raccoon"]) is None


# ---------------------------------------------------------------------------- YOLOX ONNX
def test_letterbox_matches_yolox_valtransform() -> None:
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    batch, ratio = letterbox(image, (416, 416))
    assert batch.shape == (1, 3, 416, 416) and batch.dtype == np.float32
    assert ratio == pytest.approx(416 / 200)
    assert tuple(batch[0, :, 10, 10]) == (30.0, 20.0, 10.0)  # BGR, 0-255, no normalisation
    assert np.all(batch[0, :, 208:, :] == 114.0)  # padding below the image (top-left placement)


@pytest.mark.parametrize("size", [(1, 500), (500, 1)])
def test_a_very_thin_image_letterboxes_and_predicts(size: tuple[int, int]) -> None:
    """A short side scaled to under 1 px used to be 0 px, where OpenCV asserted (a 500)."""
    image = noise_image(*size)
    batch, ratio = letterbox(image, (416, 416))
    assert batch.shape == (1, 3, 416, 416) and ratio == pytest.approx(416 / 500)
    assert np.any(batch[0, :, 0, 0] != 114.0)  # the image's pixel, 1 px wide, is in the canvas
    coco = OnnxYoloxDetector.from_path(yolox_dir() / "yolox_nano.onnx", num_threads=1)
    for detector in (coco, coco.with_labels(["person"])):
        (boxes,) = detector.predict([image])
        assert boxes.image_size == size


@pytest.mark.parametrize("size", [(1, 500), (500, 1), (1, 2000), (3, 100_000)])
def test_torch_detector_serves_images_thinner_than_its_max_size(size: tuple[int, int]) -> None:
    """torchvision's resize fits the long side to ``max_size``; the short side became 0 px."""
    torch.manual_seed(0)
    model = build_model(ArchSpec("fasterrcnn_effnet_lite0", 3, fpn_channels=32))
    detector = TorchDetector(
        model, ["a", "b"], "v0", min_size=160, max_size=256, score_threshold=0.0
    )
    (boxes,) = detector.predict([noise_image(*size)])
    assert boxes.image_size == size and len(boxes) > 0
    assert np.all(boxes.xyxy >= 0) and np.all(boxes.xyxy <= np.array([*size, *size]))
    long_axis = int(size[1] > size[0])  # boxes are mapped back from the 256 px long side
    assert boxes.xyxy[:, 2 + long_axis].max() > 0.5 * max(size)


def _voc_boxes(xml: Path, labels: list[str]) -> Boxes:
    objects = ET.parse(xml).findall("object")
    coords = [
        [float(o.findtext(f"bndbox/{k}", "0")) for k in ("xmin", "ymin", "xmax", "ymax")]
        for o in objects
    ]
    names = [labels.index(o.findtext("name", "")) for o in objects]
    size = (
        int(ET.parse(xml).findtext("size/width", "0")),
        int(ET.parse(xml).findtext("size/height", "0")),
    )
    return Boxes(np.array(coords, np.float32), np.array(names), size)


@pytest.mark.shared_data
def test_yolox_finds_real_voc_objects() -> None:
    models = yolox_dir()
    voc = shared_data() / "voc" / "VOCdevkit" / "VOC2012"
    if not voc.is_dir():
        pytest.skip(f"shared VOC data not found at {voc}")
    coco = OnnxYoloxDetector.from_path(models / "yolox_nano.onnx", num_threads=1)
    assert coco.decoded is False and coco.input_size == (416, 416)
    assert len(read_class_names(models / "coco_classes.txt")) == 80
    detector = coco.with_labels(VOC_LABELS)
    assert len(detector.class_map) == 20  # every VOC class has a COCO counterpart
    matched = total = 0
    for stem in ("2007_000063", "2007_000528", "2007_000549", "2007_000720", "2007_000876"):
        truth = _voc_boxes(voc / "Annotations" / f"{stem}.xml", VOC_LABELS)
        image = Image.open(voc / "JPEGImages" / f"{stem}.jpg")
        found = detector.predict([image])[0]
        assert found.image_size == image.size and found.scores is not None
        assert np.all(found.scores >= detector.score_threshold)
        iou = truth.iou(found)
        for i in range(len(truth)):
            total += 1
            matched += any(
                iou[i, j] >= 0.5 and found.labels[j] == truth.labels[i] for j in range(len(found))
            )
    assert total == 7 and matched >= 5  # measured 6 of 7 on these five photos
    # the dog photo, seen by a project that only knows cats: the dog is dropped, not relabelled
    cats_only = coco.with_labels(["cat"])
    dog = Image.open(voc / "JPEGImages" / "2007_000063.jpg")
    assert len(cats_only.predict([dog])[0]) == 0


@pytest.mark.shared_data
def test_yolox_maps_coco_to_kitti_labels_on_a_kitti_frame() -> None:
    models = yolox_dir()
    frames = sorted((shared_data() / "kitti" / "tiny" / "training" / "image_2").glob("*.jp*g"))
    if not frames:
        pytest.skip("shared KITTI frames not found")
    kitti = ["Car", "Van", "Truck", "Pedestrian", "Cyclist"]
    detector = OnnxYoloxDetector.from_path(models / "yolox_nano.onnx", labels=kitti, num_threads=1)
    found = [detector.predict([Image.open(f)])[0] for f in frames[:5]]
    labels = {kitti[int(i)] for boxes in found for i in boxes.labels}
    assert "Car" in labels and labels <= {"Car", "Truck", "Pedestrian"}
