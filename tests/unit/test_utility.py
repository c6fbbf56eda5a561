"""Utility labels, distortions and baselines (backend/utility) on small generated data."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from backend.boxes import Boxes
from backend.utility.baselines import (
    RandomFilter,
    ThresholdRule,
    brisque_score,
    jpeg_quality,
    laplacian_variance,
)
from backend.utility.distortions import Distortion, decode, encode_jpeg, encode_png, jpeg_series
from backend.utility.labels import DetectorUtility, box_confidences, detector_utility, vote

SIZE = (200, 100)


def _gt(*boxes: tuple[float, float, float, float, int]) -> Boxes:
    return Boxes(np.array([b[:4] for b in boxes]), np.array([b[4] for b in boxes]), SIZE)


def _det(*boxes: tuple[float, float, float, float, int, float]) -> Boxes:
    if not boxes:
        return Boxes.empty(SIZE, with_scores=True)
    return Boxes(
        np.array([b[:4] for b in boxes]),
        np.array([b[4] for b in boxes]),
        SIZE,
        np.array([b[5] for b in boxes]),
    )


def _textured(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base, "RGB").resize(size, Image.Resampling.NEAREST)
    noise = rng.normal(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- labels
def test_box_confidences_need_right_class_and_iou() -> None:
    gt = _gt((10, 10, 50, 50, 0), (100, 10, 150, 60, 1))
    det = _det((12, 10, 50, 52, 0, 0.8), (100, 10, 150, 60, 0, 0.9), (101, 10, 150, 60, 1, 0.4))
    conf = box_confidences(gt, det)
    assert conf[0] == pytest.approx(0.8)
    assert conf[1] == pytest.approx(0.4)  # the 0.9 box has the wrong class


def test_utility_is_one_when_a_found_box_survives() -> None:
    gt = _gt((10, 10, 50, 50, 0), (100, 10, 150, 60, 1))
    pristine = _det((10, 10, 50, 50, 0, 0.9), (100, 10, 150, 60, 1, 0.8))
    distorted = _det((10, 10, 50, 50, 0, 0.3), (100, 10, 150, 60, 1, 0.7))
    u = detector_utility(gt, pristine, distorted)
    assert u.binary == 1 and u.counted == 2 and u.kept == 1
    # best box: φ = 0.7, φ′ = 0.8 → printed (0.2)/(1 − 0.3), clipped 0.2/0.3
    assert u.graded == pytest.approx(0.2 / 0.7)
    assert u.clipped == pytest.approx(0.2 / 0.3)


def test_utility_is_zero_when_every_found_box_is_lost() -> None:
    gt = _gt((10, 10, 50, 50, 0))
    pristine = _det((10, 10, 50, 50, 0, 0.9))
    distorted = _det((10, 10, 50, 50, 0, 0.2), (10, 10, 50, 50, 1, 0.95))
    u = detector_utility(gt, pristine, distorted)
    assert u.binary == 0 and u.kept == 0
    assert u.graded < 0
    assert u.graded == pytest.approx((0.2 - 0.5) / (1 - 0.4))
    assert u.clipped == 0.0


def test_utility_undefined_when_the_pristine_image_finds_nothing() -> None:
    gt = _gt((10, 10, 50, 50, 0))
    u = detector_utility(gt, _det((10, 10, 50, 50, 0, 0.45)), _det((10, 10, 50, 50, 0, 0.9)))
    assert u.binary is None and math.isnan(u.graded) and math.isnan(u.clipped)


def test_clipped_utility_is_one_at_the_pristine_score_and_printed_form_is_not() -> None:
    gt = _gt((10, 10, 50, 50, 0))
    same = _det((10, 10, 50, 50, 0, 0.8))
    u = detector_utility(gt, same, same)
    assert u.clipped == pytest.approx(1.0)
    assert u.graded == pytest.approx(0.3 / 0.7)  # Eq. (2) as printed: not 1


def test_sign_of_printed_form_matches_binary_label() -> None:
    rng = np.random.default_rng(0)
    gt = _gt((10, 10, 50, 50, 0))
    for _ in range(200):
        phi_p, phi = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
        u = detector_utility(gt, _det((10, 10, 50, 50, 0, phi_p)), _det((10, 10, 50, 50, 0, phi)))
        assert (u.graded >= 0) == (u.binary == 1)


def test_ignored_ground_truth_does_not_count() -> None:
    gt = Boxes(np.array([[10, 10, 50, 50]]), np.array([0]), SIZE, ignore=np.array([True]))
    det = _det((10, 10, 50, 50, 0, 0.9))
    assert detector_utility(gt, det, det).binary is None


def test_vote_keeps_agreement_and_drops_disagreement() -> None:
    one = DetectorUtility(1, 0.2, 0.8, 1, 1)
    zero = DetectorUtility(0, -0.4, 0.0, 1, 0)
    undefined = DetectorUtility(None, math.nan, math.nan, 0, 0)
    assert vote([one, one]).binary == 1
    assert vote([zero, zero]).binary == 0
    mixed = vote([one, zero])
    assert mixed.binary is None and mixed.graded_mean == pytest.approx(-0.1)
    assert mixed.clipped_mean == pytest.approx(0.4)
    assert vote([one, undefined]).binary is None
    assert vote([one, undefined], require_all=False).binary == 1


# ----------------------------------------------------------------------------- distortions
def test_jpeg_distortion_returns_pixels_without_tables() -> None:
    image = _textured()
    distorted = Distortion("jpeg", 10).apply(image)
    assert distorted.size == image.size and distorted.mode == "RGB"
    assert not getattr(distorted, "quantization", None)
    assert jpeg_quality(distorted) == 100.0  # nothing left to leak
    assert np.abs(np.asarray(distorted, float) - np.asarray(image, float)).mean() > 1.0


def test_png_round_trip_keeps_pixels() -> None:
    distorted = Distortion("jpeg", 5).apply(_textured(1))
    again = decode(encode_png(distorted))
    assert np.array_equal(np.asarray(again), np.asarray(distorted))


@pytest.mark.parametrize("text", ["blur:2", "noise:25", "downscale:4"])
def test_other_distortions_change_pixels_and_keep_size(text: str) -> None:
    image = _textured(2)
    distorted = Distortion.parse(text).apply(image, seed=3)
    assert distorted.size == image.size
    assert not np.array_equal(np.asarray(distorted), np.asarray(image))


def test_distortion_parse_rejects_bad_text() -> None:
    with pytest.raises(ValueError, match="KIND:LEVEL"):
        Distortion.parse("jpeg")
    with pytest.raises(ValueError, match="kind must be"):
        Distortion.parse("sepia:3")
    with pytest.raises(ValueError, match="quality"):
        Distortion("jpeg", 0)
    assert [d.name for d in jpeg_series((5, 50))] == ["jpeg_q5", "jpeg_q50"]


# ----------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("quality", [3, 10, 25, 50, 75, 90])
def test_jpeg_quality_reads_the_tables(quality: int) -> None:
    data = encode_jpeg(_textured(), quality)
    assert jpeg_quality(data) == quality
    with Image.open(io.BytesIO(data)) as opened:
        assert jpeg_quality(opened) == quality


def test_jpeg_quality_of_png_is_100() -> None:
    assert jpeg_quality(encode_png(_textured())) == 100.0


def test_laplacian_variance_drops_with_blur() -> None:
    image = _textured(4)
    sharp = laplacian_variance(image)
    blurred = laplacian_variance(Distortion("blur", 2).apply(image))
    assert blurred < sharp / 4


def _scene(seed: int = 0) -> Image.Image:
    """Smooth discs, lightly blurred, a little sensor noise: natural enough for BRISQUE."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (192, 144), (120, 140, 160))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = int(rng.integers(0, 192)), int(rng.integers(0, 144)), int(rng.integers(5, 40))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), float)
    pixels += rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("text", ["blur:3", "jpeg:5"])
def test_brisque_scores_a_distorted_image_worse(text: str) -> None:
    pytest.importorskip("brisque", reason="brisque is not installed (pip install brisque)")
    image = _scene()
    assert brisque_score(Distortion.parse(text).apply(image)) > brisque_score(image) + 10


def test_threshold_rule_finds_cut_and_direction() -> None:
    scores = np.array([1.0, 2.0, 3.0, 10.0, 11.0, 12.0])
    rule = ThresholdRule.fit(scores, np.array([0, 0, 0, 1, 1, 1]))
    assert rule.higher_is_useful and rule.train_accuracy == 1.0 and 3.0 < rule.threshold < 10.0
    assert rule.predict(np.array([0.0, 20.0])).tolist() == [0, 1]
    flipped = ThresholdRule.fit(scores, np.array([1, 1, 1, 0, 0, 0]))
    assert not flipped.higher_is_useful and flipped.train_accuracy == 1.0
    assert flipped.predict(np.array([0.0, 20.0])).tolist() == [1, 0]


def test_threshold_rule_can_predict_all_one_class() -> None:
    rule = ThresholdRule.fit(np.array([5.0, 5.0, 5.0]), np.array([1, 1, 0]))
    assert rule.train_accuracy == pytest.approx(2 / 3)
    assert rule.predict(np.array([5.0, 1.0])).tolist() == [1, 1]


def test_random_filter_drops_the_fraction() -> None:
    labels = RandomFilter(0.25, seed=1).predict(40)
    assert (labels == 0).sum() == 10
    with pytest.raises(ValueError):
        RandomFilter(1.5).predict(3)


# ----------------------------------------------------------------------------- policy
def test_policy_moves_low_utility_tasks_to_the_end_keeping_order() -> None:
    from backend.utility.policy import UtilityPolicy

    policy = UtilityPolicy("move_to_end", threshold=0.5)
    scores = {1: 0.9, 2: 0.1, 3: 0.7, 4: 0.3}
    assert policy.order([4, 3, 2, 1, 5], scores) == [3, 1, 5, 4, 2]  # 5 unscored: stays
    assert policy.counts(scores) == {"scored": 4, "low_utility": 2, "flagged": 2, "moved_to_end": 2}
    assert policy.meta(0.25) == {"utility": 0.25, "low_utility": True}


def test_low_utility_is_decided_on_the_stored_score() -> None:
    """0.49996 was flagged low in the prediction meta (raw score below 0.5) while the task data
    stored 0.5, not low: the order did not move it and ``/status`` counted it useful."""
    from backend.utility.policy import UtilityPolicy
    from backend.utility.scorer import UtilityScorer, stored_scores

    policy = UtilityPolicy("move_to_end", threshold=0.5)
    scorer = UtilityScorer.__new__(UtilityScorer)  # no predictor: only the policy's side
    scorer.policy = policy
    for raw, kept, low in ((0.49996, 0.5, False), (0.49994, 0.4999, True)):
        assert policy.meta(raw) == {"utility": kept, "low_utility": low}
        stored = stored_scores([(7, scorer.fields(raw))], "boxloop_utility")
        assert stored == {7: kept}
        assert policy.is_low(raw) == policy.is_low(stored[7]) == low
        assert policy.order([7, 8], {8: 0.9, 7: raw}) == policy.order([7, 8], {**stored, 8: 0.9})
        assert policy.counts({7: raw}) == policy.counts(stored)


def test_policy_ignore_and_flag_leave_the_order() -> None:
    from backend.utility.policy import UtilityPolicy

    scores = {1: 0.1, 2: 0.9}
    assert UtilityPolicy("flag").order([1, 2], scores) == [1, 2]
    assert UtilityPolicy("ignore").meta(0.1) == {"utility": 0.1}
    assert UtilityPolicy("ignore").counts(scores)["flagged"] == 0
    assert UtilityPolicy("flag").meta(None) == {}
    with pytest.raises(ValueError, match="action"):
        UtilityPolicy("drop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold"):
        UtilityPolicy("flag", threshold=1.5)


@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([float("nan"), 5.0, 10.0], [0, 1, 1]),  # higher is useful; the nan one is not
        ([float("nan"), 10.0, 90.0], [0, 1, 0]),  # BRISQUE-like: lower is useful
    ],
)
def test_a_threshold_rule_predicts_what_it_reports_on_nan_scores(
    scores: list[float], labels: list[int]
) -> None:
    """A nan score (BRISQUE gives one on some images) is the least useful in both directions:
    before, the fit put the cut at -inf (the midpoint of -inf and a value), or counted nan as the
    most useful, and ``predict`` then disagreed with the accuracy the fit reported."""
    s, y = np.array(scores), np.array(labels)
    rule = ThresholdRule.fit(s, y)
    assert rule.train_accuracy == 1.0
    assert rule.predict(s).tolist() == labels
