"""Feature extraction: real ImgNet (EfficientNet-Lite0) features through onnxruntime, SimNet."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from backend.features import (
    FeatureExtractor,
    SimNet,
    SimNetConfig,
    WeightsNotFoundError,
    compute_features,
    effnet_lite0_extractor,
    lifted_structured_loss,
    load_simnet,
    preprocess,
    split_halves,
    torchvision_extractor,
    train_simnet,
)
from backend.features.imgnet import ImgNetExtractor
from backend.nets.effnet_lite0 import efficientnet_lite0_pooled
from backend.store import Store


def scene(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A random scene: coloured background gradient with a few filled shapes."""
    rng = random.Random(seed)
    w, h = size
    base = np.linspace(0, 1, w)[None, :, None] * np.array([rng.random() for _ in range(3)]) * 255
    img = Image.fromarray(np.broadcast_to(base, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randint(0, w - 60), rng.randint(0, h - 60)
        side = rng.randint(20, 80)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        shape = (x0, y0, x0 + side, y0 + side)
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(shape, fill=colour)
    return img


@pytest.fixture(scope="module")
def imgnet(tmp_path_factory: pytest.TempPathFactory) -> ImgNetExtractor:
    return effnet_lite0_extractor(tmp_path_factory.mktemp("onnx"), batch_size=4, num_threads=2)


def test_imgnet_features_match_the_torch_network(imgnet: ImgNetExtractor) -> None:
    images = [scene(i) for i in range(6)]
    feats = imgnet.extract(images, progress=False)
    assert isinstance(imgnet, FeatureExtractor)
    assert feats.shape == (6, 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert imgnet.dim == 1280 and imgnet.name.startswith("imgnet_effnet_lite0@224px-")
    batch = torch.from_numpy(preprocess(images, (224, 224), imgnet.mean, imgnet.std))
    with torch.no_grad():
        ref = efficientnet_lite0_pooled(pretrained=True)(batch).numpy()
    np.testing.assert_allclose(feats, ref, rtol=1e-3, atol=1e-3)
    # batching does not change a vector
    np.testing.assert_allclose(imgnet.extract(images[2:3], progress=False)[0], feats[2], atol=1e-4)


def test_imgnet_features_see_content(imgnet: ImgNetExtractor) -> None:
    a, b = scene(10), scene(11)
    mirrored = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    fa, fb, fm = imgnet.extract([a, b, mirrored], progress=False)
    assert np.linalg.norm(fa - fm) < np.linalg.norm(fa - fb)
    assert imgnet.extract([], progress=False).shape == (0, 1280)


def test_onnx_export_is_cached_by_weights_digest(imgnet: ImgNetExtractor) -> None:
    stamp = imgnet.onnx_path.stat().st_mtime_ns
    again = effnet_lite0_extractor(imgnet.onnx_path.parent, num_threads=1)
    assert again.onnx_path == imgnet.onnx_path and again.name == imgnet.name
    assert imgnet.onnx_path.stat().st_mtime_ns == stamp


def test_preprocess_resizes_whole_image_and_normalises() -> None:
    white = Image.new("RGB", (500, 100), (255, 255, 255))
    batch = preprocess([white, white.convert("L")], (224, 224), (0.5,) * 3, (0.5,) * 3)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, 1.0)


def test_torchvision_weights_are_never_downloaded(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="BOXLOOP_TORCHVISION_WEIGHTS_DIR"):
        torchvision_extractor("resnet50", None, tmp_path)
    with pytest.raises(WeightsNotFoundError, match="resnet50-"):
        torchvision_extractor("resnet50", tmp_path / "empty", tmp_path)
    with pytest.raises(ValueError, match="unknown torchvision arch"):
        torchvision_extractor("vgg99", tmp_path, tmp_path)


def test_compute_features_only_fills_what_is_missing(
    tmp_path: Path, imgnet: ImgNetExtractor
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    tasks = [(t, {"image": f"scene-{t}"}) for t in (1, 2, 3, 4)]
    loads: list[str] = []

    def loader(data: dict) -> Image.Image:  # type: ignore[type-arg]
        loads.append(data["image"])
        if data["image"] == "scene-3":
            raise OSError("cannot decode")
        return scene(int(data["image"].split("-")[1]))

    report = compute_features(store, 7, imgnet, tasks, loader, batch_size=2, progress=False)
    assert sorted(report.computed) == [1, 2, 4] and list(report.failed) == [3]
    assert "cannot decode" in report.failed[3]
    ids, matrix = store.get_features(7, imgnet.name)
    assert ids == [1, 2, 4] and matrix.shape == (3, 1280)
    loads.clear()
    again = compute_features(store, 7, imgnet, tasks, loader, progress=False)
    assert again.computed == [] and sorted(again.reused) == [1, 2, 4] and loads == ["scene-3"]


# ----------------------------------------------------------------------------- SimNet
def test_lifted_structured_loss_prefers_matching_pairs() -> None:
    torch.manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(6, 16), dim=1)
    near = torch.nn.functional.normalize(anchors + 0.01 * torch.randn(6, 16), dim=1)
    shuffled = near[torch.tensor([1, 2, 3, 4, 5, 0])]
    good, bad = lifted_structured_loss(anchors, near), lifted_structured_loss(anchors, shuffled)
    assert good < bad
    # far-apart negatives beyond the margin and identical positives: no loss at all
    e = torch.eye(4) * 3.0
    assert float(lifted_structured_loss(e, e, margin=1.0)) == 0.0
    x = anchors.clone().requires_grad_(True)
    lifted_structured_loss(x, near).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_split_halves() -> None:
    img = scene(1, (301, 200))
    left, right = split_halves(img, "left_right")
    assert left.size == (150, 200) and right.size == (151, 200)
    top, bottom = split_halves(img, "top_bottom")
    assert top.size == (301, 100) and bottom.size == (301, 100)


def test_simnet_short_training_persists_a_working_extractor(tmp_path: Path) -> None:
    images = [scene(i) for i in range(12)]
    config = SimNetConfig(epochs=2, batch_size=4, size=64, embed_dim=16, trainable_from=6, seed=3)
    ext = train_simnet(images, tmp_path / "simnet", config, progress=False)
    record = json.loads((tmp_path / "simnet" / "simnet.json").read_text())
    assert len(record["epoch_loss"]) == 2 and record["finite"]
    assert ext.name == record["name"] and record["digest"] in ext.name
    feats = ext.extract(images, progress=False)
    assert feats.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-4)
    # the ONNX export computes what the trained torch model computes
    model = SimNet(16, pretrained=False)
    model.load_state_dict(torch.load(tmp_path / "simnet" / "simnet.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(preprocess(images, (64, 64), ext.mean, ext.std))).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    reopened = load_simnet(tmp_path / "simnet", num_threads=1)
    assert reopened.name == ext.name
    np.testing.assert_allclose(reopened.extract(images[:3], progress=False), feats[:3], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no trained SimNet"):
        load_simnet(tmp_path / "nothing")
