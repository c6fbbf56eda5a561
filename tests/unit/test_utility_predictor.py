"""The utility predictor trains on cached trunk maps and serves the same answers through ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from backend.features.base import export_onnx, preprocess
from backend.nets.effnet_lite0 import imagenet_normalization
from backend.utility.distortions import decode, encode_png
from backend.utility.predictor import (
    PredictorConfig,
    TrunkEncoder,
    UtilityNet,
    UtilityPredictor,
    _Probabilities,
    class_weights,
    export_predictor,
    predictor_view,
    train_top,
)

SIZE = 96  # small input: the network is the real one, the images are tiny


def _scene(seed: int, blur: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (128, 96), tuple(int(v) for v in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(25):
        x, y, r = int(rng.integers(0, 128)), int(rng.integers(0, 96)), int(rng.integers(3, 15))
        draw.rectangle(
            [x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
        )
    return image.filter(ImageFilter.GaussianBlur(4)) if blur else image


def test_class_weights_balance_the_classes() -> None:
    weights = class_weights(np.array([1, 1, 1, 0]))
    assert weights.tolist() == pytest.approx([2.0, 4 / 6])
    assert class_weights(np.array([1, 1])).tolist() == pytest.approx([0.0, 0.5])


def test_trunk_and_top_compose_to_forward() -> None:
    net = UtilityNet(train_from=4).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(net(x), net.top(net.trunk(x)), atol=1e-5)
    frozen = {id(p) for p in net.trainable_parameters()}
    assert all(id(p) not in frozen for p in net.net.conv_stem.parameters())


def test_predictor_learns_sharp_vs_blurred_and_onnx_matches_torch(tmp_path: Path) -> None:
    config = PredictorConfig(epochs=6, batch_size=8, lr=3e-3, size=SIZE, threads=1)
    images = [_scene(i, blur=i % 2 == 0) for i in range(24)]
    labels = np.array([0 if i % 2 == 0 else 1 for i in range(24)])
    trunk = TrunkEncoder(tmp_path, config)
    maps = trunk.encode(images)
    assert maps.shape == (24, *trunk.map_shape)
    net, history = train_top(maps, labels, config)
    assert history.loss[-1] < history.loss[0]
    path = export_predictor(net, tmp_path / "utility.onnx", size=SIZE)
    predictor = UtilityPredictor(path, num_threads=1)
    test = [_scene(100 + i, blur=i % 2 == 0) for i in range(8)]
    truth = np.array([0 if i % 2 == 0 else 1 for i in range(8)])
    proba = predictor.predict_proba(test)
    assert ((proba >= 0.5).astype(int) == truth).mean() >= 0.75
    # served probabilities equal eager PyTorch's on the same preprocessing
    mean, std = imagenet_normalization()
    batch = torch.from_numpy(preprocess(test, (SIZE, SIZE), mean, std))
    with torch.no_grad():
        eager = torch.softmax(net(batch), dim=1)[:, 1].numpy()
    assert np.allclose(proba, eager, atol=1e-4)
    # decoded pixels only: the same pixels saved as PNG get the same answer
    again = [decode(encode_png(image)) for image in test]
    assert np.allclose(predictor.predict_proba(again), proba, atol=1e-6)


def test_train_top_rejects_bad_labels() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        train_top(np.zeros((2, 80, 6, 6), np.float16), np.array([0, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        train_top(np.zeros((0, 80, 6, 6), np.float16), np.array([], np.int64))


def test_predictor_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="utility predictor not found"):
        UtilityPredictor(tmp_path / "missing.onnx")


def test_a_predictor_exported_with_float_input_is_still_served(tmp_path: Path) -> None:
    """Predictors exported before the graph took uint8 pixels keep working, with equal answers."""
    net = UtilityNet().eval()
    new = UtilityPredictor(export_predictor(net, tmp_path / "new.onnx", size=SIZE), num_threads=1)
    old_path = export_onnx(_Probabilities(net), tmp_path / "old.onnx", (SIZE, SIZE))
    (tmp_path / "old.json").write_text(f'{{"size": {SIZE}}}')
    old = UtilityPredictor(old_path, num_threads=1)
    assert new.encoder.takes_pixels and not old.encoder.takes_pixels
    images = [_scene(i, blur=i % 3 == 0) for i in range(6)] + [_scene(9, False).convert("L")]
    assert np.allclose(new.predict_proba(images), old.predict_proba(images), atol=1e-5)


def test_crop_view_keeps_the_centre_pixels_at_their_own_scale() -> None:
    image = _scene(3, blur=False)  # 128 × 96
    crop = predictor_view(image, "crop", 64)
    assert crop.size == (64, 64)
    assert np.array_equal(np.asarray(crop), np.asarray(image)[16:80, 32:96])
    assert predictor_view(image, "resize", 64) is image
    small = predictor_view(image, "crop", 120)  # short side 96 < 120: enlarged to 160 × 120 first
    assert small.size == (120, 120)
    with pytest.raises(ValueError, match="view must be one of"):
        predictor_view(image, "tile", 64)
    with pytest.raises(ValueError, match="view must be one of"):
        PredictorConfig(view="tile")


def test_a_crop_view_predictor_trains_and_serves_on_the_same_view(tmp_path: Path) -> None:
    """The trunk maps it trains on and the served answers both read the centre crop: served
    probabilities equal eager PyTorch's on the crops, and the sidecar carries the view."""
    config = PredictorConfig(epochs=2, batch_size=8, size=64, view="crop", threads=1)
    images = [_scene(i, blur=i % 2 == 0) for i in range(8)]
    trunk = TrunkEncoder(tmp_path, config)
    maps = trunk.encode(images)
    net, _ = train_top(maps, np.array([i % 2 for i in range(8)]), config)
    path = export_predictor(net, tmp_path / "crop.onnx", size=64, view="crop")
    predictor = UtilityPredictor(path, num_threads=1)
    assert predictor.view == "crop"
    mean, std = imagenet_normalization()
    crops = [predictor_view(im, "crop", 64) for im in images]
    batch = torch.from_numpy(preprocess(crops, (64, 64), mean, std))
    with torch.no_grad():
        eager = torch.softmax(net(batch), dim=1)[:, 1].numpy()
        trunk_eager = net.trunk(batch).numpy()
    assert np.allclose(predictor.predict_proba(images), eager, atol=1e-4)
    assert np.allclose(maps.astype(np.float32), trunk_eager, atol=2e-2)
