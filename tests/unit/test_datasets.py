"""Dataset loaders: the real shared subsets, and small files written here, malformed ones included."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.boxes import Boxes
from backend.images import decode_image
from benchmark.datasets import (
    ANY_CLASS,
    KITTI_CLASSES,
    VOC_CLASSES,
    DatasetError,
    Sample,
    SkippedImageWarning,
    decode_images,
    default_shared_data,
    expand_path,
    load_coco,
    load_dataset,
    load_kitti,
    load_voc,
    parse_spec,
)
from benchmark.datasets.common import ZeroAreaBoxWarning


def write_image(path: Path, size: tuple[int, int] = (64, 48)) -> None:
    """A flat image of a colour of its own (the split keeps byte-identical images together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shade = zlib.crc32(path.stem.encode()) % 200
    Image.new("RGB", size, (120, 80, shade)).save(path)


# ------------------------------------------------------------------------------ VOC
VOC_XML = """<annotation>
  <filename>{stem}.jpg</filename>
  <size><width>64</width><height>48</height><depth>3</depth></size>
  {objects}
</annotation>"""


def voc_object(
    name: str, box: tuple[float, float, float, float], difficult: str | None = "0"
) -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    x0, y0, x1, y1 = box
    return (
        f"<object><name>{name}</name>{diff}<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
    )


def make_voc(root: Path, files: dict[str, str], split: list[str] | None = None) -> Path:
    for stem, objects in files.items():
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"{stem}.xml").write_text(
            VOC_XML.format(stem=stem, objects=objects)
        )
        write_image(root / "JPEGImages" / f"{stem}.jpg")
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (main / "trainval.txt").write_text("\n".join(split if split is not None else files) + "\n")
    return root


def test_voc_small_converts_one_based_corners_and_difficult(tmp_path: Path) -> None:
    root = make_voc(
        tmp_path / "voc",
        {
            "a": voc_object("dog", (1, 1, 10, 20)) + voc_object("cat", (5, 6, 30, 40), "1"),
            "b": voc_object("dog", (2, 3, 64, 48), difficult=None),
            "c": "",
        },
    )
    ds = load_voc(root)
    assert ds.labels == VOC_CLASSES  # every name is a VOC class
    assert [s.image_id for s in ds.samples] == ["a", "b", "c"]
    a = ds.samples[0].boxes
    np.testing.assert_allclose(a.xyxy, [[0, 0, 10, 20], [4, 5, 30, 40]])
    assert [ds.labels[i] for i in a.labels] == ["dog", "cat"]
    assert a.ignore_mask.tolist() == [False, True]
    assert ds.samples[1].boxes.ignore_mask.tolist() == [False]  # missing <difficult> means 0
    assert len(ds.samples[2].boxes) == 0 and ds.samples[2].image_size == (64, 48)
    assert ds.num_boxes == 2 and ds.num_ignored == 1
    assert ds.ignore_overlap == "iou"


def test_voc_labels_default_to_names_found_outside_voc(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "r", {"x": voc_object("raccoon", (1, 1, 9, 9))})
    assert load_voc(root).labels == ["raccoon"]


def test_voc_without_split_takes_all_xml(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "v", {"a": "", "b": ""}, split=["a"])
    assert len(load_voc(root)) == 1
    assert len(load_voc(root, split=None)) == 2


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ("<object><name>dog</name></object>", "bndbox"),
        (voc_object("dog", (10, 1, 5, 9)), "no area"),
        (voc_object("dog", (10, 1, 9, 9)), "no area"),  # 1-based: xmax = xmin - 1, reversed
        (voc_object("dog", ("a", 1, 5, 9)), "not a number"),  # type: ignore[arg-type]
        (voc_object("dog", (1, 1, 5, 9), "yes"), "difficult"),
        ("<object><bndbox><xmin>1</xmin></bndbox></object>", "<name>"),
        (voc_object("dog", (100, 100, 200, 200)), "outside"),
    ],
)
def test_voc_malformed_objects_raise(tmp_path: Path, objects: str, message: str) -> None:
    root = make_voc(tmp_path / "v", {"a": objects})
    with pytest.raises(DatasetError, match=message):
        load_voc(root)


def test_voc_invalid_xml_and_wrong_root(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "v", {"a": ""})
    (root / "Annotations" / "a.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match="not valid XML"):
        load_voc(root)
    (root / "Annotations" / "a.xml").write_text("<html/>")
    with pytest.raises(DatasetError, match="expected <annotation>"):
        load_voc(root)


def test_voc_missing_files_raise(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "v", {"a": ""}, split=["a", "ghost"])
    with pytest.raises(DatasetError, match=r"ghost\.xml: listed in split"):
        load_voc(root)
    root = make_voc(tmp_path / "w", {"a": ""})
    (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="no image for 'a'"):
        load_voc(root)
    with pytest.raises(DatasetError, match="split file not found"):
        load_voc(root, split="test")


def test_voc_unknown_class_with_explicit_labels_and_size_mismatch(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "v", {"a": voc_object("dog", (1, 1, 5, 5))})
    with pytest.raises(DatasetError, match="'dog' is not in the label list"):
        load_voc(root, labels=["cat"])
    write_image(root / "JPEGImages" / "a.jpg", (32, 32))
    with pytest.raises(DatasetError, match="<size> says 64x48"):
        load_voc(root)


@pytest.mark.shared_data
def test_voc_shared_subset(shared_data: Path) -> None:
    base = shared_data
    ds = load_voc(base / "voc" / "VOCdevkit" / "VOC2012")
    assert len(ds) == 70 and ds.labels == VOC_CLASSES
    assert ds.num_boxes + ds.num_ignored == 179 and ds.num_ignored == 31
    first = ds.samples[0]
    assert first.image_id == "2007_000027" and first.image_size == (486, 500)
    np.testing.assert_allclose(first.boxes.xyxy, [[173, 100, 349, 351]])
    assert ds.labels[int(first.boxes.labels[0])] == "person"
    assert first.load_image().size == (486, 500)
    raccoon = load_dataset(f"voc:{base / 'voc' / 'raccoon'}")
    assert raccoon.labels == ["raccoon"] and len(raccoon) == 150 and raccoon.num_boxes == 163


def test_voc_box_past_the_border_is_clipped(tmp_path: Path) -> None:
    # 64x48 image; 1-based corners 0..70 and 40..60 reach past the left, right and bottom edges.
    root = make_voc(tmp_path, {"a": voc_object("cat", (0, 40, 70, 60))})
    np.testing.assert_allclose(load_voc(root).samples[0].boxes.xyxy, [[0, 39, 64, 48]])


@pytest.mark.shared_data
def test_voc_raccoon(shared_data: Path) -> None:
    ds = load_dataset(f"voc:{shared_data / 'voc' / 'raccoon'}")
    assert ds.meta["split"] == "trainval" and ds.labels == ["raccoon"]
    assert (len(ds), ds.num_boxes, ds.num_ignored, ds.skipped) == (150, 163, 0, [])
    for sample in ds.samples:
        w, h = sample.image_size
        xyxy = sample.boxes.xyxy
        assert (xyxy[:, :2] >= 0).all() and (xyxy[:, 2] <= w).all() and (xyxy[:, 3] <= h).all()
        assert (sample.boxes.areas > 0).all()


CORNERS = ("xmin", "ymin", "xmax", "ymax")


@pytest.mark.shared_data
def test_voc_bccd_splits_classes_and_borders(shared_data: Path) -> None:
    root = shared_data / "voc" / "BCCD"
    everything = load_dataset(f"voc:{root}?split=")  # an empty split: every XML file
    assert everything.meta["split"] == "all"
    assert (len(everything), everything.num_boxes, everything.num_ignored) == (364, 4888, 0)
    # Three classes COCO lacks, found by name (not VOC's list), in sorted order.
    assert everything.labels == ["Platelets", "RBC", "WBC"]
    assert everything.class_counts() == {"Platelets": 361, "RBC": 4155, "WBC": 372}
    assert {s.image_size for s in everything.samples} == {(640, 480)}
    # This copy's XML corners all lie inside the image (1-based, ≤ 640 / 480): nothing to clip
    # (the loader would clip a box past the border, test_voc_box_past_the_border_is_clipped).
    raw = [
        [float(v.text or "nan") for v in ET.parse(p).getroot().iter() if v.tag in CORNERS]
        for p in sorted((root / "Annotations").glob("*.xml"))
    ]
    corners = np.array([c for r in raw for c in r]).reshape(-1, 4)
    assert len(corners) == 4888
    assert (corners[:, :2] >= 1).all() and (corners[:, 2] <= 640).all()
    assert (corners[:, 3] <= 480).all()
    # Two RBC annotations are single clicks (xmin = xmax, ymin = ymax): one 1-based pixel, kept
    # as a 1x1 box.
    tiny = {
        s.image_id: s.boxes.xyxy[s.boxes.areas <= 1].tolist()
        for s in everything.samples
        if (s.boxes.areas <= 1).any()
    }
    assert tiny == {
        "BloodImage_00338": [[503, 336, 504, 337]],
        "BloodImage_00343": [[180, 328, 181, 329]],
    }
    # ImageSets: trainval (the default) and test partition the 364 images.
    trainval = load_dataset(f"voc:{root}")
    test = load_dataset(f"voc:{root}?split=test")
    assert (len(trainval), len(test)) == (292, 72)
    ids = [s.image_id for s in trainval.samples] + [s.image_id for s in test.samples]
    assert sorted(ids) == sorted(s.image_id for s in everything.samples)
    assert trainval.labels == test.labels == everything.labels


# ------------------------------------------------------------------------------ undecodable images
def truncate(path: Path, missing: int = 20) -> None:
    """Cut the last ``missing`` bytes of a file (a partly downloaded JPEG)."""
    data = path.read_bytes()
    path.write_bytes(data[:-missing])


def test_truncated_jpeg_is_skipped_with_a_warning(tmp_path: Path) -> None:
    cat = voc_object("cat", (2, 2, 20, 20))
    root = make_voc(tmp_path / "voc", {"a": cat, "b": cat, "c": cat})
    truncate(root / "JPEGImages" / "b.jpg")
    ds = load_voc(root)  # the header is intact: the loader keeps it, decoding finds the fault
    assert len(ds) == 3 and ds.skipped == []
    with pytest.warns(SkippedImageWarning, match=r"'b'.*truncated"):
        decoded, images = decode_images(ds)
    assert [s.image_id for s in decoded.samples] == ["a", "c"] and sorted(images) == ["a", "c"]
    assert [(s.image_id, s.path.name) for s in decoded.skipped] == [("b", "b.jpg")]
    assert "truncated" in decoded.skipped[0].reason
    assert decoded.subset([0]).skipped == decoded.skipped  # pool / held-out keep the record
    assert images["a"].mode == "RGB" and images["a"].size == (64, 48)


def test_unreadable_header_is_skipped_by_the_loaders(tmp_path: Path) -> None:
    cat = voc_object("cat", (2, 2, 20, 20))
    root = make_voc(tmp_path / "voc", {"a": cat, "b": cat})
    (root / "JPEGImages" / "a.jpg").write_bytes(b"not an image at all")
    with pytest.warns(SkippedImageWarning, match="'a'"):
        ds = load_voc(root)
    assert [s.image_id for s in ds.samples] == ["b"] and ds.skipped[0].image_id == "a"

    kitti = make_kitti(tmp_path / "kitti", {"000000": [row("Car", (1, 1, 9, 9))], "000001": []})
    (kitti / "training" / "image_2" / "000001.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(SkippedImageWarning, match="000001"):
        assert [s.image_id for s in load_kitti(kitti).samples] == ["000000"]


def test_a_dataset_with_no_decodable_image_is_an_error(tmp_path: Path) -> None:
    cat = voc_object("cat", (2, 2, 20, 20))
    root = make_voc(tmp_path / "voc", {"a": cat, "b": cat})
    for stem in ("a", "b"):
        truncate(root / "JPEGImages" / f"{stem}.jpg")
    with pytest.warns(SkippedImageWarning), pytest.raises(DatasetError, match="no decodable image"):
        decode_images(load_voc(root))
    for stem in ("a", "b"):
        (root / "JPEGImages" / f"{stem}.jpg").write_bytes(b"")
    with pytest.warns(SkippedImageWarning), pytest.raises(DatasetError, match="2 skipped"):
        load_voc(root)


def test_prepare_dataset_skips_and_records_a_truncated_jpeg(tmp_path: Path) -> None:
    from benchmark.config import DatasetConfig
    from benchmark.runner import prepare_dataset

    cat = voc_object("cat", (2, 2, 20, 20))
    root = make_voc(tmp_path / "voc", {f"im{i}": cat for i in range(6)})
    truncate(root / "JPEGImages" / "im3.jpg")
    with pytest.warns(SkippedImageWarning, match="im3"):
        prepared = prepare_dataset(DatasetConfig(spec=f"voc:{root}", holdout=2))
    assert len(prepared.pool) + len(prepared.holdout) == 5 and len(prepared.holdout) == 2
    assert "im3" not in prepared.images and len(prepared.images) == 5
    assert [s.image_id for s in prepared.dataset.skipped] == ["im3"]


# ------------------------------------------------------------------------------ decoding as the backend
def exif_voc(root: Path, orientation: int) -> Path:
    """A 64x48 picture with a red square at its top left, stored as a camera stores it for
    ``orientation`` (3: upside down; 6: turned a quarter), annotated on the upright picture."""
    upright = np.full((48, 64, 3), 40, np.uint8)
    upright[2:18, 2:18] = (255, 0, 0)
    picture = Image.fromarray(upright)
    stored = (
        picture.rotate(180) if orientation == 3 else picture.transpose(Image.Transpose.ROTATE_90)
    )
    make_voc(root, {"a": voc_object("dog", (3, 3, 18, 18))})  # XML <size> 64x48: upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(root / "JPEGImages" / "a.jpg", exif=exif, quality=95)
    return root


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_oriented_photo_is_loaded_upright_as_the_backend_shows_it(
    tmp_path: Path, orientation: int
) -> None:
    sample = load_voc(exif_voc(tmp_path / "voc", orientation)).samples[0]
    assert sample.image_size == (64, 48)  # the upright size, not the stored 48x64
    image = sample.load_image()
    assert image.size == (64, 48)
    backend = decode_image(sample.image_path.read_bytes(), max_pixels=10**8)
    assert np.array_equal(np.asarray(image), np.asarray(backend))
    x0, y0, x1, y1 = (int(v) for v in sample.boxes.xyxy[0])
    red, green, _ = np.asarray(image)[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    assert red > 200 and green < 30  # the box sits on the red square


def test_16_bit_image_is_scaled_like_the_backend_not_clipped_white(tmp_path: Path) -> None:
    gradient = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(gradient).save(path)
    image = Sample("depth", path, Boxes.empty((64, 48))).load_image()
    pixels = np.asarray(image)
    assert np.array_equal(pixels, np.asarray(decode_image(path.read_bytes(), max_pixels=10**8)))
    assert abs(float(pixels.mean()) - 127.5) < 1  # clipping at 255 gave a mean of ~254


def test_search_data_skips_and_records_an_undecodable_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmark.search_data as search_data

    class Extractor:
        name = "stub"

        def extract(self, images: list[Image.Image], progress: bool = False) -> np.ndarray:
            return np.zeros((len(images), 4), np.float32)

    cat = voc_object("cat", (2, 2, 20, 20))
    root = make_voc(tmp_path / "voc", {"a": cat, "b": cat, "c": cat})
    truncate(root / "JPEGImages" / "b.jpg")
    monkeypatch.setattr(search_data, "spatial_map_extractor", lambda *a, **k: Extractor())
    monkeypatch.setattr(search_data, "pooled_extractor", lambda *a, **k: Extractor())
    monkeypatch.setattr(search_data, "COLLECTION_SPECS", ((f"voc:{root}", "search"),))
    monkeypatch.setattr(search_data, "_sketch_categories", lambda shared: [])
    with pytest.warns(SkippedImageWarning, match="'b'"):
        data = search_data.load_search_data(tmp_path, cache_dir=tmp_path / "cache", num_threads=1)
    assert data.image_names == ["voc:voc/a", "voc:voc/c"] and data.skipped == ["voc:voc/b"]
    cached = search_data.load_search_data(tmp_path, cache_dir=tmp_path / "cache", num_threads=1)
    assert cached.skipped == ["voc:voc/b"]  # the record survives the feature cache


def test_pretrained_input_skips_and_records_an_undecodable_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmark.pretrained_input as pretrained_input

    class Detector:
        def predict(self, images: list[Image.Image]) -> list[Boxes]:
            return [Boxes.empty(im.size, with_scores=True) for im in images]

        def input_size_for(self, size: tuple[int, int]) -> tuple[int, int]:
            return (416, 416)

    cat = voc_object("cat", (2, 2, 20, 20))
    root = make_voc(tmp_path / "voc", {"a": cat, "b": cat, "c": cat})
    truncate(root / "JPEGImages" / "c.jpg")
    monkeypatch.setattr(pretrained_input, "DATASETS", (f"voc:{root}",))
    monkeypatch.setattr(pretrained_input, "load_settings", lambda **kw: None)
    monkeypatch.setattr(pretrained_input, "load_pretrained", lambda settings, labels: Detector())
    with pytest.warns(SkippedImageWarning, match="'c'"):
        row = pretrained_input.run(tmp_path / "model.onnx", repeats=1)["rows"][0]
    assert row["images"] == 2 and row["boxes"] == 2
    assert [s["image_id"] for s in row["skipped_images"]] == ["c"]


def test_simnet_pool_skips_and_records_an_undecodable_image(tmp_path: Path) -> None:
    from benchmark.simnet_vs_imgnet import load_pool

    cat = voc_object("cat", (2, 2, 20, 20))
    make_voc(tmp_path / "voc" / "VOCdevkit" / "VOC2012", {"v1": cat, "v2": cat})
    make_coco(tmp_path / "coco" / "mini")
    make_voc(tmp_path / "voc" / "raccoon", {"r1": voc_object("raccoon", (2, 2, 9, 9)), "r2": ""})
    make_kitti(tmp_path / "kitti" / "tiny", {"000000": [row("Car", (1, 1, 9, 9))]})
    truncate(tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "v1.jpg")
    truncate(tmp_path / "voc" / "raccoon" / "JPEGImages" / "r2.jpg")
    with pytest.warns(SkippedImageWarning):
        images, labels, n_labelled, skipped = load_pool(tmp_path)
    assert [s.image_id for s in skipped] == ["v1", "r2"]
    assert (len(images), n_labelled) == (1 + 2 + 1 + 1, 3)  # v2, COCO 11 and 12, r1, 000000
    assert labels == ["cat", "kite", None]  # v2, COCO image 11 (its kite), image 12 (no box)


def test_utility_labels_skip_and_record_an_undecodable_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmark.utility_labels as utility_labels
    from benchmark.utility_config import UtilityBenchConfig

    root = make_voc(tmp_path / "voc", {"a": voc_object("cat", (2, 2, 20, 20))})
    truncate(root / "JPEGImages" / "a.jpg")
    monkeypatch.setattr(utility_labels, "load_datasets", lambda config: [load_voc(root)])
    monkeypatch.setattr(utility_labels, "TrunkEncoder", lambda *a, **k: None)
    monkeypatch.setattr(utility_labels, "coco_yolox_at", lambda *a, **k: None)
    config = UtilityBenchConfig(datasets=[f"voc:{root}"])
    with pytest.warns(SkippedImageWarning, match="'a'"):
        items, _, defined, _, skipped = utility_labels._label_chunk(config, tmp_path, 0, 0, 1)
    assert (items, defined) == ([], 0)
    assert [(s.image_id, s.path.name) for s in skipped] == [("a", "a.jpg")]


# ------------------------------------------------------------------------------ KITTI
KITTI_ROW = "{kind} 0.00 0 -0.20 {x0} {y0} {x1} {y1} 1.89 0.48 1.20 1.84 1.47 8.41 0.01"


def make_kitti(root: Path, frames: dict[str, list[str]], suffix: str = ".png") -> Path:
    (root / "training" / "label_2").mkdir(parents=True, exist_ok=True)
    for stem, rows in frames.items():
        (root / "training" / "label_2" / f"{stem}.txt").write_text("\n".join(rows) + "\n")
        write_image(root / "training" / "image_2" / f"{stem}{suffix}", (120, 40))
    return root


def row(kind: str, box: tuple[float, float, float, float]) -> str:
    return KITTI_ROW.format(kind=kind, x0=box[0], y0=box[1], x1=box[2], y1=box[3])


def test_kitti_small_png_and_dontcare(tmp_path: Path) -> None:
    root = make_kitti(
        tmp_path / "k",
        {"000000": [row("Car", (1.5, 2, 50, 30)), row("DontCare", (60, 0, 90, 20))], "000001": []},
    )
    ds = load_kitti(root)  # the folder above training/ is accepted
    assert ds.labels == KITTI_CLASSES and ds.ignore_overlap == "pred_area"
    boxes = ds.samples[0].boxes
    np.testing.assert_allclose(boxes.xyxy, [[1.5, 2, 50, 30], [60, 0, 90, 20]])
    assert boxes.labels.tolist() == [0, ANY_CLASS]
    assert boxes.ignore_mask.tolist() == [False, True]
    assert len(ds.samples[1].boxes) == 0 and ds.samples[1].image_path.suffix == ".png"


def test_kitti_jpeg_and_box_clipped_to_image(tmp_path: Path) -> None:
    root = make_kitti(tmp_path / "k", {"7": [row("Cyclist", (100, 10, 125, 45))]}, suffix=".jpeg")
    ds = load_kitti(root / "training")
    np.testing.assert_allclose(ds.samples[0].boxes.xyxy, [[100, 10, 120, 40]])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("Car 0 0 0 1 2 3", "7 fields, expected 15"),
        (row("Car", (1, 2, 30, 20)) + " 0.9", "results file"),
        (row("Car", (1, 2, 30, 20)).replace(" 1 2 30 20", " 1 x 30 20"), "not numbers"),
        (row("Zeppelin", (1, 2, 30, 20)), "'Zeppelin' is not in the label list"),
        (row("Van", (30, 2, 10, 20)), "no area"),
        (row("Van", (30, 2, 30, 20)), "no area"),  # zero width: no known KITTI quirk, raises
    ],
)
def test_kitti_malformed_lines_raise_with_location(tmp_path: Path, line: str, message: str) -> None:
    root = make_kitti(tmp_path / "k", {"000003": [row("Car", (1, 1, 9, 9)), line]})
    with pytest.raises(DatasetError, match=message) as info:
        load_kitti(root)
    assert "000003.txt:2" in str(info.value)


def test_kitti_label_image_mismatch_raises(tmp_path: Path) -> None:
    root = make_kitti(tmp_path / "k", {"a": []})
    write_image(root / "training" / "image_2" / "b.png")
    with pytest.raises(DatasetError, match="without a label file"):
        load_kitti(root)
    (root / "training" / "image_2" / "b.png").unlink()
    (root / "training" / "image_2" / "a.png").unlink()
    with pytest.raises(DatasetError, match="no image for 'a'"):
        load_kitti(root)
    with pytest.raises(DatasetError, match="not a KITTI"):
        load_kitti(tmp_path)


@pytest.mark.shared_data
def test_kitti_shared_subset(shared_data: Path) -> None:
    ds = load_dataset(f"kitti:{shared_data / 'kitti' / 'tiny'}")
    assert len(ds) == 75 and ds.num_boxes == 311 and ds.num_ignored == 188
    first = ds.samples[0]
    assert first.image_id == "000000" and first.image_path.suffix == ".jpeg"
    np.testing.assert_allclose(first.boxes.xyxy, [[712.40, 143.00, 810.73, 307.92]], atol=1e-3)
    assert ds.labels[int(first.boxes.labels[0])] == "Pedestrian"
    counts = ds.class_counts()
    assert counts["Car"] == 209 and counts["Person_sitting"] == 5
    ignored_labels = {int(v) for s in ds.samples for v in s.boxes.labels[s.boxes.ignore_mask]}
    assert ignored_labels == {ANY_CLASS}


# ------------------------------------------------------------------------------ COCO
def make_coco(root: Path, data: dict | None = None) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    write_image(root / "val2017" / "1.jpg", (64, 48))
    write_image(root / "val2017" / "2.jpg", (64, 48))
    if data is None:
        data = {
            "images": [
                {"id": 11, "file_name": "1.jpg", "width": 64, "height": 48},
                {"id": 12, "file_name": "2.jpg", "width": 64, "height": 48},
            ],
            "categories": [
                {"id": 42, "name": "kite"},
                {"id": 3, "name": "car"},
                {"id": 7, "name": "train"},
            ],
            "annotations": [
                {"id": 1, "image_id": 11, "category_id": 42, "bbox": [1, 2, 10, 20], "iscrowd": 0},
                {"id": 2, "image_id": 11, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 1},
            ],
        }
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(data))
    return root


def test_coco_small_noncontiguous_ids_crowd_and_empty_image(tmp_path: Path) -> None:
    ds = load_coco(make_coco(tmp_path / "c"))
    assert ds.labels == ["car", "train", "kite"]  # category-id order: 3, 7, 42
    boxes = ds.samples[0].boxes
    np.testing.assert_allclose(boxes.xyxy, [[1, 2, 11, 22], [5, 5, 10, 10]])
    assert [ds.labels[i] for i in boxes.labels] == ["kite", "car"]
    assert boxes.ignore_mask.tolist() == [False, True]
    assert ds.samples[1].image_id == "12" and len(ds.samples[1].boxes) == 0
    assert ds.ignore_overlap == "pred_area"
    json_path = tmp_path / "c" / "annotations" / "instances_val2017.json"
    assert len(load_coco(json_path)) == 2


def _broken(tmp_path: Path, mutate) -> Path:  # type: ignore[no-untyped-def]
    root = make_coco(tmp_path / "c")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"][0].update(category_id=99), "unknown category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=99), "unknown images"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox must be"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 5]), "no area"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 5]), "non-finite"),
        (lambda d: d["annotations"][0].update(iscrowd=2), "iscrowd"),
        (lambda d: d["images"][0].update(file_name="nope.jpg"), "'nope.jpg' not in"),
        (lambda d: d["images"][0].update(width=65), "65x48 in the JSON"),
        (lambda d: d.pop("categories"), "missing list 'categories'"),
        (lambda d: d["annotations"][0].pop("bbox"), r"lacks \['bbox'\]"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "duplicate ids"),
    ],
)
def test_coco_malformed_raise(tmp_path: Path, mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DatasetError, match=message):
        load_coco(_broken(tmp_path, mutate))


def test_coco_zero_area_boxes_are_left_out_with_one_warning(tmp_path: Path) -> None:
    """The official train2017 JSON has two boxes of zero height (ann 918: ``[296.65, 388.33,
    1.03, 0.0]``, cocoapi#355): they are dropped and counted, the rest of the set loads."""

    def mutate(data: dict) -> None:  # type: ignore[type-arg]
        data["annotations"] += [
            {"id": 918, "image_id": 11, "category_id": 7, "bbox": [29.65, 38.33, 1.03, 0.0]},
            {"id": 919, "image_id": 12, "category_id": 7, "bbox": [3, 4, 0, 9], "iscrowd": 1},
        ]

    with pytest.warns(ZeroAreaBoxWarning, match=r"2 box\(es\).*\[918, 919\]") as record:
        ds = load_coco(_broken(tmp_path, mutate))
    assert len([w for w in record if w.category is ZeroAreaBoxWarning]) == 1
    assert ds.meta["zero_area_boxes"] == "2"
    np.testing.assert_allclose(ds.samples[0].boxes.xyxy, [[1, 2, 11, 22], [5, 5, 10, 10]])
    assert len(ds.samples[1].boxes) == 0
    assert load_coco(make_coco(tmp_path / "clean")).meta["zero_area_boxes"] == "0"


def test_coco_bad_json_and_unknown_label(tmp_path: Path) -> None:
    root = make_coco(tmp_path / "c")
    with pytest.raises(DatasetError, match=r"\['kite'\] are not in the label list"):
        load_coco(root, labels=["car", "train"])
    (root / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_coco(root)


@pytest.mark.shared_data
def test_coco_shared_subset(shared_data: Path) -> None:
    ds = load_dataset(f"coco:{shared_data / 'coco' / 'mini'}")
    assert len(ds) == 80 and len(ds.labels) == 80
    assert ds.num_boxes + ds.num_ignored == 739 and ds.num_ignored == 8
    assert ds.labels[0] == "person" and ds.labels[-1] == "toothbrush"  # ids 1 and 90
    by_id = {s.image_id: s for s in ds.samples}
    boxes = by_id["535506"].boxes
    row_index = int(np.argmin(np.abs(boxes.xyxy[:, 0] - 120.46)))
    np.testing.assert_allclose(
        boxes.xyxy[row_index], [120.46, 133.32, 120.46 + 212.31, 133.32 + 498.58], atol=1e-2
    )
    assert ds.labels[int(boxes.labels[row_index])] == "person"


# ------------------------------------------------------------------------------ specs
def test_parse_spec_and_errors(tmp_path: Path) -> None:
    spec = parse_spec("voc:/data/VOC2012?split=val")
    assert (
        spec.format == "voc"
        and spec.path == Path("/data/VOC2012")
        and spec.options == {"split": "val"}
    )
    with pytest.raises(DatasetError, match="must start with one of"):
        parse_spec("yolo:/x")
    with pytest.raises(DatasetError, match="unknown option"):
        parse_spec("kitti:/x?split=val")
    with pytest.raises(DatasetError, match="no path"):
        parse_spec("coco:")


def test_load_dataset_spec_options(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "v", {"a": voc_object("dog", (1, 1, 5, 5))})
    ds = load_dataset(f"voc:{root}?labels=cat,dog")
    assert ds.labels == ["cat", "dog"] and ds.samples[0].boxes.labels.tolist() == [1]


def test_expand_path_uses_shared_data_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BOXLOOP_SHARED_DATA", "/somewhere/data")
    assert expand_path("$BOXLOOP_SHARED_DATA/kitti") == Path("/somewhere/data/kitti")
    monkeypatch.delenv("BOXLOOP_SHARED_DATA")
    expanded = expand_path("${BOXLOOP_SHARED_DATA}/kitti")
    assert expanded == default_shared_data() / "kitti" and os.path.isabs(expanded)
