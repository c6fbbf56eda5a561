from __future__ import annotations

import numpy as np
import pytest

from backend.boxes import Boxes
from backend.ingest import parse_boxes
from backend.labelstudio.convert import (
    AnnotationParseError,
    LabelConfigError,
    MissingImageSize,
    boxes_to_regions,
    parse_label_config,
    prediction_of,
    regions_to_boxes,
)
from tests.synthetic import LABEL_CONFIG


def test_parse_label_config() -> None:
    config = parse_label_config(LABEL_CONFIG)
    assert (config.from_name, config.to_name, config.image_key) == ("label", "image", "image")
    assert config.labels == ("Square", "Disc")


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (
            '<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="x"/></Choices></View>',
            "no <RectangleLabels>",
        ),
        ("<View><Image", "not valid XML"),
        (
            '<View><RectangleLabels name="l" toName="nope"><Label value="a"/></RectangleLabels></View>',
            "no <Image> with that name",
        ),
        (
            '<View><Image name="i" value="$img"/><RectangleLabels name="l" toName="i"/></View>',
            "lists no <Label",
        ),
        ("", "empty"),
    ],
)
def test_bad_label_configs_say_what_is_wrong(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message):
        parse_label_config(xml)


def test_regions_roundtrip_in_pixels() -> None:
    config = parse_label_config(LABEL_CONFIG)
    boxes = Boxes(
        np.array([[10, 20, 110, 70], [0, 0, 50, 50]]),
        np.array([0, 1]),
        (200, 100),
        scores=np.array([0.9, 0.4]),
    )
    regions = boxes_to_regions(boxes, config)
    assert regions[0]["value"]["x"] == pytest.approx(5.0)
    assert regions[0]["value"]["height"] == pytest.approx(50.0)
    assert regions[1]["value"]["rectanglelabels"] == ["Disc"]
    assert regions[0]["score"] == pytest.approx(0.9)
    back = regions_to_boxes(regions, config)
    np.testing.assert_allclose(back.xyxy, boxes.xyxy, atol=1e-3)
    np.testing.assert_array_equal(back.labels, boxes.labels)


def test_rotated_region_becomes_its_axis_aligned_hull() -> None:
    config = parse_label_config(LABEL_CONFIG)
    region = {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {
            "x": 50,
            "y": 10,
            "width": 10,
            "height": 20,
            "rotation": 90,
            "rectanglelabels": ["Square"],
        },
    }
    boxes = regions_to_boxes([region], config, (100, 100))
    # rotated 90° clockwise about the top-left corner (50, 10): x spans [30, 50], y spans [10, 20]
    np.testing.assert_allclose(boxes.xyxy[0], [30, 10, 50, 20], atol=1e-4)


def test_unknown_label_and_missing_size_are_errors() -> None:
    config = parse_label_config(LABEL_CONFIG)
    region = {
        "from_name": "label",
        "type": "rectanglelabels",
        "value": {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Cat"]},
    }
    with pytest.raises(AnnotationParseError, match="'Cat' is not in"):
        regions_to_boxes([region], config, (10, 10))
    region["value"]["rectanglelabels"] = ["Square"]  # type: ignore[index]
    with pytest.raises(AnnotationParseError, match="original_width"):
        regions_to_boxes([region], config)


@pytest.mark.parametrize("key", ["x", "y", "width", "height", "rotation"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_coordinate_is_an_error_not_a_silently_dropped_box(
    key: str, bad: float
) -> None:
    """A number past 1e308 parses as infinity, and Python's JSON reads NaN: clipping would drop
    such a box without a word, and its object would teach the detector "background"."""
    config = parse_label_config(LABEL_CONFIG)
    value = {"x": 1, "y": 1, "width": 5, "height": 5, "rectanglelabels": ["Square"], key: bad}
    region = {"from_name": "label", "type": "rectanglelabels", "value": value}
    with pytest.raises(AnnotationParseError, match="finite"):
        regions_to_boxes([region], config, (10, 10))


def test_other_controls_are_ignored_and_labels_outside_the_config_dropped() -> None:
    config = parse_label_config(LABEL_CONFIG)
    assert (
        len(
            regions_to_boxes(
                [{"from_name": "notes", "type": "textarea", "value": {}}], config, (10, 10)
            )
        )
        == 0
    )
    boxes = Boxes(np.array([[1, 1, 5, 5], [2, 2, 8, 8]]), np.array([0, 1]), (10, 10))
    regions = boxes_to_regions(boxes, config, labels=["Square", "Cat"])
    assert [r["value"]["rectanglelabels"] for r in regions] == [["Square"]]


def _square(**value: float) -> dict:
    box = {"x": 10, "y": 10, "width": 20, "height": 30, "rectanglelabels": ["Square"], **value}
    return {"from_name": "label", "type": "rectanglelabels", "value": box}


def test_a_box_drawn_backwards_spans_back_instead_of_vanishing() -> None:
    """A negative width or height (an import, a box dragged leftwards) clipped to nothing, and
    its object trained as background."""
    config = parse_label_config(LABEL_CONFIG)
    boxes = regions_to_boxes([_square(x=30, width=-20, y=40, height=-30)], config, (100, 100))
    np.testing.assert_allclose(boxes.xyxy, [[10, 10, 30, 40]], atol=1e-4)


@pytest.mark.parametrize("side", [0, 0.5, -320, 1e39])
def test_an_original_size_no_image_has_is_an_error(side: float) -> None:
    """0.5 and -320 made every box vanish in clipping; 1e39 stored NaN corners."""
    region = {**_square(), "original_width": side, "original_height": 240}
    with pytest.raises(AnnotationParseError, match="original size"):
        regions_to_boxes([region], parse_label_config(LABEL_CONFIG))


def test_corners_past_float32_are_an_error() -> None:
    with pytest.raises(AnnotationParseError, match="past any image"):
        regions_to_boxes([_square(x=1e38)], parse_label_config(LABEL_CONFIG), (1000, 1000))


def test_a_box_of_another_box_control_is_an_error_not_background() -> None:
    """With two RectangleLabels controls boxloop reads the first; a box of the second was skipped,
    and its image trained with no object."""
    config = parse_label_config(LABEL_CONFIG)
    other = {**_square(), "from_name": "people"}
    with pytest.raises(AnnotationParseError, match="'people'"):
        regions_to_boxes([_square(), other], config, (100, 100))
    text = {"from_name": "notes", "type": "textarea", "value": {"text": ["ok"]}}
    assert len(regions_to_boxes([_square(), text], config, (100, 100))) == 1  # others: ignored


def test_missing_sizes_leave_the_boxes_to_the_image() -> None:
    """Label Studio's ANNOTATION_UPDATED webhook carries regions without original_width: the
    store keeps no boxes and no parse error, and training reads them at the image's size."""
    config = parse_label_config(LABEL_CONFIG)
    with pytest.raises(MissingImageSize):
        regions_to_boxes([_square()], config)
    assert parse_boxes([_square()], config) == (None, None)
    assert len(regions_to_boxes([_square()], config, (320, 240))) == 1


ALIASED = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="label" toName="image">
    <Label value="Car" alias="C" hotkey="c" background="#ff0000"/><Label value="Person"/>
  </RectangleLabels>
</View>"""


def test_a_label_with_an_alias_keeps_its_value_as_the_class() -> None:
    """Label Studio writes the alias into ``rectanglelabels``: the class boxloop learns stays
    the value, so adding an alias does not rename a class."""
    config = parse_label_config(ALIASED)
    assert config.labels == ("Car", "Person")
    assert config.label_index == {"Car": 0, "C": 0, "Person": 1}


def test_boxes_of_an_aliased_label_roundtrip_through_its_alias() -> None:
    """An annotation carrying the alias read as "not in the config"; predictions must carry the
    alias too, the name Label Studio stores for that label."""
    config = parse_label_config(ALIASED)
    boxes = Boxes(np.array([[10, 10, 50, 50], [60, 60, 90, 90]]), np.array([0, 1]), (100, 100))
    regions = boxes_to_regions(boxes, config)
    assert [r["value"]["rectanglelabels"] for r in regions] == [["C"], ["Person"]]
    back = regions_to_boxes(regions, config)
    np.testing.assert_array_equal(back.labels, [0, 1])
    # Label Studio also loads a result that names the value (one drawn before the alias)
    assert regions_to_boxes([_square(rectanglelabels=["Car"])], config, (10, 10)).labels[0] == 0
    regions, _ = prediction_of(boxes, config, ["Car", "Person"])
    assert regions[0]["value"]["rectanglelabels"] == ["C"]


@pytest.mark.parametrize(
    "labels",
    [
        '<Label value="Car" alias="Truck"/><Label value="Truck"/>',
        '<Label value="Car" alias="V"/><Label value="Van" alias="V"/>',
    ],
)
def test_an_alias_naming_two_labels_is_an_error(labels: str) -> None:
    """A result naming it could be either label: Label Studio stores only the alias."""
    xml = f'<View><Image name="i" value="$img"/><RectangleLabels name="l" toName="i">{labels}</RectangleLabels></View>'
    with pytest.raises(LabelConfigError, match="names both the label"):
        parse_label_config(xml)


@pytest.mark.parametrize("to_name", ["notes,image", " notes , image ", "image,notes"])
def test_a_control_over_several_objects_targets_its_one_image(to_name: str) -> None:
    """Label Studio allows a comma-separated toName; only the first name was tried, so an image
    named second was "no <Image> with that name"."""
    xml = (
        '<View><Text name="notes" value="$text"/><Image name="image" value="$image"/>'
        f'<RectangleLabels name="label" toName="{to_name}"><Label value="Car"/></RectangleLabels>'
        "</View>"
    )
    config = parse_label_config(xml)
    assert (config.to_name, config.image_key) == ("image", "image")


def test_a_control_over_several_images_is_an_error_not_a_silent_pick() -> None:
    """The first image was taken without a word, and the other image's boxes trained on it."""
    xml = (
        '<View><Image name="left" value="$a"/><Image name="right" value="$b"/>'
        '<RectangleLabels name="label" toName="left,right"><Label value="Car"/></RectangleLabels>'
        "</View>"
    )
    with pytest.raises(LabelConfigError, match=r"several images \('left', 'right'\)"):
        parse_label_config(xml)


def test_a_box_of_the_control_without_its_label_is_an_error_not_background() -> None:
    """A ``rectangle`` region of the project's control was skipped (its object trained as no
    object), while the same box with ``rectanglelabels: []`` was an error."""
    config = parse_label_config(LABEL_CONFIG)
    bare = {**_square(), "type": "rectangle"}
    with pytest.raises(AnnotationParseError, match="no label"):
        regions_to_boxes([_square(), bare], config, (100, 100))


def test_the_task_score_is_that_of_the_boxes_sent() -> None:
    """A box wholly outside the image is not sent, but its score was averaged in: one box of 0.9
    sent, task score 0.5 (the score Uncertainty sampling orders by)."""
    config = parse_label_config(LABEL_CONFIG)
    boxes = Boxes(
        np.array([[10, 10, 40, 40], [200, 200, 260, 260]], np.float32),
        np.array([0, 0]),
        (100, 100),
        np.array([0.9, 0.1], np.float32),
    )
    regions, score = prediction_of(boxes, config, list(config.labels))
    assert len(regions) == 1 and score == pytest.approx(0.9)
