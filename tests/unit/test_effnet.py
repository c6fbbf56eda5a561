"""EfficientNet-Lite0 loaded offline: every weight lands where it belongs, and it sees real objects."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from backend.nets import effnet_lite0 as lite0

REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data() -> Path:
    return (REPO_ROOT / os.environ.get("BOXLOOP_SHARED_DATA", "../shared/data")).resolve()


def test_every_packaged_key_maps_one_to_one_with_matching_shapes() -> None:
    raw = lite0._raw_weights()
    mapped = lite0.pretrained_state_dict()
    reference = lite0._create().state_dict()
    assert len(raw) == len(mapped) == len(reference) == 296
    assert set(mapped) == set(reference)
    for key, value in raw.items():
        new = lite0.lukemelas_to_timm_key(key)
        assert mapped[new].shape == reference[new].shape
        assert torch.equal(mapped[new], value)


def test_key_mapping_examples() -> None:
    assert lite0.lukemelas_to_timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert (
        lite0.lukemelas_to_timm_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    )
    # flat block 15 is the single block of the last stage; 11..14 are stage 5
    assert lite0.lukemelas_to_timm_key("_blocks.15._project_conv.weight") == (
        "blocks.6.0.conv_pwl.weight"
    )
    assert (
        lite0.lukemelas_to_timm_key("_blocks.14._bn0.running_var") == "blocks.5.3.bn1.running_var"
    )
    assert lite0.lukemelas_to_timm_key("_fc.bias") == "classifier.bias"
    with pytest.raises(KeyError):
        lite0.lukemelas_to_timm_key("_blocks.16._bn0.weight")
    with pytest.raises(KeyError):
        lite0.lukemelas_to_timm_key("_swish.weight")


def test_mismatched_weights_fail_loudly() -> None:
    raw = dict(lite0._raw_weights())
    reference = lite0._create().state_dict()
    missing = {k: v for k, v in raw.items() if k != "_conv_head.weight"}
    with pytest.raises(ValueError, match="missing"):
        lite0._remap(missing, reference)
    reshaped = {**raw, "_fc.weight": torch.zeros(10, 1280)}
    with pytest.raises(ValueError, match="shape mismatch"):
        lite0._remap(reshaped, reference)


def test_feature_body_shapes_and_weights_agree_with_classifier() -> None:
    torch.set_num_threads(1)
    body, channels = lite0.efficientnet_lite0_features()
    assert channels == [40, 112, 320]
    full = lite0.efficientnet_lite0().eval()
    body.eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        maps = body(x)
        assert [tuple(m.shape) for m in maps] == [(1, 40, 12, 16), (1, 112, 6, 8), (1, 320, 3, 4)]
        # the pyramid's last level is the classifier's last block: same weights, same numbers
        deep = full.blocks(full.bn1(full.conv_stem(x)))
    torch.testing.assert_close(maps[-1], deep)
    _, all_channels = lite0.efficientnet_lite0_features((0, 1, 2, 3, 4), pretrained=False)
    assert tuple(all_channels) == lite0.FEATURE_CHANNELS
    with pytest.raises(ValueError):
        lite0.efficientnet_lite0_features((5,))


def test_pooled_features_are_mean_of_forward_features() -> None:
    torch.set_num_threads(1)
    pooled = lite0.efficientnet_lite0_pooled()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = pooled(x)
        ref = pooled.net.forward_features(x).mean(dim=(2, 3))
    assert out.shape == (2, lite0.POOLED_DIM)
    torch.testing.assert_close(out, ref)
    assert not pooled.training


def test_new_class_count_keeps_pretrained_body() -> None:
    model = lite0.efficientnet_lite0(num_classes=3)
    assert model.classifier.out_features == 3
    torch.testing.assert_close(
        model.conv_stem.weight, lite0.pretrained_state_dict()["conv_stem.weight"]
    )


# VOC class -> ImageNet-1k indices that count as the right answer for a crop of that object.
_IMAGENET_SETS: dict[str, set[int]] = {
    "cat": set(range(281, 286)),
    "dog": set(range(151, 269)),
    "bird": set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147)),
    "aeroplane": {404, 895, 908},
    "horse": {339, 603},
    "sheep": {348, 349},
    "cow": {345, 346, 347},
}


@pytest.mark.shared_data
@pytest.mark.parametrize("tf_padding", [True, False])
def test_classifies_real_voc_objects(tf_padding: bool) -> None:
    voc = shared_data() / "voc" / "VOCdevkit" / "VOC2012"
    if not (voc / "Annotations").is_dir():
        pytest.skip(f"shared VOC data not found at {voc} (set BOXLOOP_SHARED_DATA)")
    torch.set_num_threads(1)
    mean, std = lite0.imagenet_normalization()
    crops: list[torch.Tensor] = []
    names: list[str] = []
    for xml in sorted((voc / "Annotations").glob("*.xml")):
        image: Image.Image | None = None
        for obj in ET.parse(xml).findall("object"):
            name = obj.findtext("name", "")
            box = obj.find("bndbox")
            if name not in _IMAGENET_SETS or box is None:
                continue
            x0, y0, x1, y1 = (
                int(float(box.findtext(k, "0"))) for k in ("xmin", "ymin", "xmax", "ymax")
            )
            if (x1 - x0) * (y1 - y0) < 64 * 64:
                continue
            if image is None:
                image = Image.open(voc / "JPEGImages" / f"{xml.stem}.jpg").convert("RGB")
            crop = TF.resize(image.crop((x0, y0, x1, y1)), [224, 224])
            crops.append(TF.normalize(TF.to_tensor(crop), mean, std))
            names.append(name)
    assert len(crops) >= 20
    model = lite0.efficientnet_lite0(tf_padding=tf_padding).eval()
    with torch.inference_mode():
        top5 = model(torch.stack(crops)).topk(5).indices
    hits = [bool(set(row.tolist()) & _IMAGENET_SETS[n]) for row, n in zip(top5, names, strict=True)]
    # measured 32 of 33 crops with either padding; random weights hit 7 of 33 (the dog set alone spans 118 classes)
    assert sum(hits) / len(hits) >= 0.8
