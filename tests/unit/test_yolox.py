"""Trainable YOLOX-Nano: COCO import parity with onnxruntime, class remapping, freezing, export
round trip, SimOTA loss with per-box weights, and (slow) overfitting two real VOC photos."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from backend.boxes import Boxes
from backend.detectors.onnx_yolox import OnnxYoloxDetector, _grids, letterbox, resize_bgr
from backend.detectors.yolox import (
    YoloxNano,
    YoloxTarget,
    decode,
    export_onnx,
    freeze,
    grids,
    load_coco_yolox_nano,
    postprocess,
    remap_classes,
    set_bn_eval,
    simota_assign,
    yolox_loss,
)
from backend.detectors.yolox.onnx_import import load_onnx_weights
from backend.scoring.detection_map import evaluate_map

VOC_PHOTOS = ("2007_000063", "2007_000032", "2007_000027")  # dog+chair, planes+people, person


@pytest.fixture(autouse=True)
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def coco(onnx_path: Path) -> tuple[YoloxNano, list[str]]:
    return load_coco_yolox_nano(onnx_path)


@pytest.fixture(scope="module")
def voc_dir(shared_data: Path) -> Path:
    path = shared_data / "voc" / "VOCdevkit" / "VOC2012"
    if not path.is_dir():
        pytest.skip(f"shared VOC data not found at {path} (set BOXLOOP_SHARED_DATA)")
    return path


def _serving(raw: torch.Tensor) -> np.ndarray:
    """PyTorch raw rows in the shared ONNX model's convention (sigmoid scores, raw offsets)."""
    return torch.cat([raw[..., :4], raw[..., 4:].sigmoid()], -1).numpy()


def _pixel_boxes(rows: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Decode serving-convention rows with onnx_yolox's own grid (an independent row order)."""
    cells, strides = _grids(hw)
    return np.concatenate([(rows[:, :2] + cells) * strides, np.exp(rows[:, 2:4]) * strides], 1)


# ------------------------------------------------------------------------------ import / parity
@pytest.mark.shared_data
def test_imported_model_matches_onnxruntime_on_real_photos(
    onnx_path: Path, coco: tuple[YoloxNano, list[str]], voc_dir: Path
) -> None:
    model, names = coco
    assert len(names) == 80 and names[0] == "person" and names[16] == "dog"
    assert not model.training and model.num_classes == 80
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for stem in VOC_PHOTOS:
        batch, _ = letterbox(Image.open(voc_dir / "JPEGImages" / f"{stem}.jpg"), (416, 416))
        (reference,) = session.run(None, {"images": batch})
        with torch.no_grad():
            ours = _serving(model(torch.from_numpy(batch)))
        assert ours.shape == reference.shape == (1, 3549, 85)
        assert reference[0, :, 4].max() > 0.8  # a confident object: not a comparison of zeros
        score_diff = np.abs(ours[0, :, 4:] - reference[0, :, 4:]).max()
        offset_diff = np.abs(ours[0, :, :4] - reference[0, :, :4]).max()
        assert score_diff <= 1e-3, f"{stem}: scores differ by {score_diff}"
        assert offset_diff <= 1e-3, f"{stem}: raw box offsets differ by {offset_diff}"
        # In pixels: float32 noise of ~1e-4 in log w/h scales with the box (up to ~570 px on
        # junk rows), so the 1e-2 px bound is held on the rows that can become detections
        # (measured ≤ 7e-4 px) and all rows are held to 1e-2 px + 2e-4 × their size.
        mine, theirs = _pixel_boxes(ours[0], (416, 416)), _pixel_boxes(reference[0], (416, 416))
        box_diff = np.abs(mine - theirs)
        scored = (reference[0, :, 5:] * reference[0, :, 4:5]).max(1) >= 0.01
        assert scored.sum() >= 10
        assert box_diff[scored].max() <= 1e-2, (
            f"{stem}: boxes differ by {box_diff[scored].max()} px"
        )
        size = theirs[:, [2, 3, 2, 3]]
        assert np.all(box_diff <= 1e-2 + 2e-4 * size), f"{stem}: {(box_diff / size).max()}"


@pytest.mark.shared_data
def test_imported_bn_is_identity_plus_bias(coco: tuple[YoloxNano, list[str]]) -> None:
    bn = coco[0].backbone.stem.conv.bn
    assert bn.eps == 1e-3 and bn.momentum == 0.03
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    x = torch.randn(1, bn.num_features, 4, 4)
    expected = x + bn.bias.detach()[None, :, None, None]
    assert torch.allclose(bn.eval()(x), expected, atol=1e-6)


@pytest.mark.shared_data
def test_import_names_the_first_mismatch(onnx_path: Path) -> None:
    graph = onnx.load(str(onnx_path)).graph
    with pytest.raises(ValueError, match=r"convolution 82 .*head\.levels\.0\.cls_pred"):
        load_onnx_weights(YoloxNano(num_classes=20), graph)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_resize_bgr_equals_swapping_channels_before_the_resize(mode: str) -> None:
    """``resize_bgr`` swaps channels on the small image; YOLOX swaps first. Same pixels."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 141, 3), dtype=np.uint8)).convert(mode)
    full_bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    for new_w, new_h in [(141, 97), (70, 48), (211, 145), (31, 200)]:
        expected = (
            full_bgr
            if (new_h, new_w) == full_bgr.shape[:2]
            else cv2.resize(full_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        )
        got = resize_bgr(image, new_w, new_h)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        assert np.array_equal(got, expected)


def test_non_square_input_gives_one_row_per_cell() -> None:
    model = YoloxNano(num_classes=80).eval()
    height, width = 320, 960
    with torch.no_grad():
        raw = model(torch.full((2, 3, height, width), 114.0))
    anchors = sum((height // s) * (width // s) for s in (8, 16, 32))
    assert raw.shape == (2, anchors, 85) == (2, 6300, 85)
    cells, strides = grids((height, width))
    ref_cells, ref_strides = _grids((height, width))
    assert np.array_equal(cells.numpy(), ref_cells) and np.array_equal(strides.numpy(), ref_strides)
    decoded = decode(raw, (height, width))
    assert decoded.shape == raw.shape
    assert torch.allclose(decoded[..., :2], (raw[..., :2] + cells) * strides)
    assert torch.allclose(decoded[..., 2:4], raw[..., 2:4].exp() * strides)
    assert torch.allclose(decoded[..., 4:], raw[..., 4:].sigmoid())
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 320, 300))


def test_fresh_model_starts_at_the_prior() -> None:
    model = YoloxNano(num_classes=3).eval()
    with torch.no_grad():
        raw = model(torch.full((1, 3, 64, 64), 114.0))
    scores = raw[..., 4:].sigmoid()
    assert torch.allclose(scores, torch.full_like(scores, 0.01), atol=0.01)


# ------------------------------------------------------------------------------ fine-tuning tools
@pytest.mark.shared_data
def test_remap_keeps_coco_rows(coco: tuple[YoloxNano, list[str]]) -> None:
    model, names = coco
    torch.manual_seed(0)
    remapped = remap_classes(model, [names.index("dog"), None])  # ["dog", "raccoon"]
    assert remapped.num_classes == 2 and model.num_classes == 80  # the original is untouched
    prior = -math.log(0.99 / 0.01)
    for old, new in zip(model.head.per_level(), remapped.head.per_level(), strict=True):
        assert new.cls_pred.weight.shape == (2, 64, 1, 1)
        assert torch.equal(new.cls_pred.weight[0], old.cls_pred.weight[16])
        assert torch.equal(new.cls_pred.bias[0], old.cls_pred.bias[16])
        assert new.cls_pred.bias[1].item() == pytest.approx(prior)
        assert 0 < new.cls_pred.weight[1].std().item() < 0.02
    old_state, new_state = model.state_dict(), remapped.state_dict()
    assert old_state.keys() == new_state.keys()
    for key, value in old_state.items():
        if ".cls_pred." not in key:
            assert torch.equal(value, new_state[key]), key
    x = torch.full((1, 3, 128, 128), 114.0)
    x[..., 32:96, 32:96] = 30.0
    with torch.no_grad():
        before, after = model(x), remapped.eval()(x)
    assert torch.equal(after[..., :5], before[..., :5])
    # same weights; a 2-row and an 80-row 1×1 conv may round differently
    assert torch.allclose(after[..., 5], before[..., 5 + 16], atol=1e-5)
    with pytest.raises(ValueError):
        remap_classes(model, [80])


def test_remap_fresh_rows_do_not_depend_on_the_global_rng() -> None:
    """Version 0 is one model: whatever consumed torch's global RNG before, the fresh rows match
    (a grid's runs once started from different raccoon rows depending on the run before)."""
    model = YoloxNano(num_classes=3)
    torch.manual_seed(1)
    first = remap_classes(model, [None, 2])
    torch.randn(1000)  # what another run would have drawn
    second = remap_classes(model, [None, 2])
    other_seed = remap_classes(model, [None, 2], seed=1)
    for a, b, c in zip(
        first.head.per_level(), second.head.per_level(), other_seed.head.per_level(), strict=True
    ):
        assert torch.equal(a.cls_pred.weight, b.cls_pred.weight)
        assert not torch.equal(a.cls_pred.weight[0], c.cls_pred.weight[0])
        assert torch.equal(a.cls_pred.weight[1], c.cls_pred.weight[1])  # the carried-over row


def test_freeze_parts_and_bn_eval() -> None:
    model = YoloxNano(num_classes=2)

    def trainable(prefix: str) -> set[bool]:
        return {p.requires_grad for n, p in model.named_parameters() if n.startswith(prefix)}

    freeze(model, "stem")
    assert trainable("backbone.stem") == {False} and trainable("backbone.dark2") == {True}
    freeze(model, "backbone")
    assert trainable("backbone") == {False} and trainable("neck") == {True}
    freeze(model, "backbone+neck")
    assert trainable("neck") == {False} and trainable("head") == {True}
    with pytest.raises(ValueError):
        freeze(model, "head")

    model.train()
    set_bn_eval(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 104 and not any(bn.training for bn in bns)
    assert model.head.training and model.head.per_level()[0].cls_pred.training
    stats = [bn.running_mean.clone() for bn in bns]
    model(torch.rand(1, 3, 64, 64) * 255)
    assert all(torch.equal(s, bn.running_mean) for s, bn in zip(stats, bns, strict=True))


# ------------------------------------------------------------------------------ export
@pytest.mark.shared_data
def test_export_round_trip_serves_like_the_shared_model(
    tmp_path: Path, onnx_path: Path, coco: tuple[YoloxNano, list[str]], voc_dir: Path
) -> None:
    model, _ = coco
    exported = export_onnx(model, tmp_path / "coco.onnx", (416, 416))
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    assert model_input.name == "images" and list(model_input.shape[1:]) == [3, 416, 416]
    photo = Image.open(voc_dir / "JPEGImages" / "2007_000063.jpg")
    batch, _ = letterbox(photo, (416, 416))
    (out,) = session.run(None, {"images": batch})
    with torch.no_grad():
        ours = _serving(model(torch.from_numpy(batch)))
    # float32 summation order only (the import's parity with the shared model is 2.4e-4)
    np.testing.assert_allclose(out, ours, rtol=1e-5, atol=2.5e-4)

    # OnnxYoloxDetector serves the export exactly as it serves the shared file
    names = onnx_path.parent / "coco_classes.txt"
    served = OnnxYoloxDetector.from_path(exported, names, num_threads=1)
    shared = OnnxYoloxDetector.from_path(onnx_path, num_threads=1)
    assert served.decoded is False and served.input_size == (416, 416)
    mine, theirs = served.predict([photo])[0], shared.predict([photo])[0]
    assert len(theirs) >= 1 and np.array_equal(mine.labels, theirs.labels)
    assert np.abs(mine.xyxy - theirs.xyxy).max() < 1e-2


def test_export_with_dynamic_height_and_width(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = YoloxNano(num_classes=3).eval()
    exported = export_onnx(model, tmp_path / "dyn.onnx", (320, 320), dynamic_hw=True)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for hw in ((320, 320), (224, 640)):
        batch = rng.uniform(0, 255, (2, 3, *hw)).astype(np.float32)
        (out,) = session.run(None, {"images": batch})
        with torch.no_grad():
            ours = _serving(model(torch.from_numpy(batch)))
        assert out.shape == ours.shape and np.abs(out - ours).max() < 1e-4


# ------------------------------------------------------------------------------ loss
HW = (128, 128)


def _random_raw(batch: int = 2, classes: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    anchors = len(grids(HW)[0])
    return (torch.randn(batch, anchors, 5 + classes, generator=generator) * 0.5).requires_grad_()


def _target(
    boxes: list[list[float]], labels: list[int], weights: list[float] | None = None
) -> YoloxTarget:
    return YoloxTarget(
        torch.tensor(boxes),
        torch.tensor(labels),
        None if weights is None else torch.tensor(weights),
    )


FAR_APART = [[4.0, 6.0, 40.0, 44.0], [80.0, 76.0, 124.0, 120.0]]  # no shared candidates


def _sums(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """The un-normalised sums (loss × max(num_fg, 1))."""
    norm = max(float(losses["num_fg"]), 1.0)
    return {k: float(losses[k]) * norm for k in ("iou", "obj", "cls")}


def test_unit_weights_equal_no_weights() -> None:
    raw = _random_raw()
    boxes = [[10.0, 12.0, 70.0, 90.0], [50.0, 40.0, 120.0, 100.0], [0.0, 0.0, 20.0, 16.0]]
    plain = [_target(boxes, [0, 1, 2]), _target(FAR_APART, [2, 0])]
    ones = [_target(boxes, [0, 1, 2], [1, 1, 1]), _target(FAR_APART, [2, 0], [1, 1])]
    a, b = yolox_loss(raw, plain, HW, use_l1=True), yolox_loss(raw, ones, HW, use_l1=True)
    assert a.keys() == {"total", "iou", "obj", "cls", "l1", "num_fg"}
    assert float(a["num_fg"]) > 0
    for key in a:
        assert abs(float(a[key].detach()) - float(b[key].detach())) < 1e-6, key
    assert float(a["total"]) == pytest.approx(
        5 * float(a["iou"]) + float(a["obj"]) + float(a["cls"]) + float(a["l1"]), abs=1e-5
    )


def test_loss_is_linear_in_box_weights() -> None:
    """Assignment and normaliser ignore the weights, so every term is linear in each weight."""
    raw = _random_raw(batch=1)
    losses = {
        w: yolox_loss(raw, [_target(FAR_APART, [0, 1], [1.0, w])], HW, use_l1=True)
        for w in (0.0, 0.5, 1.0)
    }
    assert float(losses[0.0]["num_fg"]) == float(losses[1.0]["num_fg"])
    for key in ("total", "iou", "obj", "cls", "l1"):
        middle = (float(losses[0.0][key]) + float(losses[1.0][key])) / 2
        assert float(losses[0.5][key]) == pytest.approx(middle, rel=1e-5), key
    assert float(losses[0.0]["total"]) < float(losses[1.0]["total"])


def test_zero_weight_silences_a_box_but_is_not_deleting_it() -> None:
    raw = _random_raw(batch=1)
    cells, strides = grids(HW)
    rows = raw[0].detach()
    boxes = torch.cat([(rows[:, :2] + cells) * strides, rows[:, 2:4].exp() * strides], 1)
    both = _target(FAR_APART, [0, 1])
    found = simota_assign(boxes, rows[:, 4], rows[:, 5:], both, cells, strides)
    rows_of_box1 = found.fg_rows[found.matched_gt == 1]
    assert len(rows_of_box1) >= 1

    # gradients: box 1's anchors get none at all; every other row gets exactly the same as with w=1
    def grad(weights: list[float]) -> torch.Tensor:
        raw.grad = None
        yolox_loss(raw, [_target(FAR_APART, [0, 1], weights)], HW)["total"].backward()
        assert raw.grad is not None
        return raw.grad[0].clone()

    full, silenced = grad([1.0, 1.0]), grad([1.0, 0.0])
    assert torch.all(silenced[rows_of_box1] == 0) and torch.any(full[rows_of_box1] != 0)
    others = torch.ones(len(full), dtype=torch.bool)
    others[rows_of_box1] = False
    assert torch.allclose(silenced[others], full[others], atol=1e-9)

    # deleting box 1 instead: box 0's assignment is unchanged (boxes far apart), the iou and cls
    # sums are the same, but box 1's anchors become background: objectness gains softplus(obj)
    only0 = _target(FAR_APART[:1], [0])
    found0 = simota_assign(boxes, rows[:, 4], rows[:, 5:], only0, cells, strides)
    assert torch.equal(found0.fg_rows, found.fg_rows[found.matched_gt == 0])
    zero = _sums(yolox_loss(raw, [_target(FAR_APART, [0, 1], [1.0, 0.0])], HW))
    deleted = _sums(yolox_loss(raw, [only0], HW))
    assert deleted["iou"] == pytest.approx(zero["iou"], rel=1e-5)
    assert deleted["cls"] == pytest.approx(zero["cls"], rel=1e-5)
    extra = float(torch.nn.functional.softplus(rows[rows_of_box1, 4]).sum())
    assert deleted["obj"] - zero["obj"] == pytest.approx(extra, rel=1e-4)


def test_background_weight_scales_only_unclaimed_anchors_outside_verified_regions() -> None:
    """A partly labelled image: "no object" on unchecked regions weighs ``background_weight``;
    anchors centred in a region answered "no object" and anchors claimed by a box are as stock."""
    raw = _random_raw(batch=1)
    cells, strides = grids(HW)
    centres = ((cells + 0.5) * strides).numpy()
    verified = [[60.0, 0.0, 128.0, 40.0]]
    in_verified = torch.from_numpy(
        (centres[:, 0] > 60) & (centres[:, 0] < 128) & (centres[:, 1] > 0) & (centres[:, 1] < 40)
    )
    assert int(in_verified.sum()) > 0

    def grad(background_weight: float, regions: list[list[float]] | None) -> torch.Tensor:
        raw.grad = None
        target = YoloxTarget(
            torch.tensor(FAR_APART[:1]),
            torch.tensor([0]),
            background_weight=background_weight,
            verified_background=None if regions is None else torch.tensor(regions),
        )
        yolox_loss(raw, [target], HW)["total"].backward()
        assert raw.grad is not None
        return raw.grad[0].clone()

    stock = grad(1.0, None)
    # weight 1 is the stock loss, whatever regions are verified
    assert torch.equal(grad(1.0, verified), stock)
    silenced = grad(0.0, verified)
    rows = raw[0].detach()
    boxes = torch.cat([(rows[:, :2] + cells) * strides, rows[:, 2:4].exp() * strides], 1)
    found = simota_assign(
        boxes, rows[:, 4], rows[:, 5:], _target(FAR_APART[:1], [0]), cells, strides
    )
    claimed = torch.zeros(len(stock), dtype=torch.bool)
    claimed[found.fg_rows] = True
    kept = claimed | in_verified
    # claimed and verified anchors learn exactly as before; the others' objectness learns nothing
    assert torch.allclose(silenced[kept], stock[kept], atol=1e-9)
    assert torch.all(silenced[~kept, 4] == 0) and torch.any(stock[~kept, 4] != 0)
    # and the objectness term is linear in the weight
    obj = {
        w: float(
            yolox_loss(
                raw,
                [YoloxTarget(torch.tensor(FAR_APART[:1]), torch.tensor([0]), background_weight=w)],
                HW,
            )["obj"]
        )
        for w in (0.0, 0.5, 1.0)
    }
    assert obj[0.5] == pytest.approx((obj[0.0] + obj[1.0]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="background_weight"):
        YoloxTarget(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), background_weight=-1.0)


def test_class_mask_leaves_absent_classes_without_gradient() -> None:
    """Masked class columns get no gradient; the others get exactly the stock loss's."""
    raw = _random_raw(batch=1, classes=3)
    target = [_target(FAR_APART, [0, 1])]  # class 2 is absent from the data

    def grad(mask: torch.Tensor | None) -> torch.Tensor:
        raw.grad = None
        yolox_loss(raw, target, HW, class_mask=mask)["total"].backward()
        assert raw.grad is not None
        return raw.grad[0].clone()

    stock = grad(None)
    masked = grad(torch.tensor([True, True, False]))
    assert torch.any(stock[:, 7] != 0)  # the stock loss pushes the absent class down
    assert torch.all(masked[:, 7] == 0)
    assert torch.allclose(masked[:, :7], stock[:, :7], atol=1e-9)
    assert torch.allclose(grad(torch.ones(3, dtype=torch.bool)), stock, atol=1e-9)
    with pytest.raises(ValueError, match="class_mask"):
        yolox_loss(raw, target, HW, class_mask=torch.ones(2, dtype=torch.bool))


def test_present_classes_counts_kept_boxes_of_positive_weight() -> None:
    from backend.training.samples import TrainSample
    from backend.training.yolox_train import present_classes

    image = Image.new("RGB", (64, 48))
    xyxy = np.array([[1, 1, 10, 10], [2, 2, 20, 20], [3, 3, 30, 30], [4, 4, 40, 40]], np.float32)
    boxes = Boxes(xyxy, np.array([0, 1, 2, 3]), image.size, ignore=np.array([0, 0, 1, 0], bool))
    sample = TrainSample(image=image, boxes=boxes, box_weights=np.array([1.0, 0.5, 1.0, 0.0]))
    # label 2 is ignored (crowd / difficult), label 3 weighs 0, label 4 has no box at all
    assert present_classes([sample], 5).tolist() == [True, True, False, False, False]


def test_empty_targets() -> None:
    raw = _random_raw()
    empty = YoloxTarget(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert empty.box_weights.shape == (0,)
    losses = yolox_loss(raw, [empty, empty], HW, use_l1=True)
    assert float(losses["num_fg"]) == 0
    assert float(losses["iou"]) == float(losses["cls"]) == float(losses["l1"]) == 0
    all_background = torch.nn.functional.softplus(raw[..., 4]).sum()  # BCE with target 0
    assert float(losses["obj"]) == pytest.approx(float(all_background), rel=1e-5)
    losses["total"].backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    assert torch.all(raw.grad[..., :4] == 0) and torch.all(raw.grad[..., 5:] == 0)
    mixed = yolox_loss(raw, [empty, _target(FAR_APART, [0, 1])], HW)
    assert float(mixed["num_fg"]) > 0 and math.isfinite(float(mixed["total"]))


def test_simota_on_perfect_predictions_takes_ten_central_anchors() -> None:
    """Every row predicts the gt box exactly (IoU 1), so k = ⌊Σ top-10 IoU⌋ = 10, and the ten
    anchors must come from those inside both the box and its 2.5-stride centre region."""
    hw = (64, 64)
    cells, strides = grids(hw)
    gt = torch.tensor([[12.0, 12.0, 52.0, 52.0]])
    rows = torch.zeros(len(cells), 5 + 2)
    rows[:, :2] = 32.0 / strides - cells
    rows[:, 2:4] = torch.log(40.0 / strides)
    losses = yolox_loss(rows[None], [_target(gt.tolist(), [1])], hw, use_l1=True)
    assert float(losses["num_fg"]) == 10
    assert float(losses["iou"]) < 1e-6 and float(losses["l1"]) < 1e-5
    boxes = torch.cat([(rows[:, :2] + cells) * strides, rows[:, 2:4].exp() * strides], 1)
    found = simota_assign(boxes, rows[:, 4], rows[:, 5:], _target(gt.tolist(), [1]), cells, strides)
    centres = (cells[found.fg_rows] + 0.5) * strides[found.fg_rows]
    assert torch.all((centres > 12) & (centres < 52))
    assert torch.all((centres - 32).abs() < 2.5 * strides[found.fg_rows])
    assert torch.allclose(found.ious, torch.ones(10))


def test_simota_matches_each_anchor_once_and_respects_the_centre_prior() -> None:
    raw = _random_raw(batch=1, seed=3)[0].detach()
    cells, strides = grids(HW)
    boxes = torch.cat([(raw[:, :2] + cells) * strides, raw[:, 2:4].exp() * strides], 1)
    gts = [[10.0, 10.0, 60.0, 60.0], [20.0, 20.0, 70.0, 64.0], [30.0, 5.0, 50.0, 100.0]]
    target = _target(gts, [0, 1, 2])
    found = simota_assign(boxes, raw[:, 4], raw[:, 5:], target, cells, strides)
    assert len(set(found.fg_rows.tolist())) == len(found.fg_rows)  # each anchor once
    # (an overlapped gt may lose every anchor to cheaper neighbours, as in YOLOX: not asserted)
    assert set(found.matched_gt.tolist()) <= {0, 1, 2} and len(found.fg_rows) >= 1
    centres = (cells[found.fg_rows] + 0.5) * strides[found.fg_rows]
    gt = target.boxes_xyxy[found.matched_gt]
    inside = ((centres > gt[:, :2]) & (centres < gt[:, 2:])).all(1)
    near = ((centres - (gt[:, :2] + gt[:, 2:]) / 2).abs() < 2.5 * strides[found.fg_rows]).all(1)
    assert torch.all(inside | near)
    # the IoU reported (the class target's scale) is the predicted box's IoU with its gt
    pred = boxes[found.fg_rows]
    pred_xyxy = torch.cat([pred[:, :2] - pred[:, 2:] / 2, pred[:, :2] + pred[:, 2:] / 2], 1)
    expected = box_iou(pred_xyxy, gt).diagonal()
    assert torch.allclose(found.ious, expected, atol=1e-6)


def test_target_validation() -> None:
    with pytest.raises(ValueError, match="labels"):
        YoloxTarget(torch.zeros(2, 4), torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="x_max"):
        _target([[10.0, 10.0, 5.0, 20.0]], [0])
    with pytest.raises(ValueError, match=">= 0"):
        _target([[0.0, 0.0, 5.0, 5.0]], [0], [-1.0])
    with pytest.raises(ValueError, match="outside"):
        yolox_loss(_random_raw(batch=1), [_target([[0.0, 0.0, 5.0, 5.0]], [3])], HW)


@pytest.mark.shared_data
def test_a_few_steps_on_one_synthetic_image_reduce_the_loss(
    coco: tuple[YoloxNano, list[str]],
) -> None:
    """From the COCO weights (fresh class rows, stem frozen, BN eval): measured 10.7 → 0.8 in 8
    steps. Training the stem at this rate diverges (it sees raw 0–255 pixels)."""
    torch.manual_seed(0)
    model = freeze(remap_classes(coco[0], [None, None]), "stem")
    model.train()
    set_bn_eval(model)
    image = torch.full((1, 3, 128, 128), 114.0)
    image[..., 30:90, 40:100] = torch.tensor([20.0, 200.0, 60.0])[:, None, None]
    target = [_target([[40.0, 30.0, 100.0, 90.0]], [1])]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(8):
        losses = yolox_loss(model(image), target, (128, 128))
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(float(losses["total"].detach()))
    assert history[-1] < 0.3 * history[0], history


# ------------------------------------------------------------------------------ overfitting
@pytest.mark.slow
@pytest.mark.shared_data
def test_fine_tuning_overfits_two_voc_photos(
    coco: tuple[YoloxNano, list[str]], voc_dir: Path
) -> None:
    """30 AdamW steps (backbone frozen, BN eval) on two photos, every class row fresh: mAP@0.5
    goes from chance to ≥ 0.9 (measured 1.0 from step 20). ~25 s on 2 idle threads."""
    from benchmark.datasets.voc import load_voc

    dataset = load_voc(voc_dir)
    samples = [s for s in dataset.samples if s.image_id in ("2007_000063", "2007_000032")]
    labels = sorted({dataset.labels[i] for s in samples for i in s.boxes.labels})
    assert labels == ["aeroplane", "chair", "dog", "person"]
    torch.manual_seed(0)
    model = remap_classes(coco[0], [None] * len(labels))  # nothing carried over from COCO
    hw = (416, 416)
    tensors, targets, truths, ratios = [], [], [], []
    for sample in samples:
        photo = Image.open(sample.image_path)
        batch, r = letterbox(photo, hw)
        indices = np.array([labels.index(dataset.labels[i]) for i in sample.boxes.labels])
        tensors.append(torch.from_numpy(batch[0]))
        targets.append(_target((sample.boxes.xyxy * r).tolist(), indices.tolist()))
        truths.append(Boxes(sample.boxes.xyxy, indices, photo.size))
        ratios.append(r)
    images = torch.stack(tensors)

    def map50() -> float:
        with torch.no_grad():
            found = postprocess(decode(model.eval()(images), hw), 0.05, 0.45)
        preds = [
            Boxes(d.boxes_xyxy.numpy() / r, d.labels.numpy(), t.image_size, d.scores.numpy())
            for d, t, r in zip(found, truths, ratios, strict=True)
        ]
        return evaluate_map(truths, [p.clipped() for p in preds], labels).map50

    # The boxes are COCO's (objectness and regression are pretrained), the classes random: a box
    # can get its right label by chance among four (0.25 with remap_classes' seed 0), never most.
    before = map50()
    assert before < 0.5
    freeze(model, "backbone")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for _ in range(30):
        model.train()
        set_bn_eval(model)
        losses = yolox_loss(model(images), targets, hw)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
    assert map50() >= max(0.9, before + 0.5)
